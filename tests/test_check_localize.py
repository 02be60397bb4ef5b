"""What ``gradparity check`` says where a port parts: a parameter gradient that alone differs, and the source
framework as the reference of a two-framework check.

tests/port_models/bag_*.py is a bag-of-tokens classifier as users write it: torch's ``nn.Embedding(vocab, dim,
padding_idx=0)`` and its first Flax port with ``nnx.Embed``, which has no padding_idx. Their forward passes are
the same function; only the padding row's gradient differs (torch leaves it at zero).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradparity.commands.check import compare_models

PATH = [str(Path(__file__).resolve().parent / "port_models")]
RNG = np.random.default_rng(1)
TOKENS = RNG.integers(1, 11, size=(6, 5))
TOKENS[:, 3:] = 0  # the last two positions are padding, token 0
LABELS = RNG.integers(0, 5, size=6)


@pytest.fixture(scope="module")
def padding_idx():
    return compare_models(torch="bag_torch:Bag", jax="bag_flax:Bag", batch=(TOKENS, LABELS), dtype="float64",
                          sys_path=PATH)


@pytest.mark.frameworks("torch", "jax")
def test_a_parameter_gradient_that_alone_differs_is_named_with_its_rows(padding_idx):
    r = padding_idx
    assert r.exit_code == 1
    loc = r.localizations[0]
    # The forward passes and every incoming gradient agree: no forward or backward layer to name ...
    assert loc.first_layer is None and loc.backward_layer is None
    assert all(c.agree for c in loc.checkpoints)
    # ... but the embedding's own gradient differs, in the padding row only.
    assert loc.parameter_layer == "embed" and r.first_layer == "embed"
    assert [t["param"] for t in loc.parameter_tensors] == ["embed.weight"]
    assert loc.parameter_tensors[0]["rows"] == [0]
    # Independently: torch's gradient of row 0 is exactly zero, Flax's is not, every other row agrees.
    torch_g = next(res for res in r.results if res.backend == "torch" and res.method == "mean").grads["embed.weight"]
    jax_g = next(res for res in r.results if res.backend == "jax" and res.method == "mean").grads["embed.weight"]
    assert not torch_g[0].any() and np.abs(jax_g[0]).max() > 1e-3
    np.testing.assert_allclose(torch_g[1:], jax_g[1:], rtol=0, atol=1e-13)
    text = "\n".join(r.verdict.explanation)
    assert "padding_idx" in text and "rows [0] of 11" in text
    assert r.to_dict()["localization"]["by_backend"][0]["parameter_layer"] == "embed"


@pytest.mark.frameworks("torch", "jax")
def test_a_two_framework_disagreement_is_explained_against_the_source(padding_idx):
    text = "\n".join(padding_idx.verdict.explanation)
    assert "The reference is torch" in text and "No two results form a consensus" not in text
    single = compare_models(torch="bag_torch:Bag", jax="bag_flax:Bag", batch=(TOKENS, LABELS), dtype="float64",
                            sys_path=PATH, methods=["mean"])
    text = "\n".join(single.verdict.explanation)
    assert "The reference is torch, the framework the others are checked against (torch/mean)" in text
    assert "jax/mean: disagrees with the reference (torch)" in text
    assert "No two results form a consensus" not in text


@pytest.mark.frameworks("torch", "jax")
def test_a_layer_whose_output_shape_changed_is_named_not_skipped():
    """torch pads its convolution (20 steps out of 20), the Flax port does not ("VALID": 18): the mean over time
    hides the length, so the logits have one shape; the convolution's output is where the ports part."""
    x = np.random.default_rng(2).normal(size=(4, 20, 3))
    y = np.array([0, 1, 2, 3])
    r = compare_models(torch="conv1d_torch:Net", jax="conv1d_flax:Net", batch=(x, y), dtype="float64",
                       sys_path=PATH, methods=["mean"])
    loc = r.localizations[0]
    assert r.exit_code == 1 and loc.first_layer == "conv" and loc.where == "output"
    assert "[4, 18, 8] in jax against [4, 20, 8] in torch" in loc.explanation, loc.explanation
    assert loc.explanation in r.verdict.explanation


