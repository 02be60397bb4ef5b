"""The float64 reference of the built-in MLP: its forward pass, softmax cross-entropy and backward pass by hand.

It is the yardstick the framework backends are compared with, so it follows the textbook derivation literally
and is itself tested against central finite differences (``tests/test_reference.py``). Every function computes
in float64: callers promote their inputs (the numpy worker, ``gradparity.backends.numpy.session``, receives them
in the experiment's dtype, so a float32 run compares against the very same float32-rounded numbers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradparity.backends.protocol import IGNORE_INDEX

_ACTIVATIONS = {
    # name: (f(z), f'(z) expressed through z and a = f(z))
    "relu": (lambda z: np.maximum(z, 0.0), lambda z, a: (z > 0).astype(np.float64)),
    "tanh": (np.tanh, lambda z, a: 1.0 - a * a),
    "sigmoid": (lambda z: 1.0 / (1.0 + np.exp(-z)), lambda z, a: a * (1.0 - a)),
    "identity": (lambda z: z, lambda z, a: np.ones_like(z)),
}


@dataclass
class Forward:
    """What a forward pass keeps for the backward pass, per layer i.

    ``inputs[i]`` is layer i's input (x, or the previous hidden output after
    dropout); ``pre[i]`` its pre-activation (after the batch normalization,
    when there is one); ``acts[i]`` the activation before dropout; ``xhat[i]``
    and ``inv_std[i]`` the normalization's normalized values and
    1/sqrt(var + eps); ``masks[i]`` the dropout keep-mask (or None).
    ``logits`` is the last layer's output.
    """

    inputs: list
    pre: list
    acts: list
    xhat: list
    inv_std: list
    masks: list
    logits: np.ndarray


def forward(params, x, model: dict, masks=None) -> Forward:
    """The MLP's forward pass on ``x`` in training mode (batch statistics; dropout ``masks``, one
    (N, H) array per hidden layer, or None)."""
    act, _ = _ACTIVATIONS[model["activation"]]
    num_layers = len(model["sizes"]) - 1
    eps = model["batchnorm"]["epsilon"] if model.get("batchnorm") else None
    f = Forward([], [], [], [], [], [], None)
    h = x
    for i in range(num_layers):
        f.inputs.append(h)
        z = h @ params[f"layers.{i}.kernel"] + params[f"layers.{i}.bias"]
        if i == num_layers - 1:
            f.logits = z
            break
        if eps is not None:
            centred = z - z.mean(axis=0)
            inv_std = 1.0 / np.sqrt((centred * centred).mean(axis=0) + eps)  # biased variance, as all do
            xhat = centred * inv_std
            z = params[f"norms.{i}.scale"] * xhat + params[f"norms.{i}.bias"]
            f.xhat.append(xhat)
            f.inv_std.append(inv_std)
        a = act(z)
        f.pre.append(z)
        f.acts.append(a)
        mask = None if masks is None else np.asarray(masks[i], dtype=np.float64)
        f.masks.append(mask)
        h = a if mask is None else a * mask
    return f


def cross_entropy(logits, y):
    """Per-example softmax cross-entropy and its gradient w.r.t. the logits (softmax - onehot); a target
    ``IGNORE_INDEX`` (padding) has loss 0 and gradient 0."""
    valid = y != IGNORE_INDEX
    y = np.where(valid, y, 0)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(shifted).sum(axis=1))
    rows = np.arange(len(y))
    losses = logsumexp - shifted[rows, y]
    dlogits = np.exp(shifted - logsumexp[:, None])
    dlogits[rows, y] -= 1.0
    return np.where(valid, losses, 0.0), dlogits * valid[:, None]


def backward(params, f: Forward, dlogits, model: dict, per_example: bool = False, terms: bool = False):
    """Backpropagate ``dlogits`` (d loss / d logits, one row per example) through the forward pass ``f``.

    With ``per_example`` every gradient keeps the example axis (N, ...): example i's row is the gradient
    of the losses weighted by row i of ``dlogits`` alone. Without batch normalization these are the
    per-example outer products; with it the examples are coupled through the batch statistics, so it
    is one backward pass per example. With ``terms`` the example axis is kept too, but of the one batch
    backward pass: row i is example i's term in each sum over examples that makes the batch gradient
    (the per-example gradients when examples are independent). Rounding error follows those terms:
    a Dense bias before a normalization has per-example gradients that are all zero, yet its sum adds
    terms as large as the normalization's input gradient.
    """
    if per_example and model.get("batchnorm"):
        n = dlogits.shape[0]
        rows = []
        for i in range(n):
            only = np.zeros_like(dlogits)
            only[i] = dlogits[i]
            rows.append(backward(params, f, only, model))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    _, dact = _ACTIVATIONS[model["activation"]]
    num_layers = len(model["sizes"]) - 1
    grads = {}
    delta = dlogits
    rows = per_example or terms
    for i in reversed(range(num_layers)):
        if rows:
            grads[f"layers.{i}.kernel"] = np.einsum("ni,no->nio", f.inputs[i], delta)
            grads[f"layers.{i}.bias"] = delta.copy()
        else:
            grads[f"layers.{i}.kernel"] = f.inputs[i].T @ delta
            grads[f"layers.{i}.bias"] = delta.sum(axis=0)
        if i == 0:
            break
        j = i - 1  # the hidden layer whose output layer i read
        g = delta @ params[f"layers.{i}.kernel"].T
        if f.masks[j] is not None:
            g = g * f.masks[j]
        g = g * dact(f.pre[j], f.acts[j])
        if f.xhat:
            xhat, n = f.xhat[j], g.shape[0]
            grads[f"norms.{j}.scale"] = g * xhat if rows else (g * xhat).sum(axis=0)
            grads[f"norms.{j}.bias"] = g.copy() if rows else g.sum(axis=0)
            dxhat = g * params[f"norms.{j}.scale"]
            # d/dz of (z - mean) / sqrt(var + eps), with the batch's mean and (biased) variance.
            g = f.inv_std[j] / n * (n * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0))
        delta = g
    return grads


def term_scale(params, x, y, model: dict, masks=None) -> dict[str, float]:
    """Per tensor, the largest entry of mean_i |t_i|, t_i example i's term in the batch gradient's sum over
    examples (its gradient grad l_i, when examples are independent; see ``backward``'s ``terms``).

    Rounding error in a sum is proportional to the sum of the terms' magnitudes,
    not to the result; where per-example gradients cancel (near an optimum, or a
    bias whose terms change sign), this is far larger than the gradient itself.
    """
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    f = forward(params, np.asarray(x, dtype=np.float64), model, masks)
    _, dlogits = cross_entropy(f.logits, np.asarray(y))
    per_ex = backward(params, f, dlogits, model, terms=True)
    return {k: float(np.max(np.mean(np.abs(g), axis=0))) if g.size else 0.0 for k, g in per_ex.items()}
