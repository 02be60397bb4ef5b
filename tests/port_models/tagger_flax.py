"""The tagger in Flax: an NNX module (keyword call, dict output) and a linen module with its variables."""
import jax
import jax.numpy as jnp
from flax import linen, nnx

VOCAB, DIM = 13, 8


class Bias(nnx.Module):
    """The tied head's own part: its bias (the weight is the embedding's, through ``attend``)."""

    def __init__(self):
        self.bias = nnx.Param(jnp.zeros((VOCAB,)))

    def __call__(self, x):
        return x + self.bias.value


class Tagger(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.mix = nnx.Linear(DIM, DIM, rngs=rngs)
        self.norm = nnx.LayerNorm(DIM, epsilon=1e-5, rngs=rngs)
        self.head = Bias()

    def __call__(self, token_ids, mask):
        h = self.embed(token_ids) * mask[..., None].astype(self.mix.kernel.value.dtype)
        h = self.norm(jnp.tanh(self.mix(h)))
        return {"logits": self.head(self.embed.attend(h)), "hidden": h}


class LinenBias(linen.Module):
    @linen.compact
    def __call__(self, x):
        return x + self.param("bias", linen.initializers.zeros, (VOCAB,))


class LinenTagger(linen.Module):
    @linen.compact
    def __call__(self, token_ids, mask):
        embed = linen.Embed(VOCAB, DIM, name="embed")
        h = embed(token_ids)
        h = h * mask[..., None].astype(h.dtype)
        h = linen.LayerNorm(epsilon=1e-5, name="norm")(jnp.tanh(linen.Dense(DIM, name="mix")(h)))
        return {"logits": LinenBias(name="head")(embed.attend(h)), "hidden": h}


def nnx_tagger():
    return Tagger()


def linen_tagger():
    """A linen module and its variables, as ``module.init`` makes them."""
    module = LinenTagger()
    ids = jnp.zeros((1, 4), jnp.int32)
    return module, module.init(jax.random.PRNGKey(0), ids, jnp.ones((1, 4), jnp.int32))
