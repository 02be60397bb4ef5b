"""The JAX loss module: reading optax texts, rendering any LossSemantics in JAX, and running the renderings.

Every rendering of a grid over the whole loss catalogue runs in one real jax
worker (float64) and must equal the numpy reference in loss and in d loss /
d logits, on (N, C) and (N, T, C) batches whose divisors differ.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gradparity.backends import BACKENDS
from gradparity.backends.jax.loss_text import parse, render
from gradparity.reference.losses import reduce_loss
from gradparity.errors import ConfigError
from gradparity.losses.batches import DEFAULT_SHAPES, LossBatch, generate_batches, make_loss_job
from gradparity.losses.catalogue import DIVISORS, LOSSES, LossSemantics
from gradparity.losses.text import parse_loss_text
from gradparity.run.execute import run_backend

needs_jax = pytest.mark.frameworks("jax")

CW = (1.0, 2.0, 0.5, 3.0, 1.5)
PW = (1.0, 2.0, 3.0, 0.5, 1.0)
ELEMENTWISE = ("binary_cross_entropy", "mse", "l1", "huber")


def sem_id(s: LossSemantics) -> str:
    return (f"{s.kind}-{s.divisor}-{s.last_axis}{'-w' if s.sample_weight else ''}{'-cw' if s.class_weight else ''}"
            f"{'-ls' if s.label_smoothing else ''}{'-ign' if s.ignore_index is not None else ''}"
            f"{'-pw' if s.pos_weight else ''}{f'-d{s.delta:g}' if s.delta != 1.0 else ''}")


# --------------------------------------------------------------------------------------------------------
# parse
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()",
     LossSemantics("cross_entropy", "count")),
    ("jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))",
     LossSemantics("cross_entropy", "one")),
    ("optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1).sum()",
     LossSemantics("cross_entropy", "one")),
    ("optax.softmax_cross_entropy(logits, labels).mean()", LossSemantics("cross_entropy_probs", "count")),
    ("jnp.mean(optax.softmax_cross_entropy(logits, optax.smooth_labels(labels, 0.1)))",
     LossSemantics("cross_entropy_probs", "count", label_smoothing=0.1)),
    ("optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(y, 5), alpha=0.2)).sum()",
     LossSemantics("cross_entropy", "one", label_smoothing=0.2)),
    ("optax.sigmoid_binary_cross_entropy(logits, labels).sum()", LossSemantics("binary_cross_entropy", "one")),
    ("jax.numpy.mean(optax.squared_error(predictions, targets))", LossSemantics("mse", "count")),
    ("optax.huber_loss(predictions, targets).mean()", LossSemantics("huber", "count")),
    ("optax.huber_loss(predictions, targets, delta=0.5).sum()", LossSemantics("huber", "one", delta=0.5)),
    ("optax.huber_loss(predictions - targets, delta=2).mean()", LossSemantics("huber", "count", delta=2.0)),
    ("jnp.mean(jnp.abs(predictions - targets))", LossSemantics("l1", "count")),
    ("jnp.abs(targets - predictions).sum()", LossSemantics("l1", "one")),
])
def test_parse_reads_optax_texts(text, expected):
    assert parse(parse_loss_text(text)) == expected


def test_parse_accepts_an_agreeing_targets_hint_only():
    expr = parse_loss_text("optax.softmax_cross_entropy(logits, labels).mean()")
    assert parse(expr, "probabilities").kind == "cross_entropy_probs"
    with pytest.raises(ConfigError, match="contradicts optax.softmax_cross_entropy"):
        parse(expr, "class_index")
    expr = parse_loss_text("optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()")
    assert parse(expr, "class_index").kind == "cross_entropy"
    with pytest.raises(ConfigError, match="class_index targets"):
        parse(expr, "probabilities")
    with pytest.raises(ConfigError, match="contradicts jnp.abs"):
        parse(parse_loss_text("jnp.abs(p - t).mean()"), "class_index")


@pytest.mark.parametrize("text,message", [
    ("optax.softmax_cross_entropy_with_integer_labels(logits, labels)", "write how you reduce it, with .mean()"),
    ("optax.squared_error(predictions, targets)", "jnp.mean(...)"),
    ("optax.l2_loss(predictions, targets).mean()", "0.5 * squared_error"),
    ("optax.l2_loss(predictions, targets).mean()", "optax.squared_error"),
    ("optax.log_cosh(predictions, targets).mean()", "does not know the JAX loss 'optax.log_cosh'"),
    ("optax.huber_loss(predictions, targets, dlta=0.5).mean()", "unknown keyword(s) dlta"),
    ("optax.sigmoid_binary_cross_entropy(logits, labels, reduction='mean').mean()", "no keyword options"),
    ("optax.softmax_cross_entropy(logits, labels, axis=1).mean()", "only axis=-1"),
    ("optax.softmax_cross_entropy_with_integer_labels(logits, labels, where=m).mean()", "'m' is a name"),
    ("optax.softmax_cross_entropy_with_integer_labels(logits, labels, where=[1, 0]).mean()", "(where=...) is not read"),
    ("optax.huber_loss(predictions, targets, delta=-1.0).mean()", "positive finite number"),
    ("optax.huber_loss(predictions, targets, delta=[1.0]).mean()", "positive finite number"),
    ("optax.softmax_cross_entropy_with_integer_labels(logits).mean()", "two positional arrays"),
    ("optax.softmax_cross_entropy(logits, labels, -1).mean()", "two positional arrays"),
    ("optax.sigmoid_binary_cross_entropy(logits, optax.smooth_labels(labels, 0.1)).mean()", "alpha / 2"),
    ("optax.softmax_cross_entropy(logits, optax.smooth_labels(labels, a)).mean()", "must be a number"),
    ("optax.softmax_cross_entropy(logits, optax.smooth_labels(labels, 1.5)).mean()", "[0, 1]"),
    ("jnp.mean(jnp.abs(predictions))", "jnp.abs(predictions - targets)"),
    ("jnp.abs(predictions, targets).sum()", "jnp.abs(predictions - targets)"),
    ("optax.softmax_cross_entropy_with_integer_labels(logits, labels)(x).mean()", "not a loss object"),
])
def test_parse_errors_are_config_errors_that_say_what_to_do(text, message):
    with pytest.raises(ConfigError) as info:
        parse(parse_loss_text(text))
    assert message in str(info.value)


def test_parse_rejects_other_frameworks():
    with pytest.raises(ConfigError, match="not a JAX/optax loss"):
        parse(parse_loss_text("torch.nn.CrossEntropyLoss()"))


# --------------------------------------------------------------------------------------------------------
# render (text only: no jax needed)
# --------------------------------------------------------------------------------------------------------

def semantics_grid() -> list[LossSemantics]:
    """Every kind with its options off, one at a time and all together; every divisor rule that makes
    sense for the kind, with and without sample weights, on both last-axis conventions.

    The rule x weights product runs in full for no options and for all options together; single
    options get the plainest rule and the most batch-dependent ones.
    """
    out = []
    for kind, loss in LOSSES.items():
        rules = [r for r in DIVISORS if r != "class_weight_sum" or kind == "cross_entropy"]
        singles = []
        if "class_weight" in loss.options:
            singles.append({"class_weight": CW})
        if "label_smoothing" in loss.options:
            singles.append({"label_smoothing": 0.2})
        if "pos_weight" in loss.options:
            singles.append({"pos_weight": PW})
        if "ignore_index" in loss.options:
            singles.append({"ignore_index": -100})
        if "delta" in loss.options:
            singles.append({"delta": 0.7})
        rich = {k: v for s in singles for k, v in s.items()}
        if kind == "cross_entropy":
            rich["label_smoothing"] = 0.1
        axes = ("elementwise", "mean") if kind in ELEMENTWISE else ("elementwise",)
        full = [{}] + ([rich] if rich else [])
        for opt, axis, rule, weighted in itertools.product(full, axes, rules, (False, True)):
            out.append(LossSemantics(kind, rule, last_axis=axis, sample_weight=weighted, **opt))
        single_rules = [("count", False), ("one", True), ("keras_sample_weight_sum", True)]
        if kind == "cross_entropy":
            single_rules += [("class_weight_sum", False), ("valid", True)]
        for opt, axis, (rule, weighted) in itertools.product(singles, axes, single_rules):
            if len(singles) > 1 or opt != rich:  # a lone option is already the rich set
                out.append(LossSemantics(kind, rule, last_axis=axis, sample_weight=weighted, **opt))
    return list(dict.fromkeys(out))


GRID = semantics_grid()


def test_grid_covers_the_catalogue():
    assert {s.kind for s in GRID} == set(LOSSES)
    for kind in LOSSES:
        mine = [s for s in GRID if s.kind == kind]
        rules = {s.divisor for s in mine}
        assert rules == set(DIVISORS) - ({"class_weight_sum"} if kind != "cross_entropy" else set())
        for option in LOSSES[kind].options:
            default = LossSemantics(kind, "one")
            assert any(getattr(s, option) != getattr(default, option) for s in mine), (kind, option)
        if kind in ELEMENTWISE:
            assert {s.last_axis for s in mine} == {"elementwise", "mean"}


@pytest.mark.parametrize("sem", GRID, ids=sem_id)
def test_every_rendering_is_self_contained_source(sem):
    r = render(sem)
    assert r.framework == "jax"
    assert r.function.startswith("import numpy as np\nimport jax\nimport jax.numpy as jnp\nimport optax\n")
    assert "def loss_fn(logits, targets, sample_weight=None):" in r.function
    compile(r.function, "<rendering>", "exec")
    for line in r.code.strip().splitlines():  # the pasted code is the function's body
        assert f"    {line}\n" in r.function
    assert r.notes and "per element" in r.notes[0]
    assert not re.search(r"(?<!j)np\.", r.function.split("def loss_fn", 1)[1])  # jnp only: traceable


@pytest.mark.parametrize("sem,code", [
    (LossSemantics("cross_entropy", "count"),
     "loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()"),
    (LossSemantics("cross_entropy", "valid"),  # nothing is ignored: 'valid' is the count
     "loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()"),
    (LossSemantics("cross_entropy", "one", label_smoothing=0.1),
     "loss = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1], "
     "dtype=logits.dtype), 0.1)).sum()"),
    (LossSemantics("cross_entropy_probs", "count", label_smoothing=0.2),
     "loss = optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, 0.2)).mean()"),
    (LossSemantics("binary_cross_entropy", "count", last_axis="mean"),
     "loss = optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=-1).mean()"),
    (LossSemantics("mse", "one"), "loss = optax.squared_error(logits, targets).sum()"),
    (LossSemantics("huber", "count", delta=0.7), "loss = optax.huber_loss(logits, targets, delta=0.7).mean()"),
    (LossSemantics("mse", "keras_sample_weight_sum"), "loss = optax.squared_error(logits, targets).mean()"),
])
def test_native_renderings(sem, code):
    r = render(sem)
    assert r.native and r.code.strip() == code


@pytest.mark.parametrize("sem,needles", [
    (LossSemantics("cross_entropy", "valid", ignore_index=-100),
     ["labels = jnp.where(valid, targets, 0)", "divisor = jnp.sum(mask)", "ignore_index", "changes from batch"]),
    (LossSemantics("cross_entropy", "class_weight_sum", class_weight=CW, ignore_index=-100),
     ["class_weight[labels] * optax.softmax_cross_entropy_with_integer_labels",
      "jnp.sum(class_weight[labels] * mask)"]),
    (LossSemantics("cross_entropy", "count", class_weight=CW, label_smoothing=0.1),
     ["optax.softmax_cross_entropy(logits, class_weight * q)", "inside the sum over classes"]),
    (LossSemantics("binary_cross_entropy", "count", label_smoothing=0.1),
     ["labels = targets * 0.9 + 0.05", "eps / C"]),
    (LossSemantics("binary_cross_entropy", "one", pos_weight=PW), ["pos_weight *", "jax.nn.log_sigmoid"]),
    (LossSemantics("mse", "keras_sample_weight_sum", sample_weight=True),
     ["divisor = jnp.sum(sample_weight)", "summed over N only"]),
    (LossSemantics("mse", "sample_weight_sum", sample_weight=True, last_axis="mean"),
     ["jnp.mean(per_entry, axis=-1)", "divisor = jnp.sum(weight)", "trailing axes"]),
    (LossSemantics("l1", "count"), ["jnp.abs(logits - targets)", "no L1 loss"]),
])
def test_explicit_renderings_write_out_what_optax_lacks(sem, needles):
    r = render(sem)
    assert not r.native
    text = r.code + "\n".join(r.notes)
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.mark.parametrize("sem", [s for s in GRID if render(s).native and s.last_axis == "elementwise"], ids=sem_id)
def test_native_code_reads_back_as_the_same_semantics(sem):
    """A native rendering is an optax text itself: parsing it gives back the semantics (up to equivalent rules)."""
    code = render(sem).code.strip().removeprefix("loss = ")
    back = parse(parse_loss_text(code))
    assert render(back).code == render(sem).code
    assert dataclasses.replace(back, divisor=sem.divisor) == sem


def test_render_rejects_semantics_outside_the_catalogue():
    """The catalogue's own check runs first (its cases: tests/test_loss_reference.py)."""
    with pytest.raises(ConfigError, match="takes no ignore_index"):
        render(LossSemantics("cross_entropy_probs", "count", ignore_index=-100))


