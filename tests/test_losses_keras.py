"""Keras 3 losses: reading keras.losses texts, rendering any LossSemantics as Keras code, running it.

The renderings are run in the real keras-tensorflow worker (one process for
the whole grid) and checked against the float64 numpy reference, loss and
d loss / d logits, on (N, C) and (N, T, C) batches with padding and sample
weights; a few also on keras-jax and keras-torch (one worker each), to show
the same source runs on every Keras backend. What Keras' reductions divide
by is measured here too, by running Keras itself.
"""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from gradparity.backends.keras.loss_text import parse, render
from gradparity.reference.losses import reduce_loss
from gradparity.errors import ConfigError
from gradparity.losses.batches import generate_batches
from gradparity.losses.catalogue import DIVISORS, LOSSES, LossSemantics
from gradparity.losses.text import LossExpression, parse_loss_text

needs_keras_tf = pytest.mark.frameworks("keras-tensorflow")

from loss_grid import PW5, W5, grid_id, run_grid, semantics_grid
SCCE = "keras.losses.SparseCategoricalCrossentropy"


def read(text, targets=None, arrays=None):
    return parse(parse_loss_text(text, arrays), targets)


# ------------------------------------------------------------------------------------------------ parse


@pytest.mark.parametrize("text,targets,expected", [
    (f"{SCCE}(from_logits=True)", None, LossSemantics("cross_entropy", "count")),
    (f"{SCCE}(from_logits=True, ignore_class=-100)", "class_index",
     LossSemantics("cross_entropy", "valid", ignore_index=-100)),
    (f"{SCCE}(True, -1, 'sum')", None, LossSemantics("cross_entropy", "one", ignore_index=-1)),
    (f"{SCCE}(from_logits=True, reduction='mean')", None, LossSemantics("cross_entropy", "count")),
    ("tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits, sample_weight=w)", None,
     LossSemantics("cross_entropy", "count", sample_weight=True)),
    (f"{SCCE}(from_logits=True, reduction='mean_with_sample_weight')(y, logits, w)", None,
     LossSemantics("cross_entropy", "keras_sample_weight_sum", sample_weight=True)),
    (f"{SCCE}(from_logits=True, ignore_class=0, reduction='mean_with_sample_weight')(y_true=y, y_pred=z)", None,
     LossSemantics("cross_entropy", "keras_sample_weight_sum", ignore_index=0)),
    (f"{SCCE}(from_logits=True, reduction=None)(y, logits, sample_weight=w).mean()", None,
     LossSemantics("cross_entropy", "count", sample_weight=True)),
    (f"{SCCE}(from_logits=True, ignore_class=-1, reduction='none')(y, logits).sum()", None,
     LossSemantics("cross_entropy", "one", ignore_index=-1)),
    (f"{SCCE}(from_logits=True, name='ce', dtype='float32', axis=-1)", None, LossSemantics("cross_entropy", "count")),
    ("keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)", "probabilities",
     LossSemantics("cross_entropy_probs", "count", label_smoothing=0.1)),
    ("keras.losses.CategoricalCrossentropy(True, 0.2, -1, 'sum')", None,
     LossSemantics("cross_entropy_probs", "one", label_smoothing=0.2)),
    ("keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)", None,
     LossSemantics("binary_cross_entropy", "count", label_smoothing=0.1, last_axis="mean")),
    ("keras.losses.BinaryCrossentropy(from_logits=True, reduction='mean_with_sample_weight')(y, z, sample_weight=w)",
     None, LossSemantics("binary_cross_entropy", "keras_sample_weight_sum", last_axis="mean", sample_weight=True)),
    ("keras.losses.MeanSquaredError()", None, LossSemantics("mse", "count", last_axis="mean")),
    ("keras.losses.MeanSquaredError(reduction='sum')", None, LossSemantics("mse", "one", last_axis="mean")),
    ("keras.losses.MeanAbsoluteError('sum_over_batch_size')", None, LossSemantics("l1", "count", last_axis="mean")),
    ("keras.losses.Huber(delta=0.5)", None, LossSemantics("huber", "count", delta=0.5, last_axis="mean")),
    ("keras.losses.Huber(2, 'sum')", None, LossSemantics("huber", "one", delta=2.0, last_axis="mean")),
])
def test_parse(text, targets, expected):
    assert read(text, targets) == expected


