"""numpy reference for training runs: the MLP's exact gradient and one framework's optimizer rule, in float64.

The frameworks' trajectories are measured against this one (``gradparity train``): the same canonical start,
the same batches, the gradient of the same reduced loss by the hand-written backward pass of ``session.py``,
and the update of ``gradparity.experiment.optimizers.update_rule`` for the framework being compared, so a
difference that remains is the framework's arithmetic, not its optimizer's documented semantics.
"""
from __future__ import annotations

import numpy as np

from gradparity.backends.numpy.session import backward, cross_entropy, forward
from gradparity.experiment.optimizers import OptimizerConfig, update_rule


def trajectory(params: dict[str, np.ndarray], batches: list[tuple[np.ndarray, np.ndarray]], model: dict,
               config: OptimizerConfig, lrs: list[float], reduction: str, framework: str,
               float32_hyperparameters: bool = False) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """(parameters after each step, loss at each step before its update) of training the MLP ``model`` on
    ``batches`` (x, y) with ``framework``'s rule for ``config``; the loss is cross-entropy averaged
    (``reduction='mean'``) or summed over each batch. float64 throughout."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    rules = {k: update_rule(framework, config, float32_hyperparameters) for k in p}
    states: dict[str, dict] = {k: {} for k in p}
    out, losses = [], []
    for t, ((x, y), lr) in enumerate(zip(batches, lrs), start=1):
        f = forward(p, np.asarray(x, dtype=np.float64), model)
        per_example, dlogits = cross_entropy(f.logits, np.asarray(y))
        scale = 1.0 / len(y) if reduction == "mean" else 1.0
        losses.append(float(per_example.sum() * scale))
        grads = backward(p, f, dlogits * scale, model)
        p = {k: rules[k](p[k], grads[k], states[k], float(lr), t) for k in p}
        out.append(dict(p))
    return out, losses
