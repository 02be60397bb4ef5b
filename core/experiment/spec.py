"""The experiment spec: a TOML (or dict) validated into frozen dataclasses before any work.

Layering: the embedded default experiment, then the user's file, then
command-line overrides, merged key by key; the result is validated once and
every problem is reported together (``ConfigError``, exit code 2).
"""
from __future__ import annotations

import difflib
import math
import numbers
import tomllib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from gradparity.backends import ALIASES, BACKENDS, KERAS_VARIANTS, resolve_backend_name
from gradparity.errors import ConfigError
from gradparity.experiment.causes import ACCUMULATE, AUTOCAST, SWITCHES, Causes
from gradparity.experiment.causes import check as check_causes
from gradparity.experiment.methods import METHODS
from gradparity.experiment.parallel import ParallelSpec, check_parallel
from gradparity.experiment.models import (ACTIVATIONS, CNN_ACTIVATIONS, GELU_FORMS, LAYER_DEFAULTS, MODEL_KINDS,
                                         PADDINGS, LayerOptions)
from gradparity.losses.catalogue import LOSSES

DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("highest", "default")
DATA_SOURCES = ("digits", "synthetic", "npz", "tokens")
MAX_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class ModelSpec:
    """[model]: the kind and its settings; fields of other kinds keep their defaults (unused)."""

    kind: str
    hidden: tuple[int, ...] = ()
    activation: str = "relu"
    # cnn
    channels: tuple[int, ...] = (8, 16)
    strides: tuple[int, ...] = (1, 2)
    kernel_size: int = 3
    # sequence
    vocab: int = 16
    seq_len: int = 8
    width: int = 16
    heads: int = 2
    mlp_width: int = 32
    # layer settings whose framework defaults differ (cnn, sequence)
    options: LayerOptions = LayerOptions()

    def to_dict(self) -> dict:
        """The kind's own keys, as recorded in report.json."""
        d = asdict(self)
        keep = {"mlp": ("hidden", "activation"), "cnn": ("activation", "channels", "strides", "kernel_size"),
                "sequence": ("vocab", "seq_len", "width", "heads", "mlp_width")}[self.kind]
        out = {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if k in keep}}
        if self.kind != "mlp":
            out["options"] = self.options.to_dict()
        return out


@dataclass(frozen=True)
class DataSpec:
    """Where the batch comes from. Source-specific fields are None for other sources."""

    source: str
    batch_size: int
    batch_index: int
    shuffle: bool
    num_examples: int | None = None   # synthetic
    num_features: int | None = None   # synthetic
    num_classes: int | None = None    # synthetic, npz (npz: default max label + 1)
    path: str | None = None           # npz, resolved against the config file's folder
    x_key: str | None = None          # npz
    y_key: str | None = None          # npz


@dataclass(frozen=True)
class LossSpec:
    name: str


@dataclass(frozen=True)
class Experiment:
    """A fully resolved, validated reduction experiment."""

    name: str
    seed: int
    dtype: str
    device: str
    precision: str
    backends: tuple[str, ...]   # registry labels, 'keras' already resolved
    methods: tuple[str, ...]
    timeout_s: float
    model: ModelSpec
    data: DataSpec
    loss: LossSpec
    keras_backend: str
    causes: Causes = Causes()
    #: ``[parallel]``: replicas R (0: off) and the backends whose data-parallel engines run.
    parallel: ParallelSpec = ParallelSpec()

    def to_dict(self) -> dict:
        """JSON-ready form, as recorded in report.json."""
        d = asdict(self)
        d["backends"] = list(self.backends)
        d["methods"] = list(self.methods)
        d["model"] = self.model.to_dict()
        d["parallel"] = self.parallel.to_dict()
        d["data"] = {k: v for k, v in d["data"].items() if v is not None}
        return d


# --- schema ---------------------------------------------------------------

_TOP_KEYS = ("name", "seed", "dtype", "device", "precision", "backends", "methods",
             "timeout_s", "model", "data", "loss", "keras", "causes", "parallel")
