"""Keras 3: the worker half of the losses (task "loss_functions"): run rendered Keras loss functions on the Keras
backend in ``KERAS_BACKEND`` and return d loss / d logits from that backend's autodiff. The parent half (read a
``keras.losses`` text, render any loss as Keras code) is ``loss_text``. Imported only inside a worker process;
keras is imported when the session opens.
"""
from __future__ import annotations

import numpy as np

from gradparity.backends.protocol import RawResult, WorkerJob, compile_loss_function, loss_case


#: keras.ops a rendered function (or a Keras loss object) may use, probed on float64 inputs for the precision
#: each really computes in: Keras' type promotion (result_type(float64, float32) is float32 on its jax and
#: torch backends) makes some compute in float32 and, like ops.mean, even cast the result back to float64.
_PROBED_OPS = ("divide_no_nan", "mean", "sum", "where", "take", "log_softmax", "log_sigmoid", "square", "abs")


class KerasLossSession:
    """Runs ``loss_fn`` sources on the job's batches with the active Keras backend's autodiff.

    Device choice and precision pinning are the model session's (``gradparity.backends.keras.device``), so
    both tasks place work alike.
    Every case runs eagerly from scratch: a fresh logits tensor, one forward,
    one backward (tensorflow: GradientTape; jax: value_and_grad, checked once
    per shape with make_jaxpr to trace as jax.jit needs; torch: a leaf tensor
    and .backward()).
    """

    def __init__(self, job: WorkerJob):
        import keras

        from gradparity.backends.keras import device as gradient_session  # device and precision logic

        if job.task != "loss_functions":
            raise ValueError(f"the keras losses module runs task 'loss_functions', not {job.task!r}")
        variant = job.variant or "tensorflow"
        if keras.backend.backend() != variant:
            raise RuntimeError(f"Keras runs on {keras.backend.backend()!r} but the job asks for {variant!r}; "
                               "KERAS_BACKEND must be set before keras is imported")
        self.keras = keras
        self.job = job
        self.variant = variant
        self.ad = gradient_session.VARIANTS[variant](job)  # device and precision before any tensor exists
        self._environment = gradient_session.environment
        # Keras' loss objects compute in floatx unless given dtype=: the rendered functions rely on it.
        keras.config.set_floatx(job.dtype)
        self._functions: dict[str, object] = {}
        self._traced: set = set()

    # ---------------------------------------------------------------------------------------- environment

    def _op_dtypes(self) -> dict[str, str]:
        """The precision each op of ``_PROBED_OPS`` computes in here, from its values, not its dtype.

        Each probe's exact result needs more than float32's 24 bits; an op
        whose result differs from numpy's float64 by more than 1e-12 (or
        whose result dtype is narrower) computed in float32.
        """
        keras, ops = self.keras, self.keras.ops
        dtype = self.job.dtype
        fine = np.array([[1.0 + 2.0 ** -30, 3.0 - 2.0 ** -29, 0.5], [1.5 + 2.0 ** -28, 0.25, -2.0 ** -27]])
        z = ops.convert_to_tensor(fine, dtype=dtype)
        index = np.array([2, 0])
        log_softmax = fine - fine.max(-1, keepdims=True)
        log_softmax = log_softmax - np.log(np.exp(log_softmax).sum(-1, keepdims=True))
        probes = {
            "divide_no_nan": (lambda: ops.divide_no_nan(z, ops.convert_to_tensor(3.0, dtype=dtype)), fine / 3.0),
            "mean": (lambda: ops.mean(z, axis=-1), fine.mean(-1)),
            "sum": (lambda: ops.sum(z, axis=-1), fine.sum(-1)),
            "where": (lambda: ops.where(z > 0, z, 0.0), np.where(fine > 0, fine, 0.0)),
            "take": (lambda: ops.take(z[0], ops.convert_to_tensor(index, dtype="int32")), fine[0][index]),
            "log_softmax": (lambda: ops.log_softmax(z, axis=-1), log_softmax),
            "log_sigmoid": (lambda: ops.log_sigmoid(z), -np.logaddexp(0.0, -fine)),
            "square": (lambda: ops.square(z), fine * fine),
            "abs": (lambda: ops.abs(z), np.abs(fine)),
        }
        out = {}
        for name in _PROBED_OPS:
            call, expected = probes[name]
            result = call()
            got = keras.backend.standardize_dtype(result.dtype)
            value = np.asarray(ops.convert_to_numpy(result), dtype=np.float64)
            if np.finfo(got).bits >= 64 and np.max(np.abs(value - expected) / np.abs(expected).max()) > 1e-12:
                got = "float32"  # the result says float64, its digits say float32
            out[name] = got
        return out

    def environment(self) -> dict:
        keras = self.keras
        with self.ad.scope():
            op_dtypes = self._op_dtypes()
            probe = keras.Variable(np.zeros(1), dtype=self.job.dtype)  # where tensors of this session live
            device, kind, _ = self.ad.where(probe)
        # The narrowest dtype an op computes in bounds what a rendering may reach (e.g. Keras' own
        # reductions divide with divide_no_nan, float32 on its torch backend).
        dtype = min([self.job.dtype, *op_dtypes.values()], key=lambda d: np.finfo(d).bits)
        precision = dict(self.ad.precision(), keras_floatx=keras.config.floatx(), keras_op_dtypes=op_dtypes,
                         requested=self.job.precision)
        # The rendered losses are element-wise arithmetic and reductions: no matmul, so no TF32.
        return self._environment(self.ad, device, kind, dtype, precision, tf32=False)

    # -------------------------------------------------------------------------------------------- compute

    def _function(self, source: str):
        if source not in self._functions:  # compiled once per source, reused by every batch and timing call
            self._functions[source] = compile_loss_function(source)
        return self._functions[source]

    def _inputs(self, targets: np.ndarray, sample_weight: np.ndarray | None):
        ops = self.keras.ops
        # Copies: on Keras' torch backend convert_to_tensor shares numpy's memory, and a masked Keras loss
        # multiplies its sample weight in place, which would change the job's arrays between calls.
        t = np.array(targets, copy=True)
        sample_weight = None if sample_weight is None else np.array(sample_weight, copy=True)
        t = ops.convert_to_tensor(t, dtype="int64" if t.dtype.kind in "iu" else self.job.dtype)
        s = None if sample_weight is None else ops.convert_to_tensor(sample_weight, dtype=self.job.dtype)
        return t, s

    def _tensorflow(self, fn, logits, t, s):
        tf = self.ad.tf
        z = tf.convert_to_tensor(np.asarray(logits, dtype=self.job.dtype))
        with tf.GradientTape() as tape:
            tape.watch(z)  # a plain tensor, not a variable: the tape must be told
            loss = fn(z, t, s)
        grad = tape.gradient(loss, z)
        return loss, (tf.zeros_like(z) if grad is None else grad)  # None: a loss that ignores the logits

    def _jax(self, source, fn, logits, t, s):
        jax = self.ad.jax
        z = jax.device_put(np.asarray(logits, dtype=self.job.dtype), self.ad.device)
        value_and_grad = jax.value_and_grad(fn)
        signature = (source, z.shape, None if s is None else s.shape, t.shape)
        if signature not in self._traced:
            jax.make_jaxpr(value_and_grad)(z, t, s)  # raises if the function would not trace under jax.jit
            self._traced.add(signature)
        return value_and_grad(z, t, s)

    def _torch(self, fn, logits, t, s):
        torch = self.ad.torch
        z = torch.tensor(np.asarray(logits, dtype=self.job.dtype), device=self.ad.device_name, requires_grad=True)
        loss = fn(z, t, s)
        if loss.requires_grad:
            loss.backward()
        grad = z.grad if z.grad is not None else torch.zeros_like(z)
        return loss.detach(), grad

    def compute(self, case: str) -> RawResult:
        """Run case 'FUNCTION@BATCH' on a fresh logits tensor; its loss and d loss / d logits."""
        ops = self.keras.ops
        source, logits, targets, sample_weight = loss_case(self.job, case)
        fn = self._function(source)
        with self.ad.scope():
            t, s = self._inputs(targets, sample_weight)
            if self.variant == "tensorflow":
                loss, grad = self._tensorflow(fn, logits, t, s)
            elif self.variant == "jax":
                loss, grad = self._jax(source, fn, logits, t, s)
            else:
                loss, grad = self._torch(fn, logits, t, s)
            loss = ops.convert_to_numpy(loss)
            grad = ops.convert_to_numpy(grad)
        if np.ndim(loss) != 0:
            raise ValueError(f"loss_fn must return a 0-d tensor, got shape {np.shape(loss)}")
        return RawResult(float(loss), {"logits": np.asarray(grad)})


def open_session(job: WorkerJob) -> KerasLossSession:
    """Import keras (on the backend KERAS_BACKEND names), pick the device, pin precision, set floatx."""
    return KerasLossSession(job)
