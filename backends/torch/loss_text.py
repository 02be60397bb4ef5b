"""PyTorch loss texts, the parent half of the losses: read a ``torch.nn`` loss text, write any LossSemantics as
torch code (the worker half, ``losses``, runs it).

Two roles, one per entry point (and the worker's):

- ``parse(expr, targets)``: a ``torch.nn.<Loss>(...)`` text (see
  ``gradparity.losses.text``) -> the ``LossSemantics`` torch computes;
- ``render(sem)``: any ``LossSemantics`` (from any framework) -> torch code,
  native when a torch loss object with reduction 'mean'/'sum' computes it,
  otherwise ``reduction='none'`` with the weighting and divisor written out;
- ``losses.open_session(job)``: the worker side of a 'loss_functions' job,
  which runs rendered functions and returns d loss / d logits.

Importing this module imports no torch (the parent process parses and
renders).

What torch's reductions divide by (measured on torch 2.13, float64, and
checked for every rendering by tests/test_losses_torch.py):

- CrossEntropyLoss, class-index targets: 'mean' divides by the sum over the
  non-ignored targets of their class weight (the valid count without
  weights), and targets equal to ``ignore_index`` (default -100) are always
  ignored;
- CrossEntropyLoss, probability targets: 'mean' divides by N (or N*T);
- BCEWithLogitsLoss, MSELoss, L1Loss, HuberLoss: element-wise, 'mean'
  divides by the number of entries (N*C or N*T*C);
- 'sum' divides by nothing.
"""
from __future__ import annotations

import math

from gradparity.errors import ConfigError
from gradparity.losses.catalogue import DIVISORS, LossSemantics, Rendering, function_source
from gradparity.losses.text import LossExpression, bind_arguments, is_number

#: Loss classes gradparity reads, with their constructor parameters in torch's positional order.
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "CrossEntropyLoss": ("weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing"),
    "BCEWithLogitsLoss": ("weight", "size_average", "reduce", "reduction", "pos_weight"),
    "MSELoss": ("size_average", "reduce", "reduction"),
    "L1Loss": ("size_average", "reduce", "reduction"),
    "HuberLoss": ("reduction", "delta"),
}
_KINDS = {"CrossEntropyLoss": "cross_entropy", "BCEWithLogitsLoss": "binary_cross_entropy", "MSELoss": "mse",
          "L1Loss": "l1", "HuberLoss": "huber"}
#: The torch class that computes each kind's per-element loss.
_CLASSES = {"cross_entropy": "CrossEntropyLoss", "cross_entropy_probs": "CrossEntropyLoss",
            "binary_cross_entropy": "BCEWithLogitsLoss", "mse": "MSELoss", "l1": "L1Loss", "huber": "HuberLoss"}
#: Module paths under which the classes may be written.
_MODULE_PREFIXES = ("", "nn", "torch.nn", "torch.nn.modules.loss")
#: Why some well-known torch losses are not read, and what to write instead.
_NOT_SUPPORTED = {
    "NLLLoss": "takes log-probabilities, not logits; CrossEntropyLoss is log_softmax followed by NLLLoss, "
               "so write torch.nn.CrossEntropyLoss(...) on the logits",
    "BCELoss": "takes probabilities (after a sigmoid), not logits; write torch.nn.BCEWithLogitsLoss(...), "
               "which is sigmoid + BCELoss computed stably",
    "SmoothL1Loss": "is not in gradparity's catalogue; SmoothL1Loss(beta=b) equals HuberLoss(delta=b) divided "
                    "by b, so write torch.nn.HuberLoss(delta=b)",
}
_SUPPORTED_TEXT = ("torch.nn.CrossEntropyLoss, torch.nn.BCEWithLogitsLoss, torch.nn.MSELoss, torch.nn.L1Loss, "
                   "torch.nn.HuberLoss")
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------- parse


def _class_name(expr: LossExpression) -> str:
    """The torch.nn class the text constructs; ConfigError for functional forms and unknown losses."""
    module, _, short = expr.name.rpartition(".")
    if module in ("F", "torch.nn.functional", "nn.functional"):
        raise ConfigError(f"{expr.name!r} is torch's functional form, whose arrays gradparity cannot read; "
                          f"write the loss module instead, e.g. torch.nn.CrossEntropyLoss(...) "
                          f"(supported: {_SUPPORTED_TEXT})")
    if module in _MODULE_PREFIXES and short in _SIGNATURES:
        return short
    if short in _NOT_SUPPORTED:
        raise ConfigError(f"{expr.name!r} {_NOT_SUPPORTED[short]}")
    raise ConfigError(f"{expr.name!r} is not a PyTorch loss gradparity knows; supported: {_SUPPORTED_TEXT}")


