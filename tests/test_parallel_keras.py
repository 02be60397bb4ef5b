"""Keras 3's data-parallel engines for real (task "data_parallel", ``backends/keras/parallel.py``), run by the
real runner in worker processes on R = 3 replicas: ``tf.distribute.MirroredStrategy`` over 3 logical CPU devices
(``fit``, a custom loop, ``compute_average_loss``) on Keras' TensorFlow backend, and
``keras.distribution.DataParallel`` over 3 host devices on its JAX backend.

The expected gradients are computed in plain numpy (tests/mlp_reference.py) from the per-example gradients g_i of
the same MLP (``x @ W0 + b0 -> relu -> @ W1 + b1``, cross-entropy), by what the Keras 3.15 and TensorFlow sources
say:

- tf.distribute splits a global batch of N into R contiguous shards S_r, the first N mod R one example larger
  (``experimental_distribute_dataset``): 12 -> 4, 4, 4 and 11 -> 4, 4, 3.
- Keras' optimizer under a strategy all-reduces the replicas' gradients with SUM before applying them
  (keras/src/backend/tensorflow/optimizer.py, ``_all_reduce_sum_gradients``).
- A Keras loss reduced with "sum_over_batch_size" is multiplied by 1/num_replicas_in_sync whenever a strategy
  is in scope (keras/src/losses/loss.py, ``reduce_values`` -> ``scale_loss_for_distribution``), in ``fit`` and
  in a custom loop alike; the factor is ``ops.cast(1.0 / R, dtype)``, a ``tf.cast`` of a Python float, which
  TensorFlow converts to float32 first: C = float32(1/3). "sum" and "none" are not scaled. So
  "mean" gives sum_r C (1/|S_r|) sum_{i in S_r} g_i (R C times the mean with equal shards, and no constant
  multiple of it with unequal ones), "sum" gives sum_r sum_{i in S_r} g_i, the single-device sum.
- ``tf.nn.compute_average_loss(l, global_batch_size=N)`` is sum(l) / N on each replica: summed, the
  single-device mean (and, for the per-example losses times N, the sum).
- JAX: ``DataParallel`` places the batch with the layout P("batch") and runs the jitted train step of the
  global batch's loss: the single-device gradient; a batch R does not divide cannot be placed (JAX's
  ``IndivisibleError``, "should evenly divide the shape").

Float64: the engines agree with the formulas to rounding (1e-12 relative; measured ~4e-16).

Training (task "data_parallel_train", Keras on TensorFlow): 4 steps of ``keras.optimizers.SGD(momentum=0.9)`` at
a learning rate that changes every step, held against the same training written in numpy (mlp_reference): Keras'
SGD is ``v = mu v - lr g; p += v`` (keras/src/optimizers/sgd.py), with mu = float32(0.9) on the TensorFlow backend
(``ops.cast(self.momentum, dtype)`` is a ``tf.cast`` of a Python float, converted to float32 first). A gradient
c g at lr_t gives velocities c v_t, the training on g at c lr_t; so "mean" in fit and in the custom loop
(c = R C = 1 + 3e-8, Keras' float32 1/R, the replicas summed) follows single-device training at R C lr_t,
measurably apart (2e-8 relative after 4 steps, measured) from the one at lr_t, and every other configuration (c = 1)
stays on the single-device trajectory (1e-12 relative; measured ~2e-16).
"""
from __future__ import annotations

import mlp_reference as mlp
import numpy as np
import pytest

from gradparity.backends import BACKENDS
from gradparity.experiment.optimizers import OptimizerConfig
from gradparity.experiment.parallel import data_parallel_job, data_parallel_train_job, worker_env
from gradparity.run.runner import WorkerRun, run_jobs

