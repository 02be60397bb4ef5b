"""Keras 3 loss texts, the parent half of the losses: read a ``keras.losses`` text, write any LossSemantics as
Keras code (the worker half, ``losses``, runs it).

Two roles, one per entry point (and the worker's):

- ``parse(expr, targets)``: a ``keras.losses.<Loss>(...)`` text (see
  ``gradparity.losses.text``), optionally called as ``(y_true, y_pred,
  sample_weight=w)`` -> the ``LossSemantics`` Keras computes;
- ``render(sem)``: any ``LossSemantics`` (from any framework) -> Keras 3 code
  (``keras.ops`` / ``keras.losses`` only, so it runs on every Keras
  backend), native when a Keras loss object and its reduction compute it,
  otherwise ``reduction="sum"`` (or a keras.ops formula) with the divisor
  written out;
- ``losses.open_session(job)``: the worker side of a 'loss_functions' job, which
  runs rendered functions on the Keras backend in ``KERAS_BACKEND`` and
  returns d loss / d logits from that backend's autodiff.

Importing this module imports no keras, tensorflow, jax or torch (the parent
process parses and renders).

What Keras' reductions divide by (keras 3.15.1, ``keras/src/losses/loss.py``;
each checked by running in tests/test_losses_keras.py):

- every loss yields one value per example (or token): BinaryCrossentropy,
  MeanSquaredError, MeanAbsoluteError and Huber average the last axis first;
- "sum_over_batch_size" (the default) and "mean" divide by the number of
  those values, *not* by the sum of the sample weights; with
  ``ignore_class`` the mask is rescaled by total/valid (``apply_mask``), so
  they divide by the number of valid values;
- "mean_with_sample_weight" divides by ``sum(sample_weight)`` as passed
  (after a mask multiplied it in), or like "sum_over_batch_size" without
  sample weights;
- "sum" divides by nothing; the divisions use ``divide_no_nan``, so a
  batch with nothing to count gives 0.

Keras never broadcasts a sample weight over trailing axes: (N,) weights on
an (N, T) loss raise, so renderings reshape them to (N, 1) or (N, T).
"""
from __future__ import annotations

import math

from gradparity.errors import ConfigError
from gradparity.losses.catalogue import DIVISORS, LossSemantics, Rendering, function_source
from gradparity.losses.text import LossExpression, bind_arguments, is_number

# ----------------------------------------------------------------------------------------------------------
# parse: keras.losses text -> LossSemantics
# ----------------------------------------------------------------------------------------------------------

#: Loss classes gradparity reads, with their constructor parameters in Keras 3's positional order.
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "SparseCategoricalCrossentropy": ("from_logits", "ignore_class", "reduction", "axis", "name", "dtype"),
    "CategoricalCrossentropy": ("from_logits", "label_smoothing", "axis", "reduction", "name", "dtype"),
    "BinaryCrossentropy": ("from_logits", "label_smoothing", "axis", "reduction", "name", "dtype"),
    "MeanSquaredError": ("reduction", "name", "dtype"),
    "MeanAbsoluteError": ("reduction", "name", "dtype"),
    "Huber": ("delta", "reduction", "name", "dtype"),
}
_KINDS = {"SparseCategoricalCrossentropy": "cross_entropy", "CategoricalCrossentropy": "cross_entropy_probs",
          "BinaryCrossentropy": "binary_cross_entropy", "MeanSquaredError": "mse", "MeanAbsoluteError": "l1",
          "Huber": "huber"}
#: The targets hint each class implies (Keras decides by the class, not by the targets' dtype).
_TARGETS = {"SparseCategoricalCrossentropy": "class_index", "CategoricalCrossentropy": "probabilities"}
_LOGITS_CLASSES = ("SparseCategoricalCrossentropy", "CategoricalCrossentropy", "BinaryCrossentropy")
_MODULE_PREFIXES = ("", "keras.losses", "tf.keras.losses", "keras.src.losses", "keras.src.losses.losses")
#: Keras 3 reduction strings and the divisor rule each gives (None: no reduction).
_REDUCTIONS = {"sum_over_batch_size": "count", "mean": "count", "sum": "one",
               "mean_with_sample_weight": "keras_sample_weight_sum", "none": None}
