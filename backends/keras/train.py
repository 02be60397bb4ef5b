"""Keras 3 training trajectories (task "train", issue 9): the session's MLP trained with Keras' own optimizer.

Contract (shared by ``backends/{torch,keras,jax}/train.py``)::

    open_session(job) -> session with environment() and compute(case)

``job.params`` are the canonical initial parameters, ``job.batch`` holds
``batches/{t}/x`` (B, features) and ``batches/{t}/y`` (B,) for t = 1..K (the
last batch of an epoch may be short), and ``job.payload["runs"][case]`` is
``{"optimizer": OptimizerConfig dict, "lrs": [lr at step 1..K], "reduction":
"mean" | "sum"}``; a run with ``"weights": true`` reduces by "sum" |
"weighted_mean" | "sum_over_batch_size" with the per-example weights
``batches/{t}/w`` (``protocol.TRAIN_REDUCTIONS``). ``compute(case)``
starts from scratch (the model's variables reset to ``job.params``, a new
optimizer) and, for t = 1..K, takes ``loss_t``, the reduced cross-entropy of
batch t at the current parameters, its gradient, and one optimizer step at
``lrs[t-1]``. It returns ``RawResult(loss_K, {"{t}/{name}": parameters after
step t (canonical layout, job dtype), "loss/{t}": loss_t}, info)``.

Everything but the loop is reused, not rewritten: ``KerasSession`` (device,
precision, the functional ``keras.Model``, canonical <-> Keras names, the
``SparseCategoricalCrossentropy(from_logits=True)`` loss objects, each Keras
backend's autodiff, ``environment()``) and ``backends/keras/optimizers.py``
(the optimizer class and the per-step learning rate as a
``LearningRateSchedule`` of ``optimizer.iterations``). One step is the
variant's own single-backward gradient, exactly what the session's ``mean`` /
``sum`` methods compute (tf.GradientTape in a tf.function; jax.jit of
jax.value_and_grad over ``model.stateless_call``; torch ``loss.backward()``),
then ``optimizer.apply(grads, model.trainable_variables)``, eagerly. A weighted
run calls the loss object as Keras users do, ``loss(y, logits,
sample_weight=w)``, with Keras' own reduction names: "sum",
"mean_with_sample_weight" (divides by the sum of the weights) and
"sum_over_batch_size" (divides by the batch's size, whatever the weights). A
short batch is a second trace of the tf.function / jitted gradient.

As in the gradient task, float64 is not float64 throughout on Keras' jax and
torch backends (see ``session.py``: its type promotion demotes some ops to
float32, e.g. torch ``matmul`` and the "sum_over_batch_size" division);
``environment()`` reports the narrowest dtype any op computed in.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np

from gradparity.backends.keras.optimizers import build_optimizer, StepTable, environment_note
from gradparity.backends.keras.session import _REDUCTIONS, KerasSession
from gradparity.backends.protocol import RawResult, WorkerJob, train_batches, train_run, train_weights

#: Keras' reduction name for each of a weighted training run's reductions (``protocol.TRAIN_REDUCTIONS``).
_WEIGHTED = {"sum": "sum", "weighted_mean": "mean_with_sample_weight", "sum_over_batch_size": "sum_over_batch_size"}

#: How one step is written on each Keras backend (the info's "loop"): the session's single-backward autodiff.
_LOOPS = {
    "tensorflow": "tf.function{with tf.GradientTape() as tape: loss = loss_fn(y, model(x, training=True)); "
                  "grads = tape.gradient(loss, model.trainable_variables)}; "
                  "optimizer.apply(grads, model.trainable_variables) (eager)",
    "jax": "loss, grads = jax.jit(jax.value_and_grad(lambda tv: loss_fn(y, model.stateless_call(tv, ntv, x, "
           "training=True)[0])))([v.value for v in model.trainable_variables]); "
           "optimizer.apply(grads, model.trainable_variables) (eager)",
    "torch": "v.value.grad = None for each variable; loss = loss_fn(y, model(x, training=True)); loss.backward(); "
             "optimizer.apply([v.value.grad for v in model.trainable_variables], model.trainable_variables)",
}


class TrainSession(KerasSession):
    """A ``KerasSession`` whose ``compute(case)`` trains the model for the job's K steps.

    The session is opened on batch 1 as its batch (``x``, ``y``): that is
    what ``environment()`` replays the forward pass on to read back the
    dtype each op computed in. Every batch is converted to the backend's
    tensors once, here, on the chosen device, so a timed ``compute`` is the
    training loop alone.
    """

    def __init__(self, job: WorkerJob):
        first = train_batches(job, next(iter(job.payload["runs"].values())).get("batches", ""))
        # The gradient session reads its batch from batch['x'] / batch['y']; a train job has K of them.
        super().__init__(dataclasses.replace(job, batch={"x": first[0][0], "y": first[0][1]}))
        self.train_job = job
        self._batches: dict[str, list] = {}
        self._weights: dict[str, list] = {}
        # Converted once here: a timed compute() is the loop alone.
        self._run_weights = {case: self.weights(case) for case in job.payload["runs"]}
        if any(w is not None for w in self._run_weights.values()):
            # The session's loss objects lack the one reduction only weights make differ from sum_over_batch_size.
            self.ad.bind(self.model, dict(self.ad.losses, mean_with_sample_weight=keras.losses.
                                          SparseCategoricalCrossentropy(from_logits=True, dtype=job.dtype,
                                                                        reduction="mean_with_sample_weight")))

    def batches(self, run: dict) -> list:
        """The run's batches as the backend's tensors on the chosen device, converted on first use."""
        prefix = run.get("batches", "")
        if prefix not in self._batches:
            with self.ad.scope():
                self._batches[prefix] = [(keras.ops.convert_to_tensor(x, dtype=self.train_job.dtype),
                                          keras.ops.convert_to_tensor(y))
                                         for x, y in train_batches(self.train_job, prefix)]
        return self._batches[prefix]

    def weights(self, case: str) -> list | None:
        """The case's per-example weights per step as the backend's tensors (once per batch sequence), or None
        (unweighted); its batches converted too."""
        run = self.train_job.payload["runs"][case]
        weights = train_weights(self.train_job, case, len(self.batches(run)))
        if weights is None:
            return None
        prefix = run.get("batches", "")
        if prefix not in self._weights:
            with self.ad.scope():
                self._weights[prefix] = [keras.ops.convert_to_tensor(w, dtype=self.train_job.dtype) for w in weights]
        return self._weights[prefix]

    def compute(self, case: str) -> RawResult:
        """Train from ``job.params`` with the run ``case``; parameters after every step and every loss."""
        job = self.train_job
        run = job.payload["runs"][case]
        batches = self.batches(run)
        config, lrs, reduction, record = train_run(job, case, len(batches))
        weights = self._run_weights[case]
        keras_reduction = _REDUCTIONS[reduction] if weights is None else _WEIGHTED[reduction]
        variables = self.model.trainable_variables
        out: dict[str, np.ndarray] = {}
        with self.ad.scope():  # the optimizer's slot variables and lr table on the chosen device
            # From scratch: the same variables (their traced tf.function / jitted gradient stay valid), reset.
            for variable, name in zip(variables, self.names):
                variable.assign(job.params[name])
            optimizer = build_optimizer(config, StepTable(lrs, job.dtype))
            # Built on the model's variables before the first step, as optimizers.run_steps does.
            optimizer.build(variables)
            for t, (x, y) in enumerate(batches, start=1):
                # No dropout or batch-norm switches in a train job: no masks.
                loss, grads = self.ad.reduced(keras_reduction, x, y, [], None if weights is None else weights[t - 1])
                optimizer.apply(grads, variables)
                # The loss in the dtype Keras gave it (float32 where its promotion demoted the mean's division).
                out[f"loss/{t}"] = np.array(keras.ops.convert_to_numpy(loss), copy=True)
                # Copies: on the torch backend convert_to_numpy may share the variable's storage.
                if t in record:
                    out.update({f"{t}/{name}": np.array(keras.ops.convert_to_numpy(v.value), dtype=job.dtype,
                                                        copy=True) for name, v in zip(self.names, variables)})
        return RawResult(float(out[f"loss/{len(batches)}"]), out,
                         {"optimizer": environment_note(config), "loop": _LOOPS[keras.backend.backend()] + (
                             "" if weights is None else f"; loss_fn(y, logits, sample_weight=w_t), "
                                                        f"SparseCategoricalCrossentropy(reduction={keras_reduction!r})")})


def open_session(job: WorkerJob) -> TrainSession:
    """The worker's entry for task "train" on ``job.variant`` (must equal KERAS_BACKEND); may raise
    DeviceUnavailable."""
    return TrainSession(job)
