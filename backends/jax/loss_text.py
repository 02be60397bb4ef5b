"""JAX loss texts, the parent half of the losses: read optax texts, write any ``LossSemantics`` as optax + jnp
code (the worker half, ``losses``, runs such code).

optax has no loss objects and no reductions: its losses return one value
per element (example, token, or entry) and the user reduces them with
``.mean()`` / ``.sum()`` / ``jnp.mean(...)`` / ``jnp.sum(...)``. So
``parse`` insists on a written reduction, and ``render`` always writes one
out; everything optax lacks (class weights, ``pos_weight``, binary label
smoothing, ignored classes, sample weights, divisors that depend on the
batch) becomes explicit jnp arithmetic inside the rendered ``loss_fn``.

This module imports neither jax nor optax: ``parse`` and ``render`` run in
the parent process; only ``losses.open_session`` (in the worker) imports them.
"""
from __future__ import annotations

import ast
import math

from gradparity.errors import ConfigError
from gradparity.losses.catalogue import DIVISORS, LOSSES, LossSemantics, Rendering, function_source
from gradparity.losses.text import LossExpression

# ----------------------------------------------------------------------------------------------------------
# parse: optax text -> LossSemantics
# ----------------------------------------------------------------------------------------------------------

#: optax per-element loss -> (LossSemantics kind, keyword options it may take besides its two arrays).
_OPTAX_FUNCTIONS = {
    "softmax_cross_entropy_with_integer_labels": ("cross_entropy", ("axis", "where")),
    "softmax_cross_entropy": ("cross_entropy_probs", ("axis", "where")),
    "sigmoid_binary_cross_entropy": ("binary_cross_entropy", ()),
    "squared_error": ("mse", ()),
    "huber_loss": ("huber", ("delta",)),
}
_ABS_NAMES = ("jnp.abs", "jax.numpy.abs")
_REDUCE_HINT = ".mean(), .sum(), jnp.mean(...) or jnp.sum(...)"


def _optax_name(name: str) -> str | None:
    """'optax.f' or 'optax.losses.f' -> 'f'; None for anything else."""
    for prefix in ("optax.losses.", "optax."):
        if name.startswith(prefix) and "." not in name[len(prefix):]:
            return name[len(prefix):]
    return None


def _source_call(source: str) -> tuple[str, ast.Call] | None:
    """(dotted callee, call node) when an argument's source text is a call, else None."""
    try:
        node = ast.parse(source, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call):
        return None
    return ast.unparse(node.func), node


def _is_difference(source: str) -> bool:
    """True when an argument's source text is 'a - b' (predictions minus targets, either order)."""
    try:
        node = ast.parse(source, mode="eval").body
    except SyntaxError:
        return False
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub)


def _literal_number(node: ast.AST, what: str) -> float:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        raise ConfigError(f"{what} must be a number written in the text, got {ast.unparse(node)!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    return float(value)


def _smoothing_of(labels_source: str) -> tuple[str, float]:
    """Peel ``optax.smooth_labels(x, alpha)`` off a labels argument: (inner source, alpha); alpha 0 if absent."""
    found = _source_call(labels_source)
    if not found or _optax_name(found[0]) != "smooth_labels":
        return labels_source, 0.0
    _, call = found
    alphas = call.args[1:2] + [k.value for k in call.keywords if k.arg == "alpha"]
    others = [k.arg for k in call.keywords if k.arg != "alpha"]
    if len(call.args) < 1 or len(alphas) != 1 or len(call.args) > 2 or others:
        raise ConfigError(f"cannot read {labels_source!r}: write optax.smooth_labels(labels, alpha) with a number "
                          "alpha (no axis= or where=)")
    alpha = _literal_number(alphas[0], "the alpha of optax.smooth_labels")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"optax.smooth_labels alpha must lie in [0, 1], got {alpha:g}")
    return ast.unparse(call.args[0]), alpha


def _is_one_hot(source: str) -> bool:
    found = _source_call(source)
    return bool(found) and found[0] in ("jax.nn.one_hot", "nn.one_hot")


def _check_targets_hint(kind: str, targets: str | None, label: str) -> None:
    """A --targets hint must agree with what the optax function takes (it decides the targets' form)."""
    if targets is None:
        return
    expected = LOSSES[kind].target
    if targets != expected:
        raise ConfigError(f"--targets {targets} contradicts {label}, which takes {expected} targets here; "
                          "drop --targets (the function already says what the targets are)")


