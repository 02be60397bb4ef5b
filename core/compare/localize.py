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

Blocks (containers that own no parameter, ``ModelLayout.blocks``) pair up
through the layers inside them; a block's output is a checkpoint right after
its last layer's output. When it differs while everything inside agreed, the
block's own code between its sublayers (a residual or skip connection) is
where the ports part, not the next layer.

Where the captured arrays show it, the localization also says what to change
(``Localization.suggestion``): a hypothesis is computed in float64 from the
source's captured input (and the source's parameter values) and named only
when it reproduces the port's array within a few tolerances and the source's
own form does not: GELU's two forms, a normalization's epsilon, a
convolution's padding, a flatten in the other channel order, a bias not added.

Backward, the gradients d loss/d output are compared from the logits back:
the last layer (in call order) whose incoming gradient differs while every
later one agrees is where the backward passes part, when a parameter
gradient differs with it (``gradients_apart``). Tolerances are the gradient
comparison's relative model, per tensor relative to its largest entry.
"""
from __future__ import annotations

import itertools
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
             tgt: dict[str, np.ndarray], rtol: float, params: dict[str, np.ndarray] | None = None) -> Localization:
    """Compare the two 'forward' captures in the source's call order; name the first layer that differs.
    ``params``: the source's parameter values (canonical layout, by the source's names), for testing what to
    change at the layer named (``_what_to_change``); without them only the GELU and flatten tests run."""
    called = {j for j, layer in enumerate(target.layers) if layer.get("called", True)}
    pairs = [(i, j) for i, j in mapping.layers if source.layers[i].get("called", True) and j in called]
    checkpoints: list[Checkpoint] = []
    #: Checkpoints not compared because their shapes differ: (layer, point, source shape, target shape).
    reshaped: list[tuple[str, str, tuple, tuple]] = []
    #: Per paired block, in the order its output is checked: (source block index, target block index).
    blocks = _paired_blocks(source, target, pairs)

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
    names = [c[0] for c in source.calls]

    def span(until: str, inclusive: bool) -> list[str]:
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

    def block_checks(i: int) -> tuple[Checkpoint, list[str], str] | None:
        """The blocks whose last layer is source layer ``i``, inner first, checked where nothing but the block's
        own code ran since the last agreeing checkpoint (that layer's output; after it, inside the block, only
        dropout or identity modules, Hugging Face's blocks end so): the first that differs, or None."""
        for b, tb in blocks:
            block = source.blocks[b]
            if max(k for k in block["layers"] if source.layers[k].get("called", True)) != i:
                continue
            inside = [k for k, (n, _) in enumerate(source.calls) if n in set(block.get("members", ()))]
            own = [k for k in inside if names[k] == source.layers[i]["name"]]
            after = [source.calls[k][1] for k in inside if own and k > own[-1]]
            if last_ok != (source.layers[i]["name"], "output") or not own or not all(
                    "dropout" in t.lower() or t == "Identity" for t in after):
                continue  # a parameter-free call (an activation module) ends the block: the next input decides
            a, t = src.get(f"block_output/{b}"), tgt.get(f"block_output/{tb}")
            if a is None or t is None or a.shape != t.shape:
                continue
            c = Checkpoint(block["name"], "output", relative_gap(a, t), rtol)
            checkpoints.append(c)
            if not c.agree:
                return (c, [f"{block['name']} ({block['type']})"],
                        f"in {block['name']}'s own computation outside its sublayers, every one of which agrees, "
                        "input and output (e.g. a residual or skip connection added from another tensor, or an "
                        "operation between its sublayers that is not a module)")
        return None

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
        first = block_checks(i)
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
    suggestion = _what_to_change(c, candidates, source, target, pairs, src, tgt, params or {}, rtol)
    if suggestion:
        explanation += " " + suggestion
    skipped = [r for r in reshaped if r[:2] != (c.layer, c.point) and r[1] != "grad_output"]
    if skipped:
        explanation += (" Not compared (their shapes differ): " + "; ".join(
            f"{layer}'s {point}, {list(b)} in {target.backend} and {list(a)} in {source.backend}"
            for layer, point, a, b in skipped[:4]) + ".")
    return Localization(source.backend, target.backend, named, c.point, c.max_rel, candidates, explanation,
                        backward, checkpoints, at=c.layer, suggestion=suggestion)


def _paired_blocks(source: ModelLayout, target: ModelLayout, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(source block, target block) for each block of the source whose called layers are all paired and map onto
    exactly the called layers of one of the target's blocks; inner blocks before the blocks holding them."""
    to_target = dict(pairs)
    out = []
    for b, block in enumerate(source.blocks):
        inside = [k for k in block["layers"] if source.layers[k].get("called", True)]
        if not block.get("called", True) or not inside or any(k not in to_target for k in inside):
            continue
        wanted = {to_target[k] for k in inside}
        tb = next((t for t, other in enumerate(target.blocks) if other.get("called", True) and wanted == {
            k for k in other["layers"] if target.layers[k].get("called", True)}), None)
        if tb is not None:
            out.append((b, tb))
    return sorted(out, key=lambda p: len(source.blocks[p[0]]["layers"]))


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


def _what_to_change(c: Checkpoint, candidates: list[str], source: ModelLayout, target: ModelLayout,
                    pairs: list[tuple[int, int]], src: dict[str, np.ndarray], tgt: dict[str, np.ndarray],
                    params: dict[str, np.ndarray], rtol: float) -> str | None:
    """What to change at the first checkpoint that differs, when one hypothesis computed from the source's captured
    arrays reproduces the port's and the source's own form does not; else None. At a layer's input: GELU's other
    form (``_gelu_form``), a flatten in the other channel order (``_flatten_order``). At a layer's output, its
    input agreeing: a normalization's epsilon, a convolution's padding, its bias not added (or added twice)."""
    at = next(((i, j) for i, j in pairs if source.layers[i]["name"] == c.layer), None)
    if at is None or not math.isfinite(c.max_rel):
        return None
    i, j = at
    layer = source.layers[i]
    if c.point == "input":
        before = [(pi, pj) for pi, pj in pairs if pi < i]
        if before and any("gelu" in cand.lower() for cand in candidates):
            found = _gelu_form(src.get(f"output/{before[-1][0]}"), src.get(f"input/{i}"), tgt.get(f"input/{j}"),
                               rtol, source.backend, target.backend)
            if found:
                return found
        # The activations the source captured before this layer (its layers' inputs and outputs, blocks'
        # outputs): where the flattened one's (..., C) shape is read.
        earlier = [a for k in range(i) for a in (src.get(f"input/{k}"), src.get(f"output/{k}")) if a is not None]
        earlier += [a for key, a in src.items() if key.startswith("block_output/")]
        return _flatten_order(src.get(f"input/{i}"), tgt.get(f"input/{j}"), earlier, rtol, c.layer,
                              source.backend, target.backend)
    if c.point != "output":
        return None
    x, ys, yt = src.get(f"input/{i}"), src.get(f"output/{i}"), tgt.get(f"output/{j}")
    if x is None or ys is None or yt is None or ys.shape != yt.shape:
        return None
    values = {}
    for p in source.params(layer):
        if p.name in params and p.role not in values:
            values[p.role] = np.asarray(params[p.name], np.float64)
    kind = layer["type"].lower()
    family = _family(target.backend)
    if "norm" in kind and not any(k in kind for k in ("group", "rms", "instance")):
        found = _norm_epsilon("batch" if "batch" in kind else "layer", x, ys, yt, values, rtol)
        if found:
            eps_s, eps_t, gap_t, gap_s = found
            return (f"What to change: {target.backend}'s {c.layer} normalizes with epsilon {eps_t:.3g} where "
                    f"{source.backend}'s uses {eps_s:.3g}: its output is {source.backend}'s input to that layer "
                    f"normalized with epsilon {eps_t:.3g}, to {gap_t:.2g} relative ({gap_s:.2g} with "
                    f"{eps_s:.3g}). Set it to {eps_s:.3g}: {_EPSILON_SETTING[family]('batch' in kind, eps_s)}.")
        return None
    if "kernel" in values and values["kernel"].ndim >= 3:
        found = _conv_padding(x, ys, yt, values["kernel"], values.get("bias"), rtol)
        if found:
            pads_s, pads_t, gap_t = found
            return (f"What to change: {target.backend}'s {c.layer} pads its input {_pads_text(pads_t)} where "
                    f"{source.backend}'s pads {_pads_text(pads_s)}: its output is {source.backend}'s convolution of "
                    f"the same input with that padding, to {gap_t:.2g} relative (TensorFlow's, Keras' and Flax's "
                    "padding 'SAME' put the extra row or column at the bottom/right when the stride is over 1; "
                    f"torch pads both sides equally). Pad as {source.backend} does: {_PAD_SETTING[family](pads_s)}.")
    if "bias" in values:
        found = _bias_change(ys, yt, values["bias"], rtol)
        if found:
            sign, gap_t = found
            if sign < 0:
                return (f"What to change: {target.backend}'s {c.layer} does not add its bias: its output is "
                        f"{source.backend}'s minus the bias, to {gap_t:.2g} relative. Add it: "
                        f"{_BIAS_SETTING[family]}.")
            return (f"What to change: {target.backend}'s {c.layer} adds its bias twice: its output is "
                    f"{source.backend}'s plus the bias, to {gap_t:.2g} relative. Add it once.")
    return None


def _family(backend: str) -> str:
    """The framework of a backend's name: "keras-tensorflow" -> "keras", "tf-keras" -> "tf_keras"."""
    return "tf_keras" if backend == "tf-keras" else backend.split("-")[0] if backend.split("-")[0] in (
        "torch", "keras", "jax") else "jax"


def _agrees_best(gaps: dict, near: float, against: float) -> bool:
    """Whether the smallest of ``gaps`` reproduces (within ``near``) and is clearly better than ``against``."""
    best = min(gaps.values())
    return best <= near and best < 0.1 * against


#: Epsilons frameworks default to: BERT's LayerNorm 1e-12, Flax's LayerNorm 1e-6, torch's 1e-5 (Flax's
#: BatchNorm too), Keras' 1e-3.
_EPSILONS = (1e-12, 1e-6, 1e-5, 1e-3)

_EPSILON_SETTING = {
    "torch": lambda batch, e: f"torch.nn.{'BatchNorm2d' if batch else 'LayerNorm'}(..., eps={e:.3g})",
    "keras": lambda batch, e: f"keras.layers.{'BatchNormalization' if batch else 'LayerNormalization'}"
                              f"(epsilon={e:.3g})",
    "tf_keras": lambda batch, e: f"tf.keras.layers.{'BatchNormalization' if batch else 'LayerNormalization'}"
                                 f"(epsilon={e:.3g})",
    "jax": lambda batch, e: f"nnx.{'BatchNorm' if batch else 'LayerNorm'}(..., epsilon={e:.3g}) (flax.linen: "
                            f"nn.{'BatchNorm' if batch else 'LayerNorm'}(epsilon={e:.3g}))",
}


def _norm_epsilon(kind: str, x: np.ndarray, ys: np.ndarray, yt: np.ndarray, values: dict[str, np.ndarray],
                  rtol: float) -> tuple[float, float, float, float] | None:
    """(source's epsilon, port's epsilon, port's gap to its epsilon, port's gap to the source's) when both outputs
    are the same normalization of the source's input ``x`` with two epsilons, else None. ``kind`` "layer"
    normalizes over the scale's axes (the last one without a scale), "batch" per channel (the last axis) with the
    running statistics (``values`` "mean"/"var", inference) or the batch's. Each side's epsilon is a framework's
    default (``_EPSILONS``) when one reproduces it, else fitted from its output: per normalized group,
    sqrt(var + eps) = sum(d^2) / sum(d (y - bias)), d = scale (x - mean)."""
    x = np.asarray(x, np.float64)
    if x.shape != ys.shape:
        return None
    g, b = values.get("scale", 1.0), values.get("bias", 0.0)
    hypotheses = []
    if kind == "layer":
        axes = tuple(range(x.ndim - (np.ndim(g) or 1), x.ndim))
        hypotheses.append((x.mean(axes, keepdims=True), x.var(axes, keepdims=True), axes))
    else:
        axes = tuple(range(x.ndim - 1))
        if "mean" in values and "var" in values:
            hypotheses.append((values["mean"], values["var"], axes))
        hypotheses.append((x.mean(axes, keepdims=True), x.var(axes, keepdims=True), axes))
    near = 4 * rtol
    for mean, var, axes in hypotheses:
        d = g * (x - mean)

        def normalized(eps: float) -> np.ndarray:
            return d / np.sqrt(var + eps) + b

        def fitted(y: np.ndarray) -> float | None:
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.sum(d * d, axis=axes, keepdims=True) / np.sum(d * (np.asarray(y, np.float64) - b), axis=axes,
                                                                     keepdims=True)
                eps = np.broadcast_to(s * s - var, s.shape)
            eps = eps[np.isfinite(eps)]
            e = float(np.median(eps)) if eps.size else math.nan
            return e if math.isfinite(e) and e > 0 else None

        def epsilon(y: np.ndarray) -> tuple[float, dict[float, float]] | None:
            gaps = {e: relative_gap(y, normalized(e)) for e in _EPSILONS}
            defaults = [e for e in _EPSILONS if gaps[e] <= near]
            if defaults:
                return min(defaults, key=gaps.get), gaps
            e = fitted(y)
            if e is not None:
                gaps[e] = relative_gap(y, normalized(e))
                if gaps[e] <= near:
                    return e, gaps
            return None

        s_found, t_found = epsilon(ys), epsilon(yt)
        if s_found is None or t_found is None:
            continue
        (eps_s, _), (eps_t, gaps_t) = s_found, t_found
        gap_s = gaps_t.get(eps_s, relative_gap(yt, normalized(eps_s)))
        if abs(eps_t - eps_s) > 0.01 * eps_s and _agrees_best({eps_t: gaps_t[eps_t]}, near, gap_s):
            return eps_s, eps_t, gaps_t[eps_t], gap_s
    return None


def _flatten_order(us: np.ndarray | None, ut: np.ndarray | None, earlier: list[np.ndarray], rtol: float,
                   layer: str, source: str, target: str) -> str | None:
    """What to change when a layer's input (N, F) is the source's with its features permuted as flattening
    (N, ..., C) channels-first instead of channels-last (or the reverse) permutes them: C and the spatial shape
    from an earlier activation of the source (``earlier``, channels-last, with prod(shape[1:]) = F)."""
    if us is None or ut is None or us.shape != ut.shape or us.ndim != 2:
        return None
    n, f = us.shape
    near, base = 4 * rtol, relative_gap(ut, us)
    shapes = list(dict.fromkeys(tuple(a.shape[1:]) for a in earlier if a.ndim >= 3 and int(np.prod(a.shape[1:])) == f))
    for shape in shapes:
        c, s = shape[-1], f // shape[-1]
        if c == 1 or s == 1:
            continue
        # The source flattened (C, S) and the port (S, C), or the reverse.
        for perm, port_order in ((us.reshape(n, c, s).transpose(0, 2, 1), "channels-last"),
                                 (us.reshape(n, s, c).transpose(0, 2, 1), "channels-first")):
            gap = relative_gap(ut, perm.reshape(n, f))
            if gap <= near and gap < 0.1 * base:
                spatial = ", ".join(str(k) for k in shape[:-1])
                if port_order == "channels-last":
                    how = (f"flatten channels-first as {source} does: move the channels before flattening, "
                           f"x.transpose(0, {len(shape)}, {', '.join(str(k) for k in range(1, len(shape)))})"
                           ".reshape(n, -1) (jnp.transpose, keras.ops.transpose), or permute the rows of "
                           f"{layer}'s kernel when converting the weights")
                else:
                    how = (f"flatten channels-last as {source} does: x.permute(0, "
                           f"{', '.join(str(k) for k in range(2, len(shape) + 1))}, 1).flatten(1) before "
                           f"{layer}, or permute its weight's columns when converting the weights")
                return (f"What to change: {target} flattens the ({spatial}; {c} channels) activation before {layer} "
                        f"{port_order} where {source} flattens it "
                        f"{'channels-first' if port_order == 'channels-last' else 'channels-last'}: {layer}'s "
                        f"input is {source}'s with its features permuted so, to {gap:.2g} relative. To match, "
                        f"{how}.")
    return None


def _bias_change(ys: np.ndarray, yt: np.ndarray, bias: np.ndarray, rtol: float) -> tuple[int, float] | None:
    """(-1, gap) when the port's output is the source's minus the layer's bias (+1: plus it), else None."""
    if bias.ndim != 1 or ys.shape[-1:] != bias.shape or not np.any(bias):
        return None
    base = relative_gap(yt, ys)
    for sign in (-1, 1):
        gap = relative_gap(yt, np.asarray(ys, np.float64) + sign * bias)
        if gap <= 4 * rtol and gap < 0.1 * base:
            return sign, gap
    return None


_BIAS_SETTING = {
    "torch": "torch.nn.Linear(..., bias=True) / torch.nn.Conv2d(..., bias=True) (their default), or + self.bias "
             "in a forward written by hand",
    "keras": "keras.layers.Dense(..., use_bias=True) (the default), or + self.bias in a call written by hand",
    "tf_keras": "tf.keras.layers.Dense(..., use_bias=True) (the default), or + self.bias in a call written by hand",
    "jax": "nnx.Linear(..., use_bias=True) (the default), or + self.bias[...] in a __call__ written by hand",
}


def _conv_padding(x: np.ndarray, ys: np.ndarray, yt: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None,
                  rtol: float) -> tuple[tuple, tuple, float] | None:
    """(source's padding, port's padding, port's gap) when both outputs are the convolution of the source's input
    ``x`` (N, *spatial, C_in) with ``kernel`` (*window, C_in, C_out) at one stride, padded ((lo, hi) per spatial
    axis) two ways; only paddings whose two sides differ by at most one (torch's equal sides, 'SAME''s extra
    row at the end) are tried, the same stride on every axis, and only while the arithmetic stays small."""
    d = kernel.ndim - 2
    x = np.asarray(x, np.float64)
    if x.ndim != d + 2 or ys.ndim != d + 2 or kernel.shape[-2] != x.shape[-1] or ys.shape[-1] != kernel.shape[-1]:
        return None
    window, size, out = kernel.shape[:d], x.shape[1:-1], ys.shape[1:-1]
    if x.shape[0] * int(np.prod(out)) * kernel.size > 5e7:
        return None
    # One stride on every axis; per axis the (lo, hi) giving the output's size, equal sides first.
    combos = [(st, pads) for st in range(1, 5) for pads in itertools.product(*(
        [(lo, hi) for lo in range(k) for hi in (lo, lo + 1, lo - 1) if hi >= 0 and (n + lo + hi - k) // st + 1 == o]
        for k, n, o in zip(window, size, out)))]
    budget = int(2e8 // max(1, x.shape[0] * int(np.prod(out)) * kernel.size))  # multiply-adds over all tries
    near = 4 * rtol
    gaps_s, gaps_t = {}, {}
    for st, pads in combos[:min(256, budget)]:
        y = _conv(x, kernel, (st,) * d, pads, out)
        if bias is not None:
            y = y + bias
        gaps_s[st, pads], gaps_t[st, pads] = relative_gap(ys, y), relative_gap(yt, y)
    if not gaps_s:
        return None

    def pick(gaps: dict) -> tuple:
        # With a stride, the last rows of padding may reach no window: paddings that differ there compute the
        # same; the equal-sided one is named (torch's padding=p), else the closest.
        same = [p for p in gaps if gaps[p] <= near]
        even = [p for p in same if all(lo == hi for lo, hi in p[1])]
        return even[0] if even else min(same or gaps, key=gaps.get)

    s_key, t_key = pick(gaps_s), pick(gaps_t)
    if gaps_s[s_key] > near or not _agrees_best({t_key: gaps_t[t_key]}, near, gaps_t[s_key]):
        return None
    return s_key[1], t_key[1], gaps_t[t_key]


def _conv(x: np.ndarray, kernel: np.ndarray, strides: tuple, pads: tuple, out: tuple) -> np.ndarray:
    """A convolution in float64, channels-last: ``x`` zero-padded by ``pads``, then one product per window
    offset."""
    d = len(strides)
    xp = np.pad(x, ((0, 0), *pads, (0, 0)))
    y = np.zeros((x.shape[0], *out, kernel.shape[-1]))
    for offset in itertools.product(*(range(k) for k in kernel.shape[:d])):
        window = tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offset, strides, out))
        y += xp[(slice(None), *window)] @ np.asarray(kernel[offset], np.float64)
    return y


def _pads_text(pads: tuple) -> str:
    sides = (("top", "bottom"), ("left", "right")) if len(pads) == 2 else (("left", "right"),) * len(pads)
    return "(" + ", ".join(f"{a} {lo}, {b} {hi}" for (a, b), (lo, hi) in zip(sides, pads)) + ")"


_PAD_SETTING = {
    "torch": lambda p: (f"padding={p[0][0]}" if all(lo == hi == p[0][0] for lo, hi in p) else
                        "torch.nn.functional.pad(x, " + str(tuple(v for lo, hi in reversed(p) for v in (lo, hi)))
                        + ") before a convolution with padding=0"),
    "keras": lambda p: (f"keras.layers.ZeroPadding{len(p)}D(padding={tuple(p) if len(p) > 1 else p[0]}) before "
                        "the convolution, with padding='valid'"),
    "tf_keras": lambda p: (f"tf.keras.layers.ZeroPadding{len(p)}D(padding={tuple(p) if len(p) > 1 else p[0]}) "
                           "before the convolution, with padding='valid'"),
    "jax": lambda p: f"padding={tuple(p)} in nnx.Conv (explicit (low, high) per spatial axis)",
}


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


def gradients_apart(loc: Localization, source: ModelLayout, src_grads: dict[str, np.ndarray],
                    tgt_grads: dict[str, np.ndarray], rtol: float, scale: float) -> str | None:
    """When every captured activation agrees (``loc.first_layer`` None), what the parameter gradients say, as one
    sentence or None:

    - the gradient flowing into ``loc.backward_layer``'s output differs: the backward passes part there only when
      the parameter gradient of that layer or of one called before it (the ones that gradient reaches) differs
      too. When none does, it differs only where no parameter takes it, e.g. the padding positions that torch's
      ``nn.Embedding(padding_idx=...)`` leaves out of the weight's gradient and a faithful port stops with
      ``stop_gradient``: ``loc.backward_layer`` is cleared, said in ``loc.explanation``, and None returned;
    - else the parameter gradients that alone differ (``parameter_only``)."""
    if loc.first_layer is not None:
        return None
    if loc.backward_layer is not None:
        names = [layer["name"] for layer in source.layers]
        upto = names.index(loc.backward_layer) + 1 if loc.backward_layer in names else len(names)
        reached = {p.name for layer in source.layers[:upto] for p in source.params(layer)}
        differ = [name for name, gap in _parameter_gaps(src_grads, tgt_grads, scale).items()
                  if name in reached and gap > rtol]
        c = next((c for c in loc.checkpoints if c.point == "grad_output" and c.layer == loc.backward_layer), None)
        incoming = f" (max_rel {c.max_rel:.3g})" if c is not None and math.isfinite(c.max_rel) else ""
        if differ:
            return (f"{loc.backend}: the forward passes agree layer by layer, but the gradient flowing into "
                    f"{loc.backward_layer}'s output differs{incoming}, and with it the gradient of "
                    f"{', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}: the backward passes part there "
                    "(a custom gradient, a stop_gradient/detach, or an operation whose derivative differs)")
        loc.explanation += (f"; the gradient flowing into {loc.backward_layer}'s output differs{incoming}, but no "
                            "parameter's gradient differs with it: it differs only where no parameter takes it (e.g. "
                            "padding positions a port masks with stop_gradient as torch's padding_idx leaves them "
                            "out of the embedding's gradient), so the backward passes agree where it matters")
        loc.backward_layer = None
        return None
    return parameter_only(loc, source, src_grads, tgt_grads, rtol, scale) if scale > 0 else None


def _parameter_gaps(src_grads: dict[str, np.ndarray], tgt_grads: dict[str, np.ndarray],
                    scale: float) -> dict[str, float]:
    """Per parameter both have with one shape: max |a - b| relative to max(``scale``, the source's largest entry)."""
    out = {}
    for name, g in src_grads.items():
        h = tgt_grads.get(name)
        if h is not None and h.shape == g.shape:
            diff = float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(h, np.float64)), initial=0.0))
            big = max(scale, float(np.max(np.abs(g), initial=0.0)), float(np.max(np.abs(h), initial=0.0)))
            out[name] = diff / big if big > 0 else (0.0 if diff == 0 else math.inf)
    return out
