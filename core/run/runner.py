"""The one runner: every command's worker processes start, run, stop and end here.

A command says *what* to run (a list of ``WorkerRun``: a job from ``gradparity.backends.make_job``, the
backend, a time limit) and gets every job's ``BackendOutcome`` back; ``run_jobs`` owns *how*:

- failure isolation: each job runs in its own worker process (``run_backend``); a crash, hang or
  out-of-memory kill becomes that job's failed outcome, the others are kept;
- concurrency: up to ``parallel`` workers at a time, capped by the memory this machine has free
  (``memory_cap``); when several run at once, their timed calls take turns (a lock file the worker holds
  while it times a method), so imports and compilations overlap but no timing shares the cores with another;
- progress: one line per job as it starts and ends, and (``bars=True`` on a terminal) a bar per job;
- interrupts: SIGINT, SIGTERM and SIGHUP (``Interrupted`` from the CLI's handler) or Ctrl-C in Python stop
  every running worker within a fraction of a second (their process groups are killed, their folders
  removed), jobs not yet started are marked so, and ``Interrupted`` is raised carrying every job's outcome
  (``.outcomes``), so the command can write the partial report of what finished;
- clean-up: job folders left by gradparity processes that died are removed before the first worker starts.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gradparity.backends import BackendInfo
from gradparity.backends.protocol import TIMING_LOCK_ENV, WorkerJob
from gradparity.errors import Interrupted
from gradparity.run.execute import (BackendOutcome, MethodOutcome, StopFlag, meminfo, remove_stale_job_dirs,
                                    run_backend)

#: Memory one framework worker may take on the problems gradparity builds itself, with a margin: TensorFlow +
#: Keras is the largest (about 0.8 GiB resident measured here during the test suite). The memory cap on
#: concurrent workers divides the free memory by it.
WORKER_MEMORY_BYTES = 2 * 2**30


@dataclass(frozen=True)
class WorkerRun:
    """One job for the runner: ``job`` run by backend ``info``'s worker within ``timeout_s`` seconds.

    ``key`` names its outcome in what ``run_jobs`` returns (default: the backend's name); ``label`` is the
    line said when it starts (default: "running BACKEND ...").
    """

    job: WorkerJob
    info: BackendInfo
    timeout_s: float
    key: str = ""
    label: str = ""

    @property
    def name(self) -> str:
        return self.key or self.info.name


def not_started(run: WorkerRun, signal_name: str) -> BackendOutcome:
    """The outcome of a job whose worker never started because the run was interrupted first."""
    error = f"not started: the run was interrupted by {signal_name} before this job's turn"
    return BackendOutcome(run.info.name, "interrupted", error, None,
                          {m: MethodOutcome("interrupted", error=error) for m in run.job.methods}, 0.0)


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    return meminfo("MemAvailable:")


def memory_cap() -> int:
    """How many workers may run at once without the machine running out of memory (at least 1)."""
    free = available_memory_bytes()
    return max(1, free // WORKER_MEMORY_BYTES) if free is not None else 1


def done_line(name: str, outcome: BackendOutcome) -> str:
    """The line said when a job ends: its status, wall time and the first line of its error."""
    return (f"  {name}: {outcome.status} in {outcome.wall_seconds:.1f} s"
            + (f" - {outcome.error.splitlines()[0]}" if outcome.error else ""))


@contextlib.contextmanager
def _bars(runs: Sequence[WorkerRun], enabled: bool):
    """Yield ``update_for(run) -> on_progress or None``: a rich bar per job on a terminal's stderr."""
    import sys

    if not enabled or not sys.stderr.isatty():
        yield lambda _run: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        tasks = {id(r): bar.add_task(f"  {r.name}", total=len(r.job.methods)) for r in runs}
        yield lambda r: (lambda done, total: bar.update(tasks[id(r)], completed=done, total=total))


def _serialized(say: Callable[[str], None]) -> Callable[[str], None]:
    """``say`` for several threads: one message at a time, so lines from concurrent workers never interleave."""
    lock = threading.Lock()

    def one_at_a_time(msg: str) -> None:
        with lock:
            say(msg)
    return one_at_a_time


def _wait_all(futures) -> None:
    """Wait for every future in short slices, so that a signal handler runs (and may raise) meanwhile."""
    pending = set(futures)
    while pending:
        _, pending = concurrent.futures.wait(pending, timeout=0.25)


def run_jobs(runs: Sequence[WorkerRun], *, say: Callable[[str], None] | None = None, parallel: int = 1,
             bars: bool = False, extra_env: dict[str, str] | None = None) -> dict[str, BackendOutcome]:
    """Run every job in its own worker process; return ``{run.name: BackendOutcome}`` in the order given.

    Never raises for a backend's failure (it is that job's outcome). At most ``parallel`` workers run at
    once (and never more than ``memory_cap()``). Raises ``Interrupted`` (with ``.outcomes``: every job's
    outcome, the unfinished ones "interrupted") when a signal or Ctrl-C stopped the run.
    """
    say = _serialized(say or (lambda _msg: None))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run_jobs needs one key per job, got {names}")
    remove_stale_job_dirs()
    width = max(1, min(int(parallel), len(runs), memory_cap()))
    stop = StopFlag()
    interrupted: Interrupted | None = None
    with tempfile.TemporaryDirectory(prefix="gradparity-runner-") as tmp:
        env = dict(extra_env or {})
        if width > 1:
            # Timed calls take turns across the concurrent workers (see the module docstring).
            env[TIMING_LOCK_ENV] = str(Path(tmp) / "timing.lock")

        with _bars(runs, bars) as progress_of:
            def one(run: WorkerRun) -> BackendOutcome:
                if stop.is_set():
                    return not_started(run, signal.Signals(stop.signum).name)
                say(run.label or f"running {run.name} ...")
                outcome = run_backend(run.job, run.info, run.timeout_s, env, progress_of(run), stop)
                if not stop.is_set():
                    say(done_line(outcome.backend, outcome))
                return outcome

            pool = concurrent.futures.ThreadPoolExecutor(max_workers=width, thread_name_prefix="gradparity-worker")
            futures = [pool.submit(one, r) for r in runs]
            try:
                _wait_all(futures)
            except (Interrupted, KeyboardInterrupt) as exc:
                interrupted = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
                stop.signum = interrupted.signum
                stop.set()
                say(f"  interrupted by {interrupted.signal_name}: stopping the workers")
                while True:  # the workers die within a fraction of a second; a second Ctrl-C must not cut it short
                    try:
                        _wait_all(futures)
                        break
                    except (Interrupted, KeyboardInterrupt):
                        continue
            finally:
                pool.shutdown(wait=True)
    outcomes = {r.name: f.result() for r, f in zip(runs, futures)}
    if interrupted is not None:
        interrupted.outcomes = outcomes
        raise interrupted
    return outcomes


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM/SIGHUP while a finished run is compared and written, so its files form a set (every
    command that writes a report does it inside this block).

    A signal that arrives meanwhile is delivered when this block ends (the
    report is complete by then). Only the main thread can do this.
    """
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_jobs_until_stopped(runs: Sequence[WorkerRun], **options) -> tuple[dict[str, BackendOutcome],
                                                                        Interrupted | None]:
    """``run_jobs`` with an interruption returned, not raised: (every job's outcome, the ``Interrupted`` or None).

    For a command that reports what finished and then stops: it builds its report from the outcomes (the
    unfinished ones say "interrupted"), sets the exception's ``report`` and raises it, and the command line
    prints that report and exits 128 + N.
    """
    try:
        return run_jobs(runs, **options), None
    except Interrupted as exc:
        return exc.outcomes, exc


def raise_if_stopped(stopped: Interrupted | None, report):
    """``report``, or ``stopped`` raised carrying it (see ``run_jobs_until_stopped``)."""
    if stopped is not None:
        stopped.report = report
        raise stopped
    return report
