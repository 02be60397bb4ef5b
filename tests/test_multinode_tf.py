"""examples/multinode/tf_multiworker.py on two workers over loopback: ``tf.distribute.MultiWorkerMirroredStrategy``
with ``TF_CONFIG`` naming two localhost ports, launched as docs/multinode.md says.

The inputs are a plain .npz written here; the expected gradients are computed here in numpy from the per-example
gradients g_i of the same MLP (``relu(x @ w0 + b0) @ w1 + b1``, cross-entropy), by what TensorFlow documents: the
replica context's ``all_reduce(ReduceOp.SUM, ...)`` (what an optimizer's ``apply_gradients`` does under a
strategy) adds the R workers' gradients, worker r holding the contiguous shard S_r of N / R examples; and
``tf.nn.compute_average_loss(l, global_batch_size=N)`` is sum(l) / N ("scales the sum of the given per-example
losses by the global batch size"):

- ``average_mean``: sum_r (1/N) sum_{i in S_r} g_i = (1/N) sum_i g_i: factor 1 against the single-device mean;
- ``local_mean`` (``reduce_mean`` on the shard): sum_r (1/|S_r|) sum_{i in S_r} g_i = R (1/N) sum_i g_i for equal
  shards: factor R against the single-device mean;
- ``local_sum``: sum_r sum_{i in S_r} g_i: factor 1 against the single-device sum.

Float64, so the tolerance is rounding only (1e-12 relative; measured ~2e-16). Both workers are started in their
own sessions and killed (their process groups) when one fails or the timeout passes.
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

pytestmark = pytest.mark.frameworks("keras-tensorflow")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "multinode" / "tf_multiworker.py"
WORKERS = 2
TIMEOUT_S = 180
RTOL = 1e-12
RNG = np.random.default_rng(9)
N, SIZES = 12, (6, 5, 4)
INPUTS = {"x": RNG.normal(size=(N, SIZES[0])), "y": RNG.integers(0, SIZES[2], size=N),
          "w0": RNG.normal(size=SIZES[:2]), "b0": RNG.normal(size=SIZES[1]) * 0.1,
          "w1": RNG.normal(size=SIZES[1:]), "b1": RNG.normal(size=SIZES[2]) * 0.1}
PARAMS = ("w0", "b0", "w1", "b1")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports of 127.0.0.1 nothing listens on now (the OS's choices for port 0, held open
    together so that they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    """TF_CONFIG of worker ``index`` in the cluster of one worker per port of 127.0.0.1."""
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def launch(out: Path, inputs: Path, reduction: str, logs: Path, timeout: float = TIMEOUT_S,
           procs: list[subprocess.Popen] | None = None, inputs_of: dict[int, Path] | None = None) -> None:
    """Start one worker per port (each in its own session, CPU only, output in ``logs``/workerI.log; the Popen
    objects appended to ``procs``; ``inputs_of`` overrides a worker's --inputs), wait for all; when one exits
    non-zero or the timeout passes, kill the others and raise naming the worker and its output. No process
    outlives the call."""
    procs, files = [] if procs is None else procs, []
    ports = free_ports(WORKERS)
    try:
        for i in range(WORKERS):
            env = dict(os.environ, TF_CONFIG=tf_config(ports, i), CUDA_VISIBLE_DEVICES="")
            cmd = [sys.executable, str(SCRIPT), str(out), "--inputs", str((inputs_of or {}).get(i, inputs)),
                   "--reduction", reduction, "--timeout", "60"]
            files.append(open(logs / f"worker{i}.log", "wb"))
            procs.append(subprocess.Popen(cmd, stdout=files[-1], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                i = failed[0] if failed else next(i for i, p in enumerate(procs) if p.poll() is None)
                what = f"exited with {procs[i].returncode}" if failed else f"still running after {timeout} s"
                stop(procs)
                raise RuntimeError(f"worker {i} {what}:\n" + (logs / f"worker{i}.log").read_text()[-3000:])
            time.sleep(0.1)
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"worker {failed[0]} exited with {procs[failed[0]].returncode}:\n"
                               + (logs / f"worker{failed[0]}.log").read_text()[-3000:])
    finally:
        stop(procs)
        for f in files:
            f.close()


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill every worker still running (its whole process group) and reap it."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait(timeout=30)


def per_example_grads(rows: slice) -> dict[str, np.ndarray]:
    """Each example's gradient of its cross-entropy over ``rows``, shape (n, *param), by hand."""
    x, y = INPUTS["x"][rows], INPUTS["y"][rows]
    a = x @ INPUTS["w0"] + INPUTS["b0"]
    h = np.maximum(a, 0)
    z = h @ INPUTS["w1"] + INPUTS["b1"]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = p - np.eye(SIZES[2])[y]
    da = (dz @ INPUTS["w1"].T) * (a > 0)
    return {"w0": np.einsum("ni,nj->nij", x, da), "b0": da, "w1": np.einsum("ni,nj->nij", h, dz), "b1": dz}


SHARDS = [slice(r * N // WORKERS, (r + 1) * N // WORKERS) for r in range(WORKERS)]


def summed_over_workers(shard_loss) -> dict[str, np.ndarray]:
    """The SUM all-reduce of each worker's gradient of ``shard_loss`` ("mean" over the shard, "sum", or
    "average": the shard's sum over the global N)."""
    scale = {"mean": lambda n: 1 / n, "sum": lambda n: 1.0, "average": lambda n: 1 / N}[shard_loss]
    per = [per_example_grads(s) for s in SHARDS]
    return {k: sum(scale(len(g[k])) * g[k].sum(axis=0) for g in per) for k in PARAMS}


def single(reduction: str) -> dict[str, np.ndarray]:
    g = per_example_grads(slice(0, N))
    return {k: v.mean(axis=0) if reduction == "mean" else v.sum(axis=0) for k, v in g.items()}


def assert_close(got: dict, want: dict, rtol: float = RTOL) -> None:
    for k in want:
        assert np.abs(got[k] - want[k]).max() <= rtol * np.abs(want[k]).max(), k


def read(path: Path, method: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[f"{method}/{k}"] for k in PARAMS}


@pytest.fixture(scope="module", params=["mean", "sum"])
def saved(request, tmp_path_factory):
    """(the folder, the reduction): both workers launched once per reduction."""
    folder = tmp_path_factory.mktemp(f"multinode_tf_{request.param}")
    np.savez(folder / "inputs.npz", **INPUTS)
    launch(folder / "grads.npz", folder / "inputs.npz", request.param, folder)
    return folder, request.param


def test_multi_worker_gradients_have_the_documented_factors(saved):
    folder, reduction = saved
    got = folder / "grads.npz"
    assert_close(read(got, f"single_{reduction}"), single(reduction))
    if reduction == "sum":
        assert_close(summed_over_workers("sum"), single("sum"))        # factor 1, from the formula
        assert_close(read(got, "local_sum"), single("sum"))
        return
    assert_close(summed_over_workers("average"), single("mean"))        # factor 1
    assert_close(read(got, "average_mean"), single("mean"))
    assert_close(summed_over_workers("mean"), {k: WORKERS * v for k, v in single("mean").items()})   # factor R
    assert_close(read(got, "local_mean"), summed_over_workers("mean"))


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
    out = subprocess.run([sys.executable, "-m", "gradparity", "diagnose", str(folder / "grads.npz"), "--replicas",
                          str(WORKERS), "--batch-size", str(N), "--dtype", "float64", "--json"], capture_output=True,
                         text=True, timeout=120)
    report = json.loads(out.stdout)
    assert report["causes"][0]["id"] == ("data_parallel_average" if reduction == "mean" else "clean"), \
        out.stdout[-2000:]


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
