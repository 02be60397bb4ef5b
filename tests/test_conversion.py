"""Checking a weight conversion by value (``weights = "own"``): pure numpy, no framework.

The layouts are built by hand the way the backends describe a two-block GPT-2-like model: torch stores
Hugging Face's Conv1D kernels (in, out), a Flax port stores them (out, in) when its describe leaves them so, a
TF port stores biases (1, n), and one port keeps the fused attention kernel as (3, heads, d/heads, d). Biases
start at zero and layer-norm scales at one, as freshly initialized models have them, so several tensors share
their values and only the call order can pair them.
"""
from __future__ import annotations

import numpy as np
import pytest

from gradparity.experiment.conversion import convert_check, paired_gradients
from gradparity.experiment.weights import ModelLayout

D, H, V = 8, 2, 11


def _layout(backend, layers):
    return ModelLayout(backend, tuple({"name": name, "type": typ, "called": True, "fused_activation": False,
                                       "params": [{"name": f"{name}.{p}", "role": role, "shape": list(shape),
                                                   "trainable": True} for p, role, shape in params]}
                                      for name, typ, params in layers), (), (2, 5, V))


def torch_side(rng):
    """Parameter values and layout of the source, as torch's describe gives them (canonical)."""
    layers, values = [("wte", "Embedding", [("weight", "embedding", (V, D))])], {"wte.weight": rng.normal(size=(V, D))}
    for i in range(2):
        for name, typ, params in (
                (f"h.{i}.ln_1", "LayerNorm", [("weight", "scale", (D,)), ("bias", "bias", (D,))]),
                (f"h.{i}.attn.c_attn", "Conv1D", [("weight", "kernel", (D, 3 * D)), ("bias", "bias", (3 * D,))]),
                (f"h.{i}.attn.c_proj", "Conv1D", [("weight", "kernel", (D, D)), ("bias", "bias", (D,))])):
            layers.append((name, typ, params))
            for p, role, shape in params:
                values[f"{name}.{p}"] = (np.ones(shape) if role == "scale" else np.zeros(shape) if role == "bias"
                                         else rng.normal(size=shape))
    return _layout("torch", layers), values


