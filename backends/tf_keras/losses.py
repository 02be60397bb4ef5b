"""TF-Keras 2: the worker half of the losses (task "loss_functions"): run rendered ``tf_keras`` loss functions
and return d loss / d logits. The parent half (read a ``tf.keras.losses`` text, render any loss as tf_keras
code) is ``loss_text``. Imported only inside a worker process; TensorFlow is imported when the session opens.
"""
from __future__ import annotations

import numpy as np

from gradparity.backends.protocol import RawResult, WorkerJob, compile_loss_function, loss_case, package_versions


class TfKerasLossSession:
    """Runs ``loss_fn`` sources eagerly on CPU with tf.GradientTape w.r.t. fresh logits tensors."""

    def __init__(self, job: WorkerJob):
        import tensorflow as tf
        import tf_keras

        from gradparity.backends.protocol import DeviceUnavailable

        if job.task != "loss_functions":
            raise ValueError(f"the tf_keras losses module runs task 'loss_functions', not {job.task!r}")
        if job.device != "cpu":
            raise DeviceUnavailable(f"the tf_keras backend runs loss functions on the CPU only, not {job.device!r}")
        self.tf, self.tf_keras, self.job = tf, tf_keras, job
        self.device_note = None
        try:
            tf.config.set_visible_devices([], "GPU")
        except (RuntimeError, ValueError) as exc:  # already initialized: placement below still pins the CPU
            self.device_note = f"could not hide GPUs from tensorflow: {exc}"
        tf_keras.backend.set_floatx(job.dtype)
        self._functions: dict[str, object] = {}

    def environment(self) -> dict:
        tf = self.tf
        with tf.device("/CPU:0"):
            probe = tf.zeros(1, dtype=self.job.dtype)
        return {
            "framework": "tf_keras",
            "versions": package_versions("tf_keras", "tensorflow"),
            "device": "cpu" if "CPU" in probe.device.upper() else probe.device,
            "device_kind": "cpu",
            "device_note": self.device_note,
            "dtype": self.job.dtype,
            "precision": {"tf_keras_floatx": self.tf_keras.backend.floatx(), "requested": self.job.precision,
                          "tensor_float_32": bool(tf.config.experimental.tensor_float_32_execution_enabled())},
            # Element-wise arithmetic and reductions on the CPU: no matmul, no TF32.
            "tf32": False,
            "keras_backend": "tensorflow",  # tf_keras runs on tensorflow only
        }

    def compute(self, case: str) -> RawResult:
        """Run case 'FUNCTION@BATCH' on a fresh logits tensor; its loss and d loss / d logits."""
        tf = self.tf
        source, logits, targets, sample_weight = loss_case(self.job, case)
        if source not in self._functions:
            self._functions[source] = compile_loss_function(source)
        fn = self._functions[source]
        with tf.device("/CPU:0"):
            t = np.array(targets, copy=True)
            t = tf.convert_to_tensor(t if t.dtype.kind in "iu" else t.astype(self.job.dtype))
            s = None if sample_weight is None else tf.convert_to_tensor(np.asarray(sample_weight, self.job.dtype))
            z = tf.convert_to_tensor(np.asarray(logits, dtype=self.job.dtype))
            with tf.GradientTape() as tape:
                tape.watch(z)
                loss = fn(z, t, s)
            grad = tape.gradient(loss, z)
            if grad is None:
                grad = tf.zeros_like(z)
            elif isinstance(grad, tf.IndexedSlices):
                grad = tf.convert_to_tensor(grad)
        loss = np.asarray(loss)
        if loss.ndim != 0:
            raise ValueError(f"loss_fn must return a 0-d tensor, got shape {loss.shape}")
        return RawResult(float(loss), {"logits": np.asarray(grad, dtype=np.float64)})


def open_session(job: WorkerJob) -> TfKerasLossSession:
    """Import tensorflow and tf_keras, keep to the CPU, set tf_keras' floatx to the job's dtype."""
    return TfKerasLossSession(job)
