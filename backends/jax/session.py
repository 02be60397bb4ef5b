"""JAX / Flax: the model session of every model, built-in (the MLP, the CNN, the sequence model: task
"gradients", payload "builtin") or a user's own (task "model_check", payload "factory"): an ``nnx.Module``, or a
Flax linen model (``linen.py``: a ``(module, variables)`` pair, or an object carrying ``.module`` and ``.params``
as Hugging Face's Flax models do).

The module comes from ``protocol.load_factory(job)`` (a user's factory, or ``models.build`` bound to the built-in
model's dict) and is used through its functional view: ``nnx.split`` into the trainable parameters
(``nnx.Param``), the statistics (``nnx.BatchStat``) and the rest (RNG streams, counters: state, not
parameters), then every computation merges a fresh copy, so a forward pass that writes state (batch statistics
in training mode, a dropout stream) never changes what the next call sees. ``apply(params, x) =
nnx.merge(graphdef, params, ...)(x)`` is a pure function of a pytree that jax.grad, jax.vjp and jax.vmap
transform; every gradient function is ``jax.jit``-compiled once per session (the native idiom): the worker's
warm-up call pays the compilation, the timed call does not.

An NNX factory's module is used as above. Flax's layout is already the canonical one: ``nnx.Linear`` kernels are
(in, out), ``nnx.Conv`` kernels (*window, in, out), normalization weights are ``scale`` and activations are
channels-last, so nothing is transposed; names are NNX state paths joined with '.' (``('layers', 0, 'kernel')``
<-> ``layers.0.kernel``), mapped onto the canonical ones by ``protocol.assignment`` (a built-in model's own
identity map, or what core mapped for a user's model) and checked by shape. A Variable reachable under several
paths (tied weights) is one entry of the split state: described once, under the path NNX kept, with the others
as its "aliases"; its gradient is the sum over its uses. A linen model's parameters are its "params" tree (cast
to the job's dtype) and every computation is ``linen.LinenModel.call`` of that tree, the same pure function;
``linen.py`` says how it is called, named and laid out (Hugging Face's ``FlaxConv1D`` kernels are transposed).

A user's model is called as payload "inputs" says (``protocol.call_inputs``): ``model(x)``, or
``model(**{arg: array})`` with every input sliced together along axis 0 by the per-example methods; the loss
reads the tensor payload "output" names in what it returns (``protocol.select_output``: a dict, a Hugging Face
``ModelOutput``, a tuple). Targets holding ``IGNORE_INDEX`` (``job.padded``) are masked as the switch 'padding'
masks them. Without ``job.params`` (weights "own") nothing is loaded: the factory's weights are the ones used.

Cases (``compute``): "describe" and "forward" (a user's model's layers and localization); the reduction methods
``protocol.SESSION_METHODS`` on the batch, and "METHOD@PART" on a part (``protocol.CaseInputs``). optax has no
``reduction`` argument: "mean" is ``jnp.mean`` over every loss term (N, or N*T for a sequence's tokens), "sum"
``jnp.sum``; ``none_loop`` (one forward, one vjp pullback per example) and ``none_vectorized`` (``jax.vmap`` of a
one-example ``value_and_grad``) sum the per-example summed losses; ``one_by_one`` feeds each example alone and
sums their means.

The discrepancy switches, natively: 'unzeroed_gradients' (the per-example loops read a never-zeroed accumulator
after every example), 'class_weights' (optax has no weights: the per-term losses times ``w[y]``, then the mean
over every term), 'padding' (optax has no ignore_index: targets ``IGNORE_INDEX`` masked out, means over the valid
terms; ``one_by_one`` feeds ``job.fed_alone`` only), 'autocast' (Flax's mixed precision: every layer's ``dtype``
the narrow compute dtype, ``param_dtype`` the job's; the loss is taken in the job's dtype), 'dropout' (the
built-in MLP's explicit masks) and batch normalization (the built-in MLP's, training mode: an example alone is
normalized by its own statistics).

NNX has no forward hooks: for "describe" / "forward" layers are observed by wrapping ``__call__`` of their classes
for the length of one eager forward pass. A layer called only from inside an NNX transform (``nnx.jit``,
``nnx.remat``, ``nnx.scan``, which call copies of it) or through a method other than ``__call__`` is therefore not
seen as called. Linen layers are observed with ``flax.linen.intercept_methods`` (``linen.LinenModel.trace``), also
in one eager forward pass; "forward"'s ``grad_output`` is, for both, the gradient of the mean loss with respect to
zeros added to each layer's first output inside the observer.

The environment's "dtype" is the arithmetic the model does: a linen model whose layers carry a ``dtype`` of their
own (Hugging Face's: float32 unless loaded with another) computes in it whatever the job's dtype, and says so as
"model_dtype" (its parameters and gradients are held in the job's dtype all the same).

Imported only inside a worker process. Read at import by jax (set by the parent, see ``BackendInfo``):
``JAX_ENABLE_X64`` (float64 jobs need it), ``JAX_PLATFORMS``, ``XLA_PYTHON_CLIENT_PREALLOCATE=false``.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradparity.backends.jax import linen
from gradparity.backends.jax.device import device_label, linear_precision, may_use_tf32, start
from gradparity.backends.protocol import (IGNORE_INDEX, PARAM_ROLES, SEPARATE_FORWARD, CaseInputs, RawResult,
                                          WorkerJob, assignment, call_inputs, check_switches, first_forward,
                                          gelu_accuracy, layer_options, load_factory, package_versions,
                                          select_output)

_NORMS = tuple(c for c in (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm,
                           getattr(nnx, "InstanceNorm", None)) if c is not None)


def path_name(path) -> str:
    return ".".join(str(key) for key in path)


def state_to_canonical(state) -> dict[str, np.ndarray]:
    """NNX state (params or their gradients) -> {name: numpy array}; blocks until computed."""
    return {path_name(path): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def _is_array(a) -> bool:
    return isinstance(a, jax.Array)


def _call(model, x):
    """A module called on the batch's inputs: one positional array, or keyword arguments (payload "inputs")."""
    return model(**x) if isinstance(x, dict) else model(x)