_TABLE_KEYS = {
    "model": ("kind", "hidden", "activation", "channels", "strides", "kernel_size", "padding", "vocab",
              "seq_len", "width", "heads", "mlp_width", "gelu", "layernorm_epsilon", "defaults"),
    "data": ("source", "batch_size", "batch_index", "shuffle", "num_examples",
             "num_features", "num_classes", "path", "x_key", "y_key"),
    "loss": ("name",),
    "keras": ("backend",),
    "causes": SWITCHES,
    "parallel": ("replicas", "backends"),
}
_SOURCE_KEYS = {
    "digits": (),
    "synthetic": ("num_examples", "num_features", "num_classes"),
    "npz": ("path", "x_key", "y_key", "num_classes"),
    "tokens": ("num_examples",),
}
#: The [model] keys each kind reads ("kind" aside).
_KIND_KEYS = {
    "mlp": ("hidden", "activation"),
    "cnn": ("activation", "channels", "strides", "kernel_size", "padding", "gelu", "defaults"),
    "sequence": ("vocab", "seq_len", "width", "heads", "mlp_width", "gelu", "layernorm_epsilon", "defaults"),
}
#: Data sources each kind can read.
_KIND_SOURCES = {"mlp": ("digits", "synthetic", "npz"), "cnn": ("digits", "npz"), "sequence": ("tokens",)}
#: The switches that act on the MLP's hidden layers, which the CNN and the sequence model do not have.
HIDDEN_LAYER_SWITCHES = ("dropout", "batchnorm")


def default_config_text() -> str:
    """The embedded default experiment, as shipped (with its comments)."""
    return resources.files("gradparity.experiment").joinpath("default_experiment.toml").read_text()


