"""JAX's data-parallel engines (task "data_parallel", ``backends/jax/parallel.py``) on 3 host devices, run by the
real runner in a worker process: ``jax.jit`` over a batch placed with ``NamedSharding``, and ``jax.shard_map``
with ``lax.pmean`` / ``lax.psum`` of the gradient its body takes.

The expected gradients are computed in plain numpy (tests/mlp_reference.py) from the per-example gradients of the
same MLP (``x @ W0 + b0 -> relu -> @ W1 + b1``, cross-entropy), by what JAX's documentation says each engine does:

- jit over sharded inputs computes the program written for the global batch (the compiler partitions it and
  inserts the reductions): the single-device gradient, for the mean and for the sum.
- inside ``jax.shard_map`` (``check_vma=True``, its default) using the replicated parameters with the shard's
  rows casts them to "varying" (``jax.lax.pcast(..., to='varying')``, inserted by JAX), and "under reverse-mode
  autodiff it transposes to a jax.lax.psum" (docs/notebooks/shard_map.md, "Tracking how values vary over
  manual mesh axes"): the gradient the body gets is already sum_r grad L_r over the shards r. ``lax.psum`` of
  such an unvarying value casts it to varying first (``jax.lax.psum`` "is a convenience wrapper around
  psum_invariant", same section; jax/_src/lax/parallel.py ``bind_psum_invariant``), so it sums R equal copies:
  R * sum_r grad L_r; ``lax.pmean`` is psum / R: sum_r grad L_r.

Float64, so the tolerance is rounding only (1e-10 relative, sums of 12 terms are ~1e-15).

Training (task "data_parallel_train"): 4 steps of SGD with momentum 0.9 (optax.sgd, as torch.optim.SGD documents
it: ``b = mu * b + g``, ``p = p - lr * b``, b starting at 0) on 4 global batches of 12, per-step learning rates.
That update is linear in the gradient, so a gradient c times the single-device one (c constant) gives the
trajectory of single-device training at c * lr; the trajectories are computed in numpy from the same
per-example gradients, and the engines must follow the one their gradient factor predicts: jit over sharded
batches c = 1; shard_map + pmean c = 1 for a summed loss, R for a mean loss (the body's gradient is already
summed over the shards); shard_map + psum c = R (sum), R^2 (mean).
"""
from __future__ import annotations

import mlp_reference as mlp
import numpy as np
import pytest

from gradparity.backends import BACKENDS
from gradparity.experiment.optimizers import OptimizerConfig
from gradparity.experiment.parallel import data_parallel_job, data_parallel_train_job, worker_env
from gradparity.run.runner import WorkerRun, run_jobs

pytestmark = pytest.mark.frameworks("jax")

R = 3
SIZES = (6, 5, 4)
RTOL = {"float64": 1e-10, "float32": 1e-4}
RNG = np.random.default_rng(20)
PARAMS = mlp.random_params(RNG, SIZES)
X = RNG.normal(size=(12, SIZES[0]))
Y = RNG.integers(0, SIZES[2], size=12)
MODEL = {"kind": "mlp", "sizes": list(SIZES), "activation": "relu"}


def shard_grads(rows: slice, method: str) -> dict[str, np.ndarray]:
    """The gradient of the mean or the sum of the loss over ``rows`` (numpy, tests/mlp_reference.py)."""
    return mlp.reduced_grads(X[rows], Y[rows], PARAMS, method)


