"""The bag-of-tokens classifier ported to Flax NNX, as a user first writes it: ``nnx.Embed`` has no padding_idx."""
import jax.numpy as jnp
from flax import nnx


class Bag(nnx.Module):
    def __init__(self, vocab=11, dim=8, classes=5):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, tokens):
        return self.head(jnp.tanh(self.embed(tokens).mean(axis=1)))
