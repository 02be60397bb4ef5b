"""TF-Keras 2's data-parallel engine (tasks "data_parallel" and "data_parallel_train", contract in
``protocol/parallel.py``): the gradient the optimizer is handed in a custom training loop under
``tf.distribute.MirroredStrategy`` over R logical CPU devices (``mirrored.py``), with tf_keras' own loss
reductions, and training through that loop.

Imported only inside a worker process. The built-in model has no TF-Keras builder elsewhere (the model session
runs users' models only), so ``build_mlp`` writes the MLP of the payload as TF-Keras users write it: a
``Sequential`` of ``Dense`` layers ``dense_0`` .. ``dense_L``, the activation fused into each hidden one; Dense
kernels are (in, out), the canonical layout, so the canonical ``layers.{i}.kernel`` / ``layers.{i}.bias`` are
``dense_i``'s variables as they are. Two copies are built: a plain one for "single@…" (the same loss with the
method's reduction on the whole global batch) and one in the strategy's scope (mirrored variables), with a
``GradientRecorder``: an ``SGD`` whose ``update_step`` stores the gradient it is handed instead of moving the
weights.

Read in tf_keras 2.21 (``tf_keras/src``): ``optimizers/optimizer.py`` ``Optimizer.apply_gradients`` aggregates
the replicas' gradients with ``optimizer_utils.all_reduce_sum_gradients`` (``ReduceOp.SUM``) before the
update; ``losses.py`` ``Loss._get_reduction`` raises a ``ValueError`` ("Please use
`tf.keras.losses.Reduction.SUM` or `tf.keras.losses.Reduction.NONE` ...") when a loss reduced with
``SUM_OVER_BATCH_SIZE`` or ``AUTO`` is called under a strategy outside ``Model.fit``'s compiled loss.
Configurations (each a ``tf.function(strategy.run(step))`` on the global batch as
``experimental_distribute_dataset`` splits it; the step takes the tape gradient of the replica's loss and calls
``optimizer.apply_gradients``):

- "mirrored_loop": ``SparseCategoricalCrossentropy(from_logits=True, reduction=Reduction.SUM_OVER_BATCH_SIZE)``
  for "mean" (refused by TF-Keras: the case raises ``EngineRefused`` with its message), ``Reduction.SUM`` for
  "sum";
- "mirrored_average": ``Reduction.NONE``, then ``tf.nn.compute_average_loss(per-example losses,
  global_batch_size=N)`` (for "sum": the per-example losses times N).

Task "data_parallel_train" (``MirroredTrainer``): the same steps with a real optimizer instead of the recorder,
one per global batch: ``tf_keras.optimizers.SGD`` / ``Adam`` / ``AdamW`` built from the run's config as Keras 3's
``build_optimizer`` reads it (the same update formulas in TF-Keras 2.21; ``optimizer_arguments`` refuses what
they cannot do), in the strategy's scope (mirrored slot variables), ``optimizer.learning_rate`` assigned before
each step, as TF-Keras' ``LearningRateScheduler`` callback sets it (a float variable in floatx, so a float64
job's lrs are not rounded). "single@even/METHOD": the plain model and the same optimizer without
a strategy. Measured (float64, R = 3, SGD with momentum 0.9; Adam ad hoc): the trajectories of both trainable
configurations stay on single-device training's to 2e-16, and TF-Keras' single-device run is Keras 3's.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras

from gradparity.backends.protocol import RawResult, WorkerJob, train_batches, train_result, train_run
from gradparity.backends.protocol.parallel import (TASK, TRAIN_TASK, EngineRefused, engine_info, global_batch,
                                                  training_view,
                                                   parse_case, replicas)
from gradparity.backends.tf_keras import mirrored
from gradparity.backends.tf_keras.device import TfDevice, environment
from gradparity.experiment.models import MLP, model_from_dict

FRAMEWORK = "tf_keras"
Reduction = tf_keras.losses.Reduction
#: tf_keras' reduction of each method.
REDUCTIONS = {"mean": Reduction.SUM_OVER_BATCH_SIZE, "sum": Reduction.SUM}
#: tf_keras' names of the canonical activations.
ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "identity": "linear"}


def build_mlp(model: dict) -> tuple[tf_keras.Model, dict[str, tf.Variable]]:
    """The built-in MLP ``model`` (a ``to_dict()``) in tf_keras' floatx, and {canonical name: its variable}.
    ValueError for another model kind, batch normalization or an activation tf_keras has no plain name for."""
    spec = model_from_dict(model)
    if not isinstance(spec, MLP) or model.get("batchnorm"):
        raise ValueError("the tf-keras data-parallel engine runs the built-in MLP without batch normalization, "
                         f"not {model.get('kind')!r}" + (" with batchnorm" if model.get("batchnorm") else ""))
    if spec.activation not in ACTIVATIONS:
        raise ValueError(f"the tf-keras MLP has no activation {spec.activation!r} (it has: {', '.join(ACTIVATIONS)})")
    sizes, last = [int(s) for s in spec.sizes], len(spec.sizes) - 2
    layers = [tf_keras.layers.Dense(units, activation=None if i == last else ACTIVATIONS[spec.activation],
                                    name=f"dense_{i}") for i, units in enumerate(sizes[1:])]
    net = tf_keras.Sequential([tf_keras.Input((sizes[0],)), *layers], name="mlp")
    variables = {}
    for name in spec.param_shapes():
        _, index, leaf = name.split(".")  # layers.{i}.kernel | layers.{i}.bias
        variables[name] = getattr(net.get_layer(f"dense_{index}"), leaf)
    return net, variables


class GradientRecorder(tf_keras.optimizers.SGD):
    """An SGD that moves nothing: ``update_step`` stores the gradient it is handed for each variable in
    ``recorded[i]`` (aligned with the variables it was built on), after ``apply_gradients``' all-reduce."""

    def __init__(self):
        super().__init__(learning_rate=0.0, jit_compile=False, name="gradient_recorder")

    def build(self, var_list):
        if getattr(self, "_built", False):  # apply_gradients calls build every time (as SGD.build guards)
            return
        super().build(var_list)
        self.recorded = [self.add_variable_from_reference(v, "applied_gradient") for v in var_list]

    def update_step(self, gradient, variable):
        self.recorded[self._index_dict[self._var_key(variable)]].assign(gradient)


