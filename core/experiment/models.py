"""Model architectures defined once, framework-neutral: parameter names and shapes.

Canonical layout (what every backend reads and returns): dense kernels are
``(in, out)`` (Keras and Flax layout; PyTorch's ``nn.Linear.weight`` is the
transpose), biases ``(out,)``, named ``layers.{i}.kernel`` / ``layers.{i}.bias``; a batch
normalization after hidden layer i has ``norms.{i}.scale`` / ``norms.{i}.bias``
(torch ``weight``/``bias``, Keras ``gamma``/``beta``, Flax ``scale``/``bias``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")
#: The CNN's activations: the MLP's and GELU (in the form ``LayerOptions.gelu``).
CNN_ACTIVATIONS = (*ACTIVATIONS, "gelu")
#: Batch normalization's epsilon, passed explicitly to every framework: the defaults differ
#: (torch and Flax 1e-5, Keras 1e-3), and a port that keeps each default is not the same model.
BATCHNORM_EPSILON = 1e-5


class _BuiltIn:
    """What every built-in model answers the same way (each defines ``param_shapes``)."""

    def num_params(self) -> int:
        return sum(int(math.prod(s)) for s in self.param_shapes().values())

    def loss_terms(self) -> int:
        """Loss terms per example (its mean-reduced loss averages this many)."""
        return 1


@dataclass(frozen=True)
class MLP(_BuiltIn):
    """A multilayer perceptron: Dense -> activation -> ... -> Dense (logits).

    ``sizes`` lists every width from the input features to the number of
    classes, e.g. ``(64, 32, 10)`` is one hidden layer of 32 units. The
    activation follows every layer but the last. With ``batchnorm`` a batch
    normalization (training mode, epsilon ``BATCHNORM_EPSILON``) sits between
    every hidden layer and its activation.
    """

    sizes: tuple[int, ...]
    activation: str
    batchnorm: bool = False

    kind = "mlp"

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self.sizes[1:-1])

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names mapped to shapes, in layer order."""
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            shapes[f"layers.{i}.kernel"] = (fan_in, fan_out)
            shapes[f"layers.{i}.bias"] = (fan_out,)
            if self.batchnorm and i < self.num_layers - 1:
                shapes[f"norms.{i}.scale"] = (fan_out,)
                shapes[f"norms.{i}.bias"] = (fan_out,)
        return shapes

    def widths(self) -> tuple[int, ...]:
        """Every layer width (the lengths of the dot products, and the classes)."""
        return tuple(self.sizes)

    @property
    def depth(self) -> int:
        return self.num_layers

    @property
    def num_classes(self) -> int:
        return self.sizes[-1]

    def describe(self) -> str:
        norm = f", batch norm (training mode, eps {BATCHNORM_EPSILON:g})" if self.batchnorm else ""
        return f"mlp {'-'.join(map(str, self.sizes))} {self.activation}{norm}"

    def to_dict(self) -> dict:
        d = {"kind": "mlp", "sizes": list(self.sizes), "activation": self.activation}
        if self.batchnorm:
            d["batchnorm"] = {"epsilon": BATCHNORM_EPSILON, "mode": "training"}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MLP":
        return cls(tuple(int(s) for s in d["sizes"]), str(d["activation"]), bool(d.get("batchnorm")))


# --- Layer options whose defaults differ between frameworks -------------------------------------------

GELU_FORMS = ("exact", "tanh")
PADDINGS = ("same", "valid")
#: "explicit": every framework is given the same values (``LayerOptions``); "framework": each framework
#: keeps its own default, as a port that never sets them does (``FRAMEWORK_DEFAULTS``).
LAYER_DEFAULTS = ("explicit", "framework")
#: Where "same" padding puts an odd total: "end" (TensorFlow / XLA "SAME": the extra row or column at the
#: bottom / right) or "symmetric" (k // 2 on both sides: torch's idiom, since torch refuses
#: padding="same" with a stride above 1). They differ only when the total is odd (e.g. stride 2 on an
#: even size).
SAME_PADDING_FORMS = ("end", "symmetric")

#: What a port gets when it sets nothing, read in each framework's source (torch 2.13, keras 3.15,
#: flax 0.12): ``nn.LayerNorm`` eps 1e-5, ``keras.layers.LayerNormalization`` epsilon 1e-3,
#: ``nnx.LayerNorm`` epsilon 1e-6; ``nn.GELU()`` exact, ``keras.activations.gelu`` (a layer's
#: activation="gelu") exact, ``nnx.gelu`` / ``jax.nn.gelu`` tanh-approximate; a stride-2 "same"
#: convolution written in torch as ``padding=k // 2`` (symmetric), in Keras and Flax as "same" (end).
FRAMEWORK_DEFAULTS = {
    "torch": {"gelu": "exact", "layernorm_epsilon": 1e-5, "same_padding": "symmetric"},
    "keras": {"gelu": "exact", "layernorm_epsilon": 1e-3, "same_padding": "end"},
    "jax": {"gelu": "tanh", "layernorm_epsilon": 1e-6, "same_padding": "end"},
}