def test_module_imports_no_framework():
    code = ("import sys, gradparity.backends.jax.loss_text\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'optax', 'flax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------------
# execute: every rendering in the real jax worker against the float64 reference
# --------------------------------------------------------------------------------------------------------

SHAPES = (DEFAULT_SHAPES[0], DEFAULT_SHAPES[3])  # (6, 5) and (3, 7, 5)


def _batches(sem: LossSemantics) -> list[LossBatch]:
    """The generated batches of ``sem``, named by what they depend on, plus (N, T) sample weights."""
    key = f"{sem.kind}-{'pad' if sem.ignore_index is not None else 'nopad'}-{'sw' if sem.sample_weight else 'nosw'}"
    out = [dataclasses.replace(b, name=f"{key}-{b.name}") for b in generate_batches(sem, seed=5, shapes=SHAPES)]
    if sem.sample_weight:  # per-token weights on the (N, T, C) batch
        b = out[-1]
        w = np.random.default_rng(7).uniform(0.25, 2.0, b.logits.shape[:-1])
        out.append(LossBatch(f"{key}-tokens", b.logits, b.targets, w))
    return out


@pytest.fixture(scope="module")
def grid_run():
    """One float64 jax worker for the whole grid: (outcome, {case: (reference loss, reference grad)})."""
    functions, batches, cases, reference = {}, {}, [], {}
    for i, sem in enumerate(GRID):
        functions[f"F{i}"] = render(sem).function
        for b in _batches(sem):
            batches[b.name] = b
            case = f"F{i}@{b.name}"
            cases.append(case)
            loss, grad, _ = reduce_loss(sem, b.logits, b.targets, b.sample_weight if sem.sample_weight else None)
            reference[case] = (loss, grad)
    job = make_loss_job(BACKENDS["jax"], functions, list(batches.values()), cases=tuple(cases))
    outcome = run_backend(job, BACKENDS["jax"], timeout_s=300)
    assert outcome.status == "ok", outcome.error
    return outcome, reference


@needs_jax
def test_worker_environment(grid_run):
    env = grid_run[0].environment
    assert {"framework", "versions", "device", "device_kind", "device_note", "dtype", "precision",
            "tf32"} <= set(env)
    assert env["framework"] == "jax" and env["dtype"] == "float64" and env["device"] == "cpu"
    assert env["tf32"] is False and "optax" in env["versions"]


@needs_jax
@pytest.mark.parametrize("i", range(len(GRID)), ids=[sem_id(s) for s in GRID])
def test_rendering_matches_the_reference(grid_run, i):
    outcome, reference = grid_run
    mine = [c for c in reference if c.startswith(f"F{i}@")]
    assert len(mine) >= 2
    for case in mine:
        row = outcome.methods[case]
        assert row.status == "ok", f"{case}: {row.error}"
        ref_loss, ref_grad = reference[case]
        assert row.loss == pytest.approx(ref_loss, rel=1e-12, abs=0), case
        grad = row.grads["logits"]
        assert grad.shape == ref_grad.shape
        scale = np.max(np.abs(ref_grad))
        assert np.max(np.abs(grad - ref_grad)) <= 1e-10 * scale, case


_DIRECT = r"""
import json, sys
import numpy as np
import jax
from gradparity.backends.protocol import compile_loss_function
cases = json.loads(sys.stdin.read())
out = []
for c in cases:
    fn = compile_loss_function(c["function"])
    z, t = np.asarray(c["logits"]), np.asarray(c["targets"], dtype=c["targets_dtype"])
    s = None if c["sample_weight"] is None else np.asarray(c["sample_weight"])
    loss = fn(z, t, s)                                   # numpy arrays in
    grad = jax.grad(fn)(z, t, s)                         # jax.grad, op by op
    jit_loss, jit_grad = jax.jit(jax.value_and_grad(fn))(z, t, s)   # and compiled
    out.append({"shape": list(loss.shape), "type": type(loss).__module__, "loss": float(loss),
                "grad": np.asarray(grad).tolist(), "jit_loss": float(jit_loss),
                "jit_grad": np.asarray(jit_grad).tolist()})
print(json.dumps(out))
"""


@needs_jax
def test_functions_take_numpy_arrays_and_jit():
    """Straight from numpy arrays, under jax.grad and under jax.jit: a 0-d jax array equal to the reference."""
    picks = [LossSemantics("cross_entropy", "class_weight_sum", class_weight=CW, ignore_index=-100,
                           label_smoothing=0.1, sample_weight=True),
             LossSemantics("binary_cross_entropy", "keras_sample_weight_sum", pos_weight=PW, label_smoothing=0.2,
                           last_axis="mean", sample_weight=True),
             LossSemantics("huber", "count", delta=0.7)]
    cases, expected = [], []
    for sem in picks:
        for b in generate_batches(sem, seed=9, shapes=SHAPES):
            s = b.sample_weight if sem.sample_weight else None
            cases.append({"function": render(sem).function, "logits": b.logits.tolist(),
                          "targets": b.targets.tolist(), "targets_dtype": str(b.targets.dtype),
                          "sample_weight": None if s is None else s.tolist()})
            expected.append(reduce_loss(sem, b.logits, b.targets, s))
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _DIRECT], input=json.dumps(cases), capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for got, (ref_loss, ref_grad, _) in zip(json.loads(proc.stdout), expected):
        assert got["shape"] == [] and got["type"].startswith("jax")
        for loss, grad in ((got["loss"], got["grad"]), (got["jit_loss"], got["jit_grad"])):
            assert loss == pytest.approx(ref_loss, rel=1e-12)
            assert np.max(np.abs(np.asarray(grad) - ref_grad)) <= 1e-10 * np.max(np.abs(ref_grad))


@needs_jax
def test_float64_without_x64_is_a_clear_error():
    sem = LossSemantics("mse", "count")
    b = generate_batches(sem, shapes=SHAPES[:1])
    job = make_loss_job(BACKENDS["jax"], {"F": render(sem).function}, b)
    outcome = run_backend(job, BACKENDS["jax"], timeout_s=120, extra_env={"JAX_ENABLE_X64": "0"})
    assert outcome.status == "error" and "JAX_ENABLE_X64=1" in outcome.error