def test_parse_a_bare_class_name():
    expr = LossExpression("keras", "Huber", kwargs={"delta": 0.7, "reduction": "sum"})
    assert parse(expr) == LossSemantics("huber", "one", delta=0.7, last_axis="mean")


@pytest.mark.parametrize("text,targets,message", [
    (f"{SCCE}()", None, "from_logits=False (Keras' default)"),
    (f"{SCCE}(from_logits=False)", None, f"write {SCCE}(from_logits=True, ...)"),
    ("keras.losses.BinaryCrossentropy()", None, "gradparity compares logits-based losses"),
    ("keras.losses.CategoricalCrossentropy(from_logits=1)", None, "from_logits must be True or False"),
    (f"{SCCE}(from_logits=True, reduction=None)", None, "write the reduction you apply"),
    (f"{SCCE}(from_logits=True, reduction='none')(y, z)", None, "write the reduction you apply"),
    (f"{SCCE}(from_logits=True, reduction=tf.keras.losses.Reduction.SUM)", None,
     "legacy Reduction enum, which gradparity does not support yet; in Keras 3 write reduction='sum'"),
    (f"{SCCE}(from_logits=True, reduction=tf.keras.losses.Reduction.AUTO)", None,
     "reduction='sum_over_batch_size'"),
    (f"{SCCE}(from_logits=True, reduction='auto')", None, "reduction must be one of"),
    (f"{SCCE}(from_logits=True, axis=1)", None, "axis must be -1"),
    ("keras.losses.CategoricalCrossentropy(from_logits=True, axis=0)", None, "axis=0 is not supported"),
    (f"{SCCE}(from_logits=True, ignore_class=1.5)", None, "ignore_class must be an integer"),
    (f"{SCCE}(from_logits=True, label_smoothing=0.1)", None, "has no option 'label_smoothing'"),
    ("keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=1.5)", None,
     "label_smoothing must be a number in [0, 1]"),
    ("keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing='a')", None, "label_smoothing"),
    ("keras.losses.Huber(delta=0)", None, "delta must be a positive number"),
    ("keras.losses.Huber(beta=1.0)", None, "no option 'beta'"),
    ("keras.losses.MeanSquaredError('sum', 'mse', 'float64', 4)", None, "at most 3 positional"),
    (f"{SCCE}(True, from_logits=True)", None, "two values for 'from_logits'"),
    ("keras.losses.KLDivergence()", None, "not a Keras loss gradparity knows"),
    ("keras.losses.sparse_categorical_crossentropy(y, z)", None, "functional form"),
    ("tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)", None, "tf_keras (legacy Keras 2)"),
    (f"{SCCE}(from_logits=True)(y, z, w, 4)", None, "with 2 or 3 arguments"),
    (f"{SCCE}(from_logits=True)(y, z, weights=w)", None, "no call argument 'weights'"),
    (f"{SCCE}(from_logits=True).mean()", None, "has no .mean()"),
    (f"{SCCE}(from_logits=True)", "probabilities", "write keras.losses.CategoricalCrossentropy"),
    ("keras.losses.CategoricalCrossentropy(from_logits=True)", "class_index",
     "write keras.losses.SparseCategoricalCrossentropy"),
    ("keras.losses.MeanSquaredError()", "soft", "targets hint"),
])
def test_parse_errors_name_the_option(text, targets, message):
    arrays = {"y": np.array([0, 1]), "z": np.zeros((2, 2))}  # so that a functional form's arrays can be read
    with pytest.raises(ConfigError) as err:
        read(text, targets, arrays)
    assert message in str(err.value), str(err.value)


def test_from_logits_false_explains_the_fix():
    with pytest.raises(ConfigError) as err:
        read(f"{SCCE}()")
    text = str(err.value)
    assert "from_logits=True" in text and "probabilit" in text and "not supported yet" in text


