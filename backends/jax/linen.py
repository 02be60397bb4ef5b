"""A user's Flax linen model in the JAX model session (``session.py``): the module, its variables outside it, and
how the user calls it.

A factory may return (besides an ``nnx.Module``, which ``session.py`` runs itself):

- ``(module, variables)``: a ``flax.linen.Module`` and its variables (``module.init``'s dict: ``{"params": ...,
  "batch_stats": ...}``; a dict without a "params" collection is taken as the params themselves), called as
  ``module.apply(variables, x)`` / ``module.apply(variables, **inputs)``;
- a bound linen module (``module.bind(variables)``), unbound into that pair;
- an object carrying ``.module`` (linen) and ``.params``, as Hugging Face's Flax models do
  (``FlaxGPT2LMHeadModel``), or the pair ``(object, params)``: called through its own ``__call__``,
  ``model(**inputs, params=params, train=False)``, as its users run it (its ``__call__`` adds what the module
  needs, such as GPT-2's ``position_ids``). An object whose ``__call__`` takes no ``params`` goes through
  ``module.apply({"params": params}, ...)``.

Mode: "training" passes ``train=True`` / ``deterministic=False`` / ``training=True`` / ``use_running_average=False``
to a ``__call__`` that takes such an argument, a fixed dropout key (``rngs={"dropout": PRNGKey(0)}``, Hugging
Face's ``dropout_rng``) and makes the non-parameter collections mutable (their updates are dropped: every call
starts from the same state); "inference" the opposite flags and nothing mutable.

Parameters are the leaves of the "params" collection, named by their tree path joined with '.'
(``transformer.h.0.attn.c_attn.kernel``), cast to the job's dtype; the other collections' floating leaves
(``batch_stats``) are state (trainable False) under their own paths (prefixed by the collection's name only where
a name would repeat); non-floating leaves are not described. A parameter's layer is the module path owning it.
The model computes in what its modules say: a linen layer with an explicit ``dtype`` (Hugging Face's modules
carry the ``dtype`` the model was loaded with, float32 by default) casts float64 parameters down, and
``computes_in`` says so (the session reports it as the environment's "model_dtype").

Layers are observed with ``flax.linen.intercept_methods``: every submodule's ``__call__`` in order, its first
array input and its output; a call of a module applied inside another's ``__call__`` (Hugging Face's tied
``lm_head.apply``) is named under the caller's path plus its own name. Canonical layout: ``nn.Dense`` kernels
(in, out), ``nn.Conv`` (*window, in, out) and ``nn.DenseGeneral`` plain 2-D kernels as they are; Hugging Face's
``FlaxConv1D`` stores its kernel (out, in): canonical transposes it; ``nn.Embed.embedding`` role "embedding";
norms' ``scale`` "scale"; ``nn.BatchNorm``'s batch statistics "mean" / "var". A layer never called has type
"unknown" and roles "bias" / "other" only (its class is not known without a call).
"""
from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict

_NORMS = tuple(c for c in (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm, nn.GroupNorm, getattr(nn, "InstanceNorm", None))
               if c is not None)
#: Arguments of a ``__call__`` that switch between training and inference: name -> its value in training mode.
_MODE_ARGS = {"train": True, "training": True, "deterministic": False, "use_running_average": False}
#: Hugging Face's Conv1D: a Dense layer whose kernel is stored (out, in).
_TRANSPOSED_KERNEL = ("FlaxConv1D",)


def is_linen(model) -> bool:
    """Whether a factory's result is one of the linen forms this module runs."""
    return _unpack(model) is not None


def _is_module(obj) -> bool:
    return isinstance(obj, nn.Module)


def _unpack(model):
    """(kind, module, variables, caller) of a factory's result, or None when it is no linen form: kind "apply"
    (a module and its variables) or "object" (an object with ``.module``, called through ``caller``)."""
    if isinstance(model, (tuple, list)) and len(model) == 2:
        first, variables = model
        if _is_module(first) and hasattr(variables, "keys"):
            return "apply", first, unfreeze(variables), None
        if _is_module(getattr(first, "module", None)):
            return "object", first.module, {"params": unfreeze(variables)}, first
        return None
    if _is_module(model):
        if model.scope is None:
            return None  # unbound: its variables are elsewhere (session.py says what to return)
        module, variables = model.unbind()
        return "apply", module, unfreeze(variables), None
    if _is_module(getattr(model, "module", None)):
        try:
            params = model.params
        except Exception:  # noqa: BLE001 - Hugging Face's _do_init=False raises ValueError: no params held
            return None
        return "object", model.module, {"params": unfreeze(params)}, model
    return None


def _path_name(path) -> str:
    return ".".join(str(k) for k in path)


def _is_array(a) -> bool:
    return isinstance(a, jax.Array)


def _floating(a) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


