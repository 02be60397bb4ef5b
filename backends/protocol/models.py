"""The model session's payloads and cases (tasks "gradients" and "model_check"; "train" and "model_train" train
the same models): a built-in model (payload "builtin") or a user's (payload "factory"), built in its framework."""
from __future__ import annotations

import numpy as np

from gradparity.backends.protocol.jobs import WorkerJob


# --- Users' own models (task "model_check") ----------------------------------------------------------
#
# ``payload`` of a model_check job:
#   factory     "module:function": called with no arguments, returns the framework's model (a class counts)
#   sys_path    folders put first on sys.path before the import (the user's working folder)
#   mode        "inference" (dropout off, batch norm on its running statistics) or "training"
#   loss        "cross_entropy" (integer targets, logits on the last axis) or "mse"
#   assign      {native parameter name: key of job.params} once core has mapped the weights; absent in
#               the "describe" case, where the model keeps the weights its factory gave it. When the job
#               carries no params (``job.params`` empty: weights "own", or the source framework), nothing is
#               loaded: the model keeps its factory's weights and the gradients of the assigned parameters
#               are returned under assign's keys
#   inputs      optional {call argument: npz array name}: the model is called with keyword arguments
#               ``model(**{arg: batch["inputs/ARG"]})`` (``call_inputs``; integer arrays stay integer, floating
#               ones take the job's dtype); without it, ``model(batch["x"])`` as one positional tensor
#   output      optional path of the tensor the loss reads in what the model returns (``select_output``):
#               "logits", "0", "logits.0"; default: the output itself when it is one tensor, else its
#               "logits", else its only tensor
#
# Cases (``methods``):
#   "describe"  loss NaN (not computed: core checks the targets against the output shape first);
#               grads: every parameter and state variable's value, canonical layout, keyed by native name;
#               info: {"layers": [LAYER...], "calls": [[name, type], ...], "output_shape": [...]}, where
#               LAYER = {"name", "type", "called", "fused_activation",
#                        "params": [{"name", "role", "shape", "trainable", "aliases"?}]}
#               (a tensor used under several names, tied weights, is listed once, under its first name, with
#               the other names in "aliases"; its gradient is the sum over its uses)
#               in the order the forward pass first calls them (never-called layers last), and "calls" is
#               every leaf module/layer call in that order (parameter-free ones included, for naming);
#               "blocks": [{"name", "type", "called", "layers": [indices into "layers" inside it], "members":
#               [names in "calls" inside it]}], the modules owning no parameter that hold layers that do (the
#               root excepted; ``ModelLayout.blocks``)
#   "mean", "sum", "none_loop", "none_vectorized", "one_by_one" (``SESSION_METHODS``), or 'METHOD@PART'
#               the reduction methods on the mapped weights; grads keyed by ``assign``'s keys, canonical
#               layout, trainable parameters only, native (unnormalized) as for the built-in model
#   "forward"   localization: arrays "input/K", "output/K", "grad_output/K" for the K-th parameterized layer
#               of "describe"'s list (first call; channels-last), "block_output/B" for the B-th block (first
#               call; a tuple's first element), "logits", and the mean loss
#
# Canonical layout: Dense kernels (in, out); conv kernels (*window, in, out); normalization weights are
# "scale"; image activations and data channels-last (N, H, W, C): torch transposes its (N, C, H, W).

#: Roles of a parameter in the canonical layout; "other" is kept as the framework stores it.
PARAM_ROLES = ("kernel", "embedding", "scale", "bias", "mean", "var", "other")
#: The reduction methods ``gradparity check`` runs on a user's model by default, and the "describe"/"forward" cases.
MODEL_METHODS = ("mean", "sum", "none_loop", "one_by_one")
MODEL_CASES = ("describe", "forward")
#: The reduction methods every framework's model session computes, on a built-in model or a user's.
SESSION_METHODS = ("none_loop", "none_vectorized", "sum", "mean", "one_by_one")


def builtin_payload(model: dict, *, mode: str, loss: str = "cross_entropy", **extra) -> dict:
    """The payload of a job on a built-in model (the MLP, the CNN, the sequence model): ``model`` (a
    ``to_dict()``) as payload "builtin", built by the framework's ``models.build``; ``mode`` "training" when a
    layer's output depends on the forward pass (batch normalization with the batch's statistics), else
    "inference"; ``extra`` adds task keys (a training job's "runs")."""
    return {"builtin": dict(model), "mode": mode, "loss": loss, **extra}


#: The losses every model session computes (``payload["loss"]``).
MODEL_LOSSES = ("cross_entropy", "mse")