# ----------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize("sem,must_say", [
    (LossSemantics("cross_entropy", "count"), f"{SCCE}(from_logits=True)"),
    (LossSemantics("cross_entropy", "valid", ignore_index=-100), f"{SCCE}(from_logits=True, ignore_class=-100)"),
    (LossSemantics("cross_entropy", "class_weight_sum", class_weight=W5, ignore_index=-100),
     "ignore_class=-100, reduction='mean_with_sample_weight')"),
    (LossSemantics("cross_entropy", "keras_sample_weight_sum", ignore_index=-100, sample_weight=True),
     "reduction='mean_with_sample_weight'"),
    (LossSemantics("cross_entropy", "one", label_smoothing=0.1),
     "keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction='sum')"),
    (LossSemantics("cross_entropy_probs", "sample_weight_sum", sample_weight=True),
     "reduction='mean_with_sample_weight'"),
    (LossSemantics("binary_cross_entropy", "count", label_smoothing=0.1),
     "keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)"),
    (LossSemantics("mse", "one", last_axis="mean"), "keras.losses.MeanSquaredError(reduction='sum')"),
    (LossSemantics("l1", "count"), "keras.losses.MeanAbsoluteError()"),  # torch's mean == Keras' mean
    (LossSemantics("huber", "count", delta=0.7), "keras.losses.Huber(delta=0.7)"),
])
def test_native_renderings_use_the_loss_object(sem, must_say):
    r = render(sem)
    assert r.framework == "keras" and r.native, r.code
    assert must_say in r.code, r.code
    assert "divisor" not in r.code and r.code.rstrip().splitlines()[-1].startswith("loss = criterion(")
    assert r.function.startswith("import numpy as np\nimport keras\n")
    assert "def loss_fn(logits, targets, sample_weight=None):" in r.function
    for banned in ("import tensorflow", "import torch", "import jax", "tf.", "torch.", "jnp."):
        assert banned not in r.function


def test_torch_class_weights_become_a_sample_weight():
    """torch CE(weight=w) (ignore_index -100) == Keras SCCE(ignore_class=-100, mean_with_sample_weight), w[targets]."""
    from gradparity.backends.torch.loss_text import parse as parse_torch

    sem = parse_torch(parse_loss_text("torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5]))"))
    assert sem == LossSemantics("cross_entropy", "class_weight_sum", class_weight=W5, ignore_index=-100)
    r = render(sem)
    assert r.native and sem in GRID  # and run against the reference in test_rendering_matches_the_reference
    assert "ignore_class=-100, reduction='mean_with_sample_weight'" in r.code
    assert "keras.ops.take(class_weight, safe_targets)" in r.code and "sample_weight=weight" in r.code
    assert any("Model.fit(class_weight=...)" in n for n in r.notes)


@pytest.mark.parametrize("sem,must_say,note", [
    (LossSemantics("cross_entropy", "class_weight_sum", class_weight=W5, ignore_index=-100, label_smoothing=0.1),
     "keras.ops.log_softmax", "w_c inside the sum over classes"),
    (LossSemantics("cross_entropy_probs", "count", class_weight=W5), "keras.ops.log_softmax", "no native"),
    (LossSemantics("binary_cross_entropy", "count", pos_weight=PW5), "keras.ops.log_sigmoid", "pos_weight"),
    (LossSemantics("mse", "one"), "total = total * logits.shape[-1]", "C times Keras' sum"),
    (LossSemantics("huber", "keras_sample_weight_sum", sample_weight=True), "total * logits.shape[-1]",
     "C times"),
    (LossSemantics("cross_entropy", "count", ignore_index=-100), "divisor = int(np.prod(", "no native"),
    (LossSemantics("cross_entropy", "sample_weight_sum", class_weight=W5, sample_weight=True),
     "divisor = keras.ops.sum(keras.ops.broadcast_to(sample_weight", "changes from batch to batch"),
    (LossSemantics("cross_entropy", "keras_sample_weight_sum", class_weight=W5, sample_weight=True),
     "keras.ops.where(divisor == 0, 1.0, divisor)", "summed over N only"),
])
def test_explicit_renderings_write_the_arithmetic(sem, must_say, note):
    r = render(sem)
    assert not r.native and must_say in r.code, r.code
    assert any(note in n for n in r.notes), r.notes


