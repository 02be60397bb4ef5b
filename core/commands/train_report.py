"""A training run's report files: report.html with its curves, report.md, report.json, and the arrays.

``gradparity train --out DIR`` writes, as one set (``render.write_files``): report.json (the schema
"gradparity.train/1" document), report.md (the terminal text), report.html (self-contained, plots embedded),
loss.png and drift.png, inputs.npz (the start and the batches) and trajectories.npz (every framework's
parameters after every step). The plots:

- loss.png: the reduced loss at every step, per framework and per numpy rule;
- drift.png: per step, each framework's distance from the float64 trajectory of its own optimizer rule and
  every pair's distance, with the tolerance rtol(t) (relative to the parameters' largest entry, log scale).
"""
from __future__ import annotations

from gradparity.commands.train import TrainReport, render_text, to_dict
from gradparity.report.html import html_escape, figure_html, html_table, draw_plots, page_head, page_tail, png_bytes
from gradparity.report.outdir import OutputDir

LOSS_PNG, DRIFT_PNG = "loss.png", "drift.png"
TRAIN_FILES = ("inputs.npz", "trajectories.npz", "report.md", "report.html", LOSS_PNG, DRIFT_PNG, "report.json")


def loss_figure(report: TrainReport):
    """Two panels: the batch loss per step, and the held-out accuracy after each step; the legend beside them."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, ref, attr in ((loss_ax, report.reference_losses, "losses"),
                          (acc_ax, report.reference_accuracy, "accuracy")):
        for fw, values in ref.items():
            ax.plot(range(1, len(values) + 1), values, color="0.6", linewidth=4, alpha=0.5,
                    label=f"numpy, float64, {fw}'s rule")
        for t in report.trajectories:
            if t.status == "ok":
                values = getattr(t, attr)
                ax.plot(range(1, len(values) + 1), values, marker=".", linewidth=1, label=t.backend)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    loss_ax.set_ylabel(f"{report.spec.reduction}-reduced cross-entropy of the step's batch (nats)")
    acc_ax.set_ylabel("held-out accuracy after the step (fraction)")
    loss_ax.set_title("training loss per step")
    acc_ax.set_title("held-out accuracy")
    handles, labels = loss_ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize="x-small")
    fig.suptitle(f"{report.spec.config().label()}, {report.spec.dtype}", fontsize="small")
    return fig


def loss_png(report: TrainReport, run_id: str) -> bytes:
    """``loss_figure`` as PNG bytes."""
    return png_bytes(loss_figure(report), run_id)


def drift_figure(report: TrainReport):
    """Per step, each framework's distance from its own rule's float64 trajectory and every pair's, with
    rtol(t); the legend below the axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    floor = 1e-18  # exact agreement drawn at the floor of the log scale
    for t in report.trajectories:
        if t.status == "ok":
            ax.plot(range(1, len(t.vs_rule) + 1), [max(d, floor) for d in t.vs_rule], marker=".",
                    label=f"{t.backend} vs numpy with its rule")
    for p in report.pairs:
        ax.plot(range(1, len(p.per_step) + 1), [max(d, floor) for d in p.per_step], linestyle="--",
                label=f"{p.a} vs {p.b}")
    ok = [t for t in report.trajectories if t.status == "ok"]
    if ok:
        rtol = max((t.rule_rtol for t in ok), key=lambda r: r[-1])
        ax.plot(range(1, len(rtol) + 1), rtol, color="black", linewidth=2, label="rtol(t) (least precise side)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max |a - b| / max |p| (parameters)")
    ax.set_title("distance between trajectories per step")
    if ax.get_lines():
        fig.legend(loc="outside lower center", fontsize="x-small", ncols=2)
    ax.grid(alpha=0.3, which="both")
    return fig


def drift_png(report: TrainReport, run_id: str) -> bytes:
    """``drift_figure`` as PNG bytes."""
    return png_bytes(drift_figure(report), run_id)


