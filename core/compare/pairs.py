"""Compare every pair of normalized results; derive tolerances, a verdict and its explanation.

The tolerance model (stated in the README and in every report)::

    rtol = SAFETY * u * sqrt(K) * L

``u`` is the unit roundoff of the less precise result of the pair
(float32 2^-24, float64 2^-53, TF32 2^-11 when a backend could use it),
``K`` the longest sum in the forward/backward pass (the batch size or the
widest layer, whichever is larger), ``L`` the number of layers (rounding
compounds through each), ``SAFETY`` a margin calibrated so that rounding
alone never crosses it (see the README's calibration figures).

A pair agrees when, for every parameter tensor p, the largest elementwise
difference is at most ``rtol * S_p`` and the losses differ by at most
``rtol`` relative. ``S_p = max(max|a_p|, max|b_p|, T_p)``, where ``T_p`` is
the largest entry of mean_i |grad l_i| (the per-example gradients' size,
from the float64 reference): rounding error in a sum follows the size of
its terms, not of the result, so where per-example gradients cancel the
result alone would make rounding look like a bug. Not elementwise: a
near-zero entry carries absolute, not relative, rounding error.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from gradparity.compare.normalize import UNIT_ROUNDOFF, Result
from gradparity.experiment.models import MLP, Model

SAFETY = 16.0


@dataclass(frozen=True)
class Tolerance:
    """The relative tolerance model for one problem; ``rtol(u)`` gives the bound for a pair.

    ``term_scale`` maps each parameter tensor to T_p (see module doc), or is
    empty where no reference could compute it (then S_p uses the results alone).
    """

    safety: float
    longest_sum: int  # K
    depth: int        # L
    term_scale: dict[str, float] = field(default_factory=dict)

    def rtol(self, unit_roundoff: float) -> float:
        return self.safety * unit_roundoff * math.sqrt(self.longest_sum) * self.depth

    def formula(self) -> str:
        return (f"rtol = {self.safety:g} * u * sqrt(K={self.longest_sum}) * L={self.depth}; "
                f"agree when max|a_p - b_p| / S_p <= rtol for every parameter tensor p, "
                f"S_p = max(max|a_p|, max|b_p|, T_p), T_p = max entry of mean_i |grad l_i|, "
                f"and |loss_a - loss_b| / max(|loss_a|, |loss_b|) <= rtol")

    def to_dict(self) -> dict:
        return {
            "formula": self.formula(),
            "safety": self.safety,
            "K": self.longest_sum,
            "L": self.depth,
            "rtol": {name: self.rtol(u) for name, u in UNIT_ROUNDOFF.items()},
            "unit_roundoff": dict(UNIT_ROUNDOFF),
            "term_scale": dict(self.term_scale),
        }


def tolerance_for(model: Model, n_examples: int, term_scale: dict[str, float] | None = None,
                  safety: float = SAFETY) -> Tolerance:
    """The tolerance model for a built-in model on a batch of ``n_examples``: sums as long as the batch's loss
    terms or the model's widest dot product, as deep as its layers in series."""
    return Tolerance(safety, max(n_examples * model.loss_terms(), *model.widths()), model.depth,
                     dict(term_scale or {}))


def problem_term_scale(params: dict, batch: dict, model: Model) -> dict[str, float]:
    """T_p for every tensor, from the float64 reference (pure numpy, computed in this process)."""
    from gradparity.backends.protocol import IGNORE_INDEX

    with np.errstate(all="ignore"):  # an overflowing problem is reported by its results, not warned here
        if isinstance(model, MLP):
            from gradparity.backends.numpy.session import term_scale

            masks = [batch[f"dropout/batch/{i}"] for i in range(len(model.hidden))
                     if f"dropout/batch/{i}" in batch]
            # Padding examples (the switch 'padding') add no term: their targets are the ignored class.
            y = batch["y"] if "valid" not in batch else np.where(batch["valid"] > 0, batch["y"], IGNORE_INDEX)
            scale = term_scale(params, batch["x"], y, model.to_dict(), masks or None)
        else:
            from gradparity.backends.numpy.models import term_scale

            scale = term_scale(params, batch["x"], batch["y"], model.to_dict())
    # A non-finite T_p would make every pair disagree; without it S_p falls back to the results.
    return {k: v for k, v in scale.items() if math.isfinite(v)}