R = 3
TOL = {"float64": 1e-12, "float32": 1e-5}
#: Keras' 1/R as TensorFlow casts the Python float (module docstring).
C = float(np.float32(1 / R))
SIZES = (6, 5, 4)
RNG = np.random.default_rng(24)
PARAMS = mlp.random_params(RNG, SIZES)
X = RNG.normal(size=(12, SIZES[0]))
Y = RNG.integers(0, SIZES[2], size=12)
MODEL = {"kind": "mlp", "sizes": list(SIZES), "activation": "relu"}
SHARDS = {"even": [4, 4, 4], "uneven": [4, 4, 3]}
N = {"even": 12, "uneven": 11}


def reduced(rows: slice, method: str) -> dict[str, np.ndarray]:
    """The gradient of the mean or the sum of the loss over ``rows`` (numpy, tests/mlp_reference.py)."""
    return mlp.reduced_grads(X[rows], Y[rows], PARAMS, method)


def shard_slices(sharding: str) -> list[slice]:
    bounds = np.cumsum([0, *SHARDS[sharding]])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def expected(config: str, sharding: str, method: str) -> dict[str, np.ndarray]:
    """What each configuration hands the optimizer (module docstring)."""
    if config in ("single", "mirrored_average", "data_parallel"):
        return reduced(slice(0, N[sharding]), method)
    # mirrored_fit and mirrored_loop: Keras' loss on each shard, "mean" scaled by C, the replicas summed.
    scale = C if method == "mean" else 1.0
    parts = [reduced(s, method) for s in shard_slices(sharding)]
    return {k: scale * sum(p[k] for p in parts) for k in PARAMS}


def assert_close(got: dict, want: dict, rtol: float) -> None:
    assert set(got) == set(want)
    for k in want:
        assert np.abs(got[k] - want[k]).max() <= rtol * np.abs(want[k]).max(), k


def flat(grads: dict) -> np.ndarray:
    return np.concatenate([np.ravel(grads[k]) for k in sorted(grads)])


def run(backend: str, dtype: str = "float64", configs=None):
    job = data_parallel_job(BACKENDS[backend], MODEL, {k: v.astype(dtype) for k, v in PARAMS.items()},
                            X.astype(dtype), Y, R, dtype=dtype, configs=configs)
    return run_jobs([WorkerRun(job, BACKENDS[backend], 300)], extra_env=worker_env(R))[backend]


@pytest.fixture(scope="module")
def mirrored():
    return run("keras-tensorflow")


@pytest.fixture(scope="module")
def data_parallel():
    return run("keras-jax")


TF_CONFIGS = ("single", "mirrored_fit", "mirrored_loop", "mirrored_average")


@pytest.mark.frameworks("keras-tensorflow")
@pytest.mark.parametrize("method", ["mean", "sum"])
@pytest.mark.parametrize("sharding", ["even", "uneven"])
@pytest.mark.parametrize("config", TF_CONFIGS)
def test_mirrored_strategy_hands_the_optimizer_what_keras_source_says(mirrored, config, sharding, method):
    row = mirrored.methods[f"{config}@{sharding}/{method}"]
    assert row.status == "ok", row.error
    assert all(g.dtype == np.float64 for g in row.grads.values())
    assert_close(row.grads, expected(config, sharding, method), TOL["float64"])
    assert row.info["shards"] == ([N[sharding]] if config == "single" else SHARDS[sharding])
    if config != "single":
        assert "every replica's copy of it is identical" in row.info["note"]


@pytest.mark.frameworks("keras-tensorflow")
@pytest.mark.parametrize("config", ["mirrored_fit", "mirrored_loop", "mirrored_average"])
def test_the_factor_against_the_workers_single_device_gradient(mirrored, config):
    # Equal shards: sum_r C mean_r = R C mean (Keras' scaled mean), sum_r sum_r = sum; compute_average_loss: 1.
    for method in ("mean", "sum"):
        single = mirrored.methods[f"single@even/{method}"].grads
        factor = R * C if method == "mean" and config != "mirrored_average" else 1.0
        assert_close(mirrored.methods[f"{config}@even/{method}"].grads, {k: factor * v for k, v in single.items()},
                     TOL["float64"])


