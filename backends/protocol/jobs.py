"""The job a worker runs and what it returns, for every task (numpy only)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Protocol

import numpy as np


JOB_FILE = "job.json"
#: Methods that run one forward pass per example (one_by_one; none_vectorized's vmap maps a
#: one-example forward): they read the 'single' dropout masks, the others the 'batch' ones.
SEPARATE_FORWARD = ("none_vectorized", "one_by_one")
#: The target of a padding example (the switch 'padding'): torch's default ignore_index, the Hugging Face
#: convention; Keras takes it as ``ignore_class``, optax and numpy mask it.
IGNORE_INDEX = -100
INPUTS_FILE = "inputs.npz"
RESULT_FILE = "result.json"
#: Environment variable naming a lock file that workers running side by side hold while they time a method,
#: so that no timed call shares the cores with another worker's (``gradparity.run.runner``).
TIMING_LOCK_ENV = "GRADPARITY_TIMING_LOCK"
#: Prefix of every worker's job folder (and of folders a worker makes for its own children: torch's replicas);
#: the parent's pid follows, so the runner finds stale ones (``run.execute.remove_stale_job_dirs``).
JOB_DIR_PREFIX = "gradparity-job-"


@dataclass(frozen=True)
class WorkerJob:
    """Everything a backend needs to compute its rows; written by core, read by the worker."""

    backend: str
    framework: str
    variant: str | None
    module: str
    extra: str | None
    requires: tuple[str, ...]
    methods: tuple[str, ...]
    dtype: str
    device: str
    precision: str
    model: dict
    loss: dict
    params: dict[str, np.ndarray] = field(repr=False)
    batch: dict[str, np.ndarray] = field(repr=False)
    #: "gradients": ``methods`` are reduction methods (cases 'METHOD[@PART]') on a built-in model (payload
    #: "builtin", see ``builtin_payload``; ``params``, ``batch['x'|'y']``).
    #: "model_check": a user's own model (payload "factory"; see ``protocol.models``): "describe", "forward"
    #: and the reduction methods. Both run in each framework's one model session (``session``).
    #: "loss_functions": ``methods`` are cases "FUNCTION@BATCH": ``payload['functions'][FUNCTION]``
    #: is the source of a ``loss_fn(logits, targets, sample_weight=None)``, and ``batch`` holds
    #: ``BATCH/logits``, ``BATCH/targets`` and optionally ``BATCH/sample_weight``.
    #: "optimizer_steps": ``methods`` are cases of ``payload['configs']``, run natively on a fixed gradient
    #: sequence (see "Optimizers" below and each backend's ``optimizers``).
    #: "train": ``methods`` are runs of ``payload['runs']``: a built-in model (payload "builtin") trained on
    #: ``batch['batches/T/x|y']`` (or ``batch[PREFIX + 'batches/T/…']``, a run's "batches" key naming PREFIX; a
    #: run with "weights": true also reads the per-example weights ``…/batches/T/w``, see ``train_weights``);
    #: it returns "T/NAME", the parameters after step T (every step, or those of the run's "record" list), and
    #: "loss/T" for every step. "model_train": the same runs for a user's factory (its mapped weights), same
    #: arrays. Both run in each framework's one trainer (``train``, see ``ModelTraining``).
    #: ``gradparity.backends.TASKS`` maps each task to the module that runs it.
    task: str = "gradients"
    payload: dict = field(default_factory=dict)
    #: Discrepancy causes a backend reproduces natively (see gradparity.experiment.causes), e.g.
    #: {"unzeroed_gradients": True}: the per-example loops read an accumulator they never zero.
    switches: dict = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return int(self.batch["y"].shape[0])

    @property
    def autocast(self) -> str | None:
        """'bfloat16' or 'float16' when the forward and backward passes run in reduced precision (a
        discrepancy switch), else None."""
        value = self.switches.get("autocast")
        return None if value in (None, "none") else value

    @property
    def class_weights(self) -> np.ndarray | None:
        """Per-class weights of the loss (the switch 'class_weights'), float64, or None."""
        w = self.switches.get("class_weights")
        return None if not w else np.asarray(w, dtype=np.float64)

    @property
    def batchnorm_epsilon(self) -> float | None:
        """The epsilon of the batch normalizations (training mode) between hidden layers, or None."""
        norm = self.model.get("batchnorm")
        return float(norm["epsilon"]) if norm else None

    def dropout_masks(self, forward: str) -> list[np.ndarray] | None:
        """The switch 'dropout': per hidden layer, the (N, H) scaled keep-mask of a forward pass of the
        whole batch (``forward='batch'``) or, row i, of example i's own forward pass ('single'); None
        when off. Multiply the layer's activation by it (entries 0 or 1/(1-p))."""
        masks, i = [], 0
        while f"dropout/{forward}/{i}" in self.batch:
            masks.append(self.batch[f"dropout/{forward}/{i}"])
            i += 1
        return masks or None

    def targets(self, part: str = "") -> np.ndarray:
        """The targets of the batch (or of a part), with ``IGNORE_INDEX`` where the switch 'padding' marks a
        padding example."""
        prefix = f"parts/{part}/" if part else ""
        y = self.batch[f"{prefix}y"]
        valid = self.batch.get(f"{prefix}valid")
        if valid is None:
            return y
        # One flag per example: a padding example's every target (all T tokens of a sequence) is ignored.
        return np.where(valid.reshape(valid.shape + (1,) * (y.ndim - 1)) > 0, y, IGNORE_INDEX).astype(y.dtype)

    def fed_alone(self, case: str) -> list[int]:
        """The examples ``one_by_one`` feeds, one at a time, for a case 'METHOD[@PART]': all but padding
        (a padding example alone has no valid target, and its mean would be 0/0)."""
        y = self.targets(case.partition("@")[2])
        return [int(i) for i in np.flatnonzero((y != IGNORE_INDEX).reshape(len(y), -1).any(axis=1))]

    @property
    def padded(self) -> bool:
        """Whether some targets are ``IGNORE_INDEX``: the switch 'padding', or a user's targets with ignored
        positions (``gradparity check``: Hugging Face's -100, and the causal-LM shift's last position)."""
        if "valid" in self.batch:
            return True
        y = self.batch.get("y")
        return y is not None and y.dtype.kind in "iu" and bool(np.any(y == IGNORE_INDEX))

    @property
    def unzeroed(self) -> bool:
        """Whether the per-example loops must read an accumulator they never zero (a discrepancy switch)."""
        return bool(self.switches.get("unzeroed_gradients"))

    def expected_grad_shapes(self, method: str) -> dict[str, tuple[int, ...]]:
        """The gradient names and shapes a method must return: the parameters, or the case's logits."""
        # The tasks' own modules import this one: their names are looked up here, when a job is checked.
        from gradparity.backends.protocol.losses import loss_case_batch
        from gradparity.backends.protocol.models import MODEL_CASES

        if self.task == "loss_functions":
            return {"logits": tuple(self.batch[f"{loss_case_batch(method)}/logits"].shape)}
        if self.task in ("optimizer_steps", "train", "model_train", "data_parallel_train") or (self.task == "model_check" and (
                "builtin" not in self.payload or method in MODEL_CASES)):
            return {}  # a user's model: names and shapes are what the backend found (core checks them)
        return {name: tuple(p.shape) for name, p in self.params.items()}

    def save(self, job_dir: Path) -> None:
        """Write the job (JSON) and its arrays (npz) into ``job_dir``."""
        meta = {k: getattr(self, k) for k in (
            "backend", "framework", "variant", "module", "extra", "requires", "methods",
            "dtype", "device", "precision", "model", "loss", "task", "payload", "switches")}
        meta["requires"] = list(self.requires)
        meta["methods"] = list(self.methods)
        meta["param_names"] = list(self.params)
        (job_dir / JOB_FILE).write_text(json.dumps(meta, indent=1))
        arrays = {f"params/{k}": v for k, v in self.params.items()}
        arrays.update({f"batch/{k}": v for k, v in self.batch.items()})
        np.savez(job_dir / INPUTS_FILE, **arrays)

    @classmethod
    def load(cls, job_dir: Path) -> "WorkerJob":
        meta = json.loads((job_dir / JOB_FILE).read_text())
        with np.load(job_dir / INPUTS_FILE) as z:
            params = {k: z[f"params/{k}"] for k in meta.pop("param_names")}
            batch = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("batch/")}
        meta["requires"] = tuple(meta["requires"])
        meta["methods"] = tuple(meta["methods"])
        return cls(params=params, batch=batch, **meta)


