"""What ``gradparity check`` says: the terminal text and report.md, report.json's extra files (the report stage of
``commands/check.py``'s pipeline).

``render_text`` is what a person reads (the conversion or the weight mapping, the rows, the pairs beyond tolerance,
the localization, the cost per backend, the verdict); ``write_check_report`` writes inputs.npz, gradients.npz,
report.md and report.json as one set.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from gradparity.experiment.conversion import describe_counts

if TYPE_CHECKING:
    from gradparity.commands.check import ModelReport, TrainingParity

#: Trainable parameters above which a check keeps float32 rows in float32 and writes one method per backend into
#: gradients.npz (12 float64 rows of a 124M-parameter model would take 12 GB of this process's memory).
LARGE_MODEL = 2 ** 24


def _g(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def render_text(report: ModelReport) -> str:
    """What a person reads: the mapping, the rows, the pairs beyond tolerance, the localization, the verdict."""
    spec = report.spec
    inputs = (", ".join(f"{arg}={spec.inputs.get(arg, arg)} {list(a.shape)} {a.dtype}" for arg, a in spec.named.items())
              if spec.named else f"x {list(spec.x.shape)} {spec.x.dtype}")
    weights = ("each model's own (paired by value)" if spec.own_weights else f"from {spec.source}")
    lines = [f"gradparity check: {', '.join(f'{fw} {spec.factories[fw]}' for fw in spec.frameworks)}",
             f"batch: {inputs}; targets {spec.targets or 'y'} {list(spec.y.shape)}"
             f"{'; output ' + spec.output if spec.output else ''}; loss {spec.loss} "
             f"(mean over {report.loss_elements} terms); {spec.dtype}; {spec.mode} mode; weights {weights}"]
    for o in report.outcomes:
        env = o.environment or {}
        versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
        lines.append(f"  {o.backend}: {o.status}; {versions or '-'}; device {env.get('device', '-')}; "
                     f"dtype {env.get('dtype', '-')}")
    source = report.layouts.get(spec.source)
    for fw, wm in report.maps.items():
        if fw in report.conversions:
            c = report.conversions[fw]
            state = "exact" if c.exact else f"{len(c.problems)} PROBLEMS"
            lines += ["", f"conversion {spec.source} -> {fw}: {describe_counts(c)}; {state}"]
            shown = [line for line in c.lines() if "DIFFERS" in line or "no counterpart" in line]
            changed = [line for line in c.lines() if "same layout" not in line and line not in shown]
            lines += ["  " + line for line in (shown + changed[:6])[:24]]
            if len(changed) > 6:
                lines.append(f"  ... {len(changed) - 6} more with a layout change (report.json lists every tensor)")
            continue
        lines += ["", f"weights {spec.source} -> {fw} ({len(wm.assign)} tensors):"]
        lines += ["  " + line for line in wm.lines(source, report.layouts[fw])]
    wide = max([8, *(len(r.factor_label) for r in report.results)])  # "1/108 (4 examples x 27 tokens)"
    lines += ["", f"{'backend':<18} {'method':<11} {'status':<8} {'loss (mean)':>14} {'factor':>{wide}} "
                  f"{'grad L2':>10} {'time (ms)':>10}"]
    for r in report.results:
        ms = "-" if r.seconds is None else f"{1000 * r.seconds:.3g}"
        lines.append(f"{r.backend:<18} {r.method:<11} {r.status:<8} {_g(r.loss):>14} {r.factor_label:>{wide}} "
                     f"{_g(r.grad_norm):>10} {ms:>10}")
    bad = [c for c in report.comparisons if not c.agree]
    worst = max(report.comparisons, key=lambda c: c.max_rel / c.tolerance, default=None)
    if worst is not None:
        lines += ["", f"{len(report.comparisons)} pairs compared; largest max_rel {_g(worst.max_rel)} "
                      f"({worst.a} vs {worst.b}, {worst.worst_param}; tolerance {_g(worst.tolerance)})"]
    for c in bad[:8]:
        lines.append(f"  beyond tolerance: {c.a} vs {c.b}: max_rel {_g(c.max_rel)} in {c.worst_param}, "
                     f"loss {_g(c.loss_rel)} (tolerance {_g(c.tolerance)})")
    if len(bad) > 8:
        lines.append(f"  ... and {len(bad) - 8} more pairs beyond tolerance (report.json lists every pair)")
    errors = [r for r in report.results if not r.ok]
    for r in errors[:6]:
        lines.append(f"  {r.label}: {r.status}: {(r.error or '').splitlines()[0] if r.error else ''}")
    if report.localizations:
        lines += ["", "localization (activations captured layer by layer, in the source's call order):"]
        for loc in report.localizations:
            where = (f"first differs at {loc.at}'s {loc.where} (max_rel {_g(loc.max_rel)}): "
                     f"{', '.join(loc.candidates) or loc.first_layer}" if loc.first_layer
                     else "every captured activation agrees"
                     + (f"; only the parameter gradient of {loc.parameter_layer} differs "
                        f"({', '.join(t['param'] for t in loc.parameter_tensors)})" if loc.parameter_layer else ""))
            lines.append(f"  {loc.backend} vs {loc.source}: {where}")
            if loc.suggestion:  # the setting the captured arrays point at, tested on them (localize._what_to_change)
                lines.append(f"    {loc.suggestion}")
    lines += _training_lines(report.training)
    if report.costs:
        lines += ["", "cost per backend (wall seconds per stage; the worker process's peak resident memory):"]
        for backend, cost in report.costs.items():
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in cost["seconds"].items())
            peak = cost["peak_rss_mib"]
            lines.append(f"  {backend}: {stages}; peak {'-' if peak is None else f'{peak:,.0f} MiB'}")
    lines += ["", report.verdict.summary] + ["  " + line for line in report.verdict.explanation]
    return "\n".join(lines)


def _training_lines(training: TrainingParity | None) -> list[str]:
    if training is None:
        return []
    lines = ["", f"training: {training.steps} steps of {training.optimizer} on the batch (mean loss), from the mapped "
                 "weights; each port's trainable parameters against the source's at every step"]
    for backend, losses in training.losses.items():
        lines.append(f"  {backend}: loss {losses[0]:.6g} -> {losses[-1]:.6g}")
    for backend, error in training.errors.items():
        lines.append(f"  {backend}: training FAILED: {error.splitlines()[0]}")
    for p in training.pairs:
        if p["first_apart"] is None:
            lines.append(f"  {p['a']} vs {p['b']}: same trajectory at every step ({p['tensors']} tensors, largest "
                         f"{max(p['per_step']):.3g}, rtol at step {training.steps} {p['rtol'][-1]:.3g})")
        else:
            t = p["first_apart"]
            lines.append(f"  {p['a']} vs {p['b']}: APART from step {t} ({p['per_step'][t - 1]:.3g} > rtol "
                         f"{p['rtol'][t - 1]:.3g}), {p['per_step'][-1]:.3g} after step {training.steps}")
    return lines


def write_check_report(report: ModelReport, folder, run_id: str) -> None:
    """inputs.npz, gradients.npz, report.md and report.json, written as one set (report.json last)."""
    from gradparity.report.render import gradient_arrays, write_files

    doc = report.to_dict()
    doc["run_id"] = run_id
    markdown = f"# gradparity check (run {run_id})\n\n```text\n{render_text(report)}\n```\n"
    arrays = gradient_arrays(report)
    if any(r.ok and r.grads and next(iter(r.grads.values())).dtype == np.float32 for r in report.results) and \
            sum(int(np.size(a)) for a in arrays.values()) > LARGE_MODEL * len(report.outcomes):
        first = {o.backend: next((r.method for r in report.results if r.ok and r.backend == o.backend), None)
                 for o in report.outcomes}
        arrays = {k: v for k, v in arrays.items() if k.split("/", 2)[1] == first.get(k.split("/", 1)[0])}
        doc["gradients_file"] = {"rows": [f"{b}/{m}" for b, m in first.items() if m],
                                 "why": "a large model: one method per backend (the others agree with it or are "
                                        "listed under comparisons)"}
    inputs = {"x": report.spec.x, "y": report.spec.y, **{f"inputs/{k}": v for k, v in report.spec.named.items()}}
    write_files(folder, run_id, inputs, arrays, markdown, doc, json_default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