def port_side(src_values, bugs=()):
    """The same model as a port stores it: attention kernels (out, in) (Flax's Conv1D), biases (1, n) (TF), the
    second block's fused kernel as (3, H, D/H, D) (the heads split out of the out axis); its own names; ``bugs``
    planted by a 'converter'."""
    layers, values = [("transformer.wte", "Embed", [("embedding", "embedding", (V, D))])], {}
    values["transformer.wte.embedding"] = src_values["wte.weight"]
    for i in range(2):
        src = f"h.{i}"
        fused = (3, H, D // H, D) if i == 1 else (3 * D, D)
        layers += [(f"transformer.h.{i}.ln_1", "LayerNorm", [("scale", "scale", (D,)), ("bias", "bias", (1, D))]),
                   (f"transformer.h.{i}.attn.c_attn", "FlaxConv1D", [("kernel", "kernel", fused),
                                                                      ("bias", "bias", (1, 3 * D))]),
                   (f"transformer.h.{i}.attn.c_proj", "FlaxConv1D", [("kernel", "kernel", (D, D)),
                                                                      ("bias", "bias", (1, D))])]
        t = f"transformer.h.{i}"
        values[f"{t}.ln_1.scale"] = src_values[f"{src}.ln_1.weight"]
        values[f"{t}.ln_1.bias"] = src_values[f"{src}.ln_1.bias"][None]
        c_attn = src_values[f"{src}.attn.c_attn.weight"]
        values[f"{t}.attn.c_attn.kernel"] = c_attn.T.reshape(fused)
        values[f"{t}.attn.c_attn.bias"] = src_values[f"{src}.attn.c_attn.bias"][None]
        values[f"{t}.attn.c_proj.kernel"] = src_values[f"{src}.attn.c_proj.weight"].T  # (out, in), square
        values[f"{t}.attn.c_proj.bias"] = src_values[f"{src}.attn.c_proj.bias"][None]
    for name, change in bugs:
        values[name] = change(values[name])
    return _layout("jax", layers), {k: np.ascontiguousarray(v) for k, v in values.items()}


def test_an_exact_conversion_pairs_every_tensor_once_through_its_layout():
    rng = np.random.default_rng(0)
    src_layout, src = torch_side(rng)
    tgt_layout, tgt = port_side(src)
    c = convert_check(src_layout, tgt_layout, src, tgt)
    assert c.exact, c.problems
    assert len(c.pairs) == len(src) == len(tgt) and not c.source_only and not c.target_only
    assign = {p.target: p.source for p in c.pairs}
    assert len(set(assign.values())) == len(assign)  # each source tensor used once
    # Zero biases and unit scales share their values: the call order pairs block 0 with block 0, and roles stay apart.
    assert assign["transformer.h.1.ln_1.bias"] == "h.1.ln_1.bias"
    assert assign["transformer.h.0.attn.c_proj.bias"] == "h.0.attn.c_proj.bias"
    assert assign["transformer.h.1.ln_1.scale"] == "h.1.ln_1.weight"
    by = {p.target: p for p in c.pairs}
    assert by["transformer.h.0.attn.c_attn.kernel"].layout.describe() == "transposed"
    assert by["transformer.h.1.attn.c_attn.kernel"].layout.describe() == \
        "axes permuted [3, 0, 1, 2], reshaped [3, 2, 4, 8] -> [8, 24]"
    # A square kernel stored transposed like every other kernel of its kind is that framework's layout, no bug.
    assert by["transformer.h.0.attn.c_proj.kernel"].layout.describe() == "transposed"


def test_gradients_come_back_in_the_source_layout():
    rng = np.random.default_rng(1)
    src_layout, src = torch_side(rng)
    tgt_layout, tgt = port_side(src)
    c = convert_check(src_layout, tgt_layout, src, tgt)
    # A gradient has the layout of its tensor: store random source-layout gradients the port's way, and back.
    grads_src = {k: rng.normal(size=v.shape) for k, v in src.items()}
    _, grads_tgt = port_side(grads_src)
    back = paired_gradients(c, grads_tgt)
    assert set(back) == set(grads_src)
    for k in grads_src:
        np.testing.assert_array_equal(back[k], grads_src[k])


@pytest.mark.parametrize("bug, words", [
    (("transformer.h.1.attn.c_proj.kernel", lambda a: a.T), "did not transpose"),
    (("transformer.h.0.ln_1.scale", lambda a: 0.5 * a), "factor 0.5"),
    (("transformer.h.1.attn.c_attn.bias", lambda a: a + 1e-3), "values differ"),
])
def test_a_planted_converter_bug_is_named_at_its_tensor(bug, words):
    rng = np.random.default_rng(2)
    src_layout, src = torch_side(rng)
    # Non-zero biases, as a trained checkpoint has: values tell every tensor apart.
    src = {k: (v + rng.normal(scale=0.1, size=v.shape) if k.endswith("bias") else v) for k, v in src.items()}
    tgt_layout, tgt = port_side(src, [bug])
    c = convert_check(src_layout, tgt_layout, src, tgt)
    assert not c.exact
    assert len(c.problems) == 1, c.problems
    assert c.problems[0].startswith(f"jax:{bug[0]} <- ") and words in c.problems[0], c.problems
    assert len(c.pairs) == len(src)  # the buggy tensor is still paired, with its counterpart named


def test_a_tensor_the_port_lacks_is_named():
    rng = np.random.default_rng(3)
    src_layout, src = torch_side(rng)
    tgt_layout, tgt = port_side(src)
    tgt.pop("transformer.wte.embedding")
    tgt_layout = ModelLayout("jax", tgt_layout.layers[1:], (), tgt_layout.output_shape)
    c = convert_check(src_layout, tgt_layout, src, tgt)
    assert c.source_only == ["wte.weight"] and not c.exact
    assert "torch:wte.weight" in c.problems[0]
