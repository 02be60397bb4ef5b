"""``gradparity compare-losses``: several native loss configurations side by side, on the same batches.

For people choosing a reduction setting (or checking that two frameworks'
settings are the same thing): each configuration runs natively in its own
framework on the same batches; each is checked against its float64 reading
(so the divisor it really used is measured, not stated); and every pair is
classified from the frameworks' own losses and d loss / d logits:

- **equal**: same loss and gradient on every batch;
- **constant factor**: gradient_a = r * gradient_b with the same r on every
  batch (a learning-rate constant);
- **batch-dependent factor**: proportional on every batch, but r changes from
  batch to batch (a ratio of divisors such as valid tokens / N*T): no constant
  learning rate makes them equivalent;
- **not equivalent**: not even proportional on some batch.

The stages are the translate pipeline's: parse -> batches -> one worker per
framework -> compare with the reference -> report.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gradparity.commands.translate import (FRAMEWORKS, OPTIONAL_FRAMEWORKS, Translation, backend_for, loss_module,
                                           measure, sum_function)
from gradparity.compare.pairs import connected_components
from gradparity.compare.tolerance import UNIT_ROUNDOFF, loss_rtol
from gradparity.errors import ConfigError
from gradparity.losses.batches import LossBatch, check_loss_batch, generate_batches, loss_classes, make_loss_job
from gradparity.losses.catalogue import DIVISOR_LABELS, LOSSES, LossSemantics
from gradparity.losses.text import parse_loss_text
from gradparity.run.runner import WorkerRun, raise_if_stopped, run_jobs_until_stopped

from gradparity.exit_codes import EXIT_CONSISTENT, EXIT_INCOMPLETE, EXIT_MISREAD  # 0, 1, 3


@dataclass(frozen=True)
class PairRelation:
    """How configuration ``a`` relates to ``b``: kind, and the factor r = loss_a / loss_b per batch."""

    a: int
    b: int
    kind: str  # equal | constant_factor | batch_dependent_factor | not_equivalent | unknown
    ratios: tuple[float, ...]
    explanation: str

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "relation": self.kind,
                "ratios": [r if math.isfinite(r) else None for r in self.ratios],
                "explanation": self.explanation}


@dataclass
class LossComparison:
    texts: list[str]
    semantics: list[LossSemantics]
    batches: list[LossBatch]
    configurations: list[Translation]
    divisors: list[dict[str, float]]
    pairs: list[PairRelation] = field(default_factory=list)
    classes: list[list[int]] = field(default_factory=list)
    status: str = ""
    exit_code: int = 0
    summary: str = ""

    def to_dict(self) -> dict:
        from gradparity.report.jsonout import strict

        return strict({
            "configurations": [
                {"index": i, "text": text, "meaning": sem.describe(), "semantics": sem.to_dict(),
                 "divisor_rule": sem.divisor, "divisors": self.divisors[i], **c.to_dict()}
                for i, (text, sem, c) in enumerate(zip(self.texts, self.semantics, self.configurations))],
            "batches": [{"name": b.name, "shape": list(b.logits.shape), "describe": b.describe()}
                        for b in self.batches],
            "pairs": [p.to_dict() for p in self.pairs],
            "classes": self.classes,
            "verdict": {"status": self.status, "exit_code": self.exit_code, "summary": self.summary},
        })


def _shared_batches(sems: list[LossSemantics], seed: int) -> list[LossBatch]:
    """Batches every configuration can take: the same targets kind, classes, padding only where all ignore it."""
    targets = {LOSSES[s.kind].target for s in sems}
    if len(targets) > 1:
        raise ConfigError("configurations can be compared only on the same kind of targets; these take "
                          + ", ".join(sorted(targets)))
    classes = {c for c in (loss_classes(s) for s in sems) if c is not None}
    if len(classes) > 1:
        raise ConfigError(f"the configurations' weights imply different numbers of classes: {sorted(classes)}")
    ignores = {s.ignore_index for s in sems}
    # Pad only with a class every configuration ignores: for one that does not, it would be a label out of range.
    pad = ignores.pop() if len(ignores) == 1 else None
    base = dataclasses.replace(sems[0], ignore_index=pad, sample_weight=any(s.sample_weight for s in sems),
                               class_weight=None, pos_weight=None)
    return generate_batches(base, seed, classes=classes.pop() if classes else None)


def _proportional(ga: np.ndarray, gb: np.ndarray, r: float, rtol: float) -> bool:
    scale = max(float(np.max(np.abs(ga))), abs(r) * float(np.max(np.abs(gb))), 1e-300)
    return float(np.max(np.abs(ga - r * gb))) / scale <= rtol


def _relate(i: int, j: int, rows: dict, rtol: float, sems: list[LossSemantics],
            divisors: list[dict[str, float]], batches: list[LossBatch]) -> PairRelation:
    """Classify configurations i and j from their frameworks' own results on every batch."""
    ratios, proportional = [], True
    for b in batches:
        li, gi = rows[i][b.name]
        lj, gj = rows[j][b.name]
        r = li / lj if lj != 0 else math.inf
        ratios.append(r)
        if not (math.isfinite(r) and _proportional(gi, gj, r, rtol)):
            proportional = False
    ratios_t = tuple(ratios)
    if not proportional:
        return PairRelation(i, j, "not_equivalent", ratios_t,
                            "the gradients are not proportional on some batch: they weight the examples "
                            "differently (weights, masks, smoothing or the loss itself), not only divide differently")
    if all(abs(r - 1.0) <= rtol for r in ratios):
        return PairRelation(i, j, "equal", ratios_t, "the same loss and gradient on every batch")
    if all(abs(r - ratios[0]) <= rtol * abs(ratios[0]) for r in ratios):
        return PairRelation(i, j, "constant_factor", ratios_t,
                            f"gradient [{i}] = {ratios[0]:.6g} x gradient [{j}] on every batch: a constant, "
                            f"so a learning rate {ratios[0]:.6g} times smaller for [{i}] makes them equivalent "
                            "under SGD")
    d = ", ".join(f"{divisors[j][b.name] / divisors[i][b.name]:.4g}" for b in batches)
    sizes = [float(np.prod(b.logits.shape[:-1])) for b in batches]
    for power in (1, -1):
        if all(abs(r - n ** power) <= rtol * n ** power for r, n in zip(ratios, sizes)):
            return PairRelation(i, j, "batch_dependent_factor", ratios_t,
                                f"loss [{i}] = loss [{j}] x {'N' if power == 1 else '1/N'} on every batch (N: examples, "
                                "or examples x tokens): a sum against a mean. Constant at a fixed batch size, so a "
                                f"learning rate scaled by {'1/N' if power == 1 else 'N'} makes them equivalent there; "
                                "a short last batch or a new batch size changes it (the blog's lr = B lr0 / B0)")
    return PairRelation(i, j, "batch_dependent_factor", ratios_t,
                        f"proportional on every batch, but the factor changes ({', '.join(f'{r:.4g}' for r in ratios)}): "
                        f"[{i}] divides by {DIVISOR_LABELS[sems[i].divisor]}, [{j}] by "
                        f"{DIVISOR_LABELS[sems[j].divisor]} (their ratio per batch: {d}); no constant learning "
                        "rate makes them equivalent")


