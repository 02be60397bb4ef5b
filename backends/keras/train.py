"""Keras 3's trainer: tasks "train" (a built-in model, payload "builtin": the MLP, the CNN, the sequence model) and
"model_train" (a user's factory): the model session's model trained with Keras' own optimizer.

Contract (``protocol.ModelTraining``, shared by ``backends/{torch,keras,jax}/train.py``)::

    open_session(job) -> session with environment() and compute(case)

``job.params`` are the canonical initial parameters, ``job.batch`` holds ``batches/{t}/x`` and
``batches/{t}/y`` for t = 1..K (the last batch of an epoch may be short), and ``job.payload["runs"][case]`` is
``{"optimizer": OptimizerConfig dict, "lrs": [lr at step 1..K], "reduction": "mean" | "sum"}``; a run with
``"weights": true`` reduces by "sum" | "weighted_mean" | "sum_over_batch_size" with the per-example weights
``batches/{t}/w`` (``protocol.TRAIN_REDUCTIONS``). ``compute(case)`` starts from scratch (the model's variables
reset to ``job.params``, the written state restored, a new optimizer) and, for t = 1..K, takes ``loss_t``, the
reduced loss of batch t at the current parameters, its gradient, and one optimizer step at ``lrs[t-1]``. It
returns ``RawResult(loss_K, {"{t}/{name}": parameters after step t (canonical layout, job dtype), "loss/{t}":
loss_t}, info)``.

Everything but the loop is reused, not rewritten: ``session.KerasModelSession`` (device, precision, the model
in the job's mode, native <-> canonical names, Keras' loss callables, each Keras backend's autodiff,
``environment()``) and ``backends/keras/optimizers.py`` (the optimizer class and the per-step learning rate as
a ``LearningRateSchedule`` of ``optimizer.iterations``). One step is the variant's own single-backward gradient,
exactly what the session's ``mean`` / ``sum`` methods compute (tf.GradientTape in a tf.function; jax.jit of
jax.value_and_grad over ``model.stateless_call``; torch ``loss.backward()``), then ``optimizer.apply(grads,
model.trainable_variables)``, eagerly; "mean" is Keras' "sum_over_batch_size" (every loss term, N x T for a
sequence's tokens). A weighted run calls the loss as Keras users do, ``loss(y, logits, sample_weight=w)``
(w broadcast over a sequence's T tokens), with Keras' own reduction names: "sum", "mean_with_sample_weight"
(divides by the sum of the weights, T sum(w) for tokens) and "sum_over_batch_size" (divides by the number of
loss terms, whatever the weights). A short batch is a second trace of the tf.function / jitted gradient.

As in the model session, float64 is not float64 throughout on Keras' jax and torch backends (its type
promotion demotes some ops to float32, e.g. torch ``matmul`` and the "sum_over_batch_size" division);
``environment()`` reports the narrowest dtype any op computed in.
"""
from __future__ import annotations

import keras
import numpy as np

from gradparity.backends.keras.optimizers import StepTable, build_optimizer, environment_note
from gradparity.backends.keras.session import REDUCTIONS, KerasModelSession
from gradparity.backends.protocol import ModelTraining, RawResult, WorkerJob

#: Keras' reduction name for each of a weighted training run's reductions (``protocol.TRAIN_REDUCTIONS``).
WEIGHTED = {"sum": "sum", "weighted_mean": "mean_with_sample_weight", "sum_over_batch_size": "sum_over_batch_size"}

#: How one step is written on each Keras backend (the info's "loop"): the session's single-backward autodiff.
_LOOPS = {
    "tensorflow": "tf.function{with tf.GradientTape() as tape: loss = loss_fn(y, model(x, training=TRAINING)); "
                  "grads = tape.gradient(loss, model.trainable_variables)}; "
                  "optimizer.apply(grads, model.trainable_variables) (eager)",
    "jax": "loss, grads = jax.jit(jax.value_and_grad(lambda tv: loss_fn(y, model.stateless_call(tv, ntv, x, "
           "training=TRAINING)[0])))([v.value for v in model.trainable_variables]); "
           "optimizer.apply(grads, model.trainable_variables) (eager)",
    "torch": "v.value.grad = None for each variable; loss = loss_fn(y, model(x, training=TRAINING)); "
             "loss.backward(); optimizer.apply([v.value.grad for v in model.trainable_variables], "
             "model.trainable_variables)",
}


