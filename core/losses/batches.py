"""Canonical inputs of a loss comparison: batches of logits, targets and sample weights.

Generated from a seed in float64, in several shapes (N, C) and (N, T, C), with
padding (targets equal to the ignored class) and positive sample weights, so
that a translation is exercised on batches whose divisors differ; or read
from a user's npz. Also builds the job a backend's worker gets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradparity.backends import BackendInfo, make_job
from gradparity.backends.protocol import WorkerJob
from gradparity.errors import ConfigError
from gradparity.losses.catalogue import LossSemantics

#: Shapes of the generated batches: two (N, C), two (N, T, C), batch sizes that differ.
DEFAULT_SHAPES = ((6, 5), (9, 5), (4, 3, 5), (3, 7, 5))


@dataclass(frozen=True)
class LossBatch:
    """One batch: logits (channels-last), targets as the loss takes them, sample weights (leading shape)."""

    name: str
    logits: np.ndarray = field(repr=False)
    targets: np.ndarray = field(repr=False)
    sample_weight: np.ndarray | None = field(repr=False, default=None)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"{self.name}/logits": self.logits, f"{self.name}/targets": self.targets}
        if self.sample_weight is not None:
            out[f"{self.name}/sample_weight"] = self.sample_weight
        return out

    def describe(self) -> str:
        extra = ""
        if self.targets.dtype.kind in "iu":
            extra = f", {int(np.sum(self.targets < 0))} padded"
        return f"{self.name} {tuple(self.logits.shape)}{extra}"


def _targets(sem: LossSemantics, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    c = shape[-1]
    lead = shape[:-1]
    if sem.kind == "cross_entropy":
        y = rng.integers(0, c, lead).astype(np.int64)
        if sem.ignore_index is not None:
            pad = rng.random(lead) < 0.3
            pad.flat[0] = True   # at least one padded element ...
            pad.flat[-1] = False  # ... and at least one valid one
            y = np.where(pad, sem.ignore_index, y)
        return y
    if sem.kind == "cross_entropy_probs":
        raw = rng.random(shape) + 0.05
        return raw / raw.sum(axis=-1, keepdims=True)
    if sem.kind == "binary_cross_entropy":
        return (rng.random(shape) < 0.5).astype(np.float64)
    # Regression: targets away from the predictions, so |z - t| is never 0 (L1's kink) or at Huber's delta.
    return rng.standard_normal(shape)


def loss_classes(sem: LossSemantics) -> int | None:
    """The number of classes a configuration fixes (by its class or positive weights), or None."""
    for w in (sem.class_weight, sem.pos_weight):
        if w is not None:
            return len(w)
    return None


def generate_batches(sem: LossSemantics, seed: int = 0,
                     shapes: tuple[tuple[int, ...], ...] = DEFAULT_SHAPES,
                     classes: int | None = None) -> list[LossBatch]:
    """Batches for ``sem``: logits ~ N(0, 2^2), targets of the right kind, weights in [0.25, 2] when used.

    The last axis is ``classes`` when given, else what the configuration's
    weights fix, else the shapes' own.
    """
    classes = classes or loss_classes(sem)
    if classes is not None:
        shapes = tuple(tuple(s[:-1]) + (classes,) for s in shapes)
    out = []
    for i, shape in enumerate(shapes):
        rng = np.random.default_rng([seed, 10 + i])
        logits = 2.0 * rng.standard_normal(shape)
        targets = _targets(sem, rng, shape)
        weight = rng.uniform(0.25, 2.0, shape[:1]) if sem.sample_weight else None
        out.append(LossBatch(f"b{i}", logits, targets, weight))
    return out


def check_loss_batch(sem: LossSemantics, batch: LossBatch) -> None:
    """Shapes, dtypes and ranges of a (user's) batch against the loss; ConfigError listing every problem."""
    problems = []
    z, t = batch.logits, batch.targets
    if z.ndim not in (2, 3):
        problems.append(f"{batch.name}: logits must be (N, C) or (N, T, C), got shape {z.shape}")
    elif not np.all(np.isfinite(z)):
        problems.append(f"{batch.name}: logits contain NaN/inf")
    if z.ndim in (2, 3):
        if sem.kind == "cross_entropy":
            if t.shape != z.shape[:-1] or t.dtype.kind not in "iu":
                problems.append(f"{batch.name}: class-index targets must be integers of shape {z.shape[:-1]}, "
                                f"got {t.dtype} {t.shape}")
            else:
                valid = t if sem.ignore_index is None else t[t != sem.ignore_index]
                if valid.size and (valid.min() < 0 or valid.max() >= z.shape[-1]):
                    problems.append(f"{batch.name}: targets must lie in [0, {z.shape[-1]}) or equal "
                                    f"ignore_index {sem.ignore_index}")
        elif t.shape != z.shape:
            problems.append(f"{batch.name}: targets must have the logits' shape {z.shape}, got {t.shape}")
        for name, w in (("class weights", sem.class_weight), ("pos_weight", sem.pos_weight)):
            if w is not None and len(w) != z.shape[-1]:
                problems.append(f"{batch.name}: {name} have {len(w)} entries for {z.shape[-1]} classes")
        if sem.sample_weight:
            s = batch.sample_weight
            if s is None:
                problems.append(f"{batch.name}: the loss takes sample_weight, the data has none")
            elif s.shape not in (z.shape[:1], z.shape[:-1]):
                problems.append(f"{batch.name}: sample_weight must be {z.shape[:1]} or {z.shape[:-1]}, got {s.shape}")
    if not problems:
        from gradparity.reference.losses import divisor

        weight = batch.sample_weight if sem.sample_weight else None
        if divisor(sem, t, z.shape, weight) == 0:
            # Frameworks disagree on 0/0 (PyTorch's mean gives NaN, Keras' divide_no_nan 0): not a comparison.
            problems.append(f"{batch.name}: the divisor ({sem.divisor}) is 0 on this batch (no valid target or "
                            "zero weights), so the reduced loss is undefined; give a batch with at least one")
    if problems:
        raise ConfigError(problems)


def make_loss_job(info: BackendInfo, functions: dict[str, str], batches: list[LossBatch],
                  dtype: str = "float64", device: str = "cpu",
                  cases: tuple[str, ...] | None = None) -> WorkerJob:
    """The job a backend's worker gets: run functions on batches, as cases 'FUNCTION@BATCH'.

    By default every function runs on every batch; ``cases`` restricts that
    (several losses in one worker, each on its own batches).
    """
    arrays: dict[str, np.ndarray] = {}
    for b in batches:
        arrays.update(b.arrays())
    if cases is None:
        cases = tuple(f"{f}@{b.name}" for f in functions for b in batches)
    return make_job(info, "loss_functions", cases, dtype=dtype, device=device, batch=arrays,
                    payload={"functions": dict(functions)})