@pytest.mark.frameworks("keras-tensorflow")
@pytest.mark.parametrize("config", ["mirrored_fit", "mirrored_loop"])
def test_keras_scaled_mean_on_unequal_shards_is_no_constant_multiple_of_the_mean(mirrored, config):
    # The shards' means are weighed equally although one shard has 3 examples: the best constant factor leaves
    # a residual far above rounding (while the per-shard formula above holds to 1e-12).
    got = flat(mirrored.methods[f"{config}@uneven/mean"].grads)
    single = flat(mirrored.methods["single@uneven/mean"].grads)
    factor = got @ single / (single @ single)
    assert np.abs(got - factor * single).max() > 1e-3 * np.abs(single).max()


@pytest.mark.frameworks("keras-tensorflow")
def test_the_worker_reports_its_strategy(mirrored):
    assert mirrored.status == "ok"
    env = mirrored.environment
    assert env["replicas"] == R and env["strategy"] == "MirroredStrategy"
    assert [d.rsplit("/", 1)[-1] for d in env["devices"]] == ["device:CPU:0", "device:CPU:1", "device:CPU:2"]


@pytest.mark.frameworks("keras-jax")
@pytest.mark.parametrize("method", ["mean", "sum"])
def test_data_parallel_gives_the_single_device_gradient_on_even_shards(data_parallel, method):
    for config in ("single", "data_parallel"):
        row = data_parallel.methods[f"{config}@even/{method}"]
        assert row.status == "ok", row.error
        assert_close(row.grads, expected(config, "even", method), TOL["float64"])
        assert row.info["shards"] == ([12] if config == "single" else SHARDS["even"])
    assert len(set(data_parallel.environment["mesh"]["devices"])) == data_parallel.environment["replicas"] == R


@pytest.mark.frameworks("keras-jax")
def test_an_uneven_batch_is_refused_with_jaxs_message_and_the_other_cases_go_on(data_parallel):
    for method in ("mean", "sum"):
        row = data_parallel.methods[f"data_parallel@uneven/{method}"]
        assert row.status == "error"
        assert "EngineRefused" in row.error and "11 examples on 3 devices" in row.error
        assert "IndivisibleError" in row.error and "should evenly divide the shape" in row.error
        single = data_parallel.methods[f"single@uneven/{method}"]
        assert single.status == "ok", single.error
        assert_close(single.grads, expected("single", "uneven", method), TOL["float64"])
    assert all(m.status == "ok" for name, m in data_parallel.methods.items() if "uneven/" not in name
               or name.startswith("single"))


@pytest.mark.frameworks("keras-tensorflow")
def test_float32_gives_the_same_conventions():
    out = run("keras-tensorflow", "float32", configs=("mirrored_average",))
    for sharding in ("even", "uneven"):
        for method in ("mean", "sum"):
            row = out.methods[f"mirrored_average@{sharding}/{method}"]
            assert row.status == "ok", row.error
            assert all(g.dtype == np.float32 for g in row.grads.values())
            assert_close(row.grads, expected("mirrored_average", sharding, method), TOL["float32"])


# -- task "data_parallel_train": K optimizer steps through MirroredStrategy ----------------------------------

STEPS = 4
LRS = [0.05, 0.04, 0.03, 0.02]
MOMENTUM = 0.9
#: Keras' momentum on the TensorFlow backend (module docstring).
MU = float(np.float32(MOMENTUM))
TRAIN_RNG = np.random.default_rng(7)
BATCHES = [(TRAIN_RNG.normal(size=(12, SIZES[0])), TRAIN_RNG.integers(0, SIZES[2], size=12)) for _ in range(STEPS)]
TRAIN_TOL = 1e-12
TRAIN_CONFIGS = ("mirrored_fit", "mirrored_loop", "mirrored_average")


def plain_training(method: str, lrs: list[float]) -> tuple[list[dict], list[float]]:
    """Keras' SGD with momentum written in numpy on the global batches (module docstring): (parameters after each
    step, the loss under ``method`` of batch t before step t)."""
    return mlp.train_keras_sgd(PARAMS, BATCHES, method, lrs, MU)