class MirroredSession:
    """The custom loops of TF-Keras 2 under ``MirroredStrategy`` (module docstring); the models, the
    distributed batches and the traced steps are made once per job and reused by every case."""

    def __init__(self, job: WorkerJob):
        if job.device != "cpu":
            raise ValueError(f"MirroredStrategy runs here on R logical CPU devices; the job asks for device "
                             f"{job.device!r}")
        self.r = replicas(job)
        devices = mirrored.logical_cpus(self.r)  # before any tensor exists
        self.job = job
        self.cases = {case: parse_case(case, FRAMEWORK) for case in job.methods}
        if job.payload.get("loss", "cross_entropy") != "cross_entropy" or job.switches:
            raise ValueError("the tf-keras data-parallel engine runs the loss 'cross_entropy' with no switch")
        if "builtin" not in job.payload:
            raise ValueError("the tf-keras data-parallel engine runs the built-in model (payload 'builtin')")
        self.dev = TfDevice(job)
        self.training = job.payload.get("mode") == "training"
        tf_keras.backend.set_floatx(job.dtype)
        self.strategy = mirrored.mirrored_strategy(devices)
        with self.dev.scope():
            self.single, self.single_vars = build_mlp(job.payload["builtin"])
        with self.strategy.scope():
            self.model, self.vars = build_mlp(job.payload["builtin"])
            if job.task == TASK:  # one gradient per case: the optimizer that records it
                self.recorder = GradientRecorder()
                self.recorder.build(list(self.vars.values()))
        self._load(self.single_vars)
        self._batches: dict[str, tuple] = {}
        self._steps: dict[tuple[str, str], object] = {}
        self._refusals: list[str] = []

    def _load(self, variables: dict) -> None:
        """The canonical weights into ``variables`` (in a mirrored variable: every replica's copy)."""
        for name, v in variables.items():
            v.assign(np.asarray(self.job.params[name], dtype=v.dtype.as_numpy_dtype))

    def _grads(self, grads) -> dict[str, np.ndarray]:
        """{canonical name: gradient} of a list aligned with ``vars``."""
        return {name: np.asarray(g) for name, g in zip(self.vars, grads)}

    def environment(self) -> dict:
        first = next(iter(self.single_vars.values()))
        device, kind, cc = self.dev.where(first)
        precision = dict(self.dev.precision(), tf_keras_floatx=tf_keras.backend.floatx(), requested=self.job.precision)
        tf32 = bool(kind == "gpu" and cc is not None and tuple(cc) >= (8, 0) and self.job.dtype == "float32"
                    and self.dev.tf32_enabled())
        return dict(environment(self.dev, device, kind, first.dtype.name, precision, tf32), autocast=None,
                    mode=self.job.payload.get("mode", "inference"), layer_options=None, gelu_accuracy=None,
                    replicas=self.r, **mirrored.strategy_facts(self.strategy))

    def batch(self, sharding: str) -> tuple:
        """(x, y, per-replica x, per-replica y, shards) of the global batch: tensors x in the job's dtype, y
        int32, and as tf.distribute splits them."""
        if sharding not in self._batches:
            x, y = global_batch(self.job, sharding)
            with self.dev.scope():
                x, y = tf.constant(x, dtype=self.job.dtype), tf.constant(y, dtype=tf.int32)
            self._batches[sharding] = (x, y, *mirrored.distribute(self.strategy, x, y))
        return self._batches[sharding]

    def compute(self, case: str) -> RawResult:
        """One "CONFIG@SHARDING/METHOD" case (``protocol.parallel``)."""
        c = self.cases.get(case) or parse_case(case, FRAMEWORK)
        x, y, px, py, shards = self.batch(c.sharding)
        n = int(y.shape[0])
        if c.single:
            loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=REDUCTIONS[c.method])
            with self.dev.scope(), tf.GradientTape() as tape:
                loss = loss_fn(y, self.single(x, training=self.training))
            grads = tape.gradient(loss, list(self.single_vars.values()))
            note = f"SparseCategoricalCrossentropy(reduction={REDUCTIONS[c.method]!r}) of the global batch, no strategy"
            return RawResult(float(loss.numpy()), self._grads(grads), engine_info(FRAMEWORK, c, [n], note=note))
        self._load(self.vars)
        for slot in self.recorder.recorded:
            slot.assign(tf.zeros_like(slot))
        self._refusals.clear()
        try:
            per_replica = self.step(c.config, c.method)(px, py, n)
        except Exception:
            if self._refusals:  # tf_keras' own refusal, raised while the step was traced
                raise self.refused(c.config, c.method) from None
            raise
        loss = float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
        grads, spread = mirrored.replica_copies(self.strategy, self.recorder.recorded)
        if c.config == "mirrored_loop":
            what = f"SparseCategoricalCrossentropy(reduction={REDUCTIONS[c.method]!r}) of the replica's shard"
        else:
            what = (f"tf.nn.compute_average_loss(per-example losses{f' * {n}' if c.method == 'sum' else ''}, "
                    f"global_batch_size={n}) of reduction='none'")
        note = (f"tf.function(strategy.run(step)): the tape gradient of {what}, then optimizer.apply_gradients "
                f"(SUM all-reduce); the gradient is what update_step received, replica 0's copy "
                f"({mirrored.agreement(spread)}); the loss is strategy.reduce(SUM) of the replicas' losses")
        return RawResult(loss, self._grads(grads), engine_info(FRAMEWORK, c, shards, note=note))

    def step(self, config: str, method: str):
        """The traced step of a configuration and reduction with the recorder (``engine_step``), one per job."""
        if (config, method) not in self._steps:
            self._steps[(config, method)] = self.engine_step(config, method, self.recorder)
        return self._steps[(config, method)]

    def engine_step(self, config: str, method: str, optimizer):
        """``tf.function(strategy.run(step))``: the replica's tape gradient of its loss and
        ``optimizer.apply_gradients`` (the SUM all-reduce, then the update); returns the replicas' losses. A loss
        tf_keras refuses is noted in ``_refusals`` (its message) before its error propagates."""
        model, variables = self.model, list(self.vars.values())
        if config == "mirrored_loop":
            loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=REDUCTIONS[method])
        else:
            loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=Reduction.NONE)

        def replica_loss(y, logits, n):
            try:
                loss = loss_fn(y, logits)
            except ValueError as exc:
                self._refusals.append(str(exc))
                raise
            if config == "mirrored_loop":
                return loss
            return tf.nn.compute_average_loss(loss * n if method == "sum" else loss, global_batch_size=n)

        def replica_step(x, y, n):
            with tf.GradientTape() as tape:
                loss = replica_loss(y, model(x, training=self.training), n)
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        strategy = self.strategy
        return tf.function(lambda x, y, n: strategy.run(replica_step, args=(x, y, n)))

    def refused(self, config: str, method: str) -> EngineRefused:
        """TF-Keras' own refusal of a loss reduction inside the strategy, noted while the step was traced."""
        return EngineRefused(f"TF-Keras refused {config} with reduction {REDUCTIONS[method]!r} inside "
                             f"MirroredStrategy.run: {' '.join(self._refusals[0].split())}")


