"""TF-Keras 2's model session (task "model_check"): a user's own ``tf_keras.Model`` (Hugging Face's TF models are
ones) with tf_keras' own losses and reductions, differentiated by ``tf.GradientTape`` (contract in ``protocol``).

Imported only inside a worker process. ``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is imported (unless the
environment already says otherwise), so that ``tf.keras`` in a user's module is tf_keras too, as transformers
itself requires.

The model: the factory's, built with tf_keras' floatx = the job's dtype (a layer's variables take floatx unless
the factory or the layer pins a dtype of its own: ``environment()["dtype"]`` is the narrowest dtype the variables
and a forward pass's layer outputs and logits really have, never the requested one on trust). Under the switch
'autocast' the factory runs under tf_keras' mixed dtype policy. The batch is ``model(x)`` or, with payload
"inputs", ``model(**inputs)`` (integer arrays int32, floating ones in the job's dtype), always with
``training=`` the payload's mode; the loss reads the tensor ``select_output`` picks in what it returns (a
Hugging Face ``TFCausalLMOutput…`` included).

Names: a layer is its path of layer names from the model (``transformer.h_._0.attn.c_attn``; the model itself,
when it holds variables, its own name); a parameter is its variable's path inside the model (``variable.name``
without the model's own name scope and without ``:0``, '/' replaced by '.':
``transformer.h_._0.attn.c_attn.weight``) when that path starts with the path of a layer holding it (or the
model holds it), else (a variable created outside its layer's name scope, e.g. a layer built in its parent's
``__init__``) 'LAYER PATH.NAME'. A variable two layers hold (tied weights) is listed once, with the other
holders' 'PATH.NAME' in "aliases"; its gradient is the tape's sum over every use. Layout: tf_keras stores Dense and
conv kernels in the canonical layout; Hugging Face's ``TFConv1D`` ``weight`` (in, out) is a canonical kernel and
its ``bias`` (1, out) is canonical (out,) (reshaped both ways); ``Embedding.embeddings`` and
``TFSharedEmbeddings.weight`` are "embedding"; normalization ``gamma``/``beta`` "scale"/"bias",
BatchNormalization's moving statistics "mean"/"var". Only floating variables are described.

The loss is tf_keras' own: ``tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=R)``
(``MeanSquaredError`` for "mse") with R "sum", "sum_over_batch_size" (``mean``: divides by the number of loss
terms, N x T for token targets) and "none" (each example's summed terms, whose N backward passes none_loop
runs). Ignored targets (``IGNORE_INDEX``: a user's -100, the causal-LM shift's last position, the switch
'padding') are tf_keras' own ``ignore_class=-100``: the ignored terms are zero and "sum_over_batch_size" divides
by the valid count (tf_keras rescales the valid terms' weights by total/valid); one_by_one feeds only examples
with a valid target. 'class_weights' is ``sample_weight = w[y]``; 'unzeroed_gradients' reads the per-example
loops' accumulator after every example. none_vectorized is ``tf.vectorized_map`` of one example's tape (no
while-loop fallback); a model whose ops TensorFlow cannot vectorize is refused with its reason.

Layer calls are recorded ("describe", "forward") by wrapping each layer instance's ``call`` for one eager
forward pass (tf_keras' ``Layer.__call__`` looks ``self.call`` up on every call); "forward"'s d(mean
loss)/d(output) comes from the tape, which watches every tensor computed under it.

Every case starts from the state after loading: the non-trainable variables (moving statistics) are put back,
and in training mode TensorFlow's global seed is reset (an unseeded Dropout draws the same masks every case).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow: tf.keras is tf_keras (see the docstring)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from gradparity.backends.protocol import (IGNORE_INDEX, MODEL_CASES, SESSION_METHODS, RawResult,  # noqa: E402
                                          WorkerJob, assignment, call_inputs, check_switches, first_forward,
                                          load_factory, select_output)
from gradparity.backends.tf_keras.device import SIGNIFICAND_BITS, TfDevice, environment  # noqa: E402

_KERNEL_LAYERS = {"Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
                  "Conv3DTranspose", "TFConv1D"}
_NORM_LAYERS = {"BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization"}
#: tf_keras' reduction name of each single-backward method.
REDUCTIONS = {"mean": "sum_over_batch_size", "sum": "sum"}


def _short(variable) -> str:
    """A variable's own name: the last part of its path, without TensorFlow's ':0'."""
    return variable.name.rpartition("/")[2].partition(":")[0]


def _kinds(layer) -> set[str]:
    return {c.__name__ for c in type(layer).__mro__}


def _role(layer, variable) -> str:
    """The canonical role of a layer's own variable, from the layer's classes and the variable's name."""
    kinds, name = _kinds(layer), _short(variable)
    if name == "bias":
        return "bias"
    if kinds & _KERNEL_LAYERS and (name == "kernel" or (name == "weight" and "TFConv1D" in kinds)):
        return "kernel"
    if (name == "embeddings" and "Embedding" in kinds) or (name == "weight" and "TFSharedEmbeddings" in kinds):
        return "embedding"
    if kinds & _NORM_LAYERS:
        return {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_variance": "var"}.get(name, "other")
    return "other"


def _is_float(variable) -> bool:
    return variable.dtype.is_floating


def _owned(layer) -> list:
    """The layer's own floating variables (not its sublayers'), trainable first."""
    return [v for v in (*layer._trainable_weights, *layer._non_trainable_weights) if _is_float(v)]


def _fused(layer) -> bool:
    """Whether the layer's output is its activation's (``Dense(..., activation="relu")``), not affine."""
    activation = getattr(layer, "activation", None)
    return activation is not None and getattr(activation, "__name__", None) != "linear"


def _is_tensor(value) -> bool:
    return tf.is_tensor(value) and hasattr(value, "dtype")


def _has_sublayers(layer) -> bool:
    return next(iter(layer._flatten_layers(include_self=False, recursive=False)), None) is not None


def _dense(grad):
    """TensorFlow's gradient of an embedding lookup is ``IndexedSlices``: made dense."""
    return tf.convert_to_tensor(grad) if isinstance(grad, tf.IndexedSlices) else grad


@dataclass
class Param:
    """One variable of the model: its native name, the layer holding it, its role and the other names it is
    reachable under (tied weights)."""

    name: str
    layer: object
    variable: object
    role: str
    aliases: list = field(default_factory=list)

    @property
    def squeezed(self) -> bool:
        """TFConv1D's bias (1, out): canonical (out,)."""
        return self.role == "bias" and "TFConv1D" in _kinds(self.layer) and len(self.variable.shape) == 2

    def to_canonical(self, value: np.ndarray) -> np.ndarray:
        return value.reshape(-1) if self.squeezed else value

    def from_canonical(self, value: np.ndarray) -> np.ndarray:
        return value.reshape(tuple(self.variable.shape)) if self.squeezed and value.ndim == 1 else value

    @property
    def canonical_shape(self) -> list[int]:
        shape = [int(d) for d in self.variable.shape]
        return [int(np.prod(shape))] if self.squeezed else shape


class Inputs:
    """One case's model inputs, as tensors: ``args`` (``(x,)``) or ``kwargs`` (payload "inputs"), and targets."""

    def __init__(self, args: tuple, kwargs: dict, y):
        self.args, self.kwargs, self.y = args, kwargs, y

    def example(self, i: int) -> "Inputs":
        """Example ``i`` alone, a batch of one (every input sliced along axis 0)."""
        return Inputs(tuple(a[i:i + 1] for a in self.args), {k: a[i:i + 1] for k, a in self.kwargs.items()},
                      self.y[i:i + 1])


class TfKerasModelSession:
    """One user's tf_keras model on the job's device, its weights loaded when the job carries them; ``compute``
    answers "describe", "forward" and every method of ``SESSION_METHODS`` ('METHOD' or 'METHOD@PART')."""

    def __init__(self, job: WorkerJob):
        if "builtin" in job.payload:
            raise ValueError("the tf-keras backend runs users' tf_keras models only (payload 'factory'); the "
                             "built-in models run on the keras backends")
        self.job = job
        check_switches(job)
        self.dev = TfDevice(job)  # device choice and precision, before any tensor exists
        self.loss_name = job.payload.get("loss", job.loss.get("name", "cross_entropy"))
        self.training = job.payload.get("mode") == "training"
        self.output_path = job.payload.get("output")
        factory = load_factory(job)
        # tf_keras numbers auto-named layers per process: start from zero, so the describe job and the mapped
        # jobs name the variables alike whatever the user's module built at import.
        tf_keras.backend.clear_session()
        tf_keras.backend.set_floatx(job.dtype)  # layers without a dtype of their own create job-dtype variables
        with self.dev.scope():
            model = self._build(factory)
            self._inputs = {"": self._convert("")}
            if not model.built:
                first_forward(job, lambda: self._logits(model, self._inputs[""]))  # builds its variables
        self.model = model
        self.layers, self.paths = self._layer_tree()
        self.params = self._name_variables()  # native name -> Param
        self.by_name = {**{a: p for p in self.params.values() for a in p.aliases}, **self.params}
        trainable = {id(v) for v in model.trainable_weights}
        self.variables = [p.variable for p in self.params.values() if id(p.variable) in trainable]
        self.trainable = {id(v) for v in self.variables}
        self.assign = assignment(job)
        if self.assign is not None:
            missing = [n for n in self.assign if n not in self.by_name]
            if missing:
                raise ValueError(f"{', '.join(missing)}: the model has no variable of that name (it has: "
                                 f"{', '.join(self.params)})")
            if job.params:  # no params: the model keeps its factory's weights (weights "own", the source)
                self.load(self.assign)
        # The state every case starts from (after loading): see the module docstring.
        self._state = [(v, v.numpy()) for v in model.non_trainable_weights]
        self._losses = self._make_losses()
        self._first = None  # environment()'s traced forward pass, which "describe" reuses

    def _build(self, factory):
        """The factory's model; under the switch 'autocast' built in tf_keras' mixed dtype policy."""
        if not self.job.autocast:
            model = factory()
        else:
            tf_keras.mixed_precision.set_global_policy(f"mixed_{self.job.autocast}")
            try:
                model = factory()
            finally:
                # Back to the default policy, which follows floatx (setting the one read before would pin it).
                tf_keras.mixed_precision.set_global_policy(None)
        if not isinstance(model, tf_keras.Model):
            kind = type(model)
            keras3 = any(c.__module__.partition(".")[0] == "keras" for c in kind.__mro__)
            hint = " (a Keras 3 model: run it on a keras backend)" if keras3 else ""
            raise TypeError(f"the tf_keras factory {self.job.payload.get('factory')} returned {kind.__module__}."
                            f"{kind.__qualname__}, not a tf_keras.Model{hint}")
        return model

    # -- inputs and targets ----------------------------------------------------------------------------

    def _tensor(self, a):
        a = np.asarray(a)
        dtype = self.job.dtype if a.dtype.kind == "f" else tf.int32 if a.dtype.kind in "iu" else None
        return tf.convert_to_tensor(a, dtype=dtype)

    def _convert(self, part: str) -> Inputs:
        """The batch's (or part ``part``'s) inputs and targets as tensors on the device: ids int32, floating
        inputs in the job's dtype; class targets int32 (the job's dtype for mse), IGNORE_INDEX kept."""
        named = call_inputs(self.job, part)
        y = self.job.targets(part)
        y = tf.convert_to_tensor(y, dtype=self.job.dtype if self.loss_name == "mse" else tf.int32)
        if named is None:
            return Inputs((self._tensor(self.job.batch[f"parts/{part}/x" if part else "x"]),), {}, y)
        return Inputs((), {arg: self._tensor(a) for arg, a in named.items()}, y)

    def _case_inputs(self, part: str) -> Inputs:
        if part not in self._inputs:  # converted once, so timed calls do not convert again
            self._inputs[part] = self._convert(part)
        return self._inputs[part]

    def _logits(self, model, inputs: Inputs):
        """The model on ``inputs`` in the job's mode; the tensor the loss reads (``select_output``)."""
        out = model(*inputs.args, **inputs.kwargs, training=self.training)
        return select_output(out, self.output_path, _is_tensor)

    # -- names, layout, loading --------------------------------------------------------------------------

    def _layer_tree(self) -> tuple[list, dict[int, str]]:
        """Every layer, the model first, depth-first; {id(layer): path of layer names from the model} (the model
        itself: "")."""
        layers, paths = [self.model], {id(self.model): ""}

        def walk(layer, prefix):
            for child in layer._flatten_layers(include_self=False, recursive=False):
                if id(child) in paths:
                    continue  # a shared layer: named by its first path
                path = f"{prefix}.{child.name}" if prefix else child.name
                paths[id(child)] = path
                layers.append(child)
                walk(child, path)

        walk(self.model, "")
        return layers, paths

    def _layer_name(self, layer) -> str:
        return self.paths[id(layer)] or self.model.name

    def _native(self, variable) -> str:
        name = variable.name.rpartition(":")[0] if ":" in variable.name else variable.name
        prefix = self.model.name + "/"
        return (name[len(prefix):] if name.startswith(prefix) else name).replace("/", ".")

    def _name_variables(self) -> dict[str, Param]:
        """Each floating variable once: under its path when that path starts with the path of a layer holding
        it (that layer then owns it) or the model itself holds it, else (a variable created outside its layer's
        name scope) as 'HOLDER PATH.NAME' of the first layer holding it; the other holders' 'PATH.NAME' are its
        aliases (tied weights)."""
        holders: dict[int, list] = {}
        variables = {}
        for layer in self.layers:
            for v in _owned(layer):
                holders.setdefault(id(v), []).append(layer)
                variables[id(v)] = v
        params: dict[str, Param] = {}
        for key, layers in holders.items():
            v = variables[key]
            native = self._native(v)
            held = {id(la): f"{self.paths[id(la)]}.{_short(v)}" if self.paths[id(la)] else _short(v)
                    for la in layers}
            owner = next((la for la in layers if self.paths[id(la)] and native.startswith(self.paths[id(la)] + ".")),
                         self.model if any(la is self.model for la in layers) else None)
            name = native if owner is not None else held[id(layers[0])]
            owner = owner if owner is not None else layers[0]
            if name in params:
                name = held[id(owner)]
                if name in params:
                    raise ValueError(f"two variables of the model are both named {name!r}; give their layers "
                                     "distinct names")
            aliases = [h for h in dict.fromkeys(held.values()) if h != name]
            params[name] = Param(name, owner, v, _role(owner, v), aliases)
        return params

    def load(self, assign: dict[str, str]) -> None:
        """Overwrite the model's variables with the canonical arrays core mapped onto them."""
        for native, key in assign.items():
            if key not in self.job.params:
                raise ValueError(f"{native}: mapped onto {key!r}, which the job does not carry")
            p = self.by_name[native]
            value = p.from_canonical(np.asarray(self.job.params[key], dtype=p.variable.dtype.as_numpy_dtype))
            if tuple(value.shape) != tuple(p.variable.shape):
                raise ValueError(f"{native}: mapped value has shape {value.shape}, the layer's is "
                                 f"{tuple(p.variable.shape)}")
            p.variable.assign(value)

    def restore(self) -> None:
        """Put back the state a forward pass may have written (see the module docstring)."""
        for variable, value in self._state:
            variable.assign(value)
        if self.training:
            tf.random.set_seed(0)

    # -- the loss, natively ------------------------------------------------------------------------

    def _make_losses(self) -> dict:
        """Callables ``(y, logits)`` keyed by tf_keras' reductions: "sum", "sum_over_batch_size", and "none",
        each example's sum of its loss terms (N,)."""
        job = self.job
        reductions = ("none", "sum", "sum_over_batch_size")
        if self.loss_name == "mse":
            base = {r: self._mse(r) for r in reductions}
        else:
            # Ignored targets: tf_keras' own ignore_class (its mean divides by the valid count).
            ignore = {"ignore_class": IGNORE_INDEX} if job.padded else {}
            base = {r: tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=r, **ignore)
                    for r in reductions}
            if job.class_weights is not None:
                with self.dev.scope():
                    table = tf.constant(job.class_weights, dtype=job.dtype)
                base = {r: _class_weighted(loss, table) for r, loss in base.items()}

        def per_example(y, out):
            losses = base["none"](y, out)
            if len(losses.shape) == 1:
                return losses
            return tf.reduce_sum(tf.reshape(losses, (tf.shape(losses)[0], -1)), axis=1)

        return dict(base, none=per_example)

    def _mse(self, reduction: str):
        """tf_keras' MeanSquaredError with ``reduction``; it averages the last axis first (its mean over the rest
        is the mean over all), so "sum" and "none" multiply back by the last axis's length."""
        if reduction == "sum_over_batch_size":
            return tf_keras.losses.MeanSquaredError(reduction=reduction)
        none = tf_keras.losses.MeanSquaredError(reduction="none")

        def call(y, out):
            per = none(y, out) * tf.cast(tf.shape(out)[-1], out.dtype)
            return per if reduction == "none" else tf.reduce_sum(per)
        return call

    def _grads(self, grads) -> dict[str, np.ndarray]:
        """Canonical gradients of the assigned trainable variables, keyed by assign's keys; ``grads`` is aligned
        with ``self.variables`` (None: the loss does not reach it, a zero gradient)."""
        by_id = {id(v): g for v, g in zip(self.variables, grads)}
        out = {}
        for native, key in self.assign.items():
            p = self.by_name[native]
            if id(p.variable) not in self.trainable:
                continue
            g = by_id.get(id(p.variable))
            value = (np.zeros(p.variable.shape, p.variable.dtype.as_numpy_dtype) if g is None
                     else np.asarray(_dense(g)))  # a CPU tensor's buffer, not a copy
            out[key] = p.to_canonical(value)
        return out

    # -- the environment ----------------------------------------------------------------------------

    def environment(self) -> dict:
        job = self.job
        # The variables' dtypes, the layers' compute dtypes (a mixed policy's narrow format), and below what a
        # forward pass's layer outputs and logits hold.
        dtypes = {v.dtype.name for v in self.model.weights if _is_float(v)}
        dtypes |= {layer.compute_dtype for layer in self.layers if getattr(layer, "compute_dtype", None)}
        try:  # what the model really computes in: a layer of the user's own dtype, a cast in its call
            with self.dev.scope():
                self.restore()
                self._first = self._summary(*self._trace(self._inputs[""]))
            dtypes |= self._first["dtypes"]
        except Exception:  # noqa: BLE001 - a broken forward pass is "describe"'s error (BatchDoesNotFit)
            self._first = None
        dtype = min((d for d in dtypes if d in SIGNIFICAND_BITS), key=SIGNIFICAND_BITS.get, default=job.dtype)
        precision = dict(self.dev.precision(), tf_keras_floatx=tf_keras.backend.floatx(),
                         tf_keras_dtype_policy=self.model.dtype_policy.name, requested=job.precision)
        device, kind, cc = self.dev.where(self.model.weights[0]) if self.model.weights else ("cpu", "cpu", None)
        tf32 = bool(kind == "gpu" and cc is not None and tuple(cc) >= (8, 0) and dtype == "float32"
                    and self.dev.tf32_enabled())
        return dict(environment(self.dev, device, kind, dtype, precision, tf32), autocast=job.autocast,
                    mode=job.payload.get("mode", "inference"), layer_options=None, gelu_accuracy=None)

    # -- the cases ----------------------------------------------------------------------------------

    def compute(self, case: str) -> RawResult:
        """Run one case from scratch (the written state restored, a fresh tape each time): "describe",
        "forward", or 'METHOD[@PART]' for a method of ``SESSION_METHODS``; native loss and gradients."""
        with self.dev.scope():
            self.restore()
            if case in MODEL_CASES:
                return self._describe() if case == "describe" else self._forward()
            method, _, part = case.partition("@")
            if method not in SESSION_METHODS:
                raise ValueError(f"unknown case {case!r}; the tf-keras model session computes "
                                 f"{', '.join((*MODEL_CASES, *SESSION_METHODS))}")
            if self.assign is None:
                raise ValueError(f"case {case!r} needs the mapped weights (payload 'assign')")
            inputs = self._case_inputs(part)
            if method in REDUCTIONS:
                with tf.GradientTape() as tape:
                    loss = self._losses[REDUCTIONS[method]](inputs.y, self._logits(self.model, inputs))
                grads = tape.gradient(loss, self.variables)
                return RawResult(float(loss.numpy()), self._grads(grads))
            # one_by_one feeds every example but those without a valid target (alone, its mean would be 0/0).
            fed = self.job.fed_alone(case) if self.job.padded else list(range(int(inputs.y.shape[0])))
            losses, grads = getattr(self, "_" + method)(inputs, fed)
            # Not a framework reduction: the per-example values, summed on the host.
            return RawResult(float(np.sum([np.sum(np.asarray(v), dtype=np.float64) for v in losses])),
                             self._grads(grads))

    def _accumulate(self, state, grads):
        """One example's gradients into the loop's (accumulator, what was read); with 'unzeroed_gradients' the
        accumulator, holding examples 0..i, is read and added up after every example, as a training loop that
        never resets its gradient-accumulation variables does."""
        acc, read = state
        acc = _add(acc, grads)
        return acc, (_add(read, acc) if self.job.unzeroed else None)

    def _result(self, state):
        return state[1] if self.job.unzeroed else state[0]

    def _none_loop(self, inputs: Inputs, fed):
        with tf.GradientTape(persistent=True) as tape:  # persistent = torch's retain_graph
            losses = self._losses["none"](inputs.y, self._logits(self.model, inputs))
            parts = tf.unstack(losses)  # sliced on the tape: each part needs its own gradient
        state = (None, None)
        for part in parts:
            state = self._accumulate(state, tape.gradient(part, self.variables))
        del tape
        return [losses], self._result(state)

    def _one_by_one(self, inputs: Inputs, fed):
        state, losses = (None, None), []
        for i in fed:
            one = inputs.example(i)
            with tf.GradientTape() as tape:
                loss = self._losses["sum_over_batch_size"](one.y, self._logits(self.model, one))
            losses.append(loss.numpy())
            state = self._accumulate(state, tape.gradient(loss, self.variables))
        return losses, self._result(state)

    def _none_vectorized(self, inputs: Inputs, fed):
        model, variables, loss_sum = self.model, self.variables, self._losses["sum"]
        names = list(inputs.kwargs)

        def one_example(elems):
            args, kwargs, yi = elems
            one = Inputs(tuple(a[None] for a in args), {k: a[None] for k, a in zip(names, kwargs)}, yi[None])
            with tf.GradientTape() as tape:
                loss = loss_sum(one.y, self._logits(model, one))
            grads = tape.gradient(loss, variables)
            # vectorized_map stacks tensors only: a variable the loss never reaches has a zero gradient.
            return loss, [tf.zeros_like(v) if g is None else _dense(g) for v, g in zip(variables, grads)]

        per_example = tf.function(lambda args, kwargs, y: tf.vectorized_map(
            one_example, (args, kwargs, y), fallback_to_while_loop=False))
        try:
            losses, grads = per_example(inputs.args, [inputs.kwargs[k] for k in names], inputs.y)
        except Exception as exc:  # noqa: BLE001 - any refusal of pfor, said plainly
            raise RuntimeError("tf-keras: none_vectorized is not supported on this tf_keras model: "
                               "tf.vectorized_map cannot vectorize one example's forward and backward pass "
                               f"({_pfor_reason(exc)})") from exc
        return [losses], [tf.reduce_sum(g, axis=0) for g in grads]

    def _blocks(self) -> list:
        """The containers whose outputs localization compares too (``ModelLayout.blocks``): layers with
        sublayers holding no variable themselves, with a holder inside (a residual block), the model excepted,
        depth-first (the index of "block_output/B")."""
        holders = {id(p.layer) for p in self.params.values()}
        held = [self._layer_name(la) for la in self.layers if id(la) in holders]
        return [la for la in self.layers if la is not self.model and id(la) not in holders and _has_sublayers(la)
                and any(n.startswith(self._layer_name(la) + ".") for n in held)]

    @contextlib.contextmanager
    def _recording(self, records: dict, calls: list, blocks: dict | None = None):
        """Wrap every leaf layer's and variable holder's ``call``: note each call in ``calls`` ([path, type]),
        and each holder's first call's first tensor input and its output in ``records`` (by path); ``blocks``,
        when given, takes each block's (``_blocks``) first output by path (a tuple's first; None: no tensor)."""
        holders = {id(p.layer) for p in self.params.values()}
        wrapped = []
        for layer in self._blocks() if blocks is not None else ():
            original, name = layer.call, self._layer_name(layer)

            def block_call(*args, _original=original, _name=name, **kwargs):
                out = _original(*args, **kwargs)
                if _name not in blocks:
                    first = out[0] if isinstance(out, (tuple, list)) and out else out
                    blocks[_name] = first if _is_tensor(first) else None
                return out

            object.__setattr__(layer, "call", block_call)  # past the layer's attribute tracking
            wrapped.append(layer)
        for layer in self.layers:
            if id(layer) not in holders and _has_sublayers(layer):
                continue  # a container holding nothing itself: its leaves are recorded
            original, name = layer.call, self._layer_name(layer)

            def call(*args, _original=original, _layer=layer, _name=name, **kwargs):
                out = _original(*args, **kwargs)
                calls.append((_name, type(_layer).__name__))
                if id(_layer) in holders and _name not in records:
                    first = next((a for a in (*args, *kwargs.values()) if _is_tensor(a)), None)
                    records[_name] = {"layer": _layer, "input": first, "output": out if _is_tensor(out) else None}
                return out

            object.__setattr__(layer, "call", call)  # past the layer's attribute tracking
            wrapped.append(layer)
        try:
            yield
        finally:
            for layer in wrapped:
                object.__delattr__(layer, "call")

    def _trace(self, inputs: Inputs, blocks: dict | None = None):
        """Forward ``inputs`` with every call recorded; returns (logits, calls, records); ``blocks`` takes the
        blocks' first outputs (``_recording``)."""
        records, calls = {}, []
        with self._recording(records, calls, blocks):
            out = self._logits(self.model, inputs)
        return out, calls, records

    @staticmethod
    def _summary(out, calls, records) -> dict:
        """What "describe" keeps of a traced forward pass (no tensors but their dtypes)."""
        dtypes = {t.dtype.name for rec in records.values() for t in (rec["output"],) if t is not None
                  and t.dtype.is_floating} | ({out.dtype.name} if out.dtype.is_floating else set())
        return {"output_shape": [int(d) for d in out.shape], "calls": [list(c) for c in calls],
                "called": [rec["layer"] for rec in records.values()], "dtypes": dtypes}

    def _describe(self) -> RawResult:
        # Values before the forward pass: in training mode it moves the normalizations' statistics.
        values = {name: p.to_canonical(np.asarray(p.variable.numpy(), dtype=self.job.dtype))
                  for name, p in self.params.items()}
        summary, self._first = self._first, None  # environment()'s forward pass, once; else one now
        if summary is None:
            summary = self._summary(*first_forward(self.job, lambda: self._trace(self._inputs[""])))
        called = summary["called"]
        holding = list(dict.fromkeys(p.layer for p in self.params.values()))
        layers = []
        for layer in called + [la for la in holding if all(la is not c for c in called)]:
            params = []
            for p in self.params.values():
                if p.layer is layer:
                    entry = {"name": p.name, "role": p.role, "shape": p.canonical_shape,
                             "trainable": id(p.variable) in self.trainable}
                    if p.aliases:
                        entry["aliases"] = list(p.aliases)
                    params.append(entry)
            layers.append({"name": self._layer_name(layer), "type": type(layer).__name__,
                           "called": any(layer is c for c in called), "fused_activation": _fused(layer),
                           "params": params})
        blocks = []
        for block in self._blocks():
            name = self._layer_name(block)
            inside = [k for k, layer in enumerate(layers) if layer["name"].startswith(name + ".")]
            blocks.append({"name": name, "type": type(block).__name__,
                           "called": any(layers[k]["called"] for k in inside), "layers": inside,
                           "members": list(dict.fromkeys(n for n, _ in summary["calls"] if n.startswith(name + ".")))})
        info = {"layers": layers, "calls": summary["calls"], "output_shape": summary["output_shape"],
                "blocks": blocks}
        return RawResult(float("nan"), values, info)  # no loss: core checks the targets against the output first

    def _forward(self) -> RawResult:
        """Each called holder's first input and output, d(mean loss)/d(output) from the tape, the logits and the
        mean loss."""
        inputs = self._inputs[""]
        blocks: dict = {}
        with tf.GradientTape() as tape:
            out, _, records = self._trace(inputs, blocks)
            loss = self._losses["sum_over_batch_size"](inputs.y, out)
        outputs = {n: rec["output"] for n, rec in records.items() if rec["output"] is not None}
        grads = dict(zip(outputs, tape.gradient(loss, list(outputs.values())))) if outputs else {}
        arrays = {"logits": out.numpy()}
        for k, (name, rec) in enumerate(records.items()):
            if rec["input"] is not None:
                arrays[f"input/{k}"] = np.asarray(rec["input"])
            if rec["output"] is not None:
                arrays[f"output/{k}"] = rec["output"].numpy()
                if grads.get(name) is not None:
                    arrays[f"grad_output/{k}"] = np.asarray(_dense(grads[name]))
        for b, block in enumerate(self._blocks()):
            if blocks.get(self._layer_name(block)) is not None:
                arrays[f"block_output/{b}"] = np.asarray(blocks[self._layer_name(block)])
        return RawResult(float(loss.numpy()), arrays, {"layers": list(records)})


