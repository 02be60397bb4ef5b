"""JAX backend for a user's own Flax NNX module (task 'model_check'; contract in ``protocol``).

Imported only inside a worker process. The factory must return an
``nnx.Module`` (Flax's NNX API; Flax linen modules, which keep their
parameters outside the module, are not supported). Flax's layout is already
the canonical one: ``nnx.Linear`` kernels are (in, out), ``nnx.Conv`` kernels
(*window, in, out), normalization weights are ``scale`` and activations are
channels-last, so nothing is transposed.

The module is used through its functional view: ``nnx.split`` into the
trainable parameters (``nnx.Param``), the statistics (``nnx.BatchStat``) and
the rest (RNG streams, counters: state, not parameters), then every case
merges a fresh copy, so a forward pass that writes state (batch statistics in
training mode, a dropout stream) never changes what the next call sees.

NNX has no forward hooks: layers are observed by wrapping ``__call__`` of
their classes for the length of one eager forward pass. A layer called only
from inside an NNX transform (``nnx.jit``, ``nnx.remat``, ``nnx.scan``, which
call copies of it) or through a method other than ``__call__`` is therefore
not seen as called.

Read at import by jax (set by the parent, see ``BackendInfo``):
``JAX_ENABLE_X64`` (float64 jobs need it), ``JAX_PLATFORMS``.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradparity.backends.jax.session import device_label, may_use_tf32, path_name, state_to_canonical, start
from gradparity.backends.protocol import (PARAM_ROLES, RawResult, WorkerJob, assignment, gelu_accuracy, layer_options,
                                         load_factory, ModelTraining, package_versions, train_result)

_NORMS = tuple(c for c in (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm,
                           getattr(nnx, "InstanceNorm", None)) if c is not None)


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


class UserJaxModel:
    """The user's module, split into its state on the job's device and dtype; answers every model_check case."""

    def __init__(self, job: WorkerJob):
        self.job = job
        # The user's layers carry no precision of ours: the global switch set by start() covers them.
        self.device, self.device_note = start(job)
        self.dtype = jnp.dtype(job.dtype)
        factory = load_factory(job)
        with jax.default_device(self.device):
            model = factory()
        if not isinstance(model, nnx.Module):
            linen = any(c.__module__.startswith("flax.linen") for c in type(model).__mro__)
            raise TypeError(f"the jax factory {job.payload['factory']} returned {type(model).__name__}, not a "
                            "flax.nnx.Module" + (" (Flax linen modules are not supported: port it to nnx)"
                                                 if linen else ""))
        # Like torch's model.to(dtype): Flax layers keep a computation dtype of their own (nnx.Embed pins
        # its parameters' dtype at construction), so a float64 job would still compute them in float32.
        for _, module in nnx.iter_modules(model):
            for attr in ("dtype", "param_dtype"):
                if _is_float_dtype(vars(module).get(attr)):
                    setattr(module, attr, self.dtype)
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
        self.watched = {p: self._layer_name(p) for p in self.modules if p in owning or (p in leaves and p != ())}
        self.layer_names = {self._layer_name(p) for p in owning}

        x = np.asarray(job.batch["x"])
        # int32 indices: without x64 jax would truncate int64 with a warning anyway.
        x = x.astype(self.dtype) if x.dtype.kind == "f" else x.astype(np.int32) if x.dtype.kind in "iu" else x
        self.x = jax.device_put(x, self.device)
        y = np.asarray(job.batch["y"])
        self.y = jax.device_put(y.astype(self.dtype if job.payload["loss"] == "mse" else np.int32), self.device)
        self.assign = assignment(job)
        if self.assign is not None:
            self._load(self.assign)
        self._build()

    def _layer_name(self, path) -> str:
        """A module's reported name: its path joined with '.', the class name for the root (as torch does)."""
        return path_name(path) or type(self.modules[path]).__name__

    def _load(self, assign: dict[str, str]) -> None:
        """Overwrite the state's values with the canonical arrays core mapped onto them."""
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
        leaves = [v.get_value() for _, v in nnx.to_flat_state(self.params)] + [self.x]
        try:  # what the model really computes in: a layer of the user's may cast to a dtype of its own
            leaves += jax.tree.leaves(jax.eval_shape(self._apply, self.params, self.x))
        except Exception:  # noqa: BLE001 - a broken forward pass is each case's error, not the setup's
            pass
        dtypes = sorted({str(a.dtype) for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)})
        dtype = dtypes[0] if len(dtypes) == 1 else "mixed: " + ", ".join(dtypes)
        matmul_precision = jax.config.jax_default_matmul_precision
        return {
            "framework": "jax",
            "versions": package_versions("jax", "jaxlib", "flax", "optax"),
            "device": device_label(self.device),
            "device_kind": "cpu" if self.device.platform == "cpu" else "gpu",
            "device_note": self.device_note,
            "dtype": dtype,
            "precision": {
                "jax_default_matmul_precision": None if matmul_precision is None else str(matmul_precision),
                "requested": self.job.precision,
            },
            "tf32": may_use_tf32(self.device, self.job.dtype, matmul_precision, None),
            "mode": self.job.payload.get("mode", "inference"),
            "layer_options": layer_options(self.job),
            "gelu_accuracy": gelu_accuracy(self.job, lambda x, approx: np.asarray(
                jax.nn.gelu(jax.device_put(x, self.device), approximate=approx))),
        }

    # -- the model and the loss, natively -----------------------------------------------------------

    def _merged(self, params) -> nnx.Module:
        """A fresh module from ``params`` and copies of the other state.

        The copies are new Variables made in the current trace: NNX refuses writes (batch statistics in
        training mode, RNG counters) to Variables made outside it, and nothing written survives the call.
        """
        stats, rest = jax.tree.map(lambda a: a, (self.stats, self.rest))
        return nnx.merge(self.graphdef, params, stats, rest)

    def _apply(self, params, x):
        return self._merged(params)(x)

    def _loss(self, out, y, reduction: str):
        """The configured loss with the user's own reduction: jnp.mean, jnp.sum, or per element ('none')."""
        if self.job.payload["loss"] == "mse":
            losses = optax.squared_error(out, y)  # (out - y)^2, not optax.l2_loss (which halves it)
        else:  # logits (N, ..., C), integer targets (N, ...)
            losses = optax.softmax_cross_entropy_with_integer_labels(out, y)
        return {"mean": jnp.mean, "sum": jnp.sum, "none": lambda a: a}[reduction](losses)

    def _build(self):
        """The jitted gradient functions of the reduction methods (pure functions of the parameters)."""
        def reduced(reduction):
            return lambda params, x, y: self._loss(self._apply(params, x), y, reduction)

        def none_loop(params, x, y):
            # One forward, then one pullback per example with cotangent e_i: JAX's
            # loss[i].backward(retain_graph=True); the vjp residuals are the retained graph.
            def per_example(p):
                losses = self._loss(self._apply(p, x), y, "none")
                return losses.reshape(losses.shape[0], -1).sum(axis=1)

            sums, pullback = jax.vjp(per_example, params)
            n = sums.shape[0]

            def body(i, acc):
                (grads,) = pullback(jax.nn.one_hot(i, n, dtype=sums.dtype))
                return jax.tree.map(jnp.add, acc, grads)

            return jnp.sum(sums), jax.lax.fori_loop(0, n, body, jax.tree.map(jnp.zeros_like, params))

        def one_example(params, x, y, i):
            # x[i:i+1] with a traced i, so one compilation serves every example.
            xi, yi = jax.lax.dynamic_slice_in_dim(x, i, 1), jax.lax.dynamic_slice_in_dim(y, i, 1)
            return jax.value_and_grad(reduced("mean"))(params, xi, yi)

        self._fns = {"mean": jax.jit(jax.value_and_grad(reduced("mean"))),
                     "sum": jax.jit(jax.value_and_grad(reduced("sum"))),
                     "none_loop": jax.jit(none_loop)}
        self._one_example = jax.jit(one_example)

    def _grads(self, grads) -> dict[str, np.ndarray]:
        """Canonical gradients of the mapped trainable parameters, keyed as core keyed their values."""
        flat = state_to_canonical(grads)
        return {key: flat[native] for native, key in self.assign.items() if self.owners[native][3]}

    # -- the cases ----------------------------------------------------------------------------------

    def compute(self, case: str) -> RawResult:
        """Run one case from scratch (every function starts from the unchanged split state)."""
        if case == "describe":
            return self._describe()
        if case == "forward":
            return self._forward()
        if case in self._fns:
            loss, grads = self._fns[case](self.params, self.x, self.y)
            return RawResult(float(loss), self._grads(grads))
        if case == "one_by_one":
            total, acc = 0.0, None
            for i in range(len(self.y)):
                loss, grads = self._one_example(self.params, self.x, self.y, i)
                total += float(loss)
                acc = grads if acc is None else jax.tree.map(jnp.add, acc, grads)
            return RawResult(total, self._grads(acc))
        raise ValueError(f"unknown case {case!r}")

    def _trace(self, params, perturb: dict | None = None):
        """Forward the batch eagerly with every watched module's calls observed; returns (logits, calls, records).

        ``records`` maps each watched layer owning variables to its first call's input and output, in
        the order those calls returned; with ``perturb`` the first output of layer ``name`` comes out
        as ``output + perturb[name]`` (zeros: d loss/d perturbation is d loss/d output).
        """
        model = self._merged(params)
        watched = {id(m): (m, self.watched[p]) for p, m in nnx.iter_modules(model) if p in self.watched}
        calls: list[tuple[str, str]] = []
        records: dict[str, dict] = {}

        def on_return(module, name, args, output):
            calls.append((name, type(module).__name__))
            if name in self.layer_names and name not in records:
                is_array = lambda a: isinstance(a, jax.Array)  # noqa: E731
                records[name] = {"input": args[0] if args and is_array(args[0]) else None,
                                 "output": output if is_array(output) else None}
                if perturb is not None and name in perturb:
                    output = output + perturb[name]
            return output

        with _watch(watched, on_return):
            out = model(self.x)
        return out, calls, records

    def _describe(self) -> RawResult:
        out, calls, records = self._trace(self.params)
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
            params.sort(key=lambda p: PARAM_ROLES.index(p["role"]))  # kernel, ..., bias, other: stable
            layers.append({"name": name, "type": type(module).__name__, "called": name in records,
                           "fused_activation": False,  # Flax activations are separate functions
                           "params": params})
        info = {"layers": layers, "calls": [list(c) for c in calls], "output_shape": list(out.shape)}
        return RawResult(float("nan"), values, info)  # no loss: core checks the targets against the output first

    def _forward(self) -> RawResult:
        out, _, records = self._trace(self.params)
        perturb = {name: jnp.zeros_like(rec["output"]) for name, rec in records.items() if rec["output"] is not None}

        def mean_loss(perturb):
            logits, _, _ = self._trace(self.params, perturb)
            return self._loss(logits, self.y, "mean")

        loss, grad_out = jax.value_and_grad(mean_loss)(perturb)
        arrays = {"logits": np.asarray(out)}
        for k, (name, rec) in enumerate(records.items()):
            if rec["input"] is not None:
                arrays[f"input/{k}"] = np.asarray(rec["input"])
            if rec["output"] is not None:
                arrays[f"output/{k}"] = np.asarray(rec["output"])
                arrays[f"grad_output/{k}"] = np.asarray(grad_out[name])
        return RawResult(float(loss), arrays, {"layers": list(records)})


