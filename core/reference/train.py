"""numpy reference for training runs: the MLP's exact gradient and one framework's optimizer rule, in float64.

The frameworks' trajectories are measured against this one (``gradparity train``): the same canonical start,
the same batches, the gradient of the same reduced loss by the hand-written backward pass of ``mlp.py``,
and the update of ``gradparity.experiment.optimizers.update_rule`` for the framework being compared, so a
difference that remains is the framework's arithmetic, not its optimizer's documented semantics.

Every reduction of a training run (``protocol.TRAIN_REDUCTIONS``) is one vector: the reduced loss is
``sum_i s_i * l_i`` with ``s = loss_scale(reduction, N, w)``; the sweep reads the same vector to say how much
each example weighs in a step.
"""
from __future__ import annotations

import numpy as np

from gradparity.backends.protocol import TRAIN_REDUCTIONS
from gradparity.experiment.optimizers import OptimizerConfig, update_rule
from gradparity.reference.mlp import backward, cross_entropy, forward


def loss_scale(reduction: str, n: int, weights: np.ndarray | None = None) -> np.ndarray:
    """The factor s_i of each example's loss in the reduced loss ``sum_i s_i * l_i`` of a batch of ``n``, float64:
    unweighted "mean" 1/N and "sum" 1; with per-example ``weights`` w, "sum" w_i, "weighted_mean" w_i / sum(w)
    and "sum_over_batch_size" w_i / N (the divisor is the batch's own size, a short batch's too)."""
    if reduction not in TRAIN_REDUCTIONS[weights is not None]:
        raise ValueError(f"no reduction {reduction!r} {'with' if weights is not None else 'without'} weights")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{n} examples but weights of shape {w.shape}")
    divisor = {"sum": 1.0, "mean": float(n), "sum_over_batch_size": float(n), "weighted_mean": float(w.sum())}
    return w / divisor[reduction]


def trajectory(params: dict[str, np.ndarray], batches: list[tuple[np.ndarray, np.ndarray]], model: dict,
               config: OptimizerConfig, lrs: list[float], reduction: str, framework: str,
               float32_hyperparameters: bool = False,
               weights: list[np.ndarray] | None = None) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """(parameters after each step, loss at each step before its update) of training the MLP ``model`` on
    ``batches`` (x, y) with ``framework``'s rule for ``config``; the loss is cross-entropy reduced over each
    batch by ``reduction`` (``loss_scale``; ``weights``: per step, one weight per example, or None). Batches may
    differ in size (a short last batch). float64 throughout."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    rules = {k: update_rule(framework, config, float32_hyperparameters) for k in p}
    states: dict[str, dict] = {k: {} for k in p}
    out, losses = [], []
    for t, ((x, y), lr) in enumerate(zip(batches, lrs), start=1):
        f = forward(p, np.asarray(x, dtype=np.float64), model)
        per_example, dlogits = cross_entropy(f.logits, np.asarray(y))
        scale = loss_scale(reduction, len(y), None if weights is None else weights[t - 1])
        losses.append(float(per_example @ scale))
        grads = backward(p, f, dlogits * scale[:, None], model)
        p = {k: rules[k](p[k], grads[k], states[k], float(lr), t) for k in p}
        out.append(dict(p))
    return out, losses
