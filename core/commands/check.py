"""``gradparity check`` / ``gradparity.compare_models``: a user's own model in several frameworks.

The pipeline's stages, for a model gradparity did not build:

    spec (factories, batch, loss)  -> checked here, exit 2 on bad input
    describe                       -> one worker per framework lists its layers and parameters
    map weights                    -> the source framework's weights onto the others (experiment.weights)
    workers                        -> every reduction method and a 'forward' capture, mapped weights
    normalize -> compare -> verdict   the same stages as ``gradparity run``
    localize                       -> the first layer where a port parts from the source (compare.localize)
    report                         -> terminal text, report.json, report.md, gradients.npz, inputs.npz
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from gradparity.backends import BACKENDS, BackendInfo, make_job
from gradparity.backends.protocol import (IGNORE_INDEX, MODEL_METHODS, SESSION_METHODS, BatchDoesNotFit,
                                         OutputNotFound, WorkerJob, step_losses, step_params)
from gradparity.compare.localize import Localization, gradients_apart, localize
from gradparity.compare.normalize import Result, normalize
from gradparity.compare.pairs import Comparison, compare_all
from gradparity.compare.tolerance import (UNIT_ROUNDOFF, Tolerance, effective_unit_roundoff, gradient_tolerance,
                                          training_rtol)
from gradparity.compare.verdict import Verdict, decide
from gradparity.errors import ConfigError, Interrupted
from gradparity.experiment.causes import Causes, rules
from gradparity.commands import check_report
from gradparity.commands.check_report import LARGE_MODEL, write_check_report
from gradparity.experiment.conversion import Conversion, convert_check, describe_counts, paired_gradients
from gradparity.experiment.weights import ModelLayout, WeightMap, map_weights
from gradparity.run.execute import BackendOutcome, MethodOutcome
from gradparity.report.render import REPORT_FILES
from gradparity.run.pool import shared_workers
from gradparity.run.runner import WorkerRun, not_started, run_jobs, signals_deferred

#: What a check says (``check_report``); every command module exposes its ``render_text`` (cli, testing).
render_text = check_report.render_text
#: The frameworks a user's model may come in, in the order they are run and listed: "keras" is Keras 3 (on the
#: Keras backend ``keras_backend`` names), "tf_keras" the legacy Keras 2 package (Hugging Face's TF models).
FRAMEWORKS = ("torch", "keras", "tf_keras", "jax")
#: "causal_lm": cross-entropy of the logits at position t against the target at t + 1 (logits[:, :-1] against
#: targets[:, 1:]), how causal language models are trained; core shifts the targets, every framework computes
#: cross_entropy. Targets equal to IGNORE_INDEX (-100) are ignored by both cross-entropies.
LOSSES = ("cross_entropy", "mse", "causal_lm")
#: ``weights``: "own" (each factory loads its own, checked by value) or the framework whose weights all take.
OWN = "own"
MODES = ("inference", "training")
SCHEMA = "gradparity.check/1"
#: What training mode changes, stated in every training-mode report.
TRAINING_NOTE = (
    "Training mode: dropout draws its masks from each framework's own random generator (they cannot match "
    "across frameworks, nor between methods that run separate forward passes), and batch normalization "
    "normalizes with the statistics of the batch it sees (one_by_one feeds batches of one) and updates its "
    "running statistics. Differences from these are expected and are not porting bugs; inference mode (the "
    "default) compares the deterministic model.")
#: Optimizers for ``train_steps``: the same update in torch, Keras and optax at a constant learning rate.
TRAIN_OPTIMIZERS = ("sgd", "momentum")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class ModelCheck:
    """What to check: a factory per framework, one batch, a loss, where the weights come from.

    ``x``/``y``: the batch (``x`` the model's one input, or the first of ``named``); ``named``: {call argument:
    array} when the model is called with keyword arguments (``inputs`` maps each call argument to the npz
    array it came from, for the report); ``output``: the path of the tensor the loss reads in the model's
    output; ``weights_from``: a framework whose weights the others take, or "own".
    """

    factories: dict[str, str]
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    loss: str = "cross_entropy"
    weights_from: str | None = None
    mapping: dict[str, dict[str, str]] = field(default_factory=dict)
    methods: tuple[str, ...] = MODEL_METHODS
    dtype: str = "float32"
    mode: str = "inference"
    device: str = "cpu"
    precision: str = "highest"
    keras_backend: str = "tensorflow"
    timeout_s: float = 300.0
    sys_path: tuple[str, ...] = ()
    #: After the gradients: train every framework's model for this many steps on the batch (0: do not), from
    #: the mapped weights, with ``train_optimizer`` ("sgd" or "momentum": the same update in every framework
    #: at a constant lr, so a trajectory that parts is the port) at ``train_lr``.
    train_steps: int = 0
    train_optimizer: str = "sgd"
    train_lr: float = 0.01
    named: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    inputs: dict[str, str] = field(default_factory=dict)
    targets: str | None = None
    output: str | None = None
    #: "auto": capture every layer's activations (localization) in a second pass, only when the gradients
    #: disagree; "always": in every check.
    localize: str = "auto"
    #: Whether ``methods`` was given (the default set drops one_by_one where it would weigh examples otherwise).
    methods_given: bool = False

    @property
    def own_weights(self) -> bool:
        return self.weights_from == OWN

    @property
    def source(self) -> str:
        """The framework whose model is the reference: ``weights_from``'s, else the first of FRAMEWORKS given."""
        if self.weights_from and self.weights_from != OWN:
            return self.weights_from
        return next((f for f in FRAMEWORKS if f in self.factories), "")

    @property
    def job_targets(self) -> np.ndarray:
        """The targets every framework's cross-entropy reads: for causal_lm, shifted left by one position, the
        last position IGNORE_INDEX (so logits[:, t] meet targets[:, t + 1], as logits[:, :-1] vs y[:, 1:])."""
        if self.loss != "causal_lm":
            return self.y
        y = np.asarray(self.y)
        return np.concatenate([y[:, 1:], np.full((y.shape[0], 1), IGNORE_INDEX, dtype=y.dtype)], axis=1)

    @property
    def job_loss(self) -> str:
        return "cross_entropy" if self.loss == "causal_lm" else self.loss

    @property
    def frameworks(self) -> list[str]:
        """Source first, then the others in FRAMEWORKS order."""
        return [self.source] + [f for f in FRAMEWORKS if f in self.factories and f != self.source]

    def backend(self, framework: str) -> BackendInfo:
        if framework == "keras":
            return BACKENDS[f"keras-{self.keras_backend}"]
        return BACKENDS["tf-keras" if framework == "tf_keras" else framework]

    def to_dict(self) -> dict:
        batch = ({"inputs": {arg: {"array": self.inputs.get(arg, arg), "shape": list(a.shape), "dtype": str(a.dtype)}
                             for arg, a in self.named.items()}} if self.named else
                 {"x_shape": list(self.x.shape), "x_dtype": str(self.x.dtype)})
        batch.update({"targets": self.targets or "y", "y_shape": list(self.y.shape), "y_dtype": str(self.y.dtype)})
        return {"models": dict(self.factories), "weights": OWN if self.own_weights else self.source,
                "weights_from": self.source, "loss": self.loss, "output": self.output, "localize": self.localize,
                "mapping": self.mapping, "methods": list(self.methods), "dtype": self.dtype, "mode": self.mode,
                "device": self.device, "precision": self.precision, "keras_backend": self.keras_backend,
                "timeout_s": self.timeout_s, "train_steps": self.train_steps,
                "train_optimizer": self.train_optimizer, "train_lr": self.train_lr, "batch": batch}


