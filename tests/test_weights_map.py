"""Weight mapping by structure and localization of the first differing layer: pure numpy, no framework.

The layouts are what the backends' 'describe' case reports (canonical roles
and shapes, call order); the tests build them by hand the way torch, Keras and
Flax name the same small CNN.
"""
from __future__ import annotations

import numpy as np
import pytest

from gradparity.compare.localize import localize, relative_gap
from gradparity.experiment.weights import MappingError, ModelLayout, map_weights


def layer(name, type_, *params, called=True, fused=False):
    return {"name": name, "type": type_, "called": called, "fused_activation": fused,
            "params": [{"name": f"{name}{sep}{p}", "role": role, "shape": list(shape), "trainable": role not in
                        ("mean", "var")} for sep, p, role, shape in params]}


def torch_cnn() -> ModelLayout:
    t = "."
    layers = [layer("features.0", "Conv2d", (t, "weight", "kernel", (3, 3, 1, 8)), (t, "bias", "bias", (8,))),
              layer("features.3", "Conv2d", (t, "weight", "kernel", (3, 3, 8, 16)), (t, "bias", "bias", (16,))),
              layer("classifier.1", "Linear", (t, "weight", "kernel", (64, 32)), (t, "bias", "bias", (32,))),
              layer("classifier.2", "LayerNorm", (t, "weight", "scale", (32,)), (t, "bias", "bias", (32,))),
              layer("classifier.4", "Linear", (t, "weight", "kernel", (32, 10)), (t, "bias", "bias", (10,)))]
    calls = [("features.0", "Conv2d"), ("features.1", "GELU"), ("features.2", "MaxPool2d"),
             ("features.3", "Conv2d"), ("features.4", "GELU"), ("classifier.0", "Flatten"),
             ("classifier.1", "Linear"), ("classifier.2", "LayerNorm"), ("classifier.3", "GELU"),
             ("classifier.4", "Linear")]
    return ModelLayout("torch", tuple(layers), tuple(calls), (4, 10))


def flax_cnn() -> ModelLayout:
    """Flax lists bias before kernel and its state alphabetically; the call order is what pairs layers."""
    t = "."
    layers = [layer("conv1", "Conv", (t, "bias", "bias", (8,)), (t, "kernel", "kernel", (3, 3, 1, 8))),
              layer("conv2", "Conv", (t, "bias", "bias", (16,)), (t, "kernel", "kernel", (3, 3, 8, 16))),
              layer("fc1", "Linear", (t, "bias", "bias", (32,)), (t, "kernel", "kernel", (64, 32))),
              layer("norm", "LayerNorm", (t, "bias", "bias", (32,)), (t, "scale", "scale", (32,))),
              layer("fc2", "Linear", (t, "bias", "bias", (10,)), (t, "kernel", "kernel", (32, 10)))]
    calls = [(la["name"], la["type"]) for la in layers]
    return ModelLayout("jax", tuple(layers), tuple(calls), (4, 10))


def keras_cnn() -> ModelLayout:
    s = "/"
    layers = [layer("conv2d", "Conv2D", (s, "kernel", "kernel", (3, 3, 1, 8)), (s, "bias", "bias", (8,)), fused=True),
              layer("conv2d_1", "Conv2D", (s, "kernel", "kernel", (3, 3, 8, 16)), (s, "bias", "bias", (16,)),
                    fused=True),
              layer("dense", "Dense", (s, "kernel", "kernel", (64, 32)), (s, "bias", "bias", (32,))),
              layer("layer_normalization", "LayerNormalization", (s, "gamma", "scale", (32,)),
                    (s, "beta", "bias", (32,))),
              layer("dense_1", "Dense", (s, "kernel", "kernel", (32, 10)), (s, "bias", "bias", (10,)))]
    calls = [("conv2d", "Conv2D"), ("max_pooling2d", "MaxPooling2D"), ("zero_padding2d", "ZeroPadding2D"),
             ("conv2d_1", "Conv2D"), ("permute", "Permute"), ("flatten", "Flatten"), ("dense", "Dense"),
             ("layer_normalization", "LayerNormalization"), ("activation", "Activation"), ("dense_1", "Dense")]
    return ModelLayout("keras-tensorflow", tuple(layers), tuple(calls), (4, 10))


