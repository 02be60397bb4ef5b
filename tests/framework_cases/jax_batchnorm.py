"""Written in JAX/Flax directly: an MLP with nnx.BatchNorm in training mode (use_running_average=False) and
five ways to a batch gradient: one forward with a pullback per example, the summed and the mean loss, jax.vmap
of one example's gradient, and one example at a time. Usage: python jax_batchnorm.py OUT.npz"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

jax.config.update("jax_enable_x64", True)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(6, 12, param_dtype=jnp.float64, rngs=rngs)
        self.norm = nnx.BatchNorm(12, use_running_average=False, param_dtype=jnp.float64, rngs=rngs)
        self.dense2 = nnx.Linear(12, 4, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.dense2(jax.nn.relu(self.norm(self.dense1(x))))


rng = np.random.default_rng(0)
x, y = jnp.asarray(rng.standard_normal((16, 6))), jnp.asarray(rng.integers(0, 4, 16))
graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)


def losses(params, x, y):
    model = nnx.merge(graphdef, params, jax.tree.map(jnp.zeros_like, stats))
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y)


def flat(g):
    return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(g)}


n = len(y)
values, pullback = jax.vjp(lambda p: losses(p, x, y), params)
none = jax.tree.map(lambda *g: sum(g) / n, *[pullback(jnp.eye(n, dtype=values.dtype)[i])[0] for i in range(n)])
total = jax.grad(lambda p: losses(p, x, y).sum())(params)
mean = jax.grad(lambda p: losses(p, x, y).mean())(params)
vmapped = jax.vmap(jax.grad(lambda p, xi, yi: losses(p, xi[None], yi[None])[0]), in_axes=(None, 0, 0))(params, x, y)
one = [jax.grad(lambda p: losses(p, x[i:i + 1], y[i:i + 1]).mean())(params) for i in range(n)]
results = {"none": none, "sum": jax.tree.map(lambda g: g / n, total), "mean": mean,
           "vmap": jax.tree.map(lambda g: g.mean(axis=0), vmapped),
           "one_by_one": jax.tree.map(lambda *g: sum(g) / n, *one)}
np.savez(sys.argv[1], **{f"{m}/{k}": v for m, g in results.items() for k, v in flat(g).items()})
