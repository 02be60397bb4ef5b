"""PyTorch losses: reading torch.nn loss texts, rendering any LossSemantics as torch code, running it.

The renderings are run in the real torch worker (one process for the whole
grid) and checked against the float64 numpy reference, loss and d loss / d
logits, on (N, C) and (N, T, C) batches with padding and sample weights.
"""
import subprocess
import sys

import numpy as np
import pytest

from gradparity.backends import BACKENDS
from gradparity.reference.losses import reduce_loss
from gradparity.backends.torch.loss_text import parse, render
from gradparity.errors import ConfigError
from gradparity.losses.batches import generate_batches, make_loss_job
from gradparity.losses.catalogue import DIVISORS, LOSSES, LossSemantics
from gradparity.losses.text import parse_loss_text

needs_torch = pytest.mark.frameworks("torch")

from loss_grid import PW5, W5, grid_batches, grid_id, semantics_grid


def read(text, targets=None, arrays=None):
    return parse(parse_loss_text(text, arrays), targets)


# ------------------------------------------------------------------------------------------------ parse


@pytest.mark.parametrize("text,targets,expected", [
    ("torch.nn.CrossEntropyLoss()", None, LossSemantics("cross_entropy", "class_weight_sum", ignore_index=-100)),
    ("nn.CrossEntropyLoss(reduction='sum')", "class_index",
     LossSemantics("cross_entropy", "one", ignore_index=-100)),
    ("torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=0, label_smoothing=0.1)", None,
     LossSemantics("cross_entropy", "class_weight_sum", class_weight=(1.0, 2.0, 0.5), ignore_index=0,
                   label_smoothing=0.1)),
    ("torch.nn.CrossEntropyLoss(torch.tensor([1, 2]))", None,  # weight is the first positional parameter
     LossSemantics("cross_entropy", "class_weight_sum", class_weight=(1.0, 2.0), ignore_index=-100)),
    ("torch.nn.CrossEntropyLoss(label_smoothing=0.2)", "probabilities",
     LossSemantics("cross_entropy_probs", "count", label_smoothing=0.2)),
    ("torch.nn.CrossEntropyLoss(weight=[2.0, 1.0], reduction='sum')", "probabilities",
     LossSemantics("cross_entropy_probs", "one", class_weight=(2.0, 1.0))),
    ("torch.nn.CrossEntropyLoss(reduction='none')(logits, targets).mean()", None,
     LossSemantics("cross_entropy", "count", ignore_index=-100)),
    ("torch.nn.CrossEntropyLoss()(logits, targets)", None,
     LossSemantics("cross_entropy", "class_weight_sum", ignore_index=-100)),
    ("torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 3.0]))", None,
     LossSemantics("binary_cross_entropy", "count", pos_weight=(1.0, 3.0))),
    ("torch.nn.BCEWithLogitsLoss(weight=w, reduction='sum')", None,
     LossSemantics("binary_cross_entropy", "one", class_weight=(0.5, 2.0))),
    ("torch.nn.BCEWithLogitsLoss(reduction='none')(input=logits, target=y).sum()", None,
     LossSemantics("binary_cross_entropy", "one")),
    ("torch.nn.MSELoss()", None, LossSemantics("mse", "count")),
    ("torch.nn.MSELoss(reduction='sum')", "probabilities", LossSemantics("mse", "one")),
    ("torch.nn.modules.loss.L1Loss()", None, LossSemantics("l1", "count")),
    ("torch.nn.HuberLoss(delta=0.5)", None, LossSemantics("huber", "count", delta=0.5)),
    ("torch.nn.HuberLoss('sum', 2)", None, LossSemantics("huber", "one", delta=2.0)),
])
def test_parse(text, targets, expected):
    assert read(text, targets, {"w": np.array([0.5, 2.0])}) == expected


def test_parse_a_bare_class_name():
    from gradparity.losses.text import LossExpression

    assert parse(LossExpression("torch", "CrossEntropyLoss", kwargs={"reduction": "sum"})) == \
        LossSemantics("cross_entropy", "one", ignore_index=-100)


