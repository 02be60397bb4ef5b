"""JAX training runs (tasks "train": a built-in model, payload "builtin"; "model_train": a user's factory): the
model of ``session.py`` trained with optax, parameters recorded every step.

Contract (shared by ``backends/{torch,keras,jax}/train.py``, see ``protocol.ModelTraining``): ``open_session(job)``
returns a session whose ``compute(case)`` runs ``job.payload["runs"][case]`` = ``{"optimizer": OptimizerConfig
dict, "lrs": [lr at step 1..K], "reduction": "mean" | "sum"}`` (a run with ``"weights": true``: "sum" |
"weighted_mean" | "sum_over_batch_size" of the per-example weights ``…/batches/t/w``, see
``protocol.TRAIN_REDUCTIONS``) from scratch: fresh parameters from the canonical ``job.params`` and a fresh
optimizer state, then for t = 1..K the loss of batch t (``job.batch["batches/t/x"]``, ``["batches/t/y"]``; the
last batch of an epoch may be short) reduced over the batch, its gradient, and one optimizer step at
``lrs[t-1]``. It returns ``RawResult(loss=loss_K, grads={"t/NAME": trainable parameters after step t
(canonical layout, job dtype)} | {"loss/t": loss_t}, info={"optimizer": ..., "loop": ...})``.

Here that is the functional NNX/optax idiom: the session's split module (``graphdef``, ``params``), a loss
``jnp.mean | jnp.sum(optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, params, ...)(x), y))``
(optax has no reduction of its own; mean over every loss term, N*T for a sequence's tokens), and one
``jax.jit``-compiled step ``jax.value_and_grad`` -> ``opt.update`` -> ``optax.apply_updates``, with the optax
transformation of ``optimizers.py`` and its learning-rate schedule ``count -> lrs[count]`` (the table an
argument of the step). With weights the per-term losses are multiplied by w (broadcast over an example's T
terms) and summed, then divided by ``T * jnp.sum(w)`` ("weighted_mean") or by the N*T terms
("sum_over_batch_size"). The step is compiled once per optimizer (lr aside), reduction and batch shape (a short
last batch is a second trace; the worker's warm-up call pays them), so runs differing only in their learning
rates (a sweep's grid) share it; every call starts from the session's (immutable) parameters and ``opt.init``.

Imported only inside a worker process. Read at import by jax: ``JAX_ENABLE_X64`` (float64 jobs need it).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradparity.backends.jax.optimizers import build_transformation, environment_note
from gradparity.backends.jax.session import ModelSession
from gradparity.backends.protocol import ModelTraining, RawResult, WorkerJob, train_result

_LOOP = ("jax.jit(step): loss, grads = jax.value_and_grad(loss_fn)(params, x_t, y_t{w}); "
         "updates, opt_state = opt.update(grads, opt_state, params); params = optax.apply_updates(params, updates) "
         "[loss_fn: {loss}]")
_TERMS = {"cross_entropy": "optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, params)(x), y)",
          "mse": "optax.squared_error(nnx.merge(graphdef, params)(x), y)"}
_REDUCTIONS = {  # (weighted, reduction) -> what loss_fn does with the loss terms l (and the weights w)
    (False, "mean"): "jnp.mean(l)", (False, "sum"): "jnp.sum(l)",
    (True, "sum"): "jnp.sum(l * w)", (True, "weighted_mean"): "jnp.sum(l * w) / jnp.sum(w)",
    (True, "sum_over_batch_size"): "jnp.sum(l * w) / l.size",
}


def loop_text(loss: str, weighted: bool, reduction: str, terms: int) -> str:
    """What a run's training loop ran (the report's "loop"); ``terms``: loss terms per weight (T tokens per
    example, 1 for a class label or a weight per term)."""
    text = _REDUCTIONS[weighted, reduction]
    if weighted and terms > 1:
        text = (text.replace("/ jnp.sum(w)", "/ (T * jnp.sum(w))")
                + f"; T = {terms}: w broadcast over an example's T terms")
    return _LOOP.format(w=", w_t" if weighted else "", loss=f"l = {_TERMS[loss]}; {text}")


class ModelTrainer(ModelTraining):
    """The module of ``session.ModelSession`` trained with optax (one jitted step: ``jax.value_and_grad`` of the
    reduced loss, ``opt.update``, ``optax.apply_updates``).

    Opened on batch 1; every batch and every weight on the device once. Each ``compute(case)`` starts from the
    session's canonical parameters with a fresh optimizer state and returns the canonical trainable values after
    the recorded steps ("T/KEY") and every step's loss ("loss/T").
    """

    def __init__(self, job: WorkerJob):
        self._steps: dict[tuple, tuple] = {}
        self._tables: dict[str, object] = {}
        super().__init__(job, ModelSession)

    def convert(self, x, y):
        """(x, y) on the device, as the session converts its batch."""
        return self.model.convert(x, y)

    def convert_weights(self, w):
        """Per-example weights (N,) on the device in the job's dtype."""
        return jax.device_put(np.asarray(w, dtype=self.model.dtype), self.model.device)

    def _compiled(self, config: dict, reduction: str):
        """(jitted opt.init, jitted step) for an optimizer config (its lr aside) and a reduction, built on first
        use. The step takes the run's learning rates as an argument: ``schedule(count) = table[count]``, as
        ``optimizers.lr_schedule`` reads its table, but traced rather than baked in, so that runs differing only
        in their learning rates (a sweep's grid) share one compilation per batch shape (and weighting: ``w`` is
        None, an empty pytree, for an unweighted run)."""
        key = (json.dumps({k: v for k, v in config.items() if k != "lr"}, sort_keys=True), reduction)
        if key not in self._steps:
            m = self.model

            def reduce(terms, w):
                if w is None:
                    return jnp.mean(terms) if reduction == "mean" else jnp.sum(terms)
                # Per example (N,): broadcast over an example's terms; or already one per term (the targets' shape).
                per_term = w if w.ndim == terms.ndim else w.reshape(w.shape + (1,) * (terms.ndim - 1))
                total = jnp.sum(terms * per_term)
                if reduction == "weighted_mean":
                    t = terms.size // w.size  # T terms per weight: the divisor is T * sum(w), sum(w) per term
                    return total / (jnp.sum(w) if t == 1 else t * jnp.sum(w))
                if reduction == "sum_over_batch_size":
                    return total / terms.size
                return total

            def loss_fn(params, x, y, w):
                return reduce(m.terms(m.apply(params, x), y), w)

            def step(params, opt_state, x, y, w, table):
                opt = build_transformation(config, lambda count: table[count])
                loss, grads = jax.value_and_grad(loss_fn)(params, x, y, w)
                updates, opt_state = opt.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            # The state's structure does not depend on the schedule's values. opt.init jitted too, so its zero
            # moments and count land on the parameters' device.
            init = build_transformation(config, lambda count: jnp.zeros((), m.dtype)).init
            self._steps[key] = (jax.jit(init), jax.jit(step))
        return self._steps[key]

    def predict(self, x, state=None) -> np.ndarray:
        """The module's output on ``x`` with the parameters ``state`` (the session's when None), jitted once."""
        if not hasattr(self, "_apply"):
            self._apply = jax.jit(self.model.apply)
        return np.asarray(self._apply(self.model.params if state is None else state, x))

    def table(self, case: str, lrs: list[float]):
        """The case's learning rates on the device in the job's dtype (the schedule's table), once per case."""
        if case not in self._tables:
            self._tables[case] = jax.device_put(np.asarray(lrs, dtype=self.job.dtype), self.model.device)
        return self._tables[case]

    def compute(self, case: str) -> RawResult:
        """Train for K steps from the canonical start; the parameters after every recorded step and every step's
        loss."""
        m = self.model
        batches, config, lrs, reduction, record = self.settings(case)
        weights = self.weights(case)
        init, step = self._compiled(config, reduction)
        table = self.table(case, lrs)
        params = m.params
        opt_state = init(params)
        history, losses, accuracy = [], [], {}
        for t, ((x, y), w) in enumerate(zip(batches, weights or [None] * len(batches)), start=1):
            params, opt_state, loss = step(params, opt_state, x, y, w, table)
            # Arrays are immutable: keeping each step's params is free, read back once after the loop.
            if t in record:
                history.append((t, params))
                if self.held is not None:
                    accuracy[t] = self.held_out_accuracy(params)
            losses.append(loss)
        arrays = {f"{t}/{key}": np.array(value, copy=True) for t, p in history for key, value in m.canonical(p).items()}
        y, w = batches[0][1], (weights or [None])[0]
        terms = 1 if w is None or w.ndim == y.ndim else int(np.prod(y.shape[w.ndim:]))
        return train_result(self.job, arrays, [float(v) for v in losses],
                            {"optimizer": environment_note(config),
                             "loop": loop_text(m.loss_name, weights is not None, reduction, terms)}, accuracy)


def open_session(job: WorkerJob) -> ModelTrainer:
    """Tasks "train" and "model_train": check x64, pick the device, pin precision, build the model (built-in or
    the user's factory) on batch 1, every run's batches and weights on the device."""
    return ModelTrainer(job)