@dataclass(frozen=True)
class LayerOptions:
    """The layer settings a port must match, explicit and recorded in every report.

    With ``defaults = "explicit"`` every backend uses exactly these values (the
    numpy reference always does). With ``defaults = "framework"`` each framework
    uses its own defaults instead (``FRAMEWORK_DEFAULTS``), to show what leaving
    them unset costs; the reference still computes these values.
    """

    defaults: str = "explicit"
    gelu: str = "exact"
    layernorm_epsilon: float = 1e-5
    padding: str = "same"

    def resolved(self, framework: str | None) -> dict:
        """The settings ``framework`` ('torch', 'keras', 'jax'; None or 'numpy': the reference) computes with:
        ``gelu``, ``layernorm_epsilon``, ``padding`` and ``same_padding`` (see SAME_PADDING_FORMS)."""
        out = {"gelu": self.gelu, "layernorm_epsilon": self.layernorm_epsilon, "padding": self.padding,
               "same_padding": "end"}
        if self.defaults == "framework" and framework in FRAMEWORK_DEFAULTS:
            out.update(FRAMEWORK_DEFAULTS[framework])
        return out

    def to_dict(self) -> dict:
        return {"defaults": self.defaults, "gelu": self.gelu, "layernorm_epsilon": self.layernorm_epsilon,
                "padding": self.padding}

    @classmethod
    def from_dict(cls, d: dict | None) -> "LayerOptions":
        d = d or {}
        return cls(str(d.get("defaults", "explicit")), str(d.get("gelu", "exact")),
                   float(d.get("layernorm_epsilon", 1e-5)), str(d.get("padding", "same")))


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """Spatial output size of a convolution: ceil(size / stride) for "same", else floor((size - k) / s) + 1."""
    if padding == "same":
        return -(-size // stride)
    return (size - kernel) // stride + 1


def same_padding(size: int, kernel: int, stride: int, form: str = "end") -> tuple[int, int]:
    """(before, after) zero rows of a "same" convolution along one axis; ``form`` as in SAME_PADDING_FORMS."""
    if form == "symmetric":
        return kernel // 2, kernel // 2
    total = max((conv_output_size(size, kernel, stride, "same") - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@dataclass(frozen=True)
class CNN(_BuiltIn):
    """A small convolutional classifier on channels-last images (N, H, W, C).

    For each i: ``conv.{i}`` (kernel (k, k, c_in, c_out) HWIO, bias (c_out,), stride ``strides[i]``,
    ``options.padding``) then the activation; then a 2x2 max pooling with stride 2 ("valid": a last odd
    row / column is dropped); then the pooled (H', W', C') map flattened in channels-last order and
    ``dense`` (kernel (H'*W'*C', classes), bias (classes,)) to the logits (N, classes). With
    activation "gelu" the GELU form is ``options.gelu``.
    """

    image: tuple[int, int, int]          # (H, W, C)
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    kernel_size: int
    activation: str
    num_classes: int
    options: LayerOptions = LayerOptions()

    kind = "cnn"

    def feature_sizes(self) -> list[tuple[int, int]]:
        """(H, W) after each convolution, then after the pooling."""
        h, w = self.image[:2]
        out = []
        for s in self.strides:
            h = conv_output_size(h, self.kernel_size, s, self.options.padding)
            w = conv_output_size(w, self.kernel_size, s, self.options.padding)
            out.append((h, w))
        out.append((h // 2, w // 2))
        return out

    @property
    def flat_features(self) -> int:
        h, w = self.feature_sizes()[-1]
        return h * w * self.channels[-1]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        c_in = self.image[2]
        for i, c_out in enumerate(self.channels):
            shapes[f"conv.{i}.kernel"] = (self.kernel_size, self.kernel_size, c_in, c_out)
            shapes[f"conv.{i}.bias"] = (c_out,)
            c_in = c_out
        shapes["dense.kernel"] = (self.flat_features, self.num_classes)
        shapes["dense.bias"] = (self.num_classes,)
        return shapes

    def widths(self) -> tuple[int, ...]:
        """The lengths of the dot products in a forward pass (each convolution's window, the dense layer)."""
        c_in = (self.image[2], *self.channels[:-1])
        return (*(self.kernel_size ** 2 * c for c in c_in), self.flat_features, self.num_classes)

    @property
    def depth(self) -> int:
        return len(self.channels) + 1

    def describe(self) -> str:
        convs = ", ".join(f"conv {self.kernel_size}x{self.kernel_size}x{c} stride {s}"
                          for c, s in zip(self.channels, self.strides))
        return (f"cnn {'x'.join(map(str, self.image))} -> {convs} ({self.options.padding}), {self.activation}, "
                f"maxpool 2x2, dense {self.num_classes}")

    def to_dict(self) -> dict:
        return {"kind": "cnn", "image": list(self.image), "channels": list(self.channels),
                "strides": list(self.strides), "kernel_size": self.kernel_size, "activation": self.activation,
                "num_classes": self.num_classes, "options": self.options.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "CNN":
        return cls(tuple(int(v) for v in d["image"]), tuple(int(v) for v in d["channels"]),
                   tuple(int(v) for v in d["strides"]), int(d["kernel_size"]), str(d["activation"]),
                   int(d["num_classes"]), LayerOptions.from_dict(d.get("options")))


@dataclass(frozen=True)
class Sequence(_BuiltIn):
    """A one-block pre-LayerNorm transformer over token ids (N, T) giving logits (N, T, vocab).

    ``h = embed.embedding[x] + pos.embedding[:T]``;
    ``h += attn(ln1(h))`` with ``block.attn.{query,key,value,out}`` dense (width, width) kernels and
    biases, ``heads`` heads of width // heads, scores scaled by 1/sqrt(width // heads), causal (position t
    attends to 0..t), the heads concatenated in order before ``out``;
    ``h += mlp.1(gelu(mlp.0(ln2(h))))`` (``block.mlp.0`` (width, mlp_width), ``block.mlp.1`` (mlp_width,
    width)); logits ``= head(ln_f(h))`` (``head`` (width, vocab)). Every LayerNorm normalizes the last
    axis with the biased variance and ``options.layernorm_epsilon``, then scale and bias; GELU is
    ``options.gelu``. The targets are (N, T) token ids; the mean loss averages N*T terms.
    """

    vocab: int
    seq_len: int
    width: int
    heads: int
    mlp_width: int
    options: LayerOptions = LayerOptions()

    kind = "sequence"
    num_classes = property(lambda self: self.vocab)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        e, f = self.width, self.mlp_width
        shapes: dict[str, tuple[int, ...]] = {"embed.embedding": (self.vocab, e), "pos.embedding": (self.seq_len, e),
                                              "block.ln1.scale": (e,), "block.ln1.bias": (e,)}
        for proj in ("query", "key", "value", "out"):
            shapes[f"block.attn.{proj}.kernel"] = (e, e)
            shapes[f"block.attn.{proj}.bias"] = (e,)
        shapes.update({"block.ln2.scale": (e,), "block.ln2.bias": (e,),
                       "block.mlp.0.kernel": (e, f), "block.mlp.0.bias": (f,),
                       "block.mlp.1.kernel": (f, e), "block.mlp.1.bias": (e,),
                       "ln_f.scale": (e,), "ln_f.bias": (e,),
                       "head.kernel": (e, self.vocab), "head.bias": (self.vocab,)})
        return shapes

    def loss_terms(self) -> int:
        return self.seq_len

    def widths(self) -> tuple[int, ...]:
        return (self.width, self.mlp_width, self.seq_len, self.vocab)

    @property
    def depth(self) -> int:
        return 8  # ln1, q/k/v, scores, softmax-weighted sum, out, ln2, mlp (2), ln_f, head: dot products in series

    def describe(self) -> str:
        return (f"sequence transformer (vocab {self.vocab}, T {self.seq_len}, width {self.width}, "
                f"{self.heads} heads, mlp {self.mlp_width}, causal)")

    def to_dict(self) -> dict:
        return {"kind": "sequence", "vocab": self.vocab, "seq_len": self.seq_len, "width": self.width,
                "heads": self.heads, "mlp_width": self.mlp_width, "options": self.options.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Sequence":
        return cls(int(d["vocab"]), int(d["seq_len"]), int(d["width"]), int(d["heads"]), int(d["mlp_width"]),
                   LayerOptions.from_dict(d.get("options")))


MODEL_KINDS = ("mlp", "cnn", "sequence")


def model_from_dict(d: dict):
    """The model a job's ``model`` dict describes (its ``kind``)."""
    return {"mlp": MLP, "cnn": CNN, "sequence": Sequence}[d.get("kind", "mlp")].from_dict(d)

#: Any built-in model.
Model = MLP | CNN | Sequence
