"""Keras 3 backend: the canonical MLP as a functional ``keras.Model`` of Keras' own layers.

The point of this backend is Keras' *own* reduction semantics: every loss
is a ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)`` with
Keras' reductions ("none", "sum", and "sum_over_batch_size" for ``mean``,
which divides by the number of elements of the per-example loss tensor).

One code path builds the model, loads the weights, holds the loss objects
and converts results; only the autodiff differs per Keras backend
(``job.variant``, already in ``KERAS_BACKEND`` before this module is
imported). Each variant is a small class with the same method names:

``reduced(reduction, x, y, masks, sample_weight=None) -> (loss, grads)``
    one reduced loss, one backward (``sum``, ``mean``; a training run's weighted reductions pass the
    batch's per-example ``sample_weight`` to the loss object);
``none_loop(x, y, masks) -> (losses, grads)``
    the "none" loss vector from one forward, one backward per example, summed;
``none_vectorized(x, y, masks) -> (losses, grads)``
    per-example gradients from one vectorized call, then summed;
``one_by_one(x, y, masks) -> (losses, grads)``
    each example alone, mean-reduced, one backward each, summed.

``grads`` is a list aligned with ``model.trainable_variables``, in the
framework's own tensors; ``losses`` are the per-example loss values.
``masks`` are the switch 'dropout''s keep-masks, a list of one (N, H)
tensor per hidden layer, empty when dropout is off (see ``_feed``).

Every forward pass runs with ``training=True``: with the switch 'batchnorm'
the ``BatchNormalization`` layers then normalize with the statistics of the
batch they see, as a training step does (an example fed alone, in
``one_by_one`` or as one vectorized example, is a batch of one).

float64 is not always float64 here: Keras' type promotion
(``keras.backend.result_type``) maps float64 results to float32 on its jax
and torch backends, and some ops use it (keras 3.15.1: torch ``matmul`` and
the "sum_over_batch_size" division, jax ``tanh``). That is Keras' own
behaviour, so it is kept, and ``environment()`` reports the narrowest dtype
any op computed in, with each op's dtype under ``precision``. The same holds
for ``BatchNormalization``, which computes in ``result_type(input, "float32")``.
"""
from __future__ import annotations

import contextlib

import keras
import numpy as np

from gradparity.backends.protocol import (IGNORE_INDEX, SEPARATE_FORWARD, CaseInputs, DeviceUnavailable, RawResult,
                                          WorkerJob, jax_precision_is_full_f32, package_versions)

#: Keras' reduction name for each single-backward method.
_REDUCTIONS = {"sum": "sum", "mean": "sum_over_batch_size"}
_METHODS = ("none_loop", "none_vectorized", "sum", "mean", "one_by_one")


def _feed(x, masks):
    """The model's inputs: ``x`` alone, or ``[x, mask_0, mask_1, ...]`` when the switch 'dropout' is on.

    The masks are model inputs (not ``keras.layers.Dropout``) because each
    framework's random generator draws different masks: only core's masks
    make the backends comparable with each other and with the reference.
    """
    return [x, *masks] if masks else x


def _reduce(loss, y, logits, sample_weight):
    """The loss object called as Keras users call it: with ``sample_weight`` only when there is one (the switch
    'class_weights' wraps the objects in a two-argument call)."""
    return loss(y, logits) if sample_weight is None else loss(y, logits, sample_weight=sample_weight)


def _rows(masks, i: int):
    """Example ``i``'s rows of the masks, each (1, H): what its own forward pass multiplies by."""
    return [m[i:i + 1] for m in masks]


def _example(masks):
    """Inside a vectorized map, where the example axis is gone: the example's mask rows as (1, H)."""
    return [m[None] for m in masks]


