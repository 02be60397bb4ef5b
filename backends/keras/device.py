"""Keras 3's variants: one class per Keras backend (``job.variant``: tensorflow, jax, torch) with its device
choice, precision pinning and reading, and autodiff; the environment keys every Keras session reports.

Imported only inside a worker process, with KERAS_BACKEND already set to ``job.variant``. The model session
(``session.py``), the trainer (``train.py``) and the loss-function session (``losses.py``) take their variant
from ``VARIANTS`` (``VARIANTS[variant](job)`` picks the device, raising ``DeviceUnavailable``, and pins
precision before any tensor exists); ``losses.py`` uses the device part only.

Every variant has the same method names:

``reduced(reduction, x, y, masks, sample_weight=None) -> (loss, grads)``
    one reduced loss, one backward (``sum``, ``mean``; a training run's weighted reductions pass the
    batch's per-example ``sample_weight`` to the loss);
``none_loop(x, y, masks) -> (losses, grads)``
    the "none" loss vector from one forward, one backward per example, summed;
``none_vectorized(x, y, masks) -> (losses, grads)``
    per-example gradients from one vectorized call, then summed;
``one_by_one(x, y, masks) -> (losses, grads)``
    each example of ``fed_alone`` alone, mean-reduced, one backward each, summed.

``x`` is one tensor, or a dict {argument: tensor} of a model's named inputs, each sliced along axis 0 for
an example (``example_inputs``, ``batch_of_one``). ``bind(model, losses)`` hands them the model and the loss
callables. ``model`` is called as
``model(x, masks)`` and ``model.stateless_call(trainable, non_trainable, x, masks)`` (the session's
``ModelCall``: the Keras model in the job's mode, ``masks`` the switch 'dropout''s keep-masks, a list of one
(N, H) tensor per hidden layer, empty when off); ``losses`` maps Keras' reduction names ("none": one value
per example, "sum", "sum_over_batch_size", and for weighted training "mean_with_sample_weight") to callables
``(y, logits[, sample_weight])``. ``grads`` is a list aligned with ``model.trainable_variables``, in the
framework's own tensors (None for a variable the loss never reaches); ``losses`` are the per-example values.
"""
from __future__ import annotations

import contextlib

import keras

from gradparity.backends.protocol import DeviceUnavailable, WorkerJob, jax_precision_is_full_f32, package_versions

#: Significand bits (implicit bit included) of each float format: which dtype is narrower.
SIGNIFICAND_BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}


def call_loss(loss, y, logits, sample_weight=None):
    """The loss called as Keras users call it: with ``sample_weight`` only when there is one. Per-example weights
    (N,) of (N, T) targets are broadcast over T (Keras would otherwise align them with the last axis)."""
    if sample_weight is None:
        return loss(y, logits)
    if len(sample_weight.shape) < len(y.shape):
        shape = tuple(sample_weight.shape) + (1,) * (len(y.shape) - len(sample_weight.shape))
        sample_weight = keras.ops.broadcast_to(keras.ops.reshape(sample_weight, shape), y.shape)
    return loss(y, logits, sample_weight=sample_weight)


def example_inputs(x, i: int):
    """Example ``i`` of the inputs, (1, ...): the tensor's rows ``[i:i + 1]``, or each named input's."""
    return {arg: t[i:i + 1] for arg, t in x.items()} if isinstance(x, dict) else x[i:i + 1]


def batch_of_one(xi):
    """Inside a vectorized map, where the example axis is gone: the example's inputs as a batch of one."""
    return {arg: t[None] for arg, t in xi.items()} if isinstance(xi, dict) else xi[None]


def rows(masks, i: int):
    """Example ``i``'s rows of the masks, each (1, H): what its own forward pass multiplies by."""
    return [m[i:i + 1] for m in masks]


def example_rows(masks):
    """Inside a vectorized map, where the example axis is gone: the example's mask rows as (1, H)."""
    return [m[None] for m in masks]


def dense(grad):
    """TensorFlow's gradient of an embedding lookup is ``IndexedSlices``, which has no ``+``: made dense."""
    if type(grad).__name__ != "IndexedSlices":
        return grad
    import tensorflow as tf  # only TensorFlow makes them; keras.ops.convert_to_tensor keeps them sparse

    return tf.convert_to_tensor(grad)


