"""Shared worker processes: one process per backend and environment, serving job after job.

A worker process pays for its framework's import (and JAX/TensorFlow's first compilations) once: 3 to 10 s on
a laptop-class CPU, more than most jobs take. Inside ``shared_workers()``, ``run_backend`` hands each job to an
idle served worker of the same backend and environment (``python -m gradparity.backends.worker --serve``),
starting one when none is idle, instead of starting a process per job. Everything else stays as it is: each job
has its own folder and result file; a job that crashes, hangs or is stopped takes its worker down with it (the
process group is killed and the worker leaves the pool), so isolation between backends holds; between two
jobs the served worker forgets every module imported from outside gradparity and the installed packages (a
user's factory module is imported afresh) and restores ``sys.path``.

Used by the test suite (one pool for the session) and by commands that run several jobs on one backend in
a row (``gradparity check``'s stages).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

#: Environment variables that differ between two calls without changing what a worker computes.
_VOLATILE_ENV = ("PYTEST_CURRENT_TEST", "GRADPARITY_PARENT_PID", "COLUMNS", "LINES")
#: Environment variables whose only effect is to hide GPUs from the frameworks (device "cpu").
_GPU_HIDING_ENV = ("CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS")
#: Device nodes of the GPUs the frameworks use on Linux: NVIDIA's, AMD ROCm's, WSL's.
_GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def no_gpu_hardware() -> bool:
    """True on Linux when no GPU device node exists: hiding GPUs (device "cpu") then changes nothing a framework
    sees, so a job on device "cpu" and one on "auto" compute the same in the same worker (each session still
    picks its device and writes its own note). False elsewhere, or when unsure."""
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _GPU_DEVICE_NODES)


@dataclass
class ServedWorker:
    """One served worker process: its key (backend and environment), its log, and the jobs it ran."""

    key: tuple
    proc: subprocess.Popen
    log_path: Path
    jobs: int = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, job_dir: Path, timing_lock: str | None) -> None:
        """Hand the worker one job folder (and the timing lock of the run it belongs to)."""
        self.proc.stdin.write(f"{job_dir}\t{timing_lock or ''}\n")
        self.proc.stdin.flush()
        self.jobs += 1

    def kill(self) -> None:
        """SIGKILL the worker's process group and reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@dataclass
class WorkerPool:
    """Idle served workers by key; ``max_idle`` of them at most (the least recently used one goes first)."""

    folder: Path
    max_idle: int = 6
    idle: list[ServedWorker] = field(default_factory=list)
    started: int = 0
    reused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def key(self, backend: str, env: dict[str, str], device: str = "cpu", precision: str = "highest") -> tuple:
        """What a served worker must share with a job to run it: the backend, the environment it started with,
        the job's ``device`` and its ``precision`` (a framework's global switches that a session pins and that a
        later job must not inherit). On a machine without GPUs, devices "cpu" and "auto" share workers."""
        ignored = _VOLATILE_ENV
        if device in ("cpu", "auto") and no_gpu_hardware():
            ignored, device = _VOLATILE_ENV + _GPU_HIDING_ENV, "cpu"
        return backend, tuple(sorted((k, v) for k, v in env.items() if k not in ignored)), device, precision

    def home(self, backend: str) -> Path:
        """A private folder per backend for what a framework writes at import (Keras' KERAS_HOME)."""
        path = self.folder / backend
        path.mkdir(exist_ok=True)
        return path

    def acquire(self, backend: str, env: dict[str, str], device: str = "cpu",
                precision: str = "highest") -> ServedWorker:
        """An idle worker with this key (``key``), or a new one."""
        key = self.key(backend, env, device, precision)
        with self._lock:
            for w in reversed(self.idle):
                if w.key == key:
                    self.idle.remove(w)
                    if w.alive():
                        self.reused += 1
                        return w
            self.started += 1
            n = self.started
        log_path = self.folder / f"worker-{n}-{backend}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gradparity.backends.worker", "--serve"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                    text=True, start_new_session=True)
        return ServedWorker(key, proc, log_path)

    def release(self, worker: ServedWorker) -> None:
        """Back to the idle list after a job that ended normally; the oldest idle worker goes when full."""
        if not worker.alive():
            return
        evicted = None
        with self._lock:
            self.idle.append(worker)
            if len(self.idle) > self.max_idle:
                evicted = self.idle.pop(0)
        if evicted is not None:
            evicted.kill()

    @contextlib.contextmanager
    def keeping_none(self) -> Iterator[None]:
        """Within: every idle worker is stopped now, and each worker stops after its job instead of idling (a
        large model's worker keeps gigabytes resident after its session ends); the idle limit is restored after."""
        saved, self.max_idle = self.max_idle, 0
        with self._lock:
            idle, self.idle = self.idle, []
        for w in idle:
            w.kill()
        try:
            yield
        finally:
            self.max_idle = saved

    def close(self) -> None:
        with self._lock:
            idle, self.idle = self.idle, []
        for w in idle:
            w.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


_ACTIVE: WorkerPool | None = None


def active_pool() -> WorkerPool | None:
    """The pool ``run_backend`` hands jobs to, or None (a fresh process per job)."""
    return _ACTIVE


@contextlib.contextmanager
def shared_workers(max_idle: int = 6) -> Iterator[WorkerPool]:
    """Within the block, jobs run in served workers shared by backend and environment; all are killed at the end.

    Nested blocks share the outer pool.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    pool = WorkerPool(Path(tempfile.mkdtemp(prefix=f"gradparity-pool-{os.getpid()}-")), max_idle)
    _ACTIVE = pool
    try:
        yield pool
    finally:
        _ACTIVE = None
        pool.close()
