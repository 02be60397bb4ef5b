"""Optimizer semantics: each framework's native optimizer on a fixed gradient sequence.

Two kinds of checks:
- numpy only: the update rules in ``gradparity.experiment.optimizers`` against updates computed by hand
  for two scalar steps, and the identities that relate the frameworks (equal at a constant learning rate,
  apart under a schedule, and so on), exact in float64 up to 1e-14;
- through the real workers (one per framework): every native optimizer matches its framework's rule at
  every step within rtol(t) = 16 u t, and the pairs part exactly where the rules say they part.
"""
import math

import numpy as np
import pytest

from gradparity.commands.optimizers import BY_ID, SCENARIOS, compare_optimizers, learning_rates
from gradparity.errors import ConfigError
from gradparity.experiment.optimizers import OptimizerConfig, reference_steps


def _scalar_steps(framework, config, grads, lrs, p0=1.0):
    out = reference_steps(framework, config, {"p": np.array(p0)}, [{"p": np.array(g)} for g in grads], lrs)
    return [float(step["p"]) for step in out]


def test_adam_by_hand_torch_and_keras():
    """Two steps of Adam worked out by hand: torch adds eps to the corrected sqrt(v_hat), Keras to sqrt(v)."""
    c = OptimizerConfig("adam", 0.1, eps=1e-3)
    g1, g2 = 0.5, -0.25
    # step 1: m = 0.05, v = 0.00025; m_hat = 0.5, v_hat = 0.25 (torch); Keras alpha = 0.1*sqrt(0.001)/0.1
    torch1 = 1.0 - 0.1 * 0.5 / (0.5 + 1e-3)
    keras1 = 1.0 - (0.1 * math.sqrt(0.001) / 0.1) * 0.05 / (math.sqrt(0.00025) + 1e-3)
    # step 2: m = 0.9*0.05 + 0.1*(-0.25) = 0.02; v = 0.999*0.00025 + 0.001*0.0625 = 0.00031225
    m2, v2 = 0.02, 0.00031225
    torch2 = torch1 - 0.1 * (m2 / (1 - 0.81)) / (math.sqrt(v2 / (1 - 0.999 ** 2)) + 1e-3)
    keras2 = keras1 - (0.1 * math.sqrt(1 - 0.999 ** 2) / (1 - 0.81)) * m2 / (math.sqrt(v2) + 1e-3)
    assert _scalar_steps("torch", c, [g1, g2], [0.1, 0.1]) == pytest.approx([torch1, torch2], rel=1e-14)
    assert _scalar_steps("jax", c, [g1, g2], [0.1, 0.1]) == pytest.approx([torch1, torch2], rel=1e-14)
    assert _scalar_steps("keras", c, [g1, g2], [0.1, 0.1]) == pytest.approx([keras1, keras2], rel=1e-14)
    assert abs(keras2 - torch2) > 1e-4  # eps 1e-3 against sqrt(v) ~ 0.016: a visible difference


def test_momentum_by_hand_with_a_schedule():
    """SGD momentum 0.9, lr 0.1 then 0.05: torch p -= lr*b with b = 0.9 b + g; Keras v = 0.9 v - lr g; p += v."""
    c = OptimizerConfig("sgd", 0.1, momentum=0.9)
    grads, lrs = [1.0, 1.0], [0.1, 0.05]
    torch_steps = [1.0 - 0.1 * 1.0, 1.0 - 0.1 * 1.0 - 0.05 * (0.9 * 1.0 + 1.0)]
    keras_steps = [1.0 - 0.1, 1.0 - 0.1 + (0.9 * -0.1 - 0.05 * 1.0)]
    assert _scalar_steps("torch", c, grads, lrs) == pytest.approx(torch_steps, rel=1e-15)
    assert _scalar_steps("keras", c, grads, lrs) == pytest.approx(keras_steps, rel=1e-15)
    assert _scalar_steps("jax", c, grads, lrs) == pytest.approx(torch_steps, rel=1e-15)


