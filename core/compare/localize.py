"""Localization: the first layer where two implementations of a model part.

Each backend's 'forward' case captures, for every parameterized layer (first
call, channels-last), its input, its output and d(mean loss)/d(output). The
layers pair up through the weight mapping. Walking the source model's call
order, the checkpoints are: layer k's input, layer k's output (only where
both sides' outputs are comparable: a Keras Dense with a fused activation
returns the activation's output, a torch Linear the affine one), then the
final logits. The first checkpoint beyond tolerance locates the difference:

- layer k's output differs, its input agrees: layer k itself (an epsilon, a
  padding, a kernel used transposed);
- layer k's input differs, the previous checkpoint agreed: the operations
  between, the parameter-free calls the source made there (an activation's
  approximation, a pooling, a reshape), or layer k-1 if its output could not
  be compared;
- all agree but the logits: what follows the last layer.

Backward, the gradients d loss/d output are compared from the logits back:
the last layer (in call order) whose incoming gradient differs while every
later one agrees is where the backward passes part. Tolerances are the
gradient comparison's relative model, per tensor relative to its largest
entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gradparity.experiment.weights import ModelLayout, WeightMap


@dataclass(frozen=True)
class Checkpoint:
    layer: str      # the source's name of the layer
    point: str      # "input" | "output" | "logits" | "grad_output"
    max_rel: float  # max |a - b| / max(|a|, |b|)
    tolerance: float

    @property
    def agree(self) -> bool:
        return self.max_rel <= self.tolerance

    def to_dict(self) -> dict:
        return {"layer": self.layer, "point": self.point,
                "max_rel": self.max_rel if math.isfinite(self.max_rel) else None,
                "tolerance": self.tolerance, "agree": self.agree}


@dataclass
class Localization:
    """Where ``backend`` first parts from ``source`` (``first_layer`` None: nowhere within tolerance)."""

    source: str
    backend: str
    first_layer: str | None
    where: str | None
    max_rel: float | None
    candidates: list[str]
    explanation: str
    backward_layer: str | None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    at: str | None = None  # the layer of the first checkpoint beyond tolerance ('where' is its point)
    #: When every activation and incoming gradient agrees but some parameter gradients do not: the source's layer
    #: that owns them, and per tensor {"param", "max_rel", "rows"} (``parameter_only``).
    parameter_layer: str | None = None
    parameter_tensors: list[dict] = field(default_factory=list)
    #: What to change, where the captured arrays show it (``what_to_change``), or None.
    suggestion: str | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "backend": self.backend, "first_layer": self.first_layer,
                "at": self.at, "where": self.where,
                "max_rel": self.max_rel if self.max_rel is None or math.isfinite(self.max_rel) else None,
                "candidates": self.candidates, "explanation": self.explanation,
                "backward_first_layer": self.backward_layer,
                "parameter_layer": self.parameter_layer, "parameter_tensors": self.parameter_tensors,
                "suggestion": self.suggestion,
                "checkpoints": [c.to_dict() for c in self.checkpoints]}


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to the larger tensor's largest entry (inf for shapes that differ or non-finite)."""
    if a.shape != b.shape:
        return math.inf
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    d = float(np.max(np.abs(a - b), initial=0.0))
    if not (math.isfinite(d) and math.isfinite(scale)):
        return math.inf
    return 0.0 if d == 0 else (d / scale if scale > 0 else math.inf)