@pytest.mark.parametrize("text,targets,message", [
    ("torch.nn.CrossEntropyLoss(reduction='none')", None, "reduction='none'"),
    ("torch.nn.MSELoss(reduction='none')(logits, y)", None, "write the reduction you apply"),
    ("torch.nn.CrossEntropyLoss(reduction='avg')", None, "reduction must be 'mean', 'sum' or 'none'"),
    ("torch.nn.CrossEntropyLoss(size_average=False)", None, "'size_average' is deprecated"),
    ("torch.nn.MSELoss(reduce=False)", None, "'reduce' is deprecated"),
    ("torch.nn.CrossEntropyLoss(None, None, -100, False)", None, "'reduce' is deprecated"),
    ("torch.nn.NLLLoss()", None, "log-probabilities"),
    ("torch.nn.BCELoss()", None, "BCEWithLogitsLoss"),
    ("torch.nn.SmoothL1Loss(beta=0.5)", None, "HuberLoss"),
    ("torch.nn.NotALoss()", None, "'torch.nn.NotALoss' is not a PyTorch loss"),
    ("torch.nn.functional.cross_entropy(1, 2)", None, "functional form"),
    ("torch.nn.CrossEntropyLoss(smoothing=0.1)", None, "no option 'smoothing'"),
    ("torch.nn.HuberLoss(beta=0.5)", None, "no option 'beta'"),
    ("torch.nn.CrossEntropyLoss(label_smoothing=1.5)", None, "label_smoothing must be a number in [0, 1]"),
    ("torch.nn.CrossEntropyLoss(label_smoothing='0.1')", None, "label_smoothing"),
    ("torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, -2.0]))", None, "non-negative"),
    ("torch.nn.CrossEntropyLoss(weight=torch.tensor(2.0))", None, "one weight per class"),
    ("torch.nn.CrossEntropyLoss(weight=[[1.0], [2.0]])", None, "1-D list"),
    ("torch.nn.BCEWithLogitsLoss(pos_weight=[1.0, -1.0])", None, "pos_weight must be finite and non-negative"),
    ("torch.nn.CrossEntropyLoss(ignore_index=1.5)", None, "ignore_index must be an integer"),
    ("torch.nn.CrossEntropyLoss(ignore_index=-100)", "probabilities", "ignore_index applies to class-index"),
    ("torch.nn.HuberLoss(delta=0)", None, "delta must be a positive number"),
    ("torch.nn.HuberLoss(delta=-1.0)", None, "delta must be a positive number"),
    ("torch.nn.MSELoss('mean', 1, 2, 3)", None, "at most 3 positional"),
    ("torch.nn.CrossEntropyLoss(torch.tensor([1.0]), weight=[1.0])", None, "two values for 'weight'"),
    ("torch.nn.CrossEntropyLoss()(logits, targets, w)", None, "no sample weight"),
    ("torch.nn.CrossEntropyLoss()(logits, targets, sample_weight=w)", None, "no sample weight"),
    ("torch.nn.MSELoss()(logits)", None, "two arguments"),
    ("torch.nn.MSELoss()(logits, y, foo=1)", None, "no call argument 'foo'"),
    ("torch.nn.CrossEntropyLoss().mean()", None, "has no .mean()"),
    ("torch.nn.CrossEntropyLoss()", "soft", "targets hint"),
])
def test_parse_errors_name_the_option(text, targets, message):
    with pytest.raises(ConfigError) as err:
        read(text, targets)
    assert message in str(err.value), str(err.value)


# ----------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize("sem,constructor", [
    (LossSemantics("cross_entropy", "class_weight_sum", ignore_index=-100), "torch.nn.CrossEntropyLoss()"),
    (LossSemantics("cross_entropy", "valid", ignore_index=-100), "torch.nn.CrossEntropyLoss()"),
    (LossSemantics("cross_entropy", "count"), "torch.nn.CrossEntropyLoss()"),
    (LossSemantics("cross_entropy", "keras_sample_weight_sum"), "torch.nn.CrossEntropyLoss()"),
    (LossSemantics("cross_entropy", "class_weight_sum", class_weight=W5, ignore_index=-100, label_smoothing=0.1),
     "torch.nn.CrossEntropyLoss(weight=class_weight, label_smoothing=0.1)"),
    (LossSemantics("cross_entropy", "one", class_weight=W5), "torch.nn.CrossEntropyLoss(weight=class_weight, "
                                                              "reduction='sum')"),
    (LossSemantics("cross_entropy_probs", "count", class_weight=W5), "torch.nn.CrossEntropyLoss(weight=class_weight)"),
    (LossSemantics("binary_cross_entropy", "count", class_weight=W5, pos_weight=PW5),
     "torch.nn.BCEWithLogitsLoss(weight=class_weight, pos_weight=pos_weight)"),
    (LossSemantics("mse", "one"), "torch.nn.MSELoss(reduction='sum')"),
    (LossSemantics("l1", "sample_weight_sum"), "torch.nn.L1Loss()"),
    (LossSemantics("huber", "count", delta=0.7), "torch.nn.HuberLoss(delta=0.7)"),
])
def test_native_renderings_use_the_loss_object(sem, constructor):
    r = render(sem)
    assert r.framework == "torch" and r.native, r.code
    assert constructor in r.code and "torch.nn." in r.code
    assert "reduction='none'" not in r.code and "divisor" not in r.code
    assert r.function.startswith("import numpy as np\nimport torch\n")
    assert "def loss_fn(logits, targets, sample_weight=None):" in r.function