def _classes(n: int, pairs: list[PairRelation]) -> list[list[int]]:
    """The equivalence classes: configurations joined by 'equal' pairs."""
    return sorted(connected_components(list(range(n)), ((p.a, p.b) for p in pairs if p.kind == "equal")))


def compare_losses(texts: list[str], seed: int = 0, targets: str | None = None, keras_backend: str = "tensorflow",
                   timeout_s: float = 600.0, progress: Callable[[str], None] | None = None) -> LossComparison:
    """Run every configuration natively on shared batches, check each against its reading, relate every pair."""
    say = progress or (lambda _msg: None)
    if len(texts) < 2:
        raise ConfigError("compare-losses needs at least two loss configurations")
    from gradparity.reference.losses import reduce_loss

    parsed = []
    for text in texts:
        expr = parse_loss_text(text)
        sem = loss_module(expr.framework).parse(expr, targets)
        parsed.append((expr.framework, sem, loss_module(expr.framework).render(sem)))
    sems = [s for _, s, _ in parsed]
    batches = _shared_batches(sems, seed)
    for sem in sems:
        for b in batches:
            check_loss_batch(sem, b)
    references = [{b.name: reduce_loss(sem, b.logits, b.targets, b.sample_weight if sem.sample_weight else None)
                   for b in batches} for sem in sems]
    configs = [Translation(r, "configuration", backend_for(fw, keras_backend).name) for fw, _, r in parsed]
    runs = []
    for fw in FRAMEWORKS + OPTIONAL_FRAMEWORKS:
        mine = [i for i, (f, _, _) in enumerate(parsed) if f == fw]
        if not mine:
            continue
        info = backend_for(fw, keras_backend)
        functions = {f"L{i}": parsed[i][2].function for i in mine}
        functions.update({f"S{i}": sum_function(fw, sems[i]) for i in mine})  # for the measured divisor
        runs.append(WorkerRun(make_loss_job(info, functions, batches), info, timeout_s, key=fw,
                              label=f"running {len(mine)} {fw} configuration(s) on {len(batches)} batches "
                                    f"({info.name}) ..."))
    outcomes, stopped = run_jobs_until_stopped(runs, say=say, parallel=len(runs))
    for i, (fw, _, _) in enumerate(parsed):
        measure(configs[i], outcomes[fw], f"L{i}", batches, references[i], sum_case=f"S{i}")
    divisors = [{name: d for name, (_, _, d) in ref.items()} for ref in references]
    report = LossComparison(list(texts), sems, batches, configs, divisors)

    rows = {}
    for i, (fw, _, _) in enumerate(parsed):
        methods = outcomes[fw].methods
        if configs[i].status in ("ok", "mismatch"):
            rows[i] = {b.name: (float(methods[f"L{i}@{b.name}"].loss),
                                np.asarray(methods[f"L{i}@{b.name}"].grads["logits"], dtype=np.float64))
                       for b in batches}
    u = max((UNIT_ROUNDOFF.get((c.environment or {}).get("dtype"), UNIT_ROUNDOFF["float32"]) for c in configs),
            default=UNIT_ROUNDOFF["float32"])
    rtol = loss_rtol(max(int(np.prod(b.logits.shape)) for b in batches), u)
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if i in rows and j in rows:
                report.pairs.append(_relate(i, j, rows, rtol, sems, divisors, batches))
            else:
                report.pairs.append(PairRelation(i, j, "unknown", (), "one of them could not be run"))
    report.classes = _classes(len(texts), report.pairs)
    misread = [i for i, c in enumerate(configs) if c.status == "mismatch"]
    failed = [i for i, c in enumerate(configs) if c.status not in ("ok", "mismatch")]
    if misread:
        report.status, report.exit_code = "misread", EXIT_MISREAD
        report.summary = (f"MISREAD: configuration(s) {misread} computed something other than gradparity's reading "
                          "of them; their relations are still measured from the frameworks' own numbers")
    elif failed:
        report.status, report.exit_code = "incomplete", EXIT_INCOMPLETE
        report.summary = f"INCOMPLETE: configuration(s) {failed} could not be run"
    else:
        report.status, report.exit_code = "measured", EXIT_CONSISTENT
        report.summary = (f"{len(report.classes)} equivalence class(es) among {len(texts)} configurations on "
                          f"{len(batches)} batches; every configuration computed what it was read as")
    return raise_if_stopped(stopped, report)


