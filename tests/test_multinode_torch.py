"""examples/multinode/torch_ddp.py on two "nodes" over loopback: two ``torchrun --nnodes 2 --nproc-per-node 1
--node-rank {0,1} --master-addr 127.0.0.1 --master-port PORT`` launches, as docs/multinode.md says, with gloo
and DistributedDataParallel.

The inputs are a plain .npz written here; the expected gradient is computed here in plain torch from the
per-example gradients g_i of the same model, by what torch documents for DDP ("gradients from each node are
averaged": the all-reduce divides the sum of the R processes' gradients by R). Node r holds the contiguous shard
S_r of N / R examples and reduces its loss over it:

- ``--reduction mean``: (1/R) sum_r (1/|S_r|) sum_{i in S_r} g_i = (1/N) sum_i g_i when every |S_r| = N / R:
  factor 1 against the single-device mean;
- ``--reduction sum``: (1/R) sum_r sum_{i in S_r} g_i = (1/R) sum_i g_i: factor 1/R against the single-device sum.

Float64, so the tolerance is rounding only (1e-12 relative; sums of 12 terms are ~1e-16). torchrun starts its
worker in a session of its own, so stopping a launch kills torchrun and every descendant (read from /proc), and
the tests check that none is left.
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

import numpy as np
import pytest

pytestmark = pytest.mark.frameworks("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "multinode" / "torch_ddp.py"
NODES = 2
TIMEOUT_S = 120
RTOL = 1e-12
RNG = np.random.default_rng(11)
N, FEATURES, HIDDEN, CLASSES = 12, 5, 4, 3
INPUTS = {"x": RNG.normal(size=(N, FEATURES)), "y": RNG.integers(0, CLASSES, size=N),
          "0.weight": RNG.normal(size=(HIDDEN, FEATURES)), "0.bias": RNG.normal(size=HIDDEN) * 0.1,
          "2.weight": RNG.normal(size=(CLASSES, HIDDEN)), "2.bias": RNG.normal(size=CLASSES) * 0.1}
PARAMS = ("0.weight", "0.bias", "2.weight", "2.bias")


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on now (the OS's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> list[str]:
    """This interpreter's torchrun (the console script beside it, else ``python -m torch.distributed.run``)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def commands(out: Path, inputs: Path, port: int, reduction: str, timeout: int = 60) -> list[list[str]]:
    return [[*torchrun(), "--nnodes", str(NODES), "--nproc-per-node", "1", "--node-rank", str(rank),
             "--master-addr", "127.0.0.1", "--master-port", str(port), str(SCRIPT), str(out),
             "--reduction", reduction, "--inputs", str(inputs), "--timeout", str(timeout)] for rank in range(NODES)]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first found through /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
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