def render_html(report: TrainReport, run_id: str) -> tuple[str, dict[str, bytes]]:
    """report.html's text and its PNGs; a plot that cannot be drawn leaves a note, never loses the report."""
    pngs, failures = draw_plots(((LOSS_PNG, loss_png), (DRIFT_PNG, drift_png)), report, run_id)
    text = render_text(report).splitlines()
    head = text[:2]
    table_end = next(i for i, line in enumerate(text) if i > 3 and not line.strip())
    rows = [t for t in report.trajectories]
    table = html_table(
        ["backend", "status", "loss step 1", "loss last", "held-out accuracy", "max vs numpy, own rule",
         "first step off", "optimizer"],
        [[t.backend, t.status, f"{t.losses[0]:.6f}" if t.losses else "", f"{t.losses[-1]:.6f}" if t.losses else "",
          f"{t.accuracy[-1]:.4f}" if t.accuracy else "",
          f"{max(t.vs_rule):.3g}" if t.vs_rule else "", str(t.first_off_rule or "none") if t.vs_rule else "",
          (t.info or {}).get("optimizer", t.error or "")] for t in rows],
        ["" if t.status == "ok" and not t.first_off_rule else "bad" for t in rows], numeric={2, 3, 4, 5})
    verdict = text[-1]
    status = "agree" if verdict.startswith("ON TRACK") else "incomplete" if verdict.startswith("INCOMPLETE") \
        else "disagree"
    parts = [
        *page_head(f"gradparity train: {report.spec.config().label()} (run {run_id})"),
        "<h1>gradparity train</h1>",
        '<ul class="facts">' + "".join(f"<li>{html_escape(line)}</li>" for line in head) + "</ul>",
        "<h2>Verdict</h2>", f'<div class="verdict {status}">', f'<p class="summary">{html_escape(verdict)}</p>',
        "<ul>" + "".join(f"<li>{html_escape(line)}</li>" for line in text[table_end + 1:-1] if line.strip()) + "</ul>",
        "</div>",
        "<h2>Plots</h2>",
        figure_html(LOSS_PNG, pngs.get(LOSS_PNG), "Loss and held-out accuracy per step for every framework",
                f"Left: the {report.spec.reduction}-reduced cross-entropy of each step's batch (nats), before that "
                "step's update. Right: accuracy on the held-out digits (fraction) of the parameters after each "
                "step, computed by one float64 numpy forward pass for every framework's parameters. Grey: float64 "
                f"numpy with each framework's optimizer rule. {report.description}.", failures.get(LOSS_PNG)),
        figure_html(DRIFT_PNG, pngs.get(DRIFT_PNG), "Distance between trajectories per step, with the tolerance",
                "Per step, max |a - b| over parameters divided by the largest parameter (dimensionless, log "
                "scale; exact agreement drawn at 1e-18): solid, each framework against the float64 numpy "
                "trajectory of its own optimizer rule; dashed, every pair of frameworks; black, rtol(t) = "
                f"rtol_gradient(u) * t of the least precise side. dtype {report.spec.dtype}.",
                failures.get(DRIFT_PNG)),
        "<h2>Frameworks</h2>", table,
        "<h2>Environment</h2>",
        '<ul class="facts">' + "".join(
            f"<li>{html_escape(t.backend)}: {html_escape((t.environment or {}).get('versions'))}; device "
            f"{html_escape((t.environment or {}).get('device'))}; dtype {html_escape((t.environment or {}).get('dtype'))}; "
            f"loop: {html_escape((t.info or {}).get('loop'))}</li>" for t in rows) + "</ul>",
        f"<p>Written with report.json, report.md, inputs.npz and trajectories.npz (run {html_escape(run_id)}); report.json "
        "lists every file's SHA-256.</p>",
        *page_tail(),
    ]
    return "\n".join(parts), pngs


def claim(out_dir, run_id: str) -> OutputDir:
    """Check and lock the output folder before any training starts (a bad --out is exit 2 up front)."""
    return OutputDir.claim(out_dir, run_id, TRAIN_FILES)


def write_train_report(report: TrainReport, folder: OutputDir, run_id: str) -> None:
    """Write the training report's files into the claimed ``folder``, as one staged set."""
    from gradparity.report.render import write_files

    inputs = {f"params/{k}": v for k, v in report.params.items()}
    for t, (x, y) in enumerate(report.batches, start=1):
        inputs[f"batches/{t}/x"], inputs[f"batches/{t}/y"] = x, y
    arrays = {f"{t.backend}/{step}/{k}": v for t in report.trajectories
              for step, p in enumerate(t.params, start=1) for k, v in p.items()}
    page, pngs = render_html(report, run_id)
    doc = dict(to_dict(report), run_id=run_id)
    write_files(folder, run_id, inputs, arrays, render_text(report), doc, json_default=str,
                extra={"report.html": page, **pngs}, arrays_name="trajectories.npz")


# --- the sweep ------------------------------------------------------------------------------------------------
#
# commands/sweep_report.py renders and writes the sweep's files; the command line takes them from here.

from gradparity.commands import sweep_report as _sweep_report  # noqa: E402

SWEEP_FILES, write_sweep_report = _sweep_report.SWEEP_FILES, _sweep_report.write_sweep_report