#: The Keras 3 string for each member of the legacy (tf.keras 2 / tf_keras) Reduction enum.
_LEGACY_REDUCTIONS = {"SUM": "sum", "SUM_OVER_BATCH_SIZE": "sum_over_batch_size", "AUTO": "sum_over_batch_size",
                      "NONE": "none"}
_FUNCTIONS = {"sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
              "categorical_crossentropy": "CategoricalCrossentropy", "binary_crossentropy": "BinaryCrossentropy",
              "mean_squared_error": "MeanSquaredError", "mse": "MeanSquaredError", "MSE": "MeanSquaredError",
              "mean_absolute_error": "MeanAbsoluteError", "mae": "MeanAbsoluteError", "MAE": "MeanAbsoluteError",
              "huber": "Huber"}
_SUPPORTED_TEXT = ("keras.losses.SparseCategoricalCrossentropy, keras.losses.CategoricalCrossentropy, "
                   "keras.losses.BinaryCrossentropy, keras.losses.MeanSquaredError, "
                   "keras.losses.MeanAbsoluteError, keras.losses.Huber")
_CALL_PARAMETERS = ("y_true", "y_pred", "sample_weight")


def _class_name(expr: LossExpression) -> str:
    """The keras.losses class the text constructs; ConfigError for tf_keras, functions and unknown losses."""
    module, _, short = expr.name.rpartition(".")
    if expr.name.split(".", 1)[0] == "tf_keras":
        raise ConfigError(f"{expr.name!r} is tf_keras (legacy Keras 2), which the tf_keras reader reads "
                          "(gradparity translate routes a tf_keras. text there), not the Keras 3 one")
    if module in _MODULE_PREFIXES and short in _SIGNATURES:
        return short
    if short in _FUNCTIONS:
        raise ConfigError(f"{expr.name!r} is Keras' functional form, which returns one loss per example and "
                          f"takes no from_logits reduction; write the loss class instead, e.g. "
                          f"keras.losses.{_FUNCTIONS[short]}(...) (supported: {_SUPPORTED_TEXT})")
    raise ConfigError(f"{expr.name!r} is not a Keras loss gradparity knows; supported: {_SUPPORTED_TEXT}")


def _options(expr: LossExpression, cls: str) -> dict:
    """Arguments by parameter name (see gradparity.losses.text.bind_arguments)."""
    return bind_arguments(expr, _SIGNATURES[cls], f"keras.losses.{cls}")


