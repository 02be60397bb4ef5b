"""``gradparity translate``: a loss as written in one framework, rendered for the others, and run.

The pipeline's stages, for loss functions instead of models:

    text -> LossSemantics (parse)  -> batches (loss_inputs)  -> one worker per framework
         -> compare each framework's loss and d loss / d logits with the float64 reference
         -> report (text or JSON)

The source is run too, in its own framework, from its own rendering: that
checks gradparity's reading of it (what its reduction divides by) against
what the framework really computes, on every batch.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gradparity.backends import BACKENDS, FRAMEWORKS, BackendInfo
from gradparity.compare.pairs import relative_difference
from gradparity.compare.tolerance import UNIT_ROUNDOFF, effective_unit_roundoff, loss_rtol
from gradparity.errors import ConfigError, Interrupted
from gradparity.losses.batches import LossBatch, check_loss_batch, generate_batches, make_loss_job
from gradparity.losses.catalogue import DIVISOR_LABELS, DIVISORS, LossSemantics, Rendering
from gradparity.losses.text import parse_loss_text
from gradparity.run.execute import BackendOutcome
from gradparity.report.jsonout import strict
from gradparity.run.runner import WorkerRun, raise_if_stopped, run_jobs_until_stopped

#: Also accepted by --to and as a source: the legacy Keras 2 package (its own extra, tf-keras).
OPTIONAL_FRAMEWORKS = ("tf_keras",)
TARGETS_HINTS = ("class_index", "probabilities")
DTYPES = ("float64", "float32")
from gradparity.exit_codes import EXIT_INCOMPLETE, EXIT_MATCH, EXIT_MISMATCH  # 0, 1, 3


def loss_module(framework: str):
    """The framework's loss texts (``parse``, ``render``), the parent half of its losses; importing it imports
    no framework (the worker half, ``losses``, runs the rendered functions)."""
    return importlib.import_module(f"gradparity.backends.{framework}.loss_text")


@dataclass(frozen=True)
class BatchAgreement:
    """One batch: the framework's loss, the reference's, and the divisor each implies.

    ``divisor`` is the rule's value on the batch; ``measured_divisor`` is
    what the framework really divided by, from its own numbers: its weighted
    sum of its per-element losses (sum_e s_e m_e L_e, the same configuration
    with a plain sum, run in the same worker) over its reduced loss.
    ``numerator_rel`` is that weighted sum's relative difference from the
    reference's; ``agree`` needs it, the loss and the gradient within rtol.
    """

    batch: str
    loss: float | None
    reference_loss: float
    divisor: float
    measured_divisor: float | None
    loss_rel: float
    grad_rel: float
    agree: bool
    weighted_sum: float | None = None
    numerator_rel: float | None = None


@dataclass
class Translation:
    """One framework's rendering and how it measured against the reference."""

    rendering: Rendering
    role: str  # "source" | "target"
    backend: str
    status: str = "not run"     # ok | mismatch | failed | missing | ...
    error: str | None = None
    environment: dict | None = None
    rtol: float | None = None
    batches: list[BatchAgreement] = field(default_factory=list)

    def to_dict(self) -> dict:
        r = self.rendering
        return {
            "framework": r.framework, "role": self.role, "backend": self.backend, "native": r.native,
            "code": r.code, "function": r.function, "notes": list(r.notes),
            "agreement": {
                "status": self.status, "error": self.error, "rtol": self.rtol,
                "max_loss_rel": max((b.loss_rel for b in self.batches), default=None),
                "max_grad_rel": max((b.grad_rel for b in self.batches), default=None),
                "batches": [b.__dict__ for b in self.batches],
            },
            "environment": self.environment,
        }


