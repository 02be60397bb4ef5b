"""Legacy Keras 2 loss texts (the ``tf_keras`` package, tf.keras before Keras 3), the parent half: parse, render
(the worker half, ``losses``, runs the renderings).

Three roles, one per entry point, as ``gradparity.backends.keras.loss_text``:

- ``parse(expr, targets)``: a ``tf.keras.losses.<Loss>(..., reduction=
  tf.keras.losses.Reduction.R)`` or ``tf_keras.losses.<Loss>(...)`` text,
  optionally called as ``(y_true, y_pred, sample_weight=w)`` -> the
  ``LossSemantics`` tf_keras computes;
- ``render(sem)``: any ``LossSemantics`` -> tf_keras code, native where a
  tf_keras loss object with a legacy ``Reduction`` computes it, otherwise
  ``Reduction.SUM`` (or a tf.nn / tf.math formula) with the divisor written
  out and computed from the batch;
- ``losses.open_session(job)``: the worker side of a 'loss_functions' job
  (tensorflow + tf_keras, GradientTape w.r.t. the logits).

Importing this module imports no tensorflow or tf_keras.

What the legacy reductions divide by (tf_keras 2.21, ``tf_keras/src/losses.py``
``Loss.__call__`` and ``utils/losses_utils.py``; each measured in
tests/test_losses_tf_keras.py):

- every loss yields one value per example (or token): BinaryCrossentropy,
  MeanSquaredError, MeanAbsoluteError and Huber average the last axis first;
- ``SUM_OVER_BATCH_SIZE`` divides ``sum(loss * sample_weight)`` by
  ``tf.size`` of the weighted losses: the number of examples (tokens), never
  the sum of the sample weights (``reduce_weighted_loss``); (N,) sample
  weights on an (N, T) loss are expanded to (N, 1) and broadcast
  (``squeeze_or_expand_dimensions``), so they still divide by N*T;
- ``AUTO`` is ``SUM_OVER_BATCH_SIZE`` outside a ``tf.distribute`` strategy
  (``Loss._get_reduction``); inside one, a loss object called in a custom
  training loop raises for AUTO and SUM_OVER_BATCH_SIZE (only Model.fit may
  use them), which gradparity does not model;
- ``ignore_class`` (SparseCategoricalCrossentropy) attaches a
  ``_keras_mask``; ``apply_valid_mask`` rescales it by total/valid for AUTO
  and SUM_OVER_BATCH_SIZE, so they divide by the number of valid targets;
  SUM divides by nothing; NONE returns the masked losses (0 where ignored).
  A batch whose targets are all ignored gives NaN there (0 * total/0),
  where Keras 3 gives 0;
- there is no ``mean_with_sample_weight``: a sum of weights as divisor is
  always written out explicitly.
"""
from __future__ import annotations

import math

import numpy as np

# The Keras family shares what does not differ between Keras 3 and the legacy package (no framework import).
from gradparity.backends.keras.loss_text import check_call, criterion_call, divisor_rule, floats, formula_lines
from gradparity.errors import ConfigError
from gradparity.losses.catalogue import DIVISORS, LossSemantics, Rendering, function_source
from gradparity.losses.text import LossExpression, bind_arguments, is_number

# ----------------------------------------------------------------------------------------------------------
# parse: legacy tf.keras / tf_keras text -> LossSemantics
# ----------------------------------------------------------------------------------------------------------

#: Loss classes gradparity reads, with their constructor parameters in tf_keras 2.21's positional order.
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "SparseCategoricalCrossentropy": ("from_logits", "ignore_class", "reduction", "name"),
    "CategoricalCrossentropy": ("from_logits", "label_smoothing", "axis", "reduction", "name"),
    "BinaryCrossentropy": ("from_logits", "label_smoothing", "axis", "reduction", "name"),
    "MeanSquaredError": ("reduction", "name"),
    "MeanAbsoluteError": ("reduction", "name"),
    "Huber": ("delta", "reduction", "name"),
}
_KINDS = {"SparseCategoricalCrossentropy": "cross_entropy", "CategoricalCrossentropy": "cross_entropy_probs",
          "BinaryCrossentropy": "binary_cross_entropy", "MeanSquaredError": "mse", "MeanAbsoluteError": "l1",
          "Huber": "huber"}
