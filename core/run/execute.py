"""Run each backend in its own worker process and collect what it produced.

One backend's crash, hang or out-of-memory kill becomes failed rows with
its error; the other backends' results are untouched. The worker writes
its results incrementally, so methods finished before a crash are kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradparity.backends import BackendInfo
from gradparity.backends.protocol import RESULT_FILE, TIMING_LOCK_ENV, WorkerJob
from gradparity.backends.protocol.jobs import JOB_DIR_PREFIX
from gradparity.errors import Interrupted
from gradparity.run.pool import active_pool

#: How a whole backend ended. 'ok': the worker finished (single methods may still have failed).
BACKEND_STATUSES = ("ok", "missing", "error", "crashed", "timeout", "interrupted")
#: Megabytes of available memory (MemAvailable) below which the largest running worker is stopped, so that a
#: model too big for the memory left becomes a failed row instead of a machine thrashing in swap or the kernel's
#: out-of-memory killer picking a process. Default: 4 % of the machine's memory, at least 512 MiB.
MEMORY_FLOOR_ENV = "GRADPARITY_MEMORY_FLOOR_MB"
_RUNNING: set[int] = set()
_RUNNING_LOCK = threading.Lock()


def memory_floor_bytes() -> int | None:
    """The available memory below which the largest worker is stopped (None: not on Linux)."""
    if os.environ.get(MEMORY_FLOOR_ENV):
        return int(float(os.environ[MEMORY_FLOOR_ENV]) * 2 ** 20)
    total = meminfo("MemTotal:")
    return None if total is None else max(512 * 2 ** 20, total // 25)


def meminfo(key: str) -> int | None:
    """A /proc/meminfo entry in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _resident_bytes(pid: int) -> int:
    """VmRSS of a process (0 when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _OutOfMemory(Exception):
    """The machine ran short of memory and this worker was the largest running: it is stopped."""

    def __init__(self, resident: int, available: int, floor: int):
        super().__init__()
        self.message = (f"stopped by gradparity: the machine had {available / 2 ** 30:.2f} GiB of memory left "
                        f"(below the floor of {floor / 2 ** 30:.2f} GiB, {MEMORY_FLOOR_ENV}) while this worker, the "
                        f"largest running, held {resident / 2 ** 30:.2f} GiB: the model needs more memory than this "
                        "machine has free (a smaller batch, float32, fewer frameworks at once, or a larger machine)")


def _check_memory(pid: int) -> None:
    """Raise ``_OutOfMemory`` when available memory is below the floor and ``pid`` is the largest worker."""
    floor = memory_floor_bytes()
    available = meminfo("MemAvailable:") if floor is not None else None
    if available is None or available >= floor:
        return
    with _RUNNING_LOCK:
        sizes = {p: _resident_bytes(p) for p in _RUNNING}
    if sizes and max(sizes, key=sizes.get) == pid:
        raise _OutOfMemory(sizes[pid], available, floor)


@dataclass
class MethodOutcome:
    """One method's native (unnormalized) result as the worker reported it."""

    status: str  # "ok" | "error" | "missing" | "crashed" | "timeout" | "interrupted" | "nonfinite"
    loss: float | None = None
    seconds: float | None = None
    error: str | None = None
    grads: dict[str, np.ndarray] | None = field(default=None, repr=False)
    info: dict | None = None  # what the case reported besides arrays (a user's model: its layers)
    peak_rss_mib: float | None = None  # the worker process's largest resident memory when the case ended


@dataclass
class BackendOutcome:
    """Everything one worker process produced, or why it produced nothing."""

    backend: str
    status: str
    error: str | None
    environment: dict | None
    methods: dict[str, MethodOutcome]
    wall_seconds: float


def _tail(path: Path, n_chars: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n_chars:].strip()


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # a real-time or platform-specific signal has no name
            name = f"signal {-returncode}"
        hint = " (the out-of-memory killer sends SIGKILL)" if -returncode == signal.SIGKILL else ""
        return f"worker process was killed by {name}{hint}"
    return f"worker process exited with code {returncode}"


