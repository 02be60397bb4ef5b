"""examples/multinode/tf_multiworker.py on two workers over loopback: ``tf.distribute.MultiWorkerMirroredStrategy``
with ``TF_CONFIG`` naming two localhost ports, launched as docs/multinode.md says.

The inputs are a plain .npz written here; the expected gradients are computed in numpy (tests/mlp_reference.py) from
the per-example gradients g_i of the same MLP (``relu(x @ w0 + b0) @ w1 + b1``, cross-entropy), by what TensorFlow
documents: the replica context's ``all_reduce(ReduceOp.SUM, ...)`` (what an optimizer's ``apply_gradients`` does
under a strategy) adds the R workers' gradients, worker r holding the contiguous shard S_r of N / R examples; and
``tf.nn.compute_average_loss(l, global_batch_size=N)`` is sum(l) / N ("scales the sum of the given per-example
losses by the global batch size"):

- ``average_mean``: sum_r (1/N) sum_{i in S_r} g_i = (1/N) sum_i g_i: factor 1 against the single-device mean;
- ``local_mean`` (``reduce_mean`` on the shard): sum_r (1/|S_r|) sum_{i in S_r} g_i = R (1/N) sum_i g_i for equal
  shards: factor R against the single-device mean;
- ``local_sum``: sum_r sum_{i in S_r} g_i: factor 1 against the single-device sum.

Float64, so the tolerance is rounding only (1e-12 relative; measured ~2e-16). Both workers are started in their
own sessions and killed (their process groups and descendants: tests/multinode_harness.py) when one fails or the
timeout passes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlp_reference as mlp
import multinode_harness
import numpy as np
import pytest
from multinode_harness import assert_close, diagnose, free_ports, read

pytestmark = pytest.mark.frameworks("keras-tensorflow")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "multinode" / "tf_multiworker.py"
WORKERS = 2
TIMEOUT_S = 180
RTOL = 1e-12
RNG = np.random.default_rng(9)
N, SIZES = 12, (6, 5, 4)
#: The script's names of the MLP's W0, b0, W1, b1 (mlp_reference's order).
PARAMS = ("w0", "b0", "w1", "b1")
INPUTS = {"x": RNG.normal(size=(N, SIZES[0])), "y": RNG.integers(0, SIZES[2], size=N),
          **mlp.random_params(RNG, SIZES, PARAMS)}


def tf_config(ports: list[int], index: int) -> str:
    """TF_CONFIG of worker ``index`` in the cluster of one worker per port of 127.0.0.1."""
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def launch(out: Path, inputs: Path, reduction: str, logs: Path, procs: list[subprocess.Popen] | None = None,
           inputs_of: dict[int, Path] | None = None) -> None:
    """The WORKERS workers of a cluster on fresh ports of 127.0.0.1 (CPU only; ``inputs_of`` overrides a
    worker's --inputs) run together as multinode_harness.launch runs them (logs ``logs``/workerI.log; an error
    names "worker I")."""
    ports = free_ports(WORKERS)
    cmds = [[sys.executable, str(SCRIPT), str(out), "--inputs", str((inputs_of or {}).get(i, inputs)),
             "--reduction", reduction, "--timeout", "60"] for i in range(WORKERS)]
    envs = [dict(os.environ, TF_CONFIG=tf_config(ports, i), CUDA_VISIBLE_DEVICES="") for i in range(WORKERS)]
    multinode_harness.launch(cmds, logs, name="worker", timeout=TIMEOUT_S, envs=envs, procs=procs)


def per_example_grads(rows: slice) -> dict[str, np.ndarray]:
    """Each example's gradient of its cross-entropy over ``rows``, shape (n, *param), by hand (numpy)."""
    return mlp.per_example_grads(INPUTS["x"][rows], INPUTS["y"][rows], INPUTS, PARAMS)