@pytest.mark.parametrize("source,target", [(torch_cnn, flax_cnn), (flax_cnn, torch_cnn), (torch_cnn, keras_cnn),
                                           (keras_cnn, torch_cnn), (keras_cnn, flax_cnn)])
def test_structure_maps_every_parameter_to_its_counterpart_both_ways(source, target):
    s, t = source(), target()
    wm = map_weights(s, t)
    # Counterparts: same layer position in call order, same role.
    s_by = {(i, p.role): p.name for i, la in enumerate(s.layers) for p in s.params(la)}
    t_by = {(i, p.role): p.name for i, la in enumerate(t.layers) for p in t.params(la)}
    assert wm.assign == {t_by[k]: s_by[k] for k in t_by}
    assert wm.layers == [(i, i) for i in range(5)]
    assert len(wm.lines(s, t)) == 10 and all("by structure" in line for line in wm.lines(s, t))


def test_explicit_mapping_overrides_structure_and_is_checked():
    s, t = torch_cnn(), flax_cnn()
    wm = map_weights(s, t, {"fc2.kernel": "classifier.4.weight", "fc2.bias": "classifier.4.bias"})
    assert wm.assign["fc2.kernel"] == "classifier.4.weight" and wm.explicit == {"fc2.kernel", "fc2.bias"}
    with pytest.raises(MappingError, match="does not have") as info:
        map_weights(s, t, {"fc9.kernel": "classifier.4.weight"})
    assert "conv1" in str(info.value) and "features.0" in str(info.value)  # both lists, side by side
    with pytest.raises(MappingError, match=r"shapes \[32, 10\] and \[64, 32\] differ"):
        map_weights(s, t, {"fc2.kernel": "classifier.1.weight"})


def test_a_missing_layer_or_a_transposed_shape_is_an_error_with_both_lists():
    s, t = torch_cnn(), flax_cnn()
    fewer = ModelLayout("jax", t.layers[:4], t.calls, t.output_shape)
    with pytest.raises(MappingError, match="5 layers with parameters to map, jax has 4") as info:
        map_weights(s, fewer)
    text = str(info.value)
    assert "classifier.4 (Linear)" in text and "fc1 (Linear)" in text and " -" in text
    bad = [dict(la) for la in t.layers]
    bad[2] = layer("fc1", "Linear", (".", "bias", "bias", (32,)), (".", "kernel", "kernel", (32, 64)))
    with pytest.raises(MappingError, match=r"kernel shapes differ: classifier.1.weight \[64, 32\] vs fc1.kernel"):
        map_weights(s, ModelLayout("jax", tuple(bad), t.calls, t.output_shape))
    no_bias = [dict(la) for la in t.layers]
    no_bias[4] = layer("fc2", "Linear", (".", "kernel", "kernel", (32, 10)))
    with pytest.raises(MappingError, match="layer 4 does not map"):
        map_weights(s, ModelLayout("jax", tuple(no_bias), t.calls, t.output_shape))