def _slice(x, i):
    """Example ``i`` (traced) of every input, kept batched: ``x[i:i+1]``."""
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1), x)


def _shared_paths(model: nnx.Module) -> list[list[tuple]]:
    """The paths of every parameter or batch statistic reachable under more than one path (tied weights: one
    Variable set on two modules, or one module set twice), each group in traversal order.

    ``nnx.split`` keeps such a Variable once, under one of its paths; this walk (which, unlike
    ``nnx.iter_graph``, revisits shared nodes, stopping only at cycles) finds the others."""
    from flax.nnx import graph

    seen: dict[int, list[tuple]] = {}

    def walk(node, path, ancestors):
        if isinstance(node, (nnx.Param, nnx.BatchStat)):
            seen.setdefault(id(node), []).append(path)
            return
        if id(node) in ancestors or not graph.is_node(node):
            return
        impl = graph.get_node_impl(node)
        if impl is None:
            return
        for key, child in impl.node_dict(node).items():
            walk(child, path + (key,), ancestors | {id(node)})

    walk(model, (), frozenset())
    return [paths for paths in seen.values() if len(paths) > 1]


def _is_float_dtype(value) -> bool:
    """Whether a layer's ``dtype`` / ``param_dtype`` attribute names a floating dtype (None: not set)."""
    try:
        return value is not None and jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        return False


def _is_plain_matmul(module: nnx.Module, kernel) -> bool:
    """Whether a LinearGeneral / Einsum kernel is a Dense kernel (in, out): 2-D, contracting the input's last axis."""
    if getattr(kernel, "ndim", 0) != 2:
        return False
    if isinstance(module, nnx.LinearGeneral):
        return not getattr(module, "batch_axis", None)
    spec = module.einsum_str.replace(" ", "")  # e.g. "...i,ij->...j" or "bi,ij->bj"
    lhs, _, out = spec.partition("->")
    x, _, w = lhs.partition(",")
    return len(w) == 2 and x[-1:] == w[0] and out == x[:-1] + w[1]


def _role(module: nnx.Module, attr, variable: nnx.Variable) -> str:
    """The canonical role of the variable stored directly at ``module.<attr>`` (``attr`` None: deeper)."""
    if attr == "bias":
        return "bias"
    if attr == "kernel" and (isinstance(module, (nnx.Linear, nnx.Conv)) or (
            isinstance(module, (nnx.LinearGeneral, nnx.Einsum)) and _is_plain_matmul(module, variable))):
        return "kernel"
    if attr == "embedding" and isinstance(module, nnx.Embed):
        return "embedding"
    if attr == "scale" and isinstance(module, _NORMS):
        return "scale"
    if isinstance(variable, nnx.BatchStat) and isinstance(module, nnx.BatchNorm) and attr in ("mean", "var"):
        return attr
    return "other"


