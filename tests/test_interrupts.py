"""Ctrl-C, SIGTERM and SIGHUP stop every command within seconds, leave no worker behind, and keep what finished.

Each command runs in a real subprocess (signals need a real process) on a model or a run written the way its
users write them; the signal comes while a framework worker is computing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from multinode_harness import descendants

pytestmark = pytest.mark.frameworks("torch")

#: A port whose forward pass takes a minute on its "mean" call: the signal always lands while a worker computes.
SLOW_NET = textwrap.dedent("""
    import os, time
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            if os.environ.get("SLOW_NET_MARK") and os.path.exists(os.environ["SLOW_NET_MARK"]):
                time.sleep(120)
            return self.fc(x)

    def make():
        torch.manual_seed(0)
        return Net()
""")


def workers_of(pid: int) -> list[int]:
    """Live gradparity worker processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] not in ("Z", "X") and int(fields[1]) == pid and "gradparity.backends.worker" in cmd:
            out.append(int(entry.name))
    return out


def gone(pids: list[int], timeout: float = 10.0) -> bool:
    """Whether every pid has ended (a zombie counts as ended) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in ("Z", "X"):
                alive.append(pid)
        if not alive:
            return True
        time.sleep(0.1)
    return False


def wait_for_workers(proc: subprocess.Popen, settle: float, timeout: float = 120.0) -> list[int]:
    """The command's worker processes once there are some, ``settle`` seconds after they appeared."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if workers_of(proc.pid):
            time.sleep(settle)
            return workers_of(proc.pid)
        time.sleep(0.1)
    return []


def start(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gradparity", *argv], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120.0) -> list[str]:
    """Read stderr until a line contains ``needle``; the lines read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError("the command ended first:\n" + "".join(seen) + proc.stdout.read())
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"no line with {needle!r} within {timeout} s:\n" + "".join(seen))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_check_stops_within_seconds_and_writes_what_finished(sig, tmp_path):
    (tmp_path / "slow_net.py").write_text(SLOW_NET)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "batch.npz", x=rng.standard_normal((6, 4)).astype(np.float32), y=rng.integers(0, 3, 6))
    mark = tmp_path / "slow-now"
    proc = start(["check", "--torch", "slow_net:make", "--data", "batch.npz", "--out", "out"], tmp_path,
                 {"SLOW_NET_MARK": str(mark)})
    wait_for_line(proc, "torch: ok")   # the model was described (fast); the methods come next
    mark.write_text("")
    wait_for_line(proc, "computing")
    time.sleep(1.0)
    workers = workers_of(proc.pid)
    assert workers, "no worker was computing when the signal came"
    sent = time.monotonic()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    stopped_after = time.monotonic() - sent
    assert proc.returncode == 128 + sig, stdout + stderr
    assert stopped_after < 15, f"took {stopped_after:.1f} s to stop"
    assert "Traceback" not in stderr
    assert gone(workers), "a worker outlived the command"
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["verdict"]["status"] == "interrupted" and doc["verdict"]["exit_code"] == 128 + sig
    assert {r["status"] for r in doc["results"]} == {"interrupted"}
    assert f"INTERRUPTED by {sig.name}" in stdout


def interrupt_while_training(argv: list[str], tmp_path: Path, sig: signal.Signals) -> tuple[dict, str]:
    """Start a training command, send ``sig`` once its worker has trained a few seconds, and check that it
    stops within seconds with 128 + sig, no traceback and no worker left; (its report.json, its stdout)."""
    proc = start(argv, tmp_path)
    workers = wait_for_workers(proc, settle=6.0)   # importing torch: the training loop is running by now
    assert workers, "no worker was training when the signal came"
    sent = time.monotonic()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stdout + stderr
    assert time.monotonic() - sent < 15
    assert "Traceback" not in stderr
    assert gone(workers), "a worker outlived the command"
    assert stdout.startswith(f"INTERRUPTED by {sig.name}")
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["interrupted"] == sig.name
    return doc, stdout


def test_train_stops_within_seconds_and_writes_what_finished(tmp_path):
    doc, _ = interrupt_while_training(["train", "--backends", "torch", "--model", "sequence", "--steps", "10000",
                                       "--out", "out"], tmp_path, signal.SIGINT)
    assert [t["status"] for t in doc["trajectories"]] == ["interrupted"]


def test_sweep_stops_within_seconds_and_writes_what_finished(tmp_path):
    doc, _ = interrupt_while_training(["train", "--sweep", "--backends", "torch", "--epochs", "20",
                                       "--batch-sizes", "4,8", "--out", "out"], tmp_path, signal.SIGTERM)
    assert {c["status"] for c in doc["cells"]} == {"interrupted"}


def test_optimizers_prints_what_finished_and_exits_128_plus_n(tmp_path):
    """A command without a report folder prints its report of what finished, each unfinished row saying so."""
    proc = start(["optimizers", "--backends", "torch,jax", "--steps", "10000", "--json"], tmp_path)
    workers = wait_for_workers(proc, settle=4.0)
    assert workers, "no worker was running when the signal came"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "the report below covers what finished" in stderr
    assert gone(workers), "a worker outlived the command"
    doc = json.loads(stdout)
    errors = [e for s in doc["scenarios"] for e in s["errors"].values()]
    assert errors and all("interrupted by SIGINT" in e or "not started" in e for e in errors)


def replicas_under(pid: int) -> list[int]:
    """torch's data-parallel replica processes among ``pid``'s live descendants (from /proc: only this test's
    run, not another test's running beside it)."""
    out = []
    for child in descendants(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "gradparity.backends.torch.parallel" in cmd and "--replica" in cmd:
            out.append(child)
    return out


@pytest.mark.frameworks("torch")
def test_run_data_parallel_stops_its_replicas_and_writes_what_finished(tmp_path):
    proc = start(["run", "--data-parallel", "3", "--backends", "numpy,torch", "--batch-size", "12",
                  "--methods", "mean,sum", "--out", "out"], tmp_path)
    wait_for_line(proc, "data-parallel engines")
    deadline = time.monotonic() + 120
    replicas: set[int] = set()
    while len(replicas) < 3 and time.monotonic() < deadline and proc.poll() is None:
        replicas.update(replicas_under(proc.pid))
        time.sleep(0.1)
    assert len(replicas) == 3, f"{len(replicas)} of 3 replicas were running when the signal was to come"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert gone(sorted(replicas)), "a replica outlived the command"
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["interrupted"] == "SIGINT"
    assert {r["status"] for r in doc["results"]} == {"ok"}          # the methods had finished
    dp = doc["data_parallel"]
    assert dp["interrupted"] == "SIGINT"
    assert dp["results"] and {r["status"] for r in dp["results"]} <= {"interrupted", "error"}