class _Autodiff:
    """What every variant shares; subclasses add device, precision and autodiff.

    ``__init__(job)`` runs before any tensor exists: it picks the device
    (raising ``DeviceUnavailable``) and pins precision. ``bind`` is called
    once the model and loss objects exist.
    """

    packages: tuple[str, ...] = ()
    device_note: str | None = None
    #: The discrepancy switch 'unzeroed_gradients': per-example loops read an accumulator never zeroed.
    unzeroed: bool = False
    #: The examples one_by_one feeds for the current case (all but padding); set by the session.
    fed_alone: list = []

    def bind(self, model, losses: dict) -> None:
        self.model = model
        self.losses = losses
        self.variables = model.trainable_variables

    def scope(self):
        """Context in which tensors are created and work runs (the chosen device)."""
        return contextlib.nullcontext()

    @staticmethod
    def _add(total, grads):
        # Native `+`, not keras.ops.add: Keras' type promotion may demote
        # float64 to float32 on the jax and torch backends.
        return list(grads) if total is None else [a + b for a, b in zip(total, grads)]

    def _accumulate(self, state, grads):
        """One example's gradients into the loop's state (accumulator, what was read); see ``_result``.

        With 'unzeroed_gradients' the accumulator, holding examples 0..i, is read and added up after
        every example, as a training loop that never resets its gradient-accumulation variables does.
        """
        acc, read = state
        acc = self._add(acc, grads)
        return acc, (self._add(read, acc) if self.unzeroed else None)

    def _result(self, state):
        return state[1] if self.unzeroed else state[0]

    def one_by_one(self, x, y, masks):
        state, losses = (None, None), []
        for i in self.fed_alone:  # padding is not fed: its mean would be 0/0
            loss, grads = self.reduced("sum_over_batch_size", x[i:i + 1], y[i:i + 1], _rows(masks, i))
            losses.append(loss)
            state = self._accumulate(state, grads)
        return losses, self._result(state)


class _TensorFlow(_Autodiff):
    """tf.GradientTape; tf.function for the single-backward step; tf.vectorized_map."""

    packages = ("keras", "tensorflow")

    def __init__(self, job: WorkerJob):
        import tensorflow as tf

        self.tf = tf
        gpus = tf.config.list_physical_devices("GPU") if job.device != "cpu" else []
        for gpu in tf.config.list_physical_devices("GPU"):
            try:  # never grab the whole card; only possible before the runtime starts
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                pass  # already initialized; TF_FORCE_GPU_ALLOW_GROWTH covers it
        if job.device == "gpu" and not gpus:
            raise DeviceUnavailable("keras-tensorflow: TensorFlow sees no GPU (device='gpu')")
        if job.device == "auto" and not gpus:
            self.device_note = "no GPU visible to TensorFlow; ran on the CPU"
        self.device_name = "/GPU:0" if gpus else "/CPU:0"
        self.gpu = gpus[0] if gpus else None
        if job.precision == "highest":
            tf.config.experimental.enable_tensor_float_32_execution(False)

    def scope(self):
        return self.tf.device(self.device_name)

    def precision(self) -> dict:
        return {"tensor_float_32_execution_enabled":
                bool(self.tf.config.experimental.tensor_float_32_execution_enabled())}

    def tf32_enabled(self) -> bool:
        return bool(self.tf.config.experimental.tensor_float_32_execution_enabled())

    def where(self, variable):
        """(device text, 'cpu'|'gpu', compute capability or None) of a model variable."""
        placed = variable.value.device  # e.g. /job:localhost/replica:0/task:0/device:GPU:0
        if "GPU" not in placed.upper():
            return "cpu", "cpu", None
        details = self.tf.config.experimental.get_device_details(self.gpu)
        index = placed.rsplit(":", 1)[-1]
        name = details.get("device_name", "unknown GPU")
        return f"gpu:{index} ({name})", "gpu", details.get("compute_capability")

    def bind(self, model, losses):
        super().bind(model, losses)
        tf = self.tf

        @tf.function
        def reduced(reduction, x, y, masks, sample_weight):  # one trace per (reduction, shape, weighted or not)
            with tf.GradientTape() as tape:
                loss = _reduce(losses[reduction], y, model(_feed(x, masks), training=True), sample_weight)
            return loss, tape.gradient(loss, self.variables)

        def one_example(elems):
            xi, yi, mi = elems
            with tf.GradientTape() as tape:
                # BatchNormalization also assigns its moving statistics here; tf.vectorized_map accepts that
                # without a loop fallback (keras 3.15, TF 2.21), and training mode never reads them back.
                loss = losses["sum"](yi[None], model(_feed(xi[None], _example(mi)), training=True))
            return loss, tape.gradient(loss, self.variables)

        # fallback_to_while_loop=False: fail loudly rather than silently loop.
        per_example = tf.function(lambda x, y, masks: tf.vectorized_map(
            one_example, (x, y, masks), fallback_to_while_loop=False))
        self._reduced, self._per_example = reduced, per_example

    def reduced(self, reduction, x, y, masks, sample_weight=None):
        return self._reduced(reduction, x, y, masks, sample_weight)

    def none_loop(self, x, y, masks):
        tf = self.tf
        with tf.GradientTape(persistent=True) as tape:  # persistent = torch's retain_graph
            losses = self.losses["none"](y, self.model(_feed(x, masks), training=True))
            # Slice inside the tape: each part must be on the tape to have a gradient.
            parts = tf.unstack(losses)
        state = (None, None)
        for part in parts:
            state = self._accumulate(state, tape.gradient(part, self.variables))
        del tape
        return losses, self._result(state)

    def none_vectorized(self, x, y, masks):
        losses, per_example = self._per_example(x, y, masks)
        return losses, [self.tf.reduce_sum(g, axis=0) for g in per_example]


