"""Flax NNX ports of residual_torch.Net: faithful, and with the second block's residual added from the normalized
tensor instead of the block's input."""
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    def __init__(self, dim, rngs, wrong_residual=False):
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)
        self.wrong_residual = wrong_residual

    def __call__(self, x):
        h = self.norm(x)
        return (h if self.wrong_residual else x) + self.fc2(jnp.tanh(self.fc1(h)))


class Net(nnx.Module):
    def __init__(self, wrong_residual=False, features=6, dim=8, classes=4):
        r = nnx.Rngs(0)
        self.embed = nnx.Linear(features, dim, rngs=r)
        self.blocks = nnx.List([Block(dim, r), Block(dim, r, wrong_residual)])
        self.head = nnx.Linear(dim, classes, rngs=r)

    def __call__(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def faithful():
    return Net()


def wrong_residual():
    return Net(wrong_residual=True)
