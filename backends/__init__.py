"""Backend registry: which backends exist, where they live, what they need.

Importing this package imports no framework. Each backend's module is
imported only by ``gradparity.backends.worker``, inside the worker process
that runs it, after the environment variables below are in place (Keras,
JAX and TensorFlow read them once, at import).
"""
from __future__ import annotations

from dataclasses import dataclass

KERAS_VARIANTS = ("tensorflow", "jax", "torch")
#: The frameworks a model, a loss or an optimizer is written in (a user's port, a loss text, an optimizer text),
#: in the order a report lists them; "keras" runs on the Keras backend of ``KERAS_VARIANTS`` the user picks.
FRAMEWORKS = ("torch", "keras", "jax")


#: The task map: which module of a framework's package runs each kind of job (``WorkerJob.task``). One model
#: session per framework (``session``) computes the reduction methods of every model, built-in (the MLP, the
#: CNN, the sequence model: "gradients") or a user's factory ("model_check"); one trainer (``train``) trains
#: every model ("train": built-in, "model_train": a user's factory).
TASKS = {
    "gradients": "session",
    "model_check": "session",
    "train": "train",
    "model_train": "train",
    "loss_functions": "losses",
    "optimizer_steps": "optimizers",
    "data_parallel": "parallel",
    "data_parallel_train": "parallel",
}


@dataclass(frozen=True)
class BackendInfo:
    """Static facts about one backend; never imports its framework.

    ``name`` is the label used in reports and in ``gradients.npz`` keys,
    ``modules`` the (task, dotted module) pairs its worker can import (see
    ``TASKS``; ``module_for``), ``extra`` the pip extra that installs the
    framework, ``requires`` the top-level modules the backend imports (a
    missing one becomes a 'missing' row naming ``extra``), ``losses`` the
    model losses its reduction methods support, ``variant`` the Keras backend
    for the Keras rows.
    """

    name: str
    framework: str
    modules: tuple[tuple[str, str], ...]
    extra: str | None
    requires: tuple[str, ...]
    losses: frozenset[str]
    variant: str | None = None
    reference: bool = False

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this backend runs."""
        return tuple(task for task, _ in self.modules)

    def module_for(self, task: str) -> str:
        """The module a worker imports for ``task``; ValueError when this backend does not run it."""
        for known, module in self.modules:
            if known == task:
                return module
        raise ValueError(f"backend {self.name!r} does not run {task!r} jobs (it runs: {', '.join(self.tasks)})")

    @property
    def module(self) -> str:
        """The module of the reduction methods on a built-in model (task "gradients": the model session)."""
        return self.module_for("gradients")

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


def package_modules(package: str, tasks=tuple(TASKS)) -> tuple[tuple[str, str], ...]:
    """(task, module) pairs of a backend package laid out as ``TASKS`` says (``package.session``, ...)."""
    return tuple((task, f"{package}.{TASKS[task]}") for task in tasks)


_ALL = [
    BackendInfo("numpy", "numpy", package_modules("gradparity.backends.numpy", ("gradients",)), None, ("numpy",),
                _CE, reference=True),
    BackendInfo("torch", "torch", package_modules("gradparity.backends.torch"), "torch", ("torch",), _CE),
    BackendInfo("jax", "jax", package_modules("gradparity.backends.jax"), "jax", ("jax", "jaxlib", "flax", "optax"),
                _CE),
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
        package_modules("gradparity.backends.keras"),
        "keras" if v == "tensorflow" else f"keras,{v}",
        _KERAS_REQUIRES[v],
        _CE,
        variant=v,
    )
    for v in KERAS_VARIANTS
]

# The legacy Keras 2 package (tf_keras): loss functions (``gradparity translate``) and a user's tf_keras model
# (``gradparity check``: Hugging Face's TF models); no built-in model, so no "gradients" task and no ``losses``.
_ALL.append(BackendInfo("tf-keras", "tf_keras",
                        package_modules("gradparity.backends.tf_keras",
                                                        ("loss_functions", "model_check", "data_parallel",
                                                         "data_parallel_train")),
                        "tf-keras", ("tf_keras", "tensorflow"), frozenset()))

BACKENDS: dict[str, BackendInfo] = {b.name: b for b in _ALL}

#: Names a user may write besides the labels above; "keras" takes its Keras
#: backend from the experiment's ``[keras] backend``.
ALIASES = ("keras",)


def make_job(info: BackendInfo, task: str, methods, *, dtype: str, device: str = "cpu",
             precision: str = "highest", model: dict | None = None, loss: dict | None = None,
             params: dict | None = None, batch: dict | None = None, payload: dict | None = None,
             switches: dict | None = None):
    """The one way to build the job ``info``'s worker runs for ``task`` (a key of ``TASKS``).

    The backend's facts (name, framework, variant, the module for ``task``,
    extra, requires) come from ``info``; the rest is what the command
    decided. ValueError when the backend does not run ``task``.
    """
    from gradparity.backends.protocol import WorkerJob

    return WorkerJob(backend=info.name, framework=info.framework, variant=info.variant,
                     module=info.module_for(task), extra=info.extra, requires=info.requires,
                     methods=tuple(methods), dtype=dtype, device=device, precision=precision,
                     model=dict(model or {}), loss=dict(loss or {}), params=dict(params or {}),
                     batch=dict(batch or {}), task=task, payload=dict(payload or {}),
                     switches=dict(switches or {}))


def resolve_backend_name(name: str, keras_backend: str) -> str:
    """Map a user-written backend name to its registry label ('keras' -> 'keras-<backend>')."""
    if name == "keras":
        return f"keras-{keras_backend}"
    return name
