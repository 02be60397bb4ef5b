"""JAX / Flax NNX: the built-in models (``gradparity.experiment.models``: the MLP, the CNN, the sequence model) as
Flax users write them.

Run by the model session (``session.py``, payload "builtin") and the trainer (``train.py``): the session casts
the layers' dtypes to the job's (under the switch 'autocast' the layers' ``dtype`` is the narrow compute dtype,
``param_dtype`` the job's), puts the parameters on the device and loads the canonical weights through
``assignment``. Flax's layout is the canonical one (Linear kernels (in, out), Conv kernels HWIO, ``nnx.Embed``
tables (vocab, width), LayerNorm / BatchNorm ``scale`` / ``bias``, images channels-last), and the modules are
laid out so that every NNX state path is the canonical name: nothing is renamed or transposed. The
layer settings are the ones core resolved for jax (``LayerOptions.resolved("jax")``): explicit
values, or Flax's own defaults.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from gradparity.experiment.models import CNN, MLP, LayerOptions, Sequence, model_from_dict

#: The elementwise activations of the built-in models (GELU aside: ``activation`` resolves its form).
ACTIVATIONS = {
    "relu": jax.nn.relu,  # derivative 0 at z == 0, like the reference's (z > 0)
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda z: z,
}

#: ``nnx.LayerNorm(use_fast_variance=...)``: Flax's default True computes var = E[x^2] - E[x]^2 in one pass
#: (clipped at 0); False computes E[(x - E[x])^2], the reference's two-pass form. Kept at the default, as a
#: port that never sets it gets. Identical in float64; in float32 it loses digits only when the rows' mean
#: is large against their spread: sequence gradients vs float64, rel L2 1.7e-7 either way with zero-mean
#: embeddings, 2.2e-6 (fast) vs 4.1e-7 (two-pass) with the embeddings shifted by +3 (row mean 6, std ~1.4).
USE_FAST_VARIANCE = True


def activation(name: str, gelu: str = "exact"):
    """The elementwise activation ``name``; "gelu" in the resolved form (exact erf or tanh approximation)."""
    if name == "gelu":
        # jax.nn.gelu (and nnx.gelu) default to the tanh approximation; exact is erf.
        return functools.partial(jax.nn.gelu, approximate=gelu == "tanh")
    return ACTIVATIONS[name]


def _conv_padding(opts: dict, k: int):
    """Flax Conv padding: "VALID"; "SAME" (XLA puts an odd extra row / column at the bottom / right); or
    explicit k // 2 zeros on both sides (the "symmetric" form)."""
    if opts["padding"] == "valid":
        return "VALID"
    if opts["same_padding"] == "end":
        return "SAME"
    return ((k // 2, k // 2), (k // 2, k // 2))


class FlaxMLP(nnx.Module):
    """Dense layers ``sizes[0] -> ... -> sizes[-1]``; the activation after all but the last (logits).

    With ``eps`` an ``nnx.BatchNorm`` in training mode (batch statistics, Flax's default
    ``use_fast_variance``: var = E[x^2] - E[x]^2) sits before every hidden activation;
    ``__call__(x, masks)`` multiplies hidden activation i by ``masks[i]`` (the switch 'dropout',
    core's masks: jax's generator could not be compared with other frameworks'); no masks: plain.
    """

    def __init__(self, spec: MLP, eps: float | None, rngs: nnx.Rngs):
        sizes = spec.sizes
        # nnx.List (not nnx.Sequential, which would interleave the activations)
        # so layer i lives at state path ('layers', i, ...), the canonical name.
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.norms = None if eps is None else nnx.List([
            nnx.BatchNorm(width, use_running_average=False, epsilon=eps, rngs=rngs) for width in sizes[1:-1]
        ])
        self.act = activation(spec.activation)

    def __call__(self, x: jax.Array, masks=None) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = self.act(x)
                if masks is not None:
                    x = x * masks[i]
        return x


class FlaxCNN(nnx.Module):
    """``conv`` (Conv + activation each), 2x2 max pooling stride 2 (VALID), the NHWC map flattened, ``dense``."""

    def __init__(self, spec: CNN, opts: dict, rngs: nnx.Rngs):
        k = spec.kernel_size
        widths = (spec.image[2], *spec.channels)
        # nnx.List: conv i lives at state path ('conv', i, ...), the canonical name.
        self.conv = nnx.List([
            nnx.Conv(a, b, (k, k), strides=(s, s), padding=_conv_padding(opts, k), rngs=rngs)
            for a, b, s in zip(widths[:-1], widths[1:], spec.strides)
        ])
        self.act = activation(spec.activation, opts["gelu"])
        self.dense = nnx.Linear(spec.flat_features, spec.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.conv:
            x = self.act(conv(x))
        x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
        # (N, H, W, C) row-major: the canonical channels-last flattening order.
        return self.dense(x.reshape(x.shape[0], -1))


class Attention(nnx.Module):
    """Causal multi-head self-attention with separate query / key / value / out ``nnx.Linear`` projections.

    Not ``nnx.MultiHeadAttention``: its LinearGeneral kernels are (width, heads, head_dim), not the
    canonical (width, width). Not ``jax.nn.dot_product_attention`` (nor ``nnx.dot_product_attention``,
    which calls it when there is no dropout): its XLA path always runs the softmax in float32, so a
    float64 job would not compute in float64. The softmax attention is written out instead, in the
    inputs' dtype, the same code for every dtype.
    """

    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.heads = heads
        self.query, self.key, self.value, self.out = (nnx.Linear(width, width, rngs=rngs) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, e = x.shape

        def split(h):  # (N, T, E) -> (N, T, heads, D): head h is columns h*D .. (h+1)*D
            return h.reshape(n, t, self.heads, e // self.heads)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(jnp.asarray(e // self.heads, q.dtype))
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # query t sees keys 0..t
        # -inf, not a large finite number: the masked weights are exactly 0, and their gradients too.
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        o = jnp.einsum("nhqk,nkhd->nqhd", weights, v)
        return self.out(o.reshape(n, t, e))  # heads concatenated in order


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp.1(gelu(mlp.0(ln2(x))))``."""

    def __init__(self, spec: Sequence, opts: dict, rngs: nnx.Rngs):
        eps = opts["layernorm_epsilon"]
        self.ln1 = nnx.LayerNorm(spec.width, epsilon=eps, use_fast_variance=USE_FAST_VARIANCE, rngs=rngs)
        self.attn = Attention(spec.width, spec.heads, rngs)
        self.ln2 = nnx.LayerNorm(spec.width, epsilon=eps, use_fast_variance=USE_FAST_VARIANCE, rngs=rngs)
        self.mlp = nnx.List([nnx.Linear(spec.width, spec.mlp_width, rngs=rngs),
                             nnx.Linear(spec.mlp_width, spec.width, rngs=rngs)])
        self.act = activation("gelu", opts["gelu"])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp[1](self.act(self.mlp[0](self.ln2(x))))


class FlaxSequence(nnx.Module):
    """Token and learned position embeddings, one ``block``, ``ln_f`` and the ``head``: (N, T) -> (N, T, vocab)."""

    def __init__(self, spec: Sequence, opts: dict, rngs: nnx.Rngs):
        self.embed = nnx.Embed(spec.vocab, spec.width, rngs=rngs)
        self.pos = nnx.Embed(spec.seq_len, spec.width, rngs=rngs)
        self.block = Block(spec, opts, rngs)
        self.ln_f = nnx.LayerNorm(spec.width, epsilon=opts["layernorm_epsilon"],
                                  use_fast_variance=USE_FAST_VARIANCE, rngs=rngs)
        self.head = nnx.Linear(spec.width, spec.vocab, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.embed(x) + self.pos(jnp.arange(x.shape[1]))
        return self.head(self.ln_f(self.block(h)))


def build(model: dict) -> nnx.Module:
    """The built-in model ``model`` (a ``to_dict()``) as an ``nnx.Module`` with Flax's default initialization
    (seed 0; the session overwrites it) and default dtypes (the session sets them), computing with the settings
    resolved for jax."""
    spec = model_from_dict(model)
    opts = LayerOptions.from_dict(model.get("options")).resolved("jax")
    rngs = nnx.Rngs(0)
    if isinstance(spec, MLP):
        # The epsilon the job's dict carries (explicit: Flax's default and Keras' differ).
        norm = model.get("batchnorm")
        return FlaxMLP(spec, float(norm["epsilon"]) if norm else None, rngs)
    if isinstance(spec, CNN):
        return FlaxCNN(spec, opts, rngs)
    if isinstance(spec, Sequence):
        return FlaxSequence(spec, opts, rngs)
    raise ValueError(f"jax has no built-in model kind {model.get('kind')!r}")


def assignment(model: dict) -> dict[str, str]:
    """{native name (NNX state path joined with '.'): canonical name}: the identity, Flax's names and layout
    being the canonical ones."""
    return {name: name for name in model_from_dict(model).param_shapes()}