#: The optimizer configuration's keys TF-Keras' optimizers have no argument for, and the value that means "none".
_NO_ARGUMENT = {"dampening": 0.0, "eps_root": 0.0}
#: The forms a configuration may force (``OptimizerConfig``) that are TF-Keras' own (as Keras 3's): the lr inside
#: the velocity, epsilon added to the uncorrected sqrt(v), decoupled weight decay.
_OWN_FORMS = {"momentum_form": ("", "velocity"), "epsilon_form": ("", "hat"), "decay_form": ("", "decoupled")}


def optimizer_arguments(config: dict) -> tuple[type, dict]:
    """(the tf_keras optimizer class, its arguments but the learning rate) for an ``OptimizerConfig`` dict, read
    as Keras 3's ``build_optimizer`` reads it (``backends/keras/optimizers.py``: TF-Keras 2.21's SGD, Adam and
    AdamW compute the same updates; weight decay decoupled, scaled by the lr). ValueError for what TF-Keras'
    optimizers cannot do: rendered code, an argument they lack, a form that is not theirs, accumulation."""
    name = config.get("name")
    problems = []
    if config.get("code"):
        problems.append("rendered optimizer code (it is Keras 3's)")
    problems += [f"{key}={config[key]!r}" for key, none in _NO_ARGUMENT.items() if config.get(key, none) != none]
    problems += [f"{key}={config[key]!r}" for key, own in _OWN_FORMS.items() if config.get(key, "") not in own]
    if int(config.get("accumulation", 1)) != 1:
        problems.append(f"accumulation={config['accumulation']!r}")
    if name not in ("sgd", "adam", "adamw"):
        problems.append(f"the optimizer {name!r}")
    if problems:
        raise ValueError(f"TF-Keras' data-parallel trainer builds tf_keras.optimizers.SGD, Adam and AdamW as "
                         f"configured; it cannot build {', '.join(problems)}")
    wd = float(config.get("weight_decay", 0.0))
    # jit_compile=False: the update as written, not an XLA cluster (the gradient recorder's setting too).
    if name == "sgd":
        return tf_keras.optimizers.SGD, {"momentum": float(config["momentum"]), "nesterov": bool(config["nesterov"]),
                                         "weight_decay": wd or None, "jit_compile": False}
    adam = {"beta_1": float(config["beta1"]), "beta_2": float(config["beta2"]), "epsilon": float(config["eps"]),
            "jit_compile": False}
    if name == "adam":
        return tf_keras.optimizers.Adam, {**adam, "weight_decay": wd or None}
    return tf_keras.optimizers.AdamW, {**adam, "weight_decay": wd}


