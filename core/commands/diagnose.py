"""``gradparity diagnose``: why do these gradients differ? Known causes ranked against the numbers.

The pipeline's last two stages, applied to numbers someone else produced:

    observations (a report folder | an npz of gradients + what the user knows | a table of differences)
      -> compare every pair (exact zero, rounding-sized, a constant factor, large) against the dtype's
         rounding bound (a report's own; a table's absolute differences at the gradients' scale, said)
      -> test every known cause's signature against that pattern, and against what a report records
         (its precision settings, a check's localization: ``diagnose_report``); the quantitative
         signatures on whole results are in ``diagnose_patterns``
      -> ranked causes with evidence and fix

Every cause has a fixed id (``CAUSES``). A cause's score says how well it
explains the numbers: 0.9 and up when a quantitative test matched (a factor
that equals N, R or the micro-batch count; a difference that equals another
result), about 0.6 when the pattern is what the cause produces and nothing
rules it out, about 0.3 when it is possible but untested, 0 when the
numbers rule it out. ``unknown`` ranks first when no cause reaches 0.5:
the tool then says it cannot explain the numbers, rather than guessing.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gradparity.commands.diagnose_patterns import count_like, count_text, cumulative, cumulative_table, reweighted
from gradparity.commands.diagnose_report import RecordedRun, recorded_run
from gradparity.compare.pairs import connected_components
from gradparity.compare.tolerance import (NARROW_FORMATS, UNIT_ROUNDOFF, factor_bound, gradient_tolerance,
                                          narrow_rounding)
from gradparity.errors import ConfigError

#: The fixed vocabulary of causes: id -> (what it is, the fix).
CAUSES: dict[str, tuple[str, str]] = {
    "clean": ("every pair agrees within the rounding of its dtype: nothing differs but the order of additions",
              "nothing to fix"),
    "short_last_batch": ("averaging over batches when the last batch is shorter: the mean of batch means "
                         "weights the last batch's examples more than the others",
                         "average over examples (sum of per-batch sums / number of examples), weight each batch "
                         "mean by its size, or drop the last batch (drop_last=True)"),
    "unzeroed_gradients": ("gradients accumulate into .grad (or carried-over state) between backward passes: "
                           "reading the accumulator after each example counts early examples again",
                           "zero the gradients before every backward pass whose result you read "
                           "(optimizer.zero_grad() / model.zero_grad(), or torch.autograd.grad, jax.grad, "
                           "tape.gradient, which return fresh gradients)"),
    "missing_normalization": ("a 1/N is missing: a summed loss (or summed per-example gradients) used where a "
                              "mean was meant; that result is N times the others",
                              "divide the summed gradient by N, or use the mean reduction (and, for SGD, scale "
                              "the learning rate with the convention you keep)"),
    "double_normalization": ("a 1/N is applied twice: a mean-reduced loss divided by N again; that result is "
                             "N times smaller than the others",
                             "divide once: either reduction='mean' or a sum divided by N, not both"),
    "dropout_train_mode": ("dropout in training mode: each forward pass draws another mask, so methods with "
                           "their own forward passes (one example at a time) see other networks",
                           "compare in eval mode (model.eval(), training=False, deterministic=True), or share "
                           "one forward pass (and one mask) between the methods"),
    "batchnorm_train_mode": ("batch normalization in training mode: the statistics come from the batch, so "
                             "an example alone (one-by-one) is normalized differently, and a batch of one has "
                             "no variance",
                             "compare in eval mode (running statistics), or use a normalization that does not "
                             "mix examples (LayerNorm, GroupNorm)"),
    "reduced_precision": ("reduced precision (float16/bfloat16 autocast, TF32 matmuls, float32 against "
                          "float64): results that add in another order differ at the rounding level of the "
                          "narrowest format they were computed in, beyond their dtype's",
                          "compare in float32 with TF32 off (torch.backends.cuda.matmul.allow_tf32 = False, "
                          "jax_default_matmul_precision='highest') or in float64, and hold each pair to its "
                          "dtype's rounding bound"),
    "accumulation_normalization": ("gradient accumulation normalized per micro-batch: the sum (or mean) of "
                                   "micro-batch means differs from the mean over the whole batch by the number "
                                   "of micro-batches, or, with padded tokens, by each micro-batch's token count",
                                   "divide every micro-batch's summed loss by the number of items (tokens) in "
                                   "the whole batch (transformers' num_items_in_batch), or average micro-batch "
                                   "means weighted by their counts; optax.MultiSteps and Keras "
                                   "gradient_accumulation_steps average micro-batch means"),
    "weighted_mean_mismatch": ("two weighted means divide by different things (÷ Σ w[y] for a class-weighted "
                               "mean, ÷ N for Keras' sum_over_batch_size with sample weights): proportional on "
                               "a batch, with a factor that changes from batch to batch",
                               "choose the divisor explicitly (gradparity compare-losses shows each "
                               "framework's); Keras: reduction='mean_with_sample_weight' divides by Σ weights"),
    "data_parallel_average": ("data-parallel reduction over R replicas: an engine that averages the replicas' "
                              "gradients (DDP) makes a summed loss R times smaller, one that sums them "
                              "(MirroredStrategy, psum, the gradient inside shard_map) makes per-replica means R "
                              "times larger, and uneven local batches weigh the examples unequally",
                              "use the reduction the engine expects: under DDP a mean on equal shards, or scale a "
                              "summed loss by R; under a summing engine divide by the global batch "
                              "(tf.nn.compute_average_loss; in JAX pmean a per-shard mean with jax.grad outside "
                              "shard_map); gradparity run --data-parallel R measures each engine's factor"),
    "grad_not_zeroed_between_methods": (
        "gradients accumulate across the methods being compared: no zero_grad between them, so each result "
        "holds the results before it (result k = result k-1 + method k's own gradient)",
        "zero the gradients before each method's backward pass (optimizer.zero_grad() / model.zero_grad(), or "
        "compute each with torch.autograd.grad, jax.grad or tape.gradient, which return fresh gradients); with "
        "gradient accumulation, reset the accumulators between the methods"),
    "port_difference": ("a port computes another function than its source: a layer's setting differs "
                        "(an epsilon, an approximation, padding, a layout, a missing bias), not the reduction",
                        "make the port's layer compute what the source's does (gradparity check names the "
                        "layer and, where the captured arrays show it, what to change)"),
    "unknown": ("no known cause explains these numbers", "look for a difference gradparity does not model: "
                "another model, another batch, another loss, parameters changed between the methods"),
}

#: How a method label is read: the roles of its computation. 'loop': one backward pass per example into
#: an accumulator; 'per_example': averaged over examples (loops and vectorized per-example gradients);
#: 'reduced': one backward pass on a reduced batch loss; 'separate_forward': a forward pass per example.
_LOOP = ("none", "none_loop", "one_by_one", "onebyone", "loop", "single", "per_example")
_ROLE_WORDS = {
    "loop": _LOOP,
    "per_example": _LOOP + ("none_vectorized", "vectorized", "vmap"),
    "reduced": ("sum", "mean", "avg", "average", "sum_over_batch_size", "batch"),
    # vmap maps a forward pass of one example: per-example statistics and masks, like one at a time.
    "separate_forward": ("one_by_one", "onebyone", "single", "none_vectorized", "vectorized", "vmap"),
}
#: Labels of methods whose result is a mean-reduced loss's gradient.
_MEAN_WORDS = ("mean", "avg", "average", "sum_over_batch_size")
_INFO_KEYS = ("batch_size", "dataset_size", "dtype", "micro_batches", "replicas", "padding", "dropout",
              "batchnorm", "loss_reduction", "methods", "grad_scale")
#: Words in a label that say the result came from data-parallel training or from micro-batch accumulation
#: (matched against the label's words, split at anything that is not a letter or digit).
_DP_WORDS = ("ddp", "dp", "fsdp", "distributed", "parallel", "replica", "replicas", "mirrored", "pmap", "pmean",
             "psum", "allreduce", "gpus", "devices", "world")
_ACCUM_WORDS = ("accum", "accumulated", "accumulate", "accumulation", "micro", "microbatch", "microbatches",
                "multisteps")
#: The method words a label is read by (its own last path part, or what ``methods`` maps it to).
METHOD_WORDS = tuple(dict.fromkeys(w for words in _ROLE_WORDS.values() for w in words))


@dataclass
class Info:
    """What the user knows about how the numbers were made; every field optional."""

    batch_size: int | None = None
    dataset_size: int | None = None
    dtype: str | None = None
    micro_batches: int | None = None
    replicas: int | None = None
    #: Items (tokens) of the batch that are padding, ignored by the loss.
    padding: int | None = None
    dropout: bool | None = None
    batchnorm: bool | None = None
    loss_reduction: str | None = None
    #: {your label: a method word of METHOD_WORDS}: how to read labels gradparity does not know.
    methods: dict[str, str] | None = None
    #: The gradients' largest |entry|: the scale a table of absolute differences is judged at.
    grad_scale: float | None = None

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "Info":
        unknown = sorted(set(raw) - set(_INFO_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(_INFO_KEYS)}")
        out = cls()
        for key, value in raw.items():
            if value is None:
                continue
            if key in ("batch_size", "dataset_size", "micro_batches", "replicas", "padding"):
                least = 0 if key == "padding" else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise ConfigError(f"{where}: {key} must be an integer >= {least}, got {value!r}")
            elif key in ("dropout", "batchnorm"):
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
            elif key == "methods":
                if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in value.items()):
                    raise ConfigError(f"{where}: methods must map your labels to method words, e.g. "
                                      "{ full_batch = \"mean\", per_sample = \"none_loop\" }, got " + repr(value))
                bad = sorted(v for v in value.values() if _key(v) not in METHOD_WORDS)
                if bad:
                    raise ConfigError(f"{where}: methods maps to {', '.join(map(repr, bad))}, which is no method "
                                      f"word; known: {', '.join(METHOD_WORDS)}")
            elif key == "grad_scale":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                        math.isfinite(value) and value > 0):
                    raise ConfigError(f"{where}: grad_scale must be a positive number (the gradients' largest "
                                      f"|entry|), got {value!r}")
                value = float(value)
            elif key == "dtype":
                if value not in UNIT_ROUNDOFF:
                    raise ConfigError(f"{where}: dtype must be one of {', '.join(UNIT_ROUNDOFF)}, got {value!r}")
            elif not isinstance(value, str):
                raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
            setattr(out, key, value)
        if out.padding is not None and out.batch_size is not None and out.padding >= out.batch_size:
            raise ConfigError(f"{where}: padding {out.padding} leaves no valid item in a batch of {out.batch_size}")
        if out.dataset_size is not None and out.batch_size is not None and out.batch_size > out.dataset_size:
            raise ConfigError(f"{where}: batch_size {out.batch_size} is larger than dataset_size {out.dataset_size}")
        return out

    def merged(self, other: "Info") -> "Info":
        """``self`` with every field ``other`` sets (flags over the --info file)."""
        return Info(**{k: (getattr(other, k) if getattr(other, k) is not None else getattr(self, k))
                       for k in _INFO_KEYS})


@dataclass
class Observations:
    """The numbers to explain: labels, pairwise max |a - b|, and (when given) the gradients themselves.

    ``resolution``: for a printed table, half a unit of its last printed
    digit (a printed 0.0 means below it); None for exact numbers.
    """

    source: str
    labels: list[str]
    diffs: dict[tuple[str, str], float]
    grads: dict[str, dict[str, np.ndarray]] | None = None
    resolution: float | None = None
    info: Info = field(default_factory=Info)
    #: A table's optional columns: max|a - b| / max(max|a|, max|b|) and the ratio a / b, per pair.
    rel: dict[tuple[str, str], float] = field(default_factory=dict)
    ratios: dict[tuple[str, str], float] = field(default_factory=dict)
    #: What a report folder records about how its numbers were made (None for an npz or a table).
    recorded: RecordedRun | None = None


@dataclass(frozen=True)
class PairPattern:
    a: str
    b: str
    max_abs: float
    kind: str          # zero | rounding | factor | large | unresolved_zero
    rel: float | None = None
    factor: float | None = None


@dataclass
class Cause:
    id: str
    score: float
    evidence: list[str]
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Diagnosis:
    observations: Observations
    pairs: list[PairPattern]
    clusters: list[list[str]]
    causes: list[Cause]
    rtol: float | None
    notes: list[str] = field(default_factory=list)
    #: How a table's absolute differences were made relative, in words (None for gradients).
    table_scale: str | None = None

    @property
    def top(self) -> Cause:
        return self.causes[0]

    def to_dict(self) -> dict:
        obs = self.observations
        return {
            "source": obs.source, "labels": obs.labels, "labels_read": label_readings(obs),
            "info": asdict(obs.info),
            "resolution": obs.resolution, "rtol": self.rtol, "table_scale": self.table_scale,
            "recorded": None if obs.recorded is None else {
                "kind": obs.recorded.kind, "dtype": obs.recorded.dtype, "rtol": obs.recorded.rtol,
                "settings": obs.recorded.settings_text(), "narrower_than_dtype": obs.recorded.narrow(),
                "localized": [{"backend": loc.get("backend"), "source": loc.get("source"),
                               "layer": loc.get("first_layer") or loc.get("parameter_layer"),
                               "suggestion": loc.get("suggestion")} for loc in obs.recorded.localized()]},
            "pairs": [{k: v for k, v in asdict(p).items() if v is not None} for p in self.pairs],
            "clusters": self.clusters,
            "causes": [c.to_dict() for c in self.causes],
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------------- inputs


_SEED_LINE = re.compile(r"discrepancy\s+between\s+(?:reduction\s*=\s*)?(?P<a>.+?)\s+and\s+"
                        r"(?:reduction\s*=\s*)?(?P<b>.+?)\s*[:=]\s*(?P<v>[-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*$",
                        re.IGNORECASE)


def _decimals(text: str) -> int | None:
    """Decimal places of a printed number ('0.0316' -> 4), None in exponent notation."""
    if "e" in text.lower():
        return None
    return len(text.split(".", 1)[1]) if "." in text else 0


def _number(text: str, where: str, what: str = "a max |a - b|") -> float:
    """A table cell as a finite non-negative float; ConfigError naming ``where`` and ``what`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: {what} must be a finite non-negative number, got {text!r}")
    return value


#: A table's optional columns after a, b, max_abs: the pair's relative difference and the ratio a / b.
TABLE_COLUMNS = ("max_rel", "ratio")


def _table_rows(text: str, name: str) -> list[tuple[str, str, str, dict[str, str]]]:
    """(a, b, printed max_abs, {optional column: printed value}) rows of a table: JSON, CSV with a header
    a,b,max_abs (then optionally max_rel and/or ratio), or the seed's lines."""
    stripped = text.strip()
    if stripped[:1] in "[{":
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name} is not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{name} is not valid JSON: nested too deeply") from None
        rows = doc.get("rows") if isinstance(doc, dict) else doc
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"a", "b", "max_abs"} <= set(r)
                                                 for r in rows):
            raise ConfigError(f"{name}: JSON must be a list of {{\"a\", \"b\", \"max_abs\"}} rows (optionally "
                              "\"max_rel\", \"ratio\"), or {\"rows\": [...]}")

        def text_of(v):
            return v if isinstance(v, str) else repr(v)

        return [(str(r["a"]), str(r["b"]), text_of(r["max_abs"]),
                 {c: text_of(r[c]) for c in TABLE_COLUMNS if r.get(c) is not None}) for r in rows]
    lines = [ln for ln in stripped.splitlines() if ln.strip()]
    header = [c.strip().lower() for c in lines[0].split(",")] if lines else []
    if header[:3] == ["a", "b", "max_abs"]:
        extra = header[3:]
        bad = [c for c in extra if c not in TABLE_COLUMNS] + [c for c in set(extra) if extra.count(c) > 1]
        if bad:
            raise ConfigError(f"{name}: unknown or repeated column(s) {', '.join(map(repr, sorted(set(bad))))} after "
                              f"a,b,max_abs; optional columns: {', '.join(TABLE_COLUMNS)}")
        reader = csv.reader(io.StringIO("\n".join(lines[1:])))
        rows = []
        for i, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ConfigError(f"{name} line {i}: expected {', '.join(header)}, got {row!r}")
            cells = [c.strip() for c in row]
            rows.append((cells[0], cells[1], cells[2], {c: v for c, v in zip(extra, cells[3:]) if v}))
        return rows
    rows = []
    for line in lines:
        m = _SEED_LINE.search(line)
        if m:
            rows.append((m["a"].strip(), m["b"].strip(), m["v"], {}))
    if not rows:
        raise ConfigError(f"{name}: no pairwise differences found; write CSV rows 'a,b,max_abs' under that "
                          "header, JSON rows, or lines like 'Maximum discrepancy between reduction = none and "
                          "sum: 0.0316'")
    return rows


def read_table(text: str, name: str = "the table") -> Observations:
    """Observations from a table of pairwise max |a - b| (see ``_table_rows`` for the accepted forms)."""
    rows = _table_rows(text, name)
    if not rows:  # a CSV header alone, a JSON [] or {"rows": []}: nothing to diagnose
        raise ConfigError(f"{name}: the table has no rows; give at least one pair's max |a - b|")
    diffs: dict[tuple[str, str], float] = {}
    rel: dict[tuple[str, str], float] = {}
    ratios: dict[tuple[str, str], float] = {}
    decimals = []
    for a, b, v, extra in rows:
        if a == b:
            raise ConfigError(f"{name}: a row compares {a!r} with itself")
        diffs[(a, b)] = _number(v, f"{name}, row {a} / {b}")
        decimals.append(_decimals(v.strip()))
        if "max_rel" in extra:
            rel[(a, b)] = _number(extra["max_rel"], f"{name}, row {a} / {b}", "max_rel")
        if "ratio" in extra:
            r = _number(extra["ratio"], f"{name}, row {a} / {b}", "ratio")
            if r == 0:
                raise ConfigError(f"{name}, row {a} / {b}: ratio 0 (a / b) says a is zero; give a positive ratio")
            ratios[(a, b)] = r
    labels = list(dict.fromkeys(x for pair in diffs for x in pair))
    # A table printed to d decimals reads 0.0 for anything below half a unit of its last digit.
    resolution = None
    if decimals and all(d is not None for d in decimals):
        resolution = 0.5 * 10.0 ** -max(decimals)
    return Observations(name, labels, diffs, resolution=resolution, rel=rel, ratios=ratios)


def read_gradients(path: str, label_parts: int = 1, label: str = "gradients file") -> Observations:
    """Observations from an npz of gradients keyed METHOD/PARAM: the first ``label_parts`` parts of a key
    name the result (1 for a user's METHOD/PARAM, whose PARAM may hold '/' as Keras paths do; 2 for a
    gradparity report's BACKEND/METHOD/PARAM), the rest the parameter. ``label`` names the file in errors."""
    from gradparity.experiment.files import read_npz, where

    arrays = {}
    for key, value in read_npz(path, label, hint="an .npz of arrays keyed METHOD/PARAM").items():
        if value.dtype.kind not in "fiub":
            raise ConfigError(f"{where(path, label)}: {key!r} has dtype {value.dtype}; gradients are real numbers")
        arrays[key] = np.asarray(value, dtype=np.float64)
    grads: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        parts = key.split("/")
        if len(parts) <= label_parts:
            raise ConfigError(f"{path}: key {key!r} is not METHOD/PARAM (e.g. 'sum/fc1.weight')")
        method, param = "/".join(parts[:label_parts]), "/".join(parts[label_parts:])
        grads.setdefault(method, {})[param] = value
    return from_gradients(grads, str(path))


def from_gradients(grads: dict[str, dict[str, np.ndarray]], source: str) -> Observations:
    """Observations from gradients per method; ConfigError where the methods' parameters do not line up."""
    if len(grads) < 2:
        raise ConfigError(f"{source}: needs at least two methods to compare, got {list(grads)}")
    labels = list(grads)
    first = grads[labels[0]]
    for label in labels[1:]:
        if set(grads[label]) != set(first):
            raise ConfigError(f"{source}: {label!r} has parameters {sorted(grads[label])}, {labels[0]!r} has "
                              f"{sorted(first)}")
        bad = [p for p in first if grads[label][p].shape != first[p].shape]
        if bad:
            raise ConfigError(f"{source}: {bad[0]!r} is {grads[label][bad[0]].shape} in {label!r} and "
                              f"{first[bad[0]].shape} in {labels[0]!r}")
    for label, params in grads.items():
        for p, g in params.items():
            if not np.all(np.isfinite(g)):
                raise ConfigError(f"{source}: {label}/{p} holds NaN or inf; diagnose compares finite gradients")
    diffs = {(a, b): max(float(np.max(np.abs(grads[a][p] - grads[b][p]), initial=0.0)) for p in first)
             for i, a in enumerate(labels) for b in labels[i + 1:]}
    return Observations(source, labels, diffs, grads=grads)


def read_report(folder: str) -> tuple[Observations, Info]:
    """Observations from a gradparity report folder (report.json + gradients.npz), with what it records."""
    from gradparity.experiment.files import read_json, where

    path = Path(folder)
    report = path / "report.json"
    if not report.exists() and not report.is_symlink():
        raise ConfigError(f"{folder!r} holds no report.json: give a gradparity report folder")
    doc = read_json(report, "report file")
    if not isinstance(doc, dict):
        raise ConfigError(f"{where(report, 'report file')} is not a gradparity report: it holds a JSON "
                          f"{type(doc).__name__}, not an object")
    obs = read_gradients(str(path / "gradients.npz"), label_parts=2, label="report gradients file")
    obs.source = f"{'check report' if doc.get('schema') == 'gradparity.check/1' else 'report'} {folder}"
    obs.recorded, recorded = recorded_run(doc, where(report, "report file"))
    return obs, Info.from_dict(recorded, where(report, "report file"))


def read_info(path: str | None) -> Info:
    """The --info TOML (every key optional)."""
    if path is None:
        return Info()
    from gradparity.experiment.files import read_toml

    return Info.from_dict(read_toml(path, "--info"), f"--info {path!r}")


# ------------------------------------------------------------------------------------------ analysis


def _own(label: str) -> str:
    """A label's last path part ('torch/one_by_one' -> 'one_by_one'), lower case, '_' for spaces and dashes."""
    return re.sub(r"[\s\-]+", "_", label.rsplit("/", 1)[-1].strip().lower())


def _mapped_name(label: str, methods: dict[str, str] | None) -> str | None:
    """The name ``methods`` maps the label by (the label, its last path part, or that part's ``_own`` form)."""
    return next((n for n in (label, label.rsplit("/", 1)[-1], _own(label)) if methods and n in methods), None)


def _key(label: str, methods: dict[str, str] | None = None) -> str:
    """A method label's ``_own`` name; or the method word ``methods`` maps the label (or its last part) to."""
    name = _mapped_name(label, methods)
    return _own(label) if name is None else _key(methods[name])


def _roles(label: str, methods: dict[str, str] | None = None) -> set[str]:
    """The roles a method label names (see _ROLE_WORDS), from its last path part ('torch/one_by_one') or the
    word ``methods`` maps it to."""
    key = _key(label, methods)
    return {role for role, words in _ROLE_WORDS.items() if key in words}


#: What a label "single" is read as beside data-parallel results: one device (no method role), not one example
#: at a time; and what a label naming data-parallel training, and no method, is read as.
ONE_DEVICE, DATA_PARALLEL = "one_device", "data_parallel"


def reading_methods(obs: "Observations") -> dict[str, str] | None:
    """The label -> method word mapping every label is read by: the user's ``methods``; and, where the results
    are data-parallel (``replicas`` > 1, or a label naming data-parallel training), each label "single" the user
    did not map read as ONE_DEVICE, which has no method role."""
    methods = dict(obs.info.methods or {})
    if (obs.info.replicas or 0) > 1 or any(_names(x, _DP_WORDS) for x in obs.labels):
        methods.update({x: ONE_DEVICE for x in obs.labels
                        if _own(x) == "single" and _mapped_name(x, obs.info.methods) is None})
    return methods or None


def label_readings(obs: "Observations") -> list[dict]:
    """How each label was read: {"label", "read_as" (a method word, ONE_DEVICE, DATA_PARALLEL or None),
    "roles", "how"}."""
    methods = reading_methods(obs)
    out = []
    for label in obs.labels:
        word = _key(label, methods)
        roles = sorted(_roles(label, methods))
        if word == ONE_DEVICE and _mapped_name(label, obs.info.methods) is None:
            read_as, how = ONE_DEVICE, "its name, beside data-parallel results"
        elif word != _key(label):
            read_as, how = (word if roles else None), "your mapping"
        elif roles:
            read_as, how = word, "its name"
        elif _names(label, _DP_WORDS):
            read_as, how = DATA_PARALLEL, "its name"
        else:
            read_as, how = None, "not understood"
        out.append({"label": label, "read_as": read_as, "roles": roles, "how": how})
    return out


def _rtol(info: Info, n_terms: int) -> float:
    """The bound for 'rounding-sized': gradparity's agreement model (SAFETY u sqrt(K) L, L = 2) for float32
    and float64, the narrow bound for tf32/float16/bfloat16."""
    dtype = info.dtype or "float32"
    if dtype in NARROW_FORMATS:
        return narrow_rounding(dtype, n_terms)
    return gradient_tolerance(n_terms, 2).rtol(UNIT_ROUNDOFF[dtype])


def _flat(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([params[k].ravel() for k in sorted(params)])


#: The scale a table of absolute differences is judged at when nothing says the gradients' size: entries of
#: order 1 (said in the diagnosis, with the smallest scale at which its verdict holds).
ASSUMED_SCALE = 1.0


def _table_pair(obs: Observations, a: str, b: str, d: float, rtol: float) -> PairPattern:
    """A table's pair: zero, rounding-sized or large by its relative size (its max_rel column, or max_abs over
    the gradients' scale: --grad-scale, else ``ASSUMED_SCALE``); a factor only where a ratio column says so."""
    if d == 0.0:
        return PairPattern(a, b, d, "unresolved_zero" if obs.resolution else "zero", 0.0 if obs.rel else None)
    rel = obs.rel.get((a, b))
    if rel is None and obs.info.grad_scale:
        rel = d / obs.info.grad_scale
    ratio = obs.ratios.get((a, b))
    if ratio is not None and abs(ratio - 1.0) > factor_bound(rtol):
        # a = r b gives max|a - b| / max(max|a|, max|b|) = |r - 1| / max(r, 1): a max_rel that says otherwise is
        # no pure factor.
        if rel is None or abs(rel - abs(ratio - 1.0) / max(ratio, 1.0)) <= max(factor_bound(rtol), 1e-3 * rel):
            return PairPattern(a, b, d, "factor", rel, ratio)
    judged = rel if rel is not None else d / ASSUMED_SCALE
    return PairPattern(a, b, d, "rounding" if judged <= rtol else "large", rel)


def classify_pairs(obs: Observations, rtol: float | None,
                   flat: dict[str, np.ndarray] | None = None) -> list[PairPattern]:
    """Each pair as exact zero, rounding-sized, a constant factor or large; a table's pairs by ``_table_pair``.

    ``flat``: each result's gradients as one vector (``_flat``), when already computed. A fitted factor
    counts only when it is distinguishable from 1 (a difference beyond rounding but no rescaling is large).
    """
    if obs.grads is not None and flat is None:
        flat = {label: _flat(g) for label, g in obs.grads.items()}
    out = []
    for (a, b), d in obs.diffs.items():
        if obs.grads is None:
            out.append(_table_pair(obs, a, b, d, rtol if rtol is not None else _rtol(obs.info, 256)))
            continue
        ga, gb = flat[a], flat[b]
        scale = max(float(np.max(np.abs(ga), initial=0.0)), float(np.max(np.abs(gb), initial=0.0)))
        rel = 0.0 if scale == 0 else d / scale
        if d == 0.0:
            out.append(PairPattern(a, b, d, "zero", rel))
            continue
        if rel <= rtol:
            out.append(PairPattern(a, b, d, "rounding", rel))
            continue
        denom = float(gb @ gb)
        r = float(ga @ gb) / denom if denom > 0 else math.inf
        if math.isfinite(r) and r != 0 and abs(r - 1.0) > factor_bound(rtol):
            resid = float(np.max(np.abs(ga - r * gb))) / max(float(np.max(np.abs(ga))), 1e-300)
            if resid <= factor_bound(rtol):
                out.append(PairPattern(a, b, d, "factor", rel, r))
                continue
        out.append(PairPattern(a, b, d, "large", rel))
    return out


def _clusters(labels: list[str], pairs: list[PairPattern]) -> list[list[str]]:
    same = ((p.a, p.b) for p in pairs if p.kind in ("zero", "rounding", "unresolved_zero"))
    return sorted((sorted(c, key=labels.index) for c in connected_components(labels, same)),
                  key=lambda c: (-len(c), labels.index(c[0])))


def _near(x: float, target: float, rel: float = 1e-3) -> bool:
    return target > 0 and abs(x - target) <= rel * target


def _g(x: float) -> str:
    return f"{x:.3g}"


class _Analysis:
    """The facts every signature test reads, computed once."""

    def __init__(self, obs: Observations):
        self.obs = obs
        self.info = obs.info
        #: How labels are read (``reading_methods``): the user's mapping and what the results' context implies.
        self.methods = reading_methods(obs)
        n_terms = obs.info.batch_size or 256
        rec = obs.recorded
        # A report's own bound for its dtype (its K and L), so that diagnose counts the pairs as the run did.
        self.rtol = (rec.rtol if rec is not None and rec.rtol and (obs.info.dtype or rec.dtype) == rec.dtype
                     else _rtol(obs.info, n_terms))
        #: Each result's gradients as one vector, for the tests that project or combine results.
        self.flat = {label: _flat(g) for label, g in obs.grads.items()} if obs.grads is not None else {}
        self.pairs = classify_pairs(obs, self.rtol, self.flat)
        self.clusters = _clusters(obs.labels, self.pairs)
        self.majority = self.clusters[0] if self.clusters else []
        self.factors = [p for p in self.pairs if p.kind == "factor"]
        self.large = [p for p in self.pairs if p.kind in ("large", "factor")]
        self.zeros = [p for p in self.pairs if p.kind in ("zero", "unresolved_zero")]
        #: Whether a constant factor between two results can be seen: the gradients, or a table's ratio column.
        self.sees_factors = obs.grads is not None or bool(obs.ratios)
        #: Whether a table's pairs were judged at an assumed scale (absolute differences, no magnitude given).
        self.scale_assumed = obs.grads is None and any(p.max_abs > 0 and p.rel is None for p in self.pairs)
        #: Each result holding the ones before it, in the saved order (gradients), or a table's max|g| step.
        self.cumulative = (cumulative(obs.labels, self.flat, factor_bound(self.rtol)) if obs.grads is not None
                           and self.large else None)
        self.cumulative_step = (cumulative_table(obs.labels, obs.diffs, obs.resolution)
                                if obs.grads is None and self.large else None)

    def tally(self) -> str:
        """How many pairs differ and how many agree, exactly ("16 of 28 pairs differ beyond rounding; 12 agree:
        2 exactly, 10 within rounding")."""
        n = len(self.pairs)
        counts = {k: sum(p.kind == k for p in self.pairs) for k in ("zero", "unresolved_zero", "rounding")}
        agree = sum(counts.values())
        parts = [f"{counts['zero']} exactly" if counts["zero"] else "",
                 f"{counts['unresolved_zero']} to the printed precision" if counts["unresolved_zero"] else "",
                 f"{counts['rounding']} within rounding" if counts["rounding"] else ""]
        said = ", ".join(x for x in parts if x)
        head = f"{len(self.large)} of {n} pairs differ beyond rounding"
        return head + (f"; {agree} agree{'s' if agree == 1 else ''} ({said})" if agree else "")

    def scale_words(self) -> str:
        """How a table's absolute differences were turned into relative ones, in words."""
        if self.obs.grads is not None:
            return ""
        if self.obs.rel:
            return "relative differences from the table's max_rel column"
        if self.info.grad_scale:
            return f"relative to the gradients' largest |entry| {_g(self.info.grad_scale)} (--grad-scale)"
        return (f"assuming gradient entries of order {ASSUMED_SCALE:g} (a table of absolute differences has no "
                "magnitudes; give --grad-scale or a max_rel column to judge for sure)")

    def cluster_of(self, label: str) -> int:
        return next(i for i, c in enumerate(self.clusters) if label in c)

    def split(self, role: str, other: str | None = None) -> tuple[list[str], list[str]] | None:
        """(the cluster whose methods all have ``role``, the other) when the results form two clusters
        split that way (the other's methods all lack ``role``, or all have ``other``), else None."""
        if len(self.clusters) != 2:
            return None
        for mine, theirs in (self.clusters, self.clusters[::-1]):
            m = self.methods
            if all(role in _roles(x, m) for x in mine) and all(
                    (other in _roles(x, m)) if other else (role not in _roles(x, m)) for x in theirs):
                return mine, theirs
        return None

    def loop_split(self) -> tuple[list[str], list[str], str] | None:
        """The per-example loops against every other method: (loops, others, in words) or None."""
        found = self.split("loop")
        if found is None:
            return None
        loops, others = found
        return loops, others, (f"the methods that run one backward pass per example into an accumulator "
                               f"({', '.join(loops)}) agree with each other and differ from the others "
                               f"({', '.join(others)})")

    def describe_zero(self, p: PairPattern) -> str:
        if p.kind == "unresolved_zero":
            return f"{p.a} = {p.b} to the printed precision (|a - b| < {self.obs.resolution:g})"
        return f"{p.a} = {p.b} exactly (bit for bit)"

    def odd_one(self, p: PairPattern) -> tuple[str, float] | None:
        """For a factor pair with one side in the majority cluster: (the other label, its factor over it)."""
        if len(self.majority) < 2:
            return None
        if p.a in self.majority and p.b not in self.majority:
            return p.b, 1.0 / p.factor
        if p.b in self.majority and p.a not in self.majority:
            return p.a, p.factor
        return None


def _test_clean(an: _Analysis) -> Cause:
    # No large pair but several clusters: a table whose pairs do not link every result, each pair given agreeing.
    if len(an.clusters) == 1 or not an.large:
        if an.obs.grads is not None:
            worst = max((p.rel or 0.0 for p in an.pairs), default=0.0)
            ev = [f"all {len(an.pairs)} pairs agree within rounding: largest max|a-b|/max|a| {_g(worst)} "
                  f"<= bound {_g(an.rtol)} ({an.info.dtype or 'float32'})"]
            # Within a narrow format's rounding but not float32's: no bug, and reduced precision is the reason.
            narrow = (an.info.dtype in NARROW_FORMATS
                      and worst > _rtol(Info(dtype="float32"), an.info.batch_size or 256))
            return Cause("clean", 0.9 if narrow else 1.0, ev, CAUSES["clean"][1])
        if not any(p.kind == "rounding" for p in an.pairs):
            res = f" (< {an.obs.resolution:g}, the printed precision)" if an.obs.resolution else ""
            return Cause("clean", 0.9, [f"every pair reads 0{res}: no pair differs at the printed precision"],
                         CAUSES["clean"][1])
        return _table_clean(an)
    worst = max(an.large, key=lambda p: p.max_abs)
    bound = f" (bound {_g(an.rtol)} relative)" if an.rtol else ""
    return Cause("clean", 0.0, [f"{worst.a} vs {worst.b}: max|a-b| {_g(worst.max_abs)} is not rounding{bound}"],
                 CAUSES["clean"][1])


def _table_clean(an: _Analysis) -> Cause:
    """A table whose non-zero pairs are all rounding-sized: clean, as sure as its scale is known."""
    dtype = an.info.dtype or "float32"
    told = "" if an.info.dtype else " (no --dtype given: judged as float32)"
    worst = max(an.pairs, key=lambda p: p.max_abs)
    head = f"all {len(an.pairs)} pairs agree to {dtype} rounding{told}; nothing to diagnose"
    if not an.scale_assumed:
        rel = max(p.rel or 0.0 for p in an.pairs)
        return Cause("clean", 0.95, [head, f"largest relative difference {_g(rel)} <= {dtype}'s bound {_g(an.rtol)} "
                                           f"({an.scale_words()})"], CAUSES["clean"][1])
    least = worst.max_abs / an.rtol
    return Cause("clean", 0.8, [
        head,
        f"the table holds absolute differences only: the largest, {_g(worst.max_abs)} ({worst.a} vs {worst.b}), is "
        f"within {dtype}'s rounding bound {_g(an.rtol)} relative whenever the gradients' largest entries are at least "
        f"{_g(least)} (= {_g(worst.max_abs)} / {_g(an.rtol)}); judged {an.scale_words()}"], CAUSES["clean"][1])


#: What a table of absolute differences cannot show.
NO_FACTOR_IN_TABLE = ("a factor between two results cannot be read from absolute differences (max |a - b|): give "
                      "the gradients (npz), or a ratio column (a / b) in the table")


def _test_normalization(an: _Analysis) -> list[Cause]:
    """A factor N (or 1/N) between one result and the rest: a missing or doubled 1/N."""
    n = an.info.batch_size
    missing, double = [], []
    for p in an.factors:
        odd = an.odd_one(p)
        if odd is None:
            continue
        label, r = odd
        if n and _near(r, n):
            missing.append(f"{label} = {_g(r)} x the others ({', '.join(an.majority)}): the batch size N = {n}")
        elif n and _near(r, 1.0 / n):
            double.append(f"{label} = 1/{_g(1 / r)} x the others ({', '.join(an.majority)}): 1/N, N = {n}")
        elif not n and r >= 2 and _near(r, round(r)):
            missing.append(f"{label} = {_g(r)} x the others: an integer factor, the batch size if N = "
                           f"{round(r)} (give --batch-size to test)")
        elif not n and r <= 0.5 and _near(1 / r, round(1 / r)):
            double.append(f"{label} = 1/{_g(1 / r)} x the others: 1/N if N = {round(1 / r)} "
                          "(give --batch-size to test)")
    out = []
    for cid, ev in (("missing_normalization", missing), ("double_normalization", double)):
        if ev:
            score = 0.95 if n else 0.55
        else:
            score = 0.0 if an.sees_factors or not an.large else 0.2
            ev = (["no pair differs beyond rounding"] if not an.large else
                  ["no result is a constant factor N or 1/N of the others"] if an.sees_factors else
                  [NO_FACTOR_IN_TABLE])
        out.append(Cause(cid, score, ev, CAUSES[cid][1]))
    return out


def _label_words(label: str) -> set[str]:
    """A label's words, lower case, split at anything that is not a letter or a digit ('ddp_2gpus' -> ddp, 2gpus)."""
    return {w for w in re.split(r"[^a-z0-9]+", label.lower()) if w}


def _names(label: str, words: tuple[str, ...]) -> bool:
    """Whether one of ``words`` is among the label's words (a prefix match: 'accum' finds 'accum4')."""
    return any(w.startswith(h) for w in _label_words(label) for h in words)


def _hinted(an: _Analysis, words: tuple[str, ...]) -> list[str]:
    """The labels that name one of ``words`` (``_names``)."""
    return [x for x in an.obs.labels if _names(x, words)]


def _oriented(p: PairPattern) -> tuple[str, str, float]:
    """(the larger result, the smaller, the factor >= 1 between them) of a factor pair."""
    return (p.a, p.b, p.factor) if p.factor >= 1 else (p.b, p.a, 1 / p.factor)


def _integer_factors(an: _Analysis) -> list[tuple[str, str, int]]:
    """(larger, smaller, f) for every factor pair whose factor is an integer f >= 2 other than the batch size."""
    out = []
    for p in an.factors:
        hi, lo, f = _oriented(p)
        k = count_like(f)
        if k is not None and k >= 2 and not (an.info.batch_size and k == an.info.batch_size):
            out.append((hi, lo, k))
    return out


def _no_factor(an: _Analysis, cid: str, k: int, what: str) -> Cause:
    """A count was given but no pair shows it (or cannot: a table of absolute differences)."""
    if not an.sees_factors:
        return Cause(cid, 0.3, [f"{k} {what} were used; {NO_FACTOR_IN_TABLE}"], CAUSES[cid][1])
    return Cause(cid, 0.35, [f"{k} {what} were used, but no pair differs by a factor {k}; with padded tokens or "
                             "uneven splits the effect is not a constant factor"], CAUSES[cid][1])


def _projection(an: _Analysis, k: int, what: str, cid: str) -> Cause | None:
    """Uneven splits (N not a multiple of k) make the factor k inexact: a projection ratio within 15% of k."""
    if an.obs.grads is None:
        return None
    flat = an.flat
    for p in an.large:
        a, b = flat[p.a], flat[p.b]
        for r, hi, lo in ((float(a @ b) / max(float(b @ b), 1e-300), p.a, p.b),
                          (float(a @ b) / max(float(a @ a), 1e-300), p.b, p.a)):
            if abs(r - k) <= 0.15 * k:
                return Cause(cid, 0.8, [f"{hi} projects onto {lo} with ratio {_g(r)}, within 15% of the {k} {what}: "
                                        f"the factor {k} made inexact by uneven splits (N not a multiple of {k})"],
                             CAUSES[cid][1])
    return None


def _reweighting(an: _Analysis, k: int) -> tuple[str, str, float, float] | None:
    """(result, reference, ratio, cosine) for a pair beyond rounding, no factor, whose results are the same
    examples averaged with other weights (``reweighted``), or None."""
    if an.obs.grads is None:
        return None
    for p in an.large:
        if p.kind != "large":
            continue
        # The result apart from the largest group of agreeing results is the one re-weighted.
        order = ((p.a, p.b), (p.b, p.a)) if p.b in an.majority else ((p.b, p.a), (p.a, p.b))
        for hi, lo in order:
            found = reweighted(an.flat[hi], an.flat[lo], k)
            if found:
                return hi, lo, *found
    return None


def _unless_cumulative(an: _Analysis, cause: Cause) -> Cause:
    """An integer factor no count was given for, ranked down where the results grow in their saved order (three or
    more): there the factors are the numbers of gradients each result holds."""
    if (an.cumulative is not None and len(an.cumulative.labels) >= 3) or an.cumulative_step is not None:
        return Cause(cause.id, min(cause.score, 0.2), cause.evidence + [
            "but the results grow in the order they were saved (each holds the ones before): the factors count "
            "the gradients each result holds"], cause.fix)
    return cause


def _test_data_parallel(an: _Analysis) -> Cause:
    """A factor of R or N/R between a data-parallel result and a single-device one (DDP averages replicas)."""
    cid = "data_parallel_average"
    r, n = an.info.replicas, an.info.batch_size
    fix = CAUSES[cid][1]
    if r and r > 1:
        hits = []
        for p in an.factors:
            hi, lo, f = _oriented(p)
            if _near(f, r):
                hits.append(f"{hi} = {_g(f)} x {lo}: the R = {r} replicas. " + _replica_direction(hi, lo))
            elif n and _near(f, n / r):
                hits.append(f"{hi} = {_g(f)} x {lo}: N/R = {n}/{r}, the local batch size. A summed local loss averaged "
                            f"over R replicas is (sum over the batch) / R, a mean on one device is (sum) / N: {hi} is "
                            f"the data-parallel summed loss, {lo} the single-device mean")
        if hits:
            return Cause(cid, 0.95, hits, fix)
        found = _projection(an, r, "replicas", cid)
        if found:
            return found
        ints = _integer_factors(an)
        if ints and not n:
            hi, lo, f = ints[0]
            return Cause(cid, 0.6, [f"{hi} = {f} x {lo}: not R = {r}, but N/R if the global batch is N = {f * r} "
                                    f"(a summed local loss under DDP against a single-device mean); give --batch-size "
                                    "to test it"], fix)
        rew = _reweighting(an, r)
        if rew and n and n % r:
            hi, lo, ratio, cos = rew
            return Cause(cid, 0.65, [f"{hi} projects onto {lo} with ratio {_g(ratio)} (cosine {cos:.4f}) but is no "
                                     f"multiple of it: N = {n} on R = {r} replicas gives unequal shards, and averaging "
                                     "their means weighs the examples of a smaller shard more (DistributedSampler "
                                     "pads the shards by repeating examples instead)"], fix)
        return _no_factor(an, cid, r, "replicas") if an.large else Cause(cid, 0.0, ["no pair differs"], fix)
    ints = _integer_factors(an)
    if ints:
        hi, lo, f = ints[0]
        cands = [f"R = {f} (a summed loss on both sides, DDP averaging the replicas; or local means summed over the "
                 "replicas, as MirroredStrategy and psum do)"]
        if n and n % f == 0 and n // f >= 2:
            cands.append(f"R = N/{f} = {n // f} (a summed local loss under DDP against a mean on one device)")
        elif not n:
            cands.append(f"R = N/{f} (a summed local loss under DDP against a mean on one device, N the global batch; "
                         "give --batch-size)")
        hinted = _hinted(an, _DP_WORDS)
        ev = [f"{hi} = {f} x {lo}: a data-parallel factor if {' or '.join(cands)}; give --replicas to tell"]
        if hinted:
            ev.append(f"the label{'s' if len(hinted) > 1 else ''} {', '.join(hinted)} name{'' if len(hinted) > 1 else 's'} "
                      "data-parallel training")
        return _unless_cumulative(an, Cause(cid, 0.6 if hinted else 0.45, ev, fix))
    if not an.large:
        return Cause(cid, 0.0, ["no pair differs"], fix)
    return Cause(cid, 0.0 if an.sees_factors else 0.1,
                 ["no number of replicas given (--replicas) and no factor points to one"
                  + ("" if an.sees_factors else f"; {NO_FACTOR_IN_TABLE}")], fix)


def _replica_direction(hi: str, lo: str) -> str:
    """Which engine convention makes ``hi`` R times ``lo``, read from which label names data-parallel training."""
    averaged = (f"DDP averages the replicas' gradients, so a summed loss comes out R times smaller ({lo}) than the "
                f"same summed loss on one device ({hi}); mean-reduced losses on equal shards would agree")
    summed = (f"the engine summed the replicas' gradients of per-replica means ({hi}: MirroredStrategy with a plain "
              "mean, psum, or jax.grad inside shard_map, which already sums the shards), R times the single-device "
              f"mean ({lo}); dividing by the global batch would agree")
    dp_hi, dp_lo = (_names(x, _DP_WORDS) for x in (hi, lo))
    if dp_lo and not dp_hi:
        return averaged
    if dp_hi and not dp_lo:
        return summed
    return f"Either {averaged}; or {summed}"


def _torch_chunks(n: int, k: int) -> int:
    """How many chunks torch.chunk(batch of n, k) returns: chunks of ceil(n/k), so possibly fewer than k."""
    size = -(-n // k)
    return -(-n // size)


def _test_micro_batches(an: _Analysis) -> Cause:
    """K micro-batch results added without 1/K (a factor K), or averaged when they hold unequal counts."""
    cid = "accumulation_normalization"
    k, n, pad = an.info.micro_batches, an.info.batch_size, an.info.padding
    fix = CAUSES[cid][1]
    if not (k and k > 1):
        ints = _integer_factors(an)
        if ints:
            hi, lo, f = ints[0]
            hinted = _hinted(an, _ACCUM_WORDS)
            ev = [f"{hi} = {f} x {lo}: an integer factor, which {f} micro-batch results added without dividing by "
                  f"{f} would give; say how many micro-batches were used (--micro-batches) to test it"]
            if hinted:
                ev.append(f"{', '.join(hinted)}: named as accumulated")
            return _unless_cumulative(an, Cause(cid, 0.6 if hinted else 0.45, ev, fix))
        if not an.large:
            return Cause(cid, 0.0, ["no pair differs"], fix)
        return Cause(cid, 0.0 if an.sees_factors else 0.1,
                     ["no number of micro-batches given (--micro-batches) and no factor points to one"
                      + ("" if an.sees_factors else f"; {NO_FACTOR_IN_TABLE}")], fix)
    hits = []
    chunks = _torch_chunks(n, k) if n and n >= k else k
    for p in an.factors:
        hi, lo, f = _oriented(p)
        if _near(f, k):
            hits.append(f"{hi} = {_g(f)} x {lo}: the K = {k} micro-batches; adding K mean-reduced micro-batch losses "
                        f"(or their gradients) without dividing by K gives K times the full batch's mean")
        elif chunks != k and _near(f, chunks):
            hits.append(f"{hi} = {_g(f)} x {lo}: {chunks} micro-batch means added, not your {k}: torch.chunk(batch of "
                        f"N = {n}, {k}) makes chunks of ceil({n}/{k}) = {-(-n // k)}, so only {chunks} of them "
                        "(torch.tensor_split or numpy.array_split make exactly K)")
    if hits:
        return Cause(cid, 0.95 if not any("torch.chunk" in h for h in hits) else 0.9, hits, fix)
    found = _projection(an, k, "micro-batches", cid)
    if found:
        return found
    if pad and an.large:
        # Padded tokens: each micro-batch's mean divides by its own valid count, so the mean of micro-batch
        # means re-weights tokens unless every micro-batch holds as many valid tokens.
        ev = [f"{pad} padded items in {k} micro-batches: a micro-batch's mean divides by its own count of valid "
              f"items v_p, so a mean of micro-batch means weighs each of its items 1/({k} v_p) instead of 1/V "
              "(V the batch's valid count): items of sparsely filled micro-batches count more"]
        if n:
            sizes = [len(p) for p in np.array_split(np.arange(n), k)]
            ev.append(f"N = {n}, V = {n - pad}: with the padding at the end the valid counts would be "
                      f"{', '.join(str(max(0, min(s, n - pad - sum(sizes[:i])))) for i, s in enumerate(sizes))}")
        means = [c for c in an.clusters if all(_key(x, an.methods) in _MEAN_WORDS for x in c)]
        found = len(an.clusters) == 2 and len(means) == 1
        if found:
            rest = next(c for c in an.clusters if c is not means[0])
            ev.append(f"the means ({', '.join(means[0])}) stand apart from the summed results ({', '.join(rest)}), "
                      "which agree: sums do not depend on how items are grouped, a mean of means does")
        return Cause(cid, 0.8 if found else 0.6, ev, fix)
    if n and n % k and an.large:
        # Averaging micro-batch means of unequal sizes: not a factor, a re-weighting of examples.
        sizes = [int(len(p)) for p in np.array_split(np.arange(n), k)]
        short = min(sizes)
        return Cause(cid, 0.7, [f"N = {n} in {k} micro-batches of {', '.join(map(str, sizes))} examples: a mean "
                                f"of micro-batch means weighs each example of a {short}-example micro-batch "
                                f"1/({k} x {short}) = {1 / (k * short):.3g} instead of 1/{n} = {1 / n:.3g}; padded "
                                "tokens make every micro-batch uneven in the same way"], fix)
    rew = _reweighting(an, k)
    if rew and not n:
        hi, lo, ratio, cos = rew
        added = abs(ratio - k) < abs(ratio - 1)
        return Cause(cid, 0.65, [
            f"{hi} projects onto {lo} with ratio {_g(ratio)} (cosine {cos:.4f}) but is no multiple of it: the same "
            f"examples {'added' if added else 'averaged'} with other weights, what "
            f"{'adding' if added else 'averaging'} {k} micro-batch means of unequal sizes gives (N not a multiple of "
            f"{k}, a short last micro-batch, padded tokens): each micro-batch's mean divides by its own size",
            "give --batch-size to see the sizes (a multiple of the micro-batch count rules this out)"], fix)
    return _no_factor(an, cid, k, "micro-batches") if an.large else Cause(cid, 0.0, ["no pair differs"], fix)


def _test_unzeroed(an: _Analysis) -> Cause:
    cid, fix = "unzeroed_gradients", CAUSES["unzeroed_gradients"][1]
    grads = an.obs.grads
    if an.cumulative is not None and len(an.cumulative.labels) >= 3:
        return Cause(cid, 0.3, ["each result holds the ones saved before it: the gradients accumulate across the "
                                "methods (grad_not_zeroed_between_methods), not within one method's loop"], fix)
    if grads is not None:
        flat = an.flat
        # A difference that equals another result: a's gradient = b's + c's (c left in the accumulator).
        for p in an.large:
            a, b = p.a, p.b
            for hi, lo in ((a, b), (b, a)):
                delta = flat[hi] - flat[lo]
                for c in an.obs.labels:
                    # c must be a third result, not lo again: with a factor 2, hi - lo = lo trivially.
                    if c in (a, b) or an.cluster_of(c) in (an.cluster_of(lo), an.cluster_of(hi)):
                        continue
                    scale = max(float(np.max(np.abs(flat[hi]))), 1e-300)
                    if float(np.max(np.abs(delta - flat[c]))) / scale <= factor_bound(an.rtol):
                        return Cause(cid, 0.95, [f"{hi} - {lo} = {c} (within rounding): {hi} holds {c}'s "
                                                 "gradient on top of its own"], fix)
        for p in an.factors:
            for r, hi, lo in ((p.factor, p.a, p.b), (1 / p.factor, p.b, p.a)):
                info = an.info
                counts = [k for k in (info.batch_size, info.replicas, info.micro_batches) if k]
                if info.batch_size and info.replicas:
                    counts.append(info.batch_size / info.replicas)
                if info.batch_size and info.micro_batches and info.batch_size >= info.micro_batches:
                    counts.append(_torch_chunks(info.batch_size, info.micro_batches))
                if r >= 1.5 and _near(r, round(r)) and not any(_near(r, k) for k in counts):
                    return Cause(cid, 0.5, [f"{hi} = {round(r)} x {lo}: the gradient added {round(r)} times into "
                                            "one accumulator, or a count you did not give (--replicas, "
                                            "--micro-batches, --batch-size) that equals it"], fix)
        n = an.info.batch_size
        found = an.loop_split()
        if found and n:
            # Reading the accumulator after each of N backward passes sums prefix sums: example i counts N - i
            # times, so the result projects onto the true gradient with a ratio near (N + 1) / 2.
            loops, others, how = found
            per, bat = loops[0], others[0]
            r = float(flat[per] @ flat[bat]) / max(float(flat[bat] @ flat[bat]), 1e-300)
            expected = (n + 1) / 2
            if 0.5 * expected <= r <= 1.5 * expected:
                return Cause(cid, 0.8, [how, f"{per} projects onto {bat} with ratio {_g(r)}, near (N + 1)/2 = "
                                             f"{_g(expected)}: what reading .grad after each of N = {n} backward "
                                             "passes without zeroing gives (example i counted N - i times)"], fix)
            return Cause(cid, 0.3, [how, f"but {per} projects onto {bat} with ratio {_g(r)}, far from the (N + 1)/2 "
                                         f"= {_g(expected)} an unzeroed accumulator gives"], fix)
        if found:
            return Cause(cid, 0.5, [found[2], "consistent with a per-example loop that reads an accumulator it "
                                              "never zeroes; give --batch-size to test the (N + 1)/2 ratio it "
                                              "predicts"], fix)
        return Cause(cid, 0.0 if not an.large else 0.15,
                     ["no result equals another plus a third, no integer factor points to repeated "
                      "accumulation, and the per-example loops do not stand apart"], fix)
    found = an.loop_split()
    if found:
        return Cause(cid, 0.6, [found[2], "that is what a per-example loop gives when it reads .grad after each "
                                          "backward pass without zeroing it: both loops carry the same bug, so "
                                          "they agree exactly with each other; give the gradients (npz) to test "
                                          "it quantitatively"], fix)
    return Cause(cid, 0.2 if an.large else 0.0, ["the pattern does not single out the per-example loops"], fix)


def _test_short_last_batch(an: _Analysis) -> Cause:
    cid, fix = "short_last_batch", CAUSES["short_last_batch"][1]
    n, m = an.info.batch_size, an.info.dataset_size
    if not an.large:
        return Cause(cid, 0.0, ["no pair differs"], fix)
    if n and m:
        if m % n == 0:
            return Cause(cid, 0.0, [f"dataset_size {m} = {m // n} x batch_size {n}: every batch is full"], fix)
        last, count = m % n, math.ceil(m / n)
        ev = [f"dataset_size {m} = {m // n} x {n} + {last}: the last of {count} batches holds {last} examples; in "
              f"the mean of batch means each of its examples weighs 1/({count} x {last}) instead of 1/{m}, "
              f"{m / (count * last):.3g} times its share"]
        found = an.split("per_example", "reduced")
        if found:
            ev.append(f"the methods averaged over examples ({', '.join(found[0])}) agree with each other and "
                      f"differ from the batch-reduced ones ({', '.join(found[1])}): per-example averages "
                      "divide by the example count, batch means do not")
        return Cause(cid, 0.75 if found else 0.4, ev, fix)
    found = an.split("per_example", "reduced")
    ev = ["needs numbers averaged over several batches of different sizes; on one batch every method sees "
          "the same N, so a short batch cannot separate them. Give --dataset-size and --batch-size to test"]
    lead = ([f"the methods averaged over examples ({', '.join(found[0])}) differ from the batch-reduced ones "
             f"({', '.join(found[1])})"] if found else [])
    return Cause(cid, 0.35 if found else 0.15, lead + ev, fix)


def _vanishing(an: _Analysis, sep: list[str], shared: list[str]) -> str | None:
    """Evidence that the separate-forward results lose every gradient before some layer, or None.

    A batch normalization of one example has no variance: it outputs its shift whatever comes in, so
    the parameters before it get exactly no gradient from that example. Dropout never does that.
    """
    grads = an.obs.grads
    if grads is None or not sep or not shared:
        return None
    top = max(float(np.max(np.abs(v), initial=0.0)) for g in grads.values() for v in g.values())
    floor = max(an.rtol or 0.0, 1e-12) * top
    gone = [p for p in grads[shared[0]]
            if all(float(np.max(np.abs(grads[s][p]), initial=0.0)) <= floor for s in sep)
            and all(float(np.max(np.abs(grads[t][p]), initial=0.0)) > 1e3 * floor for t in shared)]
    if not gone:
        return None
    p = gone[0]
    return (f"{', '.join(sep)} have no gradient for {', '.join(gone[:4])}{' ...' if len(gone) > 4 else ''} "
            f"(max |g| <= {_g(floor)}) where {shared[0]} has max |g| = "
            f"{_g(float(np.max(np.abs(grads[shared[0]][p]))))}: an example normalized alone has no variance, "
            "so a batch normalization outputs its shift and passes nothing back to the layers before it")


def _test_train_mode(an: _Analysis) -> list[Cause]:
    """Dropout/batch norm in training mode: separate-forward methods differ from shared-forward ones."""
    sep = [x for x in an.obs.labels if "separate_forward" in _roles(x, an.methods)]
    shared = [x for x in an.obs.labels if x not in sep]
    vanishing = _vanishing(an, sep, shared)
    out = []
    for cid, flag in (("dropout_train_mode", an.info.dropout), ("batchnorm_train_mode", an.info.batchnorm)):
        fix = CAUSES[cid][1]
        if not sep or not shared:
            out.append(Cause(cid, 0.1 if an.large and flag is not False else 0.0,
                             ["no method labelled one-by-one or vectorized: cannot tell separate forward passes "
                              "apart"], fix))
            continue
        same = [p for p in an.pairs if p.kind in ("zero", "rounding", "unresolved_zero")
                and ((p.a in sep) != (p.b in sep))]
        if same:
            out.append(Cause(cid, 0.0, [f"{same[0].a} and {same[0].b} agree: "
                                        "a method with a forward pass per example matches one sharing the "
                                        "batch's forward pass, so training-mode randomness or batch statistics "
                                        "did not change it"], fix))
            continue
        if flag is False:
            out.append(Cause(cid, 0.0, [f"{cid.split('_')[0]} was off (--info)"], fix))
            continue
        differ = all(any(p.kind in ("large", "factor") and {p.a, p.b} == {s, t} for p in an.pairs)
                     for s in sep for t in shared)
        # Methods that share the batch's loss arithmetic differing by more than rounding and by no constant
        # factor: their forward passes differed, which randomness does and batch statistics do not.
        # (Beyond 1%: differences at a narrow format's rounding level are reduced precision's signature.)
        random = len(shared) > 1 and all(p.kind == "large" and (p.rel is None or p.rel > 0.01)
                                         for p in an.pairs if p.a in shared and p.b in shared)
        if random and differ:
            inner = [p for p in an.pairs if p.a in shared and p.b in shared]
            first = inner[0]
            shape = ", not a constant factor" if an.sees_factors else ""
            ev = [f"all {len(inner)} pairs of methods sharing the batch's forward pass differ, even {first.a} and "
                  f"{first.b}, which differentiate the same batch's loss (max|a-b| {_g(first.max_abs)}{shape}), and "
                  f"so do the methods with a forward pass of their own; {an.tally()}: each forward pass computed "
                  "another network, as a fresh dropout mask per forward pass does"]
            if cid == "dropout_train_mode" and (an.cumulative or an.cumulative_step):
                out.append(Cause(cid, 0.3, ev + ["but the results grow in the order they were saved, each holding "
                                                 "the ones before: accumulation across the methods, which fresh "
                                                 "masks do not produce"], fix))
            elif cid == "dropout_train_mode":
                out.append(Cause(cid, 0.9 if flag else 0.7, ev + (["dropout was on (--info)"] if flag else []), fix))
            else:
                out.append(Cause(cid, 0.1, ev + ["batch statistics are the same in every forward pass of one "
                                                 "batch, so batch normalization cannot do that"], fix))
            continue
        if not differ:
            out.append(Cause(cid, 0.1, ["the one-by-one methods do not stand apart from the others"], fix))
            continue
        ev = [f"{', '.join(sep)} (one forward pass per example) differ from every method sharing one forward "
              f"pass ({', '.join(shared)})"]
        said = [f"{cid.split('_')[0]} was on (--info)"] if flag else []
        if cid == "batchnorm_train_mode" and vanishing:
            out.append(Cause(cid, 0.95, ev + [vanishing] + said, fix))
        elif cid == "dropout_train_mode" and vanishing:
            out.append(Cause(cid, 0.6 if flag else 0.3, ev + said + [
                "but gradients that vanish before a layer point to batch normalization: " + vanishing], fix))
        elif cid == "batchnorm_train_mode" and an.obs.grads is not None and not flag:
            out.append(Cause(cid, 0.3, ev + ["no parameter's gradient vanishes in the one-example results, as "
                                             "a batch normalization of single examples would make it"], fix))
        elif cid == "dropout_train_mode" and an.obs.grads is not None and flag is None and an.split(
                "separate_forward"):
            out.append(Cause(cid, 0.6, ev + ["the results form exactly two groups, with and without a forward "
                                             "pass of their own, each agreeing within rounding, and no gradient "
                                             "vanishes (which rules batch normalization out): another dropout "
                                             "mask per forward pass gives that; give --dropout to confirm"], fix))
        else:
            out.append(Cause(cid, 0.85 if flag else 0.4, ev + (said or [
                "give --dropout / --batchnorm to say whether the model has it"]), fix))
    return out


def _test_precision(an: _Analysis) -> Cause:
    cid, fix = "reduced_precision", CAUSES["reduced_precision"][1]
    rec = an.obs.recorded
    narrow = rec.narrow() if rec is not None and rec.environments else None
    if narrow is not None and not narrow and not an.large:
        return Cause(cid, 0.0, ["no pair differs beyond rounding, and no backend computed in a narrower format"],
                     fix)
    if narrow is not None and not narrow:
        # The report records how every backend computed: no TF32, no autocast, no narrow dtype.
        return Cause(cid, 0.0, [
            f"{RULED_BY_SETTINGS}({rec.settings_text()}): no result was computed in a format "
            f"narrower than {rec.dtype}, so rounding in a narrower format cannot explain the differences "
            f"({an.tally()})"],
            "nothing to change: this run already had TF32 off and no autocast (report.json's "
            "backends[].environment); look at the causes ranked above")
    told = ([f"the run recorded {', '.join(narrow)}"] if narrow else
            [f"the gradients were computed in {an.info.dtype}"] if an.info.dtype in NARROW_FORMATS else [])
    if an.obs.grads is None:
        return _table_precision(an, told)
    dtype = an.info.dtype or "float32"
    worst = max((p.rel or 0.0) for p in an.pairs)
    k = an.info.batch_size or 256
    wide = _rtol(Info(dtype="float32"), k) if dtype in NARROW_FORMATS else an.rtol
    if worst <= wide:
        return Cause(cid, 0.0, [f"every pair agrees within {'float32' if dtype in NARROW_FORMATS else dtype}'s rounding "
                                f"(largest {_g(worst)} relative <= {_g(wide)})"], fix)
    flat = an.flat
    cosine = min(float(flat[p.a] @ flat[p.b]) / max(float(np.linalg.norm(flat[p.a]) * np.linalg.norm(flat[p.b])),
                                                     1e-300) for p in an.pairs)
    for name, label in (("tf32", "tf32 or float16"), ("bfloat16", "bfloat16")):
        # Rounding in a narrower format moves each entry by about u sqrt(K) of the gradient's scale, not
        # more, and keeps the direction.
        bound = narrow_rounding(name, k)
        if worst <= bound and cosine >= 1 - bound and not an.factors:
            return Cause(cid, 0.95 if told else 0.6,
                         [f"{an.tally()}; the largest by {_g(worst)} relative: beyond {'float32' if dtype in NARROW_FORMATS else dtype}'s "
                          f"bound {_g(wide)} but within {label} rounding (4 u sqrt(K) = {_g(bound)}), in the same "
                          f"direction (cosine >= {cosine:.6f}), no constant factor"] + told, fix)
    return Cause(cid, 0.0, [f"the largest difference, {_g(worst)} relative (smallest cosine {cosine:.4f}), is beyond "
                            "reduced-precision rounding (bfloat16 included)"], fix)


def _table_precision(an: _Analysis, told: list[str]) -> Cause:
    """Reduced precision from a table: only its relative sizes (max_rel or --grad-scale) can show it."""
    cid, fix = "reduced_precision", CAUSES["reduced_precision"][1]
    if not an.large:
        return Cause(cid, 0.0, ["no pair differs beyond rounding"], fix)
    if an.zeros:
        return Cause(cid, 0.05, ["exact zeros beside large differences: rounding does not make one pair equal "
                                 "to the last digit and another differ at the printed precision"], fix)
    if an.scale_assumed:
        return Cause(cid, 0.2, ["a table of absolute differences cannot show relative sizes; give --grad-scale, a "
                                "max_rel column or the gradients (npz)"], fix)
    worst = max(p.rel or 0.0 for p in an.pairs)
    for name, label in (("tf32", "tf32 or float16"), ("bfloat16", "bfloat16")):
        bound = narrow_rounding(name, an.info.batch_size or 256)
        if worst <= bound:
            return Cause(cid, 0.9 if told else 0.5, [
                f"{an.tally()}; the largest by {_g(worst)} relative: beyond {an.info.dtype or 'float32'}'s bound "
                f"{_g(an.rtol)}, within {label} rounding (4 u sqrt(K) = {_g(bound)}) ({an.scale_words()})"] + told,
                fix)
    return Cause(cid, 0.0, [f"the largest difference, {_g(worst)} relative, is beyond reduced-precision rounding "
                            "(bfloat16 included)"], fix)


def _test_weighted(an: _Analysis) -> Cause:
    cid, fix = "weighted_mean_mismatch", CAUSES["weighted_mean_mismatch"][1]
    told = bool(an.info.loss_reduction and "weight" in an.info.loss_reduction.lower())
    n, r = an.info.batch_size, an.info.replicas
    odd = [p for p in an.factors if count_like(p.factor) is None
           and not (n and r and _near(_oriented(p)[2], n / r))]
    if odd and (an.cumulative or an.cumulative_step):
        p = odd[0]
        return Cause(cid, 0.1, [f"{p.a} = {_g(p.factor)} x {p.b} is no count, but a ratio of the counts of "
                                "gradients the results hold (they accumulate in the saved order)"], fix)
    if odd:
        p = odd[0]
        return Cause(cid, 0.8 if told else 0.55,
                     [f"{p.a} = {_g(p.factor)} x {p.b}: proportional with a factor that is no count (not N, R or "
                      "micro-batches): a ratio of divisors such as Σw / N, which changes from batch to batch"], fix)
    return Cause(cid, 0.15 if told and an.large else 0.0,
                 ["no pair is proportional with a non-integer factor" if an.sees_factors else NO_FACTOR_IN_TABLE],
                 fix)


#: Evidence that starts so marks a cause the input cannot show at all (listed apart, not as ruled out).
NOT_APPLICABLE = "not applicable: "
#: Evidence that starts so marks a cause a report's recorded settings contradict (listed with the reason).
RULED_BY_SETTINGS = "ruled out by the run's recorded settings "


def _test_between_methods(an: _Analysis) -> Cause:
    """Each result holding the ones saved before it: no zero_grad between the methods being compared."""
    cid, fix = "grad_not_zeroed_between_methods", CAUSES["grad_not_zeroed_between_methods"][1]
    cum = an.cumulative
    if cum is not None:
        labels, first = cum.labels, cum.labels[0]
        order = ", ".join(labels)
        if cum.all_equal:
            sums = "; ".join(f"{x} = {i} x {first}" for i, x in enumerate(labels[1:], start=2))
            ev = [f"in the order they were saved ({order}), each result is the one before plus {first}: {sums} "
                  f"(residual {_g(cum.residual)} of the largest entry, within rounding): every method computed the "
                  "same gradient, and each was added onto the ones before it"]
        else:
            steps = ", ".join(count_text(c) for c in cum.steps)
            ev = [f"in the order they were saved ({order}), each result is the one before plus a count times {first} "
                  f"(steps {steps}; residual {_g(cum.residual)}, within rounding): each method's own gradient added "
                  "onto the ones before it"]
        ev.append(f"each method's own gradient is its result minus the one before ({labels[1]} - {first}, ...); "
                  "compared that way, the methods agree")
        if len(labels) >= 3:
            return Cause(cid, 0.95 if cum.all_equal else 0.9, ev, fix)
        total = 1.0 + cum.steps[1]
        if cum.all_equal:
            return Cause(cid, 0.45, ev + ["with two results this is one factor, 2, which 2 replicas or micro-batches "
                                          "give as well; save a third method to tell"], fix)
        if count_like(total) is None:
            # (N + 1)/N and the like: no count, but a count's worth of gradient added onto the first.
            return Cause(cid, 0.6, ev, fix)
        return Cause(cid, 0.0, [f"two results a factor {_g(total)} apart: an integer factor, not a result plus "
                                "a copy of itself"], fix)
    if an.cumulative_step is not None:
        order = ", ".join(an.obs.labels)
        return Cause(cid, 0.75, [
            f"in the order the table lists them ({order}), results i and j differ by |i - j| x "
            f"{_g(an.cumulative_step)}: what results that each add the same gradient onto the ones before give "
            "(result k = k x result 1)",
            "a table of absolute differences cannot prove the proportionality; give the gradients (npz) to confirm"],
            fix)
    if not an.large:
        return Cause(cid, 0.0, ["no pair differs"], fix)
    labels = an.obs.labels
    tested = an.obs.grads is not None or (len(labels) >= 3 and len(an.pairs) == len(labels) * (len(labels) - 1) // 2)
    return Cause(cid, 0.0 if tested else 0.1,
                 ["no result is the one saved before it plus a multiple of the first" if tested else
                  "too few results or pairs to see results grow in their saved order"], fix)


def _backend_of(label: str) -> str:
    return label.split("/", 1)[0]


def _test_port(an: _Analysis) -> Cause:
    """A check report: the port's localization (the layer where it parts from the source) explains it."""
    cid, fix = "port_difference", CAUSES["port_difference"][1]
    rec = an.obs.recorded
    if rec is None or rec.kind != "check":
        return Cause(cid, 0.0, [NOT_APPLICABLE + "only a gradparity check report compares a port with its source"],
                     fix)
    if not an.large:
        return Cause(cid, 0.0, ["no pair differs"], fix)
    found = rec.localized()
    if found:
        ev, fixes = [], []
        for loc in found:
            layer = loc.get("first_layer") or loc.get("parameter_layer")
            said = str(loc.get("suggestion") or "")
            # check's explanation ends with its suggestion: said once, as the suggestion.
            where = str(loc.get("explanation") or "").replace(said, "").strip()
            ev.append(f"a port difference at layer {layer}: gradparity check localized it ({loc.get('backend')} "
                      f"against {loc.get('source')}): {where}".rstrip(": "))
            if said:
                said = re.sub(r"^what to change:\s*", "", said, flags=re.IGNORECASE)
                ev.append(f"check's suggestion: {said}")
                fixes.append(said)
        loc = found[0]
        layer = loc.get("first_layer") or loc.get("parameter_layer")
        return Cause(cid, 0.95, ev, " ".join(fixes) or (
            f"make {loc.get('backend')}'s {layer} compute what {loc.get('source')}'s does: compare the layer's settings "
            "(epsilon, approximate GELU, padding, layout, bias, initial state) with the source's"))
    backends = list(dict.fromkeys(_backend_of(x) for x in an.obs.labels))
    within = [p for p in an.pairs if _backend_of(p.a) == _backend_of(p.b)]
    across = [p for p in an.pairs if _backend_of(p.a) != _backend_of(p.b)]
    if len(backends) > 1 and across and all(p.kind not in ("large", "factor") for p in within) and all(
            p.kind in ("large", "factor") for p in across):
        return Cause(cid, 0.6, [f"every method agrees with the others of its framework and no framework agrees with "
                                f"another ({', '.join(backends)}): the ports compute different functions, whatever "
                                "the reduction; the check named no layer (run it with localize = \"always\" to "
                                "compare every layer)"], fix)
    return Cause(cid, 0.2, ["the check named no layer where a port parts from its source"], fix)


def diagnose(obs: Observations) -> Diagnosis:
    """Test every cause of ``CAUSES`` against the observations and rank them, best explanation first."""
    an = _Analysis(obs)
    # The specific explanations first: a tie keeps this order (the sort below is stable).
    causes = [_test_clean(an), _test_port(an), _test_between_methods(an), *_test_normalization(an),
              _test_unzeroed(an), _test_short_last_batch(an), *_test_train_mode(an), _test_precision(an),
              _test_weighted(an), _test_data_parallel(an), _test_micro_batches(an)]
    best = max(c.score for c in causes)
    if best < 0.5:
        unknown = Cause("unknown", 0.5, [f"no known cause scores 0.5 or more (best {best:.2f}): gradparity cannot "
                                         "explain these numbers and does not guess"], CAUSES["unknown"][1])
    else:
        unknown = Cause("unknown", 0.0, ["a known cause explains the numbers"], CAUSES["unknown"][1])
    causes.append(unknown)
    causes.sort(key=lambda c: -c.score)
    notes = _exactness_notes(an)
    if an.scale_assumed and an.large:
        notes.append(f"The table holds absolute differences only: its pairs were judged {an.scale_words()}.")
    if an.large and causes[0].id != "port_difference" and any(
            "per_example" in _roles(x, an.methods) for x in obs.labels) and any(
            "reduced" in _roles(x, an.methods) for x in obs.labels):
        notes.append(NONLINEARITY_NOTE)
    return Diagnosis(obs, an.pairs, an.clusters, causes, an.rtol, notes, an.scale_words() or None)


def _exactness_notes(an: _Analysis) -> list[str]:
    """What exact equalities say: bitwise-equal sum/N and mean are expected when N is a power of two."""
    n = an.info.batch_size
    out = []
    for p in an.zeros:
        roles = (_roles(p.a, an.methods), _roles(p.b, an.methods))
        if not all("reduced" in r for r in roles) or p.kind != "zero":
            continue
        if n and n & (n - 1) == 0:
            out.append(f"{p.a} = {p.b} bit for bit is expected: N = {n} is a power of two, so dividing by N "
                       "only changes the exponent and sum / N equals the mean exactly.")
        elif n:
            out.append(f"{p.a} = {p.b} bit for bit although N = {n} is not a power of two, where dividing by N "
                       "rounds: they went through the same arithmetic (one computed from the other).")
        break
    if an.obs.resolution and an.zeros:
        out.append(f"The table's zeros are zeros to its printed precision (|a - b| < {an.obs.resolution:g}), not "
                   "proof of bitwise equality; rounding differences of float32 (about 1e-7 relative) print as 0.")
    return out


#: Why "cross-entropy is not linear" does not explain a difference between reductions.
NONLINEARITY_NOTE = (
    "Not a cause: the non-linearity of the loss. The gradient is linear in the loss whatever the loss is: "
    "d/dθ (ℓ_1 + ... + ℓ_N) = dℓ_1/dθ + ... + dℓ_N/dθ, and a mean is that sum times 1/N. Summing per-example "
    "gradients, differentiating the summed loss, and differentiating the mean then multiplying by N are the same "
    "number up to the order of additions, for cross-entropy as for any differentiable loss; only rounding "
    "separates them (see a clean `gradparity run`).")


#: Pairs listed in the text view; --json lists all.
MAX_PAIRS_SHOWN = 12


def render_text(d: Diagnosis) -> str:
    """The terminal view: the pattern, then the causes best first, each with its evidence and fix."""
    obs = d.observations
    lines = [f"diagnosing {obs.source}: {len(obs.labels)} results ({', '.join(obs.labels)})"]
    readings = label_readings(obs)
    lines.append("labels read as: " + "; ".join(
        f"{r['label']} -> {r['read_as']} ({r['how']}{': ' + ', '.join(r['roles']) if r['roles'] else ''})"
        if r["read_as"] else f"{r['label']} -> not understood" for r in readings))
    unread = [r["label"] for r in readings if not r["read_as"]]
    if unread:
        lines.append(f"  {', '.join(unread)}: no method word in {'it' if len(unread) == 1 else 'them'}, so the "
                     "causes that tell methods apart cannot use them; say what each is with --methods "
                     f"{unread[0]}=none_loop,... (or [methods] in --info), of: {', '.join(METHOD_WORDS)}")
    if obs.resolution:
        lines.append(f"printed to {obs.resolution * 2:g}: a 0 there means |a - b| < {obs.resolution:g}")
    shown_pairs = d.pairs
    if len(d.pairs) > MAX_PAIRS_SHOWN:
        # Many results: every pair that differs, then the largest of the rest, up to the limit.
        order = {"large": 0, "factor": 0}
        shown_pairs = sorted(d.pairs, key=lambda p: (order.get(p.kind, 1), -(p.rel if p.rel is not None
                                                                               else p.max_abs)))[:MAX_PAIRS_SHOWN]
        counts = {}
        for p in d.pairs:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        tally = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
        lines.append(f"pairs: {len(d.pairs)} ({tally}); the {MAX_PAIRS_SHOWN} that differ most (--json lists all):")
    else:
        lines.append("pairs:")
    for p in shown_pairs:
        extra = f", rel {_g(p.rel)}" if p.rel is not None else ""
        extra += f", factor {_g(p.factor)}" if p.factor is not None else ""
        lines.append(f"  {p.a} vs {p.b}: max|a-b| {p.max_abs:.4g} ({p.kind.replace('_', ' ')}{extra})")
    lines.append("groups that agree: " + "; ".join("{" + ", ".join(c) + "}" for c in d.clusters))
    lines.append("")
    shown = [c for c in d.causes if c.score >= 0.3] or d.causes[:1]
    for rank, c in enumerate(shown, start=1):
        lines.append(f"{rank}. {c.id} (score {c.score:.2f}): {CAUSES[c.id][0]}")
        lines += [f"     evidence: {e}" for e in c.evidence]
        lines.append(f"     fix: {c.fix}")
    weak = [f"{c.id} ({c.score:.2f})" for c in d.causes if 0 < c.score < 0.3 and c not in shown]
    if weak:
        lines.append(f"not excluded, but nothing here points to them: {', '.join(weak)}")
    zero = [c for c in d.causes if c.score == 0 and c not in shown]
    apart = [c.id for c in zero if c.evidence and c.evidence[0].startswith(NOT_APPLICABLE)]
    recorded = [c for c in zero if c.evidence and c.evidence[0].startswith(RULED_BY_SETTINGS)]
    ruled = [c.id for c in zero if c.id not in apart and c not in recorded]
    if ruled:
        lines.append(f"ruled out by these numbers: {', '.join(ruled)}")
    for c in recorded:
        lines.append(f"{c.id}: {c.evidence[0]}")
    if apart:
        lines.append(f"not applicable to this input: {', '.join(apart)}")
    lines.append("(--json gives every cause's evidence)")
    lines += ["", *d.notes] if d.notes else []
    return "\n".join(lines)


from gradparity.exit_codes import EXIT_CAUSE, EXIT_CLEAN, EXIT_UNKNOWN  # noqa: E402 (0, 1, 3)


def load(source: str, info: Info) -> Observations:
    """Observations from a report folder, an npz of gradients, a table file, or '-' (a table on stdin);
    ``info`` (from --info and flags) overrides what a report records."""
    import sys

    if source == "-":
        obs = read_table(sys.stdin.read(), "standard input")
        obs.info = info
        return obs
    path = Path(source)
    if path.is_dir():
        obs, recorded = read_report(source)
        obs.info = recorded.merged(info)
        return obs
    if not path.exists():
        raise ConfigError(f"{source!r} does not exist: give a report folder, an .npz of gradients or a table")
    if path.suffix == ".npz":
        obs = read_gradients(source)
    else:
        from gradparity.experiment.files import read_text

        obs = read_table(read_text(path, "table file", "a text table"), source)
    obs.info = info
    return obs


def exit_code(d: Diagnosis) -> int:
    """0 when the numbers are clean, 1 when a known cause ranks first, 3 when nothing explains them."""
    return {"clean": EXIT_CLEAN, "unknown": EXIT_UNKNOWN}.get(d.top.id, EXIT_CAUSE)