def test_batch_dependent_divisors_are_computed_never_constants():
    for sem in semantics_grid():
        code = render(sem).code
        for line in code.splitlines():
            if line.startswith("divisor = "):
                assert "logits" in line or "valid" in line or "sample_weight" in line or "targets" in line, line


def test_sample_weight_layout_is_said():
    r = render(LossSemantics("mse", "keras_sample_weight_sum", last_axis="mean", sample_weight=True))
    assert r.native and "keras.ops.reshape(sample_weight" in r.code
    assert any("does not broadcast (N,) sample weights" in n for n in r.notes)


def test_render_rejects_semantics_no_framework_computes():
    """The catalogue's own check runs first (its cases: tests/test_loss_reference.py)."""
    with pytest.raises(ConfigError, match="takes no label_smoothing"):
        render(LossSemantics("mse", "count", label_smoothing=0.1))


def test_module_imports_no_framework():
    code = ("import sys, gradparity.backends.keras.loss_text as m\n"
            "from gradparity.losses.catalogue import LossSemantics\n"
            "m.render(LossSemantics('cross_entropy', 'valid', ignore_index=-100, sample_weight=True))\n"
            "m.parse(m.LossExpression('keras', 'Huber', kwargs={'delta': 0.5}))\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in "
            "('keras', 'tensorflow', 'tf_keras', 'jax', 'jaxlib', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- render -> run -> compare


GRID = semantics_grid()


def float32_somewhere(sem, environment) -> bool:
    """Whether Keras computes part of ``sem``'s rendering in float32 on this backend despite floatx float64.

    Keras 3.15's type promotion (result_type(float64, float32) is float32 on
    its jax and torch backends) makes ``keras.ops.mean`` compute in float32
    (the loss objects that average the last axis use it) and, on torch,
    ``divide_no_nan`` (every reduction that divides). The worker measures
    which ops do, from their values, under ``precision.keras_op_dtypes``.
    """
    ops = environment["precision"]["keras_op_dtypes"]
    r = render(sem)
    averages = any(f"keras.losses.{c}(" in r.code
                   for c in ("BinaryCrossentropy", "MeanSquaredError", "MeanAbsoluteError", "Huber"))
    divides = r.native and "reduction='sum'" not in r.code
    return (averages and ops["mean"] != "float64") or (divides and ops["divide_no_nan"] != "float64")


def check_against_reference(outcome, per_sem, semantics, i, float32=False):
    sem = semantics[i]
    rtol, gtol = (1e-5, 1e-5) if float32 else (1e-10, 1e-9)
    for b in per_sem[i]:
        row = outcome.methods[f"{b.name.split('-')[0]}@{b.name}"]
        assert row.status == "ok", row.error
        ref_loss, ref_grad, _ = reduce_loss(sem, b.logits, b.targets, b.sample_weight if sem.sample_weight else None)
        np.testing.assert_allclose(row.loss, ref_loss, rtol=rtol, err_msg=f"{b.name}\n{render(sem).code}")
        grad = np.asarray(row.grads["logits"])
        assert grad.shape == b.logits.shape and grad.dtype == np.float64
        np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=gtol * np.abs(ref_grad).max(),
                                   err_msg=f"{b.name}\n{render(sem).code}")


@pytest.fixture(scope="module")
def grid_run():
    """Every rendering of GRID on its own batches, in one keras-tensorflow worker."""
    return run_grid("keras-tensorflow", GRID, render)


@needs_keras_tf
@pytest.mark.parametrize("i", range(len(GRID)), ids=[grid_id(s) for s in GRID])
def test_rendering_matches_the_reference(grid_run, i):
    outcome, per_sem = grid_run
    # keras-tensorflow computes every op in float64: the float64 tolerance everywhere.
    assert not float32_somewhere(GRID[i], outcome.environment)
    check_against_reference(outcome, per_sem, GRID, i)