def parse(expr: LossExpression, targets: str | None = None) -> LossSemantics:
    """The LossSemantics of an optax (or ``jnp.abs(a - b)``) per-element loss with a written reduction.

    Accepted: ``optax.softmax_cross_entropy_with_integer_labels(logits, labels)``,
    ``optax.softmax_cross_entropy(logits, labels)`` (labels optionally
    ``optax.smooth_labels(..., alpha)``, itself optionally of
    ``jax.nn.one_hot(y, C)``, which makes the targets class indices),
    ``optax.sigmoid_binary_cross_entropy(logits, labels)``,
    ``optax.squared_error(predictions, targets)``,
    ``optax.huber_loss(predictions, targets, delta=...)`` and
    ``jnp.abs(predictions - targets)``, each reduced with ``.mean()`` (divisor
    'count') or ``.sum()`` (divisor 'one'). ``targets`` is the --targets hint:
    it must agree with the function. Anything else is a ConfigError that says why.
    """
    if expr.framework != "jax":
        raise ConfigError(f"{expr.name} is not a JAX/optax loss (the jax reader got a {expr.framework} text)")
    if expr.call is not None:
        raise ConfigError(f"{expr.name}(...) is an optax function, not a loss object: call it once, "
                          f"e.g. optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()")
    short = _optax_name(expr.name)
    if expr.name in _ABS_NAMES:
        kind, allowed = "l1", ()
    elif short == "l2_loss":
        raise ConfigError("optax.l2_loss is 0.5 * squared_error, and gradparity's losses have no 0.5 factor "
                          "(its 'mse' is (z - t)^2, as torch's MSELoss and Keras' MeanSquaredError): write "
                          "optax.squared_error(predictions, targets) instead, and halve the result (or the "
                          "learning rate) yourself")
    elif short in _OPTAX_FUNCTIONS:
        kind, allowed = _OPTAX_FUNCTIONS[short]
    else:
        known = ", ".join(f"optax.{f}" for f in _OPTAX_FUNCTIONS)
        raise ConfigError(f"gradparity does not know the JAX loss {expr.name!r}; it reads {known} and "
                          "jnp.abs(predictions - targets)")

    label = "jnp.abs" if kind == "l1" else f"optax.{short}"
    if expr.method is None:
        raise ConfigError(f"{label} returns one loss per element, not a scalar: write how you reduce it, "
                          f"with {_REDUCE_HINT} (a mean divides by the element count, a sum by 1)")
    if expr.method not in ("mean", "sum"):
        raise ConfigError(f"unknown reduction {expr.method!r}: write {_REDUCE_HINT}")
    divisor = "count" if expr.method == "mean" else "one"

    unknown = sorted(set(expr.kwargs) - set(allowed))
    if unknown:
        accepted = ", ".join(f"{k}=" for k in allowed) or "no keyword options"
        raise ConfigError(f"{label} got unknown keyword(s) {', '.join(unknown)}: gradparity reads {accepted}")
    if expr.kwargs.get("axis", -1) != -1:
        raise ConfigError(f"{label}(axis={expr.kwargs['axis']!r}): gradparity's logits are channels-last, "
                          "so only axis=-1 (the default) is read")
    if expr.kwargs.get("where") is not None:
        raise ConfigError(f"{label}(where=...) is not read: a mask passed to optax zeroes masked elements but "
                          "a following .mean() still counts them; gradparity's masks come from an ignored "
                          "class (e.g. torch's ignore_index). Write the loss without where=")

    args = list(expr.args)
    if kind == "l1" and not (len(args) == 1 and _is_difference(args[0])):
        raise ConfigError("jnp.abs(...) is read as an L1 loss only when written jnp.abs(predictions - targets)")
    if kind in ("mse", "huber", "l1") and len(args) == 1 and _is_difference(args[0]):
        args = ["predictions", "targets"]  # f(a - b) is f(a, b) for these losses of the difference
    if len(args) != 2:
        raise ConfigError(f"{label} takes two positional arrays here (logits or predictions, then labels or "
                          f"targets), got {len(args)}: {', '.join(map(repr, args)) or 'none'}")

    options: dict = {}
    if kind == "cross_entropy_probs":
        inner, alpha = _smoothing_of(args[1])
        if alpha:
            options["label_smoothing"] = alpha
        if _is_one_hot(inner):
            kind = "cross_entropy"  # softmax_cross_entropy of one_hot(y): the targets are class indices
    elif kind == "binary_cross_entropy":
        _, alpha = _smoothing_of(args[1])
        if alpha:
            raise ConfigError("optax.smooth_labels on binary labels moves them to (1 - alpha) t + alpha / C "
                              "(C = the size of the last axis), not the t (1 - alpha) + alpha / 2 of binary "
                              "label smoothing (Keras' BinaryCrossentropy): gradparity cannot express it; "
                              "smooth the labels as t * (1 - alpha) + alpha / 2 outside the text")
    if kind == "huber":
        delta = expr.kwargs.get("delta", 1.0)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0 or math.isinf(delta):
            raise ConfigError(f"optax.huber_loss delta must be a positive finite number, got {delta!r}")
        options["delta"] = float(delta)
    _check_targets_hint(kind, targets, label)
    return LossSemantics(kind, divisor, **options)


