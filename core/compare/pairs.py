"""Compare every pair of normalized results; derive tolerances, a verdict and its explanation.

The tolerance model, ``rtol = SAFETY * u * sqrt(K) * L``, and its calibration are in
``gradparity.compare.tolerance`` with every other bound the tool uses.

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
from dataclasses import dataclass

import numpy as np

from gradparity.compare.normalize import Result
from gradparity.compare.tolerance import UNIT_ROUNDOFF, Tolerance

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