def check_spec(spec: ModelCheck) -> ModelCheck:
    """Every problem a user can fix, found before any worker starts (ConfigError lists them all)."""
    problems = []
    unknown = sorted(set(spec.factories) - set(FRAMEWORKS))
    if unknown:
        problems.append(f"unknown framework(s) {unknown}; models can be given for {', '.join(FRAMEWORKS)}")
    if not spec.factories:
        problems.append(f"no model given: name a factory for at least one of {', '.join(FRAMEWORKS)} "
                        "(e.g. torch = \"mypkg.nets:TorchNet\")")
    for fw, factory in spec.factories.items():
        if not isinstance(factory, str) or not _FACTORY.match(factory):
            problems.append(f"{fw} model {factory!r} is not 'module:function' (an importable module, a colon, "
                            "then a function or class called with no arguments that returns the model)")
        elif not _findable(factory.split(":")[0].split(".")[0], spec.sys_path):
            problems.append(f"{fw} model {factory!r}: no module {factory.split(':')[0].split('.')[0]!r} in "
                            f"{', '.join(spec.sys_path) or 'the current folder'} or on the Python path")
        else:
            problems += [f"{fw} model {factory!r}: {p}" for p in _factory_problems(factory, spec.sys_path)]
    if spec.weights_from is not None and spec.weights_from != OWN and spec.weights_from not in spec.factories:
        problems.append(f"weights = {spec.weights_from!r} names no given model; give \"own\" (each factory loads "
                        f"its weights, checked by value) or one of {', '.join(spec.factories)}")
    if spec.own_weights and spec.mapping:
        problems.append("a [mapping] table maps one framework's weights onto another's; with weights = \"own\" "
                        "every model keeps its own and the tensors are paired by value: drop one of them")
    for fw, table in spec.mapping.items():
        if fw not in spec.factories or fw == spec.source:
            problems.append(f"mapping for {fw!r}: only a framework whose weights are mapped (not the source) "
                            "takes a mapping")
        elif not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in table.items()):
            problems.append(f"mapping for {fw!r} must be a table of '{fw} name' = 'source name' strings")
    if spec.loss not in LOSSES:
        problems.append(f"unknown loss {spec.loss!r}; choose one of {', '.join(LOSSES)}")
    bad = [m for m in spec.methods if m not in SESSION_METHODS]
    if bad or not spec.methods:
        problems.append(f"methods {bad or '[]'}: a user's model supports {', '.join(SESSION_METHODS)}")
    for key, value, allowed in (("dtype", spec.dtype, ("float32", "float64")), ("mode", spec.mode, MODES),
                                ("device", spec.device, ("auto", "cpu", "gpu")),
                                ("precision", spec.precision, ("highest", "default")),
                                ("keras_backend", spec.keras_backend, ("tensorflow", "jax", "torch"))):
        if value not in allowed:
            problems.append(f"{key} = {value!r}; choose one of {', '.join(allowed)}")
    if not (isinstance(spec.train_steps, int) and not isinstance(spec.train_steps, bool)
            and 0 <= spec.train_steps <= 10_000):
        problems.append(f"train_steps = {spec.train_steps!r} must be a whole number in 0..10000")
    if spec.train_optimizer not in TRAIN_OPTIMIZERS:
        problems.append(f"train_optimizer = {spec.train_optimizer!r}; choose one of {', '.join(TRAIN_OPTIMIZERS)} "
                        "(whose update is the same in every framework at a constant lr)")
    if not (isinstance(spec.train_lr, (int, float)) and not isinstance(spec.train_lr, bool)
            and math.isfinite(spec.train_lr) and spec.train_lr > 0):
        problems.append(f"train_lr = {spec.train_lr!r} must be a positive number")
    if not (isinstance(spec.timeout_s, (int, float)) and spec.timeout_s > 0):
        problems.append(f"timeout_s = {spec.timeout_s!r} must be a positive number of seconds")
    if spec.localize not in ("auto", "always"):
        problems.append(f"localize = {spec.localize!r}; choose auto (a second pass when the gradients disagree) "
                        "or always")
    if spec.output is not None and (not isinstance(spec.output, str) or not spec.output.strip()):
        problems.append(f"output = {spec.output!r} must be a key or attribute path such as \"logits\" or \"0\"")
    if spec.train_steps and (spec.named or spec.own_weights or "tf_keras" in spec.factories
                             or spec.loss == "causal_lm" or spec.output):
        problems.append("train_steps trains models that take one input tensor with mapped weights (Keras 3, torch, "
                        "Flax NNX); with named inputs, an output path, causal_lm, weights = \"own\" or a tf_keras "
                        "model it is not supported yet: drop train_steps")
    problems += _batch_problems(spec)
    if problems:
        raise ConfigError(problems)
    return default_methods(spec)


def _findable(top: str, folders: tuple[str, ...]) -> bool:
    """Whether a top-level module can be found (found, not imported: the parent imports no framework)."""
    import importlib.machinery
    import sys

    return (top in sys.builtin_module_names or
            importlib.machinery.PathFinder.find_spec(top, [*(folders or [os.getcwd()]), *sys.path]) is not None)


def _factory_problems(factory: str, folders: tuple[str, ...]) -> list[str]:
    """What is wrong with a factory's module as written, read from its source without importing it (the parent
    imports no framework): a syntax error, or no top-level definition of the factory's name. Nothing is said
    where the source cannot tell (a compiled module, a star import, a module-level ``__getattr__``)."""
    import ast
    import importlib.machinery
    import sys

    module, _, attr = factory.partition(":")
    parts = module.split(".")
    spec = importlib.machinery.PathFinder.find_spec(parts[0], [*(folders or [os.getcwd()]), *sys.path])
    for part in parts[1:]:
        locations = spec.submodule_search_locations if spec is not None else None
        spec = importlib.machinery.PathFinder.find_spec(part, list(locations)) if locations else None
    origin = getattr(spec, "origin", None)
    if spec is None or not origin or not origin.endswith(".py"):
        return []
    try:
        tree = ast.parse(Path(origin).read_bytes(), origin)
    except SyntaxError as exc:
        return [f"{origin} does not parse: {exc.msg} (line {exc.lineno})"]
    except (OSError, ValueError, RecursionError):
        # RecursionError: nested too deeply for ast.parse in this process, not necessarily for the worker's import
        return []
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in node.names):
                return []
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        else:
            names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    if "__getattr__" in names:
        return []
    name = attr.split(".")[0]
    if name in names:
        return []
    defined = sorted(n for n in names if not n.startswith("_"))
    return [f"{origin} defines no {name!r} at its top level"
            + (f" (it defines {', '.join(defined[:12])}{' ...' if len(defined) > 12 else ''})" if defined else "")]


