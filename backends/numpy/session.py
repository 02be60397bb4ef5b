"""numpy reference backend: the MLP differentiated by hand, always in float64.

It is the yardstick the framework backends are compared with, so it
follows the textbook derivation literally and is itself tested against
central finite differences. Inputs arrive in the experiment's dtype (so a
float32 run compares against the very same float32-rounded numbers) and are
promoted to float64 before any arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradparity.backends.protocol import IGNORE_INDEX, CaseInputs, RawResult, WorkerJob

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


class NumpySession:
    """The reference session: every method is the same mathematics, organized as that method is."""

    def __init__(self, job: WorkerJob):
        if job.loss["name"] != "cross_entropy":
            raise ValueError(f"numpy reference has no loss {job.loss['name']!r}")
        self.job = job
        self.params = {k: v.astype(np.float64) for k, v in job.params.items()}
        self.x = job.batch["x"].astype(np.float64)
        self.y = job.targets().astype(np.int64)
        self._inputs = CaseInputs(job, (self.x, self.y), lambda x, y: (x.astype(np.float64), y.astype(np.int64)))

    def environment(self) -> dict:
        return {
            "framework": "numpy",
            "versions": {"numpy": np.__version__},
            "device": "cpu",
            "device_kind": "cpu",
            "device_note": None if self.job.device == "cpu" else
            "the numpy reference always runs on the CPU",
            "dtype": "float64",
            "precision": {"note": "float64 reference, computed by hand; inputs promoted from "
                                  f"{self.job.dtype}" + ("; no autocast (the reference stays float64)"
                                                         if self.job.autocast else "")},
            "tf32": False,
        }

    def _losses_and_grads(self, x, y, reduction: str, per_example: bool = False, masks=None):
        f = forward(self.params, x, self.job.model, masks)
        losses, dlogits = cross_entropy(f.logits, y)
        if self.job.class_weights is not None:
            # The switch 'class_weights': w[y_i] l_i; the mean below still divides by N.
            w = self.job.class_weights[y]
            losses, dlogits = losses * w, dlogits * w[:, None]
        if reduction == "mean":
            count = int(np.sum(y != IGNORE_INDEX))  # padding is not counted (torch's ignore_index mean)
            dlogits = dlogits / count
            loss = losses.sum() / count
        elif reduction == "sum":
            loss = losses.sum()
        else:  # "none": per-example losses, per-example gradients
            loss = losses
        grads = backward(self.params, f, dlogits, self.job.model, per_example)
        return loss, grads

    def _singles(self, x, y, rows):
        """(loss, gradients) of each example of ``rows`` in its own forward pass (a batch of one, its own
        dropout mask row); with batch normalization that example is normalized by its own statistics."""
        masks = self.job.dropout_masks("single") if not self._part(x) else None
        return [self._losses_and_grads(x[i:i + 1], y[i:i + 1], "mean",
                                       masks=None if masks is None else [m[i:i + 1] for m in masks])
                for i in rows]

    def _part(self, x) -> bool:
        """Whether ``x`` is a part ('METHOD@PART'), not the batch (dropout masks exist for the batch only)."""
        return x is not self.x

    def compute(self, method: str) -> RawResult:
        """Run ``method`` ('METHOD' or 'METHOD@PART'); per-example loops honour 'unzeroed_gradients'
        (the accumulator, holding examples 0..i, is read and added up after every example)."""
        case = method
        method, x, y = self._inputs(case)
        n = len(y)
        unzeroed = self.job.unzeroed
        masks = self.job.dropout_masks("batch") if not self._part(x) else None
        train_mode = masks is not None or self.job.batchnorm_epsilon is not None

        def loop(examples) -> dict[str, np.ndarray]:
            acc = {k: np.zeros_like(v) for k, v in self.params.items()}
            read = {k: np.zeros_like(v) for k, v in self.params.items()}
            for grads in examples:  # one "backward" per example, accumulated as autograd would
                for k in acc:
                    acc[k] += grads[k]
                    if unzeroed:
                        read[k] += acc[k]
            return read if unzeroed else acc

        if method == "none_loop":
            losses, per_ex = self._losses_and_grads(x, y, "none", per_example=True, masks=masks)
            return RawResult(float(losses.sum()), loop({k: v[i] for k, v in per_ex.items()} for i in range(n)))
        if method == "none_vectorized":
            if train_mode:  # vmap runs one forward pass per example
                singles = self._singles(x, y, range(n))
                return RawResult(sum(float(loss) for loss, _ in singles),
                                 {k: sum(g[k] for _, g in singles) for k in self.params})
            losses, per_ex = self._losses_and_grads(x, y, "none", per_example=True)
            return RawResult(float(losses.sum()), {k: v.sum(axis=0) for k, v in per_ex.items()})
        if method in ("sum", "mean"):
            loss, grads = self._losses_and_grads(x, y, method, masks=masks)
            return RawResult(float(loss), grads)
        if method == "one_by_one":
            singles = self._singles(x, y, self.job.fed_alone(case))
            return RawResult(sum(float(loss) for loss, _ in singles), loop(g for _, g in singles))
        raise ValueError(f"unknown method {method!r}")


class BuiltinSession(NumpySession):
    """The reference for the built-in CNN and sequence models (``models.py``, differentiated by hand).

    Their examples are independent (no batch statistics, no switches), so every method is the batch's
    gradient organized as that method is: one sum, per-example gradients accumulated, or per-example
    means (each example's mean over its T tokens) accumulated.
    """

    def __init__(self, job: WorkerJob):
        if job.loss["name"] != "cross_entropy":
            raise ValueError(f"numpy reference has no loss {job.loss['name']!r}")
        self.job = job
        self.params = {k: v.astype(np.float64) for k, v in job.params.items()}
        x = job.batch["x"]
        self.x = x.astype(np.float64) if x.dtype.kind == "f" else x.astype(np.int64)
        self.y = job.batch["y"].astype(np.int64)
        self.terms = int(np.prod(self.y.shape[1:]))  # loss terms per example: T tokens, or 1

    def environment(self) -> dict:
        from gradparity.experiment.models import LayerOptions

        # The reference computes the requested settings, whatever model.defaults says.
        return dict(super().environment(),
                    layer_options=LayerOptions.from_dict(self.job.model.get("options")).resolved(None))

    def compute(self, method: str) -> RawResult:
        from gradparity.backends.numpy import models  # it builds on this module's MLP pieces

        n = len(self.y)
        if method == "sum":
            loss, grads = models.loss_and_grads(self.params, self.x, self.y, self.job.model)
            return RawResult(float(loss), grads)
        if method == "mean":
            loss, grads = models.loss_and_grads(self.params, self.x, self.y, self.job.model)
            m = n * self.terms
            return RawResult(float(loss) / m, {k: g / m for k, g in grads.items()})
        if method in ("none_loop", "one_by_one"):
            losses, per_ex = models.per_example(self.params, self.x, self.y, self.job.model)
            scale = 1.0 if method == "none_loop" else 1.0 / self.terms  # one_by_one: each example's mean
            acc = {k: np.zeros_like(v) for k, v in self.params.items()}
            for i in range(n):  # accumulated one example after another, as autograd's .grad would
                for k in acc:
                    acc[k] += per_ex[k][i] * scale
            return RawResult(float(losses.sum()) * scale, acc)
        raise ValueError(f"the numpy reference runs {method!r} for the MLP only")


def open_session(job: WorkerJob) -> NumpySession:
    """Open the reference session; it runs on the CPU whatever device was asked for."""
    if job.model.get("kind", "mlp") != "mlp":
        return BuiltinSession(job)
    return NumpySession(job)
