"""Keras 3: the built-in models (``gradparity.experiment.models``: the MLP, the CNN, the sequence model) as
Keras users write them.

Run by the model session (``session.py``, payload "builtin") and the trainer (``train.py``) on whichever Keras
backend KERAS_BACKEND chose, with floatx already the job's dtype (and, under the switch 'autocast', Keras'
global dtype policy the mixed one): the session builds the model with ``build``, then loads the canonical
weights through ``assignment``. Keras stores Dense kernels (in, out), Conv2D kernels HWIO and images
channels-last, the canonical layout, so nothing is transposed. The layer settings of the CNN and the sequence
model are the ones core resolved for Keras (``LayerOptions.resolved("keras")``): explicit values, or Keras'
own defaults.

Every layer is named, so the variables' native names (their Keras paths, e.g. ``conv_0/kernel``,
``attn/query/kernel``, ``mlp/dense_0/kernel``) are the same in every process. No activation is fused into a
Conv2D layer or the CNN's and sequence model's Dense layers: each such layer's output stays affine, comparable
with the other frameworks' layer by layer. The MLP is written as a plain Keras MLP is: its activation fused
into each hidden Dense (see ``MLP``).
"""
from __future__ import annotations

import functools
import math

import keras

from gradparity.experiment.models import CNN, MLP, LayerOptions, Sequence, model_from_dict

#: Keras' names of the canonical activations ("gelu" is built from the resolved GELU form instead).
_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "identity": "linear"}
#: Keras' variable names of each canonical leaf name, per layer kind.
_DENSE = {"kernel": "kernel", "bias": "bias"}
_NORM = {"scale": "gamma", "bias": "beta"}
_EMBEDDING = {"embedding": "embeddings"}


def _activation(name: str, gelu: str, layer_name: str) -> keras.layers.Activation:
    """An Activation layer computing ``name``; GELU in the resolved form (tanh: ``approximate=True``)."""
    if name == "gelu":
        function = functools.partial(keras.activations.gelu, approximate=gelu == "tanh")
        return keras.layers.Activation(function, name=layer_name)
    return keras.layers.Activation(_ACTIVATIONS[name], name=layer_name)


def _conv(filters: int, kernel: int, stride: int, opts: dict, index: int, x):
    """``conv_{index}`` on ``x``. Keras' padding="same" is the "end" form (TensorFlow / XLA SAME); the
    "symmetric" form pads k // 2 zeros on every side first, then convolves "valid"."""
    padding = opts["padding"]
    if padding == "same" and opts["same_padding"] == "symmetric":
        x = keras.layers.ZeroPadding2D(kernel // 2, data_format="channels_last", name=f"pad_{index}")(x)
        padding = "valid"
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, data_format="channels_last",
                               use_bias=True, name=f"conv_{index}")(x)


