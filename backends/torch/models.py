"""PyTorch: the built-in models (``gradparity.experiment.models``: the MLP, the CNN, the sequence model) as torch
users write them.

Run by the model session (``session.py``, payload "builtin") and the trainer (``train.py``): the session moves
the module to the job's device and dtype, loads the canonical weights through ``assignment`` (transposing
Linear and conv kernels) and feeds images as (N, C, H, W). The layer settings of the CNN and the sequence
model are the ones core resolved for torch (``LayerOptions.resolved("torch")``): explicit values, or torch's
own defaults.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradparity.experiment.models import CNN, MLP, LayerOptions, Sequence, model_from_dict, same_padding

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity}


def _activation(name: str, gelu: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
    return _ACTIVATIONS[name]()


class TorchMLP(nn.Module):
    """``layers`` (nn.Linear), the activation after all but the last, a BatchNorm1d (``norms``, when ``eps`` is
    given) before every hidden activation; ``forward(x, masks)`` multiplies hidden activation i by ``masks[i]``
    (the switch 'dropout' with core's masks: torch's own generator could not be compared with other
    frameworks'). No masks: the plain forward pass.

    In training mode (the session's mode "training", which core sets with batch normalization) the
    normalizations use the batch's statistics.
    """

    def __init__(self, sizes, activation: str, eps: float | None):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = None if eps is None else nn.ModuleList(nn.BatchNorm1d(width, eps=eps) for width in sizes[1:-1])
        self.activation = _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = self.activation(x)
                if masks is not None:
                    x = x * masks[i]
        return x


class SamePadConv2d(nn.Conv2d):
    """A "same" convolution with the odd extra zero row / column at the bottom / right (TensorFlow's and
    XLA's rule), padded explicitly: torch's ``padding="same"`` refuses a stride above 1, and its idiom for
    that case, ``padding=k // 2``, pads symmetrically (the "symmetric" form)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        top, bottom = same_padding(x.shape[-2], kh, sh, "end")
        left, right = same_padding(x.shape[-1], kw, sw, "end")
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _conv(c_in: int, c_out: int, k: int, stride: int, opts: dict) -> nn.Conv2d:
    if opts["padding"] == "valid":
        return nn.Conv2d(c_in, c_out, k, stride)
    if stride == 1 and k % 2 == 1:
        return nn.Conv2d(c_in, c_out, k, stride, padding="same")  # symmetric and end coincide here
    if opts["same_padding"] == "symmetric":
        return nn.Conv2d(c_in, c_out, k, stride, padding=k // 2)
    return SamePadConv2d(c_in, c_out, k, stride)


class TorchCNN(nn.Module):
    """``conv`` (Conv2d + activation each), MaxPool2d(2), the map flattened channels-last, ``dense``."""

    def __init__(self, spec: CNN, opts: dict):
        super().__init__()
        widths = (spec.image[2], *spec.channels)
        self.conv = nn.ModuleList(_conv(a, b, spec.kernel_size, s, opts)
                                  for a, b, s in zip(widths[:-1], widths[1:], spec.strides))
        self.act = _activation(spec.activation, opts["gelu"])
        self.pool = nn.MaxPool2d(2, 2)
        self.dense = nn.Linear(spec.flat_features, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.conv:
            x = self.act(conv(x))
        x = self.pool(x)
        # Canonical dense kernels read the map in (H, W, C) order, as Keras and Flax flatten it.
        return self.dense(x.permute(0, 2, 3, 1).flatten(1))


class Attention(nn.Module):
    """Causal multi-head self-attention with separate query / key / value / out projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, e = x.shape

        def split(h):  # (N, T, E) -> (N, heads, T, D): head h is columns h*D .. (h+1)*D
            return h.view(n, t, self.heads, e // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                           is_causal=True)  # scale 1/sqrt(D) by default
        return self.out(o.transpose(1, 2).reshape(n, t, e))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp.1(gelu(mlp.0(ln2(x))))``."""

    def __init__(self, spec: Sequence, opts: dict):
        super().__init__()
        eps = opts["layernorm_epsilon"]
        self.ln1 = nn.LayerNorm(spec.width, eps=eps)
        self.attn = Attention(spec.width, spec.heads)
        self.ln2 = nn.LayerNorm(spec.width, eps=eps)
        self.mlp = nn.ModuleList([nn.Linear(spec.width, spec.mlp_width), nn.Linear(spec.mlp_width, spec.width)])
        self.act = _activation("gelu", opts["gelu"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp[1](self.act(self.mlp[0](self.ln2(x))))


class TorchSequence(nn.Module):
    """Token and learned position embeddings, one ``block``, ``ln_f`` and the ``head``: (N, T) -> (N, T, vocab)."""

    def __init__(self, spec: Sequence, opts: dict):
        super().__init__()
        self.embed = nn.Embedding(spec.vocab, spec.width)
        self.pos = nn.Embedding(spec.seq_len, spec.width)
        self.block = Block(spec, opts)
        self.ln_f = nn.LayerNorm(spec.width, eps=opts["layernorm_epsilon"])
        self.head = nn.Linear(spec.width, spec.vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head(self.ln_f(self.block(h)))


def build(model: dict) -> nn.Module:
    """The built-in model ``model`` (a ``to_dict()``) as an ``nn.Module`` with torch's default initialization
    (the session overwrites it), computing with the settings resolved for torch."""
    spec = model_from_dict(model)
    if isinstance(spec, MLP):
        norm = model.get("batchnorm")
        return TorchMLP(spec.sizes, spec.activation, float(norm["epsilon"]) if norm else None)
    opts = LayerOptions.from_dict(model.get("options")).resolved("torch")
    if isinstance(spec, CNN):
        return TorchCNN(spec, opts)
    if isinstance(spec, Sequence):
        return TorchSequence(spec, opts)
    raise ValueError(f"torch has no built-in model kind {model.get('kind')!r}")


def assignment(model: dict) -> dict[str, str]:
    """{torch parameter name: canonical name}: a kernel, a LayerNorm or BatchNorm scale or an embedding is torch's
    ``weight``."""
    out = {}
    for name in model_from_dict(model).param_shapes():
        prefix, _, leaf = name.rpartition(".")
        out[f"{prefix}.{'bias' if leaf == 'bias' else 'weight'}"] = name
    return out
