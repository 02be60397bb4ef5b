"""Its Flax NNX port, whose hidden layer rewrote nnx.Linear's call as a plain matmul and lost the bias on the way
(the bias is there, initialized and mapped, but never added)."""
import jax.numpy as jnp
from flax import nnx


class Dense(nnx.Linear):
    def __call__(self, x):
        return x @ self.kernel[...]  # nnx.Linear adds self.bias; this does not


class Net(nnx.Module):
    def __init__(self, features=6, width=8, classes=4):
        r = nnx.Rngs(0)
        self.hidden = Dense(features, width, rngs=r)
        self.head = nnx.Linear(width, classes, rngs=r)

    def __call__(self, x):
        return self.head(jnp.tanh(self.hidden(x)))