# --- What to change, tested on the captured arrays -------------------------------------------------------------

FEATURES = RNG.normal(size=(5, 6))
CLASSES = np.arange(5) % 4


def _check(torch_factory: str, port: str, x, y, framework: str = "jax", **kwargs):
    return compare_models(torch=torch_factory, **{framework: port}, batch=(x, y), dtype="float64", sys_path=PATH,
                          methods=["mean"], **kwargs)


@pytest.mark.frameworks("torch", "jax")
@pytest.mark.parametrize("factory, layer, port_eps", [
    ("layernorm_default", "norm", 1e-6),       # nnx.LayerNorm's default (Flax's documentation)
    ("batchnorm_keras_epsilon", "bn", 1e-3),   # Keras' BatchNormalization default, copied into the port
    ("layernorm_own_epsilon", "norm", 3e-4),   # no framework's default: fitted from the port's output
])
def test_a_normalization_epsilon_that_differs_is_named_with_its_value(factory, layer, port_eps):
    """torch's LayerNorm and BatchNorm1d use eps 1e-5; each port sets one normalization's epsilon otherwise."""
    r = _check("norm_torch:Net", f"norm_flax:{factory}", FEATURES, CLASSES)
    loc = r.localizations[0]
    assert r.exit_code == 1 and loc.first_layer == layer and loc.where == "output", loc.explanation
    assert f"normalizes with epsilon {port_eps:.3g} where torch's uses 1e-05" in loc.suggestion, loc.suggestion
    assert "epsilon=1e-05" in loc.suggestion and loc.suggestion in loc.explanation
    assert r.to_dict()["localization"]["by_backend"][0]["suggestion"] == loc.suggestion


@pytest.mark.frameworks("torch", "jax")
def test_a_flatten_in_the_other_channel_order_is_named():
    """torch's nn.Flatten flattens (N, C, H, W); the Flax port reshapes its (N, H, W, C) activation."""
    x = RNG.normal(size=(3, 4, 4, 1))
    r = _check("flatten_torch:Net", "flatten_flax:Net", x, np.arange(3))
    loc = r.localizations[0]
    assert r.exit_code == 1 and loc.at == "fc" and loc.where == "input", loc.explanation
    assert "flattens the (4, 4; 3 channels) activation before fc channels-last where torch flattens it " \
           "channels-first" in loc.suggestion, loc.suggestion
    assert "x.transpose(0, 3, 1, 2).reshape(n, -1)" in loc.suggestion


@pytest.mark.frameworks("torch", "jax")
def test_a_bias_that_is_not_added_is_named():
    """The port's hand-written dense layer holds the mapped bias but returns x @ kernel."""
    r = _check("bias_torch:Net", "bias_flax:Net", FEATURES, CLASSES)
    loc = r.localizations[0]
    assert r.exit_code == 1 and loc.first_layer == "hidden" and loc.where == "output", loc.explanation
    assert "jax's hidden does not add its bias: its output is torch's minus the bias" in loc.suggestion
    assert "use_bias=True" in loc.suggestion


