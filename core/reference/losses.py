"""The loss catalogue in float64 numpy: per-element losses, their gradients, and every divisor rule.

The yardstick for translations: ``reduce_loss(semantics, logits, targets,
sample_weight)`` returns the reduced loss and its gradient with respect to
the logits, both derived by hand (and tested against central finite
differences), for every ``gradparity.losses.catalogue.LossSemantics``.

Shapes: logits (or predictions) are channels-last, (N, C) or (N, T, C);
class-index targets are (N,) or (N, T) integers; every other target has the
logits' shape; a sample weight is (N,) or the per-element loss's leading
shape (N, T), and is broadcast over any trailing axes.
"""
from __future__ import annotations

import numpy as np

from gradparity.losses.catalogue import LossSemantics


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def valid_mask(sem: LossSemantics, targets: np.ndarray, logits_shape: tuple[int, ...]) -> np.ndarray:
    """1.0 where an element counts, 0.0 where its target is the ignored class; shape logits_shape[:-1]."""
    if sem.kind == "cross_entropy" and sem.ignore_index is not None:
        return (targets != sem.ignore_index).astype(np.float64)
    return np.ones(logits_shape[:-1])


def element_shape(sem: LossSemantics, logits_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the per-element loss L: one per example/token, or every entry for element-wise losses."""
    if sem.kind in ("cross_entropy", "cross_entropy_probs") or sem.last_axis == "mean":
        return tuple(logits_shape[:-1])
    return tuple(logits_shape)


def _expand(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast a leading-axes array (N,) or (N, T) to ``shape`` by appending axes."""
    w = np.asarray(w, dtype=np.float64)
    return np.broadcast_to(w.reshape(w.shape + (1,) * (len(shape) - w.ndim)), shape)


def per_element(sem: LossSemantics, z: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, dL/dz): the per-element loss on ``element_shape`` and, per entry of z, the derivative of
    the element that entry belongs to (so that dreduced/dz = weights_e * dL/dz / D, broadcast)."""
    z = np.asarray(z, dtype=np.float64)
    c = z.shape[-1]
    if sem.kind in ("cross_entropy", "cross_entropy_probs"):
        if sem.kind == "cross_entropy":
            y = np.asarray(targets)
            safe = np.where(valid_mask(sem, y, z.shape) > 0, y, 0)
            t = np.eye(c)[safe]
        else:
            t = np.asarray(targets, dtype=np.float64)
        eps = sem.label_smoothing
        q = (1.0 - eps) * t + eps / c
        w = np.ones(c) if sem.class_weight is None else np.asarray(sem.class_weight, dtype=np.float64)
        logp = _log_softmax(z)
        wq = w * q
        loss = -(wq * logp).sum(axis=-1)
        grad = np.exp(logp) * wq.sum(axis=-1, keepdims=True) - wq
        return loss, grad
    t = np.asarray(targets, dtype=np.float64)
    if sem.kind == "binary_cross_entropy":
        if sem.label_smoothing:
            t = t * (1.0 - sem.label_smoothing) + 0.5 * sem.label_smoothing
        w = np.ones(c) if sem.class_weight is None else np.asarray(sem.class_weight, dtype=np.float64)
        pw = np.ones(c) if sem.pos_weight is None else np.asarray(sem.pos_weight, dtype=np.float64)
        ell = -w * (pw * t * _log_sigmoid(z) + (1.0 - t) * _log_sigmoid(-z))
        sig = 1.0 / (1.0 + np.exp(-z))
        dell = w * ((pw * t + 1.0 - t) * sig - pw * t)
    else:
        d = z - t
        if sem.kind == "mse":
            ell, dell = d * d, 2.0 * d
        elif sem.kind == "l1":
            ell, dell = np.abs(d), np.sign(d)
        elif sem.kind == "huber":
            small = np.abs(d) <= sem.delta
            ell = np.where(small, 0.5 * d * d, sem.delta * (np.abs(d) - 0.5 * sem.delta))
            dell = np.where(small, d, sem.delta * np.sign(d))
        else:
            raise ValueError(f"no loss {sem.kind!r} in the numpy reference")
    if sem.last_axis == "mean":
        return ell.mean(axis=-1), dell / c
    return ell, dell


def divisor(sem: LossSemantics, targets: np.ndarray, logits_shape: tuple[int, ...],
            sample_weight: np.ndarray | None) -> float:
    """The divisor D of ``sem.divisor`` on this batch (see gradparity.losses.catalogue.DIVISORS)."""
    shape = element_shape(sem, logits_shape)
    m = _expand(valid_mask(sem, targets, logits_shape), shape)
    s = None if sample_weight is None else _expand(sample_weight, shape)
    rule = sem.divisor
    if rule == "one":
        return 1.0
    if rule == "count":
        return float(np.prod(shape))
    if rule == "valid":
        return float(m.sum())
    if rule == "class_weight_sum":
        w = np.ones(logits_shape[-1]) if sem.class_weight is None else np.asarray(sem.class_weight, dtype=np.float64)
        y = np.asarray(targets)
        safe = np.where(m > 0, y, 0)
        return float((w[safe] * m).sum())
    if rule == "sample_weight_sum":
        return float(((1.0 if s is None else s) * m).sum())
    if rule == "keras_sample_weight_sum":
        masked = sem.kind == "cross_entropy" and sem.ignore_index is not None
        if sample_weight is None:
            return float(m.sum()) if masked else float(np.prod(shape))
        if masked:  # the mask broadcasts the weights to the element grid before they are summed
            return float((s * m).sum())
        return float(np.sum(np.asarray(sample_weight, dtype=np.float64)))
    raise ValueError(f"unknown divisor rule {rule!r}")


def reduce_loss(sem: LossSemantics, logits: np.ndarray, targets: np.ndarray,
                sample_weight: np.ndarray | None = None) -> tuple[float, np.ndarray, float]:
    """(reduced loss, d reduced / d logits, divisor D), in float64."""
    z = np.asarray(logits, dtype=np.float64)
    ell, dell = per_element(sem, z, targets)
    shape = ell.shape
    weights = _expand(valid_mask(sem, targets, z.shape), shape)
    if sem.sample_weight:
        if sample_weight is None:
            raise ValueError("this loss takes a sample_weight at the call")
        weights = weights * _expand(sample_weight, shape)
    d = divisor(sem, targets, z.shape, sample_weight if sem.sample_weight else None)
    total = float((weights * ell).sum())
    loss = total / d if d != 0 else 0.0  # Keras divides with divide_no_nan; an all-ignored batch gives 0
    grad_weights = weights / d if d != 0 else np.zeros_like(weights)
    grad = dell * _expand(grad_weights, z.shape) if ell.ndim < z.ndim else dell * grad_weights
    return loss, grad, d
