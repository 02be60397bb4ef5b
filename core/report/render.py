"""Report: render a run as report.json, report.md, report.html (``gradparity.report.html``) and a terminal
table; save its arrays.

Everything written is what this run measured. The files are written as one
set into a locked folder (``gradparity.report.outdir``), report.json last, so a
report.json on disk always belongs to the npz files beside it; it records
their SHA-256 and every file carries the run id.
"""
from __future__ import annotations

import math
import platform
import zipfile
from pathlib import Path

import numpy as np

from gradparity.version import __version__
from gradparity.backends.protocol import GELU_PROBE
from gradparity.compare.pairs import pair_index
from gradparity.compare.verdict import judged_groups
from gradparity.report.jsonout import dumps, strict
from gradparity.report.outdir import OutputDir
from gradparity.compare.results import Report

SCHEMA_VERSION = 1


#: The files a run writes into its output folder, in the order they are renamed into place
#: (`gradparity check` writes the same set less report.html and its plots).
REPORT_FILES = ("inputs.npz", "gradients.npz", "report.md", "heatmap.png", "max_rel.png", "report.html",
                "report.json")



# --- files -------------------------------------------------------------------

def _write_npz(path: Path, arrays: dict[str, np.ndarray], run_id: str) -> None:
    """np.savez, plus the run id as the archive's zip comment (``zipfile.ZipFile(p).comment``)."""
    with open(path, "wb") as f:  # a file object: np.savez would append '.npz' to a path
        np.savez(f, **arrays)
    with zipfile.ZipFile(path, "a") as z:
        z.comment = f"gradparity run {run_id}".encode()


# --- JSON ------------------------------------------------------------------

def result_rows(results) -> list[dict]:
    """report.json's "results": one row per backend x method (shared by every command's report)."""
    return [{"backend": r.backend, "method": r.method, "status": r.status, "error": r.error,
             "loss": strict(r.loss), "loss_native": strict(r.loss_native),
             "normalization_factor": r.normalization_factor, "factor": r.factor_label,
             "grad_norm": strict(r.grad_norm), "seconds": r.seconds, "dtype": r.dtype,
             "device": r.device, "unit_roundoff": r.unit_roundoff}
            for r in results]


def comparison_rows(comparisons) -> list[dict]:
    """report.json's "comparisons": one row per pair of results."""
    return [{"a": c.a, "b": c.b, "max_abs": strict(c.max_abs), "max_rel": strict(c.max_rel),
             "worst_param": c.worst_param, "cosine": strict(c.cosine), "loss_rel": strict(c.loss_rel),
             "scale": strict(c.scale), "scaled_max_rel": strict(c.scaled_max_rel),
             "unit_roundoff": c.unit_roundoff, "tolerance": c.tolerance, "agree": c.agree}
            for c in comparisons]


def to_dict(report: Report) -> dict:
    """The report.json document."""
    exp, inputs = report.experiment, report.inputs
    return {
        "schema_version": SCHEMA_VERSION,
        "gradparity_version": __version__,
        "run_id": report.run_id,
        "interrupted": report.interrupted,
        "started_utc": report.started_utc,
        "finished_utc": report.finished_utc,
        "host": {"python": platform.python_version(), "platform": platform.platform(),
                 "numpy": np.__version__},
        "experiment": exp.to_dict(),
        "problem": {
            "model": inputs.model.describe(),
            **({"sizes": list(inputs.model.sizes)} if inputs.model.kind == "mlp" else
               {"definition": inputs.model.to_dict(), "layer_settings": layer_settings(report)}),
            "num_params": inputs.model.num_params(),
            "n_examples": inputs.n_examples,
            "data": inputs.data_description,
            "loss": exp.loss.name,
            "convention": "every gradient and loss is rescaled to the gradient/value of the mean loss "
                          "over the batch's examples (normalization_factor per row)",
            "checksums_sha256_16": inputs.checksums(),
        },
        "tolerance": report.tolerance.to_dict(),
        "backends": [
            {"backend": o.backend, "status": o.status, "error": o.error,
             "wall_seconds": o.wall_seconds, "environment": o.environment}
            for o in report.outcomes
        ],
        "results": result_rows(report.results),
        "comparisons": comparison_rows(report.comparisons),
        "causes": {"on": report.experiment.causes.describe(), "effect": switch_effect(report)},
        "verdict": report.verdict.to_dict(),
        "data_parallel": report.data_parallel.to_dict() if report.data_parallel is not None else None,
        "files": {},  # filled by write_report: name -> sha256 of the file written with this report
    }


