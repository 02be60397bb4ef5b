"""Keras 3's data-parallel engines (tasks "data_parallel" and "data_parallel_train", contract in
``protocol/parallel.py``): the gradient the optimizer is handed, and training, under
``tf.distribute.MirroredStrategy`` (Keras on TensorFlow) and under ``keras.distribution.DataParallel`` (Keras on
JAX), on R replicas of one machine.

Imported only inside a worker process, with KERAS_BACKEND already set to ``job.variant``. The model, its Keras
loss objects, the conversions and the canonical names are the model session's (``session.KerasModelSession``,
the job's built-in model loaded with ``job.params``): one plain session computes the "single@…" cases
(``ad.reduced``, what the session's ``mean`` / ``sum`` methods run), and one session per reduction is built
inside the engine (its variables mirrored or laid out by the distribution) and compiled with that reduction's
Keras loss and a ``GradientRecorder``: an optimizer whose ``update_step`` stores the gradient it is handed in a
slot variable instead of moving the weights. Every case reads the gradient there, after Keras' own
aggregation: replica 0's copy, with whether the other replicas' copies agree.

Keras on TensorFlow: R logical CPU devices (``tf_keras/mirrored.py``), configured before any tensor exists, one
``MirroredStrategy`` over them. Read in keras 3.15 (``keras/src``): ``backend/tensorflow/optimizer.py``
``TFOptimizer._backend_update_step`` all-reduces the replicas' gradients with ``ReduceOp.SUM`` before
``update_step``; ``losses/loss.py`` ``reduce_values`` multiplies a "sum_over_batch_size" (or "mean") loss by
``1 / num_replicas_in_sync`` whenever a strategy is in scope (``scale_loss_for_distribution``, in the loss
object itself, so in a custom loop too), and leaves "sum" and "none" alone; the factor is ``ops.cast(1.0 / R,
dtype)``, a ``tf.cast`` of a Python float, which TensorFlow converts to float32 first (float64 jobs get
float32's 1/3 for R = 3). Configurations:

- "mirrored_fit": ``model.fit(x, y, batch_size=N, epochs=1, shuffle=False)``: Keras' own ``train_step`` in
  ``strategy.run`` over ``experimental_distribute_dataset``. Keras builds its compiled loss at every ``fit``
  from the epoch's first batch, ``strategy.reduce("MEAN", shards)`` element by element
  (``backend/tensorflow/trainer.py`` ``_maybe_symbolic_build``), which fails when the shards differ in size:
  an uneven global batch is fed as the epoch's last, short batch after an even batch of R * ceil(N / R)
  examples (whose gradient the recorder overwrites), which is how fit meets uneven shards.
- "mirrored_loop": a custom loop, ``tf.function(strategy.run(step))``, the step taking the tape gradient of
  the Keras loss object with the method's reduction on the replica's shard and calling
  ``optimizer.apply_gradients`` (the SUM all-reduce above).
- "mirrored_average": the same loop on ``tf.nn.compute_average_loss(per-example losses, global_batch_size=N)``
  (for "sum": the per-example losses times N).

Task "data_parallel_train" (``MirroredTrainer``, Keras on TensorFlow): each case "CONFIG@even/METHOD" trains
K steps from ``job.params`` with a fresh optimizer of ``optimizers.build_optimizer`` (the run's config), its lr
per step ``StepTable(lrs)`` of ``optimizer.iterations`` as ``train.py`` feeds it, built in the strategy's scope
on the model built there (one model for every case, its canonical weights assigned again first).
"mirrored_fit" is ``model.fit`` over the K global batches (``batch_size`` N, one epoch, no shuffling): Keras'
own ``train_step`` and the optimizer's step per batch; the custom loops are the steps above with the case's
optimizer, one ``strategy.run`` per global batch. The parameters after each step are replica 0's copies
(checked against the others'); "single@even/METHOD" is the package trainer's run (``train.KerasTraining``).
Measured (float64, R = 3, SGD with momentum): "sum" and "mirrored_average" stay on single-device training's
trajectory to 2e-16; "mean" in fit and in the custom loop follows single-device training at R float32(1/R) lr.

Keras on JAX ("data_parallel"): ``keras.distribution.DataParallel`` over R host devices (core sets
``XLA_FLAGS=--xla_force_host_platform_device_count=R``); the model is built and compiled in its scope
(replicated variables) and ``fit`` puts the batch on the mesh with the distribution's data layout
(``jax.make_array_from_process_local_data``, ``backend/jax/trainer.py`` ``_distribute_data``), then runs
its jitted ``train_step`` on the global batch. A batch R does not divide is refused by that placement
(``IndivisibleError``): the case raises ``EngineRefused`` with JAX's message.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import replace

import keras
import numpy as np

from gradparity.backends.keras.optimizers import StepTable, build_optimizer, environment_note
from gradparity.backends.keras.session import REDUCTIONS, KerasModelSession
from gradparity.backends.protocol import (DeviceUnavailable, RawResult, WorkerJob, train_batches, train_result,
                                          train_run)
from gradparity.backends.protocol.parallel import (TASK, TRAIN_TASK, EngineRefused, engine_info, global_batch,
                                                  training_view,
                                                   parse_case, replicas)

FRAMEWORK = "keras"
#: The engine configurations each Keras backend runs (``protocol.parallel.ENGINES["keras"]``).
VARIANT_CONFIGS = {"tensorflow": ("mirrored_fit", "mirrored_loop", "mirrored_average"), "jax": ("data_parallel",)}


class GradientRecorder(keras.optimizers.Optimizer):
    """An optimizer that moves nothing: ``update_step`` stores the gradient it is handed for each variable in
    ``recorded[i]`` (aligned with the variables it was built on), after whatever the backend's ``apply`` did
    to the gradients first (TensorFlow: the strategy's all-reduce)."""

    def __init__(self):
        super().__init__(learning_rate=0.0, name="gradient_recorder")

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.recorded = [self.add_variable_from_reference(v, name="applied_gradient") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        self.assign(self.recorded[self._get_variable_index(variable)], gradient)


def _numpy(tensor) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def custom_loop_loss(losses: dict, config: str, method: str):
    """The loss ``(y, logits, n)`` a replica differentiates in the custom loop of ``config`` ("mirrored_loop",
    "mirrored_average") on its shard of a global batch of n: the model session's Keras loss object with the
    method's reduction (Keras scales "sum_over_batch_size" by 1/R under the strategy itself), or
    ``tf.nn.compute_average_loss`` of the per-example losses (times n for "sum") over the global batch."""
    import tensorflow as tf

    def replica_loss(y, logits, n):
        if config == "mirrored_loop":
            return losses[REDUCTIONS[method]](y, logits)
        per_example = losses["none"](y, logits)
        if method == "sum":
            per_example = per_example * n
        return tf.nn.compute_average_loss(per_example, global_batch_size=n)
    return replica_loss


def custom_loop_note(config: str, method: str, n: int) -> str:
    """The note's words on one step of ``config``'s custom loop on a global batch of n."""
    if config == "mirrored_loop":
        note = (f"tf.function(strategy.run(step)): the tape gradient of the Keras loss "
                f"reduction={REDUCTIONS[method]!r} on the replica's shard"
                + (", which Keras scales by float32(1/R) under the strategy (losses/loss.py reduce_values)"
                   if method == "mean" else ", unscaled")
                + ", then optimizer.apply_gradients (SUM all-reduce)")
    else:
        scaled = "per-example losses" + (f" * {n}" if method == "sum" else "")
        note = (f"tf.function(strategy.run(step)): tf.nn.compute_average_loss({scaled}, "
                f"global_batch_size={n}) of the Keras loss reduction='none', then "
                "optimizer.apply_gradients (SUM all-reduce)")
    return note + "; the loss is strategy.reduce(SUM) of the replicas' losses"


def check_cases(job: WorkerJob, cases: dict, variant: str) -> None:
    """ValueError, before any model is built, for a configuration ``variant`` does not run, batch normalization
    or the switch 'dropout'."""
    configs = VARIANT_CONFIGS[variant]
    wrong = sorted({c.config for c in cases.values() if not c.single and c.config not in configs})
    if wrong:
        raise ValueError(f"keras-{variant} has no data-parallel configuration {', '.join(wrong)} "
                         f"(it runs: {', '.join(configs)})")
    builtin = job.payload.get("builtin") or {}
    if builtin.get("batchnorm") or any(job.dropout_masks(f) is not None for f in ("batch", "single")):
        raise ValueError("the data-parallel engines are compared on the plain model: batch normalization "
                         "(each replica would normalize its own shard) and the switch 'dropout' are not run")


def _compile(session: KerasModelSession, method: str) -> GradientRecorder:
    """Compile the session's model with the method's Keras loss (the session's own loss object) and a fresh
    recorder, built on the model's trainable variables; call inside the engine's scope."""
    recorder = GradientRecorder()
    session.model.compile(optimizer=recorder, loss=session.ad.losses[REDUCTIONS[method]])
    recorder.build(session.model.trainable_variables)
    return recorder


def _reset(session: KerasModelSession, recorder: GradientRecorder) -> None:
    """Every case from scratch: the canonical weights again, the recorded gradients zero."""
    session.load(session.assign)
    session.restore()
    for slot in recorder.recorded:
        slot.assign(keras.ops.zeros(slot.shape, slot.dtype))


class _EngineBase:
    """What both Keras backends share: the plain session for "single@…", the cases, the global batches."""

    variant = ""

    def __init__(self, job: WorkerJob):
        self.job = job
        self.r = replicas(job)
        self.cases = {case: parse_case(case, FRAMEWORK) for case in job.methods}
        check_cases(job, self.cases, self.variant)
        self.single = KerasModelSession(job)
        self._single_batches: dict[str, tuple] = {}

    def batch_arrays(self, sharding: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the global batch as numpy (what ``fit`` is given), as the model session converts them: x in
        the job's dtype, class targets int32 (mse targets in the job's dtype)."""
        x, y = global_batch(self.job, sharding)
        return (np.asarray(x, dtype=self.job.dtype),
                np.asarray(y, dtype=self.job.dtype if self.single.loss_name == "mse" else np.int32))

    def compute_single(self, case) -> RawResult:
        """The same framework without an engine: the model session's reduced loss of the global batch."""
        s = self.single
        with s.ad.scope():
            s.restore()
            if case.sharding not in self._single_batches:
                self._single_batches[case.sharding] = s.convert(*global_batch(self.job, case.sharding))
            x, y = self._single_batches[case.sharding]
            loss, grads = s.ad.reduced(REDUCTIONS[case.method], x, y, [])
        n = int(y.shape[0])
        note = f"the model session's {REDUCTIONS[case.method]!r} loss of the global batch on one device"
        return RawResult(float(_numpy(loss)), s._grads(grads), engine_info(FRAMEWORK, case, [n], note=note))

    def compute(self, case: str) -> RawResult:
        """One "CONFIG@SHARDING/METHOD" case (``protocol.parallel``)."""
        c = self.cases.get(case) or parse_case(case, FRAMEWORK)
        if c.single:
            return self.compute_single(c)
        if c.config not in VARIANT_CONFIGS[self.variant]:
            raise ValueError(f"keras-{self.variant} has no data-parallel configuration {c.config!r}")
        return self.compute_engine(c)

    def compute_engine(self, case) -> RawResult:
        raise NotImplementedError


class MirroredSession(_EngineBase):
    """Keras 3 on TensorFlow under ``MirroredStrategy`` (module docstring); the sessions, the distributed
    batches and the traced custom-loop steps are made once per job and reused by every case."""

    variant = "tensorflow"

    def __init__(self, job: WorkerJob):
        if job.device != "cpu":
            raise ValueError(f"MirroredStrategy runs here on R logical CPU devices; the job asks for device "
                             f"{job.device!r}")
        from gradparity.backends.tf_keras import mirrored  # TensorFlow only: no tf_keras import

        self.mirrored = mirrored
        # Before the model session creates any tensor: the runtime's devices are fixed when it starts.
        devices = mirrored.logical_cpus(replicas(job))
        super().__init__(job)
        import tensorflow as tf

        self.tf = tf
        self.strategy = mirrored.mirrored_strategy(devices)
        self._engines: dict[str, tuple[KerasModelSession, GradientRecorder]] = {}
        self._batches: dict[str, tuple] = {}
        self._steps: dict[tuple[str, str], object] = {}

    def environment(self) -> dict:
        return {**self.single.environment(), "replicas": self.r, **self.mirrored.strategy_facts(self.strategy)}

    def engine(self, method: str) -> tuple[KerasModelSession, GradientRecorder]:
        """The model session built in the strategy's scope (mirrored variables), compiled with the method's
        loss and a recorder."""
        if method not in self._engines:
            session = _EngineModelSession(self.job, self.strategy.scope)
            with self.strategy.scope():
                self._engines[method] = session, _compile(session, method)
        return self._engines[method]

    def distributed(self, sharding: str) -> tuple:
        """(per-replica x, per-replica y, shards, n) of the global batch as tf.distribute splits it."""
        if sharding not in self._batches:
            with self.single.ad.scope():
                x, y = self.single.convert(*global_batch(self.job, sharding))
            px, py, shards = self.mirrored.distribute(self.strategy, x, y)
            self._batches[sharding] = px, py, shards, int(y.shape[0])
        return self._batches[sharding]

    def compute_engine(self, case) -> RawResult:
        session, recorder = self.engine(case.method)
        _reset(session, recorder)
        if case.config == "mirrored_fit":
            loss, shards, note = self._fit(case, session)
        else:
            loss, shards, note = self._loop(case, session)
        grads, spread = self.mirrored.replica_copies(self.strategy, [slot.value for slot in recorder.recorded])
        note += f"; the gradient is what update_step received, replica 0's copy ({self.mirrored.agreement(spread)})"
        return RawResult(loss, session._grads(grads), engine_info(FRAMEWORK, case, shards, note=note))

    def _fit(self, case, session) -> tuple[float, list[int], str]:
        """One ``fit`` step on the global batch; an uneven one as the last, short batch of a two-batch epoch
        (module docstring). Returns (the loss fit logged for that batch, shards, note)."""
        x, y = self.batch_arrays(case.sharding)
        n = batch = len(y)
        if n % self.r:
            batch = self.r * math.ceil(n / self.r)
        note = (f"model.fit(batch_size={batch}, epochs=1, shuffle=False) in MirroredStrategy.scope(), Keras' "
                f"train_step; the {REDUCTIONS[case.method]!r} loss "
                + ("times float32(1/R) (keras scale_loss_for_distribution)" if case.method == "mean"
                   else "unscaled") + ", replica gradients all-reduced with SUM by TFOptimizer")
        if batch != n:
            # fit's first batch must split evenly (module docstring): an even batch first, this one last.
            x = np.concatenate([np.resize(x, (batch, *x.shape[1:])), x])
            y = np.concatenate([np.resize(y, batch), y])
            note += (f"; fed as the last batch of an epoch after an even batch of {batch} (fit builds its "
                     "compiled loss from strategy.reduce('MEAN') of the first batch's shards, which fails when "
                     "they differ)")
        last = _LastBatchLoss()
        session.model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[last])
        shards = self.mirrored.last_batch_shards(self.strategy, x, y, batch)
        return last.loss, shards, note

    def _loop(self, case, session) -> tuple[float, list[int], str]:
        """One step of the custom loop on the distributed global batch; (the replicas' losses summed with
        ``strategy.reduce``, shards, note)."""
        px, py, shards, n = self.distributed(case.sharding)
        per_replica = self.step(case.config, case.method)(px, py, n)
        loss = float(self.strategy.reduce(self.tf.distribute.ReduceOp.SUM, per_replica, axis=None))
        return loss, shards, custom_loop_note(case.config, case.method, n)

    def step(self, config: str, method: str):
        """The traced custom-loop step of a configuration and reduction: ``strategy.run`` of the replica's
        tape gradient of its loss and ``optimizer.apply_gradients``; returns the replicas' losses."""
        if (config, method) not in self._steps:
            tf, strategy = self.tf, self.strategy
            session, recorder = self.engine(method)
            losses = session.ad.losses
            variables = session.model.trainable_variables
            replica_loss = custom_loop_loss(losses, config, method)

            def replica_step(x, y, n):
                with tf.GradientTape() as tape:
                    loss = replica_loss(y, session.call(x), n)
                recorder.apply_gradients(zip(tape.gradient(loss, variables), variables))
                return loss

            self._steps[(config, method)] = tf.function(lambda x, y, n: strategy.run(replica_step, args=(x, y, n)))
        return self._steps[(config, method)]


class _LastBatchLoss(keras.callbacks.Callback):
    """The loss ``fit`` logs for its last batch alone: the metrics are reset before every batch (fit's
    logged loss is otherwise the running mean over the epoch)."""

    loss = float("nan")

    def on_train_batch_begin(self, batch, logs=None):
        self.model.reset_metrics()

    def on_train_batch_end(self, batch, logs=None):
        self.loss = float(_numpy((logs or {}).get("loss", float("nan"))))


class _EngineModelSession(KerasModelSession):
    """The model session with its model built in the engine's scope (``MirroredStrategy.scope()``: mirrored
    variables; ``keras.distribution.DataParallel.scope()``: replicated layouts). The scope is entered around
    the build itself, after the session's ``keras.backend.clear_session()``, which forgets both: it resets
    Keras' global state (where the distribution is kept) and, on TensorFlow, the default graph (whose stack
    holds the strategy's scope)."""

    def __init__(self, job: WorkerJob, scope):
        self.engine_scope = scope
        super().__init__(job)

    def _build(self, factory):
        with self.engine_scope():
            return super()._build(factory)


class MirroredTrainer:
    """Task "data_parallel_train" on Keras 3's TensorFlow backend (module docstring): each case trains from
    ``job.params`` with a fresh optimizer of ``optimizers.build_optimizer`` (the run's config, its lr per step as
    ``StepTable(lrs)`` of ``optimizer.iterations``, as ``train.py`` feeds it). The strategy, the model built in its
    scope (one for every case: each starts by assigning the canonical weights again), the batches (numpy for
    ``fit``, distributed for the custom loops) and the package trainer for "single@…" are made once per job."""

    def __init__(self, job: WorkerJob):
        if job.device != "cpu":
            raise ValueError(f"MirroredStrategy runs here on R logical CPU devices; the job asks for device "
                             f"{job.device!r}")
        from gradparity.backends.keras.train import KerasTraining
        from gradparity.backends.tf_keras import mirrored  # TensorFlow only: no tf_keras import

        self.mirrored = mirrored
        self.r = replicas(job)
        devices = mirrored.logical_cpus(self.r)  # before any tensor exists
        self.job = training_view(job, FRAMEWORK)
        self.cases = {case: parse_case(case, FRAMEWORK) for case in job.methods}
        check_cases(job, self.cases, "tensorflow")
        # The package trainer, task "train", on the same runs: the single-device training of each reduction.
        self.trainer = KerasTraining(replace(self.job, task="train"))
        import tensorflow as tf

        self.tf = tf
        self.strategy = mirrored.mirrored_strategy(devices)
        self.session = _EngineModelSession(self.job, self.strategy.scope)
        self.trained = self.session.trained()
        loss_dtype = self.job.dtype if self.session.loss_name == "mse" else np.int32
        self.host = [(np.asarray(x, dtype=self.job.dtype), np.asarray(y, dtype=loss_dtype))
                     for x, y in train_batches(self.job)]
        self._distributed: list | None = None
        self.spread = 0.0

    def environment(self) -> dict:
        return {**self.trainer.environment(), "replicas": self.r, **self.mirrored.strategy_facts(self.strategy)}

    def distributed(self) -> list[tuple]:
        """Every global batch as tf.distribute splits it: (per-replica x, per-replica y, shards, n)."""
        if self._distributed is None:
            out = []
            for x, y in self.host:
                with self.session.ad.scope():
                    tx, ty = self.session.convert(x, y)
                px, py, shards = self.mirrored.distribute(self.strategy, tx, ty)
                out.append((px, py, shards, len(y)))
            self._distributed = out
        return self._distributed

    def snapshot(self) -> dict[str, np.ndarray]:
        """Replica 0's copy of every trained variable, keyed canonically (Keras' Dense kernels are (in, out), the
        canonical layout); the largest difference between the replicas' copies is kept in ``spread``."""
        copies, spread = self.mirrored.replica_copies(self.strategy, [v.value for v, _ in self.trained])
        if any(len(self.strategy.experimental_local_results(v.value)) != self.r for v, _ in self.trained):
            raise RuntimeError("a trained variable is not mirrored on every replica")
        self.spread = max(self.spread, spread)
        return {key: c for (_, key), c in zip(self.trained, copies)}

    def compute(self, case: str) -> RawResult:
        """One training run ``CONFIG@even/METHOD`` (``protocol.parallel``, task "data_parallel_train")."""
        c = self.cases.get(case) or parse_case(case, FRAMEWORK)
        if c.single:
            return self.compute_single(case, c)
        config, lrs, _, record = train_run(self.job, case, len(self.host))
        session = self.session
        session.load(session.assign)   # from scratch: the canonical start on every replica's copy
        session.restore()
        self.spread = 0.0
        with self.strategy.scope():   # the optimizer's slot variables mirrored, as the model's
            optimizer = build_optimizer(config, StepTable(lrs, self.job.dtype))
            optimizer.build(session.model.trainable_variables)
        if c.config == "mirrored_fit":
            losses, snapshots, note = self._fit(c, optimizer, record)
        else:
            losses, snapshots, note = self._loop(c, optimizer, record)
        note += (f"; {len(self.host)} steps, the parameters are replica 0's copy after each "
                 f"({self.mirrored.agreement(self.spread).replace('of it ', 'of them ')})")
        shards = self.distributed()[0][2]
        info = {**engine_info(FRAMEWORK, c, shards, note=note), "optimizer": environment_note(config),
                "loop": note}
        arrays = {f"{t}/{key}": v for t, snap in snapshots.items() for key, v in snap.items()}
        return train_result(self.job, arrays, losses, info)

    def compute_single(self, case: str, c) -> RawResult:
        """The package trainer's run (``train.KerasTraining``): the same training on one device, no strategy."""
        raw = self.trainer.compute(case)
        steps = len(self.host)
        losses = [float(raw.grads[f"loss/{t}"]) for t in range(1, steps + 1)]
        arrays = {k: v for k, v in raw.grads.items() if not k.startswith(("loss/", "accuracy/"))}
        note = f"the package trainer (backends/keras/train.py) on one device: {raw.info['loop']}"
        info = {**engine_info(FRAMEWORK, c, [len(self.host[0][1])], note=note), "optimizer": raw.info["optimizer"],
                "loop": raw.info["loop"]}
        return train_result(self.job, arrays, losses, info)

    def _fit(self, case, optimizer, record) -> tuple[list[float], dict, str]:
        """``model.fit`` over the global batches in order (one fit per run of equal-sized batches: one for the
        whole sequence when every batch has the same size), ``batch_size`` the global batch, one epoch, no
        shuffling: one Keras ``train_step`` per batch under the strategy."""
        session = self.session
        with self.strategy.scope():
            session.model.compile(optimizer=optimizer, loss=session.ad.losses[REDUCTIONS[case.method]])
        steps = _StepRecorder(self, record)
        for n, group in itertools.groupby(self.host, key=lambda b: len(b[1])):
            group = list(group)
            x = np.concatenate([b[0] for b in group])
            y = np.concatenate([b[1] for b in group])
            session.model.fit(x, y, batch_size=n, epochs=1, shuffle=False, verbose=0, callbacks=[steps])
        note = (f"model.fit(x, y, batch_size={len(self.host[0][1])}, epochs=1, shuffle=False) over the "
                f"{len(self.host)} global batches in MirroredStrategy.scope(), Keras' train_step per batch; the "
                f"{REDUCTIONS[case.method]!r} loss "
                + ("times float32(1/R) (keras scale_loss_for_distribution)" if case.method == "mean"
                   else "unscaled") + ", replica gradients all-reduced with SUM by TFOptimizer; the loss is what "
                "fit logged for that batch alone (metrics reset before each)")
        return steps.losses, steps.snapshots, note

    def _loop(self, case, optimizer, record) -> tuple[list[float], dict, str]:
        """The custom loop: per global batch, ``strategy.run`` of the replica's tape gradient of its loss and
        ``optimizer.apply_gradients``, traced once per case (the optimizer is the case's)."""
        tf, strategy, session = self.tf, self.strategy, self.session
        variables = session.model.trainable_variables
        replica_loss = custom_loop_loss(session.ad.losses, case.config, case.method)

        def replica_step(x, y, n):
            with tf.GradientTape() as tape:
                loss = replica_loss(y, session.call(x), n)
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        step = tf.function(lambda x, y, n: strategy.run(replica_step, args=(x, y, n)))
        losses, snapshots = [], {}
        for t, (px, py, _, n) in enumerate(self.distributed(), start=1):
            per_replica = step(px, py, n)
            losses.append(float(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)))
            if t in record:
                snapshots[t] = self.snapshot()
        return losses, snapshots, custom_loop_note(case.config, case.method, len(self.host[0][1]))