_TARGETS = {"SparseCategoricalCrossentropy": "class_index", "CategoricalCrossentropy": "probabilities"}
_LOGITS_CLASSES = ("SparseCategoricalCrossentropy", "CategoricalCrossentropy", "BinaryCrossentropy")
_MODULE_PREFIXES = ("", "tf.keras.losses", "tf_keras.losses", "keras.losses", "tf_keras.src.losses",
                    "tf.compat.v2.keras.losses")
#: Legacy reductions (enum members and their string values) and the divisor rule each gives (None: NONE).
_REDUCTIONS = {"sum_over_batch_size": "count", "auto": "count", "sum": "one", "none": None}
_MEMBERS = {"SUM_OVER_BATCH_SIZE": "sum_over_batch_size", "AUTO": "auto", "SUM": "sum", "NONE": "none"}
_FUNCTIONS = {"sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
              "categorical_crossentropy": "CategoricalCrossentropy", "binary_crossentropy": "BinaryCrossentropy",
              "mean_squared_error": "MeanSquaredError", "mse": "MeanSquaredError", "MSE": "MeanSquaredError",
              "mean_absolute_error": "MeanAbsoluteError", "mae": "MeanAbsoluteError", "MAE": "MeanAbsoluteError",
              "huber": "Huber"}
_SUPPORTED_TEXT = ("tf.keras.losses.SparseCategoricalCrossentropy, CategoricalCrossentropy, BinaryCrossentropy, "
                   "MeanSquaredError, MeanAbsoluteError, Huber (or tf_keras.losses.*)")
_CALL_PARAMETERS = ("y_true", "y_pred", "sample_weight")
AUTO_NOTE = ("Reduction.AUTO is SUM_OVER_BATCH_SIZE outside a tf.distribute strategy (what gradparity runs); "
             "inside one, a loss object called in a custom training loop raises for AUTO and "
             "SUM_OVER_BATCH_SIZE (only Model.fit may use them), which gradparity does not model")


def _class_name(expr: LossExpression) -> str:
    module, _, short = expr.name.rpartition(".")
    if module in _MODULE_PREFIXES and short in _SIGNATURES:
        return short
    if short in _FUNCTIONS:
        raise ConfigError(f"{expr.name!r} is tf_keras' functional form, which returns one loss per example and "
                          f"has no reduction; write the loss class instead, e.g. "
                          f"tf.keras.losses.{_FUNCTIONS[short]}(...) (supported: {_SUPPORTED_TEXT})")
    raise ConfigError(f"{expr.name!r} is not a tf_keras loss gradparity knows; supported: {_SUPPORTED_TEXT}")


def _options(expr: LossExpression, cls: str) -> dict:
    """Arguments by parameter name (see gradparity.losses.text.bind_arguments)."""
    return bind_arguments(expr, _SIGNATURES[cls], f"tf_keras.losses.{cls}")