class LinenModel:
    """A linen model's state (``params``: the trainable tree in the job's dtype on the device; ``state``: the
    other collections) and its calls: ``call`` (pure, what jax transforms) and ``trace`` (with the layers
    observed)."""

    def __init__(self, model, *, dtype, device, training: bool):
        unpacked = _unpack(model)
        if unpacked is None:
            raise TypeError(f"not a linen model: {type(model).__name__}")
        self.kind, self.module, variables, self.caller = unpacked
        if "params" not in variables:  # a bare params tree
            variables = {"params": variables}
        self.training = training
        self.dtype = dtype
        self.device = device

        def to_job(a):  # like torch's model.to(device, dtype): floating leaves in the job's dtype
            a = jnp.asarray(a)
            a = a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype else a
            return jax.device_put(a, device)

        self.params = jax.tree.map(to_job, variables["params"])
        # Non-parameter collections: kept whole (the module reads them), floating ones in the job's dtype.
        self.state = {c: jax.tree.map(to_job, v) for c, v in variables.items() if c != "params"}

        # native name -> (collection, key path in it, owner module path); only floating leaves are described.
        self.entries: dict[str, tuple] = {}
        flat = {("params", k): v for k, v in flatten_dict(self.params).items()}
        for c, tree in self.state.items():
            flat.update({(c, k): v for k, v in flatten_dict(tree).items() if _floating(v)})
        param_names = {_path_name(k) for (c, k) in flat if c == "params"}
        for (c, k), _ in flat.items():
            name = _path_name(k)
            if c != "params" and (name in param_names or name in self.entries):
                name = f"{c}.{name}"  # the same path in two collections: the collection tells them apart
            self.entries[name] = (c, k, tuple(k[:-1]))
        self.owner_paths = {owner for _, _, owner in self.entries.values()}
        self.root_type = type(self.module).__name__
        self._signature = self._call_signature()
        self.layer_info: dict[tuple, dict] | None = None  # module path -> {"type", "cls", ...}: from a trace

    # -- calling the model --------------------------------------------------------------------------

    def _call_signature(self) -> set[str]:
        target = self.caller.__call__ if self.caller is not None else self.module.__call__
        try:
            return set(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            return set()

    def call(self, params, x):
        """The model's raw output on ``x`` (an array: one positional argument; a dict: keyword arguments)."""
        args, kwargs = ((), dict(x)) if isinstance(x, dict) else ((x,), {})
        if self.caller is not None and "params" in self._signature:
            # Hugging Face's __call__: what its users run (it adds position_ids, the attention mask's dtype).
            if "train" in self._signature:
                kwargs["train"] = self.training
            if self.training and "dropout_rng" in self._signature:
                kwargs["dropout_rng"] = jax.random.PRNGKey(0)
            return self.caller(*args, params=params, **kwargs)
        for name, train_value in _MODE_ARGS.items():
            if name in self._signature and name not in kwargs:
                kwargs[name] = train_value if self.training else not train_value
        variables = {"params": params, **self.state}
        if not self.training:
            return self.module.apply(variables, *args, **kwargs)
        out, _ = self.module.apply(variables, *args, rngs={"dropout": jax.random.PRNGKey(0)},
                                   mutable=list(self.state), **kwargs)
        return out

    def trace(self, params, x, perturb: dict | None = None):
        """``call`` with every submodule's ``__call__`` observed: (output, calls, records). ``calls``: (path, type)
        of every call as it returns; ``records``: per parameter-owning module path, its first call's first array
        input and its output, in the order those calls returned; with ``perturb`` that output comes out as
        ``output + perturb[path]`` (zeros: d loss / d perturbation is d loss / d output). Fills ``layer_info``."""
        calls: list[tuple[tuple, str]] = []
        records: dict[tuple, dict] = {}
        info: dict[tuple, dict] = {}
        stack: list[tuple] = []
        roots: dict[int, tuple] = {}  # id(root scope) -> (root scope, base path): the root is kept alive

        def full_path(module) -> tuple:
            scope = module.scope
            root = scope.root if scope is not None else None
            entry = roots.get(id(root))
            if entry is None or entry[0] is not root:
                # A new apply: the outermost one is the model (path ()); one inside a call (``lm_head.apply``)
                # is named after its caller plus its own name.
                base = () if not stack else stack[-1] + (
                    (module.name or type(module).__name__,) if tuple(module.path) == () else ())
                entry = roots[id(root)] = (root, base)
            return entry[1] + tuple(module.path)

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            module = context.module
            path = full_path(module)
            if path in stack:  # a module's nested call of its own __call__ counts once
                return next_fun(*args, **kwargs)
            stack.append(path)
            try:
                output = next_fun(*args, **kwargs)
            finally:
                stack.pop()
            if path not in info:
                info[path] = _layer_info(module)
            calls.append((path, type(module).__name__))
            if path in self.owner_paths and path not in records:
                records[path] = {"input": args[0] if args and _is_array(args[0]) else None,
                                 "output": output if _is_array(output) else None}
                if perturb is not None and path in perturb:
                    output = output + perturb[path]
            return output

        with nn.intercept_methods(interceptor):
            out = self.call(params, x)
        if self.layer_info is None:
            self.layer_info = info
        return out, calls, records

    def ensure_layer_info(self, x) -> None:
        """The owning modules' classes (what the roles and the canonical layout depend on), from an abstract
        trace (``jax.eval_shape``: nothing computed) when no trace has run yet."""
        if self.layer_info is None:
            jax.eval_shape(lambda p: self.trace(p, x)[0], self.params)

    def layer_name(self, path: tuple) -> str:
        """A module's reported name: its path joined with '.', the class name for the root (as torch does)."""
        return _path_name(path) or self.root_type

    def layer_type(self, path: tuple) -> str:
        if path == ():
            return self.root_type
        return (self.layer_info or {}).get(path, {}).get("type", "unknown")

    # -- names, roles, canonical layout -------------------------------------------------------------

    def value(self, tree_params, name: str):
        """The native array of ``name`` in a params tree (or in the state, for a non-parameter)."""
        collection, key, _ = self.entries[name]
        node = tree_params if collection == "params" else self.state[collection]
        for k in key:
            node = node[k]
        return node

    def trainable(self, name: str) -> bool:
        return self.entries[name][0] == "params"

    def role(self, name: str) -> str:
        collection, key, owner = self.entries[name]
        attr = key[-1]
        info = (self.layer_info or {}).get(owner)
        cls = info["cls"] if info else None
        if collection != "params":
            batch_stat = collection == "batch_stats" and attr in ("mean", "var")
            return attr if batch_stat and cls is not None and issubclass(cls, nn.BatchNorm) else "other"
        if attr == "bias":
            return "bias"
        if cls is None:
            return "other"
        if attr == "kernel" and (issubclass(cls, (nn.Dense, nn.Conv)) or cls.__name__ in _TRANSPOSED_KERNEL
                                 or (issubclass(cls, nn.DenseGeneral) and info.get("plain"))):
            return "kernel" if np.ndim(self.value(self.params, name)) >= 2 else "other"
        if attr == "embedding" and issubclass(cls, nn.Embed):
            return "embedding"
        if attr == "scale" and issubclass(cls, _NORMS):
            return "scale"
        return "other"

    def transposed(self, name: str) -> bool:
        """Whether the canonical layout is the native array transposed (``FlaxConv1D``'s (out, in) kernel)."""
        collection, key, owner = self.entries[name]
        info = (self.layer_info or {}).get(owner)
        return (collection == "params" and key[-1] == "kernel" and info is not None
                and info["cls"].__name__ in _TRANSPOSED_KERNEL and np.ndim(self.value(self.params, name)) == 2)

    def to_canonical(self, name: str, array) -> np.ndarray:
        a = np.asarray(array)
        return a.T if self.transposed(name) else a

    def canonical_tree(self, tree) -> dict[str, np.ndarray]:
        """A params-shaped tree (the parameters, or their gradients) -> {name: canonical numpy array}."""
        return {name: self.to_canonical(name, self.value(tree, name)) for name in self.entries if self.trainable(name)}

    def load(self, assign: dict[str, str], values: dict) -> None:
        """Overwrite the parameters and state with the canonical arrays core mapped onto them."""
        params, state = unfreeze(self.params), unfreeze(self.state)
        for native, key in assign.items():
            if native not in self.entries:
                raise ValueError(f"{native}: the model has no parameter or state variable of that name "
                                 f"(it has: {', '.join(self.entries)})")
            collection, path, _ = self.entries[native]
            current = self.value(self.params, native)
            value = np.asarray(values[key])
            value = value.T if self.transposed(native) else value
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"{native}: mapped value has shape {value.shape}, the module's is "
                                 f"{tuple(current.shape)}")
            node = params if collection == "params" else state[collection]
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = jax.device_put(value.astype(current.dtype), self.device)
        self.params, self.state = params, state

    def computes_in(self, x) -> str | None:
        """The floating dtype the model computes in when it is not the job's: the root module's own ``dtype``
        attribute (Hugging Face's), else its output's; None when it is the job's."""
        own = getattr(self.module, "dtype", None)
        try:
            dtype = jnp.dtype(own) if own is not None and jnp.issubdtype(jnp.dtype(own), jnp.floating) else None
        except TypeError:
            dtype = None
        if dtype is None:
            try:
                leaves = [a for a in jax.tree.leaves(jax.eval_shape(self.call, self.params, x)) if _floating(a)]
            except Exception:  # noqa: BLE001 - a broken forward pass is each case's error, not the setup's
                leaves = []
            dtype = min((jnp.dtype(a.dtype) for a in leaves), key=lambda d: d.itemsize, default=None)
        return None if dtype is None or dtype == self.dtype else str(dtype)


def _layer_info(module) -> dict:
    info = {"type": type(module).__name__, "cls": type(module)}
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
        features = module.features if isinstance(module.features, (tuple, list)) else (module.features,)
        info["plain"] = tuple(axis) == (-1,) and not tuple(module.batch_dims) and len(features) == 1
    return info