@pytest.mark.parametrize("config, lrs, same", [
    (OptimizerConfig("sgd", 0.1, momentum=0.9), "constant", True),
    (OptimizerConfig("sgd", 0.1, momentum=0.9), "step", False),
    (OptimizerConfig("sgd", 0.1, momentum=0.9, nesterov=True), "constant", True),
    (OptimizerConfig("sgd", 0.1, weight_decay=0.01), "constant", True),   # no momentum: L2 == decoupled
    (OptimizerConfig("sgd", 0.1, momentum=0.9, weight_decay=0.01), "constant", False),
    (OptimizerConfig("adam", 0.01, eps=0.0), "step", True),               # no epsilon: no epsilon hat
    (OptimizerConfig("adam", 0.01, eps=1e-8), "constant", False),
])
def test_torch_and_keras_rules_part_where_the_sources_say(config, lrs, same):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 2))}
    grads = [{"w": rng.standard_normal((3, 2))} for _ in range(8)]
    schedule = [0.1] * 4 + [0.05] * 4 if lrs == "step" else [0.1] * 8
    t = reference_steps("torch", config, params, grads, schedule)
    k = reference_steps("keras", config, params, grads, schedule)
    j = reference_steps("jax", config, params, grads, schedule)
    apart = max(float(np.max(np.abs(a["w"] - b["w"]))) for a, b in zip(t, k))
    assert (apart < 1e-14) == same, apart
    assert max(float(np.max(np.abs(a["w"] - b["w"]))) for a, b in zip(t, j)) < 1e-14  # optax is torch's form


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="not 'numpy'"):
        compare_optimizers(SCENARIOS[:1], backends=("numpy",))
    with pytest.raises(ConfigError, match="steps must be at least 2"):
        compare_optimizers(SCENARIOS[:1], backends=("torch",), steps=1)


#: Which pairs part in each scenario, as the rules predict (keras is the odd one out where any is).
KERAS_APART = {"sgd_momentum": False, "sgd_momentum_schedule": True, "sgd_nesterov": False,
               "sgd_weight_decay": True, "adam_same_eps": True, "adam_defaults_tiny_gradients": True,
               "adamw_defaults": True, "adamw_same": True, "sgd_momentum_accumulation": False,
               "adam_accumulation": True}


MAIN = ("torch", "keras-tensorflow", "jax")


@pytest.fixture(scope="module")
def float64_results():
    return compare_optimizers(SCENARIOS, MAIN, "float64", steps=10)


@pytest.mark.frameworks(*MAIN)
def test_every_native_optimizer_does_what_its_source_says(float64_results):
    for r in float64_results:
        assert not r.errors, r.errors
        for backend, err in r.semantics.items():
            assert err <= r.semantics_rtol[backend], f"{r.scenario.id} {backend}: {err:.3g}"


@pytest.mark.frameworks(*MAIN)
def test_frameworks_part_exactly_where_the_rules_say(float64_results):
    """With exact hyperparameters the rules part Keras from torch and optax where KERAS_APART says; Keras on
    TensorFlow rounds its hyperparameters to float32 even in float64, so in this float64 run it is apart
    everywhere, and optax.MultiSteps accumulates in float32; the measured drift is the rules' (with those
    precisions), to rounding."""
    assert set(KERAS_APART) == set(BY_ID)
    for r in float64_results:
        assert set(r.float32_hyper) == {"keras-tensorflow"}, r.scenario.id
        for p in r.pairs:
            keras_pair = "keras-tensorflow" in (p.a, p.b)
            semantic = keras_pair and KERAS_APART[r.scenario.id] or r.scenario.id == "adamw_defaults"
            assert (max(p.predicted_exact) > 1e-12) == semantic, (r.scenario.id, p.a, p.b, p.predicted_exact)
            # optax.MultiSteps' float32 accumulator parts optax from the others under accumulation.
            f32_accumulator = "jax" in (p.a, p.b) and "accumulation" in r.scenario.id
            assert p.apart == (keras_pair or semantic or f32_accumulator), (r.scenario.id, p.a, p.b, p.per_step)
            # The measured drift is the rules' drift, to rounding.
            assert abs(p.per_step[-1] - p.predicted[-1]) <= 1e-13 + 1e-6 * p.predicted[-1], r.scenario.id
    schedule = next(r for r in float64_results if r.scenario.id == "sgd_momentum_schedule")
    lrs = learning_rates(schedule.scenario, 0.1, 10)
    first_change = next(t for t in range(1, 10) if lrs[t] != lrs[t - 1]) + 1  # 1-based step
    for p in schedule.pairs:
        if max(p.predicted_exact) > 1e-12:  # the semantic part starts where the lr changes
            assert next(t for t, d in enumerate(p.predicted_exact, start=1) if d > 1e-12) == first_change


@pytest.mark.frameworks("torch", "keras-jax", "keras-torch", "jax")
@pytest.mark.parametrize("dtype", ["float32"])
def test_float32_and_the_other_keras_backends(dtype):
    scenarios = (BY_ID["sgd_momentum_schedule"], BY_ID["adamw_same"], BY_ID["adam_accumulation"])
    results = compare_optimizers(scenarios, ("torch", "keras-jax", "keras-torch", "jax"), dtype, steps=6)
    for r in results:
        assert not r.errors, r.errors
        for backend, err in r.semantics.items():
            assert err <= r.semantics_rtol[backend], f"{r.scenario.id} {backend} {dtype}: {err:.3g}"