# ----------------------------------------------------------------------------------------------------------
# render: LossSemantics -> optax + jnp code
# ----------------------------------------------------------------------------------------------------------

_IMPORTS = ("import numpy as np", "import jax", "import jax.numpy as jnp", "import optax")
_ELEMENTWISE = ("binary_cross_entropy", "mse", "l1", "huber")






def _divisor_rule(sem: LossSemantics) -> str:
    """The divisor rule as it really evaluates for ``sem``: the same number on every batch, simplest form.

    E.g. 'valid' without an ignored class is 'count'; 'keras_sample_weight_sum'
    with weights and no mask is 'sample_weight_as_passed' (the weights summed
    as given: (N,) weights on an (N, T) loss summed over N only), exactly as
    the numpy reference's ``divisor()`` evaluates it.
    """
    masked = sem.masked
    rule = sem.divisor
    if rule == "class_weight_sum" and sem.class_weight is None:
        rule = "valid"
    if rule == "keras_sample_weight_sum":
        if not sem.sample_weight:
            rule = "valid"
        elif masked:
            rule = "sample_weight_sum"  # the mask broadcast the weights to the element grid first
        else:
            return "sample_weight_as_passed"
    if rule == "sample_weight_sum" and not sem.sample_weight:
        rule = "valid"
    if rule == "valid" and not masked:
        rule = "count"
    return rule


def _binary_smoothing(sem: LossSemantics) -> bool:
    return sem.kind == "binary_cross_entropy" and bool(sem.label_smoothing)


def _is_native(sem: LossSemantics, rule: str) -> bool:
    """An optax per-element function plus plain jnp.mean / jnp.sum computes ``sem`` exactly."""
    return (sem.kind != "l1" and rule in ("one", "count") and sem.class_weight is None
            and sem.pos_weight is None and not _binary_smoothing(sem) and not sem.masked
            and not sem.sample_weight)


def _array(values) -> str:
    return "jnp.asarray([" + ", ".join(repr(float(v)) for v in values) + "], dtype=logits.dtype)"


def _per_entry_call(sem: LossSemantics, labels: str = "targets") -> str:
    """The optax (or jnp) call giving the per-element loss without weights, for the native forms."""
    eps = sem.label_smoothing
    if sem.kind == "cross_entropy":
        if not eps:
            return f"optax.softmax_cross_entropy_with_integer_labels(logits, {labels})"
        one_hot = f"jax.nn.one_hot({labels}, logits.shape[-1], dtype=logits.dtype)"
        return f"optax.softmax_cross_entropy(logits, optax.smooth_labels({one_hot}, {eps!r}))"
    if sem.kind == "cross_entropy_probs":
        q = f"optax.smooth_labels({labels}, {eps!r})" if eps else labels
        return f"optax.softmax_cross_entropy(logits, {q})"
    if sem.kind == "binary_cross_entropy":
        return f"optax.sigmoid_binary_cross_entropy(logits, {labels})"
    if sem.kind == "mse":
        return f"optax.squared_error(logits, {labels})"
    if sem.kind == "huber":
        return f"optax.huber_loss(logits, {labels}, delta={float(sem.delta)!r})"
    return f"jnp.abs(logits - {labels})"


def _native_lines(sem: LossSemantics, rule: str) -> list[str]:
    """One line: the optax call and its reduction (a last-axis mean first, as Keras does)."""
    call = _per_entry_call(sem)
    if sem.kind in _ELEMENTWISE and sem.last_axis == "mean":
        call += ".mean(axis=-1)"
    return [f"loss = {call}.{'mean' if rule == 'count' else 'sum'}()"]


