"""Backend registry: which backends exist, where they live, what they need.

Importing this package imports no framework. Each backend's module is
imported only by ``gradparity.backends.worker``, inside the worker process
that runs it, after the environment variables below are in place (Keras,
JAX and TensorFlow read them once, at import).
"""
from __future__ import annotations

from dataclasses import dataclass

KERAS_VARIANTS = ("tensorflow", "jax", "torch")


@dataclass(frozen=True)
class BackendInfo:
    """Static facts about one backend; never imports its framework.

    ``name`` is the label used in reports and in ``gradients.npz`` keys,
    ``module`` the dotted module imported in the worker, ``extra`` the pip
    extra that installs the framework, ``requires`` the top-level modules
    the backend imports (a missing one becomes a 'missing' row naming
    ``extra``), ``variant`` the Keras backend for the Keras rows.
    """

    name: str
    framework: str
    module: str
    extra: str | None
    requires: tuple[str, ...]
    losses: frozenset[str]
    variant: str | None = None
    reference: bool = False

    def environment_variables(self, dtype: str, device: str, job_dir: str) -> dict[str, str]:
        """Variables the worker process must start with (read by frameworks at import)."""
        env: dict[str, str] = {}
        uses_jax = self.framework == "jax" or self.variant == "jax"
        uses_tf = self.variant == "tensorflow" or self.framework == "tf_keras"
        if device == "cpu":
            # Hide GPUs from every framework: the only setting all of them honour.
            env["CUDA_VISIBLE_DEVICES"] = ""
            if uses_jax:
                env["JAX_PLATFORMS"] = "cpu"
        if uses_jax:
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # never grab the whole card
            env["JAX_ENABLE_X64"] = "1" if dtype == "float64" else "0"
        if uses_tf:
            env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
            env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        if self.framework in ("keras", "tf_keras"):
            if self.framework == "keras":
                env["KERAS_BACKEND"] = self.variant or "tensorflow"
            # A private Keras home: a user's ~/.keras/keras.json (floatx, backend)
            # must not change what the worker computes.
            env["KERAS_HOME"] = job_dir
        return env


_CE = frozenset({"cross_entropy"})

_ALL = [
    BackendInfo("numpy", "numpy", "gradparity.backends.numpy.session", None, ("numpy",), _CE, reference=True),
    BackendInfo("torch", "torch", "gradparity.backends.torch.session", "torch", ("torch",), _CE),
    BackendInfo("jax", "jax", "gradparity.backends.jax.session", "jax", ("jax", "jaxlib", "flax", "optax"), _CE),
]
_KERAS_REQUIRES = {
    "tensorflow": ("keras", "tensorflow"),
    "jax": ("keras", "jax", "jaxlib"),
    "torch": ("keras", "torch"),
}
_ALL += [
    BackendInfo(
        f"keras-{v}",
        "keras",
        "gradparity.backends.keras.session",
        "keras" if v == "tensorflow" else f"keras,{v}",
        _KERAS_REQUIRES[v],
        _CE,
        variant=v,
    )
    for v in KERAS_VARIANTS
]

# The legacy Keras 2 package (tf_keras): loss functions only (``gradparity translate``), no reduction methods.
_ALL.append(BackendInfo("tf-keras", "tf_keras", "gradparity.backends.tf_keras.session", "tf-keras",
                        ("tf_keras", "tensorflow"), frozenset()))

BACKENDS: dict[str, BackendInfo] = {b.name: b for b in _ALL}

#: Names a user may write besides the labels above; "keras" takes its Keras
#: backend from the experiment's ``[keras] backend``.
ALIASES = ("keras",)


def resolve_backend_name(name: str, keras_backend: str) -> str:
    """Map a user-written backend name to its registry label ('keras' -> 'keras-<backend>')."""
    if name == "keras":
        return f"keras-{keras_backend}"
    return name