def localize(source: ModelLayout, target: ModelLayout, mapping: WeightMap, src: dict[str, np.ndarray],
             tgt: dict[str, np.ndarray], rtol: float) -> Localization:
    """Compare the two 'forward' captures in the source's call order; name the first layer that differs."""
    called = {j for j, layer in enumerate(target.layers) if layer.get("called", True)}
    pairs = [(i, j) for i, j in mapping.layers if source.layers[i].get("called", True) and j in called]
    checkpoints: list[Checkpoint] = []
    #: Checkpoints not compared because their shapes differ: (layer, point, source shape, target shape).
    reshaped: list[tuple[str, str, tuple, tuple]] = []

    def check(layer: str, point: str, a_key: str, b_key: str) -> Checkpoint | None:
        if a_key not in src or b_key not in tgt:
            return None
        if src[a_key].shape != tgt[b_key].shape:
            # Not the same quantity (a ZeroPadding2D layer makes the next convolution's input larger), or a layer
            # that changes the shape otherwise (a "valid" convolution where the source pads): said below.
            reshaped.append((layer, point, tuple(src[a_key].shape), tuple(tgt[b_key].shape)))
            return None
        c = Checkpoint(layer, point, relative_gap(src[a_key], tgt[b_key]), rtol)
        checkpoints.append(c)
        return c

    first: tuple[Checkpoint, list[str], str] | None = None
    # The last checkpoint that agreed: (layer name, point). Everything the source called after it, up to
    # the first checkpoint that differs, is a candidate; checkpoints skipped in between (a fused
    # activation, a padding layer that changes the next input's shape) widen the span.
    last_ok: tuple[str, str] | None = None

    def span(until: str, inclusive: bool) -> list[str]:
        names = [c[0] for c in source.calls]
        if last_ok is None:
            start = 0
        else:
            start = names.index(last_ok[0]) + (1 if last_ok[1] == "output" else 0) if last_ok[0] in names else 0
        end = (names.index(until) + (1 if inclusive else 0)) if until in names else len(names)
        return [f"{n} ({t})" for n, t in source.calls[start:end]]

    def described() -> str:
        if last_ok is None:
            return "before the first captured layer (the data or its layout as the model receives it)"
        return f"after {last_ok[0]}'s {last_ok[1]}, which agrees"

    for i, j in pairs:
        if first is not None:
            break
        s_layer, t_layer = source.layers[i], target.layers[j]
        name = s_layer["name"]
        c_in = check(name, "input", f"input/{i}", f"input/{j}")
        if c_in is not None:
            if not c_in.agree:
                first = (c_in, span(name, inclusive=False), described())
                break
            last_ok = (name, "input")
        comparable = not (s_layer.get("fused_activation") or t_layer.get("fused_activation"))
        c_out = check(name, "output", f"output/{i}", f"output/{j}") if comparable else None
        if c_out is None and reshaped and reshaped[-1][:2] == (name, "output") and last_ok == (name, "input"):
            # Its input agrees and its output has another shape: this layer is where the ports part.
            _, _, a_shape, b_shape = reshaped[-1]
            first = (Checkpoint(name, "output", math.inf, rtol), [f"{name} ({s_layer['type']})"],
                     f"in its output's shape, {list(b_shape)} in {target.backend} against {list(a_shape)} in "
                     f"{source.backend} (a padding, stride or kernel size that differs), after its input, which "
                     "agrees")
            break
        if c_out is not None:
            if not c_out.agree:
                first = (c_out, span(name, inclusive=True), described())
                break
            last_ok = (name, "output")
    if first is None:
        c_logits = check("logits", "logits", "logits", "logits")
        if c_logits is not None and not c_logits.agree:
            first = (c_logits, span("", inclusive=False), described())
    else:
        check("logits", "logits", "logits", "logits")

    backward = None
    for i, j in reversed(pairs):  # from the logits back: the first incoming gradient that differs
        if source.layers[i].get("fused_activation") or target.layers[j].get("fused_activation"):
            continue  # the gradient with respect to an activation's output, not the layer's: not comparable
        c = check(source.layers[i]["name"], "grad_output", f"grad_output/{i}", f"grad_output/{j}")
        if c is not None and not c.agree:
            backward = c.layer
            break

    if first is None:
        return Localization(source.backend, target.backend, None, None, None, [],
                            f"every captured activation of {target.backend} agrees with {source.backend}'s within "
                            f"{rtol:.3g} relative", backward, checkpoints)
    c, candidates, how = first
    if not candidates:
        blame = ", in code that is not a module or layer of its own (a functional call between them)"
    elif len(candidates) == 1:
        blame = f": {candidates[0]}"
    else:
        blame = f": in one of, in call order, {', '.join(candidates)}"
    named = candidates[0].split(" (")[0] if candidates else c.layer
    gap = (f"max relative difference {c.max_rel:.3g} (tolerance {c.tolerance:.3g})" if math.isfinite(c.max_rel)
           else "not comparable")
    explanation = (f"{target.backend} first parts from {source.backend} at {c.layer}'s {c.point}: {gap}; the "
                   f"difference arises {how}{blame}. Everything before it agrees.")
    suggestion = None
    if c.point == "input" and any("gelu" in cand.lower() for cand in candidates):
        i, j = next((i, j) for i, j in pairs if source.layers[i]["name"] == c.layer)
        before = [(pi, pj) for pi, pj in pairs if pi < i]
        if before:
            suggestion = _gelu_form(src.get(f"output/{before[-1][0]}"), src.get(f"input/{i}"), tgt.get(f"input/{j}"),
                                    rtol, source.backend, target.backend)
    if suggestion:
        explanation += " " + suggestion
    skipped = [r for r in reshaped if r[:2] != (c.layer, c.point) and r[1] != "grad_output"]
    if skipped:
        explanation += (" Not compared (their shapes differ): " + "; ".join(
            f"{layer}'s {point}, {list(b)} in {target.backend} and {list(a)} in {source.backend}"
            for layer, point, a, b in skipped[:4]) + ".")
    return Localization(source.backend, target.backend, named, c.point, c.max_rel, candidates, explanation,
                        backward, checkpoints, at=c.layer, suggestion=suggestion)


