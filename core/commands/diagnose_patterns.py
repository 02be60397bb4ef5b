"""Quantitative signatures ``gradparity diagnose`` tests on whole results, in the order the user saved them.

Pure numpy on the results as vectors (``flat``: label -> one float64 vector per result); every function
returns what it found, in numbers, or None. The causes in ``gradparity.commands.diagnose`` turn these into
scores and words.

- ``cumulative``: each result holds the ones before it (``r_k = r_{k-1} + c_k r_1``, c_k a count), what
  reading ``.grad`` after each method without zeroing between the methods gives.
- ``cumulative_table``: the same from a table of max |a - b| alone: |r_i - r_j| = |i - j| max|g|.
- ``count_like``: a number that is a count or one over a count (an integer >= 1 or 1/integer).
- ``reweighted``: a result that is the same examples' mean, re-weighted (a mean of unequal micro-batch or
  replica means): projection ratio near 1 (or near k, added without 1/k) and a cosine near 1, no factor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def count_like(x: float, rel: float = 1e-3) -> int | None:
    """k when ``x`` is k or 1/k for an integer k >= 1 (within ``rel``), +k for k, -k for 1/k; else None."""
    if not (x > 0 and np.isfinite(x)):
        return None
    for value, sign in ((x, 1), (1.0 / x, -1)):
        k = round(value)
        if k >= 1 and abs(value - k) <= rel * k:
            return sign * k
    return None


def count_text(x: float) -> str:
    """'3' or '1/3' for a count-like number, else '%.4g'."""
    k = count_like(x)
    if k is None:
        return f"{x:.4g}"
    return str(k) if k > 0 else f"1/{-k}"


@dataclass(frozen=True)
class Cumulative:
    """Results r_1..r_K (in their saved order) with r_k - r_{k-1} = c_k r_1 for counts c_k (c_1 = 1)."""

    labels: tuple[str, ...]
    steps: tuple[float, ...]
    #: The largest residual of the fit, relative to the largest entry of any result.
    residual: float

    @property
    def all_equal(self) -> bool:
        """Every method's own gradient is the same (each c_k = 1): result k = k x result 1."""
        return all(abs(c - 1.0) <= 1e-3 for c in self.steps)


def cumulative(labels: list[str], flat: dict[str, np.ndarray], bound: float) -> Cumulative | None:
    """The cumulative-sum pattern in the order of ``labels``, or None.

    Each consecutive difference d_k = r_k - r_{k-1} must be a positive count-like multiple c_k of r_1 with
    max|d_k - c_k r_1| <= ``bound`` x the largest entry of any result (rounding of the sums).
    """
    if len(labels) < 2:
        return None
    first = flat[labels[0]]
    norm = float(first @ first)
    scale = max(float(np.max(np.abs(flat[x]), initial=0.0)) for x in labels)
    if norm == 0.0 or scale == 0.0:
        return None
    steps, worst = [1.0], 0.0
    for prev, cur in zip(labels, labels[1:]):
        d = flat[cur] - flat[prev]
        c = float(d @ first) / norm
        if count_like(c) is None:
            return None
        resid = float(np.max(np.abs(d - c * first), initial=0.0)) / scale
        if resid > bound:
            return None
        steps.append(c)
        worst = max(worst, resid)
    return Cumulative(tuple(labels), tuple(steps), worst)


def cumulative_table(labels: list[str], diffs: dict[tuple[str, str], float],
                     resolution: float | None) -> float | None:
    """max|g| when every pair of the table (in the labels' order) differs by |i - j| x max|g|, else None.

    Needs at least three labels and every pair; each difference must match within 0.1% (or the table's
    printed resolution, twice over, where the first difference is printed to 100 resolutions or more).
    """
    if len(labels) < 3:
        return None

    def d(i: int, j: int) -> float | None:
        return diffs.get((labels[i], labels[j]), diffs.get((labels[j], labels[i])))

    step = d(0, 1)
    # Too few printed digits make any three numbers fit: ask for two significant digits at least.
    if not step or step < 100 * (resolution or 0.0):
        return None
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            got = d(i, j)
            if got is None:
                return None
            want = (j - i) * step
            if abs(got - want) > max(1e-3 * want, 2 * (resolution or 0.0)):
                return None
    return step


def reweighted(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, float] | None:
    """(ratio, cosine) when ``a`` projects onto ``b`` with a ratio near 1 or near ``k`` (within 50%) and a cosine of
    at least 0.9: the same examples averaged with other weights. None otherwise."""
    nb = float(b @ b)
    na = float(a @ a)
    if nb == 0.0 or na == 0.0:
        return None
    ratio = float(a @ b) / nb
    cosine = float(a @ b) / float(np.sqrt(na * nb))
    if cosine < 0.9:
        return None
    if abs(ratio - 1.0) <= 0.5 or abs(ratio - k) <= 0.5 * k:
        return ratio, cosine
    return None
