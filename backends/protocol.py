"""The contract between the worker and a backend module (numpy only).

A backend module exposes one function::

    open_session(job: WorkerJob) -> Session

that imports its framework, picks the device, pins precision and builds the
model from the canonical parameters. The session then answers
``environment()`` once and ``compute(method)`` for each requested method.

``compute`` returns the method's *native* result: the loss scalar its
reduction produced and its gradients, unnormalized (for ``sum`` that is the
sum over examples), as float numpy arrays in canonical names and layout.
Core rescales them; a backend never normalizes and never sees another
backend's results.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
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
    #: "gradients": ``methods`` are reduction methods on the model (``params``, ``batch['x'|'y']``).
    #: "loss_functions": ``methods`` are cases "FUNCTION@BATCH": ``payload['functions'][FUNCTION]``
    #: is the source of a ``loss_fn(logits, targets, sample_weight=None)``, and ``batch`` holds
    #: ``BATCH/logits``, ``BATCH/targets`` and optionally ``BATCH/sample_weight``.
    #: "model_check": a user's own model (see ``ModelCase`` below and each backend's ``user_model``).
    #: "optimizer_steps": ``methods`` are cases of ``payload['configs']``, run natively on a fixed gradient
    #: sequence (see "Optimizers" below and each backend's ``optimizers``).
    #: "train": ``methods`` are runs of ``payload['runs']``: the MLP trained on ``batch['batches/T/x|y']``
    #: (or ``batch[PREFIX + 'batches/T/…']``, a run's "batches" key naming PREFIX; a run with "weights": true
    #: also reads the per-example weights ``…/batches/T/w``, see ``train_weights``); each backend's ``train``
    #: returns "T/NAME", the parameters after step T (every step, or those of the run's "record" list), and
    #: "loss/T" for every step.
    #: "model_train": the same runs for a model built by ``user_model`` (a built-in CNN / sequence model, or a
    #: user's factory; see ``ModelTraining``), same arrays. ``gradparity.backends.TASKS`` maps each task to
    #: the module that runs it.
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
        return y if valid is None else np.where(valid > 0, y, IGNORE_INDEX).astype(y.dtype)

    def fed_alone(self, case: str) -> list[int]:
        """The examples ``one_by_one`` feeds, one at a time, for a case 'METHOD[@PART]': all but padding
        (a padding example alone has no valid target, and its mean would be 0/0)."""
        return [int(i) for i in np.flatnonzero(self.targets(case.partition("@")[2]) != IGNORE_INDEX)]

    @property
    def padded(self) -> bool:
        """Whether some targets are ``IGNORE_INDEX`` (the switch 'padding')."""
        return "valid" in self.batch

    @property
    def unzeroed(self) -> bool:
        """Whether the per-example loops must read an accumulator they never zero (a discrepancy switch)."""
        return bool(self.switches.get("unzeroed_gradients"))

    def expected_grad_shapes(self, method: str) -> dict[str, tuple[int, ...]]:
        """The gradient names and shapes a method must return: the parameters, or the case's logits."""
        if self.task == "loss_functions":
            return {"logits": tuple(self.batch[f"{loss_case_batch(method)}/logits"].shape)}
        if self.task in ("optimizer_steps", "train", "model_train") or (self.task == "model_check" and (
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


def loss_case_batch(case: str) -> str:
    """The batch name of a loss-function case 'FUNCTION@BATCH'."""
    return case.rsplit("@", 1)[1]


def loss_case(job: WorkerJob, case: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
    """(function source, logits, targets, sample_weight or None) of a case 'FUNCTION@BATCH'."""
    function, batch = case.rsplit("@", 1)
    return (job.payload["functions"][function], job.batch[f"{batch}/logits"], job.batch[f"{batch}/targets"],
            job.batch.get(f"{batch}/sample_weight"))


def compile_generated(source: str) -> dict:
    """Execute a generated, self-contained source and return its namespace.

    The source is gradparity's own rendering (never user text): executing it
    is how a translation is shown to run in its framework, the code a user
    pastes being the code that ran.
    """
    namespace: dict = {"__name__": "gradparity_translation"}
    exec(compile(source, "<translation>", "exec"), namespace)  # noqa: S102 - generated code, see docstring
    return namespace


def compile_loss_function(source: str):
    """The ``loss_fn`` a rendered loss source defines (``compile_generated``)."""
    return compile_generated(source)["loss_fn"]


class CaseInputs:
    """The (x, y) a gradients case runs on, in a framework's tensors, converted once per part.

    A case 'METHOD' runs on the batch (``batch``: the session's already converted
    pair, made from ``job.batch['x']`` and ``job.targets()``); 'METHOD@PART' on
    ``job.batch['parts/PART/x']`` and ``job.targets(PART)``, the
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
            self._converted[part] = self.convert(self.job.batch[f"parts/{part}/x"], self.job.targets(part))
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


# --- Users' own models (task "model_check") ----------------------------------------------------------
#
# ``payload`` of a model_check job:
#   factory     "module:function": called with no arguments, returns the framework's model (a class counts)
#   sys_path    folders put first on sys.path before the import (the user's working folder)
#   mode        "inference" (dropout off, batch norm on its running statistics) or "training"
#   loss        "cross_entropy" (integer targets, logits on the last axis) or "mse"
#   assign      {native parameter name: key of job.params} once core has mapped the weights; absent in
#               the "describe" case, where the model keeps the weights its factory gave it
#
# Cases (``methods``):
#   "describe"  loss NaN (not computed: core checks the targets against the output shape first);
#               grads: every parameter and state variable's value, canonical layout, keyed by native name;
#               info: {"layers": [LAYER...], "calls": [[name, type], ...], "output_shape": [...]}, where
#               LAYER = {"name", "type", "called", "fused_activation",
#                        "params": [{"name", "role", "shape", "trainable"}]}
#               in the order the forward pass first calls them (never-called layers last), and "calls" is
#               every leaf module/layer call in that order (parameter-free ones included, for naming)
#   "mean", "sum", "none_loop", "one_by_one"
#               the reduction methods on the mapped weights; grads keyed by ``assign``'s keys, canonical
#               layout, trainable parameters only, native (unnormalized) as for the built-in model
#   "forward"   localization: arrays "input/K", "output/K", "grad_output/K" for the K-th parameterized layer
#               of "describe"'s list (first call; channels-last), "logits", and the mean loss
#
# Canonical layout: Dense kernels (in, out); conv kernels (*window, in, out); normalization weights are
# "scale"; image activations and data channels-last (N, H, W, C): torch transposes its (N, C, H, W).

#: Roles of a parameter in the canonical layout; "other" is kept as the framework stores it.
PARAM_ROLES = ("kernel", "embedding", "scale", "bias", "mean", "var", "other")
#: The reduction methods a user's model supports, and the "describe"/"forward" cases.
MODEL_METHODS = ("mean", "sum", "none_loop", "one_by_one")
MODEL_CASES = ("describe", "forward")


def _builtin_models(job: WorkerJob):
    """The job's framework's module of built-in models (``backends/FRAMEWORK/models.py``)."""
    import importlib

    return importlib.import_module(f"gradparity.backends.{job.framework}.models")


def load_factory(job: WorkerJob):
    """Import ``payload['factory']`` ('module:function') and return the callable (nothing called yet); for a
    built-in model, its framework's ``models.build`` bound to the model's dict."""
    import functools
    import importlib
    import sys

    if "builtin" in job.payload:
        return functools.partial(_builtin_models(job).build, job.payload["builtin"])

    for folder in reversed(job.payload.get("sys_path", [])):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module_name, _, attr = job.payload["factory"].partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def assignment(job: WorkerJob) -> dict[str, str] | None:
    """{native parameter name: key of ``job.params``}: what core mapped (``payload['assign']``), a built-in
    model's own (native names onto canonical ones), or None before mapping (the "describe" case)."""
    if "builtin" in job.payload:
        return _builtin_models(job).assignment(job.payload["builtin"])
    return job.payload.get("assign")


def layer_options(job: WorkerJob) -> dict | None:
    """The layer settings a built-in model computes with in this job's framework (recorded in the
    environment), or None for a user's model."""
    if "builtin" not in job.payload:
        return None
    from gradparity.experiment.models import LayerOptions

    return LayerOptions.from_dict(job.payload["builtin"].get("options")).resolved(job.framework)


#: Where each backend measures its own GELU (a built-in model that uses one): evenly spaced points.
GELU_PROBE = (-6.0, 6.0, 2001)


def gelu_probe(job: WorkerJob) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(form, points, exact values) to measure the framework's own GELU with, when the job's built-in model
    computes one; else None. The exact values are float64 from ``math.erf`` / ``math.tanh`` per point; the
    points are in the job's dtype (so a float32 run measures float32 arithmetic)."""
    import math

    opts = layer_options(job)
    model = job.payload.get("builtin", {})
    if opts is None or not (model.get("kind") == "sequence" or model.get("activation") == "gelu"):
        return None
    x = np.linspace(*GELU_PROBE).astype(job.dtype)
    if opts["gelu"] == "tanh":
        c = math.sqrt(2.0 / math.pi)
        exact = [0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v ** 3))) for v in x.astype(float)]
    else:
        exact = [0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(float)]
    return opts["gelu"], x, np.asarray(exact)


