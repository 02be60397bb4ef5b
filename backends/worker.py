"""Worker process entry point: ``python -m gradparity.backends.worker JOB_DIR`` (or ``--serve``: many jobs).

Runs one backend on one job and writes, into JOB_DIR, ``result.json`` plus
one ``grads-<method>.npz`` per finished method. ``result.json`` is rewritten
atomically after every method, so whatever was finished before a crash,
hang or out-of-memory kill survives and the parent reports the rest as lost.
This is the only place a backend module (and so its framework) is imported.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from gradparity.backends.protocol import RESULT_FILE, TIMING_LOCK_ENV, DeviceUnavailable, WorkerJob

#: Timed calls per method after one warm-up call; the report gives their median.
TIMED_CALLS = 3


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _peak_rss_mib() -> float | None:
    """The largest resident memory this worker process has held so far, in MiB (Linux reports KiB; None where
    the resource module is missing)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 20 if sys.platform == "darwin" else 1024)


def _error_text(exc: BaseException, limit: int = 6) -> str:
    """One-line cause plus the last frames, enough to act on without the full traceback."""
    tb = "".join(traceback.format_exception(exc, limit=-limit)).rstrip()
    return f"{type(exc).__name__}: {exc}\n{tb}"


def _missing_message(job: WorkerJob, exc: ModuleNotFoundError) -> str:
    if not job.extra:
        return f"{exc.name} is not installed, so backend '{job.backend}' cannot run; reinstall gradparity"
    return (f"{exc.name} is not installed, so backend '{job.backend}' cannot run; install it with: "
            f"pip install 'gradparity[{job.extra}]' (from a gradparity checkout, with the tested versions: "
            f"pip install -c constraints.txt -e '.[{job.extra}]')")


def _check_grads(job: WorkerJob, method: str, grads: dict) -> dict[str, np.ndarray]:
    """Reject a backend result that is not in canonical names and shapes (a backend bug)."""
    expected = job.expected_grad_shapes(method)
    if job.task != "gradients" and not expected:
        return {name: np.asarray(g) for name, g in grads.items()}
    if set(grads) != set(expected):
        raise ValueError(f"backend returned gradients {sorted(grads)}, expected {sorted(expected)}")
    out = {}
    for name, shape in expected.items():
        g = np.asarray(grads[name])
        if g.shape != shape:
            raise ValueError(f"gradient of {name} has shape {g.shape}, expected {shape}")
        out[name] = g
    return out