SHARDS = [slice(r * N // WORKERS, (r + 1) * N // WORKERS) for r in range(WORKERS)]


def summed_over_workers(shard_loss) -> dict[str, np.ndarray]:
    """The SUM all-reduce of each worker's gradient of ``shard_loss`` ("mean" over the shard, "sum", or
    "average": the shard's sum over the global N)."""
    scale = {"mean": lambda n: 1 / n, "sum": lambda n: 1.0, "average": lambda n: 1 / N}[shard_loss]
    per = [per_example_grads(s) for s in SHARDS]
    return {k: sum(scale(len(g[k])) * g[k].sum(axis=0) for g in per) for k in PARAMS}


def single(reduction: str) -> dict[str, np.ndarray]:
    """The single-device gradient of the global batch's mean or summed loss."""
    return mlp.reduced_grads(INPUTS["x"], INPUTS["y"], INPUTS, reduction, PARAMS)


@pytest.fixture(scope="module", params=["mean"])  # the other reduction: tests/test_parallel_*.py
def saved(request, tmp_path_factory):
    """(the folder, the reduction): both workers launched once per reduction."""
    folder = tmp_path_factory.mktemp(f"multinode_tf_{request.param}")
    np.savez(folder / "inputs.npz", **INPUTS)
    launch(folder / "grads.npz", folder / "inputs.npz", request.param, folder)
    return folder, request.param


def test_multi_worker_gradients_have_the_documented_factors(saved):
    folder, reduction = saved
    got = folder / "grads.npz"
    assert_close(read(got, f"single_{reduction}", PARAMS), single(reduction), RTOL)
    if reduction == "sum":
        assert_close(summed_over_workers("sum"), single("sum"), RTOL)   # factor 1, from the formula
        assert_close(read(got, "local_sum", PARAMS), single("sum"), RTOL)
        return
    assert_close(summed_over_workers("average"), single("mean"), RTOL)   # factor 1
    assert_close(read(got, "average_mean", PARAMS), single("mean"), RTOL)
    assert_close(summed_over_workers("mean"), {k: WORKERS * v for k, v in single("mean").items()}, RTOL)   # factor R
    assert_close(read(got, "local_mean", PARAMS), summed_over_workers("mean"), RTOL)


def test_every_worker_holds_the_same_all_reduced_gradient(saved):
    folder, reduction = saved
    methods = ("average_mean", "local_mean") if reduction == "mean" else ("local_sum",)
    with np.load(folder / "grads.npz") as first, np.load(folder / "grads.worker1.npz") as other:
        assert sorted(other.files) == sorted(f"{m}/{k}" for m in methods for k in PARAMS)   # no single-device one
        for key in other.files:
            assert np.array_equal(other[key], first[key]), key
    assert "worker 1 of 2: 2 replicas in sync, rows 6:12" in (folder / "worker1.log").read_text()


def test_diagnose_reads_the_saved_gradients(saved):
    """The mean's local_mean = R x single_mean is named data-parallel reduction; the sum is clean."""
    folder, reduction = saved
    report = diagnose(folder / "grads.npz", "--replicas", str(WORKERS), "--batch-size", str(N), "--dtype", "float64")
    assert report["causes"][0]["id"] == ("data_parallel_average" if reduction == "mean" else "clean"), \
        report["causes"]


def test_a_worker_that_fails_stops_the_other(tmp_path):
    # Worker 1 cannot read its inputs and exits before it joins the cluster; worker 0 would wait for it in
    # MultiWorkerMirroredStrategy(): it is killed instead, and nothing is written.
    np.savez(tmp_path / "inputs.npz", **INPUTS)
    procs: list[subprocess.Popen] = []
    with pytest.raises(RuntimeError, match=r"worker 1 exited with 1:[\s\S]*missing\.npz"):
        launch(tmp_path / "grads.npz", tmp_path / "inputs.npz", "mean", tmp_path, procs=procs,
               inputs_of={1: tmp_path / "missing.npz"})
    assert procs[0].returncode == -signal.SIGKILL
    assert not (tmp_path / "grads.npz").exists()
    for p in procs:   # each worker led its own process group: none of it is left
        with pytest.raises(ProcessLookupError):
            os.killpg(p.pid, 0)