@contextlib.contextmanager
def _watch(watched: dict[int, tuple[nnx.Module, str]], on_return):
    """Route every call of a watched module (``id`` -> (module, name)) through ``on_return(module, name, args,
    output)``.

    The wrapper is set on the classes that define the watched modules' ``__call__`` (Python looks
    ``__call__`` up on the type, so an instance attribute would not do) and removed on exit; other
    instances of those classes pass straight through. ``on_return`` runs after the call returns, as
    a torch forward hook does, and its result replaces the output. A module's nested calls of its own
    ``__call__`` (``super().__call__``) count once.
    """
    active: set[int] = set()

    def wrap(original):
        @functools.wraps(original)
        def __call__(self, *args, **kwargs):
            key = id(self)
            if key not in watched or key in active:
                return original(self, *args, **kwargs)
            active.add(key)
            try:
                output = original(self, *args, **kwargs)
            finally:
                active.discard(key)
            return on_return(self, watched[key][1], args, output)
        return __call__

    originals = {}
    for module, _ in watched.values():
        owner = next((c for c in type(module).__mro__ if "__call__" in vars(c)), None)
        if owner is not None and owner not in originals:
            originals[owner] = vars(owner)["__call__"]
    try:
        for owner, original in originals.items():
            owner.__call__ = wrap(original)
        yield
    finally:
        for owner, original in originals.items():
            owner.__call__ = original