def gelu_accuracy(job: WorkerJob, gelu) -> dict | None:
    """The framework's GELU measured on ``gelu_probe``'s points: ``gelu(x_numpy, approximate) -> numpy`` is
    the framework's own function in the job's dtype. None when the model computes no GELU."""
    probe = gelu_probe(job)
    if probe is None:
        return None
    form, x, exact = probe
    got = np.asarray(gelu(x, form == "tanh"), dtype=np.float64)
    lo, hi, n = GELU_PROBE
    return {"form": form, "max_abs_error": float(np.max(np.abs(got - exact))),
            "points": f"{n} points in [{lo:g}, {hi:g}], {job.dtype}, against float64 math.erf/math.tanh"}


def loss_elements(logits_shape: tuple[int, ...], loss: str) -> int:
    """How many terms a mean-reduced loss averages: N (x T ...) for cross-entropy, every output for mse."""
    shape = tuple(logits_shape)
    return int(np.prod(shape[:-1] if loss == "cross_entropy" else shape))



# --- Optimizers on a fixed gradient sequence (task "optimizer_steps") ---------------------------------------
#
# Each ``backends/{torch,keras,jax}/optimizers.py`` exposes
#     run_steps(config, params, grads, lrs, dtype) -> the K parameter dicts after steps 1..K
#     environment_note(config) -> one line naming the class / transformation and its arguments
# ``config`` is ``OptimizerConfig.to_dict()`` (gradparity.experiment.optimizers), ``params`` the start
# {name: ndarray}, ``grads`` K gradient dicts of the same names and shapes, ``lrs`` the K per-step learning
# rates, ``dtype`` "float32" | "float64". No model and no loss: the framework's own optimizer applies grads[t]
# at lrs[t]; the parameters come back as numpy arrays in ``dtype``.
#
# ``payload``: {"configs": {CASE: OptimizerConfig.to_dict()}, "lrs": {CASE: [lr at step 1, ...]},
#              "scales": {CASE: factor the gradients are multiplied by (default 1)}}
# ``params``: the starting parameters; ``batch``: "grads/T/NAME", the gradient fed at step T (from 1).
# A case returns loss NaN and grads {"T/NAME": parameters after step T}; info {"optimizer": what ran}.
# A config with a "code" key runs that rendered source instead of the class its fields name (``gradparity
# translate``; ``gradparity.experiment.optimizer_text.OptimizerRendering``): its ``make_optimizer`` builds the
# optimizer, fed the same gradients and learning rates, with torch's ``before_step(optimizer, t)`` where defined.


