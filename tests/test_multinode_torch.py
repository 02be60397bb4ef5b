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
worker in a session of its own, so stopping a launch kills torchrun and every descendant (read from /proc:
tests/multinode_harness.py), and the tests check that none is left.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import multinode_harness
import numpy as np
import pytest
from multinode_harness import assert_close, assert_none_left, diagnose, free_port, read

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


def torchrun() -> list[str]:
    """This interpreter's torchrun (the console script beside it, else ``python -m torch.distributed.run``)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def commands(out: Path, inputs: Path, port: int, reduction: str, timeout: int = 60) -> list[list[str]]:
    return [[*torchrun(), "--nnodes", str(NODES), "--nproc-per-node", "1", "--node-rank", str(rank),
             "--master-addr", "127.0.0.1", "--master-port", str(port), str(SCRIPT), str(out),
             "--reduction", reduction, "--inputs", str(inputs), "--timeout", str(timeout)] for rank in range(NODES)]


def launch(cmds: list[list[str]], logs: Path, procs: list | None = None, seen: set[int] | None = None) -> None:
    """One torchrun per node run together as multinode_harness.launch runs them (logs ``logs``/nodeI.log; an
    error names "node I"); ``seen`` gains every pid, torchrun's workers included, for ``assert_none_left``."""
    multinode_harness.launch(cmds, logs, name="node", timeout=TIMEOUT_S, procs=procs, seen=seen)


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


@pytest.fixture(scope="module", params=["sum"])  # the other reduction: tests/test_parallel_*.py
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
    assert_close(ddp, {k: factor * v for k, v in single.items()}, RTOL)   # the formula's factor, on this batch
    assert_close(read(folder / "grads.npz", "ddp", PARAMS), ddp, RTOL)
    assert_close(read(folder / "grads.npz", "one_device", PARAMS), single, RTOL)


def test_every_node_holds_the_same_all_reduced_gradient_and_none_is_left(saved):
    folder, _, seen = saved
    assert_close(read(folder / "grads.rank1.npz", "ddp", PARAMS), read(folder / "grads.npz", "ddp", PARAMS), 1e-15)
    assert "one_device/0.weight" not in np.load(folder / "grads.rank1.npz")
    assert "rank 1 of 2" in (folder / "node1.log").read_text()
    assert len(seen) >= NODES, "each torchrun started its worker"
    assert_none_left(seen)


def test_diagnose_reads_the_saved_gradients(saved):
    """What the docs promise: the sum's factor 1/R is named data-parallel averaging, the mean is clean."""
    folder, reduction, _ = saved
    report = diagnose(folder / "grads.npz", "--replicas", str(NODES), "--batch-size", str(N), "--dtype", "float64")
    assert report["causes"][0]["id"] == ("clean" if reduction == "mean" else "data_parallel_average"), \
        report["causes"]


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