def _read_result(job_dir: Path) -> dict | None:
    try:
        return json.loads((job_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


#: Set (to anything non-empty) to refuse every worker that would import a framework: it becomes a failed row
#: at once. The fast test tier sets it, so a test that starts a framework worker there fails visibly instead
#: of slowing the tier down; a dry run of a command on a machine without the frameworks can use it too.
NO_FRAMEWORK_WORKERS_ENV = "GRADPARITY_NO_FRAMEWORK_WORKERS"



def remove_stale_job_dirs(tmp_root: str | None = None) -> list[Path]:
    """Delete job folders left by gradparity runs whose process no longer exists (e.g. killed by SIGKILL).

    Only folders named ``gradparity-job-<pid>-...`` that hold a job file and
    whose pid is gone are removed; returns them.
    """
    import shutil

    from gradparity.backends.protocol import JOB_FILE

    removed = []
    root = Path(tmp_root or tempfile.gettempdir())
    try:
        candidates = list(root.glob(JOB_DIR_PREFIX + "*"))
    except OSError:
        return removed
    for d in candidates:
        pid_text = d.name[len(JOB_DIR_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or not (d / JOB_FILE).exists() or _alive(int(pid_text)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group (it runs in its own session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class StopFlag(threading.Event):
    """Set by the runner when a signal stops a run: every worker waiting on it is killed; ``signum`` says which."""

    signum: int = signal.SIGINT


def run_backend(
    job: WorkerJob,
    info: BackendInfo,
    timeout_s: float,
    extra_env: dict[str, str] | None = None,
    on_progress=None,
    stop: StopFlag | None = None,
) -> BackendOutcome:
    """Run ``job`` in a fresh worker process for backend ``info``; never raises for backend failures.

    The worker gets ``timeout_s`` seconds of wall-clock time, framework import
    included; past that its whole process group is killed. On an interruption
    (KeyboardInterrupt, or ``Interrupted`` from a signal handler) the worker's
    group is killed, its job folder removed, and ``Interrupted`` is raised
    carrying the methods it had finished (``.outcome``). When ``stop`` is set (by the runner, from another
    thread) the worker is killed within a fraction of a second and the outcome, status "interrupted", is
    returned instead. ``on_progress(done, total)``, when given, is called about twice a second with how many
    of the job's methods the worker has finished (from its result file).
    """
    start = time.perf_counter()
    if os.environ.get(NO_FRAMEWORK_WORKERS_ENV) and not set(info.requires) <= {"numpy"}:
        error = (f"not started: {NO_FRAMEWORK_WORKERS_ENV} is set, so no worker that imports a framework runs "
                 f"(backend '{info.name}' needs {', '.join(info.requires)})")
        return BackendOutcome(info.name, "error", error, None,
                              {m: MethodOutcome("error", error=error) for m in job.methods}, 0.0)
    pool = active_pool()
    with tempfile.TemporaryDirectory(prefix=f"{JOB_DIR_PREFIX}{os.getpid()}-{info.name}-") as tmp, \
            contextlib.ExitStack() as resources:
        job_dir = Path(tmp)
        job.save(job_dir)
        env = dict(os.environ)
        env.update(info.environment_variables(job.dtype, job.device,
                                              str(pool.home(info.name) if pool is not None else job_dir)))
        env.update(extra_env or {})
        env["PYTHONUNBUFFERED"] = "1"
        env["GRADPARITY_PARENT_PID"] = str(os.getpid())
        interrupted: Interrupted | None = None
        proc: subprocess.Popen | None = None
        served = None
        timed_out = False
        out_of_memory = None
        try:
            if pool is not None:
                # A served worker outlives this run's timing lock: it gets the lock with each job instead.
                lock = env.pop(TIMING_LOCK_ENV, None)
                # dtype is not a process-wide setting (every session sets what it computes in; JAX's x64 is in
                # the environment): float32 and float64 jobs share a worker.
                served = pool.acquire(info.name, env, job.device, job.precision)
                proc, log_path = served.proc, served.log_path
                served.submit(job_dir, lock)
            else:
                log_path = job_dir / "worker.log"
                log = resources.enter_context(open(log_path, "wb"))
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gradparity.backends.worker", str(job_dir)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,  # so a timeout kills the worker's own children too
                )
            with _RUNNING_LOCK:
                _RUNNING.add(proc.pid)
            try:
                returncode = _wait(proc, job_dir, len(job.methods), timeout_s, on_progress, stop,
                                   served is not None)
            finally:
                with _RUNNING_LOCK:
                    _RUNNING.discard(proc.pid)
        except _OutOfMemory as exc:
            _kill_group(proc)
            returncode, out_of_memory = proc.returncode, exc.message
        except _Stopped:
            _kill_group(proc)
            interrupted = Interrupted(stop.signum)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode, timed_out = proc.returncode, True
        except (KeyboardInterrupt, Interrupted) as exc:
            # The worker runs in its own session, so it outlives the parent unless killed here.
            if proc is not None:
                _kill_group(proc)
            interrupted = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            returncode = proc.returncode if proc else None
        except BaseException:
            if proc is not None:
                _kill_group(proc)
            raise
        if served is not None and proc.poll() is None:
            pool.release(served)  # the job ended normally: the worker serves the next one
        outcome = _collect(job, info, job_dir, returncode, timed_out, timeout_s, log_path, interrupted,
                           out_of_memory)
    outcome.wall_seconds = time.perf_counter() - start
    if interrupted is not None and not (stop is not None and stop.is_set()):
        interrupted.outcome = outcome
        raise interrupted
    return outcome


class _Stopped(Exception):
    """The runner's stop flag was set while this worker ran."""


#: The result file's status once a worker has ended a job (``done``, or a setup that failed).
_FINAL = ("done", "missing", "error")


def _wait(proc: subprocess.Popen, job_dir: Path, total: int, timeout_s: float, on_progress,
          stop: StopFlag | None, served: bool = False) -> int:
    """``proc.wait(timeout_s)`` in short slices: between them, tell ``on_progress(done, total)`` the finished
    methods and raise ``_Stopped`` as soon as ``stop`` is set. A ``served`` worker does not exit after the
    job: its result file's final status ends the wait (0)."""
    deadline, reported = time.monotonic() + timeout_s, 0
    while True:
        try:
            return proc.wait(timeout=max(0.0, min(0.05 if served else 0.2, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise
        if stop is not None and stop.is_set():
            raise _Stopped
        _check_memory(proc.pid)
        if not served and on_progress is None:
            continue
        state = _read_result(job_dir) or {}   # read once a slice, for both uses below
        if served and state.get("status") in _FINAL:
            return 0
        if on_progress is not None:
            done = sum(1 for row in (state.get("methods") or {}).values() if row.get("status") in ("ok", "error"))
            reported = max(reported, done)   # an unreadable file (between writes) is not a step back
            on_progress(reported, total)


def _collect(job, info, job_dir, returncode, timed_out, timeout_s, log_path,
             interrupted: Interrupted | None = None, out_of_memory: str | None = None) -> BackendOutcome:
    """Turn the worker's files and exit status into a BackendOutcome."""
    state = _read_result(job_dir) or {}
    methods: dict[str, MethodOutcome] = {}
    for name, row in (state.get("methods") or {}).items():
        if row.get("status") == "ok":
            try:
                with np.load(job_dir / row["grads_file"], allow_pickle=False) as z:
                    grads = {k: z[k] for k in z.files}
            except (OSError, ValueError, KeyError) as exc:
                methods[name] = MethodOutcome("error", error=f"the worker's gradient file is unreadable: {exc}")
                continue
            methods[name] = MethodOutcome("ok", row["loss"], row["seconds"], None, grads, row.get("info"),
                                          row.get("peak_rss_mib"))
        elif row.get("status") == "error":
            methods[name] = MethodOutcome("error", error=row.get("error"))

    worker_status = state.get("status")
    if interrupted is not None:
        status = "interrupted"
        error = f"run interrupted by {interrupted.signal_name}; the worker was stopped"
    elif out_of_memory is not None:
        status, error = "crashed", out_of_memory
    elif timed_out:
        status = "timeout"
        error = f"timed out: still running after timeout_s = {timeout_s:g} s, so the worker was killed"
    elif returncode != 0:
        status = "crashed"
        error = _describe_exit(returncode)
    elif worker_status in ("missing", "error"):
        status, error = worker_status, state.get("error")
    elif worker_status == "done":
        status, error = "ok", None
    else:
        status, error = "crashed", "worker process exited without finishing its result file"
    if status in ("crashed", "timeout") or (status == "error" and not state.get("error")):
        tail = _tail(log_path)
        if tail:
            error = f"{error}\nlast output of the worker:\n{tail}"

    for name in job.methods:
        if name not in methods:
            # Never finished: it shares the fate of its backend.
            methods[name] = MethodOutcome(status if status != "ok" else "error",
                                          error=error or "no result was written")
    return BackendOutcome(info.name, status, error, state.get("environment"), methods, 0.0)
