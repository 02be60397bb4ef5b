"""TF-Keras 2 (the ``tf_keras`` package, on TensorFlow): device choice, precision pinning and reading, and the
environment keys its model session reports.

Imported only inside a worker process. ``TfDevice(job)`` runs before any tensor exists: it picks the device
(raising ``DeviceUnavailable``) and pins precision ("highest": TF32 off), as Keras 3's TensorFlow variant does
(``backends/keras/device.py``, which this module does not import: that one imports Keras 3).
"""
from __future__ import annotations

import tensorflow as tf

from gradparity.backends.protocol import DeviceUnavailable, WorkerJob, package_versions

#: Significand bits (implicit bit included) of each float format: which dtype is narrower.
SIGNIFICAND_BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}


def pin_tf_device(job: WorkerJob, backend: str) -> tuple[str, object | None, str | None]:
    """(TensorFlow device name, the GPU or None, a note when 'auto' fell back to the CPU) for ``job``, before any
    tensor exists: memory growth on every GPU, DeviceUnavailable for device='gpu' without one, TF32 off for
    precision "highest". Shared with Keras 3's TensorFlow variant (``backends/keras/device.py``), which imports
    it from here because this module imports no Keras."""
    gpus = tf.config.list_physical_devices("GPU") if job.device != "cpu" else []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:  # never grab the whole card; only possible before the runtime starts
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialized; TF_FORCE_GPU_ALLOW_GROWTH covers it
    if job.device == "gpu" and not gpus:
        raise DeviceUnavailable(f"{backend}: TensorFlow sees no GPU (device='gpu')")
    note = "no GPU visible to TensorFlow; ran on the CPU" if job.device == "auto" and not gpus else None
    if job.precision == "highest":
        tf.config.experimental.enable_tensor_float_32_execution(False)
    return ("/GPU:0" if gpus else "/CPU:0"), (gpus[0] if gpus else None), note


class TfDevice:
    """The job's device (``/GPU:0`` or ``/CPU:0``) and TensorFlow's TF32 switch, pinned and read back."""

    packages = ("tf_keras", "tensorflow")

    def __init__(self, job: WorkerJob):
        self.device_name, self.gpu, self.device_note = pin_tf_device(job, "tf-keras")

    def scope(self):
        """Context in which tensors and variables are created and work runs (the chosen device)."""
        return tf.device(self.device_name)

    def precision(self) -> dict:
        return {"tensor_float_32_execution_enabled": self.tf32_enabled()}

    def tf32_enabled(self) -> bool:
        return bool(tf.config.experimental.tensor_float_32_execution_enabled())

    def where(self, variable) -> tuple[str, str, tuple | None]:
        """(device text, 'cpu'|'gpu', compute capability or None) of a model variable."""
        placed = variable.device  # e.g. /job:localhost/replica:0/task:0/device:GPU:0
        if "GPU" not in placed.upper() or self.gpu is None:
            return "cpu", "cpu", None
        details = tf.config.experimental.get_device_details(self.gpu)
        index = placed.rsplit(":", 1)[-1]
        return (f"gpu:{index} ({details.get('device_name', 'unknown GPU')})", "gpu",
                details.get("compute_capability"))


def environment(dev: TfDevice, device: str, kind: str, dtype: str, precision: dict, tf32: bool) -> dict:
    """The environment keys every model session reports (the protocol's ``Session.environment``)."""
    return {
        "framework": "tf_keras",
        "versions": package_versions(*dev.packages),
        "device": device,
        "device_kind": kind,
        "device_note": dev.device_note,
        "dtype": dtype,
        "precision": precision,
        "tf32": tf32,
        "keras_backend": "tensorflow",  # tf_keras runs on TensorFlow only
    }