def _per_element_lines(sem: LossSemantics) -> tuple[list[str], list[str]]:
    """(lines defining ``per_element`` with class weights, pos_weight and smoothing inside; notes)."""
    lines: list[str] = []
    notes: list[str] = []
    eps = sem.label_smoothing
    if sem.class_weight is not None:
        lines.append(f"class_weight = {_array(sem.class_weight)}")
    if sem.kind == "cross_entropy":
        labels = "targets"
        if sem.masked:
            lines += [f"valid = targets != {sem.ignore_index}",
                      "# optax needs a real class for every element: ignored ones get class 0, "
                      "their losses are zeroed below",
                      "labels = jnp.where(valid, targets, 0)"]
            labels = "labels"
            notes.append(f"optax has no ignore_index: targets equal to {sem.ignore_index} are replaced by class 0 "
                         "for the optax call and their losses multiplied by 0 (a mask).")
        if sem.class_weight is None:
            lines.append(f"per_element = {_per_entry_call(sem, labels)}")
        elif not eps:
            lines.append(f"per_element = class_weight[{labels}] * "
                         f"optax.softmax_cross_entropy_with_integer_labels(logits, {labels})")
        else:
            lines += [f"q = optax.smooth_labels(jax.nn.one_hot({labels}, logits.shape[-1], dtype=logits.dtype), "
                      f"{eps!r})",
                      "# class weights inside the sum over classes: -sum_c w_c q_c log p_c",
                      "per_element = optax.softmax_cross_entropy(logits, class_weight * q)"]
        if sem.class_weight is not None:
            notes.append("optax has no class weights: they weight the (smoothed) labels inside the sum over "
                         "classes, -sum_c w_c q_c log p_c." if eps else
                         "optax has no class weights: each element's loss is multiplied by the weight of its "
                         "target class.")
    elif sem.kind == "cross_entropy_probs":
        if sem.class_weight is None:
            lines.append(f"per_element = {_per_entry_call(sem)}")
        else:
            q = f"optax.smooth_labels(targets, {eps!r})" if eps else "targets"
            lines += ["# class weights inside the sum over classes: -sum_c w_c q_c log p_c",
                      f"per_element = optax.softmax_cross_entropy(logits, class_weight * {q})"]
            notes.append("optax has no class weights: they weight the target probabilities inside the sum over "
                         "classes, -sum_c w_c q_c log p_c.")
    else:
        labels = "targets"
        if _binary_smoothing(sem):
            lines += ["# binary label smoothing, t (1 - eps) + eps / 2: optax.smooth_labels would give eps / C",
                      f"labels = targets * {1.0 - eps!r} + {0.5 * eps!r}"]
            labels = "labels"
            notes.append(f"binary label smoothing moves labels to t * (1 - {eps:g}) + {eps:g} / 2 (Keras' rule); "
                         "optax.smooth_labels would give eps / C, so it is written out.")
        if sem.kind == "binary_cross_entropy" and sem.pos_weight is not None:
            lines += [f"pos_weight = {_array(sem.pos_weight)}",
                      f"per_entry = -(pos_weight * {labels} * jax.nn.log_sigmoid(logits)"
                      f" + (1.0 - {labels}) * jax.nn.log_sigmoid(-logits))"]
            notes.append("optax.sigmoid_binary_cross_entropy has no pos_weight: the loss is written out with "
                         "jax.nn.log_sigmoid, the positive term multiplied by pos_weight.")
        else:
            lines.append(f"per_entry = {_per_entry_call(sem, labels)}")
        if sem.kind == "l1":
            notes.append("optax has no L1 loss: it is written jnp.abs(predictions - targets); where a prediction "
                         "equals its target, jax's gradient of jnp.abs is 1, not the 0 of torch and the reference.")
        if sem.class_weight is not None:
            lines.append("per_entry = class_weight * per_entry  # one weight per class, along the last axis")
            notes.append("optax has no class weights: each class's entry is multiplied by its weight.")
        if sem.last_axis == "mean":
            lines.append("per_element = jnp.mean(per_entry, axis=-1)  # the last axis is averaged first")
            notes.append("the last axis is averaged into one loss per example/token first (as Keras does), "
                         "then reduced.")
        else:
            lines.append("per_element = per_entry")
    return lines, notes