_ERF = np.frompyfunc(math.erf, 1, 1)


def _gelu_form(before: np.ndarray | None, src_after: np.ndarray | None, tgt_after: np.ndarray | None, rtol: float,
               source: str, target: str) -> str | None:
    """What to change when a GELU lies between two checkpoints: GELU's two forms computed in float64 on the
    source's activation before it (``before``), against what each side's next layer received. When one side
    matches the exact form and the other the tanh approximation, say which to use; else None (another op
    between them, or another difference)."""
    if before is None or src_after is None or tgt_after is None or not (
            before.shape == src_after.shape == tgt_after.shape):
        return None
    x = np.asarray(before, np.float64)
    exact = 0.5 * x * (1.0 + _ERF(x / math.sqrt(2.0)).astype(np.float64))
    tanh = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    # The port computes in its own precision: the form it matches within a few of the tolerance's units.
    near = 4 * rtol

    def form(a: np.ndarray) -> str | None:
        gaps = {"exact": relative_gap(a, exact), "tanh": relative_gap(a, tanh)}
        best = min(gaps, key=gaps.get)
        return best if gaps[best] <= near and gaps[best] < 0.1 * max(gaps.values()) else None

    s_form, t_form = form(src_after), form(tgt_after)
    if s_form is None or t_form is None or s_form == t_form:
        return None
    if t_form == "tanh":
        return (f"What to change: {target} computes GELU's tanh approximation where {source}'s is exact (its next "
                f"layer's input matches 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) of {source}'s activation): "
                "use the exact form, jax.nn.gelu(x, approximate=False), keras.ops.gelu(x, approximate=False), "
                "torch.nn.GELU() (approximate='none').")
    return (f"What to change: {target} computes the exact GELU where {source}'s is the tanh approximation: use "
            "jax.nn.gelu(x) (approximate=True, its default), keras.ops.gelu(x, approximate=True), "
            "torch.nn.GELU(approximate='tanh').")


def parameter_only(loc: Localization, source: ModelLayout, src_grads: dict[str, np.ndarray],
                   tgt_grads: dict[str, np.ndarray], rtol: float, scale: float) -> str | None:
    """When the forward passes and the gradients flowing into every layer's output agree (``loc`` names no layer)
    but parameter gradients differ: fill ``loc.parameter_layer``/``parameter_tensors`` and return the sentence that
    says so, or None. A layer then computes its own parameter's gradient otherwise: the rows that differ (a 2-D
    tensor) say which, e.g. torch's ``nn.Embedding(padding_idx=i)`` leaves row i's gradient at zero where Flax's
    and Keras' embeddings accumulate it. ``scale``: the largest gradient entry each tensor is measured against."""
    if loc.first_layer is not None or loc.backward_layer is not None or scale <= 0:
        return None
    owner = {p.name: (layer["name"], layer["type"]) for layer in source.layers for p in source.params(layer)}
    found = []
    for name, g in src_grads.items():
        h = tgt_grads.get(name)
        if h is None or h.shape != g.shape:
            continue
        diff = np.abs(np.asarray(g, np.float64) - np.asarray(h, np.float64))
        gap = float(np.max(diff, initial=0.0)) / max(scale, float(np.max(np.abs(g), initial=0.0)))
        if gap > rtol:
            rows = ([int(i) for i in np.flatnonzero(diff.max(axis=1) > rtol * scale)] if g.ndim == 2 else None)
            found.append({"param": name, "max_rel": gap, "rows": rows})
    if not found:
        return None
    layer, kind = owner.get(found[0]["param"], (found[0]["param"], "?"))
    loc.parameter_layer, loc.parameter_tensors = layer, found
    what = ", ".join(f"{f['param']} (max_rel {f['max_rel']:.3g}"
                     + (f"; rows {f['rows'][:8]}{' ...' if len(f['rows']) > 8 else ''} of {src_grads[f['param']].shape[0]}"
                        if f["rows"] is not None else "") + ")" for f in found[:4])
    hint = (" torch's nn.Embedding(padding_idx=i) is one such: it leaves row i's gradient at zero, which Flax's "
            "nnx.Embed and Keras' Embedding have no setting for (mask the row's gradient, or zero it after "
            "backward, in the port)" if kind == "Embedding" else "")
    return (f"{loc.backend}: every captured activation and every gradient flowing into a layer's output agrees with "
            f"{loc.source}, but the parameter gradient of {what} differs: {layer} ({kind}) computes its own "
            f"parameter's gradient otherwise in the two frameworks.{hint}")