def _reduction(cls: str, value) -> str:
    """The Keras 3 reduction string; ConfigError for legacy enums and unknown values."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "enum":
        member = value[1].rsplit(".", 1)[-1]
        keras3 = _LEGACY_REDUCTIONS.get(member)
        hint = f"; in Keras 3 write reduction={keras3!r}" if keras3 else ""
        raise ConfigError(f"keras.losses.{cls}: {value[1]} is the tf_keras (Keras 2) legacy Reduction enum, "
                          f"which gradparity does not support yet{hint}")
    if value is None:
        return "none"
    if not isinstance(value, str) or value not in _REDUCTIONS:
        raise ConfigError(f"keras.losses.{cls}: reduction must be one of 'sum_over_batch_size' (the default), "
                          f"'mean', 'sum', 'mean_with_sample_weight' or None, got {value!r}")
    return value


def check_call(expr: LossExpression, cls: str, module: str = "keras.losses", example: str = "keras.losses") -> bool:
    """Whether the call passes a sample weight; ConfigError for calls that are not (y_true, y_pred[, w]).

    Shared by the Keras family: ``module`` names the loss in messages (``tf_keras.losses`` for the legacy
    package), ``example`` is how an example call is written.
    """
    call = expr.call
    if call is None:
        if expr.method is not None:
            raise ConfigError(f"{module}.{cls}(...).{expr.method}(): a loss object has no "
                              f".{expr.method}(); call it first, e.g. {example}.{cls}(...)(y_true, y_pred)")
        return False
    unknown = [k for k in call.keywords if k not in _CALL_PARAMETERS]
    if unknown:
        raise ConfigError(f"{module}.{cls} is called as loss(y_true, y_pred, sample_weight=None); it has "
                          f"no call argument {unknown[0]!r}")
    given = call.n_args + len(call.keywords)
    if not 2 <= given <= 3:
        raise ConfigError(f"{module}.{cls} is called as loss(y_true, y_pred, sample_weight=None) with 2 or "
                          f"3 arguments, got {given}")
    doubled = [k for k in call.keywords if _CALL_PARAMETERS.index(k) < call.n_args]
    if doubled:
        raise ConfigError(f"{module}.{cls}(...) call got two values for {doubled[0]!r}")
    return call.sample_weight


def parse(expr: LossExpression, targets: str | None = None) -> LossSemantics:
    """The LossSemantics of a Keras 3 ``keras.losses`` text; ConfigError naming any option it cannot honour.

    ``targets`` is the user's hint of the target form; for Keras the class
    decides it (SparseCategoricalCrossentropy: class indices,
    CategoricalCrossentropy: probabilities), so a hint may only agree.
    ``name`` and ``dtype`` are accepted and do not change what is computed
    (gradparity computes in the job's dtype).
    """
    if targets not in (None, "class_index", "probabilities"):
        raise ConfigError(f"the targets hint must be 'class_index' or 'probabilities', got {targets!r}")
    cls = _class_name(expr)
    options = _options(expr, cls)
    if cls in _TARGETS and targets not in (None, _TARGETS[cls]):
        other = "CategoricalCrossentropy" if _TARGETS[cls] == "class_index" else "SparseCategoricalCrossentropy"
        raise ConfigError(f"keras.losses.{cls} takes {_TARGETS[cls].replace('_', '-')} targets, not {targets}; "
                          f"for {targets.replace('_', '-')} targets write keras.losses.{other}")
    sample_weight = check_call(expr, cls)
    reduction = _reduction(cls, options.get("reduction", "sum_over_batch_size"))
    if reduction == "none":
        if expr.call is None or expr.method is None:
            raise ConfigError(f"keras.losses.{cls}(reduction=None) returns one loss per example, and translate "
                              "compares reduced losses; write the reduction you apply, e.g. "
                              f"reduction='sum_over_batch_size' / 'sum' / 'mean_with_sample_weight', or "
                              f"keras.losses.{cls}(reduction=None)(y_true, y_pred).mean()")
    for key in ("name", "dtype"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise ConfigError(f"keras.losses.{cls}: {key} must be a string, got {options[key]!r}")
    fields: dict = {}
    if cls in _LOGITS_CLASSES:
        from_logits = options.get("from_logits", False)
        if not isinstance(from_logits, bool):
            raise ConfigError(f"keras.losses.{cls}: from_logits must be True or False, got {from_logits!r}")
        if not from_logits:
            raise ConfigError(f"keras.losses.{cls} has from_logits=False (Keras' default): it expects "
                              "probabilities, but gradparity compares logits-based losses (probability inputs are "
                              "not supported yet); if your model outputs logits (no softmax/sigmoid last layer), "
                              f"write keras.losses.{cls}(from_logits=True, ...)")
        axis = options.get("axis", -1)
        if axis != -1 or isinstance(axis, bool):
            raise ConfigError(f"keras.losses.{cls}: axis={axis!r} is not supported; gradparity compares "
                              "channels-last logits, so axis must be -1 (move the class axis last)")
    if cls in ("CategoricalCrossentropy", "BinaryCrossentropy"):
        smoothing = options.get("label_smoothing", 0.0)
        if not is_number(smoothing) or not 0.0 <= smoothing <= 1.0:
            raise ConfigError(f"keras.losses.{cls}: label_smoothing must be a number in [0, 1], got {smoothing!r}")
        fields["label_smoothing"] = float(smoothing)
    if cls == "SparseCategoricalCrossentropy":
        ignore = options.get("ignore_class")
        if ignore is not None and (not isinstance(ignore, int) or isinstance(ignore, bool)):
            raise ConfigError(f"keras.losses.{cls}: ignore_class must be an integer or None, got {ignore!r}")
        fields["ignore_index"] = ignore
    if cls == "Huber":
        delta = options.get("delta", 1.0)
        if not is_number(delta) or not (math.isfinite(delta) and delta > 0):
            raise ConfigError(f"keras.losses.Huber: delta must be a positive number, got {delta!r}")
        fields["delta"] = float(delta)
    kind = _KINDS[cls]
    if kind not in ("cross_entropy", "cross_entropy_probs"):
        fields["last_axis"] = "mean"  # Keras averages the last axis into one loss per example/token
    if reduction == "none":
        # reduction=None, then .mean() / .sum() of the weighted (masked) losses: every example/token counts.
        divisor = {"mean": "count", "sum": "one"}[expr.method]
    else:
        # A .mean() / .sum() of the already reduced 0-d loss changes nothing.
        divisor = _REDUCTIONS[reduction]
        if divisor == "count" and fields.get("ignore_index") is not None:
            divisor = "valid"  # apply_mask rescales the mask by total/valid: the mean is over valid elements
    return LossSemantics(kind, divisor, sample_weight=sample_weight, **fields)


# ----------------------------------------------------------------------------------------------------------
# render: any LossSemantics -> Keras 3 code
# ----------------------------------------------------------------------------------------------------------

#: The Keras class that computes each kind's per-example loss (None: no class without hand arithmetic).
_CLASSES = {"cross_entropy": "SparseCategoricalCrossentropy", "cross_entropy_probs": "CategoricalCrossentropy",
            "binary_cross_entropy": "BinaryCrossentropy", "mse": "MeanSquaredError", "l1": "MeanAbsoluteError",
            "huber": "Huber"}
_CHANGES = "changes from batch to batch: it is computed from the batch, never a constant"


def _entrywise(sem: LossSemantics) -> bool:
    """Whether every entry of the last axis is its own element (PyTorch), where Keras averages that axis."""
    return sem.kind not in ("cross_entropy", "cross_entropy_probs") and sem.last_axis == "elementwise"


def divisor_rule(sem: LossSemantics) -> str:
    """``sem.divisor`` reduced to the rule it amounts to without the weights or mask ``sem`` lacks (shared by
    the Keras family)."""
    rule = sem.divisor
    if rule == "class_weight_sum" and sem.class_weight is None:
        rule = "valid"
    if rule in ("sample_weight_sum", "keras_sample_weight_sum") and not sem.sample_weight:
        rule = "valid" if sem.masked or rule == "sample_weight_sum" else "count"
    if rule == "valid" and not sem.masked:
        rule = "count"
    return rule


class _Plan:
    """How ``sem`` is computed in Keras: which loss object (if any) and how its weight is built.

    ``criterion``: the keras.losses class computing the per-example loss, or
    None when a keras.ops formula must (class weights inside the sum over
    classes, BCE's class/positive weights). ``one_hot``: class-index targets
    go through CategoricalCrossentropy (for label smoothing), so the mask is a
    sample weight. ``keras_mask``: SparseCategoricalCrossentropy's
    ``ignore_class`` masks. ``class_weight_in_weight``: class weights become a
    per-example sample weight ``class_weight[targets]`` (exact without label
    smoothing, as ``Model.fit(class_weight=...)`` does).
    """

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
            self.criterion = None  # the weight of each class sits inside the sum over classes
        if sem.kind == "binary_cross_entropy" and (sem.class_weight is not None or sem.pos_weight is not None):
            self.criterion = None  # BinaryCrossentropy has neither
        self.keras_mask = self.masked and self.criterion == "SparseCategoricalCrossentropy"
        self.class_weight_in_weight = (sem.kind == "cross_entropy" and sem.class_weight is not None
                                       and self.criterion is not None)
        self.entries = _entrywise(sem)
        self.rule = divisor_rule(sem)
        self.no_nan = sem.divisor == "keras_sample_weight_sum"
        self.native_reduction, self.weight_as_given = self._native()

    def _native(self) -> tuple[str | None, bool]:
        """(the Keras reduction that computes sem exactly, or None; whether sample weights go as given)."""
        sem, rule = self.sem, self.rule
        if self.criterion is None:
            return None, False
        cw = self.class_weight_in_weight
        if rule == "one":
            return ("sum" if not self.entries else None), False
        if rule == "count":
            # sum_over_batch_size divides by every example, unless ignore_class rescaled its mask.
            return (None if self.keras_mask else "sum_over_batch_size"), False
        if rule == "valid":  # masked
            if self.keras_mask:
                return "sum_over_batch_size", False
            return ("mean_with_sample_weight" if not sem.sample_weight else None), False  # weight = mask
        if rule == "class_weight_sum":  # class weights, no label smoothing: SparseCategoricalCrossentropy
            return ("mean_with_sample_weight" if not sem.sample_weight else None), False
        if rule == "sample_weight_sum":  # sample weights
            return ("mean_with_sample_weight" if not cw else None), False
        if rule == "keras_sample_weight_sum":  # sample weights
            if cw:
                return None, False
            if self.masked:
                return "mean_with_sample_weight", False
            # Keras sums the weights as passed: (N,) weights on an (N, T) loss count once per sequence.
            return ("mean_with_sample_weight" if not self.entries else None), True
        raise ConfigError(f"unknown divisor rule {rule!r}; known: {', '.join(DIVISORS)}")


def floats(values) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def _constants(sem: LossSemantics) -> list[str]:
    lines = []
    tensor = "keras.ops.convert_to_tensor({}, dtype=logits.dtype)"
    if sem.class_weight is not None:
        lines.append(f"class_weight = {tensor.format(floats(sem.class_weight))}")
    if sem.pos_weight is not None:
        lines.append(f"pos_weight = {tensor.format(floats(sem.pos_weight))}")
    return lines


def _weight_lines(plan: _Plan) -> tuple[list[str], str | None]:
    """(lines, the sample weight expression to pass/multiply, or None when every weight is 1).

    Weights live on the per-example grid (N,) or (N, T). Where a mask
    applies, ignored elements get weight 0 through ``keras.ops.where``,
    which also makes a fresh tensor: Keras' masked reduction multiplies the
    weight in place on its torch backend.
    """
    sem = plan.sem
    lines, factors = [], []
    if sem.sample_weight:
        lines.append("sample_weight = keras.ops.reshape(sample_weight, tuple(sample_weight.shape) + (1,) * "
                     "(len(logits.shape) - 1 - len(sample_weight.shape)))  # (N,) -> (N, 1) on an (N, T) loss: "
                     "Keras does not broadcast sample weights itself")
    if plan.class_weight_in_weight:
        index = "safe_targets" if plan.masked else "targets"
        factors.append(f"keras.ops.take(class_weight, {index})")
    if sem.sample_weight:
        factors.append("sample_weight")
    if plan.weight_as_given:
        return lines, "sample_weight"
    if plan.masked:
        if not factors and plan.keras_mask:
            return lines, None  # ignore_class masks by itself
        if factors:
            lines.append(f"weight = keras.ops.where(valid, {' * '.join(factors)}, 0.0)  # 0 for ignored targets")
        else:
            lines.append("weight = keras.ops.cast(valid, logits.dtype)  # 0 for ignored targets")
        return lines, "weight"
    if not factors:
        return lines, None
    if factors == ["sample_weight"]:
        lines.append("weight = keras.ops.broadcast_to(sample_weight, tuple(logits.shape[:-1]))  # one per example "
                     "or token")
    else:
        lines.append(f"weight = {' * '.join(factors)}")
    return lines, "weight"


def _mask_lines(plan: _Plan) -> list[str]:
    if not plan.masked:
        return []
    lines = [f"valid = keras.ops.not_equal(targets, {plan.sem.ignore_index})  # the elements that count"]
    if plan.class_weight_in_weight or plan.one_hot or plan.criterion is None:
        lines.append("safe_targets = keras.ops.where(valid, targets, 0)  # any class: their weight is 0")
    return lines


def _constructor(plan: _Plan, reduction: str) -> str:
    sem, args = plan.sem, []
    if sem.kind in ("cross_entropy", "cross_entropy_probs", "binary_cross_entropy"):
        args.append("from_logits=True")
    if plan.keras_mask:
        args.append(f"ignore_class={sem.ignore_index}")
    if sem.label_smoothing and plan.criterion in ("CategoricalCrossentropy", "BinaryCrossentropy"):
        args.append(f"label_smoothing={float(sem.label_smoothing)!r}")
    if sem.kind == "huber" and sem.delta != 1.0:
        args.append(f"delta={float(sem.delta)!r}")
    if reduction != "sum_over_batch_size":
        args.append(f"reduction={reduction!r}")
    return f"keras.losses.{plan.criterion}({', '.join(args)})"


def criterion_call(plan, weight: str | None, one_hot: str = "keras.ops.one_hot") -> tuple[list[str], str]:
    """(lines preparing the targets, the criterion's call expression); ``one_hot`` is the op that writes
    one-hot targets (``tf.one_hot`` for tf_keras). Shared by the Keras family."""
    lines, y = [], "targets"
    if plan.one_hot:
        index = "safe_targets" if plan.masked else "targets"
        lines.append(f"one_hot = {one_hot}({index}, logits.shape[-1], dtype=logits.dtype)  "
                     "# SparseCategoricalCrossentropy has no label_smoothing")
        y = "one_hot"
    extra = f", sample_weight={weight}" if weight else ""
    return lines, f"criterion({y}, logits{extra})"


#: The ops a Keras-family rendering writes, by role; tf_keras passes its own (see ``formula_lines``).
KERAS_OPS = {
    "one_hot": "keras.ops.one_hot", "sum": "keras.ops.sum", "log_softmax": "keras.ops.log_softmax",
    "log_sigmoid": "keras.ops.log_sigmoid",
    # A sum and a division, not keras.ops.mean: that computes float64 in float32 on Keras' jax and torch backends.
    "mean_last": "keras.ops.sum(per_entry, axis=-1) / logits.shape[-1]",
}


def formula_lines(plan, ops: dict[str, str] = KERAS_OPS) -> list[str]:
    """Lines computing ``per_element`` (one loss per example/token; its entries summed or averaged) by hand,
    written with ``ops`` (Keras 3's by default). Shared by the Keras family."""
    sem = plan.sem
    eps = float(sem.label_smoothing)
    if sem.kind in ("cross_entropy", "cross_entropy_probs"):
        if sem.kind == "cross_entropy":
            index = "safe_targets" if plan.masked else "targets"
            lines = [f"q = {ops['one_hot']}({index}, logits.shape[-1], dtype=logits.dtype)"]
        else:
            lines = ["q = targets"]
        if eps:
            lines.append(f"q = (1.0 - {eps!r}) * q + {eps!r} / logits.shape[-1]  # label smoothing")
        lines.append(f"per_element = -{ops['sum']}(class_weight * q * {ops['log_softmax']}(logits, axis=-1), "
                     "axis=-1)  # w_c inside the sum over classes, as PyTorch")
        return lines
    lines = []
    if eps:
        lines.append(f"targets = targets * (1.0 - {eps!r}) + 0.5 * {eps!r}  # binary label smoothing, as Keras")
    pw = "pos_weight * " if sem.pos_weight is not None else ""
    cw = "class_weight * " if sem.class_weight is not None else ""
    lines.append(f"per_entry = -{cw}({pw}targets * {ops['log_sigmoid']}(logits) + (1.0 - targets) * "
                 f"{ops['log_sigmoid']}(-logits))")
    if plan.entries:
        lines.append(f"per_element = {ops['sum']}(per_entry, axis=-1)  # every entry is an element")
    else:
        lines.append(f"per_element = {ops['mean_last']}  # the last axis averaged, as Keras")
    return lines


def _divisor_lines(plan: _Plan) -> tuple[list[str], str | None]:
    """(lines computing ``divisor``, a note on it or None); every batch-dependent divisor from the batch."""
    rule = plan.rule
    entries = " * logits.shape[-1]" if plan.entries else ""
    per_entry = "  # each example's C entries count" if plan.entries else ""
    examples = "int(np.prod(tuple(logits.shape[:-1])))"
    if rule == "one":
        return [], None
    if rule == "count":
        if plan.entries:
            what = "every entry: N*C, or N*T*C"
        else:
            what = "every element, ignored ones included" if plan.masked else "N, or N*T"
        return [f"divisor = {examples}{entries}  # {what}"], None
    if rule == "valid":
        return (["divisor = keras.ops.sum(keras.ops.cast(valid, logits.dtype))"],
                f"the divisor (the number of non-ignored targets) {_CHANGES}")
    if rule == "class_weight_sum":
        if plan.masked:
            line = "divisor = keras.ops.sum(keras.ops.where(valid, keras.ops.take(class_weight, safe_targets), 0.0))"
        else:
            line = "divisor = keras.ops.sum(keras.ops.take(class_weight, targets))"
        return [line], f"the divisor (the sum of the class weights of the counted targets) {_CHANGES}"
    if rule == "sample_weight_sum":
        if plan.masked:
            line = "divisor = keras.ops.sum(keras.ops.where(valid, sample_weight, 0.0))"
        else:
            line = (f"divisor = keras.ops.sum(keras.ops.broadcast_to(sample_weight, tuple(logits.shape[:-1])))"
                    f"{entries}{per_entry}")
        return [line], f"the divisor (the sum of the sample weights over the elements) {_CHANGES}"
    if rule == "keras_sample_weight_sum":
        if plan.masked:
            return (["divisor = keras.ops.sum(keras.ops.where(valid, sample_weight, 0.0))  # Keras: the mask "
                     "broadcasts the weights to every element before they are summed"],
                    f"the divisor (Keras: the sum of the sample weights over the non-ignored elements) {_CHANGES}")
        return (["divisor = keras.ops.sum(sample_weight)  # Keras sums the weights as passed: (N,) weights on an "
                 "(N, T) loss count once per sequence"],
                f"the divisor (Keras: the sum of sample_weight as passed; (N,) weights on an (N, T) loss are "
                f"summed over N only) {_CHANGES}")
    raise ConfigError(f"unknown divisor rule {rule!r}; known: {', '.join(DIVISORS)}")


def _final_line(plan: _Plan) -> str:
    if plan.rule == "one":
        return "loss = total"
    if plan.no_nan:
        # keras.ops.divide_no_nan would be Keras' own spelling, but it computes in float32 on Keras' torch backend.
        return ("loss = total / keras.ops.where(divisor == 0, 1.0, divisor)  # Keras divides with divide_no_nan: "
                "0 when nothing counts")
    return "loss = total / divisor"


def _explicit_reasons(plan: _Plan) -> list[str]:
    """Why ``sem`` has no native Keras form, one note per reason."""
    sem, out = plan.sem, []
    if plan.criterion is None:
        if sem.kind in ("cross_entropy", "cross_entropy_probs"):
            out.append("no native equivalent of class weights with label smoothing or probability targets: "
                       "PyTorch puts w_c inside the sum over classes, -sum_c w_c q_c log p_c, which no Keras "
                       "sample weight reproduces; written with keras.ops.log_softmax")
        else:
            out.append("no native equivalent of class weights / pos_weight (BinaryCrossentropy has neither): the "
                       "per-entry loss is written with keras.ops.log_sigmoid")
    if plan.entries:
        out.append("Keras averages the last axis (its C entries) into one loss per example, where the source counts "
                   "every entry: the sum is C times Keras' sum")
    if not out:
        out.append(f"no native Keras reduction divides by {DIVISORS[sem.divisor]} here: reduction='sum', then the "
                   "divisor computed explicitly")
    return out


def _body(sem: LossSemantics) -> tuple[list[str], bool, list[str]]:
    """(code lines in terms of tensors logits/targets/sample_weight, ending in 'loss = ...', native, notes)."""
    plan = _Plan(sem)
    notes = []
    lines = _constants(sem) + _mask_lines(plan)
    weight_lines, weight = _weight_lines(plan)
    lines += weight_lines
    if sem.sample_weight:
        notes.append("Keras does not broadcast (N,) sample weights over the T axis of an (N, T, C) output (it "
                     "raises): reshape them to (N, 1)" + ("" if plan.weight_as_given else " or (N, T)"))
    if plan.class_weight_in_weight:
        notes.append("Keras losses take no class weights: they become the sample weight class_weight[targets], "
                     "as Model.fit(class_weight=...) does")
    if plan.one_hot:
        notes.append("SparseCategoricalCrossentropy has no label_smoothing: targets are one-hot encoded for "
                     "CategoricalCrossentropy" + (", ignored ones weighted 0" if plan.masked else ""))
    if plan.native_reduction is not None:
        target_lines, call = criterion_call(plan, weight)
        lines += [f"criterion = {_constructor(plan, plan.native_reduction)}"] + target_lines
        lines.append(f"loss = {call}")
        if plan.native_reduction != "sum":
            notes.append("on Keras' torch backend this reduction divides with divide_no_nan, which computes in "
                         "float32 there (keras 3.15), so expect float32 agreement on keras-torch")
        if plan.rule not in ("count", "one"):
            weights = "the sum of the sample weights" + (" of the non-ignored targets" if plan.masked else "")
            what = {"valid": "the number of non-ignored targets",
                    "class_weight_sum": "the sum of the class weights of the counted targets",
                    "sample_weight_sum": weights, "keras_sample_weight_sum": weights}[plan.rule]
            notes.append(f"reduction={plan.native_reduction!r} divides by {what}, which changes from batch to batch")
        return lines, True, _with_precision_note(lines, notes)
    notes += _explicit_reasons(plan)
    if plan.criterion is not None:
        target_lines, call = criterion_call(plan, weight)
        lines += [f"criterion = {_constructor(plan, 'sum')}"] + target_lines
        lines.append(f"total = {call}  # sum over examples (tokens) of the weighted losses")
        if plan.entries:
            lines.append("total = total * logits.shape[-1]  # Keras averaged each example's C entries; the source "
                         "sums them")
    else:
        lines += formula_lines(plan)
        lines.append(f"total = keras.ops.sum({weight} * per_element)" if weight
                     else "total = keras.ops.sum(per_element)")
    divisor_lines, note = _divisor_lines(plan)
    lines += divisor_lines + [_final_line(plan)]
    if note:
        notes.append(note)
    return lines, False, _with_precision_note(lines, notes)


def _with_precision_note(lines: list[str], notes: list[str]) -> list[str]:
    """``notes`` plus a warning when the code uses a Keras loss that averages the last axis with keras.ops.mean."""
    if any(f"keras.losses.{c}(" in line for line in lines
           for c in ("BinaryCrossentropy", "MeanSquaredError", "MeanAbsoluteError", "Huber")):
        notes.append("this Keras loss averages the last axis with keras.ops.mean, which computes float64 inputs in "
                     "float32 on Keras' jax and torch backends (keras 3.15): expect float32 agreement there")
    return notes


def render(sem: LossSemantics) -> Rendering:
    """``sem`` as Keras 3 code: a native loss object where one exists, else reduction='sum' and explicit arithmetic.

    The function converts its inputs with ``keras.ops.convert_to_tensor``
    (numpy arrays or tensors of the active Keras backend), computes in
    ``keras.config.floatx()`` as Keras' loss objects do, takes channels-last
    logits (N, C) or (N, T, C) and sample weights (N,) or (N, T), and
    returns a 0-d tensor. Only keras.ops / keras.losses are used, so the
    same source runs on Keras' tensorflow, jax and torch backends (and
    traces under jax.jit: no Python branching on values).
    """
    sem.check()
    body, native, notes = _body(sem)
    notes.append("Keras' losses compute in keras.config.floatx() (float32 unless set, whatever the logits' "
                 "dtype): keras.config.set_floatx('float64') to compare in float64")
    target_dtype = '"int32"' if sem.kind == "cross_entropy" else "logits.dtype"
    prologue = ["logits = keras.ops.convert_to_tensor(logits, dtype=keras.config.floatx())",
                f"targets = keras.ops.convert_to_tensor(targets, dtype={target_dtype})"]
    if sem.sample_weight:
        prologue += ["if sample_weight is None:",
                     "    raise ValueError('this loss takes a sample_weight of shape (N,) or (N, T)')",
                     "sample_weight = keras.ops.convert_to_tensor(sample_weight, dtype=logits.dtype)"]
    function = function_source(("import numpy as np", "import keras"), sem, prologue, body)
    return Rendering("keras", native, "\n".join(body) + "\n", function, tuple(notes))
