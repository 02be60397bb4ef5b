"""``gradparity check`` on models called with several named inputs and returning a dict, in every framework.

tests/port_models/tagger_*.py are one token tagger written as users write it in each framework: token ids and a
padding mask as two keyword arguments, ``{"logits", "hidden"}`` as the output, the head tied to the embedding
(torch assigns the Parameter, Keras and TF-Keras read the embedding layer's variable, Flax ``attend``s), in
torch, Keras 3 (functional, named Inputs), TF-Keras 2 (subclassed), Flax NNX and Flax linen (a module with its
``init`` variables). The targets ignore the padded positions (-100), unevenly across examples.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradparity.commands.check import compare_models
from gradparity.errors import ConfigError

PATH = [str(Path(__file__).resolve().parent / "port_models")]
RNG = np.random.default_rng(0)
IDS = RNG.integers(0, 13, size=(5, 7))
MASK = (RNG.random((5, 7)) > 0.2).astype(np.int64)
TAGS = np.where(MASK > 0, RNG.integers(0, 13, size=(5, 7)), -100)
BATCH = {"ids": IDS, "mask": MASK, "tags": TAGS}
NAMED = dict(batch=BATCH, inputs={"token_ids": "ids", "mask": "mask"}, targets="tags", output="logits",
             sys_path=PATH)


@pytest.mark.frameworks("torch", "keras-tensorflow", "tf-keras", "jax")
def test_a_two_input_dict_output_model_agrees_in_every_framework():
    r = compare_models(torch="tagger_torch:Tagger", keras="tagger_keras:tagger", tf_keras="tagger_tf_keras:tagger",
                       jax="tagger_flax:nnx_tagger", dtype="float64", **NAMED)
    assert [o.status for o in r.outcomes] == ["ok"] * 4, [o.error for o in r.outcomes]
    assert r.verdict.status == "agree", r.verdict.summary
    assert max(c.max_rel for c in r.comparisons) < 1e-12  # float64: rounding only
    # The loss averages the 31 positions that are not padding, every method scaled to that mean.
    assert r.loss_elements == int((TAGS != -100).sum()) == 31
    losses = [res.loss for res in r.results]
    assert max(losses) - min(losses) < 1e-12
    # Padding is spread unevenly (5, 7, 6, 7, 6 tokens): one_by_one would weigh them otherwise, so it is not run.
    assert {res.method for res in r.results} == {"mean", "sum", "none_loop"}
    assert any("one_by_one is not run" in line for line in r.verdict.explanation)
    # The tied head: one tensor in torch (its second name an alias), mapped once into every port.
    embed = next(p for layer in r.layouts["torch"].layers for p in layer["params"] if p["name"] == "embed.weight")
    assert embed.get("aliases") == ["head.weight"]
    for fw in ("keras", "tf_keras", "jax"):
        assert sorted(r.maps[fw].assign.values()) == sorted(
            ["embed.weight", "mix.weight", "mix.bias", "norm.weight", "norm.bias", "head.bias"])


@pytest.mark.frameworks("torch", "jax")
def test_a_flax_linen_module_with_its_variables_is_checked_like_any_port():
    r = compare_models(torch="tagger_torch:Tagger", jax="tagger_flax:linen_tagger", dtype="float64",
                       localize="always", **NAMED)
    assert r.verdict.status == "agree", r.verdict.summary
    assert max(c.max_rel for c in r.comparisons) < 1e-12
    assign = r.maps["jax"].assign
    assert assign["embed.embedding"] == "embed.weight" and assign["mix.kernel"] == "mix.weight"
    # Localization runs on linen too: every parameterized layer's activations were captured and agree.
    loc = r.localizations[0]
    assert loc.first_layer is None and {c.layer for c in loc.checkpoints} >= {"mix", "norm", "logits"}


@pytest.mark.frameworks("torch")
def test_an_output_path_that_leads_nowhere_is_exit_2_naming_what_the_output_holds():
    with pytest.raises(ConfigError) as err:
        compare_models(torch="tagger_torch:Tagger", **{**NAMED, "output": "scores"})
    assert "'scores'" in str(err.value) and "logits" in str(err.value) and "hidden" in str(err.value)
    # Without a path, a dict holding "logits" is read there.
    r = compare_models(torch="tagger_torch:Tagger", **{**NAMED, "output": None}, methods=["mean", "sum"])
    assert r.verdict.exit_code == 0 and all(res.ok for res in r.results)


def test_bad_named_inputs_are_exit_2_before_any_worker():
    with pytest.raises(ConfigError, match="has no array 'segments'"):
        compare_models(torch="tagger_torch:Tagger", **{**NAMED, "inputs": {"token_ids": "ids", "mask": "segments"}})
    with pytest.raises(ConfigError, match="one_by_one averages each example's mean"):
        compare_models(torch="tagger_torch:Tagger", methods=["mean", "one_by_one"], **NAMED)
    with pytest.raises(ConfigError, match="negative class -3"):
        compare_models(torch="tagger_torch:Tagger", **{**NAMED, "batch": {**BATCH, "tags": np.where(TAGS == -100, -3,
                                                                                                    TAGS)}})
    with pytest.raises(ConfigError, match="causal_lm compares the logits at position t"):
        compare_models(torch="tagger_torch:Tagger", loss="causal_lm",
                       **{**NAMED, "batch": {**BATCH, "tags": TAGS[:, 0]}})