class _Jax(_Autodiff):
    """model.stateless_call in pure functions; jax.value_and_grad, jax.vjp, jax.vmap, jax.jit."""

    packages = ("keras", "jax", "jaxlib")

    def __init__(self, job: WorkerJob):
        import jax

        self.jax = jax
        if job.dtype == "float64" and not jax.config.jax_enable_x64:
            raise RuntimeError("keras-jax: float64 needs JAX's x64 mode, which is off "
                               "(start the worker with JAX_ENABLE_X64=1)")
        gpus = []
        if job.device != "cpu":
            try:
                gpus = jax.devices("gpu")
            except RuntimeError:  # no GPU platform at all (CPU-only jaxlib or JAX_PLATFORMS=cpu)
                gpus = []
        if job.device == "gpu" and not gpus:
            raise DeviceUnavailable("keras-jax: JAX sees no GPU (device='gpu')")
        if job.device == "auto" and not gpus:
            self.device_note = "no GPU visible to JAX; ran on the CPU"
        self.device = gpus[0] if gpus else jax.devices("cpu")[0]
        if job.precision == "highest":
            jax.config.update("jax_default_matmul_precision", "highest")

    def scope(self):
        return self.jax.default_device(self.device)

    def precision(self) -> dict:
        return {"jax_default_matmul_precision": self.jax.config.jax_default_matmul_precision}

    def tf32_enabled(self) -> bool:
        # JAX's default ('DEFAULT' / None) lets XLA use TF32 for float32 dots on GPUs.
        return not jax_precision_is_full_f32(self.jax.config.jax_default_matmul_precision)

    def where(self, variable):
        (dev,) = variable.value.devices()
        if dev.platform == "cpu":
            return "cpu", "cpu", None
        cc = getattr(dev, "compute_capability", None)  # "9.0" on CUDA devices
        cc = tuple(int(p) for p in str(cc).split(".")) if cc else None
        return f"{dev.platform}:{dev.id} ({dev.device_kind})", "gpu", cc

    def bind(self, model, losses):
        super().bind(model, losses)
        jax = self.jax
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_fn(trainable, x, y, masks, reduction, sample_weight=None):
            # stateless_call returns the normalizations' moving statistics as updates; training mode never
            # reads them, so they are dropped (and the non-trainable values passed in stay unchanged).
            logits, _ = model.stateless_call(trainable, non_trainable, _feed(x, masks), training=True)
            return _reduce(losses[reduction], y, logits, sample_weight)

        def one_example(trainable, xi, yi, mi):
            return loss_fn(trainable, xi[None], yi[None], _example(mi), "sum")

        self._value_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=4)
        # One forward that keeps its residuals; the returned VJP is a pytree, so it
        # can leave jit and be pulled back once per example like retain_graph.
        self._forward = jax.jit(lambda t, x, y, m: jax.vjp(lambda p: loss_fn(p, x, y, m, "none"), t))
        self._pull = jax.jit(lambda vjp, cotangent: vjp(cotangent)[0])
        # masks map over their example axis too (no masks: an empty pytree, nothing to map).
        self._per_example = jax.jit(jax.vmap(jax.value_and_grad(one_example), in_axes=(None, 0, 0, 0)))

    def _trainable(self):
        return [v.value for v in self.variables]

    def reduced(self, reduction, x, y, masks, sample_weight=None):
        return self._value_and_grad(self._trainable(), x, y, masks, reduction, sample_weight)

    def none_loop(self, x, y, masks):
        losses, vjp = self._forward(self._trainable(), x, y, masks)
        units = self.jax.numpy.eye(losses.shape[0], dtype=losses.dtype)
        state = (None, None)
        for i in range(losses.shape[0]):
            state = self._accumulate(state, self._pull(vjp, units[i]))
        return losses, self._result(state)

    def none_vectorized(self, x, y, masks):
        # The sum stays outside jit so the per-example gradients really exist.
        losses, per_example = self._per_example(self._trainable(), x, y, masks)
        return losses, [g.sum(axis=0) for g in per_example]