@needs_keras_tf
def test_worker_environment(grid_run):
    env = grid_run[0].environment
    assert env["framework"] == "keras" and env["keras_backend"] == "tensorflow"
    assert env["dtype"] == "float64" and env["device_kind"] == "cpu" and env["tf32"] is False
    assert env["precision"]["keras_floatx"] == "float64"
    assert set(env["precision"]["keras_op_dtypes"].values()) == {"float64"}
    assert {"keras", "tensorflow"} <= set(env["versions"])
    assert {"device", "device_note", "precision"} <= set(env)


def test_grid_covers_native_and_explicit_forms():
    forms = {render(s).native for s in GRID}
    assert forms == {True, False}
    assert {s.kind for s in GRID} == set(LOSSES) and {s.divisor for s in GRID} == set(DIVISORS)


#: A few renderings for the other Keras backends: ignore_class with mean_with_sample_weight (the mask
#: broadcasts the weights), class weights as a sample weight, torch's element-wise sum, Keras' own MSE mean.
SUBSET = [
    LossSemantics("cross_entropy", "keras_sample_weight_sum", ignore_index=-100, sample_weight=True),
    LossSemantics("cross_entropy", "class_weight_sum", class_weight=W5, ignore_index=-100),
    LossSemantics("cross_entropy", "valid", ignore_index=-1, class_weight=W5, label_smoothing=0.1,
                  sample_weight=True),
    LossSemantics("mse", "one"),
    LossSemantics("binary_cross_entropy", "keras_sample_weight_sum", label_smoothing=0.1, last_axis="mean",
                  sample_weight=True),
]


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.frameworks(f"keras-{v}"))
                                     for v in ("jax", "torch")])
def test_renderings_run_on_every_keras_backend(variant):
    """The same sources on keras-jax and keras-torch: float64 where Keras computes float64 there."""
    outcome, per_sem = run_grid(f"keras-{variant}", SUBSET, render, tag="K")
    env = outcome.environment
    assert env["keras_backend"] == variant and env["precision"]["keras_floatx"] == "float64"
    float32 = [float32_somewhere(sem, env) for sem in SUBSET]
    for i in range(len(SUBSET)):
        check_against_reference(outcome, per_sem, SUBSET, i, float32=float32[i])
    # Measured, keras 3.15.1: ops.mean computes float64 in float32 on both; divide_no_nan on torch only. So
    # class-index renderings are float64 on jax, and on torch only those that divide by hand (or sum).
    ops = env["precision"]["keras_op_dtypes"]
    assert ops["mean"] == "float32"
    assert ops["divide_no_nan"] == ("float32" if variant == "torch" else "float64")
    assert env["dtype"] == "float32"  # the narrowest op bounds what the worker claims
    assert float32 == ([False, False, False, True, True] if variant == "jax" else [True, True, False, True, True])


# ---------------------------------------------------------------------------------- measured Keras facts