def _options(expr: LossExpression, cls: str) -> dict:
    """Arguments by parameter name (see bind_arguments); deprecated size_average/reduce are refused."""
    options = bind_arguments(expr, _SIGNATURES[cls], f"torch.nn.{cls}", unlisted=("size_average", "reduce"))
    for old in ("size_average", "reduce"):
        if options.get(old) is not None:
            raise ConfigError(f"torch.nn.{cls}: {old!r} is deprecated in PyTorch and not read by gradparity; "
                              "write reduction='mean' or reduction='sum' instead")
        options.pop(old, None)
    return options


def _weights(cls: str, name: str, value) -> tuple[float, ...] | None:
    """A 1-D list of finite, non-negative numbers (one per class) as floats, or None."""
    if value is None:
        return None
    if is_number(value):
        raise ConfigError(f"torch.nn.{cls}: {name} must hold one weight per class (a 1-D list such as "
                          f"torch.tensor([1.0, 2.0, 0.5])), got the single number {value!r}")
    if not isinstance(value, (list, tuple)) or not value or not all(is_number(v) for v in value):
        raise ConfigError(f"torch.nn.{cls}: {name} must be a non-empty 1-D list of numbers, one per class, "
                          f"got {value!r}")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) and v >= 0 for v in out):
        raise ConfigError(f"torch.nn.{cls}: {name} must be finite and non-negative, got {list(out)}")
    return out


def _reduction(cls: str, value) -> str:
    if not isinstance(value, str) or value not in _REDUCTIONS:
        raise ConfigError(f"torch.nn.{cls}: reduction must be 'mean', 'sum' or 'none', got {value!r}")
    return value


def _check_call(expr: LossExpression, cls: str) -> None:
    """A call on the constructed loss must be ``(logits, targets)``: torch losses take no sample weight."""
    call = expr.call
    if call is None:
        if expr.method is not None:
            raise ConfigError(f"torch.nn.{cls}(...).{expr.method}(): a loss module has no .{expr.method}(); "
                              f"call it first, e.g. torch.nn.{cls}(reduction='none')(logits, targets)"
                              f".{expr.method}()")
        return
    if call.sample_weight or "weight" in call.keywords:
        raise ConfigError(f"torch.nn.{cls} is called as loss(input, target) and takes no sample weight; "
                          "torch users multiply reduction='none' losses by their weights by hand. Write the "
                          "loss without weights, or translate from a framework whose loss takes them "
                          "(e.g. keras ...(y, logits, sample_weight=w))")
    unknown = [k for k in call.keywords if k not in ("input", "target")]
    if unknown:
        raise ConfigError(f"torch.nn.{cls} is called as loss(input, target); it has no call argument "
                          f"{unknown[0]!r}")
    if call.n_args + len(call.keywords) != 2:
        raise ConfigError(f"torch.nn.{cls} is called as loss(input, target) with two arguments, got "
                          f"{call.n_args + len(call.keywords)}")