def trajectory(row) -> list[dict]:
    """The parameters after each step, as the worker returned them ("T/NAME")."""
    return [{k: row.grads[f"{t}/{k}"] for k in PARAMS} for t in range(1, STEPS + 1)]


def rel_err(got: dict, want: dict) -> float:
    return max(float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()) for k in want)


@pytest.fixture(scope="module")
def trained():
    opt = OptimizerConfig("sgd", LRS[0], momentum=MOMENTUM).to_dict()
    runs = {f"{c}@even/{m}": {"optimizer": opt, "lrs": LRS}
            for c in ("single", *TRAIN_CONFIGS) for m in ("mean", "sum")}
    job = data_parallel_train_job(BACKENDS["keras-tensorflow"], MODEL, PARAMS, BATCHES, R, runs, dtype="float64")
    return run_jobs([WorkerRun(job, BACKENDS["keras-tensorflow"], 300)], extra_env=worker_env(R))["keras-tensorflow"]


def train_factor(config: str, method: str) -> float:
    """c, the factor of the gradient each step applies (module docstring)."""
    return R * C if method == "mean" and config in ("mirrored_fit", "mirrored_loop") else 1.0


@pytest.mark.frameworks("keras-tensorflow")
@pytest.mark.parametrize("method", ["mean", "sum"])
@pytest.mark.parametrize("config", ["single", *TRAIN_CONFIGS])
def test_training_follows_single_device_training_at_the_factor_times_the_lr(trained, config, method):
    row = trained.methods[f"{config}@even/{method}"]
    assert row.status == "ok", row.error
    c = train_factor(config, method)
    want, losses = plain_training(method, [c * lr for lr in LRS])
    for t, (got, ref) in enumerate(zip(trajectory(row), want), start=1):
        assert got["layers.0.kernel"].dtype == np.float64
        assert rel_err(got, ref) < TRAIN_TOL, t
    # fit logs, and the custom loops' strategy.reduce(SUM) gives, the replicas' losses added up: c times the
    # global batch's loss at the parameters before the step.
    got_losses = [float(row.grads[f"loss/{t}"]) for t in range(1, STEPS + 1)]
    assert np.allclose(got_losses, [c * v for v in losses], rtol=TRAIN_TOL, atol=0)
    if config != "single":
        assert row.info["shards"] == [4, 4, 4] and "every replica's copy of them is identical" in row.info["note"]
        assert row.info["optimizer"].startswith("keras.optimizers.SGD(") and "momentum=0.9" in row.info["optimizer"]


@pytest.mark.frameworks("keras-tensorflow")
@pytest.mark.parametrize("config", ["mirrored_fit", "mirrored_loop"])
def test_keras_scaled_mean_leaves_the_single_device_trajectory_measurably(trained, config):
    """R C = 1 + 3e-8: after 4 steps the engine's parameters are 2e-8 (relative, measured) from single-device
    training at lr, 10^4 times the tolerance they hold to the training at R C lr (measured 1e-16)."""
    last = trajectory(trained.methods[f"{config}@even/mean"])[-1]
    assert rel_err(last, plain_training("mean", LRS)[0][-1]) > 1e-10
    assert rel_err(last, plain_training("mean", [R * C * lr for lr in LRS])[0][-1]) < TRAIN_TOL


def test_a_training_case_without_its_run_is_refused_before_any_model_is_built():
    from gradparity.backends.protocol.parallel import training_view

    opt = OptimizerConfig("sgd", LRS[0]).to_dict()
    job = data_parallel_train_job(BACKENDS["keras-tensorflow"], MODEL, PARAMS, BATCHES, R,
                                  {"mirrored_fit@even/mean": {"optimizer": opt, "lrs": LRS}}, dtype="float64")
    job.payload["runs"]["mirrored_fit@even/sum"] = job.payload["runs"].pop("mirrored_fit@even/mean")
    with pytest.raises(ValueError, match=r"case 'mirrored_fit@even/mean' has no run in payload 'runs'"):
        training_view(job, "keras")
