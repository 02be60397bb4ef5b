"""PyTorch: the one trainer (tasks "train" and "model_train"): a model trained natively, parameters recorded.

Contract (shared by ``backends/{torch,keras,jax}/train.py``, see ``protocol.ModelTraining``): ``open_session(job)``
returns a session whose ``compute(case)`` runs ``job.payload["runs"][case]`` = ``{"optimizer": OptimizerConfig
dict, "lrs": [lr at step 1..K], "reduction": "mean" | "sum"}`` (a run with ``"weights": true``: "sum" |
"weighted_mean" | "sum_over_batch_size" of the per-example weights ``…/batches/t/w``, see
``protocol.TRAIN_REDUCTIONS``) from scratch: the model holding the canonical ``job.params`` again and a fresh
optimizer, then for t = 1..K the loss of batch t (``job.batch["batches/t/x"]``, ``["batches/t/y"]``; the last
batch of an epoch may be short) reduced over the batch, its gradient, and one optimizer step at ``lrs[t-1]``. It
returns ``RawResult(loss=loss_K, grads={"t/NAME": parameters after step t (canonical layout, job dtype)} |
{"loss/t": loss_t}, info={"optimizer": ..., "loop": ...})``.

The model is the model session's (``session.py``): a built-in model (payload "builtin": the MLP, the CNN, the
sequence model) or a user's factory with its mapping, on the session's device and dtype. Here the loop is the
textbook one: ``optimizer.zero_grad(); loss.backward(); optimizer.step()`` with ``F.cross_entropy(reduction=...)``
(the mean over every loss term: N·T for token targets); with weights, ``reduction="none"`` times w (broadcast
over an example's T terms), summed, and divided by nothing ("sum"), by T·sum(w) ("weighted_mean", what
``nn.CrossEntropyLoss(weight=class_weights)`` divides by) or by N·T ("sum_over_batch_size"). The optimizer class
and the learning-rate feeding (``param_groups[0]["lr"]`` before each step) are ``optimizers.py``'s. Imported only
inside a worker process.
"""
from __future__ import annotations

import numpy as np
import torch

from gradparity.backends.protocol import ModelTraining, RawResult, WorkerJob, train_result
from gradparity.backends.torch.optimizers import build_optimizer, environment_note
from gradparity.backends.torch.session import ModelSession, to_canonical

LOOP = ("optimizer.zero_grad(); loss = F.cross_entropy(model(x_t).reshape(-1, C), y_t.reshape(-1), "
        "reduction=REDUCTION); loss.backward(); optimizer.param_groups[0]['lr'] = lrs[t]; optimizer.step()")
WEIGHTED_LOOP = ("optimizer.zero_grad(); l = F.cross_entropy(model(x_t).reshape(-1, C), y_t.reshape(-1), "
                 "reduction='none').reshape(y_t.shape); loss = (l * w_t[:, None]).sum() [/ (T * w_t.sum()) | "
                 "/ y_t.numel()]; loss.backward(); optimizer.param_groups[0]['lr'] = lrs[t]; optimizer.step()")


def weighted_loss(session: ModelSession, reduction: str):
    """``loss_fn(out, y, w)`` of a weighted run: the per-example loss terms times w (broadcast over an example's
    terms), summed, then divided by nothing ("sum"), by T·sum(w) ("weighted_mean") or by N·T
    ("sum_over_batch_size"), T the loss terms per example (1 for a class label)."""
    divide = {"sum": lambda w, terms: 1, "weighted_mean": lambda w, terms: w.sum() * terms,
              "sum_over_batch_size": lambda w, terms: w.shape[0] * terms}[reduction]

    def loss_fn(out, y, w):
        losses = session.loss(out, y, "none")
        terms = losses.numel() // w.shape[0]
        return (losses * w.reshape(w.shape + (1,) * (losses.ndim - 1))).sum() / divide(w, terms)

    return loss_fn


class TorchTraining(ModelTraining):
    """The model session's module trained with torch's own optimizer: every batch and weight converted once (a
    timed ``compute`` is the loop alone); each ``compute(case)`` loads the canonical start again and builds a
    fresh optimizer over the mapped trainable parameters (in ``model.parameters()`` order)."""

    def __init__(self, job: WorkerJob):
        super().__init__(job, ModelSession)

    def convert(self, x, y):
        """(x, y) as tensors on the device: images channels-first, targets int64 (the job's dtype for mse)."""
        return self.model.convert(np.asarray(x), np.asarray(y))

    def convert_weights(self, w):
        m = self.model
        return torch.from_numpy(np.asarray(w)).to(m.device, m.dtype)

    def predict(self, x, state=None) -> np.ndarray:
        """The model's output on ``x`` under ``torch.no_grad`` (the model holds the weights: ``state`` unused)."""
        with torch.no_grad():
            return self.model.forward(x).cpu().numpy()

    def compute(self, case: str) -> RawResult:
        """Train for K steps from the canonical start; the parameters after every recorded step and every step's
        loss."""
        m = self.model
        batches, config, lrs, reduction, record = self.settings(case)
        weights = self.weights(case)
        m._load(m.assign)  # from scratch: the canonical start again
        trainable = m.trainable()
        optimizer = build_optimizer(config, [tensor for *_, tensor in trainable])
        (group,) = optimizer.param_groups
        weighted = None if weights is None else weighted_loss(m, reduction)
        losses, snapshots, accuracy = [], [], {}
        for t, ((x, y), lr) in enumerate(zip(batches, lrs), start=1):
            optimizer.zero_grad()  # set_to_none: nothing of the previous step reaches this gradient
            out = m.model(x)
            loss = m.loss(out, y, reduction) if weights is None else weighted(out, y, weights[t - 1])
            loss.backward()
            # As optimizers.run_steps feeds it (what an lr_scheduler does): step() reads group["lr"] afresh.
            group["lr"] = float(lr)
            optimizer.step()
            # Device-side copies (step() updates in place); read back after the loop, so no host sync per step.
            losses.append(loss.detach())
            if t in record:
                snapshots.append((t, [(key, module, pname, tensor.detach().clone())
                                      for key, module, pname, tensor in trainable]))
                if self.held is not None:
                    accuracy[t] = self.held_out_accuracy()
        arrays = {f"{t}/{key}": np.array(to_canonical(module, pname, value.cpu().numpy()), copy=True)
                  for t, snap in snapshots for key, module, pname, value in snap}
        return train_result(self.job, arrays, [float(v) for v in torch.stack(losses).cpu().numpy()],
                            {"optimizer": environment_note(config), "loop": LOOP if weights is None else WEIGHTED_LOOP},
                            accuracy)


def open_session(job: WorkerJob) -> TorchTraining:
    """The worker's entry for tasks "train" and "model_train": pick the device, pin precision, build the model,
    convert the batches and weights."""
    if job.task not in ("train", "model_train"):
        raise ValueError(f"the torch trainer runs 'train' and 'model_train' jobs, got task {job.task!r}")
    return TorchTraining(job)