def default_config() -> dict:
    """The embedded default experiment as a plain dict."""
    return tomllib.loads(default_config_text())


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict; a dict value merges into an existing table (as TOML layering does).

    A parent that is not a table (``data = 5`` in a file, then ``data.batch_size``
    from a flag) is a ConfigError naming both, never an AttributeError.
    """
    *parents, leaf = dotted.split(".")
    node = cfg
    for depth, p in enumerate(parents):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            where = ".".join(parents[:depth + 1])
            raise ConfigError(f"cannot set {dotted!r}: {where} is {child!r}, not a table "
                              f"(write it as [{where}] with keys)")
        node = child
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        node[leaf] = _merge(node[leaf], value)
    else:
        node[leaf] = value


class _Checker:
    """Collects every problem instead of stopping at the first one."""

    def __init__(self):
        self.problems: list[str] = []

    def fail(self, msg: str) -> None:
        self.problems.append(msg)

    def unknown_keys(self, table: dict, known, where: str) -> None:
        for key in table:
            if key not in known:
                suggestion = _suggest(key, known) if isinstance(key, str) else ""
                self.fail(f"unknown key {where + str(key)!r}{suggestion}; known keys: {', '.join(known)}")

    def choice(self, path: str, value, choices) -> str | None:
        if not isinstance(value, str) or value not in choices:
            self.fail(f"{path} = {value!r} is not one of {', '.join(map(repr, choices))}"
                      + (_suggest(value, choices) if isinstance(value, str) else ""))
            return None
        return value

    def integer(self, path: str, value, minimum: int) -> int | None:
        # numbers.Integral: numpy integers from the Python API count; bool is not a number here.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            self.fail(f"{path} must be an integer, got {value!r}")
            return None
        value = int(value)
        if value < minimum:
            self.fail(f"{path} must be >= {minimum}, got {value}")
            return None
        return value

    def string(self, path: str, value) -> str | None:
        if not isinstance(value, str) or not value:
            self.fail(f"{path} must be a non-empty string, got {value!r}")
            return None
        return value

    def names(self, path: str, value, known, aliases=()) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not value:
            self.fail(f"{path} must be a non-empty list of names, got {value!r}")
            return None
        ok = True
        for v in value:
            if not isinstance(v, str) or (v not in known and v not in aliases):
                choices = list(known) + list(aliases)
                self.fail(f"{path}: unknown name {v!r}" + (_suggest(v, choices) if isinstance(v, str) else "")
                          + f"; known: {', '.join(choices)}")
                ok = False
        return tuple(value) if ok else None


def validate(cfg: dict, base_dir: Path | None = None) -> Experiment:
    """Validate a merged config dict into an Experiment, or raise ConfigError listing every problem.

    Checks the config alone (keys, types, ranges, names); the data itself is
    checked when the canonical inputs are built (``gradparity.experiment.inputs``).
    """
    c = _Checker()
    if not isinstance(cfg, dict):
        raise ConfigError("the experiment must be a table of keys")
    c.unknown_keys(cfg, _TOP_KEYS, "")
    tables = {}
    for t, keys in _TABLE_KEYS.items():
        value = cfg.get(t, {})
        if not isinstance(value, dict):
            c.fail(f"[{t}] must be a table, got {value!r}")
            value = {}
        c.unknown_keys(value, keys, f"{t}.")
        tables[t] = value

    # No name: one derived from the data and model (so an npz run is not labelled "digits").
    name = c.string("name", cfg["name"]) if "name" in cfg else None
    seed = c.integer("seed", cfg.get("seed"), 0)
    dtype = c.choice("dtype", cfg.get("dtype"), DTYPES)
    device = c.choice("device", cfg.get("device"), DEVICES)
    precision = c.choice("precision", cfg.get("precision"), PRECISIONS)
    methods = c.names("methods", cfg.get("methods"), METHODS)
    keras_backend = c.choice("keras.backend", tables["keras"].get("backend"), KERAS_VARIANTS)
    raw_backends = c.names("backends", cfg.get("backends"), BACKENDS, ALIASES)
    timeout = cfg.get("timeout_s")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S):
        c.fail(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}] (one week), got {timeout!r}")

    backends = None
    if raw_backends and keras_backend:
        backends = tuple(resolve_backend_name(b, keras_backend) for b in raw_backends)
        dupes = sorted({b for b in backends if backends.count(b) > 1})
        if dupes:
            c.fail(f"backends lists {', '.join(dupes)} more than once")
    if methods and len(set(methods)) != len(methods):
        c.fail("methods lists a method more than once")
    if backends and methods and len(backends) * len(methods) < 2:
        c.fail(f"backends {list(backends)} x methods {list(methods)} give one result, and a comparison "
               "needs two: add a backend or a method")

    causes = _causes(c, tables["causes"])
    model = _model(c, tables["model"])
    data = _data(c, tables["data"], base_dir, causes.short_last_batch if causes else 0)
    loss_name = c.choice("loss.name", tables["loss"].get("name"), tuple(LOSSES))
    if backends and loss_name:
        for b in backends:
            if loss_name not in BACKENDS[b].losses:
                c.fail(f"backend {b!r} does not implement loss {loss_name!r}")

    if causes is not None and methods and data is not None:
        for problem in check_causes(causes, methods, data.batch_size, dtype or "float32"):
            c.fail(problem)
    if model is not None and model.kind != "mlp":
        if data is not None and data.source not in _KIND_SOURCES[model.kind]:
            c.fail(f"model.kind = {model.kind!r} reads data.source "
                   f"{' or '.join(map(repr, _KIND_SOURCES[model.kind]))}, not {data.source!r}")
        hidden_only = [k for k in HIDDEN_LAYER_SWITCHES if causes is not None and k in causes.on()]
        if hidden_only:
            c.fail(f"{', '.join('causes.' + k for k in hidden_only)} act on the MLP's hidden layers (dropout after "
                   f"each hidden activation, batch normalization before it); model.kind = {model.kind!r} has "
                   "none: use model.kind = 'mlp' for them")
        weights = causes.class_weights if causes is not None else ()
        if model.kind == "sequence" and weights and len(weights) != model.vocab:
            c.fail(f"causes.class_weights has {len(weights)} weights for a vocabulary of {model.vocab} "
                   "(one weight per target token id)")
    elif model is not None and data is not None and data.source == "tokens":
        c.fail("data.source = 'tokens' feeds model.kind = 'sequence' only")
    elif causes is not None and model is not None and not model.hidden:
        for name in ("dropout", "batchnorm"):
            if name in causes.on():
                c.fail(f"causes.{name} acts on hidden layers, and model.hidden is empty")

    parallel = ParallelSpec()
    if backends and data is not None and model is not None:
        parallel, problems = check_parallel(tables["parallel"], backends, data.batch_size, model.kind,
                                            causes.on() if causes is not None else ())
        for problem in problems:
            c.fail(problem)

    if c.problems:
        raise ConfigError(c.problems)
    if name is None:
        name = _derived_name(data, model)
    return Experiment(name, seed, dtype, device, precision, backends, methods, float(timeout),
                      model, data, LossSpec(loss_name), keras_backend, causes, parallel)


def _causes(c: "_Checker", t: dict) -> Causes | None:
    """The [causes] switches: booleans and counts (0 is off)."""
    values = {}
    for key in SWITCHES:
        if key not in t:
            continue
        if key == "class_weights":
            w = t[key]
            if not isinstance(w, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                    for v in w) or (w and not any(w)):
                c.fail(f"causes.class_weights must be a list of finite non-negative numbers, one per class, "
                       f"not all 0 ([] is off), got {w!r}")
                continue
            values[key] = tuple(float(v) for v in w)
        elif key == "accumulate":
            value = c.choice("causes.accumulate", t[key], ACCUMULATE)
            if value is not None:
                values[key] = value
        elif key == "autocast":
            value = c.choice("causes.autocast", t[key], AUTOCAST)
            if value is not None:
                values[key] = value
        elif key == "dropout":
            value = t[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                c.fail(f"causes.dropout must be a rate in [0, 1) (0 is off), got {value!r}")
                continue
            values[key] = float(value)
        elif key in ("unzeroed_gradients", "missing_normalization", "double_normalization", "batchnorm"):
            if not isinstance(t[key], bool):
                c.fail(f"causes.{key} must be true or false, got {t[key]!r}")
                continue
            values[key] = t[key]
        else:
            value = c.integer(f"causes.{key}", t[key], 0)
            if value is not None:
                values[key] = value
    return Causes(**values)


def _derived_name(data: DataSpec, model: ModelSpec) -> str:
    """The experiment's label when the config gives none: '<data>-<model>', e.g. 'digits-mlp'."""
    what = Path(data.path).stem if data.source == "npz" else data.source
    return f"{what}-{model.kind}"


