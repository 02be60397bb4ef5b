"""Keras 3 backend for a user's own ``keras.Model`` (task 'model_check'; contract in ``protocol``).

Imported only inside a worker process, with KERAS_BACKEND already set to
``job.variant`` ("tensorflow", "jax" or "torch"). Keras stores kernels in the
canonical layout (Dense (in, out), conv (*window, in, out)) and images
channels-last, so nothing is transposed; normalization ``gamma``/``beta`` are
"scale"/"bias", BatchNormalization's moving statistics "mean"/"var".

Device choice, precision pinning and the reduction methods' autodiff are the
built-in MLP's, per Keras backend (``keras.session``'s variant classes: a
``tf.GradientTape``, ``jax.value_and_grad``/``jax.vjp`` over
``stateless_call``, or ``loss.backward()``); they are handed the user's model
in the job's mode and loss callables keyed by Keras' reductions, "none" being
each example's summed loss. A forward pass may write state (BatchNormalization's
moving statistics in training mode, a Dropout's seed, torch's global generator
for an unseeded Dropout on Keras' torch backend): every case first puts it
back as it was after loading, so it starts from scratch.

Layers' calls are recorded by wrapping each layer instance's ``call`` for the
length of one eager forward pass (``Operation.__call__`` looks ``self.call``
up on every call, so an instance attribute is seen, then removed). A layer
with a fused activation (``Dense(..., activation="relu")``) returns the
activation's output; it is flagged ``fused_activation`` so that core does not
compare it with another framework's affine output.

On Keras' jax and torch backends, float64 is not always float64: Keras' type
promotion turns float64 results into float32 in some ops (keras 3.15: torch
``matmul``, the "sum_over_batch_size" division, jax ``tanh``, the
normalization layers on both). That is Keras' own behaviour and is kept;
``environment()`` names the ops one forward pass and its losses demoted
(``precision['keras_demoted_ops']``) and reports float32 as the dtype.
"""
from __future__ import annotations

import contextlib
import sys

import keras
import numpy as np

from gradparity.backends.keras.session import _SIGNIFICAND_BITS, _VARIANTS, environment
from gradparity.backends.protocol import (RawResult, WorkerJob, assignment, gelu_accuracy, layer_options, load_factory,
                                         ModelTraining)

_KERNEL_LAYERS = {"Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
                  "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D"}
_NORM_LAYERS = {"BatchNormalization", "LayerNormalization", "GroupNormalization", "RMSNormalization"}
#: Keras' name of each reduction method's reduction (the variants' loss callables are keyed so).
_REDUCTIONS = {"mean": "sum_over_batch_size", "sum": "sum"}