class JaxModelTraining(ModelTraining):
    """Task "model_train" for a built-in model or a user's: the split module of ``UserJaxModel`` trained with
    optax, as ``train.py`` trains the MLP (one jitted step: ``jax.value_and_grad`` of the reduced loss,
    ``opt.update``, ``optax.apply_updates``).

    Opened on batch 1; every batch on the device once. Each ``compute(case)`` starts from the session's
    (immutable) canonical parameters with a fresh optimizer state and returns the canonical trainable values
    after the recorded steps ("T/KEY") and every step's loss ("loss/T").
    """

    def __init__(self, job: WorkerJob):
        self._steps: dict[str, tuple] = {}
        super().__init__(job, UserJaxModel)

    def convert(self, x, y):
        """(x, y) on the device: float inputs in the job's dtype, ids and class targets int32, mse targets in the
        job's dtype."""
        m = self.model
        x, y = np.asarray(x), np.asarray(y)
        return (jax.device_put(x.astype(m.dtype if x.dtype.kind == "f" else np.int32), m.device),
                jax.device_put(y.astype(m.dtype if self.job.payload["loss"] == "mse" else np.int32), m.device))

    def _compiled(self, case: str, config: dict, lrs: list[float], reduction: str):
        """(jitted opt.init, jitted step) of a run, built on its first call."""
        from gradparity.backends.jax.optimizers import build_transformation, lr_schedule

        if case not in self._steps:
            m = self.model
            opt = build_transformation(config, lr_schedule(lrs, self.job.dtype))

            def loss_fn(params, x, y):
                return m._loss(m._apply(params, x), y, reduction)

            def step(params, opt_state, x, y):
                loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
                updates, opt_state = opt.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            self._steps[case] = (jax.jit(opt.init), jax.jit(step))
        return self._steps[case]

    def compute(self, case: str) -> RawResult:
        from gradparity.backends.jax.optimizers import environment_note

        m = self.model
        batches, config, lrs, reduction, record = self.settings(case)
        init, step = self._compiled(case, config, lrs, reduction)
        params, losses, history = m.params, [], []
        opt_state = init(params)
        for t, (x, y) in enumerate(batches, start=1):
            params, opt_state, loss = step(params, opt_state, x, y)
            if t in record:
                history.append((t, params))
            losses.append(loss)
        arrays = {f"{t}/{key}": np.array(value, copy=True) for t, p in history for key, value in m._grads(p).items()}
        return train_result(self.job, arrays, [float(v) for v in losses], {"optimizer": environment_note(config),
                                              "loop": "jax.jit(step): value_and_grad of jnp.REDUCTION(optax."
                                                      "softmax_cross_entropy_with_integer_labels(model(x), y)); "
                                                      "opt.update; optax.apply_updates"})


def open_session(job: WorkerJob) -> UserJaxModel | JaxModelTraining:
    """Import the user's factory (or build the built-in module), split it onto the job's device and dtype, load
    mapped weights; task "model_train" trains it (``JaxModelTraining``)."""
    return JaxModelTraining(job) if job.task == "model_train" else UserJaxModel(job)
