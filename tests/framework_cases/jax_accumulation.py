"""Written in JAX/optax directly: a full-batch gradient, micro-batch means added without 1/k (the bug),
and optax.MultiSteps (which averages them). Usage: python jax_accumulation.py OUT.npz [default-accumulator]"""
import sys
import numpy as np
import jax, jax.numpy as jnp, optax
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
x = rng.standard_normal((12, 6)); y = rng.integers(0, 4, 12)
w = rng.standard_normal((6, 4)) * 0.5; b = np.zeros(4)
def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y).mean()
params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
full = jax.grad(loss)(params, x, y)
# Gradient accumulation over 3 micro-batches, each a mean, added up without dividing by 3.
acc = jax.tree.map(jnp.zeros_like, params)
for xs, ys in zip(np.split(x, 3), np.split(y, 3)):
    acc = jax.tree.map(jnp.add, acc, jax.grad(loss)(params, xs, ys))
# optax.MultiSteps averages the micro-batch gradients: the correct version. Its accumulator is float32
# unless told otherwise (optax 0.2.8: accumulator_dtype=jnp.float32), which would round this float64 run.
accumulator = {} if sys.argv[2:] == ["default-accumulator"] else {"accumulator_dtype": jnp.float64}
opt = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=3, **accumulator)
state = opt.init(params)
for xs, ys in zip(np.split(x, 3), np.split(y, 3)):
    updates, state = opt.update(jax.grad(loss)(params, xs, ys), state, params)
multisteps = jax.tree.map(lambda u: -u, updates)  # sgd(1.0): the update is -gradient
np.savez(sys.argv[1], **{f"{m}/{k}": np.asarray(v[k]) for m, v in
                         (("full_batch", full), ("accumulated", acc), ("multisteps", multisteps)) for k in v})
