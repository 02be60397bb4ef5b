"""Its Flax NNX port (weights mapped from torch's)."""
import jax.numpy as jnp
from flax import nnx


class Classifier(nnx.Module):
    def __init__(self, features=6, width=16, classes=3):
        r = nnx.Rngs(0)
        self.hidden = nnx.Linear(features, width, rngs=r)
        self.out = nnx.Linear(width, classes, rngs=r)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))