@dataclass
class TranslationReport:
    source: str
    framework: str
    semantics: LossSemantics
    batches: list[LossBatch]
    translations: list[Translation]
    status: str
    exit_code: int
    summary: str
    divisors: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The --json document; non-finite numbers become null (JSON has no NaN/inf)."""
        return strict(self._dict())

    def _dict(self) -> dict:
        return {
            "source": self.source, "framework": self.framework, "semantics": self.semantics.to_dict(),
            "meaning": self.semantics.describe(),
            "batches": [{"name": b.name, "shape": list(b.logits.shape), "describe": b.describe(),
                         "divisor": self.divisors.get(b.name)} for b in self.batches],
            "translations": [t.to_dict() for t in self.translations],
            "verdict": {"status": self.status, "exit_code": self.exit_code, "summary": self.summary},
        }


def _load_data(path: str | None) -> dict[str, np.ndarray]:
    """Every array of the --data .npz (none without it); ConfigError for any unreadable file."""
    if path is None:
        return {}
    from gradparity.experiment.files import read_npz

    return read_npz(path, "--data", hint="np.savez(path, logits=..., targets=...), and any array the loss names")


def _user_batch(arrays: dict[str, np.ndarray], sem: LossSemantics) -> LossBatch | None:
    """The user's own batch from --data when it holds 'logits' and 'targets' (and 'sample_weight')."""
    if "logits" not in arrays or "targets" not in arrays:
        return None
    logits = np.asarray(arrays["logits"], dtype=np.float64)
    targets = np.asarray(arrays["targets"])
    if sem.kind != "cross_entropy":
        targets = targets.astype(np.float64)
    weight = arrays.get("sample_weight") if sem.sample_weight else None
    batch = LossBatch("data", logits, targets, None if weight is None else np.asarray(weight, dtype=np.float64))
    check_loss_batch(sem, batch)
    return batch


def _in_dtype(batch: LossBatch, dtype: str) -> LossBatch:
    """The batch rounded to ``dtype`` (class indices stay integers): what the workers get and the reference uses."""
    cast = lambda a: None if a is None else (a if a.dtype.kind in "iu" else a.astype(dtype))
    return dataclasses.replace(batch, logits=cast(batch.logits), targets=cast(batch.targets),
                               sample_weight=cast(batch.sample_weight))


def plan(text: str, to: tuple[str, ...] = FRAMEWORKS, data: str | None = None, targets: str | None = None,
         seed: int = 0, dtype: str = "float64") -> tuple[str, LossSemantics, list[tuple[str, Rendering]], list[LossBatch]]:
    """Everything before any worker: parse, render for the source and every target, build the batches.

    Raises ConfigError for anything a user can get wrong (exit code 2).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    known = FRAMEWORKS + OPTIONAL_FRAMEWORKS
    unknown = [f for f in to if f not in known]
    if unknown or not to:
        raise ConfigError(f"--to takes a comma-separated subset of {', '.join(known)}, got {','.join(to)!r}")
    if targets is not None and targets not in TARGETS_HINTS:
        raise ConfigError(f"--targets must be one of {', '.join(TARGETS_HINTS)}, got {targets!r}")
    arrays = _load_data(data)
    expr = parse_loss_text(text, arrays)
    sem = loss_module(expr.framework).parse(expr, targets)
    renderings = [("source", loss_module(expr.framework).render(sem))]
    renderings += [("target", loss_module(f).render(sem)) for f in to if f != expr.framework]
    user = _user_batch(arrays, sem)
    classes = user.logits.shape[-1] if user is not None else None
    batches = generate_batches(sem, seed, classes=classes) + ([user] if user is not None else [])
    batches = [_in_dtype(b, dtype) for b in batches]
    for b in batches:
        check_loss_batch(sem, b)
    return expr.framework, sem, renderings, batches


def backend_for(framework: str, keras_backend: str) -> BackendInfo:
    """The backend that runs ``framework``'s loss functions (Keras on ``keras_backend``)."""
    if framework == "keras":
        return BACKENDS[f"keras-{keras_backend}"]
    return BACKENDS["tf-keras" if framework == "tf_keras" else framework]


