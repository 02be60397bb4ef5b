"""Keras 3's model session: every model, built-in (the MLP, the CNN, the sequence model: task "gradients") or a
user's own ``keras.Model`` (task "model_check"), with Keras' own losses and reductions (contract in
``protocol``).

Imported only inside a worker process, with KERAS_BACKEND already set to ``job.variant`` ("tensorflow", "jax"
or "torch"). One code path builds the model (``models.build`` for a built-in one, payload "builtin"; the user's
factory otherwise) in floatx = the job's dtype, loads the canonical weights, holds the loss callables and
converts results; only the autodiff differs per Keras backend (``device.VARIANTS``: a ``tf.GradientTape``,
``jax.value_and_grad``/``jax.vjp`` over ``stateless_call``, or ``loss.backward()``). Keras stores kernels in the
canonical layout (Dense (in, out), conv (*window, in, out)) and images channels-last, so nothing is
transposed; normalization ``gamma``/``beta`` are "scale"/"bias", BatchNormalization's moving statistics
"mean"/"var".

The point of this backend is Keras' *own* reduction semantics: the loss is a
``keras.losses.SparseCategoricalCrossentropy(from_logits=True)`` (or ``MeanSquaredError`` for a user's model
with loss "mse") with Keras' reductions: "sum", and "sum_over_batch_size" for ``mean``, which divides by the
number of elements of the loss tensor (N, or N x T for a sequence's tokens). "none" gives each example's summed
loss terms, whose N backward passes none_loop runs. The switches, Keras' way: 'class_weights' calls the loss
with ``sample_weight = w[y]``; 'padding' gives the loss ``ignore_class`` (its means divide by the valid
terms); 'autocast' builds the model under Keras' mixed dtype policy (compute in the narrow format, float32
variables); 'dropout' feeds core's keep-masks to the built-in MLP (``models.KerasMLP``); batch normalization
(the MLP's ``model["batchnorm"]``, mode "training") normalizes with the statistics of the batch it sees, so an
example fed alone (one_by_one, or one vectorized example) is a batch of one.

A forward pass may write state (BatchNormalization's moving statistics in training mode, a Dropout's seed,
torch's global generator for an unseeded Dropout on Keras' torch backend): every case first puts it back as it
was after loading, so it starts from scratch.

A user's model (task "model_check") may take named inputs (payload "inputs", ``call_inputs``): a functional model
(or a Sequential) built on named ``keras.Input``s is called with one dict ``model({name: tensor})``, which Keras
matches to its Inputs by name; a subclassed model whose ``call`` takes those names as arguments is called with
keyword arguments ``model(**{name: tensor})``; any other (a ``call(inputs)`` reading a dict, as Keras Hub's models
do) with the dict (``call_style``). Integer arrays stay integer (int32, Keras' own index dtype), floating ones take
the job's dtype; every per-example loop slices each input along axis 0. The loss reads ``select_output``'s tensor
of what the model returns (payload "output": a dict's "logits", a tuple's "0"). Targets ``IGNORE_INDEX`` (-100:
Hugging Face's ignored labels, the causal-LM shift's last position) go to the loss as ``ignore_class``, as the
switch 'padding''s do. With no ``job.params`` (weights "own") nothing is loaded: the model keeps its factory's
weights, and ``payload["assign"]`` still names the gradients to return. A variable two layers hold (tied weights:
a head reusing an Embedding's matrix as an attribute) is one parameter, named by its first holder in the layers'
order, the other holder's "LAYER/ATTRIBUTE" its alias; its gradient, the sum over its uses, is returned once.

Layers' calls are recorded ("describe", "forward") by wrapping each layer instance's ``call`` for the length
of one eager forward pass (``Operation.__call__`` looks ``self.call`` up on every call, so an instance attribute
is seen, then removed). A layer with a fused activation (``Dense(..., activation="relu")``) returns the
activation's output; it is flagged ``fused_activation`` so that core does not compare it with another
framework's affine output.

float64 is not always float64 here: Keras' type promotion (``keras.backend.result_type``) maps float64 results
to float32 on its jax and torch backends, and some ops use it (keras 3.15: torch ``matmul``, the
"sum_over_batch_size" division, jax ``tanh``, the normalization layers on both, which compute in
``result_type(input, "float32")``). That is Keras' own behaviour and is kept; ``environment()`` names the ops
one forward pass and its losses demoted (``precision['keras_demoted_ops']``; for the MLP also each op's dtype,
``precision['keras_op_dtypes']``) and reports the narrowest dtype anything computed in.
"""
from __future__ import annotations