def _role(layer, variable) -> str:
    """The canonical role of a layer's own variable, from the layer's classes and the variable's name."""
    kinds, name = {c.__name__ for c in type(layer).__mro__}, variable.name
    if name == "bias":
        return "bias"
    if name == "kernel" and kinds & _KERNEL_LAYERS:
        return "kernel"
    if name == "embeddings" and "Embedding" in kinds:
        return "embedding"
    if kinds & _NORM_LAYERS:
        return {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_variance": "var"}.get(name, "other")
    return "other"


def _is_float(variable) -> bool:
    return "float" in keras.backend.standardize_dtype(variable.dtype)


def _owned(layer) -> list:
    """The layer's own floating variables (not its sublayers'; no seed-generator state), trainable first."""
    return [v for v in (*layer._trainable_variables, *layer._non_trainable_variables) if _is_float(v)]


def _fused(layer) -> bool:
    """Whether the layer's output is its activation's (``Dense(..., activation="relu")``), not affine."""
    activation = getattr(layer, "activation", None)
    return activation is not None and getattr(activation, "__name__", None) != "linear"


def _numpy(tensor) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def _is_tensor(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


class _InMode:
    """The user's model as the variants' autodiff sees it: that code, written for the built-in MLP, calls
    with ``training=True``; every call here runs in the job's mode instead."""

    def __init__(self, model, training: bool):
        self.model, self.training = model, training
        self.trainable_variables = model.trainable_variables
        self.non_trainable_variables = model.non_trainable_variables

    def __call__(self, x, training=None):
        return self.model(x, training=self.training)

    def stateless_call(self, trainable, non_trainable, x, training=None):
        return self.model.stateless_call(trainable, non_trainable, x, training=self.training)


def _dense(grad):
    """TensorFlow's gradient of an embedding lookup is ``IndexedSlices``, which has no ``+``: made dense."""
    if type(grad).__name__ != "IndexedSlices":
        return grad
    import tensorflow as tf  # only TensorFlow makes them; keras.ops.convert_to_tensor keeps them sparse

    return tf.convert_to_tensor(grad)


def _autodiff_class(variant: str):
    """The variant's autodiff, where the gradients TensorFlow gives besides dense tensors add up too: None
    (a variable the loss never reaches, e.g. a layer never called) as nothing, ``IndexedSlices`` made
    dense; the MLP's accumulators assume dense gradients for every variable."""
    base = _VARIANTS[variant]

    def _add(total, grads):
        grads = [_dense(g) for g in grads]
        if total is None:
            return grads
        return [b if a is None else a if b is None else a + b for a, b in zip(total, grads)]

    return type(f"User{base.__name__}", (base,), {"_add": staticmethod(_add)})


@contextlib.contextmanager
def _demotions(seen: set):
    """Collect into ``seen`` the Keras ops whose type promotion turned float64 into float32 meanwhile.

    Keras' ``result_type`` maps float64 to float32 through its table ``BIT64_TO_BIT32_DTYPE`` on every
    backend but TensorFlow; the table is swapped for one that notes the op asking (the first caller
    outside ``dtypes``; a layer's ``call`` by its class). Without that table (another Keras release)
    nothing is noted.
    """
    from keras.src.backend.common import dtypes

    table = getattr(dtypes, "BIT64_TO_BIT32_DTYPE", None)
    if not isinstance(table, dict):
        yield
        return

    class Noting(dict):
        def get(self, key, default=None):
            out = super().get(key, default)
            if key == "float64" and out != "float64":
                frame = sys._getframe(1)
                while frame is not None and frame.f_code.co_filename == dtypes.__file__:
                    frame = frame.f_back
                if frame is not None:  # the op, or Layer.call as e.g. "BatchNormalization.call"
                    owner = frame.f_locals.get("self")
                    seen.add(f"{type(owner).__name__}.{frame.f_code.co_name}" if owner is not None
                             else frame.f_code.co_name)
            return out

    dtypes.BIT64_TO_BIT32_DTYPE = Noting(table)
    try:
        yield
    finally:
        dtypes.BIT64_TO_BIT32_DTYPE = table


class UserKerasModel:
    """The user's model in floatx = the job's dtype, on the job's Keras backend; answers every model_check case."""

    def __init__(self, job: WorkerJob):
        self.variant = job.variant or "tensorflow"
        if keras.backend.backend() != self.variant:
            raise RuntimeError(f"Keras runs on {keras.backend.backend()!r} but the job asks for {self.variant!r}; "
                               "KERAS_BACKEND must be set before keras is imported")
        self.job = job
        self.ad = _autodiff_class(self.variant)(job)  # device choice and precision, before any tensor exists
        self.training = job.payload.get("mode") == "training"
        keras.config.set_floatx(job.dtype)  # the factory's layers create their variables in the job's dtype
        factory = load_factory(job)
        # Keras numbers auto-named layers per process: start from zero, so the describe job and the mapped
        # jobs name the variables alike whatever the user's module built at import.
        keras.backend.clear_session()
        with self.ad.scope():
            model = factory()
            if not isinstance(model, keras.Model):
                kind = type(model)
                raise TypeError(f"the keras factory {job.payload['factory']} returned {kind.__module__}."
                                f"{kind.__qualname__}, not a keras.Model")
            # Integers (token ids, class labels) as int32: jax without x64 has no int64.
            x = np.asarray(job.batch["x"])
            self.x = keras.ops.convert_to_tensor(x, dtype=job.dtype if x.dtype.kind == "f" else
                                                 "int32" if x.dtype.kind in "iu" else None)
            self.y = keras.ops.convert_to_tensor(job.batch["y"], dtype=job.dtype if job.payload["loss"] == "mse"
                                                 else "int32")
            if not model.built:
                model(self.x, training=False)
        self.model = model
        self.layers = list(model._flatten_layers(include_self=True, recursive=True))
        self.owners = self._name_variables()  # native name -> (layer, variable)
        self.native = {id(v): name for name, (_, v) in self.owners.items()}
        self.assign = assignment(job)
        if self.assign is not None:
            self._load(self.assign)
        # The state every case starts from (after loading): see the module docstring.
        self._state = [(v, _numpy(v.value)) for v in model.non_trainable_variables]
        if self.variant == "torch":  # an unseeded Dropout on Keras' torch backend draws from torch's generator
            import torch

            self._torch_rng = torch.random.get_rng_state(), torch.cuda.get_rng_state_all()
        self.ad.bind(_InMode(model, self.training), self._losses())
        self.ad.fed_alone = list(range(int(self.y.shape[0])))  # one_by_one feeds every example

    def _name_variables(self) -> dict:
        """Each floating variable's native name: its Keras path, or "layer name/variable name" where two paths
        coincide; a variable two layers hold (tied weights) belongs to the first."""
        pairs, seen = [], set()
        for layer in self.layers:
            for v in _owned(layer):
                if id(v) not in seen:
                    seen.add(id(v))
                    pairs.append((layer, v))
        paths = [v.path for _, v in pairs]
        owners = {}
        for layer, v in pairs:
            name = v.path if paths.count(v.path) == 1 else f"{layer.name}/{v.name}"
            if name in owners:
                raise ValueError(f"two variables of the model are both named {name!r}; give their layers "
                                 "distinct names")
            owners[name] = (layer, v)
        return owners

    def _load(self, assign: dict[str, str]) -> None:
        """Overwrite the model's variables with the canonical arrays core mapped onto them."""
        for native, key in assign.items():
            if native not in self.owners:
                raise ValueError(f"{native}: the model has no variable of that name (it has: "
                                 f"{', '.join(self.owners)})")
            _, variable = self.owners[native]
            # The variable's dtype is the job's (floatx) unless the user's layer pinned its own.
            value = np.asarray(self.job.params[key], dtype=keras.backend.standardize_dtype(variable.dtype))
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"{native}: mapped value has shape {value.shape}, the layer's is "
                                 f"{tuple(variable.shape)}")
            variable.assign(value)

    def _restore(self) -> None:
        """Put back the state a forward pass may have written (moving statistics, seeds, torch's generator)."""
        for variable, value in self._state:
            variable.assign(value)
        if self.variant == "torch":
            import torch

            torch.random.set_rng_state(self._torch_rng[0])
            torch.cuda.set_rng_state_all(self._torch_rng[1])

    def environment(self) -> dict:
        dtypes, demoted = {keras.backend.standardize_dtype(v.dtype) for v in self.model.weights if _is_float(v)}, set()
        try:  # what the model really computes in: Keras' type promotion, or a layer of the user's own dtype
            with self.ad.scope(), _demotions(demoted):
                out, _, records = self._trace()
                for reduction in ("none", "sum", "sum_over_batch_size"):
                    self.ad.losses[reduction](self.y, out)
            self._restore()
            dtypes |= {keras.backend.standardize_dtype(t.dtype) for rec in records.values()
                       for t in (rec["output"], out) if t is not None}
        except Exception:  # noqa: BLE001 - a broken forward pass is each case's error, not the setup's
            pass
        if demoted:
            dtypes.add("float32")
        # The narrowest dtype anything computed in bounds the precision of the whole run.
        dtype = min((d for d in dtypes if d in _SIGNIFICAND_BITS), key=_SIGNIFICAND_BITS.get, default=self.job.dtype)
        device, kind, cc = self.ad.where(self.model.weights[0]) if self.model.weights else ("cpu", "cpu", None)
        # Keras' torch backend convolves with cuDNN, whose TF32 switch is on unless precision was pinned
        # (the variant's tf32_enabled reads cuBLAS', all the MLP needs).
        tf32_allowed = self.ad.tf32_enabled() or (self.variant == "torch" and self.job.precision != "highest")
        precision = dict(self.ad.precision(), keras_floatx=keras.config.floatx(),
                         keras_demoted_ops=sorted(demoted), requested=self.job.precision)
        tf32 = bool(kind == "gpu" and cc is not None and tuple(cc) >= (8, 0) and dtype == "float32" and tf32_allowed)
        return dict(environment(self.ad, device, kind, dtype, precision, tf32),
                    mode=self.job.payload.get("mode", "inference"), layer_options=layer_options(self.job),
                    gelu_accuracy=self._gelu_accuracy())

    def _gelu_accuracy(self) -> dict | None:
        """keras.activations.gelu (what the built-in models use) measured in the job's dtype."""
        def gelu(x, approximate):
            with self.ad.scope():
                return _numpy(keras.activations.gelu(keras.ops.convert_to_tensor(x), approximate=approximate))
        return gelu_accuracy(self.job, gelu)

    # -- the loss, natively ------------------------------------------------------------------------

    def _loss(self, out, y, reduction: str):
        """Keras' own loss objects with Keras' reduction ("sum_over_batch_size": the mean over every loss
        term, N x T ... for cross-entropy, every output for mse; "sum"; "none": (N, ...))."""
        if self.job.payload["loss"] == "mse":
            # MeanSquaredError averages the last axis first (its mean over the rest is the mean over all).
            if reduction == "sum_over_batch_size":
                return keras.losses.MeanSquaredError(reduction=reduction, dtype=self.job.dtype)(y, out)
            # Native `*`, not keras.ops: Keras' type promotion may demote float64 (see the module docstring).
            per = keras.losses.MeanSquaredError(reduction="none", dtype=self.job.dtype)(y, out) * out.shape[-1]
            return per if reduction == "none" else keras.ops.sum(per)
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction,
                                                          dtype=self.job.dtype)(y, out)

    def _losses(self) -> dict:
        """The loss callables (y, logits) the variants' autodiff reads, keyed by Keras' reductions; "none" is
        each example's sum of its loss terms, (N,), whose N backward passes none_loop runs."""
        def per_example(y, out):
            losses = self._loss(out, y, "none")
            return keras.ops.sum(keras.ops.reshape(losses, (losses.shape[0], -1)), axis=1)

        losses = {r: (lambda y, out, r=r: self._loss(out, y, r)) for r in ("sum", "sum_over_batch_size")}
        return dict(losses, none=per_example)

    def _grads(self, grads) -> dict[str, np.ndarray]:
        """Canonical gradients of the mapped trainable variables, keyed as core keyed their values; ``grads``
        is aligned with ``model.trainable_variables`` (None: the loss does not reach it, a zero gradient)."""
        by_name = {self.native[id(v)]: (np.zeros(v.shape, keras.backend.standardize_dtype(v.dtype)) if g is None
                                        else _numpy(g))
                   for v, g in zip(self.model.trainable_variables, grads) if id(v) in self.native}
        return {key: by_name[native] for native, key in self.assign.items() if native in by_name}

    # -- the cases ----------------------------------------------------------------------------------

    def compute(self, case: str) -> RawResult:
        """Run one case from scratch (the written state restored, a fresh backward pass each time)."""
        with self.ad.scope():
            self._restore()
            if case == "describe":
                return self._describe()
            if case == "forward":
                return self._forward()
            if case in _REDUCTIONS:
                loss, grads = self.ad.reduced(_REDUCTIONS[case], self.x, self.y, [])
                return RawResult(float(_numpy(loss)), self._grads(grads))
            if case in ("none_loop", "one_by_one"):
                # none_loop: the per-example sums of one forward pass; one_by_one: each example's mean.
                losses, grads = getattr(self.ad, case)(self.x, self.y, [])
                parts = losses if isinstance(losses, list) else [losses]
                return RawResult(float(sum(np.sum(_numpy(p), dtype=np.float64) for p in parts)), self._grads(grads))
        raise ValueError(f"unknown case {case!r}")

    @contextlib.contextmanager
    def _recording(self, records: dict, calls: list, perturb=None):
        """Wrap every layer instance's ``call``: note every leaf's (and variable owner's) call in ``calls``, and
        each owner's first call's input and output in ``records`` (by layer name); ``perturb(name, output)``,
        when given, replaces that first output (to differentiate with respect to it)."""
        owners = {id(layer) for layer, _ in self.owners.values()}
        wrapped = []
        for layer in self.layers:
            if id(layer) not in owners and layer._layers:
                continue  # a container owning nothing itself: its leaves are recorded
            original = layer.call

            def call(*args, _original=original, _layer=layer, **kwargs):
                out = _original(*args, **kwargs)
                calls.append((_layer.name, type(_layer).__name__))
                if id(_layer) in owners and _layer.name not in records:
                    records[_layer.name] = {"layer": _layer,
                                            "input": args[0] if args and _is_tensor(args[0]) else None,
                                            "output": out if _is_tensor(out) else None}
                    if perturb is not None and _is_tensor(out):
                        out = perturb(_layer.name, out)
                return out

            object.__setattr__(layer, "call", call)  # past Layer.__setattr__'s tracking
            wrapped.append(layer)
        try:
            yield
        finally:
            for layer in wrapped:
                object.__delattr__(layer, "call")

    def _trace(self, perturb=None, state=None):
        """Forward the batch with every call recorded; returns (logits, calls, records). ``state``:
        (trainable, non-trainable values) to run ``stateless_call`` on (inside a jax transform)."""
        records, calls = {}, []
        with self._recording(records, calls, perturb):
            if state is None:
                out = self.model(self.x, training=self.training)
            else:
                out, _ = self.model.stateless_call(*state, self.x, training=self.training)
        return out, calls, records

    def _describe(self) -> RawResult:
        # Values before the forward pass: in training mode it moves the normalizations' statistics.
        values = {name: _numpy(v.value) for name, (_, v) in self.owners.items()}
        out, calls, records = self._trace()
        called = [rec["layer"] for rec in records.values()]
        owning = list(dict.fromkeys(layer for layer, _ in self.owners.values()))
        layers = []
        for layer in called + [layer for layer in owning if layer.name not in records]:
            params = [{"name": name, "role": _role(layer, v), "shape": list(v.shape), "trainable": bool(v.trainable)}
                      for name, (owner, v) in self.owners.items() if owner is layer]
            layers.append({"name": layer.name, "type": type(layer).__name__, "called": layer.name in records,
                           "fused_activation": _fused(layer), "params": params})
        info = {"layers": layers, "calls": [list(c) for c in calls], "output_shape": [int(d) for d in out.shape]}
        return RawResult(float("nan"), values, info)  # no loss: core checks the targets against the output first

    def _forward(self) -> RawResult:
        """Each called owner's first input and output, d(mean loss)/d(output), the logits and the mean loss.

        TensorFlow's tape differentiates with respect to the recorded outputs themselves; on jax and torch a
        zero is added to each (``perturb``) and the loss differentiated with respect to those zeros.
        """
        mean = self.ad.losses["sum_over_batch_size"]
        if self.variant == "tensorflow":
            with self.ad.tf.GradientTape() as tape:
                out, _, records = self._trace()
                loss = mean(self.y, out)
            outputs = {n: rec["output"] for n, rec in records.items() if rec["output"] is not None}
            grads = dict(zip(outputs, tape.gradient(loss, list(outputs.values()))))
        elif self.variant == "torch":
            import torch

            zeros = {}

            def perturb(name, output):
                zeros[name] = torch.zeros_like(output, requires_grad=True)
                return output + zeros[name]

            out, _, records = self._trace(perturb)
            loss = mean(self.y, out)
            grads = dict(zip(zeros, torch.autograd.grad(loss, list(zeros.values()), allow_unused=True)
                             if zeros else ()))
        else:
            import jax

            # Pure in the perturbations: stateless_call on the values every case starts from.
            state = ([v.value for v in self.model.trainable_variables],
                     [v.value for v in self.model.non_trainable_variables])
            _, _, shapes = self._trace(state=state)
            zeros = {n: jax.numpy.zeros_like(rec["output"]) for n, rec in shapes.items() if rec["output"] is not None}

            def mean_loss(zeros):
                out, _, records = self._trace(lambda name, output: output + zeros[name], state)
                arrays = {n: {"input": rec["input"], "output": rec["output"]} for n, rec in records.items()}
                return mean(self.y, out), (out, arrays)

            (loss, (out, records)), grads = jax.value_and_grad(mean_loss, has_aux=True)(zeros)
            records = {name: records[name] for name in shapes}  # jax returns dicts sorted by key
        arrays = {"logits": _numpy(out)}
        for k, (name, rec) in enumerate(records.items()):
            if rec["input"] is not None:
                arrays[f"input/{k}"] = _numpy(rec["input"])
            if rec["output"] is not None:
                arrays[f"output/{k}"] = _numpy(rec["output"])
                if grads.get(name) is not None:
                    arrays[f"grad_output/{k}"] = _numpy(grads[name])
        return RawResult(float(_numpy(loss)), arrays, {"layers": list(records)})


