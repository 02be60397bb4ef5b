"""Legacy Keras 2 losses (tf_keras): reading tf.keras / tf_keras texts, rendering any LossSemantics, running it.

The renderings are run in the real tf-keras worker (one process for the
whole grid) and checked against the float64 numpy reference, loss and
d loss / d logits. What the legacy reductions divide by is measured here
too, by running tf_keras itself (in a subprocess: this process imports no
framework).
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from gradparity.backends import BACKENDS, BackendInfo
from gradparity.reference.losses import reduce_loss
from gradparity.backends.tf_keras.loss_text import AUTO_NOTE, notes_for, parse, render
from gradparity.errors import ConfigError
from gradparity.losses.batches import make_loss_job
from gradparity.losses.catalogue import DIVISORS, LOSSES, LossSemantics
from gradparity.losses.text import LossExpression, parse_loss_text

from loss_grid import W5, grid_batches, grid_id, semantics_grid

SCCE = "tf.keras.losses.SparseCategoricalCrossentropy"
RED = "tf.keras.losses.Reduction"
INFO = BACKENDS["tf-keras"]
#: Reading and rendering need no framework; running the renderings and measuring tf_keras do.
needs_tf_keras = pytest.mark.frameworks("tf-keras")


def read(text, targets=None, arrays=None):
    expr = parse_loss_text(text, arrays)
    if expr.framework != "tf_keras":  # tf.keras.* without a Reduction enum is routed to Keras 3 by loss_text
        expr = LossExpression("tf_keras", expr.name, expr.args, expr.kwargs, expr.call, expr.method)
    return parse(expr, targets)


# ------------------------------------------------------------------------------------------------ parse


@pytest.mark.parametrize("text,expected", [
    (f"{SCCE}(from_logits=True)", LossSemantics("cross_entropy", "count")),
    (f"{SCCE}(from_logits=True, reduction={RED}.AUTO)", LossSemantics("cross_entropy", "count")),
    (f"{SCCE}(from_logits=True, reduction={RED}.SUM_OVER_BATCH_SIZE)(y, logits, sample_weight=w)",
     LossSemantics("cross_entropy", "count", sample_weight=True)),
    (f"{SCCE}(from_logits=True, ignore_class=-1, reduction={RED}.SUM)",
     LossSemantics("cross_entropy", "one", ignore_index=-1)),
    (f"{SCCE}(from_logits=True, ignore_class=255)", LossSemantics("cross_entropy", "valid", ignore_index=255)),
    (f"{SCCE}(True, -100, 'sum_over_batch_size')", LossSemantics("cross_entropy", "valid", ignore_index=-100)),
    (f"{SCCE}(from_logits=True, reduction={RED}.NONE)(y, z, w).mean()",
     LossSemantics("cross_entropy", "count", sample_weight=True)),
    (f"{SCCE}(from_logits=True, ignore_class=-1, reduction='none')(y, z).sum()",
     LossSemantics("cross_entropy", "one", ignore_index=-1)),
    ("tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction='auto', name='ce')",
     LossSemantics("cross_entropy", "count")),
    (f"tf.keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction={RED}.SUM)",
     LossSemantics("cross_entropy_probs", "one", label_smoothing=0.1)),
    ("tf_keras.losses.CategoricalCrossentropy(True, 0.2, -1, 'sum')",
     LossSemantics("cross_entropy_probs", "one", label_smoothing=0.2)),
    (f"tf.keras.losses.BinaryCrossentropy(from_logits=True, reduction={RED}.AUTO)(y, z, sample_weight=w)",
     LossSemantics("binary_cross_entropy", "count", last_axis="mean", sample_weight=True)),
    (f"tf.keras.losses.MeanSquaredError(reduction={RED}.SUM)", LossSemantics("mse", "one", last_axis="mean")),
    ("tf_keras.losses.MeanAbsoluteError('sum_over_batch_size')", LossSemantics("l1", "count", last_axis="mean")),
    (f"tf.keras.losses.Huber(delta=0.5, reduction={RED}.SUM)",
     LossSemantics("huber", "one", delta=0.5, last_axis="mean")),
    ("tf_keras.losses.Huber(2, 'auto')", LossSemantics("huber", "count", delta=2.0, last_axis="mean")),
])
def test_parse(text, expected):
    assert read(text) == expected


def test_legacy_texts_route_to_tf_keras():
    assert parse_loss_text(f"{SCCE}(from_logits=True, reduction={RED}.SUM)").framework == "tf_keras"
    assert parse_loss_text("tf_keras.losses.Huber()").framework == "tf_keras"


def test_auto_is_noted_as_sum_over_batch_size_outside_a_strategy():
    expr = parse_loss_text(f"{SCCE}(from_logits=True, reduction={RED}.AUTO)")
    assert AUTO_NOTE in notes_for(expr) and "tf.distribute" in AUTO_NOTE and "raises" in AUTO_NOTE
    assert notes_for(parse_loss_text(f"{SCCE}(from_logits=True, reduction={RED}.SUM)")) == ()


def test_huber_delta_is_read_as_tf_keras_rounds_it():
    """tf_keras' huber() does tf.cast(delta, floatx): a Python float goes through float32 (measured below)."""
    sem = read("tf_keras.losses.Huber(delta=0.7, reduction='sum')")
    assert sem.delta == float(np.float32(0.7)) != 0.7
    assert any("through float32" in n for n in notes_for(parse_loss_text("tf_keras.losses.Huber(delta=0.7)")))