class _Torch(_Autodiff):
    """loss.backward(retain_graph=True) into the torch tensors behind the Keras variables."""

    packages = ("keras", "torch")

    def __init__(self, job: WorkerJob):
        import torch

        # The torch backend's own device rule and precision switches: torch >= 2.9
        # raises when its legacy and new precision APIs disagree, so both families
        # are set the one same way.
        from gradparity.backends.torch import session as torch_backend

        self.torch = torch
        self.torch_backend = torch_backend
        self.job_precision = job.precision
        device, self.device_note = torch_backend.pick_device(job.device)
        # Keras' torch backend would pick cuda by itself; the scope makes 'cpu' binding.
        self.device_name = str(device)
        if job.precision == "highest":
            torch_backend.pin_highest_precision()

    def scope(self):
        return keras.device(self.device_name)

    def precision(self) -> dict:
        settings = self.torch_backend.read_precision(self.job_precision)
        settings.pop("requested", None)
        return settings

    def tf32_enabled(self) -> bool:
        # The MLP has matmuls only, so cudnn's (convolution) flag does not matter.
        return self.torch_backend.cublas_may_use_tf32()

    def where(self, variable):
        device = variable.value.device
        if device.type != "cuda":
            return str(device.type), "cpu", None
        torch = self.torch
        return (f"{device} ({torch.cuda.get_device_name(device)})", "gpu",
                tuple(torch.cuda.get_device_capability(device)))

    def _zero(self):
        for v in self.variables:
            v.value.grad = None

    def _grads(self):
        return [v.value.grad for v in self.variables]

    def reduced(self, reduction, x, y, masks, sample_weight=None):
        self._zero()
        loss = _reduce(self.losses[reduction], y, self.model(_feed(x, masks), training=True), sample_weight)
        loss.backward()
        return loss.detach(), self._grads()

    def _read(self, read):
        """'unzeroed_gradients': add what .grad holds now to what was read (cloned: backward updates .grad)."""
        now = [g.clone() for g in self._grads()]
        return now if read is None else self._add(read, now)

    def none_loop(self, x, y, masks):
        self._zero()
        losses = self.losses["none"](y, self.model(_feed(x, masks), training=True))
        read = None
        for i in range(losses.shape[0]):
            losses[i].backward(retain_graph=True)  # .grad accumulates
            if self.unzeroed:
                read = self._read(read)
        return losses.detach(), read if self.unzeroed else self._grads()

    def one_by_one(self, x, y, masks):
        self._zero()
        losses, read = [], None
        for i in self.fed_alone:  # padding is not fed: its mean would be 0/0
            logits = self.model(_feed(x[i:i + 1], _rows(masks, i)), training=True)
            loss = self.losses["sum_over_batch_size"](y[i:i + 1], logits)
            loss.backward()  # .grad accumulates across examples
            losses.append(loss.detach())
            if self.unzeroed:
                read = self._read(read)
        return losses, read if self.unzeroed else self._grads()

    def none_vectorized(self, x, y, masks):
        from torch.func import grad_and_value, vmap

        model, loss = self.model, self.losses["sum"]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def one_example(trainable, xi, yi, mi):
            # stateless_call: the normalizations' moving-statistics updates come back as values instead of
            # in-place writes, which torch.func refuses; training mode never reads them.
            logits, _ = model.stateless_call(trainable, non_trainable, _feed(xi[None], _example(mi)),
                                             training=True)
            return loss(yi[None], logits)

        trainable = [v.value.detach() for v in self.variables]
        per_example, losses = vmap(grad_and_value(one_example), in_dims=(None, 0, 0, 0))(
            trainable, x, y, masks)
        return losses, [g.sum(dim=0) for g in per_example]