def gradient_arrays(report) -> dict[str, np.ndarray]:
    """Normalized gradients keyed ``BACKEND/METHOD/PARAM`` (float64), ok rows only."""
    return {f"{r.backend}/{r.method}/{name}": g
            for r in report.results if r.ok for name, g in r.grads.items()}


def write_report(report: Report, out: OutputDir) -> dict[str, Path]:
    """Write inputs.npz, gradients.npz, report.md, the plots, report.html and report.json into the claimed
    folder, as one set."""
    from gradparity.report.html import render_html

    page, pngs = render_html(report)
    return write_files(out, report.run_id, report.inputs.arrays(), gradient_arrays(report),
                       render_markdown(report), to_dict(report), extra={**pngs, "report.html": page})


def write_files(out: OutputDir, run_id: str, inputs: dict[str, np.ndarray] | None,
                gradients: dict[str, np.ndarray] | None,
                markdown: str, doc: dict, json_default=None,
                extra: dict[str, str | bytes] | None = None, arrays_name: str = "gradients.npz") -> dict[str, Path]:
    """A report's files, staged and renamed into place together, report.json last.

    ``extra`` are further files (name -> text or bytes: a run's report.html and its PNG plots), written
    after report.md; ``arrays_name`` names the second npz (a training run's holds trajectories); ``inputs``
    or ``gradients`` None: that npz is not written (a sweep's report has neither). report.json (``doc`` plus
    "files") records the SHA-256 of every other file; every file carries the run id.
    """
    def writer(content):
        if isinstance(content, bytes):
            return lambda p: p.write_bytes(content)
        return lambda p: p.write_text(content, encoding="utf-8")

    with out.staging() as stage:
        sums = {}
        if inputs is not None:
            sums["inputs.npz"] = stage.write("inputs.npz", lambda p: _write_npz(p, inputs, run_id))
        if gradients is not None:
            sums[arrays_name] = stage.write(arrays_name, lambda p: _write_npz(p, gradients, run_id))
        sums["report.md"] = stage.write("report.md", lambda p: p.write_text(markdown))
        for name, content in (extra or {}).items():
            sums[name] = stage.write(name, writer(content))
        doc["files"] = {name: {"sha256": digest} for name, digest in sums.items()}
        stage.write("report.json", lambda p: p.write_text(
            dumps(doc, default=json_default) + "\n"))
    return {name: out.path / name for name in (*sums, "report.json")}


# --- text rendering --------------------------------------------------------