@pytest.mark.parametrize("text,message", [
    (f"{SCCE}()", "from_logits=False (the default)"),
    (f"{SCCE}(from_logits=False, reduction={RED}.SUM)", "write tf.keras.losses.SparseCategoricalCrossentropy"
                                                        "(from_logits=True, ...)"),
    ("tf_keras.losses.BinaryCrossentropy()", "gradparity compares logits-based losses"),
    ("tf_keras.losses.CategoricalCrossentropy(from_logits=1)", "from_logits must be True or False"),
    (f"{SCCE}(from_logits=True, reduction={RED}.NONE)", "write the reduction you apply"),
    (f"{SCCE}(from_logits=True, reduction={RED}.NONE)(y, z)", "write the reduction you apply"),
    (f"{SCCE}(from_logits=True, reduction={RED}.MEAN)", "not a member of tf.keras.losses.Reduction"),
    ("tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction='mean_with_sample_weight')",
     "do not exist in tf_keras"),
    ("tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)", "reduction must be"),
    ("tf_keras.losses.CategoricalCrossentropy(from_logits=True, axis=1)", "axis must be -1"),
    (f"{SCCE}(from_logits=True, ignore_class=1.5, reduction={RED}.SUM)", "ignore_class must be an integer"),
    (f"{SCCE}(from_logits=True, label_smoothing=0.1, reduction={RED}.SUM)", "has no option 'label_smoothing'"),
    ("tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, axis=-1)", "has no option 'axis'"),
    ("tf_keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=1.5)", "label_smoothing must be"),
    ("tf_keras.losses.Huber(delta=0)", "delta must be a positive number"),
    ("tf_keras.losses.Huber(beta=1.0)", "no option 'beta'"),
    ("tf_keras.losses.MeanSquaredError('sum', 'mse', 4)", "at most 2 positional"),
    ("tf_keras.losses.KLDivergence()", "not a tf_keras loss gradparity knows"),
    ("tf_keras.losses.sparse_categorical_crossentropy(y, z)", "functional form"),
    ("tf_keras.losses.Huber()(y, z, w, 4)", "with 2 or 3 arguments"),
    ("tf_keras.losses.Huber()(y, z, weights=w)", "no call argument 'weights'"),
    ("tf_keras.losses.Huber().mean()", "has no .mean()"),
])
def test_parse_errors_name_the_option(text, message):
    arrays = {"y": np.array([0, 1]), "z": np.zeros((2, 2))}
    with pytest.raises(ConfigError) as err:
        read(text, None, arrays)
    assert message in str(err.value), str(err.value)


def test_targets_hint_must_agree():
    with pytest.raises(ConfigError, match="write tf.keras.losses.CategoricalCrossentropy"):
        read("tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)", "probabilities")


