"""numpy reference backend: the worker side of the float64 reference (``gradparity.reference``).

Each reduction method is the reference's mathematics (``gradparity.reference.mlp`` for the MLP,
``gradparity.reference.models`` for the built-in CNN and sequence models), organized as that method is.
Inputs arrive in the experiment's dtype (so a float32 run compares against the very same float32-rounded
numbers) and are promoted to float64 before any arithmetic.
"""
from __future__ import annotations

import numpy as np

from gradparity.backends.protocol import IGNORE_INDEX, CaseInputs, RawResult, WorkerJob
from gradparity.reference import models
from gradparity.reference.mlp import backward, cross_entropy, forward


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
    """The reference for the built-in CNN and sequence models (``gradparity.reference.models``, by hand).

    Their examples are independent (no batch statistics; the switches 'dropout' and 'batchnorm' act on the
    MLP only), so every method is the batch's gradient organized as that method is: one sum, per-example
    gradients accumulated (read after every example with 'unzeroed_gradients'), or per-example means (each
    example's mean over its T valid tokens) accumulated. 'class_weights' multiplies term j of example i by
    w[y_ij] and the mean still divides by the number of (valid) terms; padding targets (``IGNORE_INDEX``)
    contribute nothing and are not counted.
    """

    def __init__(self, job: WorkerJob):
        if job.loss["name"] != "cross_entropy":
            raise ValueError(f"numpy reference has no loss {job.loss['name']!r}")
        self.job = job
        self.params = {k: v.astype(np.float64) for k, v in job.params.items()}

        def convert(x, y):
            return (x.astype(np.float64) if x.dtype.kind == "f" else x.astype(np.int64)), y.astype(np.int64)

        self.x, self.y = convert(job.batch["x"], job.targets())
        self._inputs = CaseInputs(job, (self.x, self.y), convert)

    def environment(self) -> dict:
        from gradparity.experiment.models import LayerOptions

        # The reference computes the requested settings, whatever model.defaults says.
        return dict(super().environment(),
                    layer_options=LayerOptions.from_dict(self.job.model.get("options")).resolved(None))

    def _weights(self, y):
        """Per-term weights w[y] of the switch 'class_weights' (0 where a target is padding), or None."""
        w = self.job.class_weights
        return None if w is None else np.where(y != IGNORE_INDEX, w[np.where(y != IGNORE_INDEX, y, 0)], 0.0)

    def compute(self, method: str) -> RawResult:
        case = method
        method, x, y = self._inputs(case)
        w = self._weights(y)
        valid = (y != IGNORE_INDEX).reshape(len(y), -1).sum(axis=1)  # valid terms per example
        if method in ("sum", "mean"):
            loss, grads = models.loss_and_grads(self.params, x, y, self.job.model, weights=w)
            m = int(valid.sum()) if method == "mean" else 1
            return RawResult(float(loss) / m, {k: g / m for k, g in grads.items()})
        if method in ("none_loop", "none_vectorized", "one_by_one"):
            rows = self.job.fed_alone(case) if method == "one_by_one" else range(len(y))
            losses, per_ex = models.per_example(self.params, x[rows], y[rows], self.job.model,
                                                weights=None if w is None else w[rows])
            # one_by_one: each example's own mean over its valid tokens (its batch of one).
            scale = 1.0 / valid[rows] if method == "one_by_one" else np.ones(len(rows))
            unzeroed = self.job.unzeroed and method != "none_vectorized"  # one vectorized call: no loop to read
            acc = {k: np.zeros_like(v) for k, v in self.params.items()}
            read = {k: np.zeros_like(v) for k, v in self.params.items()}
            for i in range(len(rows)):  # accumulated one example after another, as autograd's .grad would
                for k in acc:
                    acc[k] += per_ex[k][i] * scale[i]
                    if unzeroed:
                        read[k] += acc[k]
            return RawResult(float(np.sum(losses * scale)), read if unzeroed else acc)
        raise ValueError(f"unknown method {method!r}")


def open_session(job: WorkerJob) -> NumpySession:
    """Open the reference session; it runs on the CPU whatever device was asked for."""
    if job.model.get("kind", "mlp") != "mlp":
        return BuiltinSession(job)
    return NumpySession(job)
