"""``gradparity diagnose`` on gradients saved by users' own data-parallel scripts (issue 20): plain TensorFlow
(MirroredStrategy, a custom loop whose replicas reduce by tf.reduce_mean and whose gradients the strategy sums) and
plain JAX (the pmap-era recipe under shard_map: jax.grad inside the body, then lax.pmean), each saving the engine's
gradient and the single-device one under the user's own names. Both engines give R times the single-device mean;
diagnose must rank data_parallel_average first and say the engine summed (not DDP's averaging)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from cli_harness import run_cli as gradparity

TF_SCRIPT = """\
import sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
rng = np.random.default_rng(0)
x, y = rng.normal(size=(8, 5)), rng.integers(0, 3, size=8)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    w = tf.Variable(rng.normal(size=(5, 3)) * 0.5)


def loss_fn(xb, yb):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=tf.matmul(xb, w)))


def step(xb, yb):
    with tf.GradientTape() as tape:
        loss = loss_fn(xb, yb)
    return tf.distribute.get_replica_context().all_reduce("sum", tape.gradient(loss, w))


for xb, yb in strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(8)):
    g = strategy.run(step, args=(xb, yb))
with tf.GradientTape() as tape:
    loss = loss_fn(tf.constant(x), tf.constant(y))
np.savez(sys.argv[1], **{"mirrored_mean/w": strategy.experimental_local_results(g)[0].numpy(),
                         "one_device_mean/w": tape.gradient(loss, w).numpy()})
"""
JAX_SCRIPT = """\
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
x, y, w = rng.normal(size=(8, 5)), rng.integers(0, 3, size=8), rng.normal(size=(5, 3)) * 0.5


def loss(w, xb, yb):
    return jnp.mean(-jax.nn.log_softmax(xb @ w)[jnp.arange(yb.shape[0]), yb])


def body(w, xb, yb):
    return jax.lax.pmean(jax.grad(loss)(w, xb, yb), "data")   # the pmap-era recipe


mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()))
np.savez(sys.argv[1], **{"shard_map_pmean/w": np.asarray(step(w, x, y)),
                         "one_device/w": np.asarray(jax.grad(loss)(w, x, y))})
"""


def saved(tmp_path, script: str) -> str:
    path = tmp_path / "user.py"
    path.write_text(script)
    out = tmp_path / "grads.npz"
    proc = subprocess.run([sys.executable, str(path), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(out)


def diagnosed(npz: str) -> dict:
    r = gradparity("diagnose", npz, "--replicas", 2, "--json")
    assert r.returncode == 1, r.stderr
    return json.loads(r.stdout)


@pytest.mark.frameworks("keras-tensorflow")
def test_a_mirrored_strategy_loop_summing_replica_means_is_data_parallel(tmp_path):
    npz = saved(tmp_path, TF_SCRIPT)
    g = np.load(npz)
    # The strategy sums the 2 replicas' mean gradients: twice the single-device mean (float64, equal shards).
    np.testing.assert_allclose(g["mirrored_mean/w"], 2 * g["one_device_mean/w"], rtol=1e-12)
    doc = diagnosed(npz)
    top = doc["causes"][0]
    assert top["id"] == "data_parallel_average" and top["score"] >= 0.9
    assert "summed the replicas' gradients" in " ".join(top["evidence"])


@pytest.mark.frameworks("jax")
def test_the_pmap_recipe_under_shard_map_is_data_parallel(tmp_path):
    npz = saved(tmp_path, JAX_SCRIPT)
    g = np.load(npz)
    # jax.grad inside shard_map's body already sums the shards (check_vma); pmean leaves it: 2 x the mean.
    np.testing.assert_allclose(g["shard_map_pmean/w"], 2 * g["one_device/w"], rtol=1e-12)
    top = diagnosed(npz)["causes"][0]
    assert top["id"] == "data_parallel_average" and top["score"] >= 0.9
    assert "jax.grad inside shard_map" in " ".join(top["evidence"])