def _batch_problems(spec: "ModelCheck") -> list[str]:
    """What is wrong with the batch itself: no example, examples that do not line up, NaN, targets that are no
    classes; and the methods the targets' ignored positions rule out."""
    y, loss = spec.y, spec.loss
    arrays = spec.named or {"x": spec.x}
    tname = spec.targets or "y"
    problems = []
    for arg, x in arrays.items():
        name = "x" if not spec.named else f"{spec.inputs.get(arg, arg)} (argument {arg})"
        if x.ndim == 0 or x.shape[0] == 0:
            return [f"the batch's {name} has shape {list(x.shape)}: it needs at least one example (axis 0)"]
        if y.ndim == 0 or y.shape[0] != x.shape[0]:
            return [f"{name} has {x.shape[0]} examples but the targets {tname} have shape {list(y.shape)}: axis 0 "
                    "must match"]
        if x.dtype.kind not in "fiub":
            problems.append(f"{name} has dtype {x.dtype}: numbers are needed")
        elif x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            problems.append(f"{name} holds {int(np.size(x) - np.count_nonzero(np.isfinite(x)))} NaN/inf values")
    if loss in ("cross_entropy", "causal_lm"):
        valid = y != IGNORE_INDEX
        if y.dtype.kind not in "iu":
            problems.append(f"{loss} needs integer class targets, {tname} has dtype {y.dtype}")
        elif valid.any() and int(y[valid].min()) < 0:
            problems.append(f"{tname} holds negative class {int(y[valid].min())}; classes are 0 .. C-1 "
                            f"({IGNORE_INDEX} marks a position to ignore)")
        elif loss == "causal_lm" and y.ndim != 2:
            problems.append(f"causal_lm compares the logits at position t with the target at t + 1: it needs "
                            f"targets of shape (N, T), {tname} has {list(y.shape)}")
        elif not (spec.job_targets != IGNORE_INDEX).any():
            problems.append(f"every target of {tname} is ignored ({IGNORE_INDEX}): there is no loss term")
        else:
            problems += _one_by_one_problems(spec)
    elif y.dtype.kind != "f" or not np.all(np.isfinite(y)):
        problems.append(f"mse needs finite float targets, {tname} has dtype {y.dtype}")
    return problems


def valid_counts(spec: "ModelCheck") -> np.ndarray:
    """Per example, its loss terms that are not ignored (for mse: all)."""
    y = spec.job_targets
    if spec.loss == "mse":
        return np.full(len(y), int(np.prod(y.shape[1:], dtype=np.int64)) or 1)
    return (y != IGNORE_INDEX).reshape(len(y), -1).sum(axis=1)


def _one_by_one_problems(spec: "ModelCheck") -> list[str]:
    """one_by_one averages each example's mean over its own valid terms: with ignored positions spread unevenly
    that weighs the terms otherwise than the mean over all of them, a difference of reduction, not of port."""
    counts = valid_counts(spec)
    fed = counts[counts > 0]
    if "one_by_one" not in spec.methods or len(set(fed.tolist())) <= 1 or not spec.methods_given:
        return []
    return [f"one_by_one averages each example's mean loss, and the examples have different numbers of terms "
            f"that are not ignored ({', '.join(str(int(c)) for c in counts[:8])}{' ...' if len(counts) > 8 else ''}): "
            "that weighs the terms otherwise than mean, sum and none_loop do, so it cannot be compared with them; "
            "drop one_by_one from methods"]


def default_methods(spec: "ModelCheck") -> "ModelCheck":
    """Without methods given, one_by_one is dropped where the targets' ignored positions are spread unevenly
    (``_one_by_one_problems``); the report says so."""
    if spec.methods_given or "one_by_one" not in spec.methods or spec.loss == "mse":
        return spec
    counts = valid_counts(spec)
    if len(set(counts[counts > 0].tolist())) <= 1:
        return spec
    return dataclasses.replace(spec, methods=tuple(m for m in spec.methods if m != "one_by_one"))