class ModelSession:
    """The job's module split into its state on the job's device and dtype; answers every case of tasks
    "gradients" and "model_check" (and is the model ``train.ModelTrainer`` trains)."""

    def __init__(self, job: WorkerJob):
        self.job = job
        self.builtin = "builtin" in job.payload
        self.loss_name = job.payload.get("loss", "cross_entropy")
        check_switches(job)
        self.device, self.device_note = start(job)
        self.dtype = jnp.dtype(job.dtype)
        # The switch 'autocast': the layers compute in this dtype over parameters in the job's.
        self.compute_dtype = jnp.dtype(job.autocast) if job.autocast else None
        # A built-in model's layers carry the pinned precision themselves (as a port that sets it does); a
        # user's layers carry none of ours: the global switch set by start() covers both.
        self.layer_precision = linear_precision(job) if self.builtin else None
        factory = load_factory(job)
        with jax.default_device(self.device):
            model = factory()
        self.output_path = job.payload.get("output")
        self.linen: linen.LinenModel | None = None
        self.blocks, self.block_names = [], []  # an NNX model's blocks (``_open_nnx``); a linen model's: none
        if isinstance(model, nnx.Module):
            self._open_nnx(model)
        elif linen.is_linen(model):
            if self.compute_dtype is not None:
                raise ValueError("the switch 'autocast' sets every layer's dtype: a linen model's layers keep "
                                 "the dtypes they were built with")
            self.linen = linen.LinenModel(model, dtype=self.dtype, device=self.device,
                                          training=job.payload.get("mode") == "training")
            self.params = self.linen.params
        else:
            unbound = any(c.__module__.startswith("flax.linen") for c in type(model).__mro__)
            raise TypeError(
                f"the jax factory {job.payload.get('factory')} returned {type(model).__name__}, not a "
                "flax.nnx.Module, a (linen module, variables) pair or an object carrying .module (linen) and "
                ".params (Hugging Face's Flax models)" + (
                    " (a linen module keeps its variables outside it: return (module, variables))"
                    if unbound else ""))

        named = call_inputs(job)
        self.x, self.y = self.convert(job.batch["x"] if named is None else named, job.targets())
        self._inputs = CaseInputs(job, (self.x, self.y), self.convert)
        self.assign = assignment(job)
        if self.linen is not None and self.assign is not None:
            self.linen.ensure_layer_info(self.x)  # the canonical layout depends on the layers' classes
        if self.assign is not None and job.params:  # no params: the factory's own weights (payload "assign")
            self._load(self.assign)
        weights = job.class_weights
        self.class_weight = None if weights is None else jax.device_put(weights.astype(self.dtype), self.device)
        self.masks = {forward: None if m is None else [jax.device_put(a, self.device) for a in m]
                      for forward in ("batch", "single") for m in [job.dropout_masks(forward)]}
        self._build()

    def _open_nnx(self, model: nnx.Module) -> None:
        """Split an NNX module into its state on the job's device and dtype; index its modules and variables."""
        job = self.job
        self._set_dtypes(model)
        # Mode is a static attribute (deterministic, use_running_average): set before splitting.
        if job.payload.get("mode") == "training":
            model.train()
        else:
            model.eval()

        # Module table (path -> module) and, per module, the variables it owns directly.
        self.modules = dict(nnx.iter_modules(model))
        self.graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

        def to_job(a):  # like torch's model.to(device, dtype): floating state in the job's dtype
            a = jnp.asarray(a, self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
            return jax.device_put(a, self.device)

        self.params, self.stats = jax.tree.map(to_job, (params, stats))
        self.rest = jax.device_put(rest, self.device)
        # native name -> (owner path, attr, Variable, trainable); the Variables are those of self.params / stats.
        self.owners: dict[str, tuple] = {}
        for state, trainable in ((self.params, True), (self.stats, False)):
            for path, var in nnx.to_flat_state(state):
                owner = next(path[:k] for k in range(len(path) - 1, -1, -1) if path[:k] in self.modules)
                attr = path[len(owner)] if len(path) == len(owner) + 1 else None
                self.owners[path_name(path)] = (owner, attr, var, trainable)
        owning = {owner for owner, *_ in self.owners.values()}
        leaves = {p for p in self.modules if not any(len(q) > len(p) and q[:len(p)] == p for q in self.modules)}
        # Recorded calls: as in torch, every leaf module and every module owning variables (the root only
        # when it owns variables itself).
        # Blocks (``ModelLayout.blocks``): modules owning nothing that hold an owning one (a residual block), the
        # root excepted; their first output is recorded too, in this order (the index of "block_output/B").
        self.blocks = [p for p in self.modules if p != () and p not in owning and p not in leaves
                       and any(len(q) > len(p) and q[:len(p)] == p for q in owning)]
        self.watched = {p: self._layer_name(p) for p in self.modules
                        if p in owning or (p in leaves and p != ()) or p in self.blocks}
        self.layer_names = {self._layer_name(p) for p in owning}
        self.block_names = [self._layer_name(p) for p in self.blocks]
        # Tied weights: the name nnx.split kept -> the other paths of the same Variable.
        self.aliases: dict[str, list[str]] = {}
        for paths in _shared_paths(model):
            names = [path_name(p) for p in paths]
            kept = next((n for n in names if n in self.owners), None)
            if kept is not None:
                self.aliases[kept] = [n for n in names if n != kept]

    def _set_dtypes(self, model: nnx.Module) -> None:
        """Like torch's model.to(dtype): Flax layers keep a computation dtype of their own (nnx.Embed pins its
        parameters' dtype at construction), so a float64 job would still compute them in float32. Under
        'autocast' every layer's ``dtype`` (None included: a layer that infers it) is the compute dtype."""
        for _, module in nnx.iter_modules(model):
            attrs = vars(module)
            if "dtype" in attrs and self.compute_dtype is not None and (
                    attrs["dtype"] is None or _is_float_dtype(attrs["dtype"])):
                module.dtype = self.compute_dtype
            elif _is_float_dtype(attrs.get("dtype")):
                module.dtype = self.dtype
            if _is_float_dtype(attrs.get("param_dtype")):
                module.param_dtype = self.dtype
            if self.layer_precision is not None and "precision" in attrs:
                module.precision = self.layer_precision

    def convert(self, x, y) -> tuple:
        """(x, y) on the device: float inputs in the job's dtype, ids int32 (without x64 jax would truncate
        int64 with a warning anyway), class targets int32, mse targets in the job's dtype. ``x`` a dict (named
        inputs, ``protocol.call_inputs``): each of its arrays so."""
        if isinstance(x, dict):
            return {arg: self._convert_input(a) for arg, a in x.items()}, self._convert_targets(y)
        return self._convert_input(x), self._convert_targets(y)

    def _convert_input(self, x):
        x = np.asarray(x)
        x = x.astype(self.dtype) if x.dtype.kind == "f" else x.astype(np.int32) if x.dtype.kind in "iu" else x
        return jax.device_put(x, self.device)

    def _convert_targets(self, y):
        y = np.asarray(y).astype(self.dtype if self.loss_name == "mse" else np.int32)
        return jax.device_put(y, self.device)

    def _layer_name(self, path) -> str:
        """A module's reported name: its path joined with '.', the class name for the root (as torch does)."""
        return path_name(path) or type(self.modules[path]).__name__

    def _load(self, assign: dict[str, str]) -> None:
        """Overwrite the state's values with the canonical arrays core mapped onto them."""
        if self.linen is not None:
            self.linen.load(assign, self.job.params)
            self.params = self.linen.params
            return
        for native, key in assign.items():
            if native not in self.owners:
                raise ValueError(f"{native}: the model has no parameter or batch statistic of that name "
                                 f"(it has: {', '.join(self.owners)})")
            var = self.owners[native][2]
            value = np.asarray(self.job.params[key])
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{native}: mapped value has shape {value.shape}, the module's is {tuple(var.shape)}")
            var.set_value(jax.device_put(value.astype(var.dtype), self.device))

    def environment(self) -> dict:
        model_dtype = None
        if self.linen is not None:
            # A linen layer computes in its own ``dtype`` (Hugging Face's: the one the model was loaded with,
            # float32 by default) whatever its parameters hold: that arithmetic bounds the rounding.
            model_dtype = self.linen.computes_in(self.x)
            dtype = model_dtype or str(self.dtype)
        else:
            leaves = [v.get_value() for _, v in nnx.to_flat_state(self.params)] + jax.tree.leaves(self.x)
            try:  # what the model really computes in: a layer of the user's may cast to a dtype of its own
                leaves += jax.tree.leaves(jax.eval_shape(self._merged_call, self.params, self.x))
            except Exception:  # noqa: BLE001 - a broken forward pass is each case's error, not the setup's
                pass
            dtypes = sorted({str(a.dtype) for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)})
            dtype = dtypes[0] if len(dtypes) == 1 else "mixed: " + ", ".join(dtypes)
        matmul_precision = jax.config.jax_default_matmul_precision
        extra = {} if model_dtype is None else {
            # The job asked for another dtype than the model computes in: its parameters are held (and its
            # gradients returned) in the job's, the arithmetic is the model's.
            "model_dtype": model_dtype}
        return {
            "framework": "jax",
            "versions": package_versions("jax", "jaxlib", "flax", "optax"),
            "device": device_label(self.device),
            "device_kind": "cpu" if self.device.platform == "cpu" else "gpu",
            "device_note": self.device_note,
            # Under autocast the narrow format: the arithmetic that bounds the rounding.
            "dtype": self.job.autocast or dtype,
            "autocast": self.job.autocast,
            "precision": {
                "jax_default_matmul_precision": None if matmul_precision is None else str(matmul_precision),
                "linear_precision": None if self.layer_precision is None else str(self.layer_precision),
                "requested": self.job.precision,
            },
            "tf32": may_use_tf32(self.device, model_dtype or self.job.dtype, matmul_precision, self.layer_precision),
            "mode": self.job.payload.get("mode", "inference"),
            "layer_options": layer_options(self.job),
            "gelu_accuracy": gelu_accuracy(self.job, lambda x, approx: np.asarray(
                jax.nn.gelu(jax.device_put(x, self.device), approximate=approx))),
            **extra,
        }

    # -- the model and the loss, natively -----------------------------------------------------------

    def _merged(self, params) -> nnx.Module:
        """A fresh module from ``params`` and copies of the other state.

        The copies are new Variables made in the current trace: NNX refuses writes (batch statistics in
        training mode, RNG counters) to Variables made outside it, and nothing written survives the call.
        """
        stats, rest = jax.tree.map(lambda a: a, (self.stats, self.rest))
        return nnx.merge(self.graphdef, params, stats, rest)

    def _merged_call(self, params, x, masks=None):
        """The module's raw output (``masks``: the built-in MLP's dropout masks, else None)."""
        if self.linen is not None:
            return self.linen.call(params, x)
        model = self._merged(params)
        return _call(model, x) if masks is None else model(x, masks)

    def _output(self, out):
        """The tensor the loss reads in what the model returned (payload "output"; a tensor is itself)."""
        return select_output(out, self.output_path, _is_array)

    def _cast(self, out):
        """Under 'autocast' the output comes out in the compute dtype; the loss is taken in the job's dtype, as
        mixed-precision training does."""
        return out if self.compute_dtype is None else out.astype(self.dtype)

    def apply(self, params, x, masks=None):
        """The output the loss reads: a pure function of ``params`` (what jax.grad / vjp / vmap transform)."""
        return self._cast(self._output(self._merged_call(params, x, masks)))

    def terms(self, out, y):
        """The loss terms, unreduced: (N,) per class label, (N, T) per token, every output for mse; with
        'padding' the ignored targets' terms 0, with 'class_weights' each term times ``w[y]``."""
        if self.loss_name == "mse":
            return optax.squared_error(out, y)  # (out - y)^2, not optax.l2_loss (which halves it)
        if self.job.padded:
            # optax has no ignore_index: the user's own mask (a padding target would index out of range).
            valid = y != IGNORE_INDEX
            return jnp.where(valid, optax.softmax_cross_entropy_with_integer_labels(out, jnp.where(valid, y, 0)), 0)
        terms = optax.softmax_cross_entropy_with_integer_labels(out, y)  # logits (N, ..., C), targets (N, ...)
        # The switch 'class_weights': optax has no weights; w[y] times the per-term losses.
        return terms if self.class_weight is None else terms * self.class_weight[y]

    def reduce(self, terms, y, reduction: str):
        """The user's own reduction (optax has none): "mean" (over the valid terms with 'padding'), "sum", or
        "examples" (per example, its terms summed: shape (N,))."""
        if reduction == "sum":
            return jnp.sum(terms)
        if reduction == "mean":
            if self.job.padded:  # the mean over valid targets, as a padded token batch is averaged
                return jnp.sum(terms) / jnp.sum(y != IGNORE_INDEX)
            return jnp.mean(terms)
        return terms if terms.ndim == 1 else terms.reshape(terms.shape[0], -1).sum(axis=1)

    def loss(self, params, x, y, reduction: str, masks=None):
        return self.reduce(self.terms(self.apply(params, x, masks), y), y, reduction)

    def _build(self):
        """The jitted gradient functions of the reduction methods (pure functions of the parameters)."""
        def reduced(reduction):
            return lambda params, x, y, masks: self.loss(params, x, y, reduction, masks)

        def per_example_pullback(params, x, y, masks):
            sums, pullback = jax.vjp(lambda p: self.loss(p, x, y, "examples", masks), params)
            return sums, pullback, lambda i: pullback(jax.nn.one_hot(i, sums.shape[0], dtype=sums.dtype))[0]

        def none_loop(params, x, y, masks):
            # One forward, then one pullback per example with cotangent e_i: JAX's
            # loss[i].backward(retain_graph=True); the vjp residuals are the retained graph.
            sums, _, grad_of = per_example_pullback(params, x, y, masks)

            def body(i, acc):
                return jax.tree.map(jnp.add, acc, grad_of(i))

            return jnp.sum(sums), jax.lax.fori_loop(0, sums.shape[0], body, jax.tree.map(jnp.zeros_like, params))

        def none_loop_unzeroed(params, x, y, masks):
            # The switch 'unzeroed_gradients': the accumulator is carried over (never reset) and read
            # after every example, so example i is counted N - i times.
            sums, _, grad_of = per_example_pullback(params, x, y, masks)

            def body(i, state):
                acc, read = state
                acc = jax.tree.map(jnp.add, acc, grad_of(i))
                return acc, jax.tree.map(jnp.add, read, acc)

            zeros = jax.tree.map(jnp.zeros_like, params)
            _, read = jax.lax.fori_loop(0, sums.shape[0], body, (zeros, zeros))
            return jnp.sum(sums), read

        def single_loss(params, xi, yi, mi):
            """Loss of one unbatched example (the function vmap maps over), with its own mask rows."""
            masks = None if mi is None else [m[None] for m in mi]
            return self.loss(params, jax.tree.map(lambda a: a[None], xi), yi[None], "examples", masks)[0]

        def none_vectorized(params, x, y, masks):
            # masks: the single-example rows (a None maps to None: an empty pytree).
            losses, grads = jax.vmap(jax.value_and_grad(single_loss), in_axes=(None, 0, 0, 0))(params, x, y, masks)
            return jnp.sum(losses), jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)

        def one_example_step(params, loss_acc, grads_acc, x, y, masks, i):
            # x[i:i+1] with a traced i, so one compilation serves every example.
            xi = _slice(x, i)
            yi = jax.lax.dynamic_slice_in_dim(y, i, 1)
            mi = None if masks is None else [jax.lax.dynamic_slice_in_dim(m, i, 1) for m in masks]
            loss, grads = jax.value_and_grad(reduced("mean"))(params, xi, yi, mi)
            return loss_acc + loss, jax.tree.map(jnp.add, grads_acc, grads)

        self._fns = {
            "none_loop": jax.jit(none_loop),
            "none_vectorized": jax.jit(none_vectorized),
            "sum": jax.jit(jax.value_and_grad(reduced("sum"))),
            "mean": jax.jit(jax.value_and_grad(reduced("mean"))),
        }
        self._none_loop_unzeroed = jax.jit(none_loop_unzeroed)
        self._one_example_step = jax.jit(one_example_step)
        # Jitted so the zeros land on the params' device, not on jax's default one.
        self._zero_accumulators = jax.jit(
            lambda params: (jnp.zeros((), self.dtype), jax.tree.map(jnp.zeros_like, params)))

    def canonical(self, state) -> dict[str, np.ndarray]:
        """Canonical arrays of the mapped trainable parameters (or their gradients), keyed as core keyed their
        values."""
        if self.linen is not None:
            return {key: self.linen.to_canonical(native, self.linen.value(state, native))
                    for native, key in self.assign.items() if self.linen.trainable(native)}
        flat = state_to_canonical(state)
        return {key: flat[native] for native, key in self.assign.items() if self.owners[native][3]}

    # -- the cases ----------------------------------------------------------------------------------

    def compute(self, case: str) -> RawResult:
        """Run one case from scratch (every function starts from the unchanged split state); returns the native
        loss and gradients as numpy (computed, not pending)."""
        if case == "describe":
            return self._describe()
        if case == "forward":
            return self._forward()
        if self.assign is None:
            raise ValueError(f"case {case!r} needs the weights mapped (payload 'assign')")
        method, x, y = self._inputs(case)
        # Dropout masks exist for the batch only (core refuses dropout together with parts).
        on_batch = x is self.x
        masks = self.masks["single" if method in SEPARATE_FORWARD else "batch"] if on_batch else None
        unzeroed = self.job.unzeroed and method in ("none_loop", "one_by_one")
        if method in self._fns and not unzeroed:
            loss, grads = self._fns[method](self.params, x, y, masks)
        elif method == "none_loop":
            loss, grads = self._none_loop_unzeroed(self.params, x, y, masks)
        elif method == "one_by_one":
            loss, acc = self._zero_accumulators(self.params)
            read = acc
            for i in self.job.fed_alone(case):  # padding is not fed: its mean would be 0/0
                loss, acc = self._one_example_step(self.params, loss, acc, x, y, masks, i)
                if unzeroed:  # the carried-over accumulator is read after every example
                    read = jax.tree.map(jnp.add, read, acc)
            grads = read if unzeroed else acc
        else:
            raise ValueError(f"unknown case {case!r}")
        return RawResult(float(loss), self.canonical(grads))

    def _trace(self, params, perturb: dict | None = None):
        """Forward the batch eagerly with every watched module's calls observed; returns (output, calls, records,
        blocks).

        ``records`` maps each watched layer owning variables to its first call's input and output, in
        the order those calls returned; with ``perturb`` the first output of layer ``name`` comes out
        as ``output + perturb[name]`` (zeros: d loss/d perturbation is d loss/d output). ``blocks`` maps each
        block called (``self.blocks``) to its first call's output (a tuple's first; None when not an array).
        """
        if self.linen is not None:
            return (*self._trace_linen(params, perturb), {})
        model = self._merged(params)
        watched = {id(m): (m, self.watched[p]) for p, m in nnx.iter_modules(model) if p in self.watched}
        calls: list[tuple[str, str]] = []
        records: dict[str, dict] = {}
        blocks: dict[str, object] = {}
        block_names = set(self.block_names)

        def on_return(module, name, args, output):
            if name in block_names:
                if name not in blocks:
                    first = output[0] if isinstance(output, (tuple, list)) and output else output
                    blocks[name] = first if isinstance(first, jax.Array) else None
                return output
            calls.append((name, type(module).__name__))
            if name in self.layer_names and name not in records:
                is_array = lambda a: isinstance(a, jax.Array)  # noqa: E731
                records[name] = {"input": args[0] if args and is_array(args[0]) else None,
                                 "output": output if is_array(output) else None}
                if perturb is not None and name in perturb:
                    output = output + perturb[name]
            return output

        with _watch(watched, on_return):
            out = _call(model, self.x)
        return out, calls, records, blocks

    def _trace_linen(self, params, perturb: dict | None = None):
        """``_trace`` of a linen model (``linen.LinenModel.trace``), with its module paths as layer names and
        "calls" as NNX's: every leaf module's calls and every parameter-owning module's."""
        lm = self.linen
        paths = {lm.layer_name(p): p for p in lm.owner_paths}
        out, calls, records = lm.trace(params, self.x, None if perturb is None else
                                       {paths[name]: v for name, v in perturb.items()})
        called = {p for p, _ in calls}
        inner = {q[:k] for q in called for k in range(len(q))}  # every proper prefix of a called path
        calls = [(lm.layer_name(p), t) for p, t in calls if p in lm.owner_paths or (p != () and p not in inner)]
        return out, calls, {lm.layer_name(p): rec for p, rec in records.items()}

    def _describe(self) -> RawResult:
        out, calls, records, called_blocks = first_forward(self.job, lambda: self._trace(self.params))
        out = self._output(out)
        if self.linen is not None:
            return self._describe_linen(out, calls, records)
        by_layer: dict = {}
        for native, (owner, attr, var, trainable) in self.owners.items():
            by_layer.setdefault(owner, []).append((native, attr, var, trainable))
        named = {self._layer_name(p): p for p in by_layer}
        order = list(records) + [n for n in named if n not in records]
        layers, values = [], {}
        for name in order:
            path = named[name]
            module = self.modules[path]
            params = []
            for native, attr, var, trainable in by_layer[path]:
                values[native] = np.asarray(var.get_value())
                params.append({"name": native, "role": _role(module, attr, var), "shape": list(var.shape),
                               "trainable": trainable})
                if native in self.aliases:
                    params[-1]["aliases"] = self.aliases[native]
            params.sort(key=lambda p: PARAM_ROLES.index(p["role"]))  # kernel, ..., bias, other: stable
            layers.append({"name": name, "type": type(module).__name__, "called": name in records,
                           "fused_activation": False,  # Flax activations are separate functions
                           "params": params})
        blocks = []
        for path, name in zip(self.blocks, self.block_names):
            inside = [k for k, n in enumerate(order) if len(named[n]) > len(path) and named[n][:len(path)] == path]
            blocks.append({"name": name, "type": type(self.modules[path]).__name__, "called": name in called_blocks,
                           "layers": inside,
                           "members": list(dict.fromkeys(n for n, _ in calls if n.startswith(name + ".")))})
        info = {"layers": layers, "calls": [list(c) for c in calls], "output_shape": list(out.shape),
                "blocks": blocks}
        return RawResult(float("nan"), values, info)  # no loss: core checks the targets against the output first

    def _describe_linen(self, out, calls, records) -> RawResult:
        """"describe" of a linen model: its variables' owners in call order, values in canonical layout."""
        lm = self.linen
        by_owner: dict[tuple, list[str]] = {}
        for native, (_, _, owner) in lm.entries.items():
            by_owner.setdefault(owner, []).append(native)
        named = {lm.layer_name(p): p for p in by_owner}
        order = [n for n in records if n in named] + [n for n in named if n not in records]
        layers, values = [], {}
        for name in order:
            path = named[name]
            params = []
            for native in by_owner[path]:
                value = lm.to_canonical(native, lm.value(self.params, native))
                values[native] = value
                params.append({"name": native, "role": lm.role(native), "shape": list(value.shape),
                               "trainable": lm.trainable(native)})
            params.sort(key=lambda p: PARAM_ROLES.index(p["role"]))  # kernel, ..., bias, other: stable
            layers.append({"name": name, "type": lm.layer_type(path), "called": name in records,
                           "fused_activation": False, "params": params})
        info = {"layers": layers, "calls": [list(c) for c in calls], "output_shape": list(out.shape)}
        return RawResult(float("nan"), values, info)

    def _forward(self) -> RawResult:
        out, _, records, blocks = self._trace(self.params)
        out = self._output(out)
        perturb = {name: jnp.zeros_like(rec["output"]) for name, rec in records.items() if rec["output"] is not None}

        def mean_loss(perturb):
            logits, *_ = self._trace(self.params, perturb)
            return self.reduce(self.terms(self._cast(self._output(logits)), self.y), self.y, "mean")

        loss, grad_out = jax.value_and_grad(mean_loss)(perturb)
        arrays = {"logits": np.asarray(out)}
        for k, (name, rec) in enumerate(records.items()):
            if rec["input"] is not None:
                arrays[f"input/{k}"] = np.asarray(rec["input"])
            if rec["output"] is not None:
                arrays[f"output/{k}"] = np.asarray(rec["output"])
                arrays[f"grad_output/{k}"] = np.asarray(grad_out[name])
        for b, name in enumerate(self.block_names):
            if blocks.get(name) is not None:
                arrays[f"block_output/{b}"] = np.asarray(blocks[name])
        return RawResult(float(loss), arrays, {"layers": list(records)})


def open_session(job: WorkerJob) -> ModelSession:
    """Tasks "gradients" and "model_check": pick the device, pin precision, build the module (a user's factory or
    the built-in model), split it onto the job's device and dtype and load the mapped canonical weights."""
    return ModelSession(job)