class Autodiff:
    """What every variant shares; subclasses add device, precision and autodiff.

    ``__init__(job)`` runs before any tensor exists: it picks the device
    (raising ``DeviceUnavailable``) and pins precision. ``bind`` is called
    once the model and loss callables exist.
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

    def cudnn_tf32_enabled(self) -> bool:
        """Whether convolutions may use TF32 besides what ``tf32_enabled`` says (torch's separate cuDNN switch;
        TensorFlow's and JAX's one setting covers them)."""
        return False

    @staticmethod
    def add(total, grads):
        """``total + grads``, element by element, where a gradient may be None (a variable the loss never
        reaches: nothing) or TensorFlow's ``IndexedSlices`` (made dense)."""
        # Native `+`, not keras.ops.add: Keras' type promotion may demote float64 to float32 on the jax and
        # torch backends.
        grads = [dense(g) for g in grads]
        if total is None:
            return grads
        return [b if a is None else a if b is None else a + b for a, b in zip(total, grads)]

    def accumulate(self, state, grads):
        """One example's gradients into the loop's state (accumulator, what was read); see ``result``.

        With 'unzeroed_gradients' the accumulator, holding examples 0..i, is read and added up after
        every example, as a training loop that never resets its gradient-accumulation variables does.
        """
        acc, read = state
        acc = self.add(acc, grads)
        return acc, (self.add(read, acc) if self.unzeroed else None)

    def result(self, state):
        return state[1] if self.unzeroed else state[0]

    def one_by_one(self, x, y, masks):
        state, losses = (None, None), []
        for i in self.fed_alone:  # padding is not fed: its mean would be 0/0
            loss, grads = self.reduced("sum_over_batch_size", example_inputs(x, i), y[i:i + 1], rows(masks, i))
            losses.append(loss)
            state = self.accumulate(state, grads)
        return losses, self.result(state)


class TensorFlowAutodiff(Autodiff):
    """tf.GradientTape; tf.function for the single-backward step; tf.vectorized_map."""

    packages = ("keras", "tensorflow")

    def __init__(self, job: WorkerJob):
        import tensorflow as tf

        from gradparity.backends.tf_keras.device import pin_tf_device  # TensorFlow only: no tf_keras import

        self.tf = tf
        self.device_name, self.gpu, self.device_note = pin_tf_device(job, "keras-tensorflow")

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
                loss = call_loss(losses[reduction], y, model(x, masks), sample_weight)
            return loss, tape.gradient(loss, self.variables)

        def one_example(elems):
            xi, yi, mi = elems
            with tf.GradientTape() as tape:
                # BatchNormalization also assigns its moving statistics here; tf.vectorized_map accepts that
                # without a loop fallback (keras 3.15, TF 2.21), and training mode never reads them back.
                loss = losses["sum"](yi[None], model(batch_of_one(xi), example_rows(mi)))
            # Dense: a per-example IndexedSlices (an embedding's) cannot be stacked by the vectorized map.
            return loss, [dense(g) for g in tape.gradient(loss, self.variables)]

        # fallback_to_while_loop=False: fail loudly rather than silently loop.
        per_example = tf.function(lambda x, y, masks: tf.vectorized_map(
            one_example, (x, y, masks), fallback_to_while_loop=False))
        self._reduced, self._per_example = reduced, per_example

    def reduced(self, reduction, x, y, masks, sample_weight=None):
        return self._reduced(reduction, x, y, masks, sample_weight)

    def none_loop(self, x, y, masks):
        tf = self.tf
        with tf.GradientTape(persistent=True) as tape:  # persistent = torch's retain_graph
            losses = self.losses["none"](y, self.model(x, masks))
            # Slice inside the tape: each part must be on the tape to have a gradient.
            parts = tf.unstack(losses)
        state = (None, None)
        for part in parts:
            state = self.accumulate(state, tape.gradient(part, self.variables))
        del tape
        return losses, self.result(state)

    def none_vectorized(self, x, y, masks):
        losses, per_example = self._per_example(x, y, masks)
        return losses, [None if g is None else self.tf.reduce_sum(g, axis=0) for g in per_example]