@pytest.mark.parametrize("sem,must_say", [
    (LossSemantics("cross_entropy", "valid", class_weight=W5, ignore_index=-100), "valid.sum()"),
    (LossSemantics("cross_entropy", "count", ignore_index=-100), "per_element.numel()"),
    (LossSemantics("cross_entropy", "class_weight_sum", ignore_index=-100, sample_weight=True), "valid.sum()"),
    (LossSemantics("cross_entropy", "keras_sample_weight_sum", sample_weight=True), "sample_weight.sum()"),
    (LossSemantics("binary_cross_entropy", "count", label_smoothing=0.1), "0.5 * 0.1"),
    (LossSemantics("cross_entropy", "keras_sample_weight_sum", ignore_index=-1), "divide_no_nan"),
    (LossSemantics("mse", "count", last_axis="mean"), ".mean(dim=-1)"),
    (LossSemantics("huber", "sample_weight_sum", sample_weight=True), "weight.expand_as(per_element).sum()"),
])
def test_explicit_renderings_write_the_arithmetic(sem, must_say):
    r = render(sem)
    assert not r.native and "reduction='none'" in r.code and must_say in r.code, r.code
    assert any("no " in n or "changes from batch to batch" in n for n in r.notes), r.notes


def test_batch_dependent_divisors_are_computed_and_said():
    r = render(LossSemantics("cross_entropy", "sample_weight_sum", class_weight=W5, ignore_index=-100,
                             sample_weight=True))
    assert "divisor = (weight * valid).sum()" in r.code
    assert any("changes from batch to batch" in n for n in r.notes)
    assert any("movedim(-1, 1)" in n for n in r.notes)


def test_render_rejects_semantics_no_framework_computes():
    """The catalogue's own check runs first (its cases: tests/test_loss_reference.py)."""
    with pytest.raises(ConfigError, match="takes no label_smoothing"):
        render(LossSemantics("mse", "count", label_smoothing=0.1))


def test_module_imports_no_torch():
    code = ("import sys, gradparity.backends.torch.loss_text as m\n"
            "from gradparity.losses.catalogue import LossSemantics\n"
            "m.render(LossSemantics('cross_entropy', 'valid', ignore_index=-100, sample_weight=True))\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- render -> run -> compare


GRID = semantics_grid()


@pytest.fixture(scope="module")
def grid_run():
    """Every rendering of GRID on its own batches, in one torch worker: (outcome, batches per semantics)."""
    from gradparity.run.execute import run_backend

    per_sem = [grid_batches("S", i, sem) for i, sem in enumerate(GRID)]
    functions = {f"S{i}": render(sem).function for i, sem in enumerate(GRID)}
    cases = tuple(f"S{i}@{b.name}" for i, batches in enumerate(per_sem) for b in batches)
    job = make_loss_job(BACKENDS["torch"], functions, [b for bs in per_sem for b in bs], cases=cases)
    outcome = run_backend(job, BACKENDS["torch"], timeout_s=300)
    assert outcome.status == "ok", outcome.error
    return outcome, per_sem


@needs_torch
@pytest.mark.parametrize("i", range(len(GRID)), ids=[grid_id(s) for s in GRID])
def test_rendering_matches_the_reference(grid_run, i):
    outcome, per_sem = grid_run
    sem = GRID[i]
    for b in per_sem[i]:
        row = outcome.methods[f"S{i}@{b.name}"]
        assert row.status == "ok", row.error
        ref_loss, ref_grad, _ = reduce_loss(sem, b.logits, b.targets, b.sample_weight if sem.sample_weight else None)
        np.testing.assert_allclose(row.loss, ref_loss, rtol=1e-12, err_msg=f"{b.name}\n{render(sem).code}")
        grad = np.asarray(row.grads["logits"])
        assert grad.shape == b.logits.shape and grad.dtype == np.float64
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-12 * np.abs(ref_grad).max(),
                                   err_msg=f"{b.name}\n{render(sem).code}")