@dataclass(frozen=True)
class Comparison:
    """One pair of results. ``max_rel`` is relative to each tensor's scale S_p (see module doc)."""

    a: str
    b: str
    max_abs: float
    max_rel: float
    worst_param: str
    cosine: float
    loss_rel: float
    scale: float           # the c minimizing ||a - c b||: how b would have to be rescaled to match a
    scaled_max_rel: float  # max_rel between a and c*b
    unit_roundoff: float
    tolerance: float
    agree: bool


def relative_difference(a: dict, b: dict, term_scale: dict[str, float]) -> tuple[float, float, str]:
    """(max_abs, max_rel, worst parameter) of a - b; max_rel per tensor relative to S_p (module doc)."""
    max_abs, max_rel, worst = 0.0, 0.0, next(iter(a))
    for name in a:
        diff = np.abs(a[name] - b[name])
        d = float(np.max(diff)) if diff.size else 0.0
        s = max(float(np.max(np.abs(a[name]))) if a[name].size else 0.0,
                float(np.max(np.abs(b[name]))) if b[name].size else 0.0,
                term_scale.get(name, 0.0))
        if not math.isfinite(d) or not math.isfinite(s):
            r = math.inf
        elif s == 0.0:
            r = 0.0 if d == 0.0 else math.inf
        else:
            r = d / s
        if not math.isfinite(d):
            d = math.inf
        max_abs = max(max_abs, d)
        if r > max_rel:
            max_rel, worst = r, name
    return max_abs, max_rel, worst


def compare_pair(ra: Result, rb: Result, tol: Tolerance) -> Comparison:
    """Compare two ok results with the tolerance of the less precise one."""
    a, b = ra.grads, rb.grads
    max_abs, max_rel, worst = relative_difference(a, b, tol.term_scale)
    va = np.concatenate([a[k].ravel() for k in a])
    vb = np.concatenate([b[k].ravel() for k in a])
    na, nb = float(np.linalg.norm(va)), float(np.linalg.norm(vb))
    finite = math.isfinite(na) and math.isfinite(nb)
    if finite and na > 0 and nb > 0:
        cosine = float(np.dot(va, vb) / (na * nb))
        scale = float(np.dot(va, vb) / (nb * nb))
        _, scaled_rel, _ = relative_difference(a, {k: scale * v for k, v in b.items()}, tol.term_scale)
    else:
        cosine = 1.0 if finite and na == nb == 0 else math.nan
        scale, scaled_rel = math.nan, math.nan
    la, lb = ra.loss, rb.loss
    denom = max(abs(la), abs(lb))
    if not (math.isfinite(la) and math.isfinite(lb)):
        loss_rel = math.inf
    else:
        loss_rel = 0.0 if denom == 0 else abs(la - lb) / denom
    u = max(ra.unit_roundoff or UNIT_ROUNDOFF["float32"], rb.unit_roundoff or UNIT_ROUNDOFF["float32"])
    rtol = tol.rtol(u)
    agree = max_rel <= rtol and loss_rel <= rtol
    return Comparison(ra.label, rb.label, max_abs, max_rel, worst, cosine, loss_rel,
                      scale, scaled_rel, u, rtol, agree)


def connected_components(items: list, edges) -> list[list]:
    """Groups of ``items`` joined by ``edges`` (pairs of items), each group in the order of ``items``."""
    parent = {x: x for x in items}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent[find(a)] = find(b)
    groups: dict = {}
    for x in items:
        groups.setdefault(find(x), []).append(x)
    return list(groups.values())


def pair_index(comparisons: list[Comparison]) -> dict[tuple[str, str], Comparison]:
    """Each comparison under (a, b) and (b, a), so either order finds it."""
    index = {(c.a, c.b): c for c in comparisons}
    index.update({(c.b, c.a): c for c in comparisons})
    return index


def compare_all(results: list[Result], tol: Tolerance) -> list[Comparison]:
    """Every pair of ok results, in result order."""
    ok = [r for r in results if r.ok]
    return [compare_pair(ra, rb, tol) for ra, rb in itertools.combinations(ok, 2)]