def parse(expr: LossExpression, targets: str | None = None) -> LossSemantics:
    """The LossSemantics of a ``torch.nn`` loss text; ConfigError naming any option it cannot honour.

    ``targets`` is the user's hint for CrossEntropyLoss, which decides by the
    target dtype at call time: None or 'class_index' (integer labels, the
    default) or 'probabilities' (a distribution per element).
    """
    if targets not in (None, "class_index", "probabilities"):
        raise ConfigError(f"the targets hint must be 'class_index' or 'probabilities', got {targets!r}")
    cls = _class_name(expr)
    options = _options(expr, cls)
    _check_call(expr, cls)
    reduction = _reduction(cls, options.pop("reduction", "mean"))
    if reduction == "none":
        if expr.call is None or expr.method is None:
            raise ConfigError(f"torch.nn.{cls}(reduction='none') returns one loss per element, and translate "
                              "compares reduced losses; write the reduction you apply, e.g. "
                              f"reduction='mean' / 'sum', or torch.nn.{cls}(reduction='none')(logits, targets)"
                              ".mean()")
        # reduction='none' followed by .mean() / .sum(): every element counts, ignored ones as 0.
        divisor_of = {"mean": "count", "sum": "one"}
    else:
        # A .mean() / .sum() of the already reduced 0-d loss changes nothing.
        divisor_of = {"mean": None, "sum": "one"}
    kind = _KINDS[cls]
    fields: dict = {}
    if cls == "CrossEntropyLoss":
        fields["class_weight"] = _weights(cls, "weight", options.get("weight"))
        smoothing = options.get("label_smoothing", 0.0)
        if not is_number(smoothing) or not 0.0 <= smoothing <= 1.0:
            raise ConfigError(f"torch.nn.CrossEntropyLoss: label_smoothing must be a number in [0, 1], "
                              f"got {smoothing!r}")
        fields["label_smoothing"] = float(smoothing)
        if targets == "probabilities":
            if "ignore_index" in options:
                raise ConfigError("torch.nn.CrossEntropyLoss: ignore_index applies to class-index targets "
                                  "only (torch rejects it or ignores it with probability targets); drop it, "
                                  "or use --targets class_index")
            kind = "cross_entropy_probs"
        else:
            ignore = options.get("ignore_index", -100)
            if not isinstance(ignore, int) or isinstance(ignore, bool):
                raise ConfigError(f"torch.nn.CrossEntropyLoss: ignore_index must be an integer, got {ignore!r}")
            # torch ignores targets == -100 even when the text does not say so: that is its semantics.
            fields["ignore_index"] = ignore
        mean_divisor = "class_weight_sum" if kind == "cross_entropy" else "count"
    else:
        mean_divisor = "count"
        if cls == "BCEWithLogitsLoss":
            fields["class_weight"] = _weights(cls, "weight", options.get("weight"))
            fields["pos_weight"] = _weights(cls, "pos_weight", options.get("pos_weight"))
        if cls == "HuberLoss":
            delta = options.get("delta", 1.0)
            if not is_number(delta) or not (math.isfinite(delta) and delta > 0):
                raise ConfigError(f"torch.nn.HuberLoss: delta must be a positive number, got {delta!r}")
            fields["delta"] = float(delta)
    if reduction == "none":
        divisor = divisor_of[expr.method]
    elif reduction == "sum":
        divisor = "one"
    else:
        divisor = mean_divisor
    return LossSemantics(kind, divisor, **fields)


# ---------------------------------------------------------------------------------------------- render


def _native_reduction(sem: LossSemantics) -> str | None:
    """'mean' or 'sum' when a torch loss object with that reduction computes ``sem`` exactly, else None."""
    if sem.sample_weight:
        return None  # torch losses take no sample weight
    if sem.kind == "binary_cross_entropy" and sem.label_smoothing:
        return None  # torch has no binary label smoothing
    if sem.kind not in ("cross_entropy", "cross_entropy_probs") and sem.last_axis == "mean":
        return None  # torch never averages the last axis first
    if sem.divisor == "one":
        return "sum"
    # Without sample weights these rules reduce to the valid count, or to every element when nothing is masked.
    rule = sem.divisor
    if rule == "keras_sample_weight_sum" and sem.masked:
        return None  # Keras returns 0 on a batch with every target ignored (divide_no_nan); torch's mean gives NaN
    if rule == "sample_weight_sum":
        rule = "valid"
    elif rule == "keras_sample_weight_sum":
        rule = "count"
    if rule == "valid" and not sem.masked:
        rule = "count"
    if sem.kind == "cross_entropy":
        # torch's mean divides by sum_e w[y_e] m_e: without class weights, the valid count, which is
        # every element when nothing is masked ('count' then, as the rule was normalized above).
        unweighted = sem.class_weight is None and (rule == "valid" or (rule == "count" and not sem.masked))
        return "mean" if rule == "class_weight_sum" or unweighted else None
    return "mean" if rule == "count" else None