class TimingTurns:
    """Workers side by side take turns for their timed calls, and none times while another imports.

    With the runner's lock file (``TIMING_LOCK_ENV``) a worker holds it shared while it imports its framework
    and opens its session (``setting_up``), and exclusively while it times a method (``alone``): a timing waits
    until no other worker is importing or timing, so imports overlap while no timing shares the cores with an
    import. A setup that takes longer than ``WAIT_S`` (a hung import) does not hold the others' timings hostage:
    past it they time anyway and say so (``note``). Without the variable (one worker at a time) this does
    nothing. A killed worker's hold ends with its process.
    """

    WAIT_S = 20.0

    def __init__(self):
        path = os.environ.get(TIMING_LOCK_ENV)
        self._file = open(path, "a") if path else None
        self.note: str | None = None

    @contextlib.contextmanager
    def setting_up(self):
        """Hold the lock shared for the block (import, session)."""
        if self._file is None:
            yield
            return
        import fcntl

        fcntl.flock(self._file, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def alone(self):
        """Hold the lock exclusively for the block (the timed calls), waiting at most ``WAIT_S`` for it."""
        if self._file is None or self.note is not None:
            yield
            return
        import fcntl

        deadline = time.monotonic() + self.WAIT_S
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.note = (f"timed while another worker was still setting up (waited {self.WAIT_S:g} s): "
                                 "timings may include its load")
                    yield
                    return
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the gradparity process that started it dies.

    The worker runs in its own session (so the parent can kill its whole group
    on a timeout); without this, a parent killed by SIGKILL would leave it
    computing, re-parented to init. Elsewhere this is a no-op: the parent's
    signal handlers still stop the worker on SIGINT / SIGTERM / SIGHUP.
    """
    expected = os.environ.get("GRADPARITY_PARENT_PID")
    if not sys.platform.startswith("linux") or not expected:
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != expected:  # the parent died before prctl took effect
        os._exit(1)


def run(job_dir: Path) -> int:
    """Run the job in ``job_dir``; return the process exit code (0 even when methods fail)."""
    job = WorkerJob.load(job_dir)
    state = {
        "backend": job.backend,
        "status": "running",
        "error": None,
        "environment": None,
        "methods": {},
    }
    result_path = job_dir / RESULT_FILE

    def save():
        _write_atomic(result_path, json.dumps(state, indent=1))

    save()
    turns = TimingTurns()
    try:
        return _run_methods(job, job_dir, state, save, turns)
    finally:
        turns.close()


def _run_methods(job: WorkerJob, job_dir: Path, state: dict, save, turns: TimingTurns) -> int:
    """Open the backend's session and run every method, saving ``state`` after each step."""
    try:
        # A framework may be imported at module import or lazily in open_session: both count.
        with turns.setting_up():
            module = importlib.import_module(job.module)
            session = module.open_session(job)
            env = dict(session.environment())
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in job.requires:
            state.update(status="missing", error=_missing_message(job, exc))
        else:
            state.update(status="error", error=_error_text(exc))
        save()
        return 0
    except DeviceUnavailable as exc:
        state.update(status="error", error=str(exc))
        save()
        return 0
    except Exception as exc:  # a broken install raises all sorts of errors at import
        state.update(status="error", error=f"setting up backend '{job.backend}' failed: " + _error_text(exc))
        save()
        return 0
    env.update(python=platform.python_version(), platform=platform.platform(), pid=os.getpid())
    state["environment"] = env
    save()

    for method in job.methods:
        row: dict = {"status": "running", "loss": None, "seconds": None, "error": None}
        state["methods"][method] = row
        save()
        try:
            # The median of TIMED_CALLS for gradients (one descheduled call must not be the timing); a training
            # run or a loss function is timed once (a whole run, or no timing reported).
            timed = job.task == "gradients" or (job.task == "model_check" and "builtin" in job.payload)
            # A user's model is not timed: one call is the result (a 124M-parameter model's case takes seconds,
            # and a warm-up would double it); its time is the first call's, compilation included.
            if timed or job.task != "model_check":
                session.compute(method)  # warm-up: compilation and caches stay out of the timing
            times = []
            # The timings a report shows (the reduction methods, a training run's time per step) take their
            # turn; a check of a user's model, a loss function or an optimizer case reports none.
            with turns.alone() if timed or job.task in ("train", "model_train") else contextlib.nullcontext():
                for _ in range(TIMED_CALLS if timed else 1):
                    start = time.perf_counter()
                    raw = session.compute(method)
                    times.append(time.perf_counter() - start)
            seconds = float(np.median(times))
            if turns.note and state["environment"] is not None:
                state["environment"]["timing_note"] = turns.note
            grads = _check_grads(job, method, raw.grads)
            grads_file = "grads-" + method.replace("/", "%2F") + ".npz"  # data-parallel cases hold a "/"
            np.savez(job_dir / (grads_file + ".tmp.npz"), **grads)
            os.replace(job_dir / (grads_file + ".tmp.npz"), job_dir / grads_file)
            row.update(status="ok", loss=float(raw.loss), seconds=seconds, grads_file=grads_file,
                       info=raw.info, peak_rss_mib=_peak_rss_mib())
        except Exception as exc:
            row.update(status="error", error=_error_text(exc))
        save()

    state["status"] = "done"
    save()
    return 0


def serve() -> int:
    """``python -m gradparity.backends.worker --serve``: run job after job in this process (``gradparity.run.pool``).

    Each line on stdin is ``JOB_DIR<TAB>TIMING_LOCK`` (the lock may be empty); the job runs as ``run`` would
    run it in a fresh process, and its result file's final status tells the parent it ended. Between two jobs,
    every module imported from outside gradparity and the installed packages (a user's factory module, a test's
    model file) is forgotten and ``sys.path`` restored, so the next job imports its own afresh. Ends at EOF.
    """
    import sysconfig

    installed = tuple({os.path.realpath(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                                     sysconfig.get_paths()["stdlib"], sys.prefix, sys.base_prefix)})
    base_path = list(sys.path)
    for line in sys.stdin:
        job_dir, _, lock = line.rstrip("\n").partition("\t")
        if not job_dir:
            continue
        if lock:
            os.environ[TIMING_LOCK_ENV] = lock
        else:
            os.environ.pop(TIMING_LOCK_ENV, None)
        try:
            run(Path(job_dir))
        finally:
            sys.path[:] = base_path
            _forget_user_modules(installed)
    return 0


def _forget_user_modules(installed: tuple[str, ...]) -> None:
    """Drop from ``sys.modules`` every module whose file lies outside ``installed`` and is not gradparity's."""
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or name == "gradparity" or name.startswith("gradparity."):
            continue
        if not os.path.realpath(path).startswith(installed):
            del sys.modules[name]


def _watch_parent() -> None:
    """A served worker's parent death signal: Linux sends PR_SET_PDEATHSIG when the *thread* that started the
    process ends, and the runner's threads end after every run, so a served worker instead checks, twice a
    second, that its parent is still the gradparity process that started it (and exits when it is not)."""
    import threading

    expected = os.environ.get("GRADPARITY_PARENT_PID")
    if not expected:
        return

    def watch():
        while str(os.getppid()) == expected:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="gradparity-parent-watch", daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _watch_parent()
        sys.exit(serve())
    _die_with_parent()
    sys.exit(run(Path(sys.argv[1])))
