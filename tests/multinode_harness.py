"""What the multi-process tests share to run examples/multinode/*.py as docs/multinode.md launches them: free
loopback ports, a launch of one process per "node" that raises naming the process that failed (with the tail of
its log) and leaves no process behind, the check that none was left, and reading and comparing the gradients the
examples save (``METHOD/NAME`` arrays in an .npz).

And ``diagnose``: gradparity's diagnose run on those gradients as a user runs it.

Import it as ``from multinode_harness import launch, ...`` (pytest puts tests/ on ``sys.path``, as for
cli_harness). Plain subprocess, socket and /proc: no framework (nor gradparity) is imported here.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

#: How often a launch looks at its processes, and how much of a failed process's log its error quotes.
POLL_S = 0.1
LOG_TAIL = 3000


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports of 127.0.0.1 nothing listens on now (the OS's choices for port 0, held open
    together so that they differ). Another process may take one before it is used: a test that loses that race
    fails with the launch's error, it does not hang."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One port of 127.0.0.1 nothing listens on now (see ``free_ports``)."""
    return free_ports(1)[0]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, found through /proc/PID/task/*/children (so also those that left its
    session or process group, as torchrun's workers do); [] where /proc does not list children."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            out.extend(children)
            todo.extend(children)
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _kill(kill, target: int) -> None:
    try:
        kill(target, signal.SIGKILL)
    except ProcessLookupError:   # it ended on its own meanwhile
        pass


def stop(procs: list[subprocess.Popen], seen: set[int] | None = None) -> None:
    """SIGKILL every launched process still running, its process group (it leads one: ``launch`` starts it in a
    session of its own) and every descendant of it (which may have left that group), then reap the launched
    processes. ``seen``, when given, gains the pids killed. The descendants are listed before anything is
    killed, so that none is orphaned (and lost from /proc's tree) before it is found."""
    running = [p for p in procs if p.poll() is None]
    family = {p.pid: descendants(p.pid) for p in running}
    for p in running:
        _kill(os.killpg, p.pid)
        for pid in [*family[p.pid], p.pid]:
            if seen is not None:
                seen.add(pid)
            _kill(os.kill, pid)
    for p in procs:
        p.wait(timeout=30)


def _failure(name: str, i: int, what: str, logs: Path) -> RuntimeError:
    tail = (logs / f"{name}{i}.log").read_text(errors="replace")[-LOG_TAIL:]
    return RuntimeError(f"{name} {i} {what}:\n{tail}")


def launch(commands: list[list[str]], logs: Path, *, name: str, timeout: float,
           envs: list[Mapping[str, str]] | None = None, procs: list[subprocess.Popen] | None = None,
           seen: set[int] | None = None) -> None:
    """Run one process per command together and wait for all of them.

    Process i runs ``commands[i]`` in a session of its own, stdin from /dev/null, environment ``envs[i]`` (this
    process's when ``envs`` is None), stdout and stderr in ``logs``/``{name}{i}``.log. When one exits non-zero,
    or ``timeout`` seconds pass, the others are killed (``stop``) and RuntimeError("``{name} {i}`` exited with
    CODE" or "... still running after T s", then the last LOG_TAIL characters of its log) is raised, naming the
    first failed process (or the first still running). Returns when every process exited 0.

    No process outlives the call, whatever happens: the Popen objects are appended to ``procs`` and every pid
    seen (launched processes' descendants, read from /proc while they run) is added to ``seen``, for the caller
    to check with ``assert_none_left``."""
    procs = [] if procs is None else procs
    seen = set() if seen is None else seen
    if envs is not None and len(envs) != len(commands):
        raise ValueError(f"{len(commands)} commands but {len(envs)} environments")
    files = []
    try:
        for i, cmd in enumerate(commands):
            files.append(open(logs / f"{name}{i}.log", "wb"))
            procs.append(subprocess.Popen(cmd, stdout=files[-1], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=None if envs is None else dict(envs[i]), start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            seen.update(pid for p in procs for pid in descendants(p.pid))
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                i = failed[0] if failed else next(i for i, p in enumerate(procs) if p.poll() is None)
                what = f"exited with {procs[i].returncode}" if failed else f"still running after {timeout} s"
                stop(procs, seen)
                raise _failure(name, i, what, logs)
            time.sleep(POLL_S)
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise _failure(name, failed[0], f"exited with {procs[failed[0]].returncode}", logs)
    finally:
        stop(procs, seen)
        for f in files:
            f.close()


def assert_none_left(pids: Iterable[int], grace_s: float = 10) -> None:
    """Assert that none of ``pids`` still runs, allowing ``grace_s`` seconds for an orphan that init has yet to
    reap (a zombie counts as ended)."""
    pids = set(pids)
    deadline = time.monotonic() + grace_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert not [pid for pid in pids if alive(pid)], "a launch left a process behind"


def read(path: Path, method: str, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The arrays ``METHOD/NAME`` for each of ``names`` from the .npz at ``path``, by NAME."""
    with np.load(path) as f:
        return {k: f[f"{method}/{k}"] for k in names}


def assert_close(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], rtol: float) -> None:
    """Assert that every array of ``want`` is in ``got`` and within ``rtol`` times the largest entry of the
    wanted array (max |got - want| <= rtol * max |want|), naming the first one that is not."""
    for k in want:
        assert k in got, f"{k} missing"
        assert np.abs(got[k] - want[k]).max() <= rtol * np.abs(want[k]).max(), k


def diagnose(path: Path, *options: str, timeout: float = 120) -> dict:
    """``gradparity diagnose PATH OPTIONS --json`` run as a user runs it (a process of its own, this interpreter),
    its report parsed. AssertionError, with its exit code and the tails of its output, when it prints no JSON."""
    out = subprocess.run([sys.executable, "-m", "gradparity", "diagnose", str(path), *options, "--json"],
                         capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"gradparity diagnose exited with {out.returncode} and printed no JSON report:\n"
                             f"{out.stdout[-LOG_TAIL:]}\n{out.stderr[-LOG_TAIL:]}") from None