def stop(procs: list[subprocess.Popen], seen: set[int]) -> None:
    """Kill every launch still running and every process it started (torchrun's worker runs in a session of its
    own, out of reach of a signal to torchrun's group), and reap the launches. ``seen`` gains every pid."""
    for p in procs:
        if p.poll() is None:
            for pid in [*descendants(p.pid), p.pid]:
                seen.add(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for p in procs:
        p.wait(timeout=30)


def launch(cmds: list[list[str]], logs: Path, timeout: float = TIMEOUT_S, procs: list | None = None,
           seen: set[int] | None = None) -> None:
    """Start one torchrun per node (output in ``logs``/nodeI.log), wait for both; when one exits non-zero or the
    timeout passes, kill everything and raise naming the node and its output. No process outlives the call:
    ``procs`` (the launches) and ``seen`` (every pid, workers included) are filled for the caller to check."""
    procs = [] if procs is None else procs
    seen = set() if seen is None else seen
    files = []
    try:
        for i, cmd in enumerate(cmds):
            files.append(open(logs / f"node{i}.log", "wb"))
            procs.append(subprocess.Popen(cmd, stdout=files[-1], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            seen.update(pid for p in procs for pid in descendants(p.pid))
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                i = failed[0] if failed else next(i for i, p in enumerate(procs) if p.poll() is None)
                what = f"exited with {procs[i].returncode}" if failed else f"still running after {timeout} s"
                stop(procs, seen)
                raise RuntimeError(f"node {i} {what}:\n" + (logs / f"node{i}.log").read_text()[-3000:])
            time.sleep(0.1)
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"node {failed[0]} exited with {procs[failed[0]].returncode}:\n"
                               + (logs / f"node{failed[0]}.log").read_text()[-3000:])
    finally:
        stop(procs, seen)
        for f in files:
            f.close()


def assert_none_left(seen: set[int]) -> None:
    deadline = time.monotonic() + 10   # an orphaned worker is reaped by init: give it a moment
    while any(alive(pid) for pid in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in seen if alive(pid)], "a launch left a process behind"


def per_example_grads() -> list[dict[str, np.ndarray]]:
    """Each example's gradient of its cross-entropy, from a plain torch model holding INPUTS' weights."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).double()
    model.load_state_dict({k: torch.from_numpy(INPUTS[k]) for k in PARAMS})
    x, y = torch.from_numpy(INPUTS["x"]), torch.from_numpy(INPUTS["y"]).long()
    out = []
    for i in range(N):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        out.append({k: p.grad.numpy().copy() for k, p in model.named_parameters()})
    return out


def expected(reduction: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(DDP's gradient by the formula in the module doc, the single-device gradient) for ``reduction``."""
    g = per_example_grads()
    shards = np.array_split(np.arange(N), NODES)
    per_node = [{k: sum(g[i][k] for i in s) / (len(s) if reduction == "mean" else 1) for k in PARAMS}
                for s in shards]
    ddp = {k: sum(node[k] for node in per_node) / NODES for k in PARAMS}
    single = {k: sum(gi[k] for gi in g) / (N if reduction == "mean" else 1) for k in PARAMS}
    return ddp, single


def assert_close(got: dict, want: dict, rtol: float = RTOL) -> None:
    for k in want:
        assert np.abs(got[k] - want[k]).max() <= rtol * np.abs(want[k]).max(), k


def read(path: Path, method: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[f"{method}/{k}"] for k in PARAMS}


@pytest.fixture(scope="module", params=["mean", "sum"])
def saved(request, tmp_path_factory):
    """(the folder, the reduction, the pids the launches ran): both nodes launched once per reduction."""
    folder = tmp_path_factory.mktemp(f"multinode_torch_{request.param}")
    np.savez(folder / "inputs.npz", **INPUTS)
    seen: set[int] = set()
    launch(commands(folder / "grads.npz", folder / "inputs.npz", free_port(), request.param), folder, seen=seen)
    return folder, request.param, seen


def test_ddp_over_two_nodes_gives_the_documented_factor(saved):
    """mean: the single-device mean (factor 1, equal shards); sum: 1/R of the single-device sum."""
    folder, reduction, _ = saved
    ddp, single = expected(reduction)
    factor = 1.0 if reduction == "mean" else 1.0 / NODES
    assert_close(ddp, {k: factor * v for k, v in single.items()})   # the formula's factor, on this batch
    assert_close(read(folder / "grads.npz", "ddp"), ddp)
    assert_close(read(folder / "grads.npz", "one_device"), single)


def test_every_node_holds_the_same_all_reduced_gradient_and_none_is_left(saved):
    folder, _, seen = saved
    assert_close(read(folder / "grads.rank1.npz", "ddp"), read(folder / "grads.npz", "ddp"), 1e-15)
    assert "one_device/0.weight" not in np.load(folder / "grads.rank1.npz")
    assert "rank 1 of 2" in (folder / "node1.log").read_text()
    assert len(seen) >= NODES, "each torchrun started its worker"
    assert_none_left(seen)


def test_diagnose_reads_the_saved_gradients(saved):
    """What the docs promise: the sum's factor 1/R is named data-parallel averaging, the mean is clean."""
    folder, reduction, _ = saved
    out = subprocess.run([sys.executable, "-m", "gradparity", "diagnose", str(folder / "grads.npz"), "--replicas",
                          str(NODES), "--batch-size", str(N), "--dtype", "float64", "--json"], capture_output=True,
                         text=True, timeout=120)
    report = json.loads(out.stdout)
    assert report["causes"][0]["id"] == ("clean" if reduction == "mean" else "data_parallel_average"), \
        out.stdout[-2000:]


def test_a_node_that_fails_stops_the_other(tmp_path):
    # Node 1 cannot read its inputs and exits before it connects; node 0's worker would wait for it in
    # init_process_group for 60 s: node 0's torchrun and its worker are killed instead, and none is left.
    np.savez(tmp_path / "inputs.npz", **INPUTS)
    cmds = commands(tmp_path / "grads.npz", tmp_path / "inputs.npz", free_port(), "mean", timeout=60)
    cmds[1][cmds[1].index("--inputs") + 1] = str(tmp_path / "missing.npz")
    procs, seen = [], set()
    with pytest.raises(RuntimeError, match=r"node 1 exited with 1:[\s\S]*missing\.npz"):
        launch(cmds, tmp_path, procs=procs, seen=seen)
    assert procs[0].returncode == -signal.SIGKILL
    assert not (tmp_path / "grads.npz").exists()
    assert_none_left(seen | {p.pid for p in procs})
