"""The Flax NNX port of seq_torch.TinyTransformer (faithful, and with jax.nn.gelu's default approximation)."""
import math

import jax
import jax.numpy as jnp
from flax import nnx


class TinyTransformer(nnx.Module):
    def __init__(self, approximate_gelu=False, vocab=11, dim=8, classes=5):
        r = nnx.Rngs(0)
        self.embed = nnx.Embed(vocab, dim, rngs=r)
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=r)
        self.query, self.key, self.value = (nnx.Linear(dim, dim, rngs=r) for _ in range(3))
        self.out = nnx.Linear(dim, dim, rngs=r)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=r)
        self.up, self.down = nnx.Linear(dim, 2 * dim, rngs=r), nnx.Linear(2 * dim, dim, rngs=r)
        self.head = nnx.Linear(dim, classes, rngs=r)
        self.approximate_gelu = approximate_gelu

    def __call__(self, tokens):
        h = self.embed(tokens)
        a = self.norm1(h)
        q, k, v = self.query(a), self.key(a), self.value(a)
        weights = jax.nn.softmax(q @ jnp.swapaxes(k, 1, 2) / math.sqrt(q.shape[-1]), axis=-1)
        h = h + self.out(weights @ v)
        h = h + self.down(jax.nn.gelu(self.up(self.norm2(h)), approximate=self.approximate_gelu))
        return self.head(h)


def faithful():
    return TinyTransformer()


def default_gelu():
    """jax.nn.gelu's default: the tanh approximation (torch's nn.GELU is exact)."""
    return TinyTransformer(approximate_gelu=True)