def _reduction(cls: str, value) -> str:
    """The legacy reduction's string value ('auto', 'sum', ...); ConfigError for anything else."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "enum":
        member = value[1].rsplit(".", 1)[-1]
        if member not in _MEMBERS:
            raise ConfigError(f"tf_keras.losses.{cls}: {value[1]} is not a member of tf.keras.losses.Reduction "
                              f"(AUTO, NONE, SUM, SUM_OVER_BATCH_SIZE)")
        return _MEMBERS[member]
    if isinstance(value, str) and value in _REDUCTIONS:
        return value
    hint = ("; Keras 3's 'mean_with_sample_weight' / 'mean' do not exist in tf_keras"
            if value in ("mean", "mean_with_sample_weight") else "")
    raise ConfigError(f"tf_keras.losses.{cls}: reduction must be a tf.keras.losses.Reduction member (AUTO, the "
                      f"default, SUM_OVER_BATCH_SIZE, SUM, NONE) or its string ('auto', 'sum_over_batch_size', "
                      f"'sum', 'none'), got {value!r}{hint}")


def notes_for(expr: LossExpression) -> tuple[str, ...]:
    """What a user of this text must know beyond its semantics (AUTO and distribution strategies)."""
    try:
        cls = _class_name(expr)
        options = _options(expr, cls)
        reduction = _reduction(cls, options.get("reduction", "auto"))
    except ConfigError:
        return ()
    notes = [AUTO_NOTE] if reduction in ("auto", "sum_over_batch_size") else []
    delta = options.get("delta") if cls == "Huber" else None
    if is_number(delta) and float(np.float32(delta)) != delta:
        notes.append(f"tf_keras.losses.Huber casts delta={delta!r} through float32 (tf.cast of a Python float): it "
                     f"computes with delta={float(np.float32(delta))!r}, even in float64")
    return tuple(notes)


def parse(expr: LossExpression, targets: str | None = None) -> LossSemantics:
    """The LossSemantics of a legacy tf.keras / tf_keras loss text; ConfigError naming what it cannot honour.

    ``targets``: the user's hint of the target form; the class decides it,
    so a hint may only agree. ``name`` is accepted and changes nothing.
    ``AUTO`` (the default) is read as SUM_OVER_BATCH_SIZE, as outside a
    tf.distribute strategy (see ``notes_for``).
    """
    if targets not in (None, "class_index", "probabilities"):
        raise ConfigError(f"the targets hint must be 'class_index' or 'probabilities', got {targets!r}")
    cls = _class_name(expr)
    options = _options(expr, cls)
    if cls in _TARGETS and targets not in (None, _TARGETS[cls]):
        other = "CategoricalCrossentropy" if _TARGETS[cls] == "class_index" else "SparseCategoricalCrossentropy"
        raise ConfigError(f"tf_keras.losses.{cls} takes {_TARGETS[cls].replace('_', '-')} targets, not {targets}; "
                          f"for {targets.replace('_', '-')} targets write tf.keras.losses.{other}")
    sample_weight = check_call(expr, cls, "tf_keras.losses", "tf.keras.losses")
    reduction = _reduction(cls, options.get("reduction", "auto"))
    if reduction == "none" and (expr.call is None or expr.method is None):
        raise ConfigError(f"tf_keras.losses.{cls}(reduction=Reduction.NONE) returns one loss per example, and "
                          "translate compares reduced losses; write the reduction you apply, e.g. "
                          "reduction=tf.keras.losses.Reduction.SUM / SUM_OVER_BATCH_SIZE, or "
                          f"tf.keras.losses.{cls}(reduction=tf.keras.losses.Reduction.NONE)(y_true, y_pred).mean()")
    if options.get("name") is not None and not isinstance(options["name"], str):
        raise ConfigError(f"tf_keras.losses.{cls}: name must be a string, got {options['name']!r}")
    fields: dict = {}
    if cls in _LOGITS_CLASSES:
        from_logits = options.get("from_logits", False)
        if not isinstance(from_logits, bool):
            raise ConfigError(f"tf_keras.losses.{cls}: from_logits must be True or False, got {from_logits!r}")
        if not from_logits:
            raise ConfigError(f"tf_keras.losses.{cls} has from_logits=False (the default): it expects "
                              "probabilities, but gradparity compares logits-based losses (probability inputs are "
                              "not supported yet); if your model outputs logits (no softmax/sigmoid last layer), "
                              f"write tf.keras.losses.{cls}(from_logits=True, ...)")
        axis = options.get("axis", -1)
        if axis != -1 or isinstance(axis, bool):
            raise ConfigError(f"tf_keras.losses.{cls}: axis={axis!r} is not supported; gradparity compares "
                              "channels-last logits, so axis must be -1 (move the class axis last)")
    if cls in ("CategoricalCrossentropy", "BinaryCrossentropy"):
        smoothing = options.get("label_smoothing", 0.0)
        if not is_number(smoothing) or not 0.0 <= smoothing <= 1.0:
            raise ConfigError(f"tf_keras.losses.{cls}: label_smoothing must be a number in [0, 1], "
                              f"got {smoothing!r}")
        fields["label_smoothing"] = float(smoothing)
    if cls == "SparseCategoricalCrossentropy":
        ignore = options.get("ignore_class")
        if ignore is not None and (not isinstance(ignore, int) or isinstance(ignore, bool)):
            raise ConfigError(f"tf_keras.losses.{cls}: ignore_class must be an integer or None, got {ignore!r}")
        fields["ignore_index"] = ignore
    if cls == "Huber":
        delta = options.get("delta", 1.0)
        if not is_number(delta) or not (math.isfinite(delta) and delta > 0):
            raise ConfigError(f"tf_keras.losses.Huber: delta must be a positive number, got {delta!r}")
        # huber() does tf.cast(delta, floatx()): the Python float is converted to a float32 tensor first, so
        # tf_keras computes with delta rounded to float32 (measured: 0.7 -> 0.699999988079071), in any floatx.
        fields["delta"] = float(np.float32(delta))
    kind = _KINDS[cls]
    if kind not in ("cross_entropy", "cross_entropy_probs"):
        fields["last_axis"] = "mean"  # tf_keras averages the last axis into one loss per example/token
    if reduction == "none":
        divisor = {"mean": "count", "sum": "one"}[expr.method]  # the masked losses are 0 where ignored
    else:
        divisor = _REDUCTIONS[reduction]
        if divisor == "count" and fields.get("ignore_index") is not None:
            divisor = "valid"  # apply_valid_mask rescales the mask by total/valid
    return LossSemantics(kind, divisor, sample_weight=sample_weight, **fields)


# ----------------------------------------------------------------------------------------------------------
# render: any LossSemantics -> tf_keras code
# ----------------------------------------------------------------------------------------------------------

_CLASSES = {"cross_entropy": "SparseCategoricalCrossentropy", "cross_entropy_probs": "CategoricalCrossentropy",
            "binary_cross_entropy": "BinaryCrossentropy", "mse": "MeanSquaredError", "l1": "MeanAbsoluteError",
            "huber": "Huber"}
_CHANGES = "changes from batch to batch: it is computed from the batch, never a constant"
_RED = "tf_keras.losses.Reduction."
#: The TensorFlow ops a tf_keras rendering writes (see gradparity.backends.keras.losses.formula_lines).
TF_OPS = {"one_hot": "tf.one_hot", "sum": "tf.reduce_sum", "log_softmax": "tf.nn.log_softmax",
          "log_sigmoid": "tf.math.log_sigmoid", "mean_last": "tf.reduce_mean(per_entry, axis=-1)"}


class _Plan:
    """How ``sem`` is computed with tf_keras: which loss object (if any), its weight, native or not."""

    def __init__(self, sem: LossSemantics):
        self.sem = sem
        self.masked = sem.masked
        self.criterion = _CLASSES[sem.kind]
        self.one_hot = False
        if sem.kind == "cross_entropy" and sem.label_smoothing:
            # SparseCategoricalCrossentropy has no label_smoothing: one-hot targets, CategoricalCrossentropy.
            self.criterion = None if sem.class_weight is not None else "CategoricalCrossentropy"
            self.one_hot = self.criterion is not None
        if sem.kind == "cross_entropy_probs" and sem.class_weight is not None:
            self.criterion = None
        if sem.kind == "binary_cross_entropy" and (sem.class_weight is not None or sem.pos_weight is not None):
            self.criterion = None
        self.keras_mask = self.masked and self.criterion == "SparseCategoricalCrossentropy"
        self.class_weight_in_weight = (sem.kind == "cross_entropy" and sem.class_weight is not None
                                       and self.criterion is not None)
        self.entries = sem.kind not in ("cross_entropy", "cross_entropy_probs") and sem.last_axis == "elementwise"
        self.rule = divisor_rule(sem)
        self.no_nan = sem.divisor == "keras_sample_weight_sum"
        self.native_reduction = self._native()

    def _native(self) -> str | None:
        if self.criterion is None or self.entries:
            return None
        if self.rule == "one":
            return "SUM"
        if self.rule == "count":  # ignore_class would rescale the mask to a mean over the valid targets
            return None if self.keras_mask else "SUM_OVER_BATCH_SIZE"
        if self.rule == "valid":  # masked: only ignore_class's own rescaled mask divides by the valid count
            return "SUM_OVER_BATCH_SIZE" if self.keras_mask else None
        return None  # sums of weights: tf_keras has no reduction dividing by them


def _lines(plan: _Plan) -> tuple[list[str], str | None]:
    """(constants, mask and weight lines; the weight expression to pass or multiply, None when all 1)."""
    sem = plan.sem
    lines = []
    if sem.class_weight is not None:
        lines.append(f"class_weight = tf.constant({floats(sem.class_weight)}, dtype=logits.dtype)")
    if sem.pos_weight is not None:
        lines.append(f"pos_weight = tf.constant({floats(sem.pos_weight)}, dtype=logits.dtype)")
    if plan.masked:
        lines.append(f"valid = tf.not_equal(targets, {sem.ignore_index})  # the elements that count")
        lines.append("safe_targets = tf.where(valid, targets, tf.zeros_like(targets))  # any class: weight 0")
    if sem.sample_weight:
        lines.append("sample_weight = tf.reshape(sample_weight, tuple(sample_weight.shape) + (1,) * "
                     "(len(logits.shape) - 1 - len(sample_weight.shape)))  # (N,) -> (N, 1) on an (N, T) loss")
    factors = []
    if plan.class_weight_in_weight:
        factors.append(f"tf.gather(class_weight, {'safe_targets' if plan.masked else 'targets'})")
    if sem.sample_weight:
        factors.append("sample_weight")
    grid = "tf.ones(tf.shape(logits)[:-1], dtype=logits.dtype)"
    if plan.masked:
        if not factors and plan.keras_mask:
            return lines, None  # ignore_class masks by itself
        value = " * ".join(factors + [grid]) if factors else grid
        zeros = "tf.zeros(tf.shape(logits)[:-1], dtype=logits.dtype)"
        lines.append(f"weight = tf.where(valid, {value}, {zeros})  # 0 for ignored targets")
        return lines, "weight"
    if not factors:
        return lines, None
    lines.append(f"weight = {' * '.join(factors + [grid])}  # one per example or token")
    return lines, "weight"


def _constructor(plan: _Plan, reduction: str) -> str:
    sem, args = plan.sem, []
    if sem.kind in ("cross_entropy", "cross_entropy_probs", "binary_cross_entropy"):
        args.append("from_logits=True")
    if plan.keras_mask:
        args.append(f"ignore_class={sem.ignore_index}")
    if sem.label_smoothing and plan.criterion in ("CategoricalCrossentropy", "BinaryCrossentropy"):
        args.append(f"label_smoothing={float(sem.label_smoothing)!r}")
    if sem.kind == "huber" and sem.delta != 1.0:
        delta = float(sem.delta)
        # tf_keras' huber() does tf.cast(delta, floatx): a Python float becomes a float32 tensor first.
        exact = float(np.float32(delta)) == delta
        args.append(f"delta={delta!r}" if exact else f"delta=tf.constant({delta!r}, dtype=logits.dtype)")
    args.append(f"reduction={_RED}{reduction}")
    return f"tf_keras.losses.{plan.criterion}({', '.join(args)})"


def _divisor_lines(plan: _Plan) -> tuple[list[str], str | None]:
    rule = plan.rule
    entries = " * logits.shape[-1]" if plan.entries else ""
    examples = "int(np.prod(tuple(logits.shape[:-1])))"
    grid = "tf.ones(tf.shape(logits)[:-1], dtype=logits.dtype)"
    if rule == "one":
        return [], None
    if rule == "count":
        what = "every entry: N*C, or N*T*C" if plan.entries else (
            "every element, ignored ones included" if plan.masked else "N, or N*T")
        return [f"divisor = {examples}{entries}  # {what}"], None
    if rule == "valid":
        return (["divisor = tf.reduce_sum(tf.cast(valid, logits.dtype))"],
                f"the divisor (the number of non-ignored targets) {_CHANGES}")
    if rule == "class_weight_sum":
        if plan.masked:
            line = ("divisor = tf.reduce_sum(tf.where(valid, tf.gather(class_weight, safe_targets), "
                    "tf.zeros_like(logits[..., 0])))")
        else:
            line = "divisor = tf.reduce_sum(tf.gather(class_weight, targets))"
        return [line], f"the divisor (the sum of the class weights of the counted targets) {_CHANGES}"
    if rule in ("sample_weight_sum", "keras_sample_weight_sum") and plan.masked:
        return ([f"divisor = tf.reduce_sum(tf.where(valid, sample_weight * {grid}, tf.zeros_like(valid, "
                 "dtype=logits.dtype)))  # the sample weights of the non-ignored elements"],
                f"the divisor (the sum of the sample weights over the non-ignored elements) {_CHANGES}")
    if rule == "sample_weight_sum":
        return ([f"divisor = tf.reduce_sum(sample_weight * {grid}){entries}  # weights broadcast to every "
                 "element"], f"the divisor (the sum of the sample weights over the elements) {_CHANGES}")
    if rule == "keras_sample_weight_sum":
        return (["divisor = tf.reduce_sum(sample_weight)  # Keras 3 sums the weights as passed: (N,) weights on "
                 "an (N, T) loss count once per sequence"],
                f"the divisor (Keras 3's sum of sample_weight as passed; (N,) weights on an (N, T) loss are summed "
                f"over N only) {_CHANGES}")
    raise ConfigError(f"unknown divisor rule {rule!r}; known: {', '.join(DIVISORS)}")


def _body(sem: LossSemantics) -> tuple[list[str], bool, list[str]]:
    plan = _Plan(sem)
    notes = []
    lines, weight = _lines(plan)
    if plan.class_weight_in_weight:
        notes.append("tf_keras losses take no class weights: they become the sample weight "
                     "class_weight[targets], as Model.fit(class_weight=...) does")
    if plan.one_hot:
        notes.append("SparseCategoricalCrossentropy has no label_smoothing: targets are one-hot encoded for "
                     "CategoricalCrossentropy" + (", ignored ones weighted 0" if plan.masked else ""))
    if plan.native_reduction is not None:
        target_lines, call = criterion_call(plan, weight, one_hot="tf.one_hot")
        lines += [f"criterion = {_constructor(plan, plan.native_reduction)}"] + target_lines
        lines.append(f"loss = {call}")
        if plan.native_reduction == "SUM_OVER_BATCH_SIZE":
            notes.append("SUM_OVER_BATCH_SIZE divides by the number of examples (tokens), never by the sum of the "
                         "sample weights; Reduction.AUTO (the default) is the same outside a tf.distribute "
                         "strategy, and both raise for a loss called in a custom loop inside one")
        if plan.rule == "valid":
            notes.append("ignore_class rescales its mask by total/valid, so SUM_OVER_BATCH_SIZE divides by the "
                         "number of non-ignored targets, which changes from batch to batch (a batch with none "
                         "gives NaN in tf_keras)")
        return lines, True, _delta_note(lines, notes)
    if plan.criterion is None:
        notes.append("no native tf_keras equivalent (class weights inside the sum over classes, or BCE class/"
                     "positive weights): the per-element loss is written with tf.nn / tf.math")
    elif plan.entries:
        notes.append("tf_keras averages the last axis (its C entries) into one loss per example, where the source "
                     "counts every entry: the sum is C times tf_keras' sum")
    else:
        notes.append(f"no tf_keras reduction divides by {DIVISORS[plan.rule]} here: Reduction.SUM, then the "
                     "divisor computed explicitly")
    if plan.criterion is not None:
        target_lines, call = criterion_call(plan, weight, one_hot="tf.one_hot")
        lines += [f"criterion = {_constructor(plan, 'SUM')}"] + target_lines
        lines.append(f"total = {call}  # sum over examples (tokens) of the weighted losses")
        if plan.entries:
            lines.append("total = total * logits.shape[-1]  # tf_keras averaged each example's C entries; the "
                         "source sums them")
    else:
        lines += formula_lines(plan, TF_OPS)
        lines.append(f"total = tf.reduce_sum({weight} * per_element)" if weight
                     else "total = tf.reduce_sum(per_element)")
    divisor_lines, note = _divisor_lines(plan)
    lines += divisor_lines
    if note:
        notes.append(note)
    if plan.rule == "one":
        lines.append("loss = total")
    elif plan.no_nan:
        lines.append("loss = tf.math.divide_no_nan(total, tf.cast(divisor, total.dtype))  # 0 when nothing counts")
    else:
        lines.append("loss = total / tf.cast(divisor, total.dtype)")
    return lines, False, _delta_note(lines, notes)


def _delta_note(lines: list[str], notes: list[str]) -> list[str]:
    if any("delta=tf.constant(" in line for line in lines):
        notes.append("delta is passed as a tensor of the logits' dtype: tf_keras' huber() casts a Python float "
                     "delta through float32 (tf.cast of a Python float), which would round it")
    return notes


def render(sem: LossSemantics) -> Rendering:
    """``sem`` as tf_keras code: a loss object with a legacy Reduction where one computes it, else explicit.

    The function converts its inputs with ``tf.convert_to_tensor`` in
    ``tf_keras.backend.floatx()`` (as tf_keras' loss objects compute), takes
    channels-last logits (N, C) or (N, T, C) and sample weights (N,) or
    (N, T), and returns a 0-d tensor.
    """
    sem.check()
    body, native, notes = _body(sem)
    notes.append("tf_keras losses compute in tf_keras.backend.floatx() (float32 unless set): "
                 "tf_keras.backend.set_floatx('float64') to compare in float64")
    target_dtype = "tf.int64" if sem.kind == "cross_entropy" else "logits.dtype"
    prologue = ["logits = tf.convert_to_tensor(logits, dtype=tf_keras.backend.floatx())",
                f"targets = tf.cast(tf.convert_to_tensor(targets), {target_dtype})"]
    if sem.sample_weight:
        prologue += ["if sample_weight is None:",
                     "    raise ValueError('this loss takes a sample_weight of shape (N,) or (N, T)')",
                     "sample_weight = tf.cast(tf.convert_to_tensor(sample_weight), logits.dtype)"]
    function = function_source(("import numpy as np", "import tensorflow as tf", "import tf_keras"), sem,
                               prologue, body)
    return Rendering("tf_keras", native, "\n".join(body) + "\n", function, tuple(notes))
