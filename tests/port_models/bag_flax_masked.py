"""Flax NNX ports of bag_torch.Bag that mimic torch's padding_idx=0 the usual way: the embedding's output is passed
through jax.lax.stop_gradient at the padding positions, so the padding row gets no gradient. ``masked`` masks
token 0 (faithful); ``masked_wrong_token`` masks token 1, a real token (a bug)."""
import jax
import jax.numpy as jnp
from flax import nnx


class Bag(nnx.Module):
    def __init__(self, padding=0, vocab=11, dim=8, classes=5):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)
        self.padding = padding

    def __call__(self, tokens):
        e = self.embed(tokens)
        e = jnp.where((tokens == self.padding)[..., None], jax.lax.stop_gradient(e), e)
        return self.head(jnp.tanh(e.mean(axis=1)))


def masked():
    return Bag()


def masked_wrong_token():
    return Bag(padding=1)
