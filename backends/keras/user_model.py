"""Keras 3 backend for a user's own ``keras.Model`` (task 'model_check'; contract in ``protocol``).

Imported only inside a worker process, with KERAS_BACKEND already set. Keras
stores kernels in the canonical layout (Dense (in, out), conv (*window, in,
out)) and images channels-last, so nothing is transposed; BatchNormalization
and LayerNormalization's ``gamma``/``beta`` are "scale"/"bias". Gradients are
TensorFlow's (``tf.GradientTape``): this backend runs on Keras' TensorFlow
backend; on its jax and torch backends it refuses with a clear message.

Layers' calls are recorded by wrapping each layer instance's ``call`` for the
duration of one eager forward pass (``Layer.__call__`` looks ``self.call`` up
on every call, so an instance attribute is seen and then removed). A layer
with a fused activation (``Dense(..., activation="relu")``) returns the
activation's output; it is flagged ``fused_activation`` so that core does not
compare it with another framework's affine output.
"""
from __future__ import annotations

import contextlib

import keras
import numpy as np

from gradparity.backends.keras.session import _TensorFlow
from gradparity.backends.protocol import RawResult, WorkerJob, load_factory, package_versions

_KERNEL_LAYERS = ("Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D")
_NORM_LAYERS = ("BatchNormalization", "LayerNormalization", "GroupNormalization", "RMSNormalization",
                "UnitNormalization")