class KerasMLP(keras.Model):
    """The MLP: per hidden layer ``dense_i`` -> [``norm_i`` (BatchNormalization) -> ``activation_i``] -> [the
    switch 'dropout''s mask]; the last Dense gives the logits.

    Without batch normalization the activation stays in the Dense (``Dense(units, activation=...)``), as a
    plain Keras MLP is written; with it (``model["batchnorm"]``, its epsilon from the dict) the normalization
    sits between a Dense and its activation, which becomes its own ``Activation`` layer. ``call(x, masks=None)``:
    ``masks`` (the switch 'dropout', one (N, H) keep-mask per hidden layer, core's, since every framework's
    generator draws different ones) multiply hidden activation i by ``masks[i]`` in a ``Multiply`` layer
    ``dropout_i``; no masks: the plain MLP. The layers are built here, from ``sizes``: their variables exist
    (``mlp/dense_i/kernel``, ...) before the first call.
    """

    def __init__(self, sizes, activation: str, epsilon: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.sizes, self.epsilon = [int(s) for s in sizes], epsilon
        activation = _ACTIVATIONS[activation]
        hidden = len(self.sizes) - 2
        fused = activation if epsilon is None else None
        # Appended layer by layer, so that the variables come in the order a functional MLP lists them.
        self.dense, self.norms, self.acts, self.dropouts = [], [], [], []
        for i, units in enumerate(self.sizes[1:]):
            self.dense.append(keras.layers.Dense(units, activation=None if i == hidden else fused, name=f"dense_{i}"))
            if i == hidden:
                break
            if epsilon is not None:
                self.norms.append(keras.layers.BatchNormalization(epsilon=epsilon, name=f"norm_{i}"))
                self.acts.append(keras.layers.Activation(activation, name=f"activation_{i}"))
            self.dropouts.append(keras.layers.Multiply(name=f"dropout_{i}"))

    def build(self, input_shape=None):
        for i, (dense, units) in enumerate(zip(self.dense, self.sizes[1:])):
            dense.build((None, self.sizes[i]))
            if i < len(self.norms):
                self.norms[i].build((None, units))

    def call(self, x, masks=None, training=None):
        h = x
        for i, dense in enumerate(self.dense):
            h = dense(h)
            if i == len(self.dense) - 1:
                break
            if self.norms:
                h = self.acts[i](self.norms[i](h, training=training))
            if masks:
                h = self.dropouts[i]([h, masks[i]])
        return h


def _mlp(spec: MLP, model: dict) -> KerasMLP:
    norm = model.get("batchnorm")
    mlp = KerasMLP(spec.sizes, spec.activation, float(norm["epsilon"]) if norm else None, name="mlp")
    mlp.build((None, spec.sizes[0]))
    return mlp


def _cnn(spec: CNN, opts: dict) -> keras.Model:
    """Conv2D + activation per convolution, MaxPooling2D(2, 2) "valid", Flatten (H, W, C order), Dense."""
    image = keras.Input(shape=spec.image, name="image")  # dtype floatx: the job's
    h = image
    for i, (filters, stride) in enumerate(zip(spec.channels, spec.strides)):
        h = _conv(filters, spec.kernel_size, stride, opts, i, h)
        h = _activation(spec.activation, opts["gelu"], f"act_{i}")(h)
    h = keras.layers.MaxPooling2D(2, 2, padding="valid", data_format="channels_last", name="pool")(h)
    h = keras.layers.Flatten(data_format="channels_last", name="flatten")(h)
    logits = keras.layers.Dense(spec.num_classes, name="dense")(h)
    return keras.Model(image, logits, name="cnn")


class PositionEmbedding(keras.layers.Layer):
    """A learned (seq_len, width) table added to its input, position t's row to the t-th step (the first T
    rows when the input has T steps)."""

    def __init__(self, seq_len: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.seq_len, self.width = seq_len, width

    def build(self, input_shape):
        # "embeddings", as keras.layers.Embedding names its table.
        self.embeddings = self.add_weight(shape=(self.seq_len, self.width), initializer="random_uniform",
                                          name="embeddings")

    def call(self, inputs):
        return inputs + self.embeddings[: inputs.shape[1]]


class CausalSelfAttention(keras.layers.Layer):
    """Causal multi-head self-attention with separate ``query``/``key``/``value``/``out`` Dense projections
    (width -> width, with bias); head h uses the columns h*D .. (h+1)*D (D = width // heads), scores scaled
    by 1/sqrt(D), position t attending to 0..t.

    Written with ``keras.ops.einsum`` and ``softmax``, not ``keras.ops.dot_product_attention``: on Keras'
    jax and torch backends (keras 3.15) that returns float32 for float64 inputs, and ``keras.ops.matmul``
    does on torch, while these ops keep float64 on all three backends.
    """

    def __init__(self, width: int, heads: int, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads = width, heads
        self.query, self.key, self.value, self.out = (keras.layers.Dense(width, name=n)
                                                      for n in ("query", "key", "value", "out"))

    def build(self, input_shape):
        for dense in (self.query, self.key, self.value):
            dense.build(input_shape)
        self.out.build((*input_shape[:-1], self.width))

    def call(self, inputs):
        steps, depth = inputs.shape[1], self.width // self.heads

        def split(h):  # (N, T, width) -> (N, T, heads, D): the last axis's contiguous chunks
            return keras.ops.reshape(h, (-1, steps, self.heads, depth))

        q, k, v = split(self.query(inputs)), split(self.key(inputs)), split(self.value(inputs))
        scores = keras.ops.einsum("nthd,nshd->nhts", q, k) * (1.0 / math.sqrt(depth))
        causal = keras.ops.tril(keras.ops.ones((steps, steps), dtype="bool"))  # [t, s]: s <= t
        weights = keras.ops.softmax(keras.ops.where(causal, scores, float("-inf")), axis=-1)
        o = keras.ops.einsum("nhts,nshd->nthd", weights, v)
        return self.out(keras.ops.reshape(o, (-1, steps, self.width)))


def _sequence(spec: Sequence, opts: dict) -> keras.Model:
    """Token + position embeddings, a pre-LayerNorm block (attention, GELU MLP, both residual), ``ln_f``, ``head``."""
    eps = opts["layernorm_epsilon"]
    tokens = keras.Input(shape=(spec.seq_len,), dtype="int32", name="tokens")  # the session feeds int32 ids
    h = keras.layers.Embedding(spec.vocab, spec.width, name="embed")(tokens)
    h = PositionEmbedding(spec.seq_len, spec.width, name="pos")(h)
    a = keras.layers.LayerNormalization(epsilon=eps, name="ln1")(h)
    a = CausalSelfAttention(spec.width, spec.heads, name="attn")(a)
    h = keras.layers.Add(name="residual_1")([h, a])
    m = keras.layers.LayerNormalization(epsilon=eps, name="ln2")(h)
    m = keras.layers.Dense(spec.mlp_width, name="mlp_0")(m)
    m = _activation("gelu", opts["gelu"], "mlp_gelu")(m)
    m = keras.layers.Dense(spec.width, name="mlp_1")(m)
    h = keras.layers.Add(name="residual_2")([h, m])
    h = keras.layers.LayerNormalization(epsilon=eps, name="ln_f")(h)
    logits = keras.layers.Dense(spec.vocab, name="head")(h)
    return keras.Model(tokens, logits, name="sequence")


def build(model: dict) -> keras.Model:
    """The built-in model ``model`` (a ``to_dict()``) as a built ``keras.Model`` in floatx (the layers in Keras'
    global dtype policy), with Keras' default initialization (the session overwrites it), computing with the
    settings resolved for Keras. MLP: features (N, F) float -> logits (N, classes), ``masks=`` optional (see
    ``KerasMLP``); CNN: images (N, H, W, C) float -> logits (N, classes); sequence: token ids (N, T) int32 ->
    logits (N, T, vocab)."""
    spec = model_from_dict(model)
    if isinstance(spec, MLP):
        return _mlp(spec, model)
    opts = LayerOptions.from_dict(model.get("options")).resolved("keras")
    if isinstance(spec, CNN):
        return _cnn(spec, opts)
    if isinstance(spec, Sequence):
        return _sequence(spec, opts)
    raise ValueError(f"keras has no built-in model kind {model.get('kind')!r}")


#: The Keras path of each canonical MLP parameter: (layer prefix, Keras' variable name) by canonical prefix and leaf.
_MLP = {("layers", "kernel"): ("dense", "kernel"), ("layers", "bias"): ("dense", "bias"),
        ("norms", "scale"): ("norm", "gamma"), ("norms", "bias"): ("norm", "beta")}
#: The Keras path prefix of each canonical layer name of the sequence model.
_SEQUENCE_LAYERS = {"embed": ("embed", _EMBEDDING), "pos": ("pos", _EMBEDDING), "block.ln1": ("ln1", _NORM),
                    "block.attn.query": ("attn/query", _DENSE), "block.attn.key": ("attn/key", _DENSE),
                    "block.attn.value": ("attn/value", _DENSE), "block.attn.out": ("attn/out", _DENSE),
                    "block.ln2": ("ln2", _NORM), "block.mlp.0": ("mlp_0", _DENSE), "block.mlp.1": ("mlp_1", _DENSE),
                    "ln_f": ("ln_f", _NORM), "head": ("head", _DENSE)}


def _native(canonical: str, kind: str) -> str:
    """The Keras path (``layer/variable``) of the variable ``build`` gives the canonical parameter."""
    prefix, _, leaf = canonical.rpartition(".")
    if kind == "mlp":  # layers.{i}.kernel -> mlp/dense_{i}/kernel; norms.{i}.scale -> mlp/norm_{i}/gamma
        group, _, index = prefix.partition(".")
        layer, variable = _MLP[group, leaf]
        return f"mlp/{layer}_{index}/{variable}"
    if kind == "cnn":  # conv.{i} -> conv_{i}; dense -> dense
        layer, names = prefix.replace(".", "_"), _DENSE
    else:
        layer, names = _SEQUENCE_LAYERS[prefix]
    return f"{layer}/{names[leaf]}"


def assignment(model: dict) -> dict[str, str]:
    """{native variable name (its Keras path, as the session names it): canonical name}, one entry per
    canonical parameter of ``model``."""
    spec = model_from_dict(model)
    if not isinstance(spec, (MLP, CNN, Sequence)):
        raise ValueError(f"keras has no built-in model kind {model.get('kind')!r} here")
    return {_native(name, spec.kind): name for name in spec.param_shapes()}