class KerasModelTraining(ModelTraining):
    """Task "model_train" for a built-in model or a user's: the model of ``UserKerasModel`` trained with Keras' own
    optimizer, as ``train.py`` trains the MLP (the variant's single-backward gradient, then
    ``optimizer.apply(grads, model.trainable_variables)``, eagerly).

    Opened on batch 1; every batch converted once. Each ``compute(case)`` assigns the canonical start again,
    builds a fresh optimizer and returns the canonical trainable values after the recorded steps ("T/KEY") and
    every step's loss ("loss/T"); "mean" is Keras' "sum_over_batch_size" (every loss term, N·T for tokens).
    """

    def __init__(self, job: WorkerJob):
        super().__init__(job, UserKerasModel)

    def convert(self, x, y):
        """(x, y) as the backend's tensors on the chosen device: float inputs in the job's dtype, ids and class
        targets int32 (jax without x64 has no int64), mse targets in the job's dtype."""
        with self.model.ad.scope():
            return (keras.ops.convert_to_tensor(x, dtype=self.job.dtype if np.asarray(x).dtype.kind == "f"
                                                else "int32"),
                    keras.ops.convert_to_tensor(y, dtype=self.job.dtype if self.job.payload["loss"] == "mse"
                                                else "int32"))

    def compute(self, case: str) -> RawResult:
        from gradparity.backends.keras.optimizers import build_optimizer, StepTable, environment_note

        m = self.model
        batches, config, lrs, reduction, record = self.settings(case)
        variables = m.model.trainable_variables
        keys = {native: key for native, key in m.assign.items()}
        out: dict[str, np.ndarray] = {}
        with m.ad.scope():
            m._load(m.assign)
            m._restore()
            optimizer = build_optimizer(config, StepTable(lrs, self.job.dtype))
            optimizer.build(variables)
            for t, (x, y) in enumerate(batches, start=1):
                loss, grads = m.ad.reduced(_REDUCTIONS[reduction], x, y, [])
                optimizer.apply(grads, variables)
                out[f"loss/{t}"] = np.array(_numpy(loss), copy=True)
                if t in record:
                    out.update({f"{t}/{keys[m.native[id(v)]]}": np.array(_numpy(v.value), copy=True)
                                for v in variables if m.native.get(id(v)) in keys})
        return RawResult(float(out[f"loss/{len(batches)}"]), out,
                         {"optimizer": environment_note(config),
                          "loop": "loss, grads = the variant's single-backward gradient of "
                                  "SparseCategoricalCrossentropy(from_logits=True, reduction=REDUCTION); "
                                  "optimizer.apply(grads, model.trainable_variables)"})


def open_session(job: WorkerJob) -> UserKerasModel | KerasModelTraining:
    """Build the user's model (or the built-in one) in floatx = the job's dtype, load mapped weights; task
    "model_train" trains it (``KerasModelTraining``)."""
    return KerasModelTraining(job) if job.task == "model_train" else UserKerasModel(job)
