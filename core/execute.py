"""Run each backend in its own worker process and collect what it produced.

One backend's crash, hang or out-of-memory kill becomes failed rows with
its error; the other backends' results are untouched. The worker writes
its results incrementally, so methods finished before a crash are kept.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradparity.backends import BackendInfo
from gradparity.backends.protocol import RESULT_FILE, WorkerJob

#: How a whole backend ended. 'ok': the worker finished (single methods may still have failed).
BACKEND_STATUSES = ("ok", "missing", "error", "crashed", "timeout")


@dataclass
class MethodOutcome:
    """One method's native (unnormalized) result as the worker reported it."""

    status: str  # "ok" | "error" | "missing" | "crashed" | "timeout"
    loss: float | None = None
    seconds: float | None = None
    error: str | None = None
    grads: dict[str, np.ndarray] | None = field(default=None, repr=False)


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


def run_backend(
    job: WorkerJob,
    info: BackendInfo,
    timeout_s: float,
    extra_env: dict[str, str] | None = None,
) -> BackendOutcome:
    """Run ``job`` in a fresh worker process for backend ``info``; never raises for backend failures.

    The worker gets ``timeout_s`` seconds of wall-clock time, framework import
    included; past that its whole process group is killed.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"gradparity-{info.name}-") as tmp:
        job_dir = Path(tmp)
        job.save(job_dir)
        env = dict(os.environ)
        env.update(info.environment_variables(job.dtype, job.device, str(job_dir)))
        env.update(extra_env or {})
        env["PYTHONUNBUFFERED"] = "1"
        log_path = job_dir / "worker.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gradparity.backends.worker", str(job_dir)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # so a timeout kills the worker's own children too
            )
            try:
                returncode = proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                returncode = proc.wait()
                timed_out = True
            except BaseException:  # Ctrl-C in the parent: the worker's own session would outlive it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        outcome = _collect(job, info, job_dir, returncode, timed_out, timeout_s, log_path)
    outcome.wall_seconds = time.perf_counter() - start
    return outcome


def _collect(job, info, job_dir, returncode, timed_out, timeout_s, log_path) -> BackendOutcome:
    """Turn the worker's files and exit status into a BackendOutcome."""
    state = _read_result(job_dir) or {}
    methods: dict[str, MethodOutcome] = {}
    for name, row in (state.get("methods") or {}).items():
        if row.get("status") == "ok":
            with np.load(job_dir / row["grads_file"]) as z:
                grads = {k: z[k] for k in z.files}
            methods[name] = MethodOutcome("ok", row["loss"], row["seconds"], None, grads)
        elif row.get("status") == "error":
            methods[name] = MethodOutcome("error", error=row.get("error"))

    worker_status = state.get("status")
    if timed_out:
        status = "timeout"
        error = f"worker did not finish within timeout_s = {timeout_s:g} s and was killed"
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