def check_switches(job: WorkerJob) -> None:
    """Refuse, before a model session builds anything, a loss it does not compute or a switch the job's model
    cannot take (ValueError): 'class_weights' and 'padding' weigh or mask class targets (cross-entropy only, and
    not together); 'dropout' multiplies the built-in MLP's hidden activations by core's masks."""
    loss = job.payload.get("loss", "cross_entropy")
    if loss not in MODEL_LOSSES:
        raise ValueError(f"the {job.framework} model session has no loss {loss!r}")
    if loss != "cross_entropy" and (job.class_weights is not None or job.padded):
        raise ValueError("the switches 'class_weights' and 'padding' weigh or mask class targets: they need the "
                         f"loss 'cross_entropy', not {loss!r}")
    if job.class_weights is not None and job.padded:
        raise ValueError("the switches 'class_weights' and 'padding' do not combine")
    builtin = job.payload.get("builtin")
    if builtin is None or builtin.get("kind", "mlp") != "mlp":
        if any(job.dropout_masks(forward) is not None for forward in ("batch", "single")):
            what = "a user's model" if builtin is None else f"the built-in {builtin['kind']} model"
            raise ValueError("the switch 'dropout' multiplies the built-in MLP's hidden activations by core's "
                             f"masks; {what} has no such layers")


class BatchDoesNotFit(ValueError):
    """The batch does not fit the model: its first forward pass on it (case "describe") raised. Core turns it
    into a configuration error (exit 2) when the source framework's model raises it."""


def first_forward(job: WorkerJob, call):
    """``call()``, the model's first forward pass on the job's batch (case "describe"), with any error it raises
    re-raised as ``BatchDoesNotFit`` naming the batch's shape and dtype."""
    try:
        return call()
    except OutputNotFound:
        raise  # the batch fits; the output path does not (its own message says so)
    except Exception as exc:
        named = call_inputs(job)
        if named is None:
            x = job.batch["x"]
            what = f"the batch's inputs ({x.dtype}, shape {tuple(x.shape)})"
        else:
            what = "the batch's inputs (" + ", ".join(f"{arg}={a.dtype} {tuple(a.shape)}"
                                                      for arg, a in named.items()) + ")"
        raise BatchDoesNotFit(f"{what} do not fit the model: its forward pass raised {type(exc).__name__}: "
                              f"{str(exc).strip()}") from exc


class OutputNotFound(ValueError):
    """The tensor the loss reads is not where the output path says (or, without one, the output holds several
    tensors and none is "logits"). Core turns it into a configuration error (exit 2) for the source framework."""


def call_inputs(job: WorkerJob, part: str = "") -> dict[str, np.ndarray] | None:
    """{call argument: array} of the batch (or of part ``part``) when the job names its inputs (payload
    "inputs": the model is called with keyword arguments), else None (the model takes ``batch["x"]``)."""
    names = job.payload.get("inputs")
    if not names:
        return None
    prefix = f"parts/{part}/" if part else ""
    return {arg: job.batch[f"{prefix}inputs/{arg}"] for arg in names}


def select_output(out, path: str | None, is_tensor):
    """The tensor the loss reads in what a model returned: ``path`` ("logits", "0", "logits.0": keys,
    attributes or indices, dot-separated), or by default the output itself when ``is_tensor(out)``, else its
    "logits", else its only tensor. ValueError naming what the output holds when that finds no tensor."""
    if path:
        node = out
        for step in path.split("."):
            node = _step(node, step, path)
        if not is_tensor(node):
            raise OutputNotFound(f"output path {path!r} leads to {type(node).__name__}, not a tensor")
        return node
    if is_tensor(out):
        return out
    found = _tensors(out, is_tensor)
    if "logits" in found:
        return found["logits"]
    if len(found) == 1:
        return next(iter(found.values()))
    raise OutputNotFound(f"the model returned {type(out).__name__} holding {len(found)} tensors "
                     f"({', '.join(list(found)[:8]) or 'none'}); name the one the loss reads with output = "
                     "\"KEY\" (a key, attribute or index path such as \"logits\" or \"0\")")


def _step(node, step: str, path: str):
    """One step of an output path: a mapping key, an attribute, or an index of a sequence."""
    if isinstance(node, dict) or hasattr(node, "keys"):
        try:
            return node[step]
        except (KeyError, TypeError):
            pass
    if not step.isdigit() and hasattr(node, step):
        return getattr(node, step)
    if step.lstrip("-").isdigit() and isinstance(node, (tuple, list)):
        try:
            return node[int(step)]
        except IndexError:
            pass
    keys = list(node.keys()) if hasattr(node, "keys") else (f"0..{len(node) - 1}" if isinstance(node, (tuple, list))
                                                             else [])
    raise OutputNotFound(f"output path {path!r}: {type(node).__name__} has no {step!r} (it has {keys})")


def _tensors(out, is_tensor) -> dict:
    """The tensors directly inside a model's output: by key (a dict, a ModelOutput) or by index (a sequence)."""
    if hasattr(out, "keys"):
        return {str(k): out[k] for k in out.keys() if is_tensor(out[k])}
    if isinstance(out, (tuple, list)):
        return {str(i): v for i, v in enumerate(out) if is_tensor(v)}
    return {}


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
    if "factory" not in job.payload:
        raise ValueError(f"a {job.task!r} job names its model in its payload: 'builtin' (see builtin_payload) or "
                         "'factory'; this one has neither")

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
    if "builtin" not in job.payload or job.payload["builtin"].get("kind", "mlp") == "mlp":
        return None  # a user's model, or the MLP (Dense layers and one activation: no setting to resolve)
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