@dataclass(frozen=True)
class RawResult:
    """One method's native output: loss scalar and unnormalized canonical gradients.

    ``info`` is JSON-able metadata a case returns besides arrays (a user's model: its layers).
    """

    loss: float
    grads: dict[str, np.ndarray]
    info: dict | None = None


class Session(Protocol):
    """A backend ready to compute: framework imported, device chosen, model built."""

    def environment(self) -> dict:
        """Facts about this run, same keys in every backend.

        ``framework`` (name), ``versions`` (package -> version), ``device``
        (what computed, e.g. ``cpu`` or ``cuda:0 NVIDIA H100``), ``device_kind``
        (``cpu``/``gpu``), ``device_note`` (why a fallback happened, or None),
        ``dtype`` (of the computation), ``precision`` (the framework's own
        matmul/TF32 settings, read back after pinning) and ``tf32`` (True
        when float32 matmuls may have run in TF32 in this run).
        """

    def compute(self, method: str) -> RawResult:
        """Run one method from scratch (no state carried over from earlier calls)."""


def compile_generated(source: str) -> dict:
    """Execute a generated, self-contained source and return its namespace.

    The source is gradparity's own rendering (never user text): executing it
    is how a translation is shown to run in its framework, the code a user
    pastes being the code that ran.
    """
    namespace: dict = {"__name__": "gradparity_translation"}
    exec(compile(source, "<translation>", "exec"), namespace)  # noqa: S102 - generated code, see docstring
    return namespace


