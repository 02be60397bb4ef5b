"""numpy reference backend: the MLP differentiated by hand, always in float64.

It is the yardstick the framework backends are compared with, so it
follows the textbook derivation literally and is itself tested against
central finite differences. Inputs arrive in the experiment's dtype (so a
float32 run compares against the very same float32-rounded numbers) and are
promoted to float64 before any arithmetic.
"""
from __future__ import annotations

import numpy as np

from gradparity.backends.protocol import CaseInputs, RawResult, WorkerJob

_ACTIVATIONS = {
    # name: (f(z), f'(z) expressed through z and a = f(z))
    "relu": (lambda z: np.maximum(z, 0.0), lambda z, a: (z > 0).astype(np.float64)),
    "tanh": (np.tanh, lambda z, a: 1.0 - a * a),
    "sigmoid": (lambda z: 1.0 / (1.0 + np.exp(-z)), lambda z, a: a * (1.0 - a)),
    "identity": (lambda z: z, lambda z, a: np.ones_like(z)),
}


def forward(params, x, num_layers, activation):
    """Return (pre-activations z_l, activations a_l) per layer; a_0 = x, the last z is the logits."""
    act, _ = _ACTIVATIONS[activation]
    zs, acts = [], [x]
    for i in range(num_layers):
        z = acts[-1] @ params[f"layers.{i}.kernel"] + params[f"layers.{i}.bias"]
        zs.append(z)
        acts.append(act(z) if i < num_layers - 1 else z)
    return zs, acts


def cross_entropy(logits, y):
    """Per-example softmax cross-entropy and its gradient w.r.t. the logits (softmax - onehot)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(shifted).sum(axis=1))
    rows = np.arange(len(y))
    losses = logsumexp - shifted[rows, y]
    dlogits = np.exp(shifted - logsumexp[:, None])
    dlogits[rows, y] -= 1.0
    return losses, dlogits


def backward(params, zs, acts, dlogits, num_layers, activation, per_example):
    """Backpropagate ``dlogits`` (d loss / d logits, one row per example).

    With ``per_example`` the kernels' gradients keep the example axis
    (N, in, out) — the per-example outer products — else they are summed.
    """
    _, dact = _ACTIVATIONS[activation]
    grads = {}
    delta = dlogits
    for i in reversed(range(num_layers)):
        if per_example:
            grads[f"layers.{i}.kernel"] = np.einsum("ni,no->nio", acts[i], delta)
            grads[f"layers.{i}.bias"] = delta.copy()
        else:
            grads[f"layers.{i}.kernel"] = acts[i].T @ delta
            grads[f"layers.{i}.bias"] = delta.sum(axis=0)
        if i > 0:
            delta = (delta @ params[f"layers.{i}.kernel"].T) * dact(zs[i - 1], acts[i])
    return grads


def term_scale(params, x, y, model: dict) -> dict[str, float]:
    """Per tensor, the largest entry of mean_i |grad l_i|: the size of the terms the batch gradient sums.

    Rounding error in a sum is proportional to the sum of the terms' magnitudes,
    not to the result; where per-example gradients cancel (near an optimum, or a
    bias whose terms change sign), this is far larger than the gradient itself.
    """
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    num_layers = len(model["sizes"]) - 1
    zs, acts = forward(params, np.asarray(x, dtype=np.float64), num_layers, model["activation"])
    _, dlogits = cross_entropy(zs[-1], np.asarray(y))
    per_ex = backward(params, zs, acts, dlogits, num_layers, model["activation"], per_example=True)
    return {k: float(np.max(np.mean(np.abs(g), axis=0))) if g.size else 0.0 for k, g in per_ex.items()}


class NumpySession:
    """The reference session: every method is the same mathematics, organized as that method is."""

    def __init__(self, job: WorkerJob):
        if job.loss["name"] != "cross_entropy":
            raise ValueError(f"numpy reference has no loss {job.loss['name']!r}")
        self.job = job
        self.params = {k: v.astype(np.float64) for k, v in job.params.items()}
        self.x = job.batch["x"].astype(np.float64)
        self.y = job.batch["y"].astype(np.int64)
        self._inputs = CaseInputs(job, (self.x, self.y), lambda x, y: (x.astype(np.float64), y.astype(np.int64)))
        self.num_layers = len(job.model["sizes"]) - 1
        self.activation = job.model["activation"]

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

    def _losses_and_grads(self, x, y, reduction: str, per_example: bool = False):
        zs, acts = forward(self.params, x, self.num_layers, self.activation)
        losses, dlogits = cross_entropy(zs[-1], y)
        if self.job.class_weights is not None:
            # The switch 'class_weights': w[y_i] l_i; the mean below still divides by N.
            w = self.job.class_weights[y]
            losses, dlogits = losses * w, dlogits * w[:, None]
        if reduction == "mean":
            dlogits = dlogits / len(y)
            loss = losses.mean()
        elif reduction == "sum":
            loss = losses.sum()
        else:  # "none": per-example losses, per-example gradients
            loss = losses
        grads = backward(self.params, zs, acts, dlogits, self.num_layers, self.activation, per_example)
        return loss, grads

    def compute(self, method: str) -> RawResult:
        """Run ``method`` ('METHOD' or 'METHOD@PART'); per-example loops honour 'unzeroed_gradients'
        (the accumulator, holding examples 0..i, is read and added up after every example)."""
        method, x, y = self._inputs(method)
        n = len(y)
        unzeroed = self.job.unzeroed

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
            losses, per_ex = self._losses_and_grads(x, y, "none", per_example=True)
            return RawResult(float(losses.sum()), loop({k: v[i] for k, v in per_ex.items()} for i in range(n)))
        if method == "none_vectorized":
            losses, per_ex = self._losses_and_grads(x, y, "none", per_example=True)
            return RawResult(float(losses.sum()), {k: v.sum(axis=0) for k, v in per_ex.items()})
        if method in ("sum", "mean"):
            loss, grads = self._losses_and_grads(x, y, method)
            return RawResult(float(loss), grads)
        if method == "one_by_one":
            singles = [self._losses_and_grads(x[i:i + 1], y[i:i + 1], "mean") for i in range(n)]
            return RawResult(sum(float(loss) for loss, _ in singles), loop(g for _, g in singles))
        raise ValueError(f"unknown method {method!r}")


def open_session(job: WorkerJob) -> NumpySession:
    """Open the reference session; it runs on the CPU whatever device was asked for."""
    return NumpySession(job)
