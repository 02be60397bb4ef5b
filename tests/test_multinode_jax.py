"""examples/multinode/jax_distributed.py on two processes over loopback, each a "node" of
``jax.distributed.initialize`` (CPU collectives over gloo), launched as docs/multinode.md says.

The inputs are a plain .npz written here; the expected gradients are computed in numpy (tests/mlp_reference.py) from
the per-example gradients of the same MLP (``relu(x @ w0 + b0) @ w1 + b1``, cross-entropy), by what JAX documents:

- ``jit_mean``, jit over the global batch sharded across the processes: the compiler partitions the program
  written for the global batch, so it is the single-device gradient of the mean: (1/N) sum_i g_i;
- ``shard_map_pmean_mean``: with shard_map's default ``check_vma=True`` the replicated parameters' gradient
  inside the body is already summed over the R blocks (the transpose of the implicit ``pvary`` is a ``psum``:
  JAX's shard_map guide, "Tracking how values vary over manual mesh axes"), and ``lax.pmean`` of that
  invariant value leaves it: sum_r (1/n_r) sum_{i in r} g_i = R * (1/N) sum_i g_i for equal blocks n_r = N/R;
- ``single_mean``: process 0 alone: (1/N) sum_i g_i.

Float64, so the tolerance is rounding only (1e-12 relative; sums of 12 terms are ~1e-16). Both processes are
started in their own sessions and killed (their process groups and descendants: tests/multinode_harness.py) when
one fails or the timeout passes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlp_reference as mlp
import multinode_harness
import numpy as np
import pytest
from multinode_harness import assert_close, diagnose, free_port, read

pytestmark = pytest.mark.frameworks("jax")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "multinode" / "jax_distributed.py"
PROCESSES = 2
TIMEOUT_S = 120
RTOL = 1e-12
RNG = np.random.default_rng(7)
N, SIZES = 12, (6, 5, 4)
#: The script's names of the MLP's W0, b0, W1, b1 (mlp_reference's order).
PARAMS = ("w0", "b0", "w1", "b1")
INPUTS = {"x": RNG.normal(size=(N, SIZES[0])), "y": RNG.integers(0, SIZES[2], size=N),
          **mlp.random_params(RNG, SIZES, PARAMS)}


def worker_env() -> dict[str, str]:
    """This environment on CPU with one device per process (no forced host device count)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return env


def launch(commands: list[list[str]], logs: Path, procs: list[subprocess.Popen] | None = None) -> None:
    """The processes of ``commands`` run together on CPU as multinode_harness.launch runs them (logs
    ``logs``/processI.log; an error names "process I")."""
    multinode_harness.launch(commands, logs, name="process", timeout=TIMEOUT_S,
                             envs=[worker_env()] * len(commands), procs=procs)


def commands(out: Path, inputs: Path, port: int, timeout: int = 60) -> list[list[str]]:
    return [[sys.executable, str(SCRIPT), str(out), "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", str(PROCESSES), "--process-id", str(i), "--inputs", str(inputs),
             "--timeout", str(timeout)] for i in range(PROCESSES)]


def mean_grad(rows: slice) -> dict[str, np.ndarray]:
    """The gradient of the mean cross-entropy over ``rows``, from per-example gradients by hand (numpy)."""
    return mlp.reduced_grads(INPUTS["x"][rows], INPUTS["y"][rows], INPUTS, "mean", PARAMS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multinode_jax")
    np.savez(folder / "inputs.npz", **INPUTS)
    launch(commands(folder / "grads.npz", folder / "inputs.npz", free_port()), folder)
    return folder


def test_jit_over_the_processes_gives_the_single_device_gradient(saved):
    want = mean_grad(slice(0, N))
    assert_close(read(saved / "grads.npz", "jit_mean", PARAMS), want, RTOL)
    assert_close(read(saved / "grads.npz", "single_mean", PARAMS), want, RTOL)


def test_shard_map_pmean_of_block_means_is_r_times_the_mean(saved):
    # sum over the R blocks of each block's mean gradient (the body's implicit psum), left by pmean.
    blocks = [slice(r * N // PROCESSES, (r + 1) * N // PROCESSES) for r in range(PROCESSES)]
    summed = {k: sum(mean_grad(b)[k] for b in blocks) for k in PARAMS}
    assert_close(read(saved / "grads.npz", "shard_map_pmean_mean", PARAMS), summed, RTOL)
    assert_close(summed, {k: PROCESSES * v for k, v in mean_grad(slice(0, N)).items()}, RTOL)


def test_every_process_holds_the_same_all_reduced_gradient(saved):
    for method in ("jit_mean", "shard_map_pmean_mean"):
        assert_close(read(saved / "grads.process1.npz", method, PARAMS), read(saved / "grads.npz", method, PARAMS),
                     1e-15)
    assert "single_mean/w0" not in np.load(saved / "grads.process1.npz")
    assert "[Gloo] Rank 1 is connected to 1 peer ranks" in (saved / "process1.log").read_text()


def test_diagnose_reads_the_saved_gradients_as_the_replica_factor(saved):
    report = diagnose(saved / "grads.npz", "--replicas", str(PROCESSES), "--dtype", "float64")
    assert report["causes"][0]["id"] == "data_parallel_average", report["causes"]
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    assert pairs["single_mean", "jit_mean"]["kind"] == "rounding"


def test_a_process_that_fails_stops_the_other(tmp_path):
    # Process 1 cannot read its inputs and exits before it connects; process 0 would wait for it in
    # jax.distributed.initialize for its 60 s: it is killed instead, and both are reaped.
    np.savez(tmp_path / "inputs.npz", **INPUTS)
    cmds = commands(tmp_path / "grads.npz", tmp_path / "inputs.npz", free_port(), timeout=60)
    cmds[1][cmds[1].index("--inputs") + 1] = str(tmp_path / "missing.npz")
    procs = []
    with pytest.raises(RuntimeError, match=r"process 1 exited with 1:[\s\S]*missing\.npz"):
        launch(cmds, tmp_path, procs=procs)
    assert [p.returncode for p in procs] == [-signal.SIGKILL, 1]
    assert not (tmp_path / "grads.npz").exists()