class CaseInputs:
    """The (x, y) a gradients case runs on, in a framework's tensors, converted once per part.

    A case 'METHOD' runs on the batch (``batch``: the session's already converted
    pair, made from ``job.batch['x']`` (or the named inputs, ``call_inputs``) and ``job.targets()``);
    'METHOD@PART' on ``job.batch['parts/PART/x']`` (or ``call_inputs(job, PART)``) and ``job.targets(PART)``, the
    extra or sub-batches some discrepancy causes need, passed through
    ``convert(x, y)`` the first time (so timed calls do not convert again).
    """

    def __init__(self, job: WorkerJob, batch: tuple, convert):
        self.job = job
        self.convert = convert
        self._converted = {"": batch}

    def __call__(self, case: str) -> tuple:
        """(method, x, y) of ``case``."""
        method, _, part = case.partition("@")
        if part not in self._converted:
            from gradparity.backends.protocol.models import call_inputs  # models imports this module

            named = call_inputs(self.job, part)  # a model called with keyword arguments: its part's named inputs
            x = self.job.batch[f"parts/{part}/x"] if named is None else named
            self._converted[part] = self.convert(x, self.job.targets(part))
        return (method, *self._converted[part])


class DeviceUnavailable(RuntimeError):
    """The requested device is not available to this backend (e.g. device='gpu' without one)."""


#: jax_default_matmul_precision values that force full float32 matmuls (no TF32),
#: shared by the JAX and keras-jax backends (neither imports the other's framework stack).
JAX_FULL_F32_PRECISIONS = frozenset({"highest", "float32", "f32_f32_f32"})


def jax_precision_is_full_f32(setting) -> bool:
    """True when a jax_default_matmul_precision value rules TF32 out (None = JAX's default allows it)."""
    return setting is not None and str(setting).lower() in JAX_FULL_F32_PRECISIONS


def package_versions(*packages: str) -> dict[str, str]:
    """Installed distribution version of each package ('unknown' if it has no metadata)."""
    out = {}
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out