def shards(n: int) -> list[slice]:
    """R contiguous equal shards of n rows."""
    return [slice(k * n // R, (k + 1) * n // R) for k in range(R)]


def expected(config: str, method: str) -> dict[str, np.ndarray]:
    """What each engine gives on the even batch of 12 (module docstring)."""
    if config in ("single", "jit_sharding"):
        return shard_grads(slice(0, 12), method)
    summed = {k: sum(shard_grads(s, method)[k] for s in shards(12)) for k in PARAMS}   # the body's own psum
    return {k: v * (R if config == "shard_map_psum" else 1) for k, v in summed.items()}


def assert_close(got: dict, want: dict, rtol: float) -> None:
    assert set(got) == set(want)
    for k in want:
        scale = np.abs(want[k]).max()
        assert np.abs(got[k] - want[k]).max() <= rtol * scale, k


def run(dtype: str, configs=None, env=None):
    job = data_parallel_job(BACKENDS["jax"], MODEL, {k: v.astype(dtype) for k, v in PARAMS.items()},
                            X.astype(dtype), Y, R, dtype=dtype, configs=configs)
    return run_jobs([WorkerRun(job, BACKENDS["jax"], 300)],
                    extra_env=worker_env(R) if env is None else env)["jax"]


@pytest.fixture(scope="module")
def outcome():
    return run("float64")


CONFIGS = ("single", "jit_sharding", "shard_map_pmean", "shard_map_psum")


@pytest.mark.parametrize("method", ["mean", "sum"])
@pytest.mark.parametrize("config", CONFIGS)
def test_even_shards_give_the_gradient_each_engine_documents(outcome, config, method):
    row = outcome.methods[f"{config}@even/{method}"]
    assert row.status == "ok", row.error
    assert_close(row.grads, expected(config, method), RTOL["float64"])
    assert row.info["shards"] == ([12] if config == "single" else [4, 4, 4])


@pytest.mark.parametrize("method", ["mean", "sum"])
@pytest.mark.parametrize("config, factor", [("jit_sharding", {"mean": 1, "sum": 1}),
                                            ("shard_map_pmean", {"mean": R, "sum": 1}),
                                            ("shard_map_psum", {"mean": R * R, "sum": R})])
def test_the_factor_against_the_workers_single_device_gradient(outcome, config, method, factor):
    # Equal shards of n = N/R: sum_r grad mean_r = R * grad mean, sum_r grad sum_r = grad sum.
    single = outcome.methods[f"single@even/{method}"].grads
    got = outcome.methods[f"{config}@even/{method}"].grads
    assert_close(got, {k: factor[method] * v for k, v in single.items()}, RTOL["float64"])


@pytest.mark.parametrize("config, message", [
    ("jit_sharding", "should evenly divide the shape"),          # jax.device_put's IndivisibleError
    ("shard_map_pmean", "not evenly divisible by the corresponding mesh axis sizes"),   # shard_map's ValueError
    ("shard_map_psum", "not evenly divisible by the corresponding mesh axis sizes")])
def test_an_uneven_batch_is_refused_with_jaxs_own_message(outcome, config, message):
    for method in ("mean", "sum"):
        row = outcome.methods[f"{config}@uneven/{method}"]
        assert row.status == "error"
        assert "EngineRefused" in row.error and "11 examples on 3 devices" in row.error
        assert message in " ".join(row.error.split())
    # The single-device gradient of those 11 rows is still computed.
    for method in ("mean", "sum"):
        assert_close(outcome.methods[f"single@uneven/{method}"].grads, shard_grads(slice(0, 11), method),
                     RTOL["float64"])


def test_the_worker_reports_its_mesh(outcome):
    assert outcome.status == "ok"
    assert outcome.environment["mesh"]["devices"] == ["cpu:0", "cpu:1", "cpu:2"]
    assert outcome.environment["replicas"] == R


def test_float32_gives_the_same_factors():
    out = run("float32", configs=("jit_sharding", "shard_map_pmean"))
    for config in ("jit_sharding", "shard_map_pmean"):
        for method in ("mean", "sum"):
            row = out.methods[f"{config}@even/{method}"]
            assert row.status == "ok", row.error
            assert all(g.dtype == np.float32 for g in row.grads.values())
            assert_close(row.grads, expected(config, method), RTOL["float32"])


def test_a_worker_started_without_r_host_devices_fails_with_the_flag_to_set(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    out = run("float64", configs=("jit_sharding",), env={"GRADPARITY_REPLICAS": str(R)})
    assert out.status == "error"
    assert "needs 3 JAX cpu devices, but jax sees 1" in out.error
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=3" in out.error
    assert not any(m.status == "ok" for m in out.methods.values())


# -- training (task "data_parallel_train") ----------------------------------------------------------------------

STEPS = 4
BATCHES = [(RNG.normal(size=(12, SIZES[0])), RNG.integers(0, SIZES[2], size=12)) for _ in range(STEPS)]
LRS = [0.1, 0.1, 0.05, 0.02]
MOMENTUM = 0.9
TRAIN_CONFIGS = ("single", "jit_sharding", "shard_map_pmean", "shard_map_psum")


def sgd_momentum(method: str, lr_factor: float) -> tuple[list[dict], list[float]]:
    """Single-device training in numpy from PARAMS (mlp_reference's torch form): per step the gradient of the
    batch's mean or summed loss, b = MOMENTUM * b + g, p = p - lr * b at lr = LRS[t] * lr_factor; (parameters
    after each step, each step's loss at the parameters it started from)."""
    return mlp.train_torch_sgd(PARAMS, BATCHES, method, [lr * lr_factor for lr in LRS], MOMENTUM)


def trajectory(row) -> list[dict]:
    """The worker's parameters after steps 1..STEPS ("T/NAME")."""
    return [{k: row.grads[f"{t}/{k}"] for k in PARAMS} for t in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def training():
    opt = OptimizerConfig("sgd", LRS[0], momentum=MOMENTUM).to_dict()
    runs = {f"{c}@even/{m}": {"optimizer": opt, "lrs": LRS} for c in TRAIN_CONFIGS for m in ("mean", "sum")}
    job = data_parallel_train_job(BACKENDS["jax"], MODEL, PARAMS, BATCHES, R, runs, dtype="float64")
    return run_jobs([WorkerRun(job, BACKENDS["jax"], 300)], extra_env=worker_env(R))["jax"]


#: The gradient's factor c against the single-device one (module docstring), so the lr factor of the trajectory.
LR_FACTOR = {("single", "mean"): 1, ("single", "sum"): 1, ("jit_sharding", "mean"): 1, ("jit_sharding", "sum"): 1,
             ("shard_map_pmean", "mean"): R, ("shard_map_pmean", "sum"): 1,
             ("shard_map_psum", "mean"): R * R, ("shard_map_psum", "sum"): R}


@pytest.mark.parametrize("method", ["mean", "sum"])
@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_training_follows_the_trajectory_its_gradient_factor_predicts(training, config, method):
    row = training.methods[f"{config}@even/{method}"]
    assert row.status == "ok", row.error
    want, _ = sgd_momentum(method, LR_FACTOR[config, method])
    for got_t, want_t in zip(trajectory(row), want):
        assert_close(got_t, want_t, RTOL["float64"])
    assert row.info["shards"] == ([12] if config == "single" else [4, 4, 4])
    assert row.info["steps"] == STEPS


@pytest.mark.parametrize("config, method", [("jit_sharding", "mean"), ("jit_sharding", "sum"),
                                            ("shard_map_pmean", "sum")])
def test_the_matching_configurations_stay_on_the_workers_single_device_trajectory(training, config, method):
    single = trajectory(training.methods[f"single@even/{method}"])
    for got_t, want_t in zip(trajectory(training.methods[f"{config}@even/{method}"]), single):
        assert_close(got_t, want_t, RTOL["float64"])


def test_pmean_of_a_mean_loss_leaves_the_single_device_trajectory(training):
    # R times the step: far from training at lr (the last step differs by far more than rounding), on the
    # trajectory of lr * R.
    got = trajectory(training.methods["shard_map_pmean@even/mean"])[-1]
    at_lr, _ = sgd_momentum("mean", 1)
    gap = max(np.abs(got[k] - at_lr[-1][k]).max() / np.abs(at_lr[-1][k]).max() for k in PARAMS)
    assert gap > 1e-2


@pytest.mark.parametrize("config", ["single", "jit_sharding"])
def test_each_steps_loss_is_the_global_batchs(training, config):
    for method in ("mean", "sum"):
        row = training.methods[f"{config}@even/{method}"]
        _, want = sgd_momentum(method, 1)
        got = [float(row.grads[f"loss/{t}"]) for t in range(1, STEPS + 1)]
        np.testing.assert_allclose(got, want, rtol=RTOL["float64"])