def run_keras(variant: str, code: str) -> dict:
    """Run ``code`` in a fresh Python on Keras' ``variant`` backend (floatx float64); the JSON it prints last.

    A subprocess, because Keras picks its backend once, at import, and this
    test process must import no framework. Its callers declare ``frameworks("keras-<variant>")``.
    """
    prologue = (
        "import os, sys, json, numpy as np\n"
        f"os.environ.update(KERAS_BACKEND={variant!r}, TF_CPP_MIN_LOG_LEVEL='3', CUDA_VISIBLE_DEVICES='',\n"
        "                  JAX_PLATFORMS='cpu', JAX_ENABLE_X64='1')\n"
        "import keras\n"
        "keras.config.set_floatx('float64')\n"
        "f = lambda x: float(keras.ops.convert_to_numpy(x))\n"
        "out = {}\n")
    done = subprocess.run([sys.executable, "-c", prologue + code + "print(json.dumps(out))\n"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


def _fact_arrays():
    rng = np.random.default_rng(0)
    a = {"z2": 2 * rng.standard_normal((6, 5)), "y2": rng.integers(0, 5, 6), "w2": rng.uniform(0.25, 2, 6),
         "z3": 2 * rng.standard_normal((4, 3, 5)), "y3": rng.integers(0, 5, (4, 3)), "w3": rng.uniform(0.25, 2, 4)}
    a["y3"][0, 0] = a["y3"][2, 1] = a["y3"][3, 2] = -1
    return a


#: The same arrays in the subprocess (same generator, same calls, same order).
_FACT_ARRAYS_CODE = (
    "rng = np.random.default_rng(0)\n"
    "z2, y2, w2 = 2 * rng.standard_normal((6, 5)), rng.integers(0, 5, 6), rng.uniform(0.25, 2, 6)\n"
    "z3, y3, w3 = 2 * rng.standard_normal((4, 3, 5)), rng.integers(0, 5, (4, 3)), rng.uniform(0.25, 2, 4)\n"
    "y3[0, 0] = y3[2, 1] = y3[3, 2] = -1\n"
    "y3v = np.where(y3 < 0, 0, y3)\n"
    "S = keras.losses.SparseCategoricalCrossentropy\n")


@pytest.fixture(scope="module")
def keras_tf():
    """What Keras' reductions divide by, measured on its tensorflow backend."""
    out = run_keras("tensorflow", _FACT_ARRAYS_CODE + (
        "out['sobs_w'] = f(S(from_logits=True)(y2, z2, sample_weight=w2))\n"
        "out['sum_w'] = f(S(from_logits=True, reduction='sum')(y2, z2, sample_weight=w2))\n"
        "out['mwsw_n1'] = f(S(from_logits=True, reduction='mean_with_sample_weight')(y3v, z3, "
        "sample_weight=w3[:, None]))\n"
        "out['sum3_n1'] = f(S(from_logits=True, reduction='sum')(y3v, z3, sample_weight=w3[:, None]))\n"
        "try:\n"
        "    S(from_logits=True, reduction='mean_with_sample_weight')(y3v, z3, sample_weight=w3)\n"
        "    out['n_raises'] = None\n"
        "except Exception as e:\n"
        "    out['n_raises'] = type(e).__name__\n"
        "out['ign_sobs'] = f(S(from_logits=True, ignore_class=-1)(y3, z3))\n"
        "out['ign_sum'] = f(S(from_logits=True, ignore_class=-1, reduction='sum')(y3, z3))\n"))
    return out, _fact_arrays()


@needs_keras_tf
def test_measured_sum_over_batch_size_with_sample_weights_divides_by_n(keras_tf):
    out, a = keras_tf
    divisor = out["sum_w"] / out["sobs_w"]
    assert divisor == pytest.approx(6, rel=1e-12)  # N, not sum(w) = 6.6...
    assert abs(divisor - a["w2"].sum()) > 0.1
    assert read(f"{SCCE}(from_logits=True)(y, z, sample_weight=w)").divisor == "count"
    ref = reduce_loss(LossSemantics("cross_entropy", "count", sample_weight=True), a["z2"], a["y2"], a["w2"])[0]
    assert out["sobs_w"] == pytest.approx(ref, rel=1e-12)


@needs_keras_tf
def test_measured_mean_with_sample_weight_sums_n_weights_on_a_token_loss(keras_tf):
    """(N,) weights on an (N, T) loss raise in Keras; as (N, 1) they divide by sum_n w_n, not T times it."""
    out, a = keras_tf
    assert out["n_raises"] is not None  # Keras does not broadcast (N,) weights over T
    divisor = out["sum3_n1"] / out["mwsw_n1"]
    assert divisor == pytest.approx(a["w3"].sum(), rel=1e-12)
    assert abs(divisor - 3 * a["w3"].sum()) > 1.0
    sem = LossSemantics("cross_entropy", "keras_sample_weight_sum", sample_weight=True)
    y = np.where(a["y3"] < 0, 0, a["y3"])
    assert out["mwsw_n1"] == pytest.approx(reduce_loss(sem, a["z3"], y, a["w3"])[0], rel=1e-12)


@needs_keras_tf
def test_measured_ignore_class_mean_divides_by_the_valid_count(keras_tf):
    out, a = keras_tf
    valid = int(np.sum(a["y3"] != -1))
    assert valid == 9
    assert out["ign_sum"] / out["ign_sobs"] == pytest.approx(valid, rel=1e-12)  # not N*T = 12
    sem = read(f"{SCCE}(from_logits=True, ignore_class=-1)")
    assert sem.divisor == "valid"
    assert out["ign_sobs"] == pytest.approx(reduce_loss(sem, a["z3"], a["y3"])[0], rel=1e-12)


@pytest.mark.frameworks("keras-torch")
def test_measured_keras_torch_masked_losses_write_into_the_sample_weight():
    """keras 3.15.1, torch backend: with ignore_class, the loss multiplies the caller's sample_weight tensor in
    place (mask, rescaled by total/valid for 'sum_over_batch_size'), and (N, 1) weights on an (N, T) loss fail.
    Why the renderings always pass a fresh keras.ops.where(valid, ..., 0) as the weight."""
    out = run_keras("torch", _FACT_ARRAYS_CODE + (
        "import torch\n"
        "w = torch.ones((4, 3), dtype=torch.float64)\n"
        "S(from_logits=True, ignore_class=-1, reduction='sum')(y3, z3, sample_weight=w)\n"
        "out['after_sum'] = w.numpy().tolist()\n"
        "w = torch.ones((4, 3), dtype=torch.float64)\n"
        "S(from_logits=True, ignore_class=-1)(y3, z3, sample_weight=w)\n"
        "out['after_mean'] = w.numpy().tolist()\n"
        "try:\n"
        "    S(from_logits=True, ignore_class=-1)(y3, z3, sample_weight=torch.ones((4, 1), dtype=torch.float64))\n"
        "    out['n1'] = None\n"
        "except Exception as e:\n"
        "    out['n1'] = type(e).__name__\n"))
    valid = (_fact_arrays()["y3"] != -1).astype(float)
    np.testing.assert_array_equal(out["after_sum"], valid)
    np.testing.assert_allclose(out["after_mean"], valid * 12 / 9, rtol=1e-7)  # total/valid, in float32 there
    assert out["n1"] is not None


@needs_keras_tf
def test_loss_fn_takes_numpy_and_gives_zero_when_nothing_counts():
    """A rendered function called with plain numpy arrays; on a batch with every target ignored, Keras' rule
    gives 0 (divide_no_nan), natively and written out."""
    native = LossSemantics("cross_entropy", "keras_sample_weight_sum", ignore_index=-100, sample_weight=True)
    explicit = dataclasses.replace(native, class_weight=W5)
    assert render(native).native and not render(explicit).native
    b = generate_batches(explicit, seed=3, shapes=((3, 4, 5),))[0]
    sources = [render(native).function, render(explicit).function]
    out = run_keras("tensorflow", (
        "from gradparity.backends.protocol import compile_loss_function\n"
        f"fns = [compile_loss_function(s) for s in {sources!r}]\n"
        f"z = np.array({b.logits.tolist()!r}); y = np.array({b.targets.tolist()!r})\n"
        f"w = np.array({b.sample_weight.tolist()!r})\n"
        "out['numpy'] = [f(fn(z, y, w)) for fn in fns]\n"
        "out['ignored'] = [f(fn(z, np.full(y.shape, -100), w)) for fn in fns]\n"
        "out['float32_logits'] = [keras.backend.standardize_dtype(fn(z.astype(np.float32), y, w).dtype)"
        " for fn in fns]\n"
        "try:\n"
        "    fns[0](z, y)\n"
        "except ValueError as e:\n"
        "    out['no_weight'] = str(e)\n"))
    for got, sem in zip(out["numpy"], (native, explicit)):
        assert got == pytest.approx(reduce_loss(sem, b.logits, b.targets, b.sample_weight)[0], rel=1e-12)
    assert out["ignored"] == [0.0, 0.0]
    assert out["float32_logits"] == ["float64", "float64"]  # computed in floatx, as Keras' loss objects do
    assert "sample_weight" in out["no_weight"]