def _numpy(tensor) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(tensor))


class KerasTraining(ModelTraining):
    """Tasks "train" and "model_train": the model of ``KerasModelSession`` (opened on batch 1) trained with Keras'
    own optimizer; every batch and every weighted run's weights converted once, on the chosen device, so a
    timed ``compute`` is the training loop alone.

    Each ``compute(case)`` assigns the canonical start again, builds a fresh optimizer and returns the canonical
    trainable values after the recorded steps ("T/KEY") and every step's loss ("loss/T").
    """

    def __init__(self, job: WorkerJob):
        super().__init__(job, KerasModelSession)

    def convert(self, x, y):
        with self.model.ad.scope():
            return self.model.convert(x, y)

    def convert_weights(self, w):
        with self.model.ad.scope():
            return keras.ops.convert_to_tensor(np.asarray(w), dtype=self.job.dtype)

    def _loop(self, keras_reduction: str, weighted: bool) -> str:
        """What one step ran (the info's "loop")."""
        m = self.model
        loss = ("SparseCategoricalCrossentropy(from_logits=True, " if m.loss_name == "cross_entropy"
                else "MeanSquaredError(") + f"reduction={keras_reduction!r})"
        text = _LOOPS[m.variant].replace("TRAINING", str(m.training)) + f"; loss_fn = {loss}"
        return text + ("; loss_fn(y, logits, sample_weight=w_t), per-example weights w_t" if weighted else "")

    def predict(self, x, state=None) -> np.ndarray:
        """The model's output on ``x`` (the model holds the weights: ``state`` unused), in the session's mode."""
        with self.model.ad.scope():
            return np.asarray(_numpy(self.model.call(x)))

    def compute(self, case: str) -> RawResult:
        """Train from ``job.params`` with the run ``case``; parameters after the recorded steps and every loss."""
        m = self.model
        batches, config, lrs, reduction, record = self.settings(case)
        weights = self.weights(case)
        keras_reduction = REDUCTIONS[reduction] if weights is None else WEIGHTED[reduction]
        variables = m.model.trainable_variables
        trained = m.trained()
        out: dict[str, np.ndarray] = {}
        with m.ad.scope():  # the optimizer's slot variables and lr table on the chosen device
            # From scratch: the same variables (their traced tf.function / jitted gradient stay valid), reset.
            m.load(m.assign)
            m.restore()
            optimizer = build_optimizer(config, StepTable(lrs, self.job.dtype))
            # Built on the model's variables before the first step, as optimizers.run_steps does.
            optimizer.build(variables)
            for t, (x, y) in enumerate(batches, start=1):
                loss, grads = m.ad.reduced(keras_reduction, x, y, [], None if weights is None else weights[t - 1])
                optimizer.apply(grads, variables)
                # The loss in the dtype Keras gave it (float32 where its promotion demoted the mean's division).
                out[f"loss/{t}"] = np.array(_numpy(loss), copy=True)
                # Copies: on the torch backend convert_to_numpy may share the variable's storage.
                if t in record:
                    out.update({f"{t}/{key}": np.array(_numpy(v.value), copy=True) for v, key in trained})
                    if self.held is not None:
                        out[f"accuracy/{t}"] = np.array(self.held_out_accuracy(), dtype=np.float64)
        info = {"optimizer": environment_note(config), "loop": self._loop(keras_reduction, weights is not None)}
        return RawResult(float(out[f"loss/{len(batches)}"]), out, info)


def open_session(job: WorkerJob) -> KerasTraining:
    """The worker's entry for tasks "train" and "model_train" on ``job.variant`` (must equal KERAS_BACKEND); may
    raise DeviceUnavailable."""
    return KerasTraining(job)