def sum_function(framework: str, sem: LossSemantics) -> str:
    """The ``loss_fn`` source of ``sem`` with a plain sum in ``framework``: the numerator sum_e s_e m_e L_e
    from the framework's own per-element losses and weighting (its 'sum' reduction where it has one)."""
    return loss_module(framework).render(dataclasses.replace(sem, divisor="one")).function


def _rel(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    denom = max(abs(a), abs(b))
    return 0.0 if denom == 0 else abs(a - b) / denom


def measure(t: Translation, outcome: BackendOutcome, function: str, batches: list[LossBatch],
            reference: dict[str, tuple[float, np.ndarray, float]], sum_case: str | None = None) -> None:
    """Fill ``t`` from the worker's outcome for cases 'FUNCTION@BATCH': loss and gradient against the reference.

    ``sum_case`` names the function that computed the same configuration's
    weighted sum in the same worker ('SUM@BATCH' cases): the measured divisor
    is that sum over the framework's loss, both the framework's own numbers.
    """
    t.environment = outcome.environment
    if outcome.status != "ok":
        t.status, t.error = outcome.status, outcome.error
        return
    u = effective_unit_roundoff(outcome.environment) or UNIT_ROUNDOFF["float32"]
    longest = max(int(np.prod(b.logits.shape)) for b in batches)
    t.rtol = loss_rtol(longest, u)
    failures = []
    for b in batches:
        row = outcome.methods[f"{function}@{b.name}"]
        ref_loss, ref_grad, d = reference[b.name]
        if row.status != "ok":
            failures.append(f"{b.name}: {(row.error or row.status).splitlines()[0]}")
            continue
        loss = float(row.loss)
        loss_rel = _rel(loss, ref_loss)
        _, grad_rel, _ = relative_difference({"logits": np.asarray(row.grads["logits"], dtype=np.float64)},
                                             {"logits": ref_grad}, {})
        weighted_sum = numerator_rel = measured = None
        sums = outcome.methods.get(f"{sum_case}@{b.name}") if sum_case else None
        if sums is not None and sums.status == "ok":
            weighted_sum = float(sums.loss)
            numerator_rel = _rel(weighted_sum, ref_loss * d)
            if loss != 0.0 and math.isfinite(loss):
                measured = weighted_sum / loss
        elif sums is not None:
            failures.append(f"{b.name} (weighted sum): {(sums.error or sums.status).splitlines()[0]}")
        agree = loss_rel <= t.rtol and grad_rel <= t.rtol and (numerator_rel is None or numerator_rel <= t.rtol)
        t.batches.append(BatchAgreement(b.name, loss, ref_loss, d, measured, loss_rel, grad_rel, agree,
                                        weighted_sum, numerator_rel))
    if failures:
        t.status, t.error = "failed", "; ".join(failures)
    else:
        t.status = "ok" if all(b.agree for b in t.batches) else "mismatch"


def translate(text: str, to: tuple[str, ...] = FRAMEWORKS, data: str | None = None, targets: str | None = None,
              seed: int = 0, keras_backend: str = "tensorflow", timeout_s: float = 600.0,
              progress: Callable[[str], None] | None = None, dtype: str = "float64") -> TranslationReport:
    """Parse, render, run every rendering in its framework's worker (in ``dtype``), compare with the
    float64 reference computed on the same ``dtype``-rounded batches."""
    try:
        return translate_many([text], to, data, targets, seed, keras_backend, timeout_s, progress, dtype)[0]
    except Interrupted as exc:  # the one report of what finished
        exc.report = exc.report[0] if exc.report else None
        raise


def translate_many(texts: list[str], to: tuple[str, ...] = FRAMEWORKS, data: str | None = None,
                   targets: str | None = None, seed: int = 0, keras_backend: str = "tensorflow",
                   timeout_s: float = 600.0, progress: Callable[[str], None] | None = None,
                   dtype: str = "float64") -> list[TranslationReport]:
    """``translate`` for several loss texts, with one worker per framework for all of them.

    Every text is planned (and so validated) before any worker starts. Each
    loss runs only on its own batches (named 'L<i>-b<j>').
    """
    say = progress or (lambda _msg: None)
    from gradparity.reference.losses import reduce_loss

    plans = []
    for i, text in enumerate(texts):
        framework, sem, renderings, batches = plan(text, to, data, targets, seed, dtype)
        if len(texts) > 1:
            batches = [dataclasses.replace(b, name=f"L{i}-{b.name}") for b in batches]
        reference = {b.name: reduce_loss(sem, b.logits, b.targets, b.sample_weight if sem.sample_weight else None)
                     for b in batches}
        translations = [Translation(r, role, backend_for(r.framework, keras_backend).name)
                        for role, r in renderings]
        plans.append((text, framework, sem, batches, reference, translations))

    runs, measured = [], {}
    for fw in FRAMEWORKS + OPTIONAL_FRAMEWORKS:
        mine = [(i, t) for i, p in enumerate(plans) for t in p[5] if t.rendering.framework == fw]
        if not mine:
            continue
        info = backend_for(fw, keras_backend)
        # L<i>: the rendering; S<i>: the same configuration's weighted sum (one per loss, shared by the
        # source and a target of the same framework), for the measured divisor.
        functions = {f"L{i}": t.rendering.function for i, t in mine}
        functions.update({f"S{i}": sum_function(fw, plans[i][2]) for i, _ in mine})
        all_batches = [b for i, _ in mine for b in plans[i][3]]
        cases = tuple(f"{f}{i}@{b.name}" for i in dict.fromkeys(i for i, _ in mine) for f in "LS"
                      for b in plans[i][3])
        runs.append(WorkerRun(make_loss_job(info, functions, all_batches, dtype=dtype, cases=cases), info, timeout_s,
                              key=fw, label=f"running {len(mine)} {fw} loss function(s) on {len(all_batches)} "
                                            f"batches ({info.name}) ..."))
        measured[fw] = mine
    outcomes, stopped = run_jobs_until_stopped(runs, say=say, parallel=len(runs))
    for fw, mine in measured.items():
        for i, t in mine:
            measure(t, outcomes[fw], f"L{i}", plans[i][3], plans[i][4], sum_case=f"S{i}")

    reports = []
    for text, framework, sem, batches, reference, translations in plans:
        status, code, summary = _verdict(translations, batches)
        reports.append(TranslationReport(text, framework, sem, batches, translations, status, code, summary,
                                         {name: d for name, (_, _, d) in reference.items()}))
    return raise_if_stopped(stopped, reports)


def _verdict(translations: list[Translation], batches: list[LossBatch]) -> tuple[str, int, str]:
    bad = [t for t in translations if t.status == "mismatch"]
    failed = [t for t in translations if t.status not in ("ok", "mismatch")]
    n = len(batches)
    if bad:
        names = ", ".join(f"{t.rendering.framework} ({t.role})" for t in bad)
        return "mismatch", EXIT_MISMATCH, f"MISMATCH: {names} differ from the reference on some of {n} batches"
    if failed:
        names = ", ".join(f"{t.rendering.framework} ({t.status})" for t in failed)
        return "incomplete", EXIT_INCOMPLETE, f"INCOMPLETE: {names} could not be run; the others match on {n} batches"
    return "match", EXIT_MATCH, (f"MATCH: the source and {len(translations) - 1} translation(s) agree with the "
                                 f"float64 reference in loss and gradient on {n} batches, within the rounding of "
                                 "the dtype each computed in")


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def render_text(report: TranslationReport) -> str:
    """The terminal view: what the source means, each framework's code, and what was measured."""
    sem = report.semantics
    divisors = ", ".join(f"{b.name} {tuple(b.logits.shape)}: {report.divisors[b.name]:g}" for b in report.batches)
    lines = [f"source ({report.framework}): {report.source}",
             f"means: {sem.describe()}",
             f"divisor D per batch: {divisors}" + ("" if sem.divisor in ("one", "count") else
                                                     " (depends on the batch: not a constant factor)"),
             ""]
    for t in report.translations:
        r = t.rendering
        env = t.environment or {}
        versions = " ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        head = f"== {r.framework} ({t.role}; {'native' if r.native else 'explicit: no native equivalent'})"
        lines += [head, r.code.rstrip()]
        lines += [f"  note: {n}" for n in r.notes]
        if t.status in ("ok", "mismatch"):
            measured = [f"{b.batch} {b.measured_divisor:.6g}" for b in t.batches if b.measured_divisor is not None]
            lines.append(f"  measured divisor ({r.framework}'s own weighted sum of per-element losses / its loss): "
                         f"{', '.join(measured)}")
            lines.append(f"  measured on {len(t.batches)} batches ({t.backend}: {versions}, {env.get('dtype')}, "
                         f"{env.get('device')}): loss max rel diff {_g(max(b.loss_rel for b in t.batches))}, "
                         f"d loss/d logits max rel diff {_g(max(b.grad_rel for b in t.batches))}, rtol {_g(t.rtol)}: "
                         + ("MATCHES" if t.status == "ok" else "DOES NOT MATCH"))
        else:
            lines.append(f"  not measured: {t.status}: {(t.error or '').splitlines()[0] if t.error else ''}")
        lines.append("")
    lines.append(report.summary)
    return "\n".join(lines)


__all__ = ["FRAMEWORKS", "TranslationReport", "backend_for", "measure", "plan", "render_text", "sum_function",
           "translate", "translate_many"]


#: The configurations `gradparity loss-table` measures: the questions users ask most.
TABLE_SOURCES = (
    "torch.nn.CrossEntropyLoss()",
    "torch.nn.CrossEntropyLoss(reduction='sum')",
    "torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]))",
    "torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1)",
    "torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0]))",
    "torch.nn.MSELoss(reduction='sum')",
    "keras.losses.SparseCategoricalCrossentropy(from_logits=True)(targets, logits, sample_weight=w)",
    "keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction='mean_with_sample_weight')"
    "(targets, logits, sample_weight=w)",
    "keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)",
    "keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)",
    "keras.losses.MeanSquaredError(reduction='sum')",
    "optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()",
    "optax.sigmoid_binary_cross_entropy(logits, labels).sum()",
)


def table_markdown(reports: list[TranslationReport]) -> str:
    """The equivalence table: per configuration, its divisor (rule and values) and each framework's form."""
    head = ("| configuration | divides by | D on the batches | torch | keras | jax |\n"
            "|---|---|---|---|---|---|")
    rows = [head]
    for r in reports:
        cells = {}
        for t in r.translations:
            form = "native" if t.rendering.native else "explicit"
            mark = {"ok": "matches", "mismatch": "**DIFFERS**"}.get(t.status, t.status)
            cells[t.rendering.framework] = f"{'source, ' if t.role == 'source' else ''}{form}, {mark}"
        shapes = ", ".join(f"{r.divisors[b.name]:g}" for b in r.batches)
        rows.append(f"| `{r.source}` | {DIVISOR_LABELS[r.semantics.divisor]} | {shapes} | "
                    + " | ".join(cells.get(f, "-") for f in FRAMEWORKS) + " |")
    batches = ", ".join(f"{tuple(b.logits.shape)}" for b in reports[0].batches) if reports else ""
    legend = "; ".join(f"{DIVISOR_LABELS[k]}: {v}" for k, v in DIVISORS.items())
    return "\n".join(rows) + (f"\n\nBatches (logits shapes): {batches}; class-index targets padded (-100) where the "
                              "configuration ignores a class (PyTorch's CrossEntropyLoss always ignores -100); "
                              "sample weights in [0.25, 2] where it takes them. 'native': the framework's own loss "
                              "object and reduction; 'explicit': written out with its ops; 'matches': loss and "
                              "d loss/d logits within float64 rounding of the reference on every batch.\n\n"
                              f"Divisors: {legend}.")
