"""JAX: the device and the matmul precision every JAX worker shares (the model session, the trainer, the loss
and optimizer sessions).

Imported only inside a worker process. Read at import by jax (set by the parent, see ``BackendInfo``):
``JAX_ENABLE_X64`` (float64 jobs need it), ``JAX_PLATFORMS``, ``XLA_PYTHON_CLIENT_PREALLOCATE=false``.
"""
from __future__ import annotations

import jax

from gradparity.backends.protocol import DeviceUnavailable, WorkerJob, jax_precision_is_full_f32

def pick_device(requested: str):
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
    device, note = pick_device(job.device)
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