def _captures(layout: ModelLayout, rng, broken: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Forward captures with the same numbers for every layout, except relative offsets in ``broken``
    ('input/K' or 'output/K' keys perturb that array and everything after it)."""
    arrays, offset = {}, 0.0
    base = np.random.default_rng(0)
    for k in range(len(layout.layers)):
        for point in ("input", "output"):
            a = base.normal(size=(4, 6))
            offset += (broken or {}).get(f"{point}/{k}", 0.0)
            arrays[f"{point}/{k}"] = a * (1 + offset)
    arrays["logits"] = base.normal(size=(4, 10)) * (1 + offset + (broken or {}).get("logits", 0.0))
    for k in range(len(layout.layers)):
        arrays[f"grad_output/{k}"] = base.normal(size=(4, 6)) * (1 + offset)
    return arrays


@pytest.mark.parametrize("broken,first,where", [
    ({"output/1": 1e-3}, "features.3", "output"),     # the layer itself (an asymmetric padding)
    ({"input/4": 1e-3}, "classifier.3", "input"),     # the activation between LayerNorm and Linear (a GELU)
    ({"input/3": 1e-3}, "classifier.2", "input"),     # no module between: the layer whose input differs
    ({"input/2": 1e-3}, "features.4", "input"),       # after features.3: GELU, then Flatten
    ({"logits": 1e-3}, "logits", "logits"),           # no module after the last layer: the output itself
    ({}, None, None),
])
def test_localization_names_the_first_checkpoint_beyond_tolerance(broken, first, where):
    s, t = torch_cnn(), flax_cnn()
    wm = map_weights(s, t)
    rng = np.random.default_rng(1)
    loc = localize(s, t, wm, _captures(s, rng), _captures(t, rng, broken), rtol=1e-6)
    assert loc.first_layer == first and loc.where == where
    if first is None:
        assert all(c.agree for c in loc.checkpoints)
    else:
        assert loc.max_rel == pytest.approx(1e-3 / (1 + 1e-3), rel=1e-6) or loc.max_rel > 1e-4
        assert first in loc.explanation


def test_localization_skips_outputs_behind_a_fused_activation():
    """A Keras Conv2D(activation=...) returns the activation's output: not comparable with torch's Conv2d."""
    s, t = torch_cnn(), keras_cnn()
    wm = map_weights(s, t)
    rng = np.random.default_rng(1)
    loc = localize(s, t, wm, _captures(s, rng), _captures(t, rng, {"output/0": 1e-3}), rtol=1e-6)
    # The fused output is not compared; the next input is, and blames the conv or what follows it.
    assert not any(c.layer in ("features.0", "features.3") and c.point in ("output", "grad_output")
                   for c in loc.checkpoints)
    assert loc.where == "input" and loc.candidates[:2] == ["features.0 (Conv2d)", "features.1 (GELU)"]
    assert loc.first_layer == "features.0"


def test_relative_gap_is_relative_to_the_larger_tensor():
    a = np.array([1.0, -4.0])
    assert relative_gap(a, a) == 0.0
    assert relative_gap(a, a + [0.0, 0.004]) == pytest.approx(0.001)
    assert relative_gap(a, np.zeros(3)) == np.inf
    assert relative_gap(np.array([np.nan]), np.array([1.0])) == np.inf


def _blocks(backend, fmt, blocks, sep):
    """Two transformer blocks' attention layers, named the way ``fmt`` names block i."""
    layers = [layer(fmt.format(i=i), "Conv1D", (sep, "kernel", "kernel", (4, 12)), (sep, "bias", "bias", (12,)))
              for i in blocks]
    return ModelLayout(backend, tuple(layers), tuple((la["name"], la["type"]) for la in layers), (2, 5))


def test_name_rules_with_placeholders_map_blocks_by_name_not_by_call_order():
    """A port that lists its blocks in another order (a TF model built block 1 first): the call order would pair
    block 0 with block 1, the name rules pair them by their index."""
    source = _blocks("torch", "h.{i}.attn.c_attn", (0, 1), ".")
    target = _blocks("tf-keras", "h_._{i}/attn/c_attn", (1, 0), "/")
    rules = {"h_._{i}/attn/c_attn/kernel": "h.{i}.attn.c_attn.kernel",
             "h_._{i}/attn/c_attn/bias": "h.{i}.attn.c_attn.bias"}
    wm = map_weights(source, target, rules)
    assert wm.assign == {"h_._1/attn/c_attn/kernel": "h.1.attn.c_attn.kernel",
                         "h_._1/attn/c_attn/bias": "h.1.attn.c_attn.bias",
                         "h_._0/attn/c_attn/kernel": "h.0.attn.c_attn.kernel",
                         "h_._0/attn/c_attn/bias": "h.0.attn.c_attn.bias"}
    assert wm.explicit == set(wm.assign)
    # Without the rules the blocks pair in call order: block 1 of the port takes block 0's weights.
    assert map_weights(source, target).assign["h_._1/attn/c_attn/kernel"] == "h.0.attn.c_attn.kernel"


def test_a_name_rule_that_matches_nothing_is_a_mapping_error():
    source = _blocks("torch", "h.{i}.attn.c_attn", (0, 1), ".")
    target = _blocks("jax", "h.{i}.attn.c_attn", (0, 1), ".")
    with pytest.raises(MappingError, match="matches no parameter"):
        map_weights(source, target, {"blocks.{i}.kernel": "h.{i}.attn.c_attn.kernel"})
    with pytest.raises(MappingError, match="is not on the left"):
        map_weights(source, target, {"h.{i}.attn.c_attn.kernel": "h.{j}.attn.c_attn.kernel"})