class _StepRecorder(keras.callbacks.Callback):
    """``fit``'s callback for a training run: the loss fit logs for each batch alone (the metrics reset before
    every batch: fit's logged loss is otherwise the running mean over the epoch) and, after a recorded step,
    the trainer's snapshot of the parameters; steps count on across several ``fit`` calls."""

    def __init__(self, trainer: MirroredTrainer, record: set[int]):
        super().__init__()
        self.trainer, self.record = trainer, record
        self.losses: list[float] = []
        self.snapshots: dict[int, dict] = {}

    def on_train_batch_begin(self, batch, logs=None):
        self.model.reset_metrics()

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(_numpy((logs or {}).get("loss", float("nan")))))
        t = len(self.losses)
        if t in self.record:
            self.snapshots[t] = self.trainer.snapshot()


class DataParallelSession(_EngineBase):
    """Keras 3 on JAX under ``keras.distribution.DataParallel`` (module docstring)."""

    variant = "jax"

    def __init__(self, job: WorkerJob):
        import jax

        self.jax = jax
        r = replicas(job)
        if job.device != "cpu":
            raise ValueError(f"keras.distribution.DataParallel runs here on R host devices; the job asks for "
                             f"device {job.device!r}")
        devices = jax.devices("cpu")
        if len(devices) < r:
            raise DeviceUnavailable(
                f"data-parallel on {r} replicas needs {r} JAX cpu devices, but jax sees {len(devices)} "
                f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}): start the worker with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={r} in its environment (jax reads it once, "
                "at import); gradparity's data-parallel runs set it")
        super().__init__(job)
        self.devices = devices[:r]
        self.distribution = keras.distribution.DataParallel(devices=self.devices)
        self._engines: dict[str, tuple[KerasModelSession, GradientRecorder]] = {}

    def environment(self) -> dict:
        return {**self.single.environment(), "replicas": self.r,
                "mesh": {"axis": self.distribution.batch_dim_name, "devices": [str(d) for d in self.devices]},
                "xla_flags": os.environ.get("XLA_FLAGS", "")}

    def engine(self, method: str) -> tuple[KerasModelSession, GradientRecorder]:
        """The model session built in the distribution's scope, compiled there with the method's loss and a
        recorder (its slot variables replicated too)."""
        if method not in self._engines:
            session = _EngineModelSession(self.job, self.distribution.scope)
            with self.distribution.scope():
                self._engines[method] = session, _compile(session, method)
        return self._engines[method]

    def compute_engine(self, case) -> RawResult:
        from keras.src.backend.jax.distribution_lib import distribute_data_input  # what fit's _distribute_data calls

        session, recorder = self.engine(case.method)
        x, y = self.batch_arrays(case.sharding)
        n = len(y)
        layout = self.distribution.get_data_layout(x.shape)
        try:
            placed = distribute_data_input(x, layout, self.distribution.batch_dim_name)
        except ValueError as exc:  # jax's IndivisibleError
            if n % self.r:
                raise EngineRefused(
                    f"keras.distribution.DataParallel refused a global batch of {n} examples on {self.r} devices: "
                    f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
            raise
        order = {d: k for k, d in enumerate(self.devices)}
        shards = [int(s.data.shape[0]) for s in sorted(placed.addressable_shards, key=lambda s: order[s.device])]
        _reset(session, recorder)
        with self.distribution.scope():
            history = session.model.fit(x, y, batch_size=n, epochs=1, shuffle=False, verbose=0)
        grads, spread = [], 0.0
        for slot in recorder.recorded:
            copies = [np.asarray(s.data) for s in sorted(slot.value.addressable_shards, key=lambda s: order[s.device])]
            grads.append(copies[0])
            spread = max([spread, *(float(np.max(np.abs(c - copies[0]), initial=0.0)) for c in copies[1:])])
        agree = ("every device's copy of it is identical" if spread == 0.0
                 else f"the devices' copies of it differ by up to {spread:.3g}")
        note = (f"model.fit(batch_size={n}, epochs=1, shuffle=False) under keras.distribution.DataParallel: the "
                f"batch placed with the layout {layout.axes}, variables replicated, Keras' jitted train_step of "
                f"the {REDUCTIONS[case.method]!r} loss of the global batch; the gradient is what update_step "
                f"received, device 0's copy ({agree})")
        return RawResult(float(history.history["loss"][0]), session._grads(grads),
                         engine_info(FRAMEWORK, case, shards, note=note))


def open_session(job: WorkerJob):
    """Task "data_parallel" on ``job.variant`` (must equal KERAS_BACKEND): "tensorflow" (MirroredStrategy) or
    "jax" (keras.distribution.DataParallel); check the cases, start the replicas' devices, build the model
    session. Task "data_parallel_train": Keras on TensorFlow (``MirroredTrainer``)."""
    if job.task not in (TASK, TRAIN_TASK):
        raise ValueError(f"backends/keras/parallel.py runs {TASK!r} and {TRAIN_TASK!r} jobs, not {job.task!r}")
    variant = job.variant or "tensorflow"
    if keras.backend.backend() != variant:
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r} but the job asks for {variant!r}; "
                           "KERAS_BACKEND must be set before keras is imported")
    if job.task == TRAIN_TASK:
        if variant != "tensorflow":
            raise ValueError(f"data-parallel training through Keras' engines runs on Keras' TensorFlow backend "
                             f"(MirroredStrategy), not keras-{variant}")
        return MirroredTrainer(job)
    if variant == "tensorflow":
        return MirroredSession(job)
    if variant == "jax":
        return DataParallelSession(job)
    raise ValueError(f"keras-{variant} has no data-parallel engine here (keras-tensorflow: MirroredStrategy; "
                     "keras-jax: keras.distribution.DataParallel)")