class JaxAutodiff(Autodiff):
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
            logits, _ = model.stateless_call(trainable, non_trainable, x, masks)
            return call_loss(losses[reduction], y, logits, sample_weight)

        def one_example(trainable, xi, yi, mi):
            return loss_fn(trainable, batch_of_one(xi), yi[None], example_rows(mi), "sum")

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
            state = self.accumulate(state, self._pull(vjp, units[i]))
        return losses, self.result(state)

    def none_vectorized(self, x, y, masks):
        # The sum stays outside jit so the per-example gradients really exist.
        losses, per_example = self._per_example(self._trainable(), x, y, masks)
        return losses, [g.sum(axis=0) for g in per_example]


class TorchAutodiff(Autodiff):
    """loss.backward(retain_graph=True) into the torch tensors behind the Keras variables."""

    packages = ("keras", "torch")

    def __init__(self, job: WorkerJob):
        import torch

        # The torch backend's own device rule and precision switches: torch >= 2.9
        # raises when its legacy and new precision APIs disagree, so both families
        # are set the one same way.
        from gradparity.backends.torch import device as torch_device

        self.torch = torch
        self.torch_device = torch_device
        self.job_precision = job.precision
        device, self.device_note = torch_device.pick_device(job.device)
        # Keras' torch backend would pick cuda by itself; the scope makes 'cpu' binding.
        self.device_name = str(device)
        if job.precision == "highest":
            torch_device.pin_highest_precision()

    def scope(self):
        return keras.device(self.device_name)

    def precision(self) -> dict:
        settings = self.torch_device.read_precision(self.job_precision)
        settings.pop("requested", None)
        return settings

    def tf32_enabled(self) -> bool:
        """Whether cuBLAS may multiply float32 in TF32 (a model's matmuls; ``cudnn_tf32_enabled`` covers its
        convolutions)."""
        return self.torch_device.cublas_may_use_tf32()

    def cudnn_tf32_enabled(self) -> bool:
        """Whether cuDNN (Keras' torch backend's convolutions) may use TF32: on unless precision was pinned."""
        return self.job_precision != "highest"

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
        loss = call_loss(self.losses[reduction], y, self.model(x, masks), sample_weight)
        loss.backward()
        return loss.detach(), self._grads()

    def _read(self, read):
        """'unzeroed_gradients': add what .grad holds now to what was read (cloned: backward updates .grad)."""
        now = [None if g is None else g.clone() for g in self._grads()]
        return now if read is None else self.add(read, now)

    def none_loop(self, x, y, masks):
        self._zero()
        losses = self.losses["none"](y, self.model(x, masks))
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
            loss = self.losses["sum_over_batch_size"](y[i:i + 1], self.model(example_inputs(x, i), rows(masks, i)))
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
            logits, _ = model.stateless_call(trainable, non_trainable, batch_of_one(xi), example_rows(mi))
            return loss(yi[None], logits)

        trainable = [v.value.detach() for v in self.variables]
        try:
            per_example, losses = vmap(grad_and_value(one_example), in_dims=(None, 0, 0, 0))(
                trainable, x, y, masks)
        except RuntimeError as exc:
            raise _vmap_refused(exc) from None
        return losses, [g.sum(dim=0) for g in per_example]


def _vmap_refused(exc: RuntimeError) -> Exception:
    """torch.func.vmap's refusal of a model's forward pass, said plainly (Keras wraps it in its layer's call)."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    reason = next((line for line in lines if "vmap" in line), None)
    if reason is None:
        return exc
    hint = (" (Keras' torch backend convolves in channels-last memory, which vmap does not support)"
            if "memory_format" in reason else "")
    return RuntimeError(f"keras-torch: none_vectorized cannot run: torch.func.vmap refuses this model's forward "
                        f"pass{hint}: {reason}")


#: The autodiff class of each Keras backend (``job.variant``).
VARIANTS = {"tensorflow": TensorFlowAutodiff, "jax": JaxAutodiff, "torch": TorchAutodiff}


def open_variant(job: WorkerJob) -> Autodiff:
    """The job's variant (``job.variant``, default tensorflow), device chosen and precision pinned; RuntimeError
    when Keras runs on another backend (KERAS_BACKEND must be set before keras is imported)."""
    variant = job.variant or "tensorflow"
    if keras.backend.backend() != variant:
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r} but the job asks for {variant!r}; "
                           "KERAS_BACKEND must be set before keras is imported")
    return VARIANTS[variant](job)


def environment(ad: Autodiff, device: str, kind: str, dtype: str, precision: dict, tf32: bool) -> dict:
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