import contextlib
import inspect
import sys

import keras
import numpy as np

from gradparity.backends.keras.device import SIGNIFICAND_BITS, environment, open_variant
from gradparity.backends.protocol import (IGNORE_INDEX, SEPARATE_FORWARD, SESSION_METHODS, CaseInputs, RawResult,
                                          WorkerJob, assignment, call_inputs, check_switches, first_forward,
                                          gelu_accuracy, layer_options, load_factory, select_output)

#: Keras' reduction name of each single-backward method (the variants' loss callables are keyed so).
REDUCTIONS = {"mean": "sum_over_batch_size", "sum": "sum"}

_KERNEL_LAYERS = {"Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
                  "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D"}
_NORM_LAYERS = {"BatchNormalization", "LayerNormalization", "GroupNormalization", "RMSNormalization"}


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


def call_style(model, args) -> str:
    """How ``model`` takes the named inputs ``args`` (payload "inputs"): "dict", one positional dict (a functional
    model or a Sequential: it has named ``inputs``, which Keras matches by name; also a subclassed model whose
    ``call`` takes one dict), or "kwargs", keyword arguments (a subclassed model whose ``call`` names every one of
    them, or takes ``**kwargs`` only)."""
    try:
        named = [t.name for t in model.inputs or ()]
    except (AttributeError, TypeError, ValueError):  # a subclassed model has no symbolic inputs
        named = []
    if named:
        return "dict"
    try:
        params = inspect.signature(model.call).parameters.values()
    except (TypeError, ValueError):
        return "dict"
    by_name = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = any(p.kind == p.VAR_KEYWORD for p in params)
    return "kwargs" if set(args) <= by_name or (keywords and not positional) else "dict"


class ModelCall:
    """The model as the variants' autodiff calls it (``device``): ``call(x, masks)`` and
    ``stateless_call(trainable, non_trainable, x, masks)`` in the job's mode (``training``), each returning the
    tensor the loss reads (``select_output`` of the model's output with the payload's path ``output``; a tensor
    output is that tensor). ``x`` is one tensor, passed positionally, or a dict {argument: tensor} (payload
    "inputs") passed as ``style`` says (``call_style``). The switch 'dropout''s keep-masks are passed to the
    built-in MLP only when there are some (an empty list: off)."""

    def __init__(self, model, training: bool, style: str = "dict", output: str | None = None):
        self.model, self.training, self.style, self.output = model, training, style, output
        self.trainable_variables = model.trainable_variables
        self.non_trainable_variables = model.non_trainable_variables
        # stateless_call hands its keyword arguments to `call` unfiltered (Layer.__call__ drops a `training`
        # that `call` does not take).
        self._takes_training = getattr(model, "_call_has_training_arg", True)

    def _arguments(self, x) -> tuple[tuple, dict]:
        if isinstance(x, dict) and self.style == "kwargs":
            return (), dict(x)
        return (x,), {}

    def __call__(self, x, masks=()):
        args, kwargs = self._arguments(x)
        out = self.model(*args, training=self.training, **kwargs, **({"masks": masks} if masks else {}))
        return select_output(out, self.output, _is_tensor)

    def stateless_call(self, trainable, non_trainable, x, masks=()):
        args, kwargs = self._arguments(x)
        if self._takes_training:
            kwargs["training"] = self.training
        out, state = self.model.stateless_call(trainable, non_trainable, *args, **kwargs,
                                               **({"masks": masks} if masks else {}))
        return select_output(out, self.output, _is_tensor), state


