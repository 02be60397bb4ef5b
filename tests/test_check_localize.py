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
