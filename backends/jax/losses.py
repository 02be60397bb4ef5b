"""JAX: the worker half of the losses (task "loss_functions"): run rendered optax loss functions and return
d loss / d logits. The parent half (read an optax loss text, render any loss as JAX code) is ``loss_text``.
Imported only inside a worker process; jax is imported when the session opens.
"""
from __future__ import annotations

import numpy as np

from gradparity.backends.protocol import RawResult, WorkerJob, compile_loss_function, loss_case, package_versions


class JaxLossSession:
    """Runs ``loss_fn`` sources on the job's batches: jax.value_and_grad over the logits.

    Each case runs op by op, not under ``jax.jit``: compiling every (function,
    batch shape) pair costs about 0.1 s on a CPU, far more than running it
    (a few ms), and a translation check runs hundreds of pairs. That a
    function would also trace under ``jax.jit`` (no Python branching on
    values, no numpy conversion of traced arrays) is checked once per pair
    with ``jax.make_jaxpr``, which traces abstractly without compiling.
    """

    def __init__(self, job: WorkerJob):
        import jax

        from gradparity.backends.jax import device as gradient_session

        if job.task != "loss_functions":
            raise ValueError(f"the jax losses module runs task 'loss_functions', not {job.task!r}")
        self.job = job
        self.jax = jax
        self._gradient_session = gradient_session
        self.device, self.device_note = gradient_session.start(job)
        self.dtype = np.dtype(job.dtype)
        # Without x64, jax would truncate int64 labels to int32 with a warning anyway: do it explicitly.
        self.int_dtype = np.int64 if jax.config.jax_enable_x64 else np.int32
        self._functions: dict[str, object] = {}
        self._traced: set = set()

    def _value_and_grad(self, source: str, args: tuple):
        """(loss, d loss / d logits) of a function source on ``args``; compiled from source once per source."""
        fn = self._functions.get(source)
        if fn is None:
            fn = self.jax.value_and_grad(compile_loss_function(source))
            self._functions[source] = fn
        signature = (source,) + tuple(None if a is None else (a.shape, str(a.dtype)) for a in args)
        if signature not in self._traced:
            self.jax.make_jaxpr(fn)(*args)  # raises if the function is not traceable as jax.jit needs
            self._traced.add(signature)
        return fn(*args)

    def _put(self, array: np.ndarray | None):
        if array is None:
            return None
        array = np.asarray(array)
        array = array.astype(self.int_dtype if array.dtype.kind in "iu" else self.dtype)
        return self.jax.device_put(array, self.device)

    def environment(self) -> dict:
        matmul_precision = self.jax.config.jax_default_matmul_precision
        return {
            "framework": "jax",
            "versions": package_versions("jax", "jaxlib", "optax"),
            "device": self._gradient_session.device_label(self.device),
            "device_kind": "cpu" if self.device.platform == "cpu" else "gpu",
            "device_note": self.device_note,
            "dtype": str(self.jax.numpy.zeros((), self.dtype).dtype),
            "precision": {
                "jax_default_matmul_precision": None if matmul_precision is None else str(matmul_precision),
                "requested": self.job.precision,
            },
            # The rendered losses are element-wise arithmetic and reductions: no matmul, so no TF32.
            "tf32": False,
        }

    def compute(self, case: str) -> RawResult:
        """Loss and d loss / d logits of one case 'FUNCTION@BATCH', as numpy (computed, not pending)."""
        source, logits, targets, sample_weight = loss_case(self.job, case)
        args = (self._put(logits), self._put(targets), self._put(sample_weight))
        loss, grad = self._value_and_grad(source, args)
        if np.ndim(loss) != 0:
            raise ValueError(f"loss_fn returned shape {np.shape(loss)}, not a scalar")
        return RawResult(float(loss), {"logits": np.asarray(grad)})


def open_session(job: WorkerJob) -> JaxLossSession:
    """Import jax, pick the device, check float64 is really on; the session compiles functions on demand."""
    return JaxLossSession(job)
