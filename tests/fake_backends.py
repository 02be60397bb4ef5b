"""Backends that fail on purpose, to test failure isolation (imported only in worker processes).

The mode travels in ``job.variant``:
- ``crash_after_first``: first method fine, then the process is SIGKILLed (as by the OOM killer);
- ``hang``: sleeps until the parent's timeout kills it;
- ``raise_in_sum``: the ``sum`` method raises, the others work;
- ``missing``: imports a framework that is not installed;
- ``wrong_shape``: returns a transposed kernel (a layout bug);
- ``forgets_mean``: the ``mean`` method returns the summed gradient (a missing 1/N);
- ``segfault``: the process dies of SIGSEGV while setting up;
- ``slow``: every call takes 0.2 s (to watch a worker's progress).

With ``GRADPARITY_TEST_PIDFILE`` set, each worker appends "PID JOB_DIR" to that
file when its session opens, so a test can check that no worker survives.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

from gradparity.backends.numpy import session as numpy_backend
from gradparity.backends.protocol import RawResult
from gradparity.backends.worker import TIMED_CALLS


class FaultySession:
    def __init__(self, job):
        self.mode = job.variant
        self.inner = numpy_backend.open_session(job)
        self.calls = 0

    def environment(self):
        env = self.inner.environment()
        env["framework"] = "fake"
        return env

    def compute(self, method):
        self.calls += 1
        if self.mode == "crash_after_first" and self.calls > 1 + TIMED_CALLS:  # warm-up + timed calls
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "hang":
            time.sleep(3600)
        if self.mode == "slow":
            time.sleep(0.2)
        if self.mode == "hog" and method == "mean":
            # A model too big for the machine: memory grows (touched pages) until something stops it; capped
            # at 8 GiB so that a broken guard cannot take the machine down either.
            held = []
            while len(held) < 128:
                held.append(np.ones(2 ** 23))  # 64 MiB
                time.sleep(0.02)
            time.sleep(3600)
        if self.mode == "raise_in_sum" and method == "sum":
            raise RuntimeError("simulated failure inside the sum method")
        raw = self.inner.compute(method)
        if self.mode == "wrong_shape":
            return RawResult(raw.loss, {k: v.T for k, v in raw.grads.items()})
        if self.mode == "forgets_mean" and method == "mean":
            return self.inner.compute("sum")
        return raw


def open_session(job):
    pidfile = os.environ.get("GRADPARITY_TEST_PIDFILE")
    if pidfile:
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()} {sys.argv[1]}\n")
    if job.variant == "missing":
        import framework_that_is_not_installed  # noqa: F401
    if job.variant == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    return FaultySession(job)