def _class_weighted(loss, table):
    """The switch 'class_weights' the Keras way: the loss called with sample_weight = w[y] (``table`` the
    weights' tensor)."""
    def call(y, logits, sample_weight=None):
        w = keras.ops.take(table, y)
        return loss(y, logits, sample_weight=w if sample_weight is None else w * sample_weight)
    return call


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


class KerasModelSession:
    """One Keras model, built-in or a user's, in floatx = the job's dtype on the job's Keras backend, its weights
    loaded, and its loss callables; ``compute`` answers "describe", "forward" and every method of
    ``SESSION_METHODS`` ('METHOD' on the batch, 'METHOD@PART' on a part), dispatching to the variant's autodiff.
    """

    def __init__(self, job: WorkerJob):
        self.job = job
        self.ad = open_variant(job)  # device choice and precision, before any tensor exists
        self.variant = keras.backend.backend()
        self.builtin = job.payload.get("builtin")
        #: The built-in model's kind ("mlp", "cnn", "sequence"), or None for a user's model.
        self.kind = self.builtin.get("kind", "mlp") if self.builtin is not None else None
        self.loss_name = job.payload.get("loss", job.loss.get("name", "cross_entropy"))
        check_switches(job)
        self.training = job.payload.get("mode") == "training"
        keras.config.set_floatx(job.dtype)  # the factory's layers create their variables in the job's dtype
        factory = load_factory(job)
        # Keras numbers auto-named layers per process: start from zero, so the describe job and the mapped
        # jobs name the variables alike whatever the user's module built at import.
        keras.backend.clear_session()
        named = call_inputs(job)  # {argument: array} when the model takes named inputs, else None
        with self.ad.scope():
            model = self._build(factory)
            style = "dict" if named is None else call_style(model, named)
            self.output = job.payload.get("output")
            # IGNORE_INDEX where 'padding' marks, or where a user's targets hold it.
            self.x, self.y = self.convert(job.batch["x"] if named is None else named, job.targets())
            if not model.built:  # builds its variables
                first_forward(job, lambda: ModelCall(model, False, style, self.output)(self.x))
            # The switch 'dropout': per forward kind, the masks' tensors (empty when off).
            self.masks = {forward: [keras.ops.convert_to_tensor(m, dtype=job.dtype)
                                    for m in job.dropout_masks(forward) or ()]
                          for forward in ("batch", "single")}
        self.model = model
        self.layers = list(model._flatten_layers(include_self=True, recursive=True))
        # native name -> (layer, variable); first name -> [alias names] of a tied variable
        self.owners, self.aliases = self._name_variables()
        self.alias_of = {alias: native for native, names in self.aliases.items() for alias in names}
        self.native = {id(v): name for name, (_, v) in self.owners.items()}
        self.assign = assignment(job)
        if self.builtin is not None and sorted(self.assign.values()) != sorted(job.params):
            raise ValueError(f"model parameters {sorted(self.assign.values())} do not match the job's "
                             f"{sorted(job.params)}")
        if self.assign is not None:
            for native in self.assign:
                self._owner(native)  # an unknown name is an error even when nothing is loaded
            if self.builtin is not None or job.params:  # no params (weights "own"): the factory's weights stay
                self.load(self.assign)
        # The state every case starts from (after loading): see the module docstring.
        self._state = [(v, _numpy(v.value)) for v in model.non_trainable_variables]
        if self.variant == "torch":  # an unseeded Dropout on Keras' torch backend draws from torch's generator
            import torch

            self._torch_rng = torch.random.get_rng_state(), torch.cuda.get_rng_state_all()
        self._inputs = CaseInputs(job, (self.x, self.y), self.convert)
        self.call = ModelCall(model, self.training, style, self.output)
        self.ad.bind(self.call, self._losses())
        self.ad.unzeroed = job.unzeroed

    def _build(self, factory):
        """The factory's model; under the switch 'autocast' built in Keras' mixed dtype policy (every layer that
        does not set its own dtype computes in the narrow format over float32 variables)."""
        previous = keras.config.dtype_policy()
        if self.job.autocast:
            keras.config.set_dtype_policy(f"mixed_{self.job.autocast}")
        try:
            model = factory()
        finally:
            keras.config.set_dtype_policy(previous)
        if not isinstance(model, keras.Model):
            kind = type(model)
            raise TypeError(f"the keras factory {self.job.payload.get('factory')} returned {kind.__module__}."
                            f"{kind.__qualname__}, not a keras.Model")
        return model

    def convert(self, x, y):
        """(x, y) as the backend's tensors (call inside ``ad.scope()``): float inputs in the job's dtype, ids and
        class targets int32 (jax without x64 has no int64), mse targets in the job's dtype; ``x`` a dict of named
        inputs ({argument: array}) gives a dict of tensors."""
        def tensor(a):
            a = np.asarray(a)
            return keras.ops.convert_to_tensor(a, dtype=self.job.dtype if a.dtype.kind == "f" else
                                               "int32" if a.dtype.kind in "iu" else None)
        return ({arg: tensor(a) for arg, a in x.items()} if isinstance(x, dict) else tensor(x),
                keras.ops.convert_to_tensor(y, dtype=self.job.dtype if self.loss_name == "mse" else "int32"))

    def _name_variables(self) -> tuple[dict, dict]:
        """({native name: (layer, variable)}, {native name: [alias names]}): each floating variable's native name,
        its Keras path, or "layer name/variable name" where two paths coincide. A variable two layers hold (tied
        weights) belongs to the first; each later holder names it "layer name/attribute" (the attribute it is
        held by, else the variable's name), an alias."""
        pairs, seen, held = [], set(), {}
        for layer in self.layers:
            for v in _owned(layer):
                if id(v) not in seen:
                    seen.add(id(v))
                    pairs.append((layer, v))
                else:
                    attr = next((k for k, value in vars(layer).items() if value is v), v.name)
                    held.setdefault(id(v), []).append(f"{layer.name}/{attr}")
        paths = [v.path for _, v in pairs]
        owners = {}
        for layer, v in pairs:
            name = v.path if paths.count(v.path) == 1 else f"{layer.name}/{v.name}"
            if name in owners:
                raise ValueError(f"two variables of the model are both named {name!r}; give their layers "
                                 "distinct names")
            owners[name] = (layer, v)
        aliases = {name: held[id(v)] for name, (_, v) in owners.items() if id(v) in held}
        clash = set(owners) & {a for names in aliases.values() for a in names}
        if clash:
            raise ValueError(f"a tied variable's alias {sorted(clash)[0]!r} is also another variable's name; give "
                             "their layers distinct names")
        return owners, aliases

    def _owner(self, native: str) -> tuple:
        """(layer, variable) of a native name, a tied variable's alias included."""
        name = self.alias_of.get(native, native)
        if name not in self.owners:
            raise ValueError(f"{native}: the model has no variable of that name (it has: "
                             f"{', '.join(self.owners)})")
        return self.owners[name]

    def load(self, assign: dict[str, str]) -> None:
        """Overwrite the model's variables with the canonical arrays core mapped onto them."""
        for native, key in assign.items():
            _, variable = self._owner(native)
            # The variable's dtype is the job's (floatx) unless the layer pinned its own.
            value = np.asarray(self.job.params[key], dtype=keras.backend.standardize_dtype(variable.dtype))
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"{native}: mapped value has shape {value.shape}, the layer's is "
                                 f"{tuple(variable.shape)}")
            variable.assign(value)

    def restore(self) -> None:
        """Put back the state a forward pass may have written (moving statistics, seeds, torch's generator)."""
        for variable, value in self._state:
            variable.assign(value)
        if self.variant == "torch":
            import torch

            torch.random.set_rng_state(self._torch_rng[0])
            torch.cuda.set_rng_state_all(self._torch_rng[1])

    def trained(self) -> list[tuple[object, str]]:
        """(variable, key of ``job.params``) of every mapped trainable variable, in the model's order."""
        return [(v, self.assign[self.native[id(v)]]) for v in self.model.trainable_variables
                if self.native.get(id(v)) in self.assign]

    # -- the loss, natively ------------------------------------------------------------------------

    def _losses(self) -> dict:
        """The loss callables ``(y, logits[, sample_weight])`` the variants' autodiff reads, keyed by Keras'
        reductions ("mean_with_sample_weight" too when a training run is weighted); "none" is each example's
        sum of its loss terms, (N,), whose N backward passes none_loop runs."""
        job, ops = self.job, keras.ops
        reductions = ["none", "sum", "sum_over_batch_size"]
        if any(run.get("weights") for run in job.payload.get("runs", {}).values()):
            reductions.append("mean_with_sample_weight")
        if self.loss_name == "mse":
            base = {r: self._mse(r) for r in reductions}
        else:
            # The switch 'padding': Keras' own ignore_class masks those targets (its means divide by the valid count).
            ignore = {"ignore_class": IGNORE_INDEX} if job.padded else {}
            base = {r: keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=r, dtype=job.dtype,
                                                                   **ignore) for r in reductions}
            if job.class_weights is not None:
                with self.ad.scope():  # the weights' tensor on the chosen device
                    table = ops.convert_to_tensor(job.class_weights, dtype=job.dtype)
                base = {r: _class_weighted(loss, table) for r, loss in base.items()}

        def per_example(y, out, sample_weight=None):
            losses = base["none"](y, out) if sample_weight is None else base["none"](y, out, sample_weight)
            if len(losses.shape) == 1:
                return losses
            return ops.sum(ops.reshape(losses, (losses.shape[0], -1)), axis=1)

        return dict(base, none=per_example)

    def _mse(self, reduction: str):
        """Keras' MeanSquaredError with ``reduction``; it averages the last axis first (its mean over the rest is
        the mean over all), so "sum" and "none" multiply back by the last axis's length."""
        dtype = self.job.dtype
        if reduction == "sum_over_batch_size":
            return keras.losses.MeanSquaredError(reduction=reduction, dtype=dtype)
        if reduction == "mean_with_sample_weight":
            raise ValueError("a weighted training run needs loss 'cross_entropy', not 'mse'")
        none = keras.losses.MeanSquaredError(reduction="none", dtype=dtype)

        def call(y, out):
            # Native `*`, not keras.ops: Keras' type promotion may demote float64 (see the module docstring).
            per = none(y, out) * out.shape[-1]
            return per if reduction == "none" else keras.ops.sum(per)
        return call

    def _grads(self, grads) -> dict[str, np.ndarray]:
        """Canonical gradients of the mapped trainable variables, keyed as core keyed their values; ``grads``
        is aligned with ``model.trainable_variables`` (None: the loss does not reach it, a zero gradient)."""
        by_name = {self.native[id(v)]: (np.zeros(v.shape, keras.backend.standardize_dtype(v.dtype)) if g is None
                                        else _numpy(g))
                   for v, g in zip(self.model.trainable_variables, grads) if id(v) in self.native}
        return {key: by_name[native] for native, key in
                ((self.alias_of.get(native, native), key) for native, key in self.assign.items()) if native in by_name}

    # -- the environment ----------------------------------------------------------------------------

    def _op_dtypes(self) -> dict[str, str]:
        """The built-in MLP: the dtype each op of the forward pass returns, read back by replaying it.

        Dense.call is ``activation(add(matmul(h, kernel), bias))``, with batch normalization a normalization
        before the activation, with 'dropout' the batch's mask after it; replaying those keras.ops on the
        real variables and inputs, then the loss callables, shows where Keras' type promotion demotes float64
        results to float32 on its jax and torch backends. A later op promotes the value back to float64, so
        the output dtype alone would hide it.
        """
        ops, seen = keras.ops, {}
        name = self.builtin["activation"]
        activation, masks = keras.activations.get({"identity": "linear"}.get(name, name)), self.masks["batch"]
        last = len(self.builtin["sizes"]) - 2

        def note(op, tensor):
            dtype = keras.backend.standardize_dtype(tensor.dtype)
            if op not in seen or SIGNIFICAND_BITS[dtype] < SIGNIFICAND_BITS[seen[op]]:
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
                if self.builtin.get("batchnorm"):
                    h = _replay_batchnorm(self.model.get_layer(f"norm_{i}"), h, note)
                h = note(name, activation(h))
                if masks:
                    h = note("dropout_mask", ops.multiply(h, masks[i]))
            for reduction, loss in self.ad.losses.items():
                note(f"loss[{reduction}]", loss(self.y, h))
        return seen

    def environment(self) -> dict:
        job = self.job
        dtypes, demoted = {keras.backend.standardize_dtype(v.dtype) for v in self.model.weights if _is_float(v)}, set()
        try:  # what the model really computes in: Keras' type promotion, or a layer of the user's own dtype
            with self.ad.scope(), _demotions(demoted):
                out, _, records = self._trace()
                for reduction in ("none", "sum", "sum_over_batch_size"):
                    self.ad.losses[reduction](self.y, out)
            self.restore()
            dtypes |= {keras.backend.standardize_dtype(t.dtype) for rec in records.values()
                       for t in (rec["output"], out) if t is not None}
        except Exception:  # noqa: BLE001 - a broken forward pass is each case's error, not the setup's
            pass
        if demoted:
            dtypes.add("float32")
        precision = dict(self.ad.precision(), keras_floatx=keras.config.floatx(), keras_demoted_ops=sorted(demoted))
        device, kind, cc = self.ad.where(self.model.weights[0]) if self.model.weights else ("cpu", "cpu", None)
        ampere = kind == "gpu" and cc is not None and tuple(cc) >= (8, 0)
        if self.kind == "mlp":
            # The MLP's every op replayed: the narrowest dtype any op computed in bounds the precision of the run;
            # TF32 replaces float32 matmuls only (a float64 run whose tanh Keras demoted still multiplies in
            # float64), and the MLP has no convolution (torch's cuDNN switch does not matter).
            var_dtypes = {keras.backend.standardize_dtype(v.dtype) for v in self.model.weights}
            if len(var_dtypes) != 1:
                raise RuntimeError(f"model variables have mixed dtypes {sorted(var_dtypes)}")
            op_dtypes = self._op_dtypes()
            dtype = min([*var_dtypes, *op_dtypes.values()], key=lambda d: SIGNIFICAND_BITS[d])
            tf32 = bool(ampere and op_dtypes["matmul"] == "float32" and self.ad.tf32_enabled())
            precision["keras_op_dtypes"] = op_dtypes
        else:
            # The narrowest dtype anything computed in bounds the precision of the whole run.
            dtype = min((d for d in dtypes if d in SIGNIFICAND_BITS), key=SIGNIFICAND_BITS.get, default=job.dtype)
            # Keras' torch backend convolves with cuDNN, whose TF32 switch is its own (a built-in model without
            # convolution: matmuls only).
            convolves = self.kind in (None, "cnn")
            tf32_allowed = self.ad.tf32_enabled() or (convolves and self.ad.cudnn_tf32_enabled())
            tf32 = bool(ampere and dtype == "float32" and tf32_allowed)
        if job.autocast:
            # The layers' mixed policy computes in the narrow format (the MLP's replay used the float32 variables).
            dtype = job.autocast
        precision["requested"] = job.precision
        return dict(environment(self.ad, device, kind, dtype, precision, tf32), autocast=job.autocast,
                    mode=job.payload.get("mode", "inference"), layer_options=layer_options(job),
                    gelu_accuracy=self._gelu_accuracy())

    def _gelu_accuracy(self) -> dict | None:
        """keras.activations.gelu (what the built-in models use) measured in the job's dtype."""
        def gelu(x, approximate):
            with self.ad.scope():
                return _numpy(keras.activations.gelu(keras.ops.convert_to_tensor(x), approximate=approximate))
        return gelu_accuracy(self.job, gelu)

    # -- the cases ----------------------------------------------------------------------------------

    def compute(self, case: str) -> RawResult:
        """Run one case from scratch (the written state restored, a fresh backward pass each time): "describe",
        "forward", or 'METHOD[@PART]' for a method of ``SESSION_METHODS``; native loss and gradients."""
        with self.ad.scope():  # a part's tensors are made on the chosen device, once
            self.restore()
            if case == "describe":
                return self._describe()
            if case == "forward":
                return self._forward()
            method, x, y = self._inputs(case)
            if method not in SESSION_METHODS:
                raise ValueError(f"unknown case {case!r}")
            # one_by_one feeds every example but padding (alone, a padding example's mean would be 0/0).
            self.ad.fed_alone = self.job.fed_alone(case) if self.job.padded else list(range(int(y.shape[0])))
            # A forward pass of one example multiplies by that example's own mask row; masks exist for the
            # batch only (core refuses dropout together with parts).
            masks = self.masks["single" if method in SEPARATE_FORWARD else "batch"] if x is self.x else []
            if method in REDUCTIONS:
                loss, grads = self.ad.reduced(REDUCTIONS[method], x, y, masks)
                total = float(_numpy(loss))
            else:
                # none_loop / none_vectorized: the per-example sums of one forward pass; one_by_one: each
                # example's mean. Not a framework reduction: the per-example values, summed on the host.
                losses, grads = getattr(self.ad, method)(x, y, masks)
                total = float(sum(np.sum(_numpy(v), dtype=np.float64)
                                  for v in (losses if isinstance(losses, list) else [losses])))
        return RawResult(total, self._grads(grads))

    def _blocks(self) -> list:
        """The containers whose outputs localization compares too (``ModelLayout.blocks``): layers holding
        layers, owning no variable themselves, with a variable owner inside (a residual block), the model
        itself excepted, in ``_flatten_layers`` order (the index of "block_output/B")."""
        owners = {id(layer) for layer, _ in self.owners.values()}
        return [layer for layer in self.layers if layer is not self.model and id(layer) not in owners
                and layer._layers and any(id(inner) in owners for inner in self._inside(layer))]

    @staticmethod
    def _inside(layer) -> list:
        return list(layer._flatten_layers(include_self=False, recursive=True))

    @contextlib.contextmanager
    def _recording(self, records: dict, calls: list, perturb=None, blocks: dict | None = None):
        """Wrap every layer instance's ``call``: note every leaf's (and variable owner's) call in ``calls``, and
        each owner's first call's input and output in ``records`` (by layer name); ``perturb(name, output)``,
        when given, replaces that first output (to differentiate with respect to it). ``blocks``, when given,
        takes each block's (``_blocks``) first output by name (a tuple's first; None when not a tensor)."""
        owners = {id(layer) for layer, _ in self.owners.values()}
        wrapped = []
        if blocks is not None:
            for layer in self._blocks():
                original = layer.call

                def block_call(*args, _original=original, _layer=layer, **kwargs):
                    out = _original(*args, **kwargs)
                    if _layer.name not in blocks:
                        first = out[0] if isinstance(out, (tuple, list)) and out else out
                        blocks[_layer.name] = first if _is_tensor(first) else None
                    return out

                object.__setattr__(layer, "call", block_call)  # past Layer.__setattr__'s tracking
                wrapped.append(layer)
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

    def _trace(self, perturb=None, state=None, blocks: dict | None = None):
        """Forward the batch with every call recorded; returns (logits, calls, records). ``state``:
        (trainable, non-trainable values) to run ``stateless_call`` on (inside a jax transform); ``blocks``
        takes the blocks' first outputs (``_recording``)."""
        records, calls = {}, []
        with self._recording(records, calls, perturb, blocks):
            if state is None:
                out = self.call(self.x)
            else:
                out, _ = self.call.stateless_call(*state, self.x)
        return out, calls, records

    def _describe(self) -> RawResult:
        # Values before the forward pass: in training mode it moves the normalizations' statistics.
        values = {name: _numpy(v.value) for name, (_, v) in self.owners.items()}
        called_blocks: dict = {}
        out, calls, records = first_forward(self.job, lambda: self._trace(blocks=called_blocks))
        called = [rec["layer"] for rec in records.values()]
        owning = list(dict.fromkeys(layer for layer, _ in self.owners.values()))
        layers = []
        for layer in called + [layer for layer in owning if layer.name not in records]:
            params = [{"name": name, "role": _role(layer, v), "shape": list(v.shape), "trainable": bool(v.trainable),
                       **({"aliases": list(self.aliases[name])} if name in self.aliases else {})}
                      for name, (owner, v) in self.owners.items() if owner is layer]
            layers.append({"name": layer.name, "type": type(layer).__name__, "called": layer.name in records,
                           "fused_activation": _fused(layer), "params": params})
        index = {layer["name"]: k for k, layer in enumerate(layers)}
        blocks = []
        for block in self._blocks():
            inside = {inner.name for inner in self._inside(block)}
            blocks.append({"name": block.name, "type": type(block).__name__, "called": block.name in called_blocks,
                           "layers": [index[n] for n in index if n in inside],
                           "members": list(dict.fromkeys(n for n, _ in calls if n in inside))})
        info = {"layers": layers, "calls": [list(c) for c in calls], "output_shape": [int(d) for d in out.shape],
                "blocks": blocks}
        return RawResult(float("nan"), values, info)  # no loss: core checks the targets against the output first

    def _forward(self) -> RawResult:
        """Each called owner's first input and output, d(mean loss)/d(output), the logits and the mean loss.

        TensorFlow's tape differentiates with respect to the recorded outputs themselves; on jax and torch a
        zero is added to each (``perturb``) and the loss differentiated with respect to those zeros.
        """
        mean = self.ad.losses["sum_over_batch_size"]
        blocks: dict = {}
        if self.variant == "tensorflow":
            with self.ad.tf.GradientTape() as tape:
                out, _, records = self._trace(blocks=blocks)
                loss = mean(self.y, out)
            outputs = {n: rec["output"] for n, rec in records.items() if rec["output"] is not None}
            grads = dict(zip(outputs, tape.gradient(loss, list(outputs.values()))))
        elif self.variant == "torch":
            import torch

            zeros = {}

            def perturb(name, output):
                zeros[name] = torch.zeros_like(output, requires_grad=True)
                return output + zeros[name]

            out, _, records = self._trace(perturb, blocks=blocks)
            loss = mean(self.y, out)
            grads = dict(zip(zeros, torch.autograd.grad(loss, list(zeros.values()), allow_unused=True)
                             if zeros else ()))
        else:
            import jax

            # Pure in the perturbations: stateless_call on the values every case starts from.
            state = ([v.value for v in self.model.trainable_variables],
                     [v.value for v in self.model.non_trainable_variables])
            _, _, shapes = self._trace(state=state, blocks=blocks)
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
        for b, layer in enumerate(self._blocks()):
            if blocks.get(layer.name) is not None:
                arrays[f"block_output/{b}"] = _numpy(blocks[layer.name])
        return RawResult(float(_numpy(loss)), arrays, {"layers": list(records)})


def open_session(job: WorkerJob) -> KerasModelSession:
    """The worker's entry for tasks "gradients" (a built-in model) and "model_check" (a user's factory, or a
    built-in model): the model built in floatx = the job's dtype on ``job.variant`` (must equal KERAS_BACKEND),
    its weights loaded; may raise DeviceUnavailable."""
    return KerasModelSession(job)