_VARIANTS = {"tensorflow": _TensorFlow, "jax": _Jax, "torch": _Torch}


#: Significand bits (implicit bit included) of each float format: which dtype is narrower.
_SIGNIFICAND_BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}


def _class_weighted(loss, weights: np.ndarray, dtype: str):
    """The switch 'class_weights' the Keras way: the loss called with sample_weight = w[y]."""
    table = keras.ops.convert_to_tensor(weights, dtype=dtype)

    def call(y, logits):
        return loss(y, logits, sample_weight=keras.ops.take(table, y))
    return call


def _activation(job: WorkerJob) -> str:
    """Keras' name of the experiment's activation."""
    return {"identity": "linear"}.get(job.model["activation"], job.model["activation"])


def _build_model(job: WorkerJob):
    """Functional ``keras.Model``: per hidden layer Dense -> [BatchNormalization] -> activation -> [mask];
    the last Dense gives the logits.

    With the switch 'batchnorm' the normalization sits between a Dense and its activation, so the
    activation becomes its own ``Activation`` layer; without it the activation stays in the Dense, as a
    plain Keras MLP is written. With the switch 'dropout' the model takes ``[x, mask_0, ...]`` (see
    ``_feed``) and a ``Multiply`` layer applies each hidden layer's mask. Layers are named ``dense_i``
    and ``norm_i``: ``_canonical_names`` reads the index i from the name.
    """
    sizes, eps, activation = job.model["sizes"], job.batchnorm_epsilon, _activation(job)
    # The switch 'autocast': Keras' mixed-precision policy per layer (compute in the narrow format,
    # variables in float32).
    policy = keras.DTypePolicy(f"mixed_{job.autocast}") if job.autocast else job.dtype
    x = keras.Input((sizes[0],), dtype=job.dtype, name="x")
    masks = [keras.Input((width,), dtype=job.dtype, name=f"mask_{i}")
             for i, width in enumerate(sizes[1:-1])] if job.dropout_masks("batch") else []
    h = x
    for i, units in enumerate(sizes[1:]):
        last = i == len(sizes) - 2
        fused = None if last or eps is not None else activation
        h = keras.layers.Dense(units, activation=fused, dtype=policy, name=f"dense_{i}")(h)
        if last:
            break
        if eps is not None:
            h = keras.layers.BatchNormalization(epsilon=eps, dtype=policy, name=f"norm_{i}")(h)
            h = keras.layers.Activation(activation, dtype=policy, name=f"activation_{i}")(h)
        if masks:
            h = keras.layers.Multiply(dtype=policy, name=f"dropout_{i}")([h, masks[i]])
    return keras.Model(_feed(x, masks), h)


#: Canonical name of a trainable weight, by (its layer's name before '_i', Keras' weight name).
_CANONICAL = {("dense", "kernel"): "layers.{}.kernel", ("dense", "bias"): "layers.{}.bias",
              ("norm", "gamma"): "norms.{}.scale", ("norm", "beta"): "norms.{}.bias"}


def _canonical_names(model) -> list[str]:
    """Canonical name of each of ``model.trainable_variables``, in that order."""
    names = {}
    for layer in model.layers:
        kind, _, index = layer.name.rpartition("_")
        for variable in layer.trainable_weights:
            names[id(variable)] = _CANONICAL[kind, variable.name].format(index)
    return [names[id(v)] for v in model.trainable_variables]