def load_batch(path: str | Path, inputs: dict[str, str] | None = None,
               targets: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(x, y, named) from an .npz: arrays 'x' and 'y', or the arrays ``inputs`` and ``targets`` name
    (``batch_arrays``); ConfigError otherwise (any unreadable file, a missing array)."""
    from gradparity.experiment.files import read_npz, where

    if not inputs and not targets:
        arrays = read_npz(path, "the batch file", ("x", "y"),
                          hint="the batch file needs arrays 'x' and 'y': np.savez(path, x=..., y=...), or name "
                               "the arrays with inputs = { ARGUMENT = \"ARRAY\" } and targets = \"ARRAY\"")
    else:
        arrays = read_npz(path, "the batch file")
    return batch_arrays(arrays, inputs, targets, where(Path(path), "the batch file"))


# --- running -------------------------------------------------------------------------------------

def _job(spec: ModelCheck, framework: str, cases: tuple[str, ...], params: dict | None = None,
         assign: dict | None = None, task: str = "model_check", batch: dict | None = None,
         payload: dict | None = None) -> WorkerJob:
    """The job of ``framework``'s model session: its factory, the check's settings, ``cases`` on the batch."""
    base = {"factory": spec.factories[framework], "sys_path": list(spec.sys_path) or [os.getcwd()],
            "mode": spec.mode, "loss": spec.job_loss}
    if assign is not None:
        base["assign"] = assign
    if spec.named:
        base["inputs"] = {arg: spec.inputs.get(arg, arg) for arg in spec.named}
    if spec.output:
        base["output"] = spec.output
    arrays = {"x": spec.x, "y": spec.job_targets, **{f"inputs/{arg}": a for arg, a in spec.named.items()}}
    return make_job(spec.backend(framework), task, cases, dtype=spec.dtype, device=spec.device,
                    precision=spec.precision, model={"kind": "user", "factory": spec.factories[framework]},
                    loss={"name": spec.job_loss}, params=params, batch={**arrays, **(batch or {})},
                    payload={**base, **(payload or {})})


def _run_all(jobs: dict[str, WorkerJob], spec: ModelCheck, say, one_at_a_time: bool = False
             ) -> dict[str, BackendOutcome]:
    """Every framework's job in its own worker process, side by side (timed calls take turns); ``one_at_a_time``
    for a large model, whose workers each hold gigabytes (on a few cores side by side gains little)."""
    return run_jobs([WorkerRun(job, spec.backend(fw), spec.timeout_s, key=fw) for fw, job in jobs.items()],
                    say=say, parallel=1 if one_at_a_time else len(jobs))


def _failed_outcome(backend: str, methods: tuple[str, ...], status: str, error: str,
                    environment: dict | None = None) -> BackendOutcome:
    return BackendOutcome(backend, status, error, environment,
                          {m: MethodOutcome(status, error=error) for m in methods}, 0.0)


def _describe_failure(o: BackendOutcome) -> str | None:
    row = o.methods.get("describe")
    if row is None or row.status != "ok":
        return (row.error if row is not None and row.error else o.error) or "the model could not be described"
    return None


def _output_problem(layout: ModelLayout, source: ModelLayout) -> str | None:
    """Why a framework's output cannot be compared with the source's, or None."""
    if layout.output_shape != source.output_shape:
        return (f"the model returned output of shape {list(layout.output_shape)}, but the "
                f"{source.backend} model returns {list(source.output_shape)} on the same batch")
    return None


def _check_batch_fits(spec: "ModelCheck", described: dict[str, BackendOutcome]) -> None:
    """ConfigError (exit 2) when the source model's first forward pass refused the batch (``BatchDoesNotFit``):
    the user's inputs do not fit the model they port from. Another framework refusing it is a failed row."""
    # In the describe case, or while the session opened (a model that builds itself on its first call).
    first_line = (_describe_failure(described[spec.source]) or "").split("\n", 1)[0]
    for refusal in (BatchDoesNotFit, OutputNotFound):
        marker = f"{refusal.__name__}: "
        if marker in first_line:
            raise ConfigError(f"{spec.source}: {first_line.split(marker, 1)[1]}")


def _check_targets(source: ModelLayout, y: np.ndarray, loss: str, tname: str = "y") -> None:
    """The targets (array ``tname``) must fit the source model's output (ConfigError, before the methods run)."""
    shape = tuple(source.output_shape)
    if loss in ("cross_entropy", "causal_lm"):
        if tuple(y.shape) != shape[:-1]:
            raise ConfigError(f"the {source.backend} model returns logits of shape {list(shape)}, so {loss} "
                              f"needs integer targets of shape {list(shape[:-1])}; {tname} has shape "
                              f"{list(y.shape)}")
        if y.size and int(y.max()) >= shape[-1]:
            raise ConfigError(f"{tname} holds class {int(y.max())}, but the model has {shape[-1]} classes (0 .. "
                              f"{shape[-1] - 1})")
    elif tuple(y.shape) != shape:
        raise ConfigError(f"the {source.backend} model returns outputs of shape {list(shape)}; mse needs targets "
                          f"of that shape, {tname} has {list(y.shape)}")


def _tolerance(source: ModelLayout, m: int) -> Tolerance:
    """rtol = SAFETY u sqrt(K) L: K the longest sum (loss terms or the widest fan-in), L the called layers."""
    fan_in = [int(np.prod(p.shape[:-1])) for layer in source.called for p in source.params(layer)
              if p.role == "kernel" and len(p.shape) >= 2]
    return gradient_tolerance(max([m, *fan_in]), len(source.called))


def _gradient_scale(results: list[Result], source: str, spec: ModelCheck) -> dict[str, float]:
    """T_p for every tensor: the largest gradient entry of the source's first finished row, all tensors.

    No reference computes a user's model's per-example terms, and a gradient that is zero in exact
    arithmetic (a key's bias under softmax, a bias before a batch norm) holds only rounding noise, which
    relative to itself is anything. So each tensor is compared relative to at least the model's largest
    gradient entry: rounding there is what the tolerance bounds.
    """
    label = spec.backend(source).name
    row = next((r for r in results if r.ok and r.backend == label), None) or next((r for r in results if r.ok),
                                                                                 None)
    if row is None:
        return {}
    scale = max((float(np.max(np.abs(g))) for g in row.grads.values() if g.size), default=0.0)
    return {name: scale for name in row.grads} if math.isfinite(scale) and scale > 0 else {}


@dataclass
class ModelReport:
    """Everything one check measured."""

    spec: ModelCheck
    layouts: dict[str, ModelLayout]
    maps: dict[str, WeightMap]
    outcomes: list[BackendOutcome]
    results: list[Result]
    tolerance: Tolerance
    comparisons: list[Comparison]
    verdict: Verdict
    localizations: list[Localization]
    n_examples: int
    loss_elements: int
    training: "TrainingParity | None" = None
    #: weights = "own": per port, its tensors paired with the source's by value.
    conversions: dict[str, Conversion] = field(default_factory=dict)
    #: Per backend: {"seconds": {stage: wall seconds}, "peak_rss_mib": the worker's peak resident memory}.
    costs: dict[str, dict] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.verdict.exit_code == 0 and self.training is not None and self.training.apart:
            return 1
        return self.verdict.exit_code

    @property
    def first_layer(self) -> str | None:
        """The earliest (in the source's call order) layer where any port parts from the source."""
        source = self.layouts.get(self.spec.source)
        named = [loc for loc in self.localizations if loc.first_layer is not None]
        if not named:
            # No forward difference: a layer whose parameter gradient alone differs, if one was found.
            return next((loc.parameter_layer for loc in self.localizations if loc.parameter_layer), None)
        order = [c[0] for c in source.calls] if source else []
        return min(named, key=lambda loc: order.index(loc.first_layer) if loc.first_layer in order
                   else len(order)).first_layer

    def to_dict(self) -> dict:
        from gradparity.report.render import comparison_rows, result_rows

        return {
            "schema": SCHEMA,
            "check": self.spec.to_dict(),
            "n_examples": self.n_examples,
            "loss_elements": self.loss_elements,
            "convention": "every gradient and loss is rescaled to the gradient/value of the mean loss over the "
                          f"{self.loss_elements} loss terms that are not ignored (normalization factor per row)",
            "layers": {fw: {"layers": list(lay.layers), "calls": [list(c) for c in lay.calls],
                            "output_shape": list(lay.output_shape)} for fw, lay in self.layouts.items()},
            "mapping": {fw: wm.to_dict(self.layouts[self.spec.source], self.layouts[fw])
                        for fw, wm in self.maps.items() if fw not in self.conversions},
            "conversion": ({fw: c.to_dict() for fw, c in self.conversions.items()} if self.spec.own_weights
                           else None),
            "tolerance": self.tolerance.to_dict(),
            "backends": [{"backend": o.backend, "status": o.status, "error": o.error, "wall_seconds": o.wall_seconds,
                          "environment": o.environment} for o in self.outcomes],
            "results": result_rows(self.results),
            "comparisons": comparison_rows(self.comparisons),
            "localization": {"first_layer": self.first_layer,
                             "by_backend": [loc.to_dict() for loc in self.localizations]},
            "verdict": self.verdict.to_dict(),
            "training": None if self.training is None else self.training.to_dict(),
            "costs": {"unit": "wall seconds per stage (worker start or reuse, import, model build, cases); peak "
                              "resident memory of the worker process in MiB",
                      "by_backend": self.costs},
        }


def compare_models(torch: str | None = None, jax: str | None = None, keras: str | None = None, *,
                   tf_keras: str | None = None, batch, loss: str = "cross_entropy",
                   inputs: dict[str, str] | None = None, targets: str | None = None, output: str | None = None,
                   weights: str | None = None, weights_from: str | None = None, mapping: dict | None = None,
                   methods: tuple[str, ...] | list[str] | None = None, dtype: str = "float32",
                   mode: str = "inference", device: str = "cpu", precision: str = "highest",
                   keras_backend: str = "tensorflow", timeout_s: float = 300.0, localize: str = "auto",
                   out: str | Path | None = None, progress: Callable[[str], None] | None = None,
                   sys_path: list[str] | tuple[str, ...] | None = None) -> ModelReport:
    """Check a user's model across frameworks; see the module doc. Raises ConfigError (exit 2) on bad input.

    ``torch``/``keras``/``tf_keras``/``jax`` are factories 'module:function' (importable from the current
    folder), each called with no arguments in its own worker process. ``batch`` is (x, y) as numpy (images
    channels-last), or a mapping of named arrays: then ``inputs`` = {call argument: array name} (the model is
    called with keyword arguments) and ``targets`` names the targets' array (default "y"). ``output`` is the
    path of the tensor the loss reads in the model's output ("logits"). ``weights``: "own" (each factory loads
    its own weights; they are paired with the source's by value, the conversion checked) or the framework whose
    weights every other model takes (default: the first of torch, keras, tf_keras, jax given; ``weights_from``
    is its older name); ``mapping`` = {framework: {its parameter name: source parameter name}}; ``sys_path``:
    folders the workers import the factories from (default: the current folder).
    """
    factories = {k: v for k, v in (("torch", torch), ("keras", keras), ("tf_keras", tf_keras), ("jax", jax))
                 if v is not None}
    if weights is not None and weights_from is not None and weights != weights_from:
        raise ConfigError(f"weights = {weights!r} and weights_from = {weights_from!r}: give one of them")
    if isinstance(batch, dict) or hasattr(batch, "files"):
        x, y, named = batch_arrays({k: np.asarray(batch[k]) for k in batch}, inputs, targets, "the batch")
    else:
        if inputs:
            raise ConfigError("inputs name arrays of the batch: give the batch as a mapping of named arrays")
        x, y = (np.asarray(a) for a in batch)
        named = {}
    spec = ModelCheck(factories, x, y, loss, weights or weights_from, dict(mapping or {}),
                      tuple(methods or MODEL_METHODS), dtype, mode, device, precision, keras_backend,
                      float(timeout_s), tuple(str(Path(p).resolve()) for p in (sys_path or [os.getcwd()])),
                      named=named, inputs=dict(inputs or {}), targets=targets, output=output, localize=localize,
                      methods_given=methods is not None)
    return run_check(check_spec(spec), out, progress)


def batch_arrays(arrays: dict[str, np.ndarray], inputs: dict[str, str] | None, targets: str | None,
                 where: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(x, y, named) from a batch's named arrays: with ``inputs`` ({call argument: array name}) every named
    array by its call argument and x the first of them; else the array 'x'. y is ``targets`` (default 'y').
    ConfigError naming the arrays there are when one is missing."""
    have = ", ".join(sorted(arrays)) or "none"
    if inputs is not None and (not isinstance(inputs, dict) or not inputs or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in inputs.items())):
        raise ConfigError(f"inputs = {inputs!r} must map each call argument to an array name, e.g. "
                          "{ input_ids = \"input_ids\", attention_mask = \"attention_mask\" }")
    tname = targets or "y"
    missing = [v for v in (inputs or {}).values() if v not in arrays] + ([] if tname in arrays else [tname])
    if not inputs and "x" not in arrays:
        missing.insert(0, "x")
    if missing:
        raise ConfigError(f"{where} has no array {', '.join(repr(m) for m in missing)} (it has: {have}); name the "
                          "model's inputs with inputs = { ARGUMENT = \"ARRAY\" } and the targets with targets = "
                          "\"ARRAY\"")
    named = {arg: np.asarray(arrays[name]) for arg, name in (inputs or {}).items()}
    x = next(iter(named.values())) if named else np.asarray(arrays["x"])
    return x, np.asarray(arrays[tname]), named


def run_check(spec: ModelCheck, out: str | Path | None = None,
              progress: Callable[[str], None] | None = None) -> ModelReport:
    """Run a checked spec through every stage; write the report files into ``out`` when given."""
    from gradparity.report.outdir import OutputDir, new_run_id

    say = progress or (lambda _msg: None)
    run_id = new_run_id()
    folder = OutputDir.claim(out, run_id, REPORT_FILES) if out is not None else None
    stop = _Stop()
    try:
        # The stages (describe, methods and capture, training) run one after the other on each framework:
        # one served worker per framework takes them all, importing its framework once.
        with shared_workers() as pool, contextlib.ExitStack() as later:
            stop.large_model = lambda: later.enter_context(pool.keeping_none())
            report = _run_stages(spec, say, stop)
        if folder is not None:
            with signals_deferred():
                write_check_report(report, folder, run_id)
    finally:
        if folder is not None:
            folder.release()
    if stop.interrupted is not None:
        stop.interrupted.report = report
        raise stop.interrupted
    return report


class _Stop:
    """The signal that stopped a check, if one did: the stage it stopped returns what finished, and the stages
    after it do not run (their rows say so); the report is written, then ``Interrupted`` is raised with it."""

    interrupted: Interrupted | None = None
    #: Set once the model is known to be large (``LARGE_MODEL``): the later stages run one worker at a time.
    one_at_a_time: bool = False
    #: Called then: the shared workers stop after their jobs instead of idling with the model's memory.
    large_model: Callable[[], object] = staticmethod(lambda: None)

    def run(self, jobs: dict[str, WorkerJob], spec: ModelCheck, say) -> dict[str, BackendOutcome]:
        """``_run_all``, or every job's "not started" outcome once a signal has stopped the check."""
        if self.interrupted is not None:
            return {fw: not_started(WorkerRun(job, spec.backend(fw), spec.timeout_s, key=fw),
                                    self.interrupted.signal_name) for fw, job in jobs.items()}
        try:
            return _run_all(jobs, spec, say, self.one_at_a_time)
        except Interrupted as exc:
            self.interrupted = exc
            say(f"  interrupted by {exc.signal_name}: writing what finished")
            return exc.outcomes


@dataclass
class Described:
    """The describe and map stages' outcome: every framework's layout (its described layers and parameters),
    the source's canonical values, each port's weight map (and, with weights "own", its conversion check), and
    the frameworks that cannot go on (a failed outcome that says why)."""

    described: dict[str, BackendOutcome]
    layouts: dict[str, ModelLayout]
    values: dict[str, np.ndarray]
    maps: dict[str, WeightMap]
    conversions: dict[str, Conversion]
    failed: dict[str, BackendOutcome]

    def assign(self, spec: ModelCheck, framework: str) -> dict[str, str]:
        """The framework's {native name: source name} assignment of the source's values."""
        return {name: name for name in self.values} if framework == spec.source else self.maps[framework].assign


def describe_and_map(spec: ModelCheck, say, stop: "_Stop", cases: tuple[str, ...]) -> Described:
    """Describe the model in every framework and map the source's weights onto each port (by name rules, call
    order or, with weights "own", by value); ``cases`` are what a framework that cannot go on fails."""
    frameworks = spec.frameworks
    say(f"describing the model in {', '.join(frameworks)} ({spec.dtype}, {spec.mode} mode) ...")
    described = stop.run({fw: _job(spec, fw, ("describe",)) for fw in frameworks}, spec, say)
    failed: dict[str, BackendOutcome] = {}
    layouts: dict[str, ModelLayout] = {}
    _check_batch_fits(spec, described)
    for fw in frameworks:
        o = described[fw]
        problem = _describe_failure(o)
        if problem and o.status == "interrupted":
            failed[fw] = _failed_outcome(o.backend, cases, "interrupted", problem, o.environment)
        elif problem:
            failed[fw] = _failed_outcome(o.backend, cases, o.status if o.status != "ok" else "error",
                                         f"building or running the model failed: {problem}", o.environment)
        else:
            layouts[fw] = ModelLayout.from_info(o.backend, o.methods["describe"].info)
    source = spec.source
    maps: dict[str, WeightMap] = {}
    conversions: dict[str, Conversion] = {}
    values = described[source].methods["describe"].grads if source in layouts else {}
    if source in layouts and stop.interrupted is None:
        _check_targets(layouts[source], spec.y, spec.loss, spec.targets or "y")
        for fw in frameworks[1:]:
            if fw not in layouts:
                continue
            problem = _output_problem(layouts[fw], layouts[source])
            if problem:
                failed[fw] = _failed_outcome(layouts[fw].backend, cases, "error", problem,
                                             described[fw].environment)
                continue
            if spec.own_weights:
                say(f"pairing {fw}'s tensors with {source}'s by value ...")
                conversions[fw] = convert_check(layouts[source], layouts[fw], values,
                                                described[fw].methods["describe"].grads)
                maps[fw] = conversions[fw].weight_map(layouts[source], layouts[fw])
                if not conversions[fw].exact:
                    failed[fw] = _failed_outcome(
                        layouts[fw].backend, cases, "error",
                        f"not run: the weights {fw}'s factory loaded are not a conversion of {source}'s "
                        f"({len(conversions[fw].problems)} converter problems, listed under conversion)",
                        described[fw].environment)
            else:
                maps[fw] = map_weights(layouts[source], layouts[fw], spec.mapping.get(fw))
    else:
        for fw in frameworks[1:]:
            if fw not in failed:
                failed[fw] = _failed_outcome(spec.backend(fw).name, cases, "error",
                                             f"not run: the source model ({source}) could not be built, so there "
                                             "are no weights to map")
    return Described(described, layouts, values, maps, conversions, failed)


def describe_models(spec: ModelCheck, say, cases: tuple[str, ...] = ("train",)) -> Described:
    """``describe_and_map`` on its own (for ``gradparity train --model CHECK.toml``): a signal raises
    ``Interrupted``; a converter problem or a framework that failed to build is left in ``failed``."""
    stop = _Stop()
    described = describe_and_map(spec, say, stop, cases)
    if stop.interrupted is not None:
        raise stop.interrupted
    return described


def train_job(spec: ModelCheck, framework: str, values: dict, assign: dict, batch: dict, runs: dict) -> WorkerJob:
    """The "model_train" job of ``framework``'s trainer: ``runs`` (``protocol.train_run``'s) on ``batch``
    ("PREFIX/batches/T/x|y", and "held/x|y" for held-out accuracy), from the source's ``values``."""
    return _job(spec, framework, tuple(runs), values, assign, task="model_train", batch=batch,
                payload={"runs": runs})


def _run_stages(spec: ModelCheck, say, stop: "_Stop") -> ModelReport:
    frameworks = spec.frameworks
    cases = (*spec.methods, "forward")
    d = describe_and_map(spec, say, stop, cases)
    described, layouts, values, maps, conversions, failed = (d.described, d.layouts, d.values, d.maps,
                                                             d.conversions, d.failed)
    source = spec.source
    conversion_bug = any(not c.exact for c in conversions.values())
    size = sum(int(np.prod(p.shape)) for p in layouts[source].all_params() if p.trainable) if source in layouts else 0
    stop.one_at_a_time = size > LARGE_MODEL
    if stop.one_at_a_time:
        stop.large_model()
    if spec.own_weights:
        # The values were needed to pair the tensors only: every model keeps its own from here on.
        for o in described.values():
            if "describe" in o.methods:
                o.methods["describe"].grads = None
        values = {}
    jobs = {}
    for fw in frameworks:
        if fw in failed:
            continue
        if spec.own_weights:
            # Every model keeps its factory's weights (no params shipped); its trainable tensors' gradients.
            trainable = [p.name for p in layouts[fw].all_params() if p.trainable]
            jobs[fw] = _job(spec, fw, spec.methods, {}, {name: name for name in trainable})
        else:
            assign = {name: name for name in values} if fw == source else maps[fw].assign
            jobs[fw] = _job(spec, fw, spec.methods, values, assign)
    if jobs:
        say(f"computing {', '.join(spec.methods)} with "
            f"{'each framework' + chr(39) + 's own weights' if spec.own_weights else source + chr(39) + 's weights'} ...")
    computed = stop.run(jobs, spec, say) if jobs else {}
    for fw, conversion in conversions.items():
        if fw in computed:
            _to_source_names(computed[fw], conversion)
    outcomes = [computed.get(fw) or failed[fw] for fw in frameworks]

    n = int(spec.y.shape[0])
    counts = valid_counts(spec)
    m = int(counts.sum())
    fed = counts[counts > 0]
    # The mean convention over the M loss terms: sums divide by M, one_by_one (the N example means) by N, which
    # is the same when every example has M / N terms (one_by_one is dropped otherwise, see default_methods).
    # With uneven counts the sums' factor is 1/M over M single terms.
    even = len(fed) > 0 and len(set(fed.tolist())) == 1
    factors = (rules(spec.methods, len(fed), {}, Causes(), terms=int(fed[0])) if even
               else rules(spec.methods, m, {}, Causes(), terms=1))
    lean = size > LARGE_MODEL
    results = normalize(outcomes, spec.methods, n, factors, lean=lean)
    tol = _tolerance(layouts[source], m) if source in layouts else gradient_tolerance(m, 1)
    tol = dataclasses.replace(tol, term_scale=_gradient_scale(results, source, spec))
    comparisons = compare_all(results, tol)
    verdict = decide(results, comparisons, tol, m, spec.dtype, stop.interrupted, reduction_experiment=False,
                     reference=spec.backend(source).name)
    if conversion_bug:
        verdict = _conversion_verdict(verdict, conversions)
    localizations, captured = _localize_stage(spec, jobs, computed, layouts, maps, verdict, tol, say, stop,
                                              values)
    costs = _costs({"describe": described, "methods": computed, "capture": captured})
    verdict = _with_localization(verdict, localizations, _parameter_lines(localizations, results, comparisons,
                                                                          layouts.get(source), tol))
    notes = []
    if spec.mode == "training":
        notes.append(TRAINING_NOTE)
    if lean:
        notes.append(f"The model has {size:,} trainable parameters: its frameworks ran one at a time after the "
                     "describe stage, each worker stopped after its job, float32 rows are normalized in float32 (one more rounding, 6e-8 relative, "
                     "inside the tolerance) instead of float64 copies of every row, and gradients.npz holds each "
                     "backend's first method only.")
    if not spec.methods_given and "one_by_one" not in spec.methods and spec.loss != "mse":
        notes.append("one_by_one is not run: the examples have different numbers of loss terms that are not "
                     f"ignored ({', '.join(str(int(c)) for c in counts[:8])}{' ...' if n > 8 else ''}), so the mean "
                     "of each example's mean weighs the terms otherwise than the mean over all of them")
    if notes:
        verdict = dataclasses.replace(verdict, explanation=notes + list(verdict.explanation))
    training = None
    if spec.train_steps and jobs and stop.interrupted is None:
        ran = {fw: job.payload["assign"] for fw, job in jobs.items()
               if computed.get(fw) is not None and computed[fw].status == "ok"}
        training = _train_stage(spec, values, ran, tol, say, stop)
    return ModelReport(spec, layouts, maps, outcomes, results, tol, comparisons, verdict, localizations, n, m,
                       training, conversions, costs)


def _costs(stages: dict[str, dict[str, BackendOutcome]]) -> dict[str, dict]:
    """Per backend: each stage's wall time (worker start or reuse, import, model build and cases, in seconds) and
    the worker process's peak resident memory (MiB) as its cases reported it."""
    out: dict[str, dict] = {}
    for stage, outcomes in stages.items():
        for o in outcomes.values():
            row = out.setdefault(o.backend, {"seconds": {}, "peak_rss_mib": None})
            row["seconds"][stage] = round(o.wall_seconds, 3)
            peaks = [m.peak_rss_mib for m in o.methods.values() if m.peak_rss_mib is not None]
            if peaks:
                row["peak_rss_mib"] = max(peaks + [row["peak_rss_mib"] or 0.0])
    return out


def _to_source_names(outcome: BackendOutcome, conversion: Conversion) -> None:
    """A port's gradients under the source's names and in its layout (``weights = "own"``): only the paired
    tensors are compared."""
    for row in outcome.methods.values():
        if row.grads is not None:
            row.grads = paired_gradients(conversion, row.grads)


def _conversion_verdict(verdict: Verdict, conversions: dict[str, Conversion]) -> Verdict:
    """The verdict when a port's weights are not a conversion of the source's: that port's gradients were not
    computed (they would differ by the weights); the converter problems come first, then what the other ports
    showed."""
    lines = []
    for fw, c in conversions.items():
        if not c.exact:
            lines.append(f"{c.target}: the weights its factory loaded are not {c.source}'s converted "
                         f"({describe_counts(c)}); a converter bug, found before any gradient:")
            lines += [f"  {p}" for p in c.problems[:12]]
            if len(c.problems) > 12:
                lines.append(f"  ... and {len(c.problems) - 12} more (report.json's conversion lists every tensor)")
    bad = [c.target for c in conversions.values() if not c.exact]
    summary = (f"CONVERSION DIFFERS: {' and '.join(bad)}'s weights are not "
               f"{next(iter(conversions.values())).source}'s, converted")
    if verdict.status == "disagree":  # the other ports' own finding, said too
        summary += f"; the others: {verdict.summary}"
    return dataclasses.replace(verdict, status="disagree", exit_code=1, summary=summary,
                               explanation=lines + list(verdict.explanation))


def _localize_stage(spec: ModelCheck, jobs: dict[str, WorkerJob], computed: dict[str, BackendOutcome],
                    layouts: dict[str, ModelLayout], maps: dict[str, WeightMap], verdict: Verdict, tol: Tolerance,
                    say, stop: "_Stop", values: dict[str, np.ndarray] | None = None,
                    ) -> tuple[list[Localization], dict[str, BackendOutcome]]:
    """Capture every layer's input, output and incoming gradient in a second pass, and name the first layer where
    each port parts from the source. The pass runs when the gradients disagree (``localize = "auto"``) or
    always; holding every activation of a large model is what it costs, so an agreeing check skips it."""
    source = spec.source
    ran = {fw: job for fw, job in jobs.items() if computed.get(fw) is not None and computed[fw].status == "ok"}
    targets = [fw for fw in maps if fw in ran]
    if source not in ran or not targets or stop.interrupted is not None:
        return [], {}
    if spec.localize == "auto" and verdict.exit_code == 0:
        return [], {}
    say(f"capturing every layer's activations in {', '.join([source, *targets])} to locate the difference ...")
    forward = stop.run({fw: dataclasses.replace(ran[fw], methods=("forward",)) for fw in [source, *targets]},
                       spec, say)
    localizations = []
    src = forward.get(source)
    for fw in targets:
        tgt = forward.get(fw)
        rows = [o.methods.get("forward") if o else None for o in (src, tgt)]
        if all(r is not None and r.status == "ok" for r in rows):
            u = max(effective(o) for o in (src, tgt))
            localizations.append(localize(layouts[source], layouts[fw], maps[fw], rows[0].grads, rows[1].grads,
                                          tol.rtol(u), values))
    return localizations, forward


@dataclass
class TrainingParity:
    """``train_steps`` steps of the same optimizer in every framework from the mapped weights, on the batch:
    each target's trainable parameters (canonical, the source's names) against the source's at every step."""

    steps: int
    optimizer: str
    lr: float
    losses: dict[str, list[float]] = field(default_factory=dict)          # backend -> loss before each step
    pairs: list[dict] = field(default_factory=list)   # {"a", "b", "per_step", "rtol", "first_apart"}
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def apart(self) -> bool:
        return any(p["first_apart"] is not None for p in self.pairs)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "optimizer": self.optimizer, "lr": self.lr, "losses": self.losses,
                "pairs": self.pairs, "errors": self.errors,
                "tolerance": "rtol(t) = rtol_gradient(u) * t, relative to the parameters' largest entry"}


def _train_stage(spec: ModelCheck, values: dict, assigns: dict[str, dict], tol: Tolerance, say,
                 stop: _Stop) -> TrainingParity:
    """Train every framework whose gradient stage ran, from the mapped weights, and compare step by step."""
    from gradparity.commands.train import OPTIMIZER_CHOICES
    from gradparity.compare.trajectories import first_beyond, relative_distance

    config = OPTIMIZER_CHOICES[spec.train_optimizer](spec.train_lr)
    run = {"optimizer": config.to_dict(), "lrs": [spec.train_lr] * spec.train_steps, "reduction": "mean"}
    report = TrainingParity(spec.train_steps, config.label(), spec.train_lr)
    jobs = {}
    for fw, assign in assigns.items():
        batch = {}
        for t in range(1, spec.train_steps + 1):  # the check's one batch at every step
            batch[f"batches/{t}/x"], batch[f"batches/{t}/y"] = spec.x, spec.y
        jobs[fw] = train_job(spec, fw, values, assign, batch, {"train": run})
    say(f"training {spec.train_steps} steps of {config.label()} on the batch in {', '.join(jobs)} ...")
    outcomes = stop.run(jobs, spec, say)
    trajectories, units = {}, {}
    for fw, o in outcomes.items():
        row = o.methods.get("train")
        if row is None or row.status != "ok":
            report.errors[o.backend] = (row.error if row is not None else o.error) or o.status
            continue
        keys = sorted({k.split("/", 1)[1] for k in row.grads if not k.startswith("loss/")})
        trajectories[fw] = step_params(row.grads, range(1, spec.train_steps + 1), keys)
        report.losses[o.backend] = step_losses(row.grads, spec.train_steps)
        units[fw] = effective(o)
    source = spec.source
    for fw in (f for f in trajectories if f != source and source in trajectories):
        shared = set(trajectories[fw][0]) & set(trajectories[source][0])
        per_step = [relative_distance({k: a[k] for k in shared}, {k: b[k] for k in shared})
                    for a, b in zip(trajectories[source], trajectories[fw])]
        rtol = training_rtol(tol, max(units[source], units[fw]), spec.train_steps)
        report.pairs.append({"a": outcomes[source].backend, "b": outcomes[fw].backend, "per_step": per_step,
                             "rtol": rtol, "first_apart": first_beyond(per_step, rtol), "tensors": len(shared)})
    return report


def effective(outcome: BackendOutcome) -> float:
    """The unit roundoff of a worker's arithmetic (float32's when it reported none)."""
    return effective_unit_roundoff(outcome.environment) or UNIT_ROUNDOFF["float32"]


def _parameter_lines(localizations: list[Localization], results: list[Result], comparisons: list[Comparison],
                     source: ModelLayout | None, tol: Tolerance) -> list[str]:
    """For each port whose activations all agree with the source's: where its backward pass parts, or the
    parameter gradients that alone differ (``localize.gradients_apart``), on the first method both ran."""
    lines = []
    for loc in localizations:
        pair = next(((a, b) for a in results for b in results if a.ok and b.ok and a.backend == loc.source
                     and b.backend == loc.backend and a.method == b.method), None)
        if source is None or pair is None:
            continue
        c = next((c for c in comparisons if {c.a, c.b} == {pair[0].label, pair[1].label}), None)
        if c is None or (c.agree and loc.backward_layer is None):
            continue
        scale = max(tol.term_scale.values(), default=0.0)
        line = gradients_apart(loc, source, pair[0].grads, pair[1].grads, c.tolerance, scale)
        if line:
            lines.append(line)
    return lines


def _with_localization(verdict: Verdict, localizations: list[Localization], extra: list[str] = ()) -> Verdict:
    """Put each port's first differing layer (or the parameter gradients that alone differ) at the top of the
    verdict's explanation."""
    lines = [loc.explanation for loc in localizations if loc.first_layer is not None] + list(extra)
    return dataclasses.replace(verdict, explanation=lines + list(verdict.explanation)) if lines else verdict


# --- TOML and flags ------------------------------------------------------------------------------

_CHECK_KEYS = ("data", "inputs", "targets", "output", "loss", "weights", "weights_from", "methods", "dtype", "mode",
               "device", "precision", "keras_backend", "timeout_s", "localize", "train_steps", "train_optimizer",
               "train_lr")


def read_check_config(path: str | Path | None, flags: dict) -> ModelCheck:
    """A ModelCheck from a TOML file (``[models]``, ``[check]``, ``[mapping.FRAMEWORK]``) and flags over it.

    Relative paths (``data``) and the factories' import folder are the TOML file's folder (the current
    folder without a file). Unknown tables and keys are errors, with the known ones listed.
    """
    from gradparity.experiment.files import read_toml

    doc: dict = {}
    base = Path.cwd()
    if path is not None:
        doc = read_toml(path, "the check config")
        base = Path(path).resolve().parent
    problems = [f"unknown table [{k}] in {path}; known: [models], [check], [mapping.FRAMEWORK]"
                for k in doc if k not in ("models", "check", "mapping")]
    bad = [k for k in ("models", "check", "mapping") if not isinstance(doc.get(k, {}), dict)]
    if bad:  # `models = "x"` is valid TOML but no table
        raise ConfigError(problems + [f"[{k}] in {path} must be a table, got {doc[k]!r}" for k in bad])
    models = dict(doc.get("models", {}))
    settings = dict(doc.get("check", {}))
    problems += [f"unknown key {k!r} in [check]; known: {', '.join(_CHECK_KEYS)}" for k in settings
                 if k not in _CHECK_KEYS]
    problems += [f"unknown key {k!r} in [models]; known: {', '.join(FRAMEWORKS)}" for k in models
                 if k not in FRAMEWORKS]
    for fw in FRAMEWORKS:
        if flags.get(fw) is not None:
            models[fw] = flags[fw]
    settings.update({k: v for k, v in flags.items() if k in _CHECK_KEYS})
    if problems:
        raise ConfigError(problems)
    data = settings.pop("data", None)
    if data is None:
        raise ConfigError("no batch given: --data batch.npz (arrays 'x' and 'y'), or data = \"...\" in [check]")
    if not isinstance(data, (str, os.PathLike)):
        raise ConfigError(f"data = {data!r} in [check] must be the path of an .npz file, as a string")
    weights = settings.pop("weights", None)
    if weights is not None:
        if settings.get("weights_from") not in (None, weights):
            raise ConfigError(f"weights = {weights!r} and weights_from = {settings['weights_from']!r}: give one")
        settings["weights_from"] = weights
    data_path = Path(data) if Path(data).is_absolute() or path is None else base / data
    inputs, targets = settings.pop("inputs", None), settings.pop("targets", None)
    if targets is not None and not isinstance(targets, str):
        raise ConfigError(f"targets = {targets!r} must name an array of the batch file, as a string")
    x, y, named = load_batch(data_path, inputs, targets)
    try:
        spec = ModelCheck(models, x, y, mapping=dict(doc.get("mapping", {})), sys_path=(str(base),), named=named,
                          inputs=dict(inputs or {}), targets=targets, methods_given="methods" in settings,
                          **{k: (tuple(v) if k == "methods" else float(v) if k in ("timeout_s", "train_lr") else v)
                             for k, v in settings.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid check setting: {exc}") from exc
    return check_spec(spec)