def _reduction_lines(sem: LossSemantics, rule: str) -> tuple[list[str], list[str]]:
    """(lines weighting ``per_element``, summing it and dividing by the rule's divisor into ``loss``; notes)."""
    lines: list[str] = []
    notes: list[str] = []
    factors = ["per_element"]
    if sem.sample_weight:
        lines += ["# sample weights (N,) or (N, T) broadcast over the trailing axes of the per-element loss",
                  "trailing = (1,) * (per_element.ndim - sample_weight.ndim)",
                  "weight = jnp.broadcast_to(sample_weight.reshape(sample_weight.shape + trailing), "
                  "per_element.shape)"]
        factors.append("weight")
        notes.append("optax losses take no sample weights: they multiply the per-element loss, broadcast over "
                     "its trailing axes.")
    if sem.masked:
        lines.append("mask = valid.astype(logits.dtype)")
        factors.append("mask")
    total = f"jnp.sum({' * '.join(factors)})"
    if rule == "one":
        lines.append(f"loss = {total}")
        return lines, notes
    if rule == "count":
        lines.append(f"loss = {total} / per_element.size" if len(factors) > 1 else "loss = jnp.mean(per_element)")
        return lines, notes
    divisor = {
        "valid": "jnp.sum(mask)",
        "class_weight_sum": f"jnp.sum(class_weight[{'labels' if sem.masked else 'targets'}]"
                            f"{' * mask' if sem.masked else ''})",
        "sample_weight_sum": f"jnp.sum(weight{' * mask' if sem.masked else ''})",
        "sample_weight_as_passed": "jnp.sum(sample_weight)",
    }[rule]
    lines += [f"total = {total}",
              f"divisor = {divisor}",
              "# 0, not nan, when nothing counts (an all-ignored batch), as Keras' divide_no_nan",
              "loss = jnp.where(divisor != 0, total / jnp.where(divisor != 0, divisor, 1.0), 0.0)"]
    notes.append(f"the divisor ({DIVISORS[sem.divisor]}) changes from batch to batch: it is computed from each "
                 "batch inside the function, never a constant.")
    if rule == "sample_weight_as_passed":
        notes.append("the divisor is jnp.sum(sample_weight) as passed: (N,) weights on an (N, T) or element-wise "
                     "loss are summed over N only.")
    return lines, notes


def _function(sem: LossSemantics, body: list[str]) -> str:
    """The self-contained source: imports, then ``loss_fn`` converting its inputs and running ``body``."""
    if sem.kind == "cross_entropy":
        targets = "targets = jnp.asarray(targets)  # class indices (integers)"
    else:
        targets = "targets = jnp.asarray(targets, dtype=logits.dtype)"
    head = ["logits = jnp.asarray(logits)", targets]
    if sem.sample_weight:
        head += ["if sample_weight is None:",
                 "    raise ValueError('this loss takes a sample_weight')",
                 "sample_weight = jnp.asarray(sample_weight, dtype=logits.dtype)"]
    return function_source(_IMPORTS, sem, head, body)


def render(sem: LossSemantics) -> Rendering:
    """``sem`` in JAX: optax's per-element loss, any arithmetic optax lacks, and an explicit reduction.

    ``native`` when an optax function plus a plain ``.mean()`` / ``.sum()``
    computes ``sem`` (label smoothing by ``optax.smooth_labels``); otherwise
    the weights, masks and divisor are written out, the divisor computed from
    each batch. ``code`` uses ``logits``, ``targets`` and ``sample_weight``;
    ``function`` defines the same as ``loss_fn`` (traceable: jnp only).
    """
    sem.check()
    rule = _divisor_rule(sem)
    notes = ["optax returns one loss per element and has no reduction argument: the reduction is yours "
             "to write, and is written out here."]
    if _is_native(sem, rule):
        body = _native_lines(sem, rule)
        native = True
    else:
        element_lines, element_notes = _per_element_lines(sem)
        reduce_lines, reduce_notes = _reduction_lines(sem, rule)
        body = element_lines + reduce_lines
        notes += element_notes + reduce_notes
        native = False
    if sem.divisor != rule and rule in ("one", "count"):
        notes.append(f"the divisor rule {sem.divisor!r} is {DIVISORS[rule]} for this configuration.")
    return Rendering("jax", native, "\n".join(body) + "\n", _function(sem, body), tuple(notes))
