"""Compare what each data-parallel engine applied with the single-device gradient of the same global batch.

For every backend x engine configuration x global batch x reduction (a "CONFIG@SHARDING/METHOD" case of task
"data_parallel"), the worker returned the engine's gradient g_dp and the same framework's single-device gradient
g_1 of that batch with that reduction ("single@SHARDING/METHOD"). Here:

- ``max_rel``: g_dp against g_1, relative per tensor as every gradient comparison is (``pairs.relative_difference``),
  held to the tolerance of the problem (``tolerance``): agree_with_single_device when within it;
- ``factor``: the least-squares scalar f = <g_dp, g_1> / <g_1, g_1>, and whether g_dp IS f * g_1 (the residual
  max_rel within the same tolerance): a constant factor (1, 1/R, R, ...) or none (the engine weighed the examples
  unequally, repeated or dropped some);
- ``expected``: what the framework's documented convention predicts (``experiment.parallel.expected_factor``), and
  whether the measurement confirms it;
- ``advice``: what the factor means and the fix, in the engine's own terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from gradparity.compare.pairs import relative_difference


@dataclass
class ParallelRow:
    """One engine configuration's gradient against the single-device one (module doc)."""

    backend: str
    config: str
    engine: str
    sharding: str
    method: str
    replicas: int
    batch: int                       # the global batch's examples
    status: str = "ok"
    error: str | None = None
    shards: list[int] = field(default_factory=list)   # examples each replica saw
    examples_seen: int | None = None
    reduction: str = ""              # what the method means in the engine's terms
    factor: float | None = None      # g_dp / g_1 when one constant, else None
    factor_text: str | None = None   # "1/4", "4", or the number
    expected: Fraction | None = None
    expected_constant: bool = True   # False: the convention predicts no constant factor
    expected_refusal: str | None = None   # the engine's own rule refuses this configuration
    max_rel: float | None = None
    residual: float | None = None    # max_rel of g_dp against factor * g_1
    tolerance: float | None = None
    note: str = ""
    advice: str = ""

    @property
    def agree(self) -> bool:
        return self.status == "ok" and self.max_rel is not None and self.max_rel <= self.tolerance

    @property
    def as_expected(self) -> bool | None:
        """Whether the measured factor is the convention's (None for a failed case)."""
        if self.status == "refused":
            return self.expected_refusal is not None
        if self.status != "ok":
            return None
        if self.expected_refusal is not None:
            return False
        if not self.expected_constant:
            return self.factor is None
        return self.factor is not None and abs(self.factor - float(self.expected)) <= self.tolerance * float(
            self.expected)

    def to_dict(self) -> dict:
        finite = lambda v: v if v is None or math.isfinite(v) else str(v)  # noqa: E731
        return {"backend": self.backend, "engine": self.engine, "config": self.config, "sharding": self.sharding,
                "method": self.method, "reduction": self.reduction, "replicas": self.replicas,
                "batch": self.batch, "shards": self.shards, "examples_seen": self.examples_seen,
                "factor": finite(self.factor), "factor_text": self.factor_text,
                "expected_factor": ("refused" if self.expected_refusal else None if not self.expected_constant
                                    else expected_text(self.expected)),
                "expected_refusal": self.expected_refusal,
                "as_expected": self.as_expected, "max_rel": finite(self.max_rel),
                "residual_after_factor": finite(self.residual), "tolerance": self.tolerance,
                "agree_with_single_device": self.agree, "status": self.status, "error": self.error,
                "note": self.note, "advice": self.advice}


def expected_text(f: Fraction) -> str:
    """A predicted factor as a short fraction, or its value when it is not one (Keras' float32 1/R)."""
    return str(f) if f.denominator <= 10_000 else f"{float(f):.10g}"


def least_squares_factor(dp: dict[str, np.ndarray], single: dict[str, np.ndarray]) -> float:
    """f minimizing |g_dp - f g_1|^2 over every tensor (float64); NaN when g_1 is zero."""
    num = sum(float(np.vdot(np.asarray(dp[k], np.float64), np.asarray(single[k], np.float64))) for k in single)
    den = sum(float(np.vdot(np.asarray(single[k], np.float64), np.asarray(single[k], np.float64))) for k in single)
    return num / den if den > 0 else math.nan


def factor_text(f: float, tol: float, n: int, r: int) -> str:
    """The factor as the simplest fraction within ``tol`` (relative) whose denominator divides into the problem
    (up to 4 N R), else its value to 6 digits."""
    if not math.isfinite(f) or f == 0:
        return f"{f:.6g}"
    best = Fraction(f).limit_denominator(max(4 * n * r, 64))
    for d in range(1, max(4 * n * r, 64) + 1):   # the smallest denominator that is close enough
        c = Fraction(round(f * d), d)
        if c != 0 and abs(float(c) - f) <= tol * abs(f):
            best = c
            break
    return str(best) if abs(float(best) - f) <= tol * abs(f) else f"{f:.6g}"


def compare_case(dp: dict[str, np.ndarray], single: dict[str, np.ndarray], tol: float,
                 term_scale: dict[str, float], n: int, r: int) -> dict:
    """max_rel of g_dp against g_1, the least-squares factor, and whether g_dp is that factor times g_1."""
    _, max_rel, _ = relative_difference(dp, single, term_scale)
    f = least_squares_factor(dp, single)
    scaled = {k: f * np.asarray(v, np.float64) for k, v in single.items()} if math.isfinite(f) else single
    scale = {k: abs(f) * s for k, s in term_scale.items()} if math.isfinite(f) else term_scale
    _, residual, _ = relative_difference({k: np.asarray(v, np.float64) for k, v in dp.items()}, scaled, scale)
    constant = math.isfinite(f) and residual <= tol
    return {"max_rel": max_rel, "residual": residual, "factor": f if constant else None,
            "factor_text": factor_text(f, tol, n, r) if constant else None}