def optimizer_note(config: dict) -> str:
    """One line naming the tf_keras class and arguments the trainer builds, and how the lr is fed."""
    cls, kwargs = optimizer_arguments(config)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (f"tf_keras.optimizers.{cls.__name__}(learning_rate=lrs[0], {args}) [tf_keras {tf_keras.__version__}]; "
            "optimizer.learning_rate = lrs[t-1] before step t (a float variable in floatx, as TF-Keras' "
            "LearningRateScheduler sets it)")


class MirroredTrainer(MirroredSession):
    """Task "data_parallel_train" (contract in ``protocol/parallel.py``): each case trains from ``job.params``
    with a fresh tf_keras optimizer built from its run's config (``optimizer_arguments``), its learning rate
    assigned before every step. "single@even/METHOD": the plain model, the loss with the method's reduction on
    the whole global batch, ``tf.GradientTape`` and ``apply_gradients`` without a strategy; an engine case: the
    custom loop of ``engine_step`` on every global batch as tf.distribute splits it."""

    def __init__(self, job: WorkerJob):
        view = training_view(job, FRAMEWORK)
        for run in view.payload["runs"].values():
            optimizer_arguments(run["optimizer"])  # refused before any model is built
        super().__init__(view)
        self.steps = []
        for x, y in train_batches(view):
            with self.dev.scope():
                x, y = tf.constant(x, dtype=view.dtype), tf.constant(y, dtype=tf.int32)
            self.steps.append((x, y, *mirrored.distribute(self.strategy, x, y)))

    def compute(self, case: str) -> RawResult:
        """One training run ``CONFIG@even/METHOD``: K steps, the parameters after each recorded one (replica
        0's copy for an engine case) and every step's loss (the engine's: strategy.reduce(SUM) of the replicas')."""
        c = self.cases.get(case) or parse_case(case, FRAMEWORK)
        config, lrs, _, record = train_run(self.job, case, len(self.steps))
        cls, kwargs = optimizer_arguments(config)
        variables = self.single_vars if c.single else self.vars
        self._load(variables)
        with self.dev.scope() if c.single else self.strategy.scope():  # the slot variables beside the variables
            optimizer = cls(learning_rate=lrs[0], **kwargs)
            optimizer.build(list(variables.values()))
        step = self.single_step(c.method, optimizer) if c.single else self.engine_step(c.config, c.method, optimizer)
        losses, arrays, spread = [], {}, 0.0
        self._refusals.clear()
        for t, ((x, y, px, py, _), lr) in enumerate(zip(self.steps, lrs), start=1):
            optimizer.learning_rate = lr
            if c.single:
                losses.append(float(step(x, y)))
                values = [np.array(v.numpy(), copy=True) for v in variables.values()]
            else:
                try:
                    per_replica = step(px, py, int(y.shape[0]))
                except Exception:
                    if self._refusals:  # tf_keras' own refusal, raised while the step was traced
                        raise self.refused(c.config, c.method) from None
                    raise
                losses.append(float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)))
                values, copies_spread = mirrored.replica_copies(self.strategy, list(variables.values()))
                spread = max(spread, copies_spread)
            if t in record:
                arrays.update({f"{t}/{name}": v for name, v in zip(variables, values)})
        n = int(self.steps[0][1].shape[0])
        if c.single:
            loop = (f"tf.function(tape gradient of SparseCategoricalCrossentropy(reduction={REDUCTIONS[c.method]!r}) "
                    "of the global batch; optimizer.apply_gradients), no strategy")
            shards = [n]
        else:
            what = (f"SparseCategoricalCrossentropy(reduction={REDUCTIONS[c.method]!r}) of the replica's shard"
                    if c.config == "mirrored_loop" else
                    f"tf.nn.compute_average_loss(per-example losses{f' * {n}' if c.method == 'sum' else ''}, "
                    f"global_batch_size={n}) of reduction='none'")
            loop = (f"tf.function(strategy.run(step)) per global batch: the tape gradient of {what}, then "
                    "optimizer.apply_gradients (SUM all-reduce, then the update); the loss is strategy.reduce(SUM) of "
                    f"the replicas' losses; the parameters are replica 0's copy after each step "
                    f"({mirrored.agreement(spread).replace('of it ', 'of them ')})")
            shards = self.steps[0][4]
        info = {**engine_info(FRAMEWORK, c, shards, note=f"{len(self.steps)} steps; {loop}"),
                "optimizer": optimizer_note(config), "loop": loop}
        return train_result(self.job, arrays, losses, info)

    def single_step(self, method: str, optimizer):
        """The traced single-device step: the tape gradient of the method's tf_keras loss of the whole global
        batch and ``optimizer.apply_gradients`` (no strategy: nothing to all-reduce); returns the loss."""
        model, variables = self.single, list(self.single_vars.values())
        loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=REDUCTIONS[method])

        def step(x, y):
            with self.dev.scope(), tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=self.training))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss
        return tf.function(step)


def open_session(job: WorkerJob) -> MirroredSession:
    """Task "data_parallel": R logical CPU devices (before any tensor), the strategy, the built-in MLP plain and
    mirrored, loaded with ``job.params``. Task "data_parallel_train": the same, with the runs' optimizers
    checked first (``MirroredTrainer``)."""
    if job.task == TRAIN_TASK:
        return MirroredTrainer(job)
    if job.task != TASK:
        raise ValueError(f"backends/tf_keras/parallel.py runs {TASK!r} and {TRAIN_TASK!r} jobs, not {job.task!r}")
    return MirroredSession(job)