def _floats(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def _constructor(sem: LossSemantics, reduction: str) -> tuple[list[str], str]:
    """(lines defining weight tensors, the constructor expression) for ``reduction``."""
    lines, args = [], []
    tensor = "torch.tensor({}, dtype=logits.dtype, device=logits.device)"
    if sem.class_weight is not None:
        lines.append(f"class_weight = {tensor.format(_floats(sem.class_weight))}")
        args.append("weight=class_weight")
    if sem.kind == "cross_entropy" and sem.ignore_index not in (None, -100):
        args.append(f"ignore_index={sem.ignore_index}")
    if sem.kind in ("cross_entropy", "cross_entropy_probs") and sem.label_smoothing:
        args.append(f"label_smoothing={float(sem.label_smoothing)!r}")
    if sem.pos_weight is not None:
        lines.append(f"pos_weight = {tensor.format(_floats(sem.pos_weight))}")
        args.append("pos_weight=pos_weight")
    if sem.kind == "huber" and sem.delta != 1.0:
        args.append(f"delta={float(sem.delta)!r}")
    if reduction != "mean":
        args.append(f"reduction={reduction!r}")
    return lines, f"torch.nn.{_CLASSES[sem.kind]}({', '.join(args)})"


def _call(sem: LossSemantics) -> tuple[list[str], str]:
    """(lines preparing the targets, the criterion's call expression)."""
    if sem.kind == "cross_entropy":
        return [], "criterion(logits.movedim(-1, 1), targets)"
    if sem.kind == "cross_entropy_probs":
        return [], "criterion(logits.movedim(-1, 1), targets.movedim(-1, 1))"
    if sem.kind == "binary_cross_entropy" and sem.label_smoothing:
        eps = float(sem.label_smoothing)
        return ([f"targets = targets * (1.0 - {eps!r}) + 0.5 * {eps!r}  "
                 "# Keras-style binary label smoothing: t (1 - eps) + eps / 2"], "criterion(logits, targets)")
    return [], "criterion(logits, targets)"


def _divisor_lines(sem: LossSemantics) -> tuple[list[str], str, str | None]:
    """(lines computing ``divisor``, the final 'loss = ...' line, a note on the divisor or None).

    Every divisor that depends on the batch is computed here from the batch,
    never written as a constant.
    """
    masked = sem.masked
    weighted = sem.sample_weight
    valid = [f"valid = targets != {sem.ignore_index}  # the elements that count"] if masked else []
    plain = "loss = total / divisor"
    changes = "changes from batch to batch: it is computed from the batch, never a constant"
    rule = sem.divisor
    # Rules that reduce to the valid count: no class weights, or no sample weights to sum.
    if (rule == "class_weight_sum" and sem.class_weight is None) or (rule == "sample_weight_sum" and not weighted):
        rule = "valid"
    if rule == "one":
        return [], "loss = total", None
    if rule == "count" or (rule == "valid" and not masked):
        why = "  # every element, ignored ones included" if masked else ""
        return [f"divisor = per_element.numel(){why}"], plain, None
    if rule == "valid":
        return valid + ["divisor = valid.sum()"], plain, f"the divisor (the number of non-ignored targets) {changes}"
    if rule == "class_weight_sum":
        if masked:
            lines = valid + ["divisor = (class_weight[targets.masked_fill(~valid, 0)] * valid).sum()"]
        else:
            lines = ["divisor = class_weight[targets].sum()"]
        return lines, plain, f"the divisor (the sum of the class weights of the counted targets) {changes}"
    if rule == "sample_weight_sum":
        if masked:
            lines = valid + ["divisor = (weight * valid).sum()"]
        else:
            lines = ["divisor = weight.expand_as(per_element).sum()"]
        return lines, plain, f"the divisor (the sum of the sample weights over the elements) {changes}"
    if rule == "keras_sample_weight_sum":
        no_nan = "loss = total / divisor if divisor != 0 else total * 0.0  # Keras divides with divide_no_nan"
        if not weighted:
            if masked:
                return (valid + ["divisor = valid.sum()"], no_nan,
                        f"the divisor (the number of non-ignored targets) {changes}")
            return ["divisor = per_element.numel()"], no_nan, None
        if masked:
            return (valid + ["divisor = (weight * valid).sum()  # Keras: the mask broadcasts the weights to "
                             "every element before they are summed"], no_nan,
                    f"the divisor (Keras: the sum of the sample weights over the non-ignored elements) {changes}")
        return (["divisor = sample_weight.sum()  # Keras sums the weights as given: (N,) weights on an (N, T) "
                 "loss count once per sequence"], no_nan,
                f"the divisor (Keras: the sum of sample_weight as passed; (N,) weights on an (N, T) loss are "
                f"summed over N only) {changes}")
    raise ConfigError(f"unknown divisor rule {rule!r}; known: {', '.join(DIVISORS)}")


def _explicit_reasons(sem: LossSemantics) -> list[str]:
    """Why ``sem`` has no native torch form, one note per reason."""
    out = []
    if sem.sample_weight:
        out.append("no native equivalent of sample weights (torch losses take none): they multiply the "
                   "reduction='none' losses, broadcast over the trailing axes")
    if sem.kind == "binary_cross_entropy" and sem.label_smoothing:
        out.append("no native equivalent of binary label smoothing (BCEWithLogitsLoss has none): the targets "
                   "are smoothed by hand, t (1 - eps) + eps / 2 as Keras does")
    if sem.kind not in ("cross_entropy", "cross_entropy_probs") and sem.last_axis == "mean":
        out.append("no native equivalent of averaging the last axis first (torch keeps every entry): "
                   ".mean(dim=-1) on the reduction='none' losses, as Keras does")
    if not out:
        out.append(f"no native equivalent of dividing by {DIVISORS[sem.divisor]}: the divisor is computed "
                   "explicitly")
    return out


def _body(sem: LossSemantics) -> tuple[list[str], bool, list[str]]:
    """(the code lines in terms of tensors logits/targets/sample_weight ending in 'loss = ...', native, notes)."""
    native = _native_reduction(sem)
    notes = []
    if sem.kind in ("cross_entropy", "cross_entropy_probs"):
        notes.append("PyTorch wants the class axis second: logits.movedim(-1, 1) turns (N, T, C) into "
                     "(N, C, T) (a no-op for (N, C))")
    weight_lines, constructor = _constructor(sem, native or "none")
    target_lines, call = _call(sem)
    lines = weight_lines + [f"criterion = {constructor}"] + target_lines
    if native is not None:
        lines.append(f"loss = {call}")
        if native == "mean" and sem.kind == "cross_entropy" and (sem.class_weight is not None or sem.masked):
            what = ("the sum of the class weights of the non-ignored targets" if sem.class_weight is not None
                    else "the number of non-ignored targets")
            notes.append(f"reduction='mean' divides by {what}, which changes from batch to batch")
        return lines, True, notes
    notes += _explicit_reasons(sem)
    shape = ("(N,) or (N, T)" if sem.kind in ("cross_entropy", "cross_entropy_probs") else "the logits' shape")
    suffix = f"; 0 where targets == {sem.ignore_index}" if sem.masked else ""
    lines.append(f"per_element = {call}  # {shape}{suffix}")
    if sem.kind not in ("cross_entropy", "cross_entropy_probs") and sem.last_axis == "mean":
        lines.append("per_element = per_element.mean(dim=-1)  # one loss per example/token, as Keras")
    if sem.sample_weight:
        lines.append("weight = sample_weight.reshape(sample_weight.shape + (1,) * (per_element.ndim - "
                     "sample_weight.ndim))  # (N,) or (N, T), broadcast over the trailing axes")
        lines.append("total = (weight * per_element).sum()")
    else:
        lines.append("total = per_element.sum()")
    divisor_lines, final, note = _divisor_lines(sem)
    lines += divisor_lines + [final]
    if note:
        notes.append(note)
    return lines, False, notes


def render(sem: LossSemantics) -> Rendering:
    """``sem`` as PyTorch code: native loss object where one exists, else reduction='none' and explicit arithmetic.

    The function converts numpy inputs with ``torch.as_tensor`` (a tensor,
    requires_grad included, passes through; its dtype is kept), takes
    channels-last logits (N, C) or (N, T, C), and returns a 0-d tensor.
    """
    sem.check()
    body, native, notes = _body(sem)
    target_dtype = "dtype=torch.int64, " if sem.kind == "cross_entropy" else "dtype=logits.dtype, "
    prologue = ["logits = torch.as_tensor(logits)",
                f"targets = torch.as_tensor(targets, {target_dtype}device=logits.device)"]
    if sem.sample_weight:
        prologue += ["if sample_weight is None:",
                     "    raise ValueError('this loss takes a sample_weight of shape (N,) or (N, T)')",
                     "sample_weight = torch.as_tensor(sample_weight, dtype=logits.dtype, device=logits.device)"]
    function = function_source(("import numpy as np", "import torch"), sem, prologue, body)
    return Rendering("torch", native, "\n".join(body) + "\n", function, tuple(notes))