def render_text(report: LossComparison) -> str:
    """Each configuration with its divisor per batch, then every pair's relation, then the classes."""
    lines = []
    for i, (text, sem, c) in enumerate(zip(report.texts, report.semantics, report.configurations)):
        env = c.environment or {}
        d = ", ".join(f"{v:g}" for v in report.divisors[i].values())
        check = {"ok": "matches its reading", "mismatch": "DOES NOT match its reading"}.get(c.status, c.status)
        measured = ", ".join("-" if b.measured_divisor is None else f"{b.measured_divisor:.6g}" for b in c.batches)
        lines += [f"[{i}] {text}",
                  f"    {sem.describe()}",
                  f"    divisor per batch: {d}; measured ({c.backend}'s own weighted sum / its loss): "
                  f"{measured or '-'}",
                  f"    {c.backend} ({env.get('dtype')}): {check}"]
    lines += ["", "batches: " + ", ".join(b.describe() for b in report.batches), ""]
    for p in report.pairs:
        lines.append(f"[{p.a}] vs [{p.b}]: {p.kind.replace('_', ' ')}: {p.explanation}")
    lines += ["", "equivalence classes (equal loss and gradient): "
              + "; ".join("{" + ", ".join(f"[{i}]" for i in g) + "}" for g in report.classes), "", report.summary]
    return "\n".join(lines)
