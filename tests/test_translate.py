"""``gradparity translate`` end to end: a loss in one framework, its translations run in the others."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_harness import run_cli

from gradparity.cli import main
from gradparity.commands import translate as tr
from gradparity.compare.tolerance import SAFETY, Tolerance
from gradparity.errors import ConfigError

needs_all = pytest.mark.frameworks("torch", "jax", "keras-tensorflow")

WEIGHTED_PADDED = ("torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5]), "
                   "ignore_index=-100)")


def gradparity(*args):
    return run_cli(*args)


@pytest.mark.parametrize("argv,message", [
    (["translate", "torch.nn.CrossEntropyLoss()", "--to", "caffe"], "--to takes"),
    (["translate", "torch.nn.CrossEntropyLoss()", "--targets", "soft"], "--targets must be"),
    (["translate", "torch.nn.NotALoss()"], "NotALoss"),
    (["translate", "torch.nn.CrossEntropyLoss(weight=w)"], "'w' is a name"),
    (["translate", "torch.nn.CrossEntropyLoss(reduction='none')"], "none"),
    (["translate", "torch.nn.CrossEntropyLoss()", "--data", "/nonexistent.npz"], "does not exist"),
    (["translate", "keras.losses.SparseCategoricalCrossentropy()"], "from_logits"),
    (["translate", "optax.softmax_cross_entropy_with_integer_labels(logits, labels)"], "mean"),
])
def test_bad_input_is_exit_2_before_any_worker(argv, message, capsys, workers_started):
    started = workers_started
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not started


def test_class_weights_from_data_and_a_users_batch(tmp_path):
    data = tmp_path / "batch.npz"
    rng = np.random.default_rng(1)
    np.savez(data, w=np.array([1.0, 2.0, 3.0]), logits=rng.standard_normal((5, 3)),
             targets=np.array([0, 1, 2, -100, 1]))
    framework, sem, renderings, batches = tr.plan("nn.CrossEntropyLoss(weight=w)", data=str(data))
    assert framework == "torch" and sem.class_weight == (1.0, 2.0, 3.0)
    assert batches[-1].name == "data" and batches[-1].logits.shape == (5, 3)
    assert [r.framework for _, r in renderings] == ["torch", "keras", "jax"]
    np.savez(data, w=np.array([1.0, 2.0]), logits=rng.standard_normal((5, 3)), targets=np.zeros(5, dtype=int))
    with pytest.raises(ConfigError, match="class weights have 2 entries for 3 classes"):
        tr.plan("nn.CrossEntropyLoss(weight=w)", data=str(data))


@needs_all
def test_weighted_padded_cross_entropy_translates_and_matches_everywhere():
    proc = gradparity("translate", WEIGHTED_PADDED, "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["verdict"]["status"] == "match"
    assert [t["framework"] for t in doc["translations"]] == ["torch", "keras", "jax"]
    shapes = [tuple(b["shape"]) for b in doc["batches"]]
    assert any(len(s) == 3 for s in shapes) and any(len(s) == 2 for s in shapes)
    divisors = [b["divisor"] for b in doc["batches"]]
    assert len(set(divisors)) > 1  # a weighted, padded mean: the divisor changes with the batch
    for t in doc["translations"]:
        assert {"framework", "native", "code", "function", "notes", "agreement"} <= set(t)
        assert "def loss_fn(logits, targets, sample_weight=None)" in t["function"]
        agreement = t["agreement"]
        assert agreement["status"] == "ok" and len(agreement["batches"]) == len(doc["batches"])
        assert agreement["max_loss_rel"] <= agreement["rtol"] and agreement["max_grad_rel"] <= agreement["rtol"]
        for b in agreement["batches"]:
            assert b["measured_divisor"] == pytest.approx(b["divisor"], rel=1e-9)
    torch_source = doc["translations"][0]
    assert torch_source["role"] == "source" and torch_source["native"]


@needs_all
def test_keras_sample_weighted_mean_divides_by_n_and_says_so():
    """Keras 'sum_over_batch_size' with sample weights divides by N, not by the sum of the weights."""
    report = tr.translate("keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits, "
                          "sample_weight=w)", to=("torch",))
    assert report.status == "match", tr.render_text(report)
    keras_source, torch_target = report.translations
    for b, batch in zip(keras_source.batches, report.batches):
        n_elements = int(np.prod(batch.logits.shape[:-1]))
        assert b.measured_divisor == pytest.approx(n_elements, rel=1e-9)
        assert b.measured_divisor != pytest.approx(float(np.sum(batch.sample_weight)), rel=1e-3)
    assert not torch_target.rendering.native  # torch losses take no sample weights


@needs_all
def test_a_wrong_translation_is_caught(monkeypatch):
    """A translation that divides by N instead of the valid count must fail on padded batches."""
    real = tr.loss_module

    class Wrong:
        @staticmethod
        def parse(expr, targets=None):
            return real("jax").parse(expr, targets)

        @staticmethod
        def render(sem):
            return real("jax").render(dataclasses.replace(sem, divisor="count"))

    monkeypatch.setattr(tr, "loss_module", lambda fw: Wrong if fw == "jax" else real(fw))
    report = tr.translate("torch.nn.CrossEntropyLoss(ignore_index=-100)", to=("jax",))
    assert report.status == "mismatch" and report.exit_code == 1
    jax_target = report.translations[1]
    assert jax_target.status == "mismatch" and any(not b.agree for b in jax_target.batches)
    assert report.translations[0].status == "ok"


def test_translate_modules_import_no_framework():
    code = ("import sys, gradparity.commands.translate\n"
            "from gradparity.commands.translate import loss_module\n"
            "[loss_module(f) for f in ('torch', 'keras', 'jax')]\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'tensorflow', 'keras', 'jax', 'optax', 'flax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    assert out.stdout.strip() == "[]"


LOSS_TABLE_PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "docs", "commands", "loss-table.md")


@needs_all
def test_readme_equivalence_table_is_the_commands_output():
    """The docs' table (docs/commands/loss-table.md) is generated by `gradparity loss-table`: every row matches,
    and the copy is current."""
    proc = gradparity("loss-table")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "DIFFERS" not in proc.stdout and proc.stdout.count("matches |") == 3 * len(tr.TABLE_SOURCES)
    text = open(LOSS_TABLE_PAGE, encoding="utf-8").read()
    start = text.index("<!-- loss-table:start -->\n") + len("<!-- loss-table:start -->\n")
    end = text.index("<!-- loss-table:end -->")
    assert text[start:end].strip() == proc.stdout.strip(), \
        "docs/commands/loss-table.md's table is stale: paste `gradparity loss-table`"


@needs_all
def test_every_table_configuration_matches_in_float32_within_float32_rounding():
    """The same 13 configurations computed in float32 by each framework, against float64 on the rounded batches."""
    reports = tr.translate_many(list(tr.TABLE_SOURCES), dtype="float32")
    for r in reports:
        assert r.status == "match", tr.render_text(r)
        for t in r.translations:
            assert t.environment["dtype"] == "float32"
            assert t.rtol == pytest.approx(Tolerance(SAFETY, 105, 2).rtol(2.0 ** -24))
            worst = max(max(b.loss_rel, b.grad_rel) for b in t.batches)
            assert 0 < worst < t.rtol  # really float32 arithmetic (not exact), within its bound
    assert all(b.logits.dtype == np.float32 for b in reports[0].batches)


@pytest.mark.frameworks("torch", "jax", "keras-tensorflow", "tf-keras")
def test_legacy_reduction_enum_is_read_as_tf_keras_and_measured():
    report = tr.translate("tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, "
                          "reduction=tf.keras.losses.Reduction.AUTO)(y, logits, sample_weight=w)",
                          to=("torch", "keras"))
    assert report.framework == "tf_keras" and report.status == "match", tr.render_text(report)
    source = report.translations[0]
    assert source.backend == "tf-keras" and source.rendering.native
    for b, batch in zip(source.batches, report.batches):  # AUTO = SUM_OVER_BATCH_SIZE: divides by the elements
        assert b.measured_divisor == pytest.approx(np.prod(batch.logits.shape[:-1]), rel=1e-9)


def _outcome(rows: dict) -> "tr.BackendOutcome":
    from gradparity.run.execute import BackendOutcome, MethodOutcome

    methods = {case: MethodOutcome("ok", loss, grads={"logits": grad}) for case, (loss, grad) in rows.items()}
    return BackendOutcome("fake", "ok", None, {"dtype": "float64"}, methods, 0.0)


def test_measured_divisor_is_the_frameworks_own_sum_over_its_loss():
    """The measured divisor comes from the worker's numbers (its weighted sum / its loss), not the reference's:
    a framework whose sum disagrees with the reference's numerator is a mismatch even when its loss matches."""
    from gradparity.reference.losses import reduce_loss
    from gradparity.losses.batches import generate_batches
    from gradparity.losses.catalogue import LossSemantics

    sem = LossSemantics("cross_entropy", "valid", ignore_index=-100)
    batch = generate_batches(sem, seed=3)[0]
    ref_loss, ref_grad, d = reduce_loss(sem, batch.logits, batch.targets)
    reference = {batch.name: (ref_loss, ref_grad, d)}
    rendering = tr.loss_module("torch").render(sem)

    honest = tr.Translation(rendering, "target", "fake")
    tr.measure(honest, _outcome({f"L0@{batch.name}": (ref_loss, ref_grad),
                                 f"S0@{batch.name}": (ref_loss * d, ref_grad * d)}),
               "L0", [batch], reference, sum_case="S0")
    (row,) = honest.batches
    assert honest.status == "ok" and row.measured_divisor == pytest.approx(d, rel=1e-12)
    assert d == np.sum(batch.targets != -100) and row.numerator_rel <= 1e-15

    # A framework that sums 1.5 times too much and divides by 1.5 times more: the same loss, another divisor.
    inflated = tr.Translation(rendering, "target", "fake")
    tr.measure(inflated, _outcome({f"L0@{batch.name}": (ref_loss, ref_grad),
                                   f"S0@{batch.name}": (1.5 * ref_loss * d, ref_grad)}),
               "L0", [batch], reference, sum_case="S0")
    (row,) = inflated.batches
    assert row.measured_divisor == pytest.approx(1.5 * d, rel=1e-12)
    assert row.loss_rel <= 1e-15 and row.numerator_rel == pytest.approx(1 / 3, rel=1e-12)
    assert inflated.status == "mismatch"