def _positive_list(c: _Checker, path: str, value, minimum: int = 1) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value):
        c.fail(f"{path} must be a non-empty list of integers >= {minimum}, got {value!r}")
        return None
    return tuple(value)


def _model(c: _Checker, t: dict) -> ModelSpec | None:
    kind = c.choice("model.kind", t.get("kind"), MODEL_KINDS)
    if kind is None:
        return None
    for key in t:
        if key != "kind" and key in _TABLE_KEYS["model"] and key not in _KIND_KEYS[kind]:
            owners = [k for k, keys in _KIND_KEYS.items() if key in keys]
            c.fail(f"model.{key} applies only to kind = {' or '.join(map(repr, owners))}, not {kind!r}")
    n_problems = len(c.problems)
    if kind == "mlp":
        hidden = t.get("hidden")
        if not isinstance(hidden, list) or any(
                isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            c.fail(f"model.hidden must be a list of positive integers (may be empty), got {hidden!r}")
            hidden = None
        activation = c.choice("model.activation", t.get("activation"), ACTIVATIONS)
        if hidden is not None and activation and len(c.problems) == n_problems:
            return ModelSpec(kind, tuple(hidden), activation)
        return None
    defaults = ModelSpec(kind)
    options = LayerOptions(
        c.choice("model.defaults", t.get("defaults", "explicit"), LAYER_DEFAULTS),
        c.choice("model.gelu", t.get("gelu", "exact"), GELU_FORMS),
        _epsilon(c, t.get("layernorm_epsilon", defaults.options.layernorm_epsilon)),
        c.choice("model.padding", t.get("padding", "same"), PADDINGS))
    fields: dict[str, Any] = {"options": options}
    if kind == "cnn":
        fields["activation"] = c.choice("model.activation", t.get("activation", "relu"), CNN_ACTIVATIONS)
        fields["channels"] = _positive_list(c, "model.channels", t.get("channels", list(defaults.channels)))
        fields["strides"] = _positive_list(c, "model.strides", t.get("strides", list(defaults.strides)))
        fields["kernel_size"] = c.integer("model.kernel_size", t.get("kernel_size", defaults.kernel_size), 1)
        if fields["channels"] and fields["strides"] and len(fields["channels"]) != len(fields["strides"]):
            c.fail(f"model.channels {list(fields['channels'])} and model.strides {list(fields['strides'])} "
                   "must have one entry per convolution")
    else:
        for key in ("vocab", "seq_len", "width", "heads", "mlp_width"):
            fields[key] = c.integer(f"model.{key}", t.get(key, getattr(defaults, key)), 2 if key == "vocab" else 1)
        if fields["width"] and fields["heads"] and fields["width"] % fields["heads"]:
            c.fail(f"model.width = {fields['width']} must be a multiple of model.heads = {fields['heads']}")
    if len(c.problems) > n_problems or any(v is None for v in (*fields.values(), *vars(options).values())):
        return None
    return ModelSpec(kind, **fields)


def _epsilon(c: _Checker, value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        c.fail(f"model.layernorm_epsilon must be a positive number, got {value!r}")
        return None
    return float(value)


def _data(c: _Checker, t: dict, base_dir: Path | None, last: int = 0) -> DataSpec | None:
    """[data]; ``last``: examples a short last batch (causes.short_last_batch) needs after the batch."""
    source = c.choice("data.source", t.get("source"), DATA_SOURCES)
    batch_size = c.integer("data.batch_size", t.get("batch_size"), 1)
    batch_index = c.integer("data.batch_index", t.get("batch_index", 0), 0)
    shuffle = t.get("shuffle", True)
    if not isinstance(shuffle, bool):
        c.fail(f"data.shuffle must be true or false, got {shuffle!r}")
    if source is None:
        return None
    for key in t:
        owner = [s for s, keys in _SOURCE_KEYS.items() if key in keys]
        if owner and source not in owner:
            c.fail(f"data.{key} applies only to source = {' or '.join(map(repr, owner))}, "
                   f"not {source!r}")
    extra: dict[str, Any] = {}
    if source == "synthetic":
        # By default exactly enough examples for the requested batch (and a short last batch after it).
        enough = (batch_size or 1) * ((batch_index or 0) + 1) + last
        extra["num_examples"] = c.integer("data.num_examples", t.get("num_examples", enough), 1)
        extra["num_features"] = c.integer("data.num_features", t.get("num_features", 20), 1)
        extra["num_classes"] = c.integer("data.num_classes", t.get("num_classes", 5), 2)
    elif source == "npz":
        path = t.get("path")
        if not isinstance(path, str) or not path:
            c.fail("data.path is required for source = 'npz' (a .npz file with the inputs and labels)")
        else:
            p = Path(path).expanduser()
            if not p.is_absolute() and base_dir is not None:
                p = base_dir / p
            extra["path"] = str(p)
        extra["x_key"] = c.string("data.x_key", t.get("x_key", "x"))
        extra["y_key"] = c.string("data.y_key", t.get("y_key", "y"))
        if "num_classes" in t:
            extra["num_classes"] = c.integer("data.num_classes", t["num_classes"], 2)
    elif source == "tokens":
        enough = (batch_size or 1) * ((batch_index or 0) + 1) + last
        extra["num_examples"] = c.integer("data.num_examples", t.get("num_examples", enough), 1)
    if batch_size is None or batch_index is None or not isinstance(shuffle, bool):
        return None
    return DataSpec(source, batch_size, batch_index, shuffle, **extra)


def read_toml(path: str | Path, label: str) -> dict:
    """A user's TOML file as a dict (ConfigError for anything unreadable); kept here for callers that import
    it from the spec: the reader is ``gradparity.experiment.files.read_toml``."""
    from gradparity.experiment.files import read_toml as read

    return read(path, label)


def load_experiment(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Experiment:
    """Build an Experiment: embedded default, merged with the TOML at ``path``, then ``overrides``.

    ``overrides`` maps dotted keys to values, e.g. ``{"dtype": "float64",
    "data.batch_size": 16}``. Raises ConfigError for an unreadable file, bad
    TOML or any invalid value.
    """
    default = default_config()
    user: dict = {}  # what the user wrote, file and overrides: the default fills in the rest
    base_dir = None
    if path is not None:
        path = Path(path)
        # A user's list replaces ours entirely; a user's table is merged key by key.
        user = read_toml(path, "config file")
        base_dir = path.resolve().parent
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a dict of dotted keys, got {type(overrides).__name__}")
    for dotted, value in (overrides or {}).items():
        if not isinstance(dotted, str) or not dotted:
            raise ConfigError(f"override keys must be dotted names like 'data.batch_size', got {dotted!r}")
        _set_dotted(user, dotted, value)
    return validate(_merge(_defaults_for_kind(default, user), user), base_dir)


def _defaults_for_kind(default: dict, user: dict) -> dict:
    """The embedded default (written for the MLP), fitted to the model kind the user asks for.

    For a CNN or sequence model it loses what they cannot use and the user did not write: the MLP's
    ``hidden`` and ``activation``, and for a sequence model the digits (token data instead). Validation names
    anything the user wrote that does not fit.
    """
    model = user.get("model")
    kind = model.get("kind") if isinstance(model, dict) else None
    if not isinstance(kind, str) or kind not in _KIND_KEYS or kind == "mlp":  # validation names a bad kind
        return default
    default = dict(default, model={"kind": kind})
    if kind == "sequence":
        default["data"] = dict(default["data"], source="tokens")
    return default
