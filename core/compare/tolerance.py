"""Every bound gradparity judges a difference by: one module, each formula named with its calibration.

Rounding is measured in units of ``u``, the unit roundoff of the less precise arithmetic involved
(``UNIT_ROUNDOFF``; TF32 counts where a backend could use it: ``effective_unit_roundoff``).

- **Gradients of one problem** (``Tolerance``, ``tolerance_for``): ``rtol = SAFETY * u * sqrt(K) * L``, ``K`` the
  longest sum of the forward/backward pass (the loss terms or the widest dot product), ``L`` the layers in
  series. A pair agrees when every tensor's largest difference is within ``rtol * S_p`` (see
  ``gradparity.compare.pairs``). Calibration (``python examples/calibrate_tolerance.py``: 9 problems x 2 seeds,
  widths 4-200, depths 1-4, N = 1-512, four activations, numpy/torch/jax/keras-tensorflow, all five methods,
  on a 2-core CPU): the largest ``max_rel / (u sqrt(K) L)`` rounding produced was 0.51 in float32 and 0.43 in
  float64, so ``SAFETY = 16`` leaves margins of 31x and 37x, while a missing 1/N is a factor of N.
- **Loss functions on a batch** (``loss_rtol``): the same model with ``K`` the batch's largest number of logits
  and ``L = 2`` (the loss and its reduction).
- **Trajectories of an optimizer fed fixed gradients** (``step_rtol``): ``rtol(t) = SAFETY * u * t``: each
  update rounds to a few ulps of the parameters and the error accumulates at most linearly in the steps.
- **Training trajectories of a model** (``training_rtol``): ``rtol(t) = rtol_gradient(u) * t``: each step's
  gradient carries the gradient bound, and the steps add up.
- **A factor between two gradients** (``factor_bound``, ``gradparity diagnose``): b = r * a holds when the
  residual ``max|a - r b| / max|a|`` is within ``4 * max(rtol, 1e-12)``: the residual carries the rounding of
  both results and of r, and the floor keeps a float64 table of exact zeros from demanding 0.
- **Rounding in a narrow format** (``narrow_rounding``: tf32, float16, bfloat16): ``4 * u * sqrt(K)``, no safety
  factor, since ``SAFETY`` times a 2^-8 roundoff would call differences of order 1 rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Unit roundoff u = 2^-(p) for p significand bits (incl. the implicit one), round to nearest.
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "tf32": 2.0 ** -11, "float16": 2.0 ** -11,
                 "bfloat16": 2.0 ** -8}
#: Formats so narrow that the agreement model's safety factor would allow differences of order 1.
NARROW_FORMATS = ("tf32", "float16", "bfloat16")
#: The margin over pure rounding (see the module doc for its calibration).
SAFETY = 16.0


def effective_unit_roundoff(environment: dict | None) -> float | None:
    """u of the arithmetic a backend actually did: its dtype's, or TF32's when TF32 was possible."""
    if not environment or environment.get("dtype") not in UNIT_ROUNDOFF:
        return None
    if environment["dtype"] == "float32" and environment.get("tf32"):
        return UNIT_ROUNDOFF["tf32"]
    return UNIT_ROUNDOFF[environment["dtype"]]


@dataclass(frozen=True)
class Tolerance:
    """The relative tolerance model for one problem; ``rtol(u)`` gives the bound for a pair.

    ``term_scale`` maps each parameter tensor to T_p (see ``gradparity.compare.pairs``), or is
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


def gradient_tolerance(longest_sum: int, depth: int, term_scale: dict[str, float] | None = None) -> Tolerance:
    """The gradient model for a problem whose longest sum is ``longest_sum`` and depth ``depth`` (at least 1 each)."""
    return Tolerance(SAFETY, max(int(longest_sum), 1), max(int(depth), 1), dict(term_scale or {}))


def tolerance_for(model, n_examples: int, term_scale: dict[str, float] | None = None,
                  safety: float = SAFETY) -> Tolerance:
    """The tolerance model for a built-in model on a batch of ``n_examples``: sums as long as the batch's loss
    terms or the model's widest dot product, as deep as its layers in series."""
    return Tolerance(safety, max(n_examples * model.loss_terms(), *model.widths()), model.depth,
                     dict(term_scale or {}))


def loss_rtol(longest_sum: int, unit_roundoff: float) -> float:
    """The bound for a loss function's value and d loss / d logits on a batch of ``longest_sum`` logits."""
    return gradient_tolerance(longest_sum, 2).rtol(unit_roundoff)


def step_rtol(unit_roundoff: float, steps: int) -> list[float]:
    """``rtol(t) = SAFETY * u * t`` for t = 1..steps: an optimizer's parameters fed the same gradients."""
    return [SAFETY * unit_roundoff * t for t in range(1, steps + 1)]


def training_rtol(gradient: Tolerance, unit_roundoff: float, steps: int) -> list[float]:
    """``rtol(t) = rtol_gradient(u) * t`` for t = 1..steps: a model trained from one start on the same batches."""
    return [gradient.rtol(unit_roundoff) * t for t in range(1, steps + 1)]


def factor_bound(rtol: float | None) -> float:
    """The largest residual of a fitted factor between two gradients that rounding explains (module doc)."""
    return max(rtol or 0.0, 1e-12) * 4


def narrow_rounding(dtype: str, n_terms: int) -> float:
    """Rounding in a narrow format: about u sqrt(K) of the gradient's scale (4 u sqrt(K), no safety factor)."""
    return 4 * UNIT_ROUNDOFF[dtype] * math.sqrt(max(n_terms, 1))


def problem_term_scale(params: dict, batch: dict, model) -> dict[str, float]:
    """T_p for every tensor, from the float64 reference (pure numpy, computed in this process)."""
    from gradparity.backends.protocol import IGNORE_INDEX
    from gradparity.experiment.models import MLP

    with np.errstate(all="ignore"):  # an overflowing problem is reported by its results, not warned here
        if isinstance(model, MLP):
            from gradparity.reference.mlp import term_scale

            masks = [batch[f"dropout/batch/{i}"] for i in range(len(model.hidden))
                     if f"dropout/batch/{i}" in batch]
            # Padding examples (the switch 'padding') add no term: their targets are the ignored class.
            y = batch["y"] if "valid" not in batch else np.where(batch["valid"] > 0, batch["y"], IGNORE_INDEX)
            scale = term_scale(params, batch["x"], y, model.to_dict(), masks or None)
        else:
            from gradparity.reference.models import term_scale

            scale = term_scale(params, batch["x"], batch["y"], model.to_dict())
    # A non-finite T_p would make every pair disagree; without it S_p falls back to the results.
    return {k: v for k, v in scale.items() if math.isfinite(v)}