@pytest.mark.frameworks("torch", "jax")
def test_asymmetric_same_padding_is_named_with_both_paddings():
    """torch's Conv2d(kernel 3, stride 2, padding=1) against Flax's padding="SAME" on 8 x 8: both give 4 x 4."""
    size, k, stride = 8, 3, 2
    out = -(-size // stride)
    total = (out - 1) * stride + k - size  # TensorFlow's 'SAME': the total padding, its extra half at the end
    same = (total // 2, total - total // 2)
    assert same != (1, 1) and (size + 2 - k) // stride + 1 == out  # the bug this test is about: same shape
    r = _check("padding_torch:Net", "padding_flax:Net", RNG.normal(size=(3, size, size, 2)), np.arange(3))
    loc = r.localizations[0]
    assert r.exit_code == 1 and loc.first_layer == "conv" and loc.where == "output", loc.explanation
    assert (f"pads its input (top {same[0]}, bottom {same[1]}, left {same[0]}, right {same[1]}) where torch's pads "
            "(top 1, bottom 1, left 1, right 1)") in loc.suggestion, loc.suggestion
    assert "padding=((1, 1), (1, 1))" in loc.suggestion


# --- A block's own computation (a residual), and the backward pass where it matters ----------------------------

@pytest.mark.frameworks("torch", "jax")
def test_a_residual_from_the_wrong_tensor_is_named_at_its_block():
    """Block 1 of the Flax port adds its residual to norm(x) instead of x: every layer inside agrees, the block's
    output does not. Before blocks were captured, the next (innocent) layer, head, was named."""
    r = _check("residual_torch:Net", "residual_flax:wrong_residual", FEATURES, CLASSES)
    loc = r.localizations[0]
    assert r.exit_code == 1 and loc.first_layer == "blocks.1" and loc.where == "output", loc.explanation
    by_point = {(c.layer, c.point): c for c in loc.checkpoints}
    assert by_point[("blocks.0", "output")].agree
    assert all(by_point[(f"blocks.1.{n}", p)].agree for n in ("norm", "fc1", "fc2") for p in ("input", "output"))
    assert not by_point[("blocks.1", "output")].agree
    assert "residual or skip connection" in loc.explanation and "head" not in loc.candidates
    assert loc.suggestion is None  # no setting of a layer reproduces a residual from another tensor: none claimed


@pytest.mark.frameworks("torch", "jax")
def test_a_faithful_residual_port_agrees_block_by_block():
    r = _check("residual_torch:Net", "residual_flax:faithful", FEATURES, CLASSES, localize="always")
    loc = r.localizations[0]
    assert r.exit_code == 0 and loc.first_layer is None
    blocks = [c for c in loc.checkpoints if c.layer in ("blocks.0", "blocks.1")]
    assert [c.layer for c in blocks] == ["blocks.0", "blocks.1"] and all(c.agree for c in blocks)


@pytest.mark.frameworks("torch", "keras-tensorflow")
def test_a_residual_from_the_wrong_tensor_is_named_at_its_keras_block():
    """The same bug in a Keras 3 port (a subclassed Layer holding three layers): blocks pair through their layers,
    whatever their names."""
    r = _check("residual_torch:Net", "residual_keras:wrong_residual", FEATURES, CLASSES, framework="keras")
    loc = r.localizations[0]
    assert r.exit_code == 1 and loc.first_layer == "blocks.1" and loc.where == "output", loc.explanation


@pytest.mark.frameworks("torch", "jax")
def test_a_port_masking_the_padding_gradient_the_usual_way_gets_no_backward_warning():
    """stop_gradient at the padding positions is what torch's padding_idx=0 does to the embedding's gradient: the
    gradient flowing into the embedding's output differs there, no parameter's gradient does."""
    r = compare_models(torch="bag_torch:Bag", jax="bag_flax_masked:masked", batch=(TOKENS, LABELS), dtype="float64",
                       sys_path=PATH, methods=["mean"], localize="always")
    loc = r.localizations[0]
    assert r.exit_code == 0 and loc.backward_layer is None and loc.parameter_layer is None
    assert not any("backward passes part" in line for line in r.verdict.explanation), r.verdict.explanation
    # The incoming gradients do differ (torch's is not masked where padding_idx drops it), and that is said.
    assert any(c.point == "grad_output" and c.layer == "embed" and not c.agree for c in loc.checkpoints)
    assert "no parameter's gradient differs with it" in loc.explanation


@pytest.mark.frameworks("torch", "jax")
def test_a_port_masking_a_real_token_gets_the_backward_warning():
    """Masking token 1 instead of 0: the forward passes agree, the embedding's gradient does not."""
    tokens = TOKENS.copy()
    tokens[:, 0] = 1  # token 1 in every example
    r = compare_models(torch="bag_torch:Bag", jax="bag_flax_masked:masked_wrong_token", batch=(tokens, LABELS),
                       dtype="float64", sys_path=PATH, methods=["mean"])
    loc = r.localizations[0]
    assert r.exit_code == 1 and loc.first_layer is None and loc.backward_layer == "embed"
    text = "\n".join(r.verdict.explanation)
    assert "the gradient flowing into embed's output differs" in text and "backward passes part there" in text
    # The parameter gradient that differs with it (it reaches the embedding): the split matters.
    assert "and with it the gradient of embed.weight" in text