# ----------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize("sem,must_say", [
    (LossSemantics("cross_entropy", "count"),
     "tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, "
     "reduction=tf_keras.losses.Reduction.SUM_OVER_BATCH_SIZE)"),
    (LossSemantics("cross_entropy", "valid", ignore_index=-100, sample_weight=True),
     "ignore_class=-100, reduction=tf_keras.losses.Reduction.SUM_OVER_BATCH_SIZE)"),
    (LossSemantics("cross_entropy", "one", label_smoothing=0.1),
     "CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction=tf_keras.losses.Reduction.SUM)"),
    (LossSemantics("mse", "count", last_axis="mean", sample_weight=True), "MeanSquaredError("),
    (LossSemantics("huber", "one", delta=0.7, last_axis="mean"), "delta=tf.constant(0.7, dtype=logits.dtype)"),
])
def test_native_renderings_use_the_loss_object(sem, must_say):
    r = render(sem)
    assert r.framework == "tf_keras" and r.native, r.code
    assert must_say in r.code, r.code
    assert "divisor" not in r.code and r.code.rstrip().splitlines()[-1].startswith("loss = criterion(")
    assert r.function.startswith("import numpy as np\nimport tensorflow as tf\nimport tf_keras\n")
    for banned in ("import keras", "keras.ops", "import torch", "import jax"):
        assert banned not in r.function


@pytest.mark.parametrize("sem,must_say,note", [
    (LossSemantics("cross_entropy", "class_weight_sum", class_weight=W5, ignore_index=-100),
     "divisor = tf.reduce_sum(tf.where(valid, tf.gather(class_weight", "no tf_keras reduction divides"),
    (LossSemantics("cross_entropy", "sample_weight_sum", sample_weight=True), "Reduction.SUM)",
     "changes from batch to batch"),
    (LossSemantics("cross_entropy", "count", ignore_index=-100), "divisor = int(np.prod(", "no tf_keras"),
    (LossSemantics("cross_entropy_probs", "count", class_weight=W5), "tf.nn.log_softmax", "no native"),
    (LossSemantics("mse", "one"), "total = total * logits.shape[-1]", "C times tf_keras' sum"),
])
def test_explicit_renderings_write_the_arithmetic(sem, must_say, note):
    r = render(sem)
    assert not r.native and must_say in r.code, r.code
    assert any(note in n for n in r.notes), r.notes


def test_module_imports_no_framework():
    code = ("import sys, gradparity.backends.tf_keras.loss_text as m\n"
            "from gradparity.losses.catalogue import LossSemantics\n"
            "m.render(LossSemantics('cross_entropy', 'valid', ignore_index=-100, sample_weight=True))\n"
            "m.parse(m.LossExpression('tf_keras', 'Huber', kwargs={'delta': 0.5}))\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in "
            "('keras', 'tensorflow', 'tf_keras', 'jax', 'jaxlib', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- render -> run -> compare


GRID = semantics_grid()


@pytest.fixture(scope="module")
def grid_run():
    """Every rendering of GRID on its own batches, in one tf-keras worker."""
    from gradparity.run.execute import run_backend

    per_sem = [grid_batches("S", i, sem) for i, sem in enumerate(GRID)]
    functions = {f"S{i}": render(sem).function for i, sem in enumerate(GRID)}
    cases = tuple(f"S{i}@{b.name}" for i, batches in enumerate(per_sem) for b in batches)
    job = make_loss_job(INFO, functions, [b for bs in per_sem for b in bs], cases=cases)
    assert job.module == "gradparity.backends.tf_keras.losses"
    outcome = run_backend(job, INFO, timeout_s=300)
    assert outcome.status == "ok", outcome.error
    return outcome, per_sem


@needs_tf_keras
@pytest.mark.parametrize("i", range(len(GRID)), ids=[grid_id(s) for s in GRID])
def test_rendering_matches_the_reference(grid_run, i):
    outcome, per_sem = grid_run
    sem = GRID[i]
    for b in per_sem[i]:
        row = outcome.methods[f"S{i}@{b.name}"]
        assert row.status == "ok", row.error
        w = b.sample_weight if sem.sample_weight else None
        ref_loss, ref_grad, _ = reduce_loss(sem, b.logits, b.targets, w)
        np.testing.assert_allclose(row.loss, ref_loss, rtol=1e-10, err_msg=f"{b.name}\n{render(sem).code}")
        grad = np.asarray(row.grads["logits"])
        assert grad.shape == b.logits.shape and grad.dtype == np.float64
        np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-9 * np.abs(ref_grad).max(),
                                   err_msg=f"{b.name}\n{render(sem).code}")