def fmt_g(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def verdict_reading(report: Report) -> tuple[list[str], list[str]] | None:
    """How the verdict reads the finite results: (the labels it counts right, the consensus; the labels it names
    wrong, every other group), or None when it names no consensus (no two results agree while some pair
    disagrees). Without a disagreeing pair every finite result is right (``verdict.judged_groups``)."""
    ok = [r for r in report.results if r.ok]
    if not ok:
        return None
    if all(c.agree for c in report.comparisons):
        return [r.label for r in ok], []
    groups, _ = judged_groups(ok, report.comparisons)
    if len(groups) < 2 or len(groups[0]) < 2:
        return None
    return list(groups[0]), [x for g in groups[1:] for x in g]


#: The reference row of a run's report, when the verdict counts it right.
NUMPY_MEAN = ("numpy", "mean")


def reference_label(report: Report):
    """The row every other row is shown against: a row the verdict counts right (``verdict_reading``), numpy/mean
    when it is one, else the first numpy row among them, else their first; when the verdict names no consensus,
    numpy/mean (else the first ok row), by convention only. None without an ok row."""
    ok = [r for r in report.results if r.ok]
    reading = verdict_reading(report)
    pool = [r for r in ok if r.label in reading[0]] if reading else ok
    for pick in (lambda r: (r.backend, r.method) == NUMPY_MEAN, lambda r: r.backend == "numpy", lambda r: True):
        found = next((r for r in pool if pick(r)), None)
        if found is not None:
            return found
    return None


def reference_note(report: Report) -> str:
    """Why the reference row is the one it is, in words, for the table's and the plot's captions."""
    ref = reference_label(report)
    if ref is None:
        return "no finite result to use as a reference"
    reading = verdict_reading(report)
    if reading is None:
        return (f"{ref.label} by convention only: the verdict names no consensus (no two results agree), so no "
                "row is known right")
    right, wrong = reading
    default = next((r for r in report.results if (r.backend, r.method) == NUMPY_MEAN and r.ok), None)
    if default is not None and default.label in wrong:
        return (f"{ref.label}, one of the {len(right)} results the verdict counts right (the consensus); "
                f"{default.label}, the usual reference, is among those it names wrong")
    if wrong:
        return f"{ref.label}, one of the {len(right)} results the verdict counts right (the consensus)"
    return f"{ref.label}: every result agrees" if len(right) > 1 else f"{ref.label}, the only finite result"


def report_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    ref = reference_label(report)
    pairs = pair_index(report.comparisons)
    head = ["backend", "method", "status", "device", "dtype", "loss (mean)", "factor", "grad L2 norm",
            "time (ms)", f"max_rel vs {ref.label if ref else '-'}", "agree"]
    rows = []
    for r in report.results:
        c = pairs.get((r.label, ref.label)) if ref and r.label != ref.label else None
        if r.ok:
            rows.append([r.backend, r.method, r.status, (r.device or "-")[:24], r.dtype or "-",
                         f"{r.loss:.10g}", r.factor_label, fmt_g(r.grad_norm, 6),
                         fmt_g(r.seconds * 1e3 if r.seconds is not None else None),
                         "(reference)" if r is ref else fmt_g(c.max_rel if c else None),
                         "" if c is None else ("yes" if c.agree else "NO")])
        else:
            rows.append([r.backend, r.method, r.status.upper(), "-", r.dtype or "-", "-", r.factor_label,
                         "-", "-", _reason(r.error), ""])
    return head, rows


def _reason(error: str | None, width: int = 80) -> str:
    """A failed row's reason for the table: the error's first line, cut at a word boundary (full text below)."""
    first = error.splitlines()[0].strip() if error else ""
    if len(first) <= width:
        return first
    cut = first[:width - 1].rsplit(" ", 1)[0]
    return cut + " …"


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def error_lines(report: Report) -> list[str]:
    """Each distinct error once: per backend when the whole backend failed, else per row."""
    out, seen = [], set()
    for o in report.outcomes:
        if o.status != "ok" and o.error:
            out.append(f"{o.backend} ({o.status}): {o.error}")
            seen.add(o.backend)
    for r in report.results:
        if not r.ok and r.backend not in seen:
            out.append(f"{r.label} ({r.status}): {r.error}")
    return out


def environment_lines(report: Report, full: bool = True) -> list[str]:
    """One line per backend; ``full`` lists every precision setting read back (else only TF32)."""
    lines = []
    for o in report.outcomes:
        env = o.environment
        if not env:
            lines.append(f"{o.backend}: no environment ({o.status})")
            continue
        versions = " ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        extra = f", keras backend {env['keras_backend']}" if env.get("keras_backend") else ""
        prec = env.get("precision", {})
        prec_s = ", ".join(f"{k}={v}" for k, v in prec.items())
        note = f" [{env['device_note']}]" if env.get("device_note") else ""
        lines.append(f"{o.backend}: {versions}{extra}; device {env.get('device')}{note}; "
                     f"dtype {env.get('dtype')}; TF32 possible: {'yes' if env.get('tf32') else 'no'}"
                     + (f"; precision {prec_s}" if full else ""))
    return lines


def header_line(report: Report) -> list[str]:
    exp, inp, tol = report.experiment, report.inputs, report.tolerance
    rtol = tol.to_dict()["rtol"]
    lines = [
        f"gradparity {__version__}: experiment {exp.name!r}, {inp.model.describe()}, "
        f"{exp.loss.name}, {inp.data_description}",
        f"dtype {exp.dtype}, device {exp.device}, precision {exp.precision}, seed {exp.seed}; "
        f"every result rescaled to the mean-loss gradient",
        f"tolerance: {tol.formula()}",
        f"rtol by arithmetic: float32 {fmt_g(rtol['float32'])}, float64 {fmt_g(rtol['float64'])}, "
        f"TF32 {fmt_g(rtol['tf32'])}",
        f"run {report.run_id}, {report.started_utc} to {report.finished_utc}",
    ]
    if report.interrupted:
        lines.insert(0, f"INTERRUPTED by {report.interrupted}: a partial report of what finished")
    return lines + _layer_lines(report) + _cause_lines(report)


def layer_settings(report: Report) -> dict | None:
    """A built-in CNN or sequence model's layer settings: those requested, and per backend those it reported
    computing with (None for the MLP)."""
    if report.inputs.model.kind == "mlp":
        return None
    return {"requested": report.inputs.model.options.to_dict(),
            "per_backend": {o.backend: (o.environment or {}).get("layer_options") for o in report.outcomes}}


def _layer_lines(report: Report) -> list[str]:
    """The layer settings each backend computed with, and whether they were the same everywhere."""
    settings = layer_settings(report)
    if settings is None:
        return []
    mode = settings["requested"]["defaults"]

    model = report.inputs.model

    def text(d: dict) -> str:
        parts = [f"GELU {d['gelu']}"] if model.kind == "sequence" or model.activation == "gelu" else []
        if report.inputs.model.kind == "sequence":
            parts.append(f"LayerNorm epsilon {d['layernorm_epsilon']:g}")
        else:
            odd = "bottom/right" if d["same_padding"] == "end" else "both sides, k//2"
            parts.append(f"padding {d['padding']}" + (f" (odd total: {odd})" if d["padding"] == "same" else ""))
        return ", ".join(parts)

    reported = {b: text(d) for b, d in settings["per_backend"].items() if d}
    measured = [f"{o.backend} {o.environment['gelu_accuracy']['max_abs_error']:.2g}" for o in report.outcomes
                if (o.environment or {}).get("gelu_accuracy")]
    accuracy = ([f"each framework's own GELU, max abs error on {GELU_PROBE[2]} points in "
                 f"[{GELU_PROBE[0]:g}, {GELU_PROBE[1]:g}] (measured in its worker): " + ", ".join(measured)]
                if measured else [])
    if mode == "explicit":
        head = "layer settings, set explicitly in every backend (model.defaults = 'explicit'): "
    else:
        head = ("layer settings: each framework's own defaults (model.defaults = 'framework'; the numpy reference "
                "computes the requested values), so differences between backends include them: ")
    if len(set(reported.values())) <= 1 and reported:
        return [head + next(iter(reported.values())) + " (as each backend reported)"] + accuracy
    return [head + "; ".join(f"{b}: {t}" for b, t in reported.items())] + accuracy


def switch_effect(report: Report) -> dict | None:
    """With discrepancy switches on: the largest difference they made (the pair, max_rel, its share of rtol)."""
    if not report.experiment.causes.on():
        return None
    measured = [c for c in report.comparisons if c.max_rel is not None and math.isfinite(c.max_rel)]
    if not measured:
        return None
    worst = max(measured, key=lambda c: c.max_rel)
    return {"a": worst.a, "b": worst.b, "max_rel": worst.max_rel, "rtol": worst.tolerance,
            "times_rtol": worst.max_rel / worst.tolerance if worst.tolerance else None}


def _cause_lines(report: Report) -> list[str]:
    """What each discrepancy switch did, and the largest difference the run then shows."""
    on = report.experiment.causes.describe()
    lines = [f"discrepancy switch causes.{name} ON: {text}" for name, text in on.items()]
    effect = switch_effect(report)
    if effect is not None:
        times = f", {effect['times_rtol']:.3g} x its rtol {fmt_g(effect['rtol'])}" if effect["times_rtol"] else ""
        lines.append(f"effect: largest difference {effect['a']} vs {effect['b']}, max_rel {fmt_g(effect['max_rel'])}"
                     f"{times}; the switches are this run's only departure from its experiment; "
                     "`gradparity diagnose` on this report ranks the causes")
    return lines


def _reference_lines(report: Report) -> list[str]:
    """The terminal's line under the table when some pair disagrees: which row the table measures against, and
    why that one."""
    if reference_label(report) is None or all(c.agree for c in report.comparisons):
        return []
    return [f"reference row: {reference_note(report)}"]


def render_text(report: Report) -> str:
    """The terminal view: context, the results table, errors, the verdict and its explanation."""
    head, rows = report_rows(report)
    parts = (header_line(report) + [""] + environment_lines(report, full=False)
             + ["(precision settings read back per backend: report.md)", "", _table(head, rows)]
             + _reference_lines(report) + [""])
    errors = error_lines(report)
    if errors:
        parts += ["Errors:"] + [f"  {e}" for e in errors] + [""]
    parts.append(report.verdict.summary)
    parts += [f"  {line}" for line in report.verdict.explanation]
    if report.data_parallel is not None:
        from gradparity.report.parallel import render_lines

        parts += [""] + render_lines(report.data_parallel)
    return "\n".join(parts)


def render_markdown(report: Report) -> str:
    """report.md: the same content as report.json, for people."""
    head, rows = report_rows(report)
    md = ["# gradparity report", ""]
    md += [f"- {line}" for line in header_line(report)]
    md += ["", "## Verdict", "", f"**{report.verdict.summary}**", ""]
    md += [f"- {line}" for line in report.verdict.explanation]
    md += ["", "## Environment", ""] + [f"- {line}" for line in environment_lines(report)]
    md += ["", "## Results", "", "Times are wall-clock milliseconds, the median of 3 calls after one warm-up call, "
           "gradients copied to host memory included.", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", f"Reference row: {reference_note(report)}."]
    errors = error_lines(report)
    if errors:
        md += ["", "## Errors", ""] + ["```\n" + e + "\n```" for e in errors]
    md += ["", "## Comparisons", "",
           f"{len(report.comparisons)} pairs, disagreeing first, then by share of tolerance used. "
           "max_rel is relative to each parameter tensor's scale S_p (see the tolerance line).", "",
           "| a | b | max_abs | max_rel | worst param | cosine | loss_rel | rtol | agree |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(report.comparisons, key=lambda c: (c.agree, -(c.max_rel / c.tolerance))):
        md.append(f"| {c.a} | {c.b} | {fmt_g(c.max_abs)} | {fmt_g(c.max_rel)} | {c.worst_param} | "
                  f"{c.cosine:.9f} | {fmt_g(c.loss_rel)} | {fmt_g(c.tolerance)} | {'yes' if c.agree else '**NO**'} |")
    md += ["", "## Problem", "", f"- parameters: {report.inputs.model.num_params()} "
           f"({', '.join(f'{k} {v}' for k, v in report.inputs.model.param_shapes().items())})",
           "- inputs.npz checksums (SHA-256, 16 hex): "
           + ", ".join(f"{k} {v}" for k, v in report.inputs.checksums().items()),
           ""]
    if report.data_parallel is not None:
        from gradparity.report.parallel import render_markdown as parallel_markdown

        md += parallel_markdown(report.data_parallel)
    return "\n".join(md)
