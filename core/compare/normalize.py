"""Normalize: rescale every method's native gradient to the per-example-mean convention.

After this step every ``Result`` holds the gradient (and loss) of the mean
loss over the batch, in float64, with the factor that was applied, so that
results from different methods and backends are directly comparable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradparity.compare.tolerance import effective_unit_roundoff
from gradparity.run.execute import BackendOutcome

@dataclass(frozen=True)
class Result:
    """One backend x method row, normalized. ``grads`` is None unless ``status == 'ok'``."""

    backend: str
    method: str
    status: str
    error: str | None
    loss: float | None                 # mean-convention loss (native loss x factor)
    loss_native: float | None          # what the method's reduction returned
    normalization_factor: float | None  # None when a discrepancy switch combines several cases (see factor_label)
    factor_label: str
    grad_norm: float | None            # L2 norm of the normalized gradient, all parameters
    seconds: float | None
    dtype: str | None                  # computation dtype the backend reported
    device: str | None
    unit_roundoff: float | None        # of the computation; TF32 counts when it was possible
    grads: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.method}"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def nonfinite_problem(loss: float, grads: dict[str, np.ndarray]) -> str | None:
    """Describe NaN/inf in a result ('loss is inf; 12 of 40 gradient entries are NaN/inf, first in ...'), or None."""
    parts = []
    if not np.isfinite(loss):
        parts.append(f"loss is {loss}")
    bad = {k: int(np.size(g) - np.count_nonzero(np.isfinite(g))) for k, g in grads.items()}
    n_bad = sum(bad.values())
    if n_bad:
        total = sum(int(np.size(g)) for g in grads.values())
        first = next(k for k, v in bad.items() if v)
        parts.append(f"{n_bad} of {total} gradient entries are NaN/inf (first in {first})")
    return "non-finite result: " + "; ".join(parts) if parts else None


def normalize(outcomes: list[BackendOutcome], methods: tuple[str, ...], n_examples: int,
              rules: dict | None = None, *, lean: bool = False) -> list[Result]:
    """One Result per backend x method, in the order given; failed rows keep their error.

    ``rules`` (from ``gradparity.experiment.causes.rules``) say how each method's result is
    made from the worker's native cases, sum of weight * native(case); by default
    one case, the method itself, times its usual factor. Normalized gradients are float64; with ``lean``
    (a model too large for float64 copies of every row: ``gradparity check`` on 100M parameters) a float32 row
    stays float32 (one more rounding, u = 6e-8, far inside float32's tolerance) and each worker's native arrays
    are released once normalized.
    """
    if rules is None:
        from gradparity.experiment.causes import Causes
        from gradparity.experiment.causes import rules as default_rules

        rules = default_rules(methods, n_examples, {}, Causes())
    results = []
    for outcome in outcomes:
        env = outcome.environment or {}
        for name in methods:
            rule = rules[name]
            rows = [(outcome.methods[case], w) for case, w in rule.terms]
            failed = next((row for row, _ in rows if row.status != "ok"), None)
            grads = loss = native = norm = None
            status, error = ("ok", None) if failed is None else (failed.status, failed.error)
            if failed is None:
                def dtype(row):
                    kind = next(iter(row.grads.values()), np.zeros(0)).dtype
                    return np.float32 if lean and kind == np.float32 else np.float64

                grads = {k: sum(np.asarray(row.grads[k], dtype=dtype(row)) * dtype(row)(w) for row, w in rows)
                         for k in rows[0][0].grads}

                native = float(sum(float(row.loss) for row, _ in rows))
                loss = float(sum(float(row.loss) * w for row, w in rows))
                with np.errstate(over="ignore", invalid="ignore"):
                    norm = float(np.sqrt(sum(float(np.sum(g * g)) for g in grads.values())))
                problem = nonfinite_problem(native, grads)
                if problem:
                    # Not comparable: inf - inf is NaN and a ratio of infinities is no factor.
                    status, error, grads = "nonfinite", problem, None
            seconds = [row.seconds for row, _ in rows]
            results.append(Result(
                outcome.backend, name, status, error, loss, native, rule.factor, rule.label, norm,
                sum(seconds) if all(t is not None for t in seconds) else None, env.get("dtype"),
                env.get("device"), effective_unit_roundoff(env), grads))
        if lean:  # this worker's rows are normalized: its native arrays are no longer needed
            for row in outcome.methods.values():
                row.grads = None
    return results
