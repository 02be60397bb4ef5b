"""A numpy reference for the MLP the data-parallel tests run, written out by hand (no framework, no gradparity):
``z = relu(x @ W0 + b0) @ W1 + b1`` with the cross-entropy -log softmax(z)[y] of integer labels; each example's
loss and gradient, the gradient of a batch's mean or summed loss, and SGD with momentum on a list of batches in
the two update forms the frameworks document.

Parameters are a dict of the four arrays, kernels (in, out) so that a layer is ``x @ W + b``. ``names`` names
them, in the order W0, b0, W1, b1: gradparity's canonical names by default, or a script's own (the multinode
examples' ``w0, b0, w1, b1``); gradients are returned under the same names.

Import it as ``import mlp_reference as mlp`` (pytest puts tests/ on ``sys.path``, as for cli_harness).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

CANONICAL = ("layers.0.kernel", "layers.0.bias", "layers.1.kernel", "layers.1.bias")
METHODS = ("mean", "sum")


def random_params(rng: np.random.Generator, sizes: Sequence[int], names: Sequence[str] = CANONICAL) -> dict:
    """Parameters of the MLP with layer widths ``sizes`` = (in, hidden, classes), drawn from ``rng`` in the order
    W0, b0, W1, b1: kernels standard normal, biases 0.1 times standard normal (small, so that the relu's pattern
    comes from the kernels and the examples)."""
    return {names[0]: rng.normal(size=(sizes[0], sizes[1])), names[1]: rng.normal(size=sizes[1]) * 0.1,
            names[2]: rng.normal(size=(sizes[1], sizes[2])), names[3]: rng.normal(size=sizes[2]) * 0.1}


def forward(x: np.ndarray, params: dict, names: Sequence[str] = CANONICAL) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """(pre-activation a, hidden h = relu(a), logits z) of the MLP on the rows of ``x``."""
    w0, b0, w1, b1 = (params[k] for k in names)
    a = x @ w0 + b0
    h = np.maximum(a, 0)
    return a, h, h @ w1 + b1


def per_example_losses(x: np.ndarray, y: np.ndarray, params: dict, names: Sequence[str] = CANONICAL) -> np.ndarray:
    """-log softmax(logits)[y_i] for every example i (logsumexp shifted by the row's maximum)."""
    z = forward(x, params, names)[2]
    m = z.max(axis=1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(z - m).sum(axis=1))) - z[np.arange(len(y)), y]


def per_example_grads(x: np.ndarray, y: np.ndarray, params: dict,
                      names: Sequence[str] = CANONICAL) -> dict[str, np.ndarray]:
    """d(-log softmax(logits)[y_i]) / d params for every example i, shape (N, *param), by the chain rule:
    dz = softmax(z) - onehot(y), da = (dz @ W1^T) * [a > 0], dW1 = h^T dz, dW0 = x^T da per row."""
    a, h, z = forward(x, params, names)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = p - np.eye(z.shape[1])[y]
    da = (dz @ params[names[2]].T) * (a > 0)
    return dict(zip(names, (np.einsum("ni,nj->nij", x, da), da, np.einsum("ni,nj->nij", h, dz), dz)))


def reduce(values: np.ndarray, method: str) -> np.ndarray:
    """``values`` (one row per example) reduced over the examples: their mean or their sum."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is none of {METHODS}")
    return values.mean(axis=0) if method == "mean" else values.sum(axis=0)


def reduced_grads(x: np.ndarray, y: np.ndarray, params: dict, method: str,
                  names: Sequence[str] = CANONICAL) -> dict[str, np.ndarray]:
    """The gradient of the mean (``method`` "mean") or the sum ("sum") of the rows' losses."""
    return {k: reduce(v, method) for k, v in per_example_grads(x, y, params, names).items()}


#: One parameter's update: (parameter, momentum buffer, gradient, lr) -> (new parameter, new buffer).
Update = Callable[[np.ndarray, np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]


def _train(params: dict, batches: Sequence[tuple[np.ndarray, np.ndarray]], method: str, lrs: Sequence[float],
           update: Update, names: Sequence[str]) -> tuple[list[dict], list[float]]:
    if len(lrs) != len(batches):
        raise ValueError(f"{len(batches)} batches but {len(lrs)} learning rates")
    params = {k: params[k].copy() for k in names}
    buffers = {k: np.zeros_like(v) for k, v in params.items()}
    history, losses = [], []
    for (x, y), lr in zip(batches, lrs):
        losses.append(float(reduce(per_example_losses(x, y, params, names), method)))
        g = reduced_grads(x, y, params, method, names)
        for k in names:
            params[k], buffers[k] = update(params[k], buffers[k], g[k], lr)
        history.append({k: v.copy() for k, v in params.items()})
    return history, losses


def train_keras_sgd(params: dict, batches: Sequence[tuple[np.ndarray, np.ndarray]], method: str,
                    lrs: Sequence[float], momentum: float,
                    names: Sequence[str] = CANONICAL) -> tuple[list[dict], list[float]]:
    """Single-device training from ``params``, step t on ``batches[t]``'s mean or summed loss at ``lrs[t]``, with
    Keras' SGD (keras/src/optimizers/sgd.py; TF-Keras' update_step is the same sum): v = momentum v - lr g,
    p = p + v, v starting at 0. Returns (the parameters after each step, each step's loss at the parameters it
    started from)."""
    def update(p, v, g, lr):
        v = momentum * v - lr * g
        return p + v, v
    return _train(params, batches, method, lrs, update, names)


def train_torch_sgd(params: dict, batches: Sequence[tuple[np.ndarray, np.ndarray]], method: str,
                    lrs: Sequence[float], momentum: float,
                    names: Sequence[str] = CANONICAL) -> tuple[list[dict], list[float]]:
    """As ``train_keras_sgd``, with torch.optim.SGD's momentum (also optax.sgd's): b = momentum b + g,
    p = p - lr b, b starting at 0. Unlike Keras' form the step's lr scales the whole buffer, so the two differ
    when the lr changes between steps."""
    def update(p, b, g, lr):
        b = momentum * b + g
        return p - lr * b, b
    return _train(params, batches, method, lrs, update, names)