def _replay_batchnorm(layer, h, note):
    """``BatchNormalization.call`` in training mode, op by op (keras 3.15), noting the dtype it computes in.

    The layer computes in ``result_type(input, "float32")``, which is float32 for a float64 input on
    Keras' jax and torch backends, then casts its output back to its own dtype: the output's dtype
    would hide the demotion.
    """
    ops = keras.ops
    z = ops.cast(h, keras.backend.result_type(h.dtype, "float32"))
    mean, variance = ops.moments(z, axes=[0])
    out = note("batchnorm", ops.batch_normalization(
        z, mean, variance, axis=-1, offset=ops.cast(layer.beta.value, z.dtype),
        scale=ops.cast(layer.gamma.value, z.dtype), epsilon=layer.epsilon))
    return ops.cast(out, layer.compute_dtype)


def environment(ad: _Autodiff, device: str, kind: str, dtype: str, precision: dict, tf32: bool) -> dict:
    """The environment keys every Keras session reports (the protocol's ``Session.environment``); a
    session adds its own (autocast, mode) to it."""
    return {
        "framework": "keras",
        "versions": package_versions(*ad.packages),
        "device": device,
        "device_kind": kind,
        "device_note": ad.device_note,
        "dtype": dtype,
        "precision": precision,
        "tf32": tf32,
        "keras_backend": keras.backend.backend(),
    }


