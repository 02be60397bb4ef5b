"""JAX backend: a Flax NNX MLP, optax cross-entropy, gradients by jax.grad / vjp / vmap.

The model is an ``nnx.Module`` used through its functional view:
``graphdef, params = nnx.split(model)`` once, then a pure
``apply(params, x) = nnx.merge(graphdef, params)(x)`` that jax.grad,
jax.vjp and jax.vmap transform like any function of a pytree. Every
gradient function is ``jax.jit``-compiled (the native idiom); the worker's
warm-up call pays the compilation, the timed call does not.

Parameter names are mapped through NNX state paths, ``('layers', i,
'kernel')`` <-> ``layers.{i}.kernel``, in both directions and checked for
an exact match, so nothing depends on dict or pytree ordering. Flax
kernels are ``(in, out)`` like the canonical layout: no transposes.

Read at import by jax (set by the parent, see ``BackendInfo``):
``JAX_ENABLE_X64`` (float64 jobs need it), ``JAX_PLATFORMS``,
``XLA_PYTHON_CLIENT_PREALLOCATE=false``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradparity.backends.protocol import (IGNORE_INDEX, SEPARATE_FORWARD, CaseInputs, DeviceUnavailable, RawResult,
                                          WorkerJob, jax_precision_is_full_f32, package_versions)

_ACTIVATIONS = {
    "relu": jax.nn.relu,  # derivative 0 at z == 0, like the reference's (z > 0)
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda z: z,
}

class MLP(nnx.Module):
    """Dense layers ``sizes[0] -> ... -> sizes[-1]``; ``activation`` after all but the last (logits).

    With ``eps`` an ``nnx.BatchNorm`` in training mode (batch statistics, Flax's default
    ``use_fast_variance``: var = E[x^2] - E[x]^2) sits before every hidden activation;
    ``__call__(x, masks)`` multiplies hidden activation i by ``masks[i]`` (the switch 'dropout',
    core's masks: jax's generator could not be compared with other frameworks').
    """

    def __init__(self, sizes, activation, dtype, precision, rngs, compute_dtype=None, eps=None):
        # nnx.List (not nnx.Sequential, which would interleave the activations)
        # so layer i lives at state path ('layers', i, ...), the canonical name.
        # compute_dtype (the switch 'autocast'): Flax's mixed precision, parameters stay in dtype.
        self.layers = nnx.List([
            nnx.Linear(a, b, dtype=compute_dtype or dtype, param_dtype=dtype, precision=precision, rngs=rngs)
            for a, b in zip(sizes[:-1], sizes[1:])
        ])
        self.norms = None if eps is None else nnx.List([
            nnx.BatchNorm(width, use_running_average=False, epsilon=eps, dtype=compute_dtype or dtype,
                          param_dtype=dtype, rngs=rngs)
            for width in sizes[1:-1]
        ])
        self.activation = _ACTIVATIONS[activation]

    def __call__(self, x, masks=None):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = self.activation(x)
                if masks is not None:
                    x = x * masks[i]
        return x


def path_name(path) -> str:
    return ".".join(str(key) for key in path)


def state_to_canonical(state) -> dict[str, np.ndarray]:
    """NNX state (params or their gradients) -> canonical {name: numpy array}; blocks until computed."""
    return {path_name(path): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def _pick_device(requested: str):
    """Return (device, note) for 'cpu' | 'gpu' | 'auto' (see the contract's device rules)."""
    if requested == "cpu":
        return jax.devices("cpu")[0], None
    try:
        # RuntimeError when jax has no GPU platform (CPU-only jaxlib, no visible
        # card, or a CUDA plugin that failed to initialize).
        return jax.devices("gpu")[0], None
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if requested == "gpu":
            raise DeviceUnavailable(f"device 'gpu' was requested but jax sees no GPU ({reason})") from None
        if requested == "auto":
            return jax.devices("cpu")[0], "no GPU visible to jax; ran on the CPU"
        raise ValueError(f"unknown device {requested!r}") from None


def start(job: WorkerJob):
    """Check x64 for a float64 job, pick the device, pin precision; returns (device, note on a fallback).

    Shared by every JAX session (the built-in MLP's and a user's model's).
    """
    if job.dtype == "float64" and not jax.config.jax_enable_x64:
        # Without x64 jax silently computes float64 inputs in float32.
        raise RuntimeError("a float64 job needs JAX_ENABLE_X64=1 in the worker's environment "
                           "(jax reads it at import); it is not set")
    device, note = _pick_device(job.device)
    if job.precision == "highest":
        # The global switch: every matmul and convolution jax traces from now on runs in full float32.
        jax.config.update("jax_default_matmul_precision", "highest")
    return device, note


def device_label(device) -> str:
    if device.platform == "cpu":
        return "cpu"
    vendor = "rocm" if "rocm" in str(getattr(device.client, "platform_version", "")).lower() else "cuda"
    return f"{vendor}:{device.id} ({device.device_kind})"


def may_use_tf32(device, dtype: str, matmul_precision, layer_precision) -> bool:
    """True when float32 matmuls in this run could have run in TF32.

    JAX's GPU default precision lets XLA use TF32 on compute capability >= 8.0;
    only a full-float32 setting (global or per layer) rules it out.
    """
    if device.platform != "gpu" or dtype != "float32":
        return False
    if layer_precision == jax.lax.Precision.HIGHEST:
        return False
    if jax_precision_is_full_f32(matmul_precision):
        return False
    capability = getattr(device, "compute_capability", None)  # e.g. "9.0" on CUDA
    if capability is None:
        return True  # unknown hardware: cannot rule TF32 out
    return tuple(int(p) for p in str(capability).split(".")[:2]) >= (8, 0)


def linear_precision(job: WorkerJob):
    """The Dense layers' own precision: HIGHEST when the job pins precision (``start`` sets the global
    switch), else None (jax's default)."""
    return jax.lax.Precision.HIGHEST if job.precision == "highest" else None


def build_mlp(job: WorkerJob, device, layer_precision):
    """(graphdef, params, stats) of the job's MLP: its parameters (an ``nnx.State`` of ``nnx.Param``) filled
    from the canonical ``job.params`` in the job's dtype on ``device``, and zero running statistics."""
    dtype = jnp.dtype(job.dtype)
    # eval_shape: build the module without running the random initializers,
    # then fill every parameter from the canonical arrays by its path.
    compute_dtype = jnp.dtype(job.autocast) if job.autocast else None
    abstract = nnx.eval_shape(lambda: MLP(job.model["sizes"], job.model["activation"], dtype,
                                          layer_precision, nnx.Rngs(0), compute_dtype,
                                          job.batchnorm_epsilon))
    # The running statistics (nnx.BatchStat) are state, not parameters: training mode never reads them.
    graphdef, abstract_state, stats = nnx.split(abstract, nnx.Param, ...)
    stats = jax.device_put(jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), stats), device)
    flat = nnx.to_flat_state(abstract_state)
    names = [path_name(path) for path, _ in flat]
    if sorted(names) != sorted(job.params):
        raise ValueError(f"model parameters {sorted(names)} do not match the job's {sorted(job.params)}")
    filled = []
    for path, var in flat:
        value = np.asarray(job.params[path_name(path)])
        if value.shape != var.shape:
            raise ValueError(f"{path_name(path)}: canonical shape {value.shape}, Flax expects {var.shape}")
        filled.append((path, var.replace(jax.device_put(value.astype(dtype), device))))
    return graphdef, nnx.from_flat_state(filled), stats


