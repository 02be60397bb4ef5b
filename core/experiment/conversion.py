"""Check a weight conversion by value: which tensor of one framework's model is which of another's.

With ``weights = "own"`` every framework's factory loads its weights itself (a library's converter, a
user's conversion script). Before any gradient, the tensors of each port are paired with the source's by
their values, up to layout: a transpose or axis permutation, a reshape (a TF bias stored (1, n), fused
attention heads (d, 3·d) vs (d, 3, h, d/h)). Each tensor is used once. What the pairing finds:

- equal up to a layout that the shapes call for: the conversion is exact for that tensor;
- equal only after permuting the axes of a tensor whose shape already matched (a square kernel stored
  transposed), where the port's other tensors of that kind need no such permutation: a converter bug;
- paired by structure but not equal (a tensor off by a scale, noise, another tensor's values): a converter bug,
  with the factor when one constant explains it;
- no counterpart: a tensor the other model lacks (or that the converter left at its initial value).

Tensors whose values coincide (freshly initialized biases are all zero, layer-norm scales all one) cannot be
told apart by value: among them the pairing follows each model's call order (``ModelLayout``'s parameter
order), role by role, and says so.

The gradients of a port are then brought into the source's names and layout (``Pair.to_source``) and
compared per paired tensor as any other gradients.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from gradparity.experiment.weights import ModelLayout, Param, WeightMap

#: Values are equal when they differ by at most this many units of the compared dtype's rounding, relative to
#: the tensor's largest entry: a converter copies values (exactly, or through one cast).
EQUAL_ULPS = 2.0


@dataclass(frozen=True)
class Layout:
    """How a target tensor's values become the source's: ``perm`` of the target's axes, then a reshape to
    ``shape``; or, when ``source_perm`` is set, the source's axes permuted by it and reshaped to the target's
    shape give the target (the inverse is applied to the target's arrays)."""

    target_shape: tuple[int, ...]
    shape: tuple[int, ...]
    perm: tuple[int, ...] | None = None
    source_perm: tuple[int, ...] | None = None

    @property
    def identity(self) -> bool:
        return self.target_shape == self.shape and self.permutes is False

    @property
    def permutes(self) -> bool:
        p = self.perm if self.perm is not None else self.source_perm
        return p is not None and tuple(p) != tuple(range(len(p)))

    def to_source(self, a: np.ndarray) -> np.ndarray:
        """A target array (a value or a gradient) in the source's layout."""
        if self.source_perm is None:
            out = np.transpose(a, self.perm) if self.permutes else a
            return np.ascontiguousarray(out.reshape(self.shape))
        # source.transpose(p).reshape(target_shape) == target: undo the reshape, then the permutation.
        permuted = tuple(self.shape[i] for i in self.source_perm)
        return np.ascontiguousarray(np.transpose(a.reshape(permuted), np.argsort(self.source_perm)))

    def describe(self) -> str:
        if self.identity:
            return "same layout"
        parts = []
        if self.permutes:
            p = self.perm if self.perm is not None else tuple(int(i) for i in np.argsort(self.source_perm))
            parts.append("transposed" if len(p) == 2 else f"axes permuted {list(p)}")
        permuted = (tuple(self.target_shape[i] for i in self.perm) if self.perm is not None
                    else tuple(self.shape[i] for i in self.source_perm))
        if (permuted if self.perm is not None else self.target_shape) != (
                self.shape if self.perm is not None else permuted):
            parts.append(f"reshaped {list(self.target_shape)} -> {list(self.shape)}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        p = self.perm if self.perm is not None else (
            None if self.source_perm is None else [int(i) for i in np.argsort(self.source_perm)])
        return {"target_shape": list(self.target_shape), "source_shape": list(self.shape),
                "axes": None if p is None else [int(i) for i in p], "change": self.describe()}


@dataclass
class Pair:
    """One source tensor and its counterpart in a port."""

    source: str
    target: str
    layout: Layout
    equal: bool
    max_abs: float
    how: str                    # "by value", "by value and call order", "by structure"
    problem: str | None = None  # a converter bug, in words

    def to_source(self, a: np.ndarray) -> np.ndarray:
        return self.layout.to_source(a)

    def to_dict(self) -> dict:
        return {"source": self.source, "target": self.target, "layout": self.layout.to_dict(), "equal": self.equal,
                "max_abs_difference": self.max_abs, "paired": self.how, "problem": self.problem}


@dataclass
class Conversion:
    """Every tensor of ``target`` paired with one of ``source``'s, by value (see the module doc)."""

    source: str
    target: str
    pairs: list[Pair]
    source_only: list[str] = field(default_factory=list)
    target_only: list[str] = field(default_factory=list)
    trainable_unpaired: list[str] = field(default_factory=list)   # "backend:name" of trainable ones

    @property
    def problems(self) -> list[str]:
        """The converter bugs found, one line each (empty: the conversion is exact)."""
        out = [f"{self.target}:{p.target} <- {self.source}:{p.source}: {p.problem}" for p in self.pairs if p.problem]
        out += [f"{name}: a trainable tensor with no counterpart in the other model (its values match none, and "
                "no tensor of its shape is left to pair it with)" for name in self.trainable_unpaired]
        return out

    @property
    def exact(self) -> bool:
        return not self.problems

    def weight_map(self, source: ModelLayout, target: ModelLayout) -> WeightMap:
        """The pairing as a ``WeightMap`` (target name -> source name, layers paired through their tensors), for
        localization and the report."""
        s_index = {p.name: i for i, layer in enumerate(source.layers) for p in source.params(layer)}
        t_index = {p.name: j for j, layer in enumerate(target.layers) for p in target.params(layer)}
        layers: list[tuple[int, int]] = []
        for pair in self.pairs:
            lp = (s_index[pair.source], t_index[pair.target])
            if all(lp[0] != i and lp[1] != j for i, j in layers):
                layers.append(lp)
        return WeightMap(source.backend, target.backend, {p.target: p.source for p in self.pairs}, sorted(layers))

    def lines(self) -> list[str]:
        """One line per pair (the layout change and the verdict), then what has no counterpart."""
        out = []
        for p in self.pairs:
            state = "equal" if p.equal and not p.problem else f"DIFFERS: {p.problem}"
            out.append(f"{self.target}:{p.target} <- {self.source}:{p.source} ({p.layout.describe()}, {p.how}): "
                       f"{state}")
        out += [f"{self.source}:{name}: no counterpart in {self.target}" for name in self.source_only]
        out += [f"{self.target}:{name}: no counterpart in {self.source}" for name in self.target_only]
        return out

    def to_dict(self) -> dict:
        return {"source": self.source, "target": self.target, "exact": self.exact, "problems": self.problems,
                "tensors": [p.to_dict() for p in self.pairs], "source_only": self.source_only,
                "target_only": self.target_only}


def _tolerance(a: np.ndarray, b: np.ndarray, scale: float | None = None) -> float:
    """Largest difference two copies of one tensor may show: EQUAL_ULPS units of the coarser dtype's rounding,
    relative to the largest entry (``scale``, when the caller knows it: a 124M-parameter model's tensors are
    compared thousands of times)."""
    u = max(float(np.finfo(a.dtype).eps) if a.dtype.kind == "f" else 0.0,
            float(np.finfo(b.dtype).eps) if b.dtype.kind == "f" else 0.0) / 2
    if scale is None:
        scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    return EQUAL_ULPS * u * scale


def _largest(fingerprint: np.ndarray) -> float:
    """The largest |entry| of a tensor, from its fingerprint's extremes."""
    return max(abs(float(fingerprint[0])), abs(float(fingerprint[1])))


def _layouts(t_shape: tuple[int, ...], s_shape: tuple[int, ...]) -> list[Layout]:
    """Candidate layouts from a target shape to a source shape, simplest first: a plain reshape (or nothing),
    then permutations of the target's axes, then of the source's."""
    out = [Layout(t_shape, s_shape, tuple(range(len(t_shape))))]
    for perm in itertools.permutations(range(len(t_shape))):
        if perm != tuple(range(len(t_shape))) and len(t_shape) <= 4:
            out.append(Layout(t_shape, s_shape, perm))
    if len(s_shape) != len(t_shape) and len(s_shape) <= 4:
        for perm in itertools.permutations(range(len(s_shape))):
            if perm != tuple(range(len(s_shape))):
                out.append(Layout(t_shape, s_shape, None, perm))
    return out


def _match_layout(s: np.ndarray, t: np.ndarray) -> tuple[Layout, float] | None:
    """The simplest layout under which ``t`` equals ``s`` within ``_tolerance``, with the largest difference."""
    tol = _tolerance(s, t)
    s64 = s.astype(np.float64, copy=False)
    for layout in _layouts(tuple(t.shape), tuple(s.shape)):
        got = layout.to_source(t).astype(np.float64, copy=False)
        diff = float(np.max(np.abs(got - s64), initial=0.0))
        if diff <= tol:
            return layout, diff
    return None


def _closest(s: np.ndarray, t: np.ndarray) -> tuple[Layout, float, float | None]:
    """For a pair that is not equal: the layout under which ``t`` is closest to ``s`` (largest |cosine|), the
    cosine, and the factor k when t = k·s within tolerance (None otherwise)."""
    s64 = s.astype(np.float64).ravel()
    best = None
    for layout in _layouts(tuple(t.shape), tuple(s.shape)):
        got = layout.to_source(t).astype(np.float64).ravel()
        norms = float(np.linalg.norm(s64) * np.linalg.norm(got))
        cos = float(s64 @ got) / norms if norms > 0 else (1.0 if not s64.any() and not got.any() else 0.0)
        if best is None or abs(cos) > abs(best[1]) + 1e-12:
            best = (layout, cos, got)
    layout, cos, got = best
    factor = None
    denom = float(s64 @ s64)
    if denom > 0:
        k = float(s64 @ got) / denom
        if np.max(np.abs(got - k * s64), initial=0.0) <= _tolerance(s, t) * max(1.0, abs(k)):
            factor = k
    return layout, cos, factor


def _fingerprint(a: np.ndarray) -> np.ndarray:
    """What no layout changes in a tensor's values: its minimum, maximum, sum, sum of magnitudes and sum of squares
    (float64). Linear in the size, where sorting a 124M-parameter model's tensors took 10 s; two tensors that
    share it are then compared entry by entry under each layout (``_match_layout``)."""
    v = a.ravel()
    if v.size == 0:
        return np.zeros(5)
    v64 = v.astype(np.float64)
    return np.array([v64.min(), v64.max(), v64.sum(), np.abs(v64).sum(), float(v64 @ v64)])


def convert_check(source: ModelLayout, target: ModelLayout, s_values: dict[str, np.ndarray],
                  t_values: dict[str, np.ndarray]) -> Conversion:
    """Pair every tensor of ``target`` with one of ``source``'s by value (see the module doc)."""
    s_params = {p.name: p for p in source.all_params() if p.name in s_values}
    t_params = {p.name: p for p in target.all_params() if p.name in t_values}
    s_order = {name: k for k, name in enumerate(s_params)}
    t_order = {name: k for k, name in enumerate(t_params)}
    s_print = {n: _fingerprint(s_values[n]) for n in s_params}
    t_print = {n: _fingerprint(t_values[n]) for n in t_params}
    s_size = {n: s_values[n].size for n in s_params}
    t_size = {n: t_values[n].size for n in t_params}
    s_big = {n: _largest(v) for n, v in s_print.items()}
    t_big = {n: _largest(v) for n, v in t_print.items()}

    # Classes of tensors with the same values (their order statistics, within tolerance), across both models; a
    # pair within a class is confirmed entry by entry (``_match_layout``) before it counts as equal.
    def same_values(a: np.ndarray, b: np.ndarray, tol: float, size: int, scale: float) -> bool:
        """Whether two fingerprints of tensors of ``size`` entries agree: the extremes within ``tol``, the sums
        within what ``tol`` per entry adds up to (and float64's rounding of them)."""
        slack = np.array([tol, tol, size * tol, size * tol, size * tol * 2 * scale])
        slack += 1e-12 * np.abs(np.maximum(np.abs(a), np.abs(b)))
        return bool(np.all(np.abs(a - b) <= slack))

    classes: list[tuple[list[str], list[str]]] = []

    def join(name: str, side: int, values: dict, prints: dict, sizes: dict, bigs: dict) -> bool:
        """Put ``name`` (of the source, side 0, or the target, side 1) into the class whose representative (a
        source tensor) has its values; False when none has."""
        for members in classes:
            rep = members[0][0]
            big = max(s_big[rep], bigs[name])
            tol = _tolerance(s_values[rep], values[name], big)
            if s_size[rep] == sizes[name] and same_values(s_print[rep], prints[name], tol, s_size[rep], big):
                members[side].append(name)
                return True
        return False

    for name in s_params:
        if not join(name, 0, s_values, s_print, s_size, s_big):
            classes.append(([name], []))
    for name in t_params:
        join(name, 1, t_values, t_print, t_size, t_big)  # a tensor in no class is paired by structure below

    pairs: list[Pair] = []
    used_s: set[str] = set()
    used_t: set[str] = set()
    for s_names, t_names in classes:
        if not t_names:
            continue
        ambiguous = len(s_names) > 1 or len(t_names) > 1
        # Within a class, role by role in call order: a bias pairs with a bias, the k-th with the k-th.
        for role in dict.fromkeys([s_params[n].role for n in s_names] + [t_params[n].role for n in t_names]):
            ss = sorted((n for n in s_names if s_params[n].role == role), key=s_order.get)
            ts = sorted((n for n in t_names if t_params[n].role == role), key=t_order.get)
            for s, t in zip(ss, ts):
                found = _match_layout(s_values[s], t_values[t])
                if found is None:
                    continue  # the same values in an order no layout explains: left for the structural pass
                pairs.append(Pair(s, t, found[0], True, found[1],
                                  "by value and call order" if ambiguous else "by value"))
                used_s.add(s)
                used_t.add(t)
        # Roles that differ (a framework calls it "other"): whatever is left in the class, in call order.
        ss = sorted((n for n in s_names if n not in used_s), key=s_order.get)
        ts = sorted((n for n in t_names if n not in used_t), key=t_order.get)
        for s, t in zip(ss, ts):
            found = _match_layout(s_values[s], t_values[t])
            if found is not None:
                pairs.append(Pair(s, t, found[0], True, found[1],
                                  "by value and call order" if ambiguous else "by value"))
                used_s.add(s)
                used_t.add(t)

    # Tensors whose values found no counterpart: pair them by size and closeness, and say how they differ.
    rest_s = [n for n in s_params if n not in used_s]
    rest_t = [n for n in t_params if n not in used_t]
    for s in rest_s:
        candidates = [t for t in rest_t if t_values[t].size == s_values[s].size and t not in used_t]
        if not candidates:
            continue
        scored = [(t, *_closest(s_values[s], t_values[t])) for t in candidates]
        same_role = [c for c in scored if t_params[c[0]].role == s_params[s].role] or scored
        t, layout, cos, factor = max(same_role, key=lambda c: (abs(c[2]), -t_order[c[0]]))
        if abs(cos) < 0.5 and len(candidates) > 1:
            continue  # nothing resembles it: no counterpart rather than a guess
        got = layout.to_source(t_values[t]).astype(np.float64)
        diff = float(np.max(np.abs(got - s_values[s].astype(np.float64)), initial=0.0))
        if factor is not None:
            problem = f"values off by a factor {factor:.6g} (every entry; a scale the converter applied or missed)"
        elif np.allclose(np.sort(got.ravel()), np.sort(s_values[s].astype(np.float64).ravel()),
                         rtol=0, atol=_tolerance(s_values[s], t_values[t])):
            problem = "the same values in another order: the converter permuted this tensor"
        else:
            scale = float(np.max(np.abs(s_values[s]), initial=0.0)) or 1.0
            problem = f"values differ (largest difference {diff:.3g}, {diff / scale:.3g} of the largest entry)"
        pairs.append(Pair(s, t, layout, False, diff, "by structure", problem))
        used_s.add(s)
        used_t.add(t)

    _flag_transposes(pairs, s_params, t_params, target)
    pairs.sort(key=lambda p: s_order[p.source])
    source_only = [n for n in s_params if n not in used_s]
    target_only = [n for n in t_params if n not in used_t]
    trainable = ([f"{source.backend}:{n}" for n in source_only if s_params[n].trainable]
                 + [f"{target.backend}:{n}" for n in target_only if t_params[n].trainable])
    return Conversion(source.backend, target.backend, pairs, source_only, target_only, trainable)


def _flag_transposes(pairs: list[Pair], s_params: dict[str, Param], t_params: dict[str, Param],
                     target: ModelLayout) -> None:
    """A tensor whose shape already matched the source's (a square kernel) is checked against the port's other
    tensors of its kind (layer type and role) whose shapes told their layout: a port stores all its kernels of a
    kind one way. A square tensor permuted where they are not, or not permuted where they all are, is a converter
    bug; with no such evidence, only a permutation is."""
    layer_type = {p["name"]: layer.get("type", "") for layer in target.layers for p in layer["params"]}

    def kind(pair: Pair) -> tuple[str, str]:
        return layer_type.get(pair.target, ""), t_params[pair.target].role

    def perm(pair: Pair) -> tuple[int, ...]:
        layout = pair.layout
        if layout.perm is not None:
            return tuple(layout.perm)
        return tuple(int(i) for i in np.argsort(layout.source_perm))

    evidence: dict[tuple[str, str], set] = {}
    for p in pairs:
        if p.equal and p.layout.target_shape != p.layout.shape:
            evidence.setdefault(kind(p), set()).add(perm(p))
    for p in pairs:
        if not p.equal or p.layout.target_shape != p.layout.shape:
            continue
        seen = evidence.get(kind(p), set())
        if (not p.layout.permutes and (not seen or perm(p) in seen)) or (p.layout.permutes and perm(p) in seen):
            continue
        p.equal = False
        if p.layout.permutes:
            p.problem = (f"{p.layout.describe()}: the values match only with the axes permuted although the shapes "
                         "already agree, while the port's other tensors of this kind need no such permutation (a "
                         "square tensor the converter transposed)")
        else:
            p.problem = ("stored as the source stores it, while the port's other tensors of this kind are stored "
                         f"{', '.join(str(list(q)) for q in sorted(seen))}-permuted (a square tensor the converter "
                         "did not transpose)")


def paired_gradients(conversion: Conversion, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A port's gradients (keyed by its own names, its canonical layout) in the source's names and layout; the
    tensors without a counterpart are left out (the report lists them)."""
    out = {}
    for p in conversion.pairs:
        if p.target in grads:
            out[p.source] = p.to_source(grads[p.target])
    return out


def describe_counts(conversion: Conversion) -> str:
    """'148 tensors paired (146 by value, 2 by structure)', for the report's summary line."""
    by = {}
    for p in conversion.pairs:
        by[p.how] = by.get(p.how, 0) + 1
    detail = ", ".join(f"{k} {how}" for how, k in by.items())
    return f"{len(conversion.pairs)} tensors paired ({detail})" if by else "no tensor paired"