class KerasSession:
    """One Keras model and its loss objects; ``compute`` dispatches to the variant's autodiff."""

    def __init__(self, job: WorkerJob):
        if job.loss["name"] != "cross_entropy":
            raise ValueError(f"keras backend has no loss {job.loss['name']!r}")
        variant = job.variant or "tensorflow"
        if keras.backend.backend() != variant:
            raise RuntimeError(f"Keras runs on {keras.backend.backend()!r} but the job asks for "
                               f"{variant!r}; KERAS_BACKEND must be set before keras is imported")
        self.job = job
        self.ad = _VARIANTS[variant](job)  # device and precision before any tensor exists
        keras.config.set_floatx(job.dtype)
        with self.ad.scope():
            self.model = _build_model(job)
            self.names = _canonical_names(self.model)
            if sorted(self.names) != sorted(job.params):
                raise ValueError(f"model parameters {sorted(self.names)} do not match the job's "
                                 f"{sorted(job.params)}")
            for variable, name in zip(self.model.trainable_variables, self.names):
                variable.assign(job.params[name])
            self.x = keras.ops.convert_to_tensor(job.batch["x"], dtype=job.dtype)
            self.y = keras.ops.convert_to_tensor(job.targets())  # IGNORE_INDEX where 'padding' marks padding
            # The switch 'dropout': per forward kind, the masks' tensors (empty when off).
            self.masks = {forward: [keras.ops.convert_to_tensor(m, dtype=job.dtype)
                                    for m in job.dropout_masks(forward) or ()]
                          for forward in ("batch", "single")}
        self._inputs = CaseInputs(job, (self.x, self.y), lambda x, y: (
            keras.ops.convert_to_tensor(x, dtype=job.dtype), keras.ops.convert_to_tensor(y)))
        # The switch 'padding': Keras' own ignore_class masks those targets (its means divide by the valid count).
        ignore = {"ignore_class": IGNORE_INDEX} if job.padded else {}
        losses = {r: keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=r, dtype=job.dtype, **ignore)
            for r in ("none", "sum", "sum_over_batch_size")}
        if job.class_weights is not None:
            with self.ad.scope():  # the weights' tensor on the chosen device
                losses = {r: _class_weighted(loss, job.class_weights, job.dtype) for r, loss in losses.items()}
        self.ad.bind(self.model, losses)
        self.ad.unzeroed = job.unzeroed

    def _op_dtypes(self) -> dict[str, str]:
        """The dtype each op of the forward pass returns, read back by replaying it.

        Dense.call is ``activation(add(matmul(h, kernel), bias))``, with the
        switch 'batchnorm' a normalization before the activation, with
        'dropout' the batch's mask after it; replaying those keras.ops on the
        real variables and inputs, then the loss objects, shows where Keras'
        type promotion demotes float64 results to float32 on its jax and
        torch backends. A later op promotes the value back to float64, so the
        output dtype alone would hide it.
        """
        ops, seen = keras.ops, {}
        activation, masks = keras.activations.get(_activation(self.job)), self.masks["batch"]
        last = len(self.job.model["sizes"]) - 2

        def note(op, tensor):
            dtype = keras.backend.standardize_dtype(tensor.dtype)
            if op not in seen or _SIGNIFICAND_BITS[dtype] < _SIGNIFICAND_BITS[seen[op]]:
                seen[op] = dtype
            return tensor

        with self.ad.scope():
            h = self.x
            for i in range(last + 1):
                dense = self.model.get_layer(f"dense_{i}")
                h = note("matmul", ops.matmul(h, dense.kernel.value))
                h = note("add", ops.add(h, dense.bias.value))
                if i == last:
                    break
                if self.job.batchnorm_epsilon is not None:
                    h = _replay_batchnorm(self.model.get_layer(f"norm_{i}"), h, note)
                h = note(self.job.model["activation"], activation(h))
                if masks:
                    h = note("dropout_mask", ops.multiply(h, masks[i]))
            for reduction, loss in self.ad.losses.items():
                note(f"loss[{reduction}]", loss(self.y, h))
        return seen

    def environment(self) -> dict:
        var_dtypes = {keras.backend.standardize_dtype(v.dtype) for v in self.model.weights}
        if len(var_dtypes) != 1:
            raise RuntimeError(f"model variables have mixed dtypes {sorted(var_dtypes)}")
        op_dtypes = self._op_dtypes()
        # The narrowest dtype any op computed in bounds the precision of the whole run.
        dtype = min([*var_dtypes, *op_dtypes.values()], key=lambda d: _SIGNIFICAND_BITS[d])
        if self.job.autocast:
            # The replay uses the float32 variables directly; the layers' mixed policy computes in autocast.
            dtype = self.job.autocast
        device, kind, cc = self.ad.where(self.model.trainable_variables[0])
        # TF32 replaces float32 matmuls only (a float64 run whose tanh Keras
        # demoted still multiplies in float64).
        tf32 = bool(kind == "gpu" and cc is not None and tuple(cc) >= (8, 0)
                    and op_dtypes["matmul"] == "float32" and self.ad.tf32_enabled())
        precision = dict(self.ad.precision(), keras_op_dtypes=op_dtypes,
                         requested=self.job.precision)
        return dict(environment(self.ad, device, kind, dtype, precision, tf32), autocast=self.job.autocast)

    def compute(self, method: str) -> RawResult:
        """Run ``method`` ('METHOD' or 'METHOD@PART'); its native loss and gradients."""
        with self.ad.scope():  # a part's tensors are made on the chosen device, once
            self.ad.fed_alone = self.job.fed_alone(method)  # the examples one_by_one feeds
            method, x, y = self._inputs(method)
            if method not in _METHODS:
                raise ValueError(f"unknown method {method!r}")
            # A forward pass of one example multiplies by that example's own mask row; masks exist for
            # the batch only (core refuses dropout together with parts).
            masks = self.masks["single" if method in SEPARATE_FORWARD else "batch"] if x is self.x else []
            if method in _REDUCTIONS:
                loss, grads = self.ad.reduced(_REDUCTIONS[method], x, y, masks)
                total = float(keras.ops.convert_to_numpy(loss))
            else:
                losses, grads = getattr(self.ad, method)(x, y, masks)
                # Not a framework reduction: the per-example values, summed on the host.
                total = float(sum(np.sum(keras.ops.convert_to_numpy(v), dtype=np.float64)
                                  for v in (losses if isinstance(losses, list) else [losses])))
        return RawResult(total, {name: keras.ops.convert_to_numpy(g)
                                 for name, g in zip(self.names, grads)})


def open_session(job: WorkerJob) -> KerasSession:
    """Open a Keras session on ``job.variant`` (must equal KERAS_BACKEND); may raise DeviceUnavailable."""
    return KerasSession(job)