@needs_tf_keras
def test_worker_environment(grid_run):
    env = grid_run[0].environment
    assert env["framework"] == "tf_keras" and env["dtype"] == "float64" and env["device_kind"] == "cpu"
    assert env["tf32"] is False and env["precision"]["tf_keras_floatx"] == "float64"
    assert {"tf_keras", "tensorflow"} <= set(env["versions"])
    assert {"device", "device_note", "precision"} <= set(env)


def test_grid_covers_native_and_explicit_forms():
    assert {render(s).native for s in GRID} == {True, False}
    assert {s.kind for s in GRID} == set(LOSSES) and {s.divisor for s in GRID} == set(DIVISORS)


# ------------------------------------------------------------------------------- measured tf_keras facts


_FACTS = """
import os, json, numpy as np
os.environ.update(TF_CPP_MIN_LOG_LEVEL='3', CUDA_VISIBLE_DEVICES='')
import tensorflow as tf, tf_keras
tf_keras.backend.set_floatx('float64')
f = lambda x: float(np.asarray(x))
R = tf_keras.losses.Reduction
S = tf_keras.losses.SparseCategoricalCrossentropy
rng = np.random.default_rng(0)
z2, y2, w2 = 2 * rng.standard_normal((6, 5)), rng.integers(0, 5, 6), rng.uniform(0.25, 2, 6)
z3, y3, w3 = 2 * rng.standard_normal((4, 3, 5)), rng.integers(0, 5, (4, 3)), rng.uniform(0.25, 2, 4)
y3[0, 0] = y3[2, 1] = y3[3, 2] = -1
y3v = np.where(y3 < 0, 0, y3)
out = {}
out['sobs_w'] = f(S(from_logits=True, reduction=R.SUM_OVER_BATCH_SIZE)(y2, z2, sample_weight=w2))
out['auto_w'] = f(S(from_logits=True, reduction=R.AUTO)(y2, z2, sample_weight=w2))
out['default_w'] = f(S(from_logits=True)(y2, z2, sample_weight=w2))
out['sum_w'] = f(S(from_logits=True, reduction=R.SUM)(y2, z2, sample_weight=w2))
out['sobs3_n'] = f(S(from_logits=True, reduction=R.SUM_OVER_BATCH_SIZE)(y3v, z3, sample_weight=w3))
out['sum3_n'] = f(S(from_logits=True, reduction=R.SUM)(y3v, z3, sample_weight=w3))
out['ign_sobs'] = f(S(from_logits=True, ignore_class=-1)(y3, z3))
out['ign_sum'] = f(S(from_logits=True, ignore_class=-1, reduction=R.SUM)(y3, z3))
out['ign_sobs_w'] = f(S(from_logits=True, ignore_class=-1)(y3, z3, sample_weight=w3))
out['ign_sum_w'] = f(S(from_logits=True, ignore_class=-1, reduction=R.SUM)(y3, z3, sample_weight=w3))
out['ign_all'] = f(S(from_logits=True, ignore_class=-1)(np.full((4, 3), -1), z3))
h = lambda d: f(tf_keras.losses.Huber(delta=d, reduction=R.SUM)(y3v.astype(float), z3[..., 0]))
out['huber_07'], out['huber_07_f32'] = h(0.7), h(tf.constant(float(np.float32(0.7)), tf.float64))
out['huber_07_f64'] = h(tf.constant(0.7, tf.float64))
strategy = tf.distribute.MirroredStrategy(['/cpu:0'])
with strategy.scope():
    for name, red in (('auto', R.AUTO), ('sobs', R.SUM_OVER_BATCH_SIZE), ('sum', R.SUM)):
        try:
            S(from_logits=True, reduction=red)(y2, z2)
            out['strategy_' + name] = None
        except ValueError as e:
            out['strategy_' + name] = str(e)[:80]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def facts():
    done = subprocess.run([sys.executable, "-c", _FACTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    rng = np.random.default_rng(0)
    a = {"z2": 2 * rng.standard_normal((6, 5)), "y2": rng.integers(0, 5, 6), "w2": rng.uniform(0.25, 2, 6),
         "z3": 2 * rng.standard_normal((4, 3, 5)), "y3": rng.integers(0, 5, (4, 3)), "w3": rng.uniform(0.25, 2, 4)}
    a["y3"][0, 0] = a["y3"][2, 1] = a["y3"][3, 2] = -1
    return out, a


@needs_tf_keras
def test_measured_sum_over_batch_size_with_sample_weights_divides_by_n(facts):
    out, a = facts
    divisor = out["sum_w"] / out["sobs_w"]
    assert divisor == pytest.approx(6, rel=1e-12)  # N, not sum(w)
    assert abs(divisor - a["w2"].sum()) > 0.1
    sem = read(f"{SCCE}(from_logits=True, reduction={RED}.SUM_OVER_BATCH_SIZE)(y, z, sample_weight=w)")
    assert sem.divisor == "count"
    assert out["sobs_w"] == pytest.approx(reduce_loss(sem, a["z2"], a["y2"], a["w2"])[0], rel=1e-12)


@needs_tf_keras
def test_measured_n_weights_on_a_token_loss_broadcast_and_divide_by_n_times_t(facts):
    """Unlike Keras 3, tf_keras expands (N,) weights to (N, 1): they broadcast, and the divisor is N*T."""
    out, a = facts
    assert out["sum3_n"] / out["sobs3_n"] == pytest.approx(12, rel=1e-12)
    y = np.where(a["y3"] < 0, 0, a["y3"])
    sem = LossSemantics("cross_entropy", "count", sample_weight=True)
    assert out["sobs3_n"] == pytest.approx(reduce_loss(sem, a["z3"], y, a["w3"])[0], rel=1e-12)


@needs_tf_keras
def test_measured_auto_is_sum_over_batch_size_outside_a_strategy(facts):
    out, _ = facts
    assert out["auto_w"] == out["sobs_w"] == out["default_w"]


@needs_tf_keras
def test_measured_auto_and_sum_over_batch_size_raise_inside_a_strategy(facts):
    """Called directly (a custom loop) inside a tf.distribute strategy; gradparity does not model this."""
    out, _ = facts
    assert "Reduction.SUM" in out["strategy_auto"] and "Reduction.SUM" in out["strategy_sobs"]
    assert out["strategy_sum"] is None


@needs_tf_keras
def test_measured_ignore_class_divides_by_the_valid_count(facts):
    out, a = facts
    valid = int(np.sum(a["y3"] != -1))
    assert valid == 9
    assert out["ign_sum"] / out["ign_sobs"] == pytest.approx(valid, rel=1e-12)  # not N*T = 12
    assert out["ign_sum_w"] / out["ign_sobs_w"] == pytest.approx(valid, rel=1e-12)  # not the weights' sum
    sem = read(f"{SCCE}(from_logits=True, ignore_class=-1)")
    assert sem.divisor == "valid"
    assert out["ign_sobs"] == pytest.approx(reduce_loss(sem, a["z3"], a["y3"])[0], rel=1e-12)
    sem_w = LossSemantics("cross_entropy", "valid", ignore_index=-1, sample_weight=True)
    assert out["ign_sobs_w"] == pytest.approx(reduce_loss(sem_w, a["z3"], a["y3"], a["w3"])[0], rel=1e-12)


@needs_tf_keras
def test_measured_ignore_class_with_every_target_ignored_gives_nan(facts):
    """mask * total/valid is 0 * inf there: NaN, where Keras 3 (and the numpy reference) give 0."""
    out, _ = facts
    assert np.isnan(out["ign_all"])


@needs_tf_keras
def test_measured_huber_rounds_a_python_float_delta_to_float32(facts):
    out, _ = facts
    assert out["huber_07"] == out["huber_07_f32"]
    assert abs(out["huber_07"] - out["huber_07_f64"]) > 1e-9 * abs(out["huber_07_f64"])