@needs_torch
def test_worker_environment(grid_run):
    env = grid_run[0].environment
    assert env["framework"] == "torch" and env["dtype"] == "float64" and env["device_kind"] == "cpu"
    assert env["tf32"] is False and "torch" in env["versions"]
    assert {"device", "device_note", "precision"} <= set(env)


def test_grid_covers_native_and_explicit_forms():  # rendering only: no torch
    forms = {render(s).native for s in GRID}
    assert forms == {True, False}
    assert {s.kind for s in GRID} == set(LOSSES) and {s.divisor for s in GRID} == set(DIVISORS)


@needs_torch
def test_loss_fn_takes_numpy_or_tensors_and_keeps_the_dtype():
    import torch

    from gradparity.backends.protocol import compile_loss_function

    sem = LossSemantics("cross_entropy", "valid", class_weight=W5, ignore_index=-100, sample_weight=True)
    b = generate_batches(sem, seed=1, shapes=((3, 4, 5),))[0]
    fn = compile_loss_function(render(sem).function)
    from_numpy = fn(b.logits, b.targets, b.sample_weight)
    assert from_numpy.ndim == 0 and from_numpy.dtype == torch.float64
    z = torch.tensor(b.logits, requires_grad=True)
    loss = fn(z, torch.as_tensor(b.targets), torch.as_tensor(b.sample_weight))
    loss.backward()
    assert z.grad is not None and z.grad.shape == b.logits.shape
    assert loss.item() == pytest.approx(from_numpy.item(), rel=1e-14)
    assert fn(b.logits.astype(np.float32), b.targets, b.sample_weight).dtype == torch.float32
    with pytest.raises(ValueError, match="sample_weight"):
        fn(b.logits, b.targets)


@needs_torch
def test_parsed_torch_losses_are_native_and_agree_with_torch():
    """The parse of a text, rendered, is the very object the text builds, and torch computes the reference."""
    import torch

    texts = ["torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5]), label_smoothing=0.1)",
             "torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0]), reduction='sum')",
             "torch.nn.HuberLoss(delta=0.7)"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # so the texts' torch.tensor([...]) weights are float64
    try:
        for text in texts:
            sem = read(text)
            assert render(sem).native
            criterion = eval(text, {"torch": torch})  # noqa: S307 - the test's own literal texts
            for b in generate_batches(sem, seed=5, shapes=((7, 5), (4, 3, 5))):
                z = torch.tensor(b.logits, requires_grad=True)
                t = torch.as_tensor(b.targets)
                loss = criterion(z.movedim(-1, 1), t) if sem.kind == "cross_entropy" else criterion(z, t)
                loss.backward()
                ref_loss, ref_grad, _ = reduce_loss(sem, b.logits, b.targets)
                np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-12)
                np.testing.assert_allclose(z.grad.numpy(), ref_grad, rtol=1e-10,
                                           atol=1e-12 * np.abs(ref_grad).max())
    finally:
        torch.set_default_dtype(previous)


@needs_torch
@pytest.mark.parametrize("weighted", (False, True))
def test_keras_rule_on_an_all_ignored_batch_is_zero_as_in_keras(weighted):
    """Keras divides with divide_no_nan: a batch whose every target is ignored has loss 0, not 0/0."""
    import torch

    from gradparity.backends.protocol import compile_loss_function

    sem = LossSemantics("cross_entropy", "keras_sample_weight_sum", ignore_index=-100, sample_weight=weighted)
    fn = compile_loss_function(render(sem).function)
    z = torch.tensor(np.random.default_rng(0).standard_normal((2, 3, 4)), requires_grad=True)
    targets, weight = np.full((2, 3), -100), (np.array([0.5, 2.0]) if weighted else None)
    loss = fn(z, targets, weight)
    loss.backward()
    assert loss.item() == reduce_loss(sem, z.detach().numpy(), targets, weight)[0] == 0.0
    assert np.all(z.grad.numpy() == 0.0)