def mlp_environment(job: WorkerJob, params, input_dtype, device, device_note, layer_precision) -> dict:
    """The environment of a job computed by the built-in MLP's ``params`` on ``device`` (``Session.environment``)."""
    leaves = [var.get_value() for _, var in nnx.to_flat_state(params)]
    dtypes = sorted({str(leaf.dtype) for leaf in leaves} | {str(input_dtype)})
    dtype = dtypes[0] if len(dtypes) == 1 else "mixed: " + ", ".join(dtypes)
    matmul_precision = jax.config.jax_default_matmul_precision
    return {
        "framework": "jax",
        "versions": package_versions("jax", "jaxlib", "flax", "optax"),
        "device": device_label(device),
        "device_kind": "cpu" if device.platform == "cpu" else "gpu",
        "device_note": device_note,
        "dtype": job.autocast or dtype,
        "autocast": job.autocast,
        "precision": {
            "jax_default_matmul_precision": None if matmul_precision is None else str(matmul_precision),
            "linear_precision": None if layer_precision is None else str(layer_precision),
            "requested": job.precision,
        },
        "tf32": may_use_tf32(device, dtype, matmul_precision, layer_precision),
    }


class JaxSession:
    """Parameters and batch live on the chosen device; each method is a jitted pure function."""

    def __init__(self, job: WorkerJob):
        if job.loss["name"] != "cross_entropy":
            raise ValueError(f"jax backend has no loss {job.loss['name']!r}")
        if job.model.get("kind", "mlp") != "mlp":
            raise ValueError(f"jax backend has no model kind {job.model['kind']!r}")
        self.job = job
        self.device, self.device_note = start(job)
        self.layer_precision = linear_precision(job)
        dtype = jnp.dtype(job.dtype)
        self.graphdef, self.params, self.stats = build_mlp(job, self.device, self.layer_precision)
        self.x = jax.device_put(np.asarray(job.batch["x"], dtype=dtype), self.device)
        # int32 labels: without x64 jax would truncate int64 with a warning anyway.
        self.y = jax.device_put(np.asarray(job.targets()).astype(np.int32), self.device)
        self._inputs = CaseInputs(job, (self.x, self.y), lambda x, y: (
            jax.device_put(np.asarray(x, dtype=dtype), self.device),
            jax.device_put(np.asarray(y).astype(np.int32), self.device)))
        self.masks = {forward: None if m is None else [jax.device_put(a, self.device) for a in m]
                      for forward in ("batch", "single") for m in [job.dropout_masks(forward)]}
        self._build()

    def _build(self):
        graphdef, stats, padded = self.graphdef, self.stats, self.job.padded
        weights = self.job.class_weights
        class_weight = None if weights is None else jax.device_put(weights.astype(self.x.dtype), self.device)

        def losses_fn(params, x, y, masks):
            """Per-example losses, shape (N,): optax returns them unreduced."""
            # Under 'autocast' the logits come out in the compute dtype; the loss is taken in the input
            # dtype, as mixed-precision training does.
            # Fresh running statistics in this trace: training mode writes them, and NNX refuses writes
            # to state made outside the transformation (they are never read back).
            logits = nnx.merge(graphdef, params, jax.tree.map(jnp.zeros_like, stats))(x, masks).astype(x.dtype)
            if padded:
                # optax has no ignore_index: the user's own mask (a padding target would index out of range).
                valid = y != IGNORE_INDEX
                losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, y, 0))
                return jnp.where(valid, losses, 0)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            # The switch 'class_weights': optax has no weights; w[y] times the per-example losses.
            return losses if class_weight is None else losses * class_weight[y]

        # optax has no `reduction` argument: the reduction is the user's own jnp.sum / jnp.mean.
        def sum_loss(params, x, y, masks):
            return jnp.sum(losses_fn(params, x, y, masks))

        def mean_loss(params, x, y, masks):
            if padded:  # the mean over valid targets, as a padded token batch is averaged
                return jnp.sum(losses_fn(params, x, y, masks)) / jnp.sum(y != IGNORE_INDEX)
            return jnp.mean(losses_fn(params, x, y, masks))

        def single_loss(params, xi, yi, mi):
            """Loss of one unbatched example (the function vmap maps over), with its own mask rows."""
            return losses_fn(params, xi[None], yi[None], None if mi is None else [m[None] for m in mi])[0]

        def none_loop(params, x, y, masks):
            # One forward, then one pullback per example with cotangent e_i:
            # JAX's loss[i].backward(retain_graph=True); the vjp residuals are the retained graph.
            losses, pullback = jax.vjp(lambda p: losses_fn(p, x, y, masks), params)
            n = losses.shape[0]

            def body(i, acc):
                (grads,) = pullback(jax.nn.one_hot(i, n, dtype=losses.dtype))
                return jax.tree.map(jnp.add, acc, grads)

            total = jax.lax.fori_loop(0, n, body, jax.tree.map(jnp.zeros_like, params))
            return jnp.sum(losses), total

        def none_loop_unzeroed(params, x, y, masks):
            # The switch 'unzeroed_gradients': the accumulator is carried over (never reset) and read
            # after every example, so example i is counted N - i times.
            losses, pullback = jax.vjp(lambda p: losses_fn(p, x, y, masks), params)
            n = losses.shape[0]

            def body(i, state):
                acc, read = state
                (grads,) = pullback(jax.nn.one_hot(i, n, dtype=losses.dtype))
                acc = jax.tree.map(jnp.add, acc, grads)
                return acc, jax.tree.map(jnp.add, read, acc)

            zeros = jax.tree.map(jnp.zeros_like, params)
            _, read = jax.lax.fori_loop(0, n, body, (zeros, zeros))
            return jnp.sum(losses), read

        def none_vectorized(params, x, y, masks):
            # masks: the single-example rows (a None maps to None: an empty pytree).
            losses, grads = jax.vmap(jax.value_and_grad(single_loss), in_axes=(None, 0, 0, 0))(params, x, y, masks)
            return jnp.sum(losses), jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)

        def one_example_step(params, loss_acc, grads_acc, x, y, masks, i):
            # x[i:i+1] with a traced i, so one compilation serves every example.
            xi = jax.lax.dynamic_slice_in_dim(x, i, 1)
            yi = jax.lax.dynamic_slice_in_dim(y, i, 1)
            mi = None if masks is None else [jax.lax.dynamic_slice_in_dim(m, i, 1) for m in masks]
            loss, grads = jax.value_and_grad(mean_loss)(params, xi, yi, mi)
            return loss_acc + loss, jax.tree.map(jnp.add, grads_acc, grads)

        self._fns = {
            "none_loop": jax.jit(none_loop),
            "none_vectorized": jax.jit(none_vectorized),
            "sum": jax.jit(jax.value_and_grad(sum_loss)),
            "mean": jax.jit(jax.value_and_grad(mean_loss)),
        }
        self._none_loop_unzeroed = jax.jit(none_loop_unzeroed)
        self._one_example_step = jax.jit(one_example_step)
        # Jitted so the zeros land on the params' device, not on jax's default one.
        self._zero_accumulators = jax.jit(
            lambda params, x: (jnp.zeros((), x.dtype), jax.tree.map(jnp.zeros_like, params)))

    def environment(self) -> dict:
        return mlp_environment(self.job, self.params, self.x.dtype, self.device, self.device_note,
                               self.layer_precision)

    def compute(self, method: str) -> RawResult:
        """Run ``method`` ('METHOD' or 'METHOD@PART') from scratch; returns the native loss and gradients as
        numpy (computed, not pending)."""
        case = method
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
            loss, acc = self._zero_accumulators(self.params, x)
            read = acc
            for i in self.job.fed_alone(case):  # padding is not fed: its mean would be 0/0
                loss, acc = self._one_example_step(self.params, loss, acc, x, y, masks, i)
                if unzeroed:  # the carried-over accumulator is read after every example
                    read = jax.tree.map(jnp.add, read, acc)
            grads = read if unzeroed else acc
        else:
            raise ValueError(f"unknown method {method!r}")
        return RawResult(float(loss), state_to_canonical(grads))


def open_session(job: WorkerJob) -> JaxSession:
    """Pick the device, pin precision, build the Flax model from the canonical parameters."""
    return JaxSession(job)
