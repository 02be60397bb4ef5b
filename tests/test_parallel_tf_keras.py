"""TF-Keras 2's data-parallel engine for real (task "data_parallel", ``backends/tf_keras/parallel.py``): a custom
training loop under ``tf.distribute.MirroredStrategy`` over R = 3 logical CPU devices, run by the real runner in a
worker process, with tf_keras' own loss reductions.

What the tf_keras 2.21 and TensorFlow sources say, held against per-example gradients g_i computed in plain numpy
(tests/mlp_reference.py; the MLP ``x @ W0 + b0 -> relu -> @ W1 + b1``, cross-entropy):

- tf.distribute splits a global batch of N into R contiguous shards S_r, the first N mod R one example larger:
  12 -> 4, 4, 4 and 11 -> 4, 4, 3.
- ``Optimizer.apply_gradients`` all-reduces the replicas' gradients with SUM (``optimizer_utils.
  all_reduce_sum_gradients``): ``Reduction.SUM`` gives sum_r sum_{i in S_r} g_i, the single-device sum.
- ``Loss._get_reduction`` raises ``ValueError("Please use `tf.keras.losses.Reduction.SUM` or
  `tf.keras.losses.Reduction.NONE` ...")`` for ``SUM_OVER_BATCH_SIZE`` under a strategy outside ``fit``: that
  case fails with TF-Keras' message, the job's other cases go on.
- ``tf.nn.compute_average_loss(l, global_batch_size=N)`` is sum(l) / N per replica: summed, the single-device
  mean (and, for the per-example losses times N, the sum).

Float64: the engine agrees with the formulas to rounding (1e-12 relative; measured ~3e-16).

Training (task "data_parallel_train"): 4 steps of ``tf_keras.optimizers.SGD(momentum=0.9)``, the learning rate
assigned before every step, held against the same training written in numpy (mlp_reference). TF-Keras' SGD
(tf_keras/src/optimizers/sgd.py, ``update_step``) is ``m = -g lr + m mu; p += m``, with mu = float32(0.9)
(``tf.cast(self.momentum, variable.dtype)`` converts the Python float to float32 first). Both trainable
configurations hand the optimizer the single-device gradient (c = 1 above: compute_average_loss, or the SUM
all-reduce of shard sums), so they stay on single-device training's trajectory (1e-12 relative; measured ~2e-16);
TF-Keras has no trainable configuration whose gradient is another multiple (its per-replica mean is refused).
"""
from __future__ import annotations

import re

import mlp_reference as mlp
import numpy as np
import pytest

from gradparity.backends import BACKENDS
from gradparity.experiment.optimizers import OptimizerConfig
from gradparity.experiment.parallel import data_parallel_job, data_parallel_train_job, worker_env
from gradparity.run.runner import WorkerRun, run_jobs

pytestmark = pytest.mark.frameworks("tf-keras")

R = 3
TOL = 1e-12
SIZES = (6, 5, 4)
RNG = np.random.default_rng(25)
PARAMS = mlp.random_params(RNG, SIZES)
X = RNG.normal(size=(12, SIZES[0]))
Y = RNG.integers(0, SIZES[2], size=12)
MODEL = {"kind": "mlp", "sizes": list(SIZES), "activation": "relu"}
SHARDS = {"even": [4, 4, 4], "uneven": [4, 4, 3]}
N = {"even": 12, "uneven": 11}


def reduced(n: int, method: str) -> dict[str, np.ndarray]:
    """The gradient of the mean or the sum of the loss over the first n examples (numpy, tests/mlp_reference.py)."""
    return mlp.reduced_grads(X[:n], Y[:n], PARAMS, method)


def assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == np.float64
        assert np.abs(got[k] - want[k]).max() <= TOL * np.abs(want[k]).max(), k


@pytest.fixture(scope="module")
def outcome():
    job = data_parallel_job(BACKENDS["tf-keras"], MODEL, PARAMS, X, Y, R, dtype="float64")
    return run_jobs([WorkerRun(job, BACKENDS["tf-keras"], 300)], extra_env=worker_env(R))["tf-keras"]


@pytest.mark.parametrize("sharding", ["even", "uneven"])
@pytest.mark.parametrize("config, method", [("single", "mean"), ("single", "sum"), ("mirrored_loop", "sum"),
                                            ("mirrored_average", "mean"), ("mirrored_average", "sum")])
def test_summed_replicas_give_the_single_device_reduction(outcome, config, method, sharding):
    # SUM all-reduce of shard sums, or of shard sums divided by the global batch: the whole batch's sum or mean,
    # whatever the shards' sizes.
    row = outcome.methods[f"{config}@{sharding}/{method}"]
    assert row.status == "ok", row.error
    assert_close(row.grads, reduced(N[sharding], method))
    assert row.info["shards"] == ([N[sharding]] if config == "single" else SHARDS[sharding])