def step_gradients(job: WorkerJob) -> list[dict[str, np.ndarray]]:
    """The gradient sequence of an optimizer job, step 1 first."""
    out, t = [], 1
    while f"grads/{t}/{next(iter(job.params))}" in job.batch:
        out.append({name: job.batch[f"grads/{t}/{name}"] for name in job.params})
        t += 1
    return out


def train_batches(job: WorkerJob, prefix: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
    """The (x, y) of a training run's steps 1..K, from ``job.batch[PREFIX + "batches/T/x"|"…/y"]`` (a run's
    ``"batches"`` key names its PREFIX when a job holds several batch sequences, e.g. one per batch size)."""
    out, t = [], 1
    while f"{prefix}batches/{t}/x" in job.batch:
        out.append((job.batch[f"{prefix}batches/{t}/x"], job.batch[f"{prefix}batches/{t}/y"]))
        t += 1
    if not out:
        raise ValueError(f"a train job needs batches '{prefix}batches/1/x', '{prefix}batches/1/y', ...")
    return out


#: A training run's reductions of the per-example losses l_i of a batch of N (weights w_i: see ``train_weights``):
#: unweighted runs "mean" (sum_i l_i / N) and "sum"; weighted runs "sum" (sum_i w_i l_i), "weighted_mean"
#: (sum_i w_i l_i / sum_i w_i: torch ``CrossEntropyLoss(weight=...)``, Keras "mean_with_sample_weight") and
#: "sum_over_batch_size" (sum_i w_i l_i / N: Keras' default with ``sample_weight``).
TRAIN_REDUCTIONS = {False: ("mean", "sum"), True: ("sum", "weighted_mean", "sum_over_batch_size")}


def train_weights(job: WorkerJob, case: str, steps: int) -> list[np.ndarray] | None:
    """The per-example weights of a run's steps 1..K (``job.batch[PREFIX + "batches/T/w"]``, one weight per row
    of batch T), or None for an unweighted run (no ``"weights": true``). Raises ValueError for a reduction the
    run cannot have (``TRAIN_REDUCTIONS``) or weights missing or not matching their batch."""
    run = job.payload["runs"][case]
    weighted, prefix = bool(run.get("weights")), run.get("batches", "")
    if run["reduction"] not in TRAIN_REDUCTIONS[weighted]:
        raise ValueError(f"a{' weighted' if weighted else 'n unweighted'} training run reduces by one of "
                         f"{', '.join(TRAIN_REDUCTIONS[weighted])}, not {run['reduction']!r}")
    if not weighted:
        return None
    out = []
    for t in range(1, steps + 1):
        w, y = job.batch.get(f"{prefix}batches/{t}/w"), job.batch[f"{prefix}batches/{t}/y"]
        if w is None or w.shape != y.shape:
            raise ValueError(f"weighted run {case!r}: '{prefix}batches/{t}/w' must hold one weight per example "
                             f"of batch {t} ({y.shape}), got {None if w is None else w.shape}")
        out.append(w)
    return out


def train_run(job: WorkerJob, case: str, steps: int) -> tuple[dict, list[float], str, set[int]]:
    """(optimizer config, per-step lrs, reduction, steps whose parameters to return) of a training run: its
    ``"record"`` list, or every step. Raises ValueError for lrs that do not fit the ``steps`` batches or an
    accumulating optimizer (a training run steps on every batch)."""
    run = job.payload["runs"][case]
    config, lrs, reduction = run["optimizer"], [float(lr) for lr in run["lrs"]], run["reduction"]
    if len(lrs) != steps:
        raise ValueError(f"{steps} batches but {len(lrs)} learning rates")
    if int(config.get("accumulation", 1)) != 1:
        raise ValueError("training runs step the optimizer on every batch (accumulation 1)")
    record = run.get("record")
    return config, lrs, reduction, set(range(1, steps + 1)) if record is None else {int(t) for t in record}


def train_result(job: WorkerJob, arrays: dict[str, np.ndarray], losses: list[float], info: dict) -> RawResult:
    """A training run's result: ``arrays`` (the parameters, "T/NAME") with every step's loss as "loss/T" in the
    job's dtype, and the last step's loss as the result's loss."""
    arrays = dict(arrays)
    arrays.update({f"loss/{t}": np.array(v, dtype=job.dtype) for t, v in enumerate(losses, start=1)})
    return RawResult(losses[-1], arrays, info)


def step_params(arrays: dict[str, np.ndarray], steps, names) -> list[dict[str, np.ndarray]]:
    """Decode a trajectory (a training run's or an optimizer case's arrays, "T/NAME"): for each step T of
    ``steps``, the parameters ``names`` after it, as float64. The one reader of the encoding that
    ``train_result`` and ``OptimizerSession`` write."""
    return [{k: np.asarray(arrays[f"{t}/{k}"], dtype=np.float64) for k in names} for t in steps]


def step_losses(arrays: dict[str, np.ndarray], count: int) -> list[float]:
    """Decode a training run's per-step losses ("loss/T", T = 1..count)."""
    return [float(arrays[f"loss/{t}"]) for t in range(1, count + 1)]


class ModelTraining:
    """Task "model_train" for a built-in model or a user's, the part every backend's ``user_model`` trainer shares.

    ``open_model(job)`` builds the backend's user-model session on batch 1 of the job (its ``batch['x'|'y']``:
    what ``environment()`` reports on). The batches of every run are converted once by the subclass's
    ``convert(x, y)``, so a timed ``compute`` is the training loop alone; ``settings(case)`` gives a run's
    batches, optimizer config, per-step lrs, reduction ('mean' over every loss term, or 'sum') and recorded
    steps.
    """

    def __init__(self, job: WorkerJob, open_model):
        runs = job.payload["runs"]
        first = train_batches(job, next(iter(runs.values())).get("batches", ""))
        self.job = job
        self.model = open_model(replace(job, batch={"x": first[0][0], "y": first[0][1]}))
        self._batches: dict[str, list] = {}
        for run in runs.values():
            self.batches(run)

    def convert(self, x: np.ndarray, y: np.ndarray):
        raise NotImplementedError

    def batches(self, run: dict) -> list:
        prefix = run.get("batches", "")
        if prefix not in self._batches:
            self._batches[prefix] = [self.convert(x, y) for x, y in train_batches(self.job, prefix)]
        return self._batches[prefix]

    def environment(self) -> dict:
        return self.model.environment()

    def settings(self, case: str) -> tuple[list, dict, list[float], str, set[int]]:
        """(batches, config, lrs, reduction, recorded steps) of run ``case``; ValueError for another reduction."""
        batches = self.batches(self.job.payload["runs"][case])
        config, lrs, reduction, record = train_run(self.job, case, len(batches))
        if reduction not in ("mean", "sum"):
            raise ValueError(f"a model's training run reduces by 'mean' or 'sum', not {reduction!r}")
        return batches, config, lrs, reduction, record


class OptimizerSession:
    """A backend's native optimizers behind the Session protocol: ``compute(case)`` runs one config."""

    def __init__(self, job: WorkerJob, run_steps, describe, environment: dict):
        self.job, self.run_steps, self.describe, self.env = job, run_steps, describe, environment
        self.grads = step_gradients(job)

    def environment(self) -> dict:
        return dict(self.env)

    def compute(self, case: str) -> RawResult:
        config = self.job.payload["configs"][case]
        scale = float(self.job.payload.get("scales", {}).get(case, 1.0))
        grads = self.grads if scale == 1.0 else [{k: (g * scale).astype(g.dtype) for k, g in step.items()}
                                                 for step in self.grads]
        steps = self.run_steps(config, self.job.params, grads, self.job.payload["lrs"][case], self.job.dtype)
        arrays = {f"{t}/{name}": np.asarray(v) for t, p in enumerate(steps, start=1) for name, v in p.items()}
        return RawResult(float("nan"), arrays, {"optimizer": self.describe(config)})


def cpu_environment(framework: str, versions: dict, dtype: str, note: str | None = None) -> dict:
    """The environment of a backend that computes on the CPU in ``dtype`` (an optimizer job)."""
    return {"framework": framework, "versions": versions, "device": "cpu", "device_kind": "cpu",
            "device_note": note, "dtype": dtype, "precision": {}, "tf32": False}