def _role(layer, variable) -> str:
    """The canonical role of a layer's own variable, from the layer's class and the variable's name."""
    name = variable.name
    kinds = {c.__name__ for c in type(layer).__mro__}
    if name == "bias":
        return "bias"
    if name == "kernel" and kinds & set(_KERNEL_LAYERS):
        return "kernel"
    if name == "embeddings" and "Embedding" in kinds:
        return "embedding"
    if kinds & set(_NORM_LAYERS):
        return {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_variance": "var"}.get(name, "other")
    return "other"


def _owned(layer) -> list:
    """The layer's own variables (not its sublayers'), trainable first."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def _fused(layer) -> bool:
    activation = getattr(layer, "activation", None)
    return activation is not None and activation not in (keras.activations.linear, None)


class UserKerasModel:
    """The user's model in floatx = the job's dtype, on TensorFlow; answers every model_check case."""

    def __init__(self, job: WorkerJob):
        if keras.backend.backend() != "tensorflow":
            raise NotImplementedError(
                f"gradparity check runs Keras models on the TensorFlow backend only (this worker has Keras on "
                f"{keras.backend.backend()!r}); use --keras-backend tensorflow")
        self.job = job
        self.ad = _TensorFlow(job)  # device choice and TF32 pinning, before any tensor exists
        self.tf = self.ad.tf
        keras.config.set_floatx(job.dtype)
        self.training = job.payload.get("mode") == "training"
        with self.ad.scope():
            model = load_factory(job)()
            if not isinstance(model, keras.Model):
                raise TypeError(f"the keras factory {job.payload['factory']} returned {type(model).__name__}, "
                                "not a keras.Model")
            x = job.batch["x"]
            self.x = self.tf.convert_to_tensor(x, dtype=job.dtype if x.dtype.kind == "f" else x.dtype)
            y = job.batch["y"]
            self.y = self.tf.convert_to_tensor(y, dtype=job.dtype if job.payload["loss"] == "mse" else "int64")
            if not model.built:
                model(self.x[:1], training=False)
        self.model = model
        self.layers = [layer for layer in model._flatten_layers(include_self=True, recursive=True)]
        self.owners = {}
        for layer in self.layers:
            for v in _owned(layer):
                self.owners[v.path] = (layer, v)
        if job.payload.get("assign") is not None:
            self._load(job.payload["assign"])

    def _load(self, assign: dict[str, str]) -> None:
        for native, key in assign.items():
            _, variable = self.owners[native]
            value = np.asarray(self.job.params[key], dtype=self.job.dtype)
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"{native}: mapped value has shape {value.shape}, the layer's is "
                                 f"{tuple(variable.shape)}")
            variable.assign(value)

    def environment(self) -> dict:
        device, kind, _ = self.ad.where(self.model.weights[0]) if self.model.weights else ("cpu", "cpu", None)
        return {
            "framework": "keras",
            "versions": package_versions(*self.ad.packages),
            "device": device,
            "device_kind": kind,
            "device_note": self.ad.device_note,
            "dtype": self.job.dtype,
            "precision": dict(self.ad.precision(), requested=self.job.precision),
            "tf32": kind == "gpu" and self.job.dtype == "float32" and self.ad.tf32_enabled(),
            "mode": self.job.payload.get("mode", "inference"),
            "keras_backend": keras.backend.backend(),
        }

    # -- the loss, natively ------------------------------------------------------------------------

    def _loss(self, out, y, reduction: str):
        """Keras' own loss objects: "mean" is "sum_over_batch_size", the mean over every loss term."""
        if self.job.payload["loss"] == "mse":
            if reduction == "mean":
                return keras.losses.MeanSquaredError(reduction="sum_over_batch_size")(y, out)
            # MeanSquaredError averages the last axis first: times its size, that is the sum over it.
            per = keras.losses.MeanSquaredError(reduction="none")(y, out) * out.shape[-1]
            return per if reduction == "none" else self.tf.reduce_sum(per)
        keras_reduction = {"mean": "sum_over_batch_size", "sum": "sum", "none": "none"}[reduction]
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=keras_reduction)(y, out)

    def _grads(self, grads) -> dict[str, np.ndarray]:
        variables = self.model.trainable_variables
        by_path = {v.path: (np.zeros(v.shape, self.job.dtype) if g is None else np.asarray(g))
                   for v, g in zip(variables, grads)}
        return {key: by_path[native] for native, key in self.job.payload["assign"].items() if native in by_path}

    # -- the cases ----------------------------------------------------------------------------------

    def compute(self, case: str) -> RawResult:
        """Run one case from scratch (a fresh tape each time)."""
        tf = self.tf
        with self.ad.scope():
            if case == "describe":
                return self._describe()
            if case == "forward":
                return self._forward()
            variables = self.model.trainable_variables
            x, y = self.x, self.y
            if case in ("mean", "sum"):
                with tf.GradientTape() as tape:
                    loss = self._loss(self.model(x, training=self.training), y, case)
                return RawResult(float(loss), self._grads(tape.gradient(loss, variables)))
            if case == "none_loop":
                with tf.GradientTape(persistent=True) as tape:  # persistent = torch's retain_graph
                    losses = self._loss(self.model(x, training=self.training), y, "none")
                    per_example = tf.reduce_sum(tf.reshape(losses, (losses.shape[0], -1)), axis=1)
                    parts = tf.unstack(per_example)  # inside the tape, so each part has a gradient
                total = None
                for part in parts:
                    g = tape.gradient(part, variables)
                    total = g if total is None else [a if b is None else (b if a is None else a + b)
                                                     for a, b in zip(total, g)]
                del tape
                return RawResult(float(tf.reduce_sum(per_example)), self._grads(total))
            if case == "one_by_one":
                total, loss_sum = None, 0.0
                for i in range(int(x.shape[0])):
                    with tf.GradientTape() as tape:
                        loss = self._loss(self.model(x[i:i + 1], training=self.training), y[i:i + 1], "mean")
                    g = tape.gradient(loss, variables)
                    total = g if total is None else [a if b is None else (b if a is None else a + b)
                                                     for a, b in zip(total, g)]
                    loss_sum += float(loss)
                return RawResult(loss_sum, self._grads(total))
        raise ValueError(f"unknown case {case!r}")

    @contextlib.contextmanager
    def _recording(self, records: dict, calls: list):
        """Wrap every layer instance's ``call`` to record (first call) its input and output, and every call."""
        owners = {id(layer) for layer in self.layers if _owned(layer)}
        wrapped = []
        for layer in self.layers:
            if layer is self.model and not _owned(layer):
                continue
            original = layer.call

            def call(*args, _original=original, _layer=layer, **kwargs):
                out = _original(*args, **kwargs)
                if not _layer._layers or id(_layer) in owners:
                    calls.append((_layer.name, type(_layer).__name__))
                if id(_layer) in owners and _layer.name not in records:
                    records[_layer.name] = {"layer": _layer, "input": args[0] if args else None, "output": out}
                return out

            object.__setattr__(layer, "call", call)
            wrapped.append(layer)
        try:
            yield
        finally:
            for layer in wrapped:
                object.__delattr__(layer, "call")

    def _describe(self) -> RawResult:
        records, calls = {}, []
        with self._recording(records, calls):
            out = self.model(self.x, training=self.training)
        called = [records[name]["layer"] for name in records]
        never = [layer for layer in self.layers if _owned(layer) and layer.name not in records]
        layers, values = [], {}
        for layer in called + never:
            params = []
            for v in _owned(layer):
                values[v.path] = np.asarray(v.numpy())
                params.append({"name": v.path, "role": _role(layer, v), "shape": list(v.shape),
                               "trainable": bool(v.trainable)})
            layers.append({"name": layer.name, "type": type(layer).__name__, "called": layer.name in records,
                           "fused_activation": _fused(layer), "params": params})
        info = {"layers": layers, "calls": [list(c) for c in calls], "output_shape": list(out.shape)}
        return RawResult(float("nan"), values, info)  # no loss: core checks the targets against the output first

    def _forward(self) -> RawResult:
        records, calls = {}, []
        with self.tf.GradientTape() as tape, self._recording(records, calls):
            out = self.model(self.x, training=self.training)
            loss = self._loss(out, self.y, "mean")
        names = list(records)
        outputs = [records[n]["output"] for n in names]
        grads = tape.gradient(loss, outputs)
        arrays = {"logits": np.asarray(out)}
        for k, name in enumerate(names):
            rec = records[name]
            if rec["input"] is not None and hasattr(rec["input"], "shape"):
                arrays[f"input/{k}"] = np.asarray(rec["input"])
            arrays[f"output/{k}"] = np.asarray(rec["output"])
            if grads[k] is not None:
                arrays[f"grad_output/{k}"] = np.asarray(grads[k])
        return RawResult(float(loss), arrays, {"layers": names})


def open_session(job: WorkerJob) -> UserKerasModel:
    """Import the user's factory, build the model in floatx = the job's dtype, load mapped weights."""
    return UserKerasModel(job)
