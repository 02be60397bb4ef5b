"""PyTorch training runs (task "train"): the built-in MLP trained natively, parameters recorded every step.

Contract (shared by ``backends/{torch,keras,jax}/train.py``): ``open_session(job)`` returns a session whose
``compute(case)`` runs ``job.payload["runs"][case]`` = ``{"optimizer": OptimizerConfig dict, "lrs": [lr at
step 1..K], "reduction": "mean" | "sum"}`` (a run with ``"weights": true``: "sum" | "weighted_mean" |
"sum_over_batch_size" of the per-example weights ``…/batches/t/w``, see ``protocol.TRAIN_REDUCTIONS``) from
scratch: a fresh model holding the canonical ``job.params`` and a fresh optimizer, then for t = 1..K the
cross-entropy of batch t (``job.batch["batches/t/x"]``, ``["batches/t/y"]``; the last batch of an epoch may be
short) reduced over the batch, its gradient, and one optimizer step at ``lrs[t-1]``. It returns
``RawResult(loss=loss_K, grads={"t/NAME": parameters after step t (canonical layout, job dtype)} |
{"loss/t": loss_t}, info={"optimizer": ..., "loop": ...})``.

Here that is the textbook loop: ``nn.CrossEntropyLoss(reduction=...)``, ``optimizer.zero_grad();
loss.backward(); optimizer.step()``; with weights, ``nn.CrossEntropyLoss(reduction="none")`` times w, summed, and
divided by ``w.sum()`` ("weighted_mean", what ``nn.CrossEntropyLoss(weight=class_weights)`` divides by) or by
N ("sum_over_batch_size"), with the model, its canonical<->torch mapping, the device and the
precision pinning of ``session.py`` and the optimizer class and learning-rate feeding
(``param_groups[0]["lr"]`` before each step) of ``optimizers.py``. Imported only inside a worker process.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gradparity.backends.protocol import RawResult, WorkerJob, train_batches, train_result, train_run, train_weights
from gradparity.backends.torch.optimizers import TORCH_DTYPES, build_optimizer, environment_note
from gradparity.backends.torch.session import (torch_name, build_model, mlp_environment, pick_device,
                                               pin_highest_precision, to_canonical)

LOOP = ("optimizer.zero_grad(); loss = nn.CrossEntropyLoss(reduction=REDUCTION)(model(x_t), y_t); "
        "loss.backward(); optimizer.param_groups[0]['lr'] = lrs[t]; optimizer.step()")
WEIGHTED_LOOP = ("optimizer.zero_grad(); l = nn.CrossEntropyLoss(reduction='none')(model(x_t), y_t); "
                 "loss = (l * w_t).sum() [/ w_t.sum() | / len(y_t)]; loss.backward(); "
                 "optimizer.param_groups[0]['lr'] = lrs[t]; optimizer.step()")


def weighted_loss(reduction: str):
    """``loss_fn(logits, y, w)`` of a weighted run: the per-example cross-entropy times w, summed, then divided
    by nothing ("sum"), by sum(w) ("weighted_mean") or by the batch's size ("sum_over_batch_size")."""
    per_example = nn.CrossEntropyLoss(reduction="none")
    divide = {"sum": lambda w: 1, "weighted_mean": lambda w: w.sum(), "sum_over_batch_size": lambda w: w.shape[0]}
    divisor = divide[reduction]
    return lambda logits, y, w: (per_example(logits, y) * w).sum() / divisor(w)


class TorchTrainSession:
    """The batches on the device; each ``compute(case)`` builds a fresh model and optimizer and trains."""

    def __init__(self, job: WorkerJob):
        if job.model.get("kind") != "mlp" or job.batchnorm_epsilon is not None:
            raise ValueError("torch training runs take the built-in MLP without batch normalization")
        if any(job.switches.values()):
            raise ValueError(f"torch training runs take no discrepancy switches (got {job.switches})")
        self.job = job
        self.device, self.device_note = pick_device(job.device)
        if job.precision == "highest":
            pin_highest_precision()
        self.dtype = TORCH_DTYPES[job.dtype]
        self._batches: dict[str, list] = {}
        self._weights: dict[str, list] = {}
        # Converted once here: a timed compute() is the loop alone.
        self._run_weights = {case: self.weights(case) for case in job.payload["runs"]}

    def batches(self, run: dict) -> list:
        """The run's batches as tensors on the device (converted on first use, then reused)."""
        prefix = run.get("batches", "")
        if prefix not in self._batches:
            self._batches[prefix] = [(torch.from_numpy(np.asarray(x)).to(self.device, self.dtype),
                                      torch.from_numpy(np.asarray(y)).to(self.device, torch.int64))
                                     for x, y in train_batches(self.job, prefix)]
        return self._batches[prefix]

    def weights(self, case: str) -> list | None:
        """The case's per-example weights per step as tensors on the device (converted once per batch sequence),
        or None (unweighted); its batches converted too."""
        run = self.job.payload["runs"][case]
        steps = len(self.batches(run))
        weights = train_weights(self.job, case, steps)
        if weights is None:
            return None
        prefix = run.get("batches", "")
        if prefix not in self._weights:
            self._weights[prefix] = [torch.from_numpy(np.asarray(w)).to(self.device, self.dtype) for w in weights]
        return self._weights[prefix]

    def environment(self) -> dict:
        # A throwaway model: the environment reads the dtype the parameters really have.
        return mlp_environment(self.job, build_model(self.job, self.dtype, self.device), self.device,
                               self.device_note)

    def compute(self, case: str) -> RawResult:
        """Train for K steps from the canonical start; the parameters after every step and every step's loss."""
        run = self.job.payload["runs"][case]
        batches = self.batches(run)
        config, lrs, reduction, record = train_run(self.job, case, len(batches))
        weights = self._run_weights[case]
        model = build_model(self.job, self.dtype, self.device)
        optimizer = build_optimizer(config, list(model.parameters()))
        (group,) = optimizer.param_groups
        plain = nn.CrossEntropyLoss(reduction=reduction) if weights is None else None
        weighted = weighted_loss(reduction) if weights is not None else None
        named = dict(model.named_parameters())
        losses, snapshots = [], []
        for t, ((x, y), lr) in enumerate(zip(batches, lrs), start=1):
            optimizer.zero_grad()  # set_to_none: nothing of the previous step reaches this gradient
            loss = plain(model(x), y) if weights is None else weighted(model(x), y, weights[t - 1])
            loss.backward()
            # As optimizers.run_steps feeds it (what an lr_scheduler does): step() reads group["lr"] afresh.
            group["lr"] = float(lr)
            optimizer.step()
            # Device-side copies (step() updates in place); read back after the loop, so no host sync per step.
            losses.append(loss.detach())
            if t in record:
                snapshots.append((t, {name: named[torch_name(name)].detach().clone() for name in self.job.params}))
        arrays = {f"{t}/{name}": np.array(to_canonical(name, value), copy=True)
                  for t, snap in snapshots for name, value in snap.items()}
        return train_result(self.job, arrays, [float(v) for v in torch.stack(losses).cpu().numpy()],
                            {"optimizer": environment_note(config), "loop": LOOP if weights is None else WEIGHTED_LOOP})


def open_session(job: WorkerJob) -> TorchTrainSession:
    """The worker's entry for task "train": pick the device, pin precision, convert the batches."""
    return TorchTrainSession(job)
