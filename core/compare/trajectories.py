"""Distances between parameter trajectories (optimizer steps, training runs), step by step.

Used by ``gradparity optimizers``, ``gradparity train`` and its sweep: one measure, relative to the
parameters' size, and the first step where it leaves its tolerance.
"""
from __future__ import annotations

import numpy as np


def relative_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray], skip: frozenset = frozenset()) -> float:
    """max |a_p - b_p| over every parameter entry (of the tensors not in ``skip``), divided by the largest
    |entry| of either side (0 if both are all zero)."""
    num = max((float(np.max(np.abs(a[k] - b[k]))) for k in a if k not in skip), default=0.0)
    den = max(max(float(np.max(np.abs(a[k]))), float(np.max(np.abs(b[k])))) for k in a)
    return num / den if den else num


def first_beyond(values: list[float], bounds: list[float]) -> int | None:
    """The first step (from 1) whose value exceeds its bound, or None when every step stays within."""
    return next((t for t, (d, r) in enumerate(zip(values, bounds), start=1) if d > r), None)