def _add(total, grads):
    """``total + grads`` element by element, a gradient None (a variable the loss never reaches) or
    ``IndexedSlices`` (made dense) included."""
    grads = [_dense(g) for g in grads]
    if total is None:
        return grads
    return [b if a is None else a if b is None else a + b for a, b in zip(total, grads)]


def _pfor_reason(exc: Exception) -> str:
    """The op ``tf.vectorized_map`` has no vectorization for (an embedding's ``ResourceGather`` on its variable,
    ignore_class's ``Where``), from its error's text; else the error's first informative line."""
    import re

    text = str(exc)
    found = re.search(r'No pfor vectorization defined for (\S+)\s*\n\s*name: "([^"]+)"', text)
    if found:
        return f"no vectorization of the op {found[1]}, in {found[2].removeprefix('loop_body/')}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "in user code" not in line]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _class_weighted(loss, table):
    """The switch 'class_weights' the Keras way: the loss called with sample_weight = w[y]."""
    def call(y, logits):
        return loss(y, logits, sample_weight=tf.gather(table, y))
    return call


def open_session(job: WorkerJob) -> TfKerasModelSession:
    """The worker's entry for task "model_check": the user's tf_keras model built with floatx = the job's dtype
    on the job's device, its mapped weights loaded when the job carries them; may raise DeviceUnavailable."""
    if job.task != "model_check":
        raise ValueError(f"the tf-keras model session runs 'model_check' jobs, got task {job.task!r}")
    return TfKerasModelSession(job)