@pytest.mark.parametrize("sharding", ["even", "uneven"])
def test_sum_over_batch_size_in_a_custom_loop_is_refused_with_tf_keras_message(outcome, sharding):
    row = outcome.methods[f"mirrored_loop@{sharding}/mean"]
    assert row.status == "error"
    assert "EngineRefused" in row.error
    assert "Please use `tf.keras.losses.Reduction.SUM` or `tf.keras.losses.Reduction.NONE`" in row.error
    # The refusal is that case's alone.
    assert outcome.status == "ok"
    assert [name for name, m in outcome.methods.items() if m.status != "ok"] == [
        "mirrored_loop@even/mean", "mirrored_loop@uneven/mean"]


def test_the_worker_reports_its_strategy(outcome):
    env = outcome.environment
    assert env["framework"] == "tf_keras" and env["replicas"] == R and env["strategy"] == "MirroredStrategy"
    assert [d.rsplit("/", 1)[-1] for d in env["devices"]] == ["device:CPU:0", "device:CPU:1", "device:CPU:2"]


# -- task "data_parallel_train" ------------------------------------------------------------------------------

STEPS = 4
LRS = [0.05, 0.04, 0.03, 0.02]
MOMENTUM = 0.9
MU = float(np.float32(MOMENTUM))   # TF-Keras' momentum as tf.cast converts it (module docstring)
TRAIN_RNG = np.random.default_rng(8)
BATCHES = [(TRAIN_RNG.normal(size=(12, SIZES[0])), TRAIN_RNG.integers(0, SIZES[2], size=12)) for _ in range(STEPS)]


def plain_training(method: str, lrs: list[float]) -> tuple[list[dict], list[float]]:
    """TF-Keras' SGD with momentum written in numpy on the global batches (mlp_reference's Keras form: TF-Keras'
    ``m = -g lr + m mu; p += m`` is the same sum): (parameters after each step, the loss under ``method`` of batch
    t before step t)."""
    return mlp.train_keras_sgd(PARAMS, BATCHES, method, lrs, MU)


def train_job(cases, **optimizer):
    opt = OptimizerConfig("sgd", LRS[0], **{"momentum": MOMENTUM, **optimizer}).to_dict()
    return data_parallel_train_job(BACKENDS["tf-keras"], MODEL, PARAMS, BATCHES, R,
                                   {case: {"optimizer": opt, "lrs": LRS} for case in cases}, dtype="float64")


@pytest.fixture(scope="module")
def trained():
    job = train_job([f"{c}@even/{m}" for c in ("single", "mirrored_average", "mirrored_loop") for m in ("mean", "sum")])
    return run_jobs([WorkerRun(job, BACKENDS["tf-keras"], 300)], extra_env=worker_env(R))["tf-keras"]


@pytest.mark.parametrize("config, method", [("single", "mean"), ("single", "sum"), ("mirrored_average", "mean"),
                                            ("mirrored_average", "sum"), ("mirrored_loop", "sum")])
def test_training_stays_on_the_single_device_trajectory(trained, config, method):
    row = trained.methods[f"{config}@even/{method}"]
    assert row.status == "ok", row.error
    want, losses = plain_training(method, LRS)
    for t in range(1, STEPS + 1):
        got = {k: row.grads[f"{t}/{k}"] for k in PARAMS}
        assert_close(got, want[t - 1])
    # strategy.reduce(SUM) of the replicas' losses: the global batch's loss before the step.
    assert np.allclose([float(row.grads[f"loss/{t}"]) for t in range(1, STEPS + 1)], losses, rtol=TOL, atol=0)
    assert row.info["optimizer"].startswith("tf_keras.optimizers.SGD(") and "momentum=0.9" in row.info["optimizer"]
    if config != "single":
        assert row.info["shards"] == [4, 4, 4] and "every replica's copy of them is identical" in row.info["note"]


def test_training_at_another_lr_is_another_trajectory(trained):
    """The trajectory check above tells trajectories apart: single-device training at lr / R is far from it."""
    got = {k: trained.methods["mirrored_average@even/sum"].grads[f"{STEPS}/{k}"] for k in PARAMS}
    other = plain_training("sum", [lr / R for lr in LRS])[0][-1]
    assert max(np.abs(got[k] - other[k]).max() / np.abs(other[k]).max() for k in PARAMS) > 1e-2


def test_training_a_per_replica_mean_is_refused_with_tf_keras_message(trained):
    row = trained.methods["mirrored_loop@even/mean"]
    assert row.status == "error" and "EngineRefused" in row.error
    assert "Please use `tf.keras.losses.Reduction.SUM` or `tf.keras.losses.Reduction.NONE`" in row.error


@pytest.mark.parametrize("optimizer, refused", [({"dampening": 0.5}, "dampening=0.5"),
                                                ({"momentum_form": "buffer"}, "momentum_form='buffer'")])
def test_an_optimizer_tf_keras_cannot_build_is_refused_before_any_model(optimizer, refused):
    from gradparity.backends.tf_keras import parallel

    job = train_job(["mirrored_average@even/mean"], **optimizer)
    with pytest.raises(ValueError, match=rf"TF-Keras' data-parallel trainer builds tf_keras\.optimizers\.SGD, "
                                         rf"Adam and AdamW as configured; it cannot build {re.escape(refused)}"):
        parallel.open_session(job)
