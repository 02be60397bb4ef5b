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

import numpy as np

from gradparity.commands.train import TrainReport, render_text, to_dict
from gradparity.report.html import html_escape, figure_html, html_table, draw_plots, page_head, page_tail, png_bytes
from gradparity.report.outdir import OutputDir

LOSS_PNG, DRIFT_PNG = "loss.png", "drift.png"
TRAIN_FILES = ("inputs.npz", "trajectories.npz", "report.md", "report.html", LOSS_PNG, DRIFT_PNG, "report.json")


def loss_png(report: TrainReport, run_id: str) -> bytes:
    """Two panels: the batch loss per step, and the held-out accuracy after each step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5))
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
    loss_ax.legend(fontsize="x-small")
    fig.suptitle(f"{report.spec.config().label()}, {report.spec.dtype}", fontsize="small")
    fig.tight_layout()
    return png_bytes(fig, run_id)


def drift_png(report: TrainReport, run_id: str) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
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
    ax.legend(fontsize="x-small", ncol=2)
    ax.grid(alpha=0.3, which="both")
    return png_bytes(fig, run_id)


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


# --- the sweep -----------------------------------------------------------------------------------------------
#
# ``train --sweep --out DIR``: report.md, report.html, recipe.png (accuracy against batch size per rule),
# epochs.png (accuracy per epoch), with ``--lr-grid`` grid.png (accuracy against lr per batch size and
# reduction), with ``--class-weights`` weights.png (sum(w)/N of every batch), and report.json last.

RECIPE_PNG, EPOCHS_PNG, GRID_PNG, WEIGHTS_PNG = "recipe.png", "epochs.png", "grid.png", "weights.png"
SWEEP_FILES = ("report.md", "report.html", RECIPE_PNG, EPOCHS_PNG, GRID_PNG, WEIGHTS_PNG, "report.json")


def recipe_png(report, run_id: str) -> bytes:
    """Held-out accuracy after the last epoch against the batch size, one line per learning-rate rule (the mean
    over frameworks and seeds; with several seeds, bars of one standard deviation over them), each framework's
    value marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    sizes = list(report.spec.batch_sizes)
    for name in report.spec.rules():
        acc = [report.accuracy(name, b) for b in sizes]
        spread = [report.spread(name, b) for b in sizes]
        ax.errorbar(sizes, [a if a is not None else float("nan") for a in acc], marker="o", label=name, capsize=3,
                    yerr=None if all(v is None for v in spread) else [v or 0.0 for v in spread])
        for c in report.cells:
            if c.rule == name and c.status == "ok" and c.role == "main":
                ax.plot([c.batch_size], [c.accuracy[-1]], marker="x", color="0.3", markersize=4, linestyle="")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size B")
    ax.set_ylabel(f"held-out accuracy after {report.spec.epochs} epochs (fraction)")
    seeds = report.seeds
    ax.set_title(f"{report.spec.base.optimizer}, lr0 = {report.lr0:g} at B0 = 32 (x: each framework"
                 + (f"; bars: ±1 std over {len(seeds)} seeds" if len(seeds) > 1 else "") + ")")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return png_bytes(fig, run_id)


#: Line styles and markers per rule, in turn: rules whose curves coincide (``sum`` and ``mean_linear`` train
#: alike) stay visible one over the other.
_RULE_STYLES = (("-", "o", 6), ("--", "s", 4), (":", "^", 3), ("-.", "D", 2), ((0, (1, 3)), "v", 2))


def epochs_figure(report):
    """The figure of ``epochs_png``: one panel per batch size, one line per rule (first framework), whole
    epochs on the x axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    sizes = list(report.spec.batch_sizes)
    fig = Figure(figsize=(3 * len(sizes), 3.5))
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    first = report.spec.base.backends[0]
    rules = list(dict.fromkeys(c.rule for c in report.main_cells))
    for ax, b in zip(axes, sizes):
        for c in report.main_cells:
            if c.batch_size == b and c.backend == first and c.status == "ok":
                line, marker, size = _RULE_STYLES[rules.index(c.rule) % len(_RULE_STYLES)]
                ax.plot(range(1, len(c.accuracy) + 1), c.accuracy, linestyle=line, marker=marker,
                        markersize=size, markerfacecolor="none", label=c.rule)
        ax.set_title(f"B = {b}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out accuracy ({first})")
    axes[0].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def epochs_png(report, run_id: str) -> bytes:
    """Held-out accuracy after each epoch, one panel per batch size, one line per rule (first framework)."""
    return png_bytes(epochs_figure(report), run_id)


def grid_png(report, run_id: str) -> bytes:
    """With an lr grid: held-out accuracy against the learning rate, one panel per reduction, one line per batch
    size (mean over frameworks); each rule's prediction (multiplier 1) circled and the best point starred."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    from gradparity.commands.sweep import grid_results

    grid = grid_results(report)
    reductions = list(dict.fromkeys(p["reduction"] for p in grid["points"]))
    fig = Figure(figsize=(4.2 * len(reductions), 4.2))
    axes = fig.subplots(1, len(reductions), sharey=True, squeeze=False)[0]
    for ax, reduction in zip(axes, reductions):
        for b in report.spec.batch_sizes:
            pts = [p for p in grid["points"] if p["batch_size"] == b and p["reduction"] == reduction]
            if not pts:
                continue
            (line,) = ax.plot([p["lr"] for p in pts], [p["accuracy"] for p in pts], marker=".", label=f"B = {b}")
            for p in pts:
                if any(m == 1 for _, m in p["named"]):
                    ax.plot([p["lr"]], [p["accuracy"]], marker="o", markersize=9, fillstyle="none",
                            color=line.get_color(), linestyle="")
            top = next(r for r in grid["best"] if r["batch_size"] == b and r["reduction"] == reduction)
            ax.plot([top["lr"]], [top["accuracy"]], marker="*", markersize=12, color=line.get_color(), linestyle="")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("learning rate (log scale)")
        ax.set_title(f"{reduction}-reduced loss", fontsize="small")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"held-out accuracy after {report.spec.epochs} epochs (fraction)")
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{report.spec.base.optimizer}, lr0 = {report.lr0:g} at B0 = 32; rules' lr x "
                 f"{', '.join(f'{m:g}' for m in report.spec.lr_grid)} (o: a rule's own lr; *: best)",
                 fontsize="small")
    fig.tight_layout()
    return png_bytes(fig, run_id)


def weights_png(report, run_id: str) -> bytes:
    """With class weights: sum(w) / N of every step, per batch size (the factor between a sum_over_batch_size
    step and the weighted mean's), as a box plot with every step's value."""
    from matplotlib.figure import Figure

    sizes = list(report.spec.batch_sizes)
    ratios = [report.sequences[(b, report.spec.last_batch)].weight_ratios() for b in sizes]
    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot()
    ax.boxplot(ratios, whis=(0, 100))
    for i, r in enumerate(ratios, start=1):
        ax.plot(np.full(len(r), i) + np.linspace(-0.15, 0.15, len(r)), r, marker=".", markersize=2, alpha=0.4,
                linestyle="", color="0.3")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(1, len(sizes) + 1), [f"B = {b}\n({len(r)} steps)" for b, r in zip(sizes, ratios)])
    ax.set_ylabel("sum(w) / N of the step's batch")
    ax.set_title(f"{report.spec.class_weights} class weights: sum_over_batch_size step / weighted-mean step",
                 fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return png_bytes(fig, run_id)


def _sweep_plots(report) -> tuple:
    """The sweep's plots: the recipe and the epochs always, the grid and the weights with their options."""
    draws = [(RECIPE_PNG, recipe_png), (EPOCHS_PNG, epochs_png)]
    if report.spec.lr_grid:
        draws.append((GRID_PNG, grid_png))
    if report.spec.weighted:
        draws.append((WEIGHTS_PNG, weights_png))
    return tuple(draws)


def render_sweep_html(report, run_id: str) -> tuple[str, dict[str, bytes]]:
    from gradparity.commands.sweep import parity_lines, recipe_lines, render_text, timing_lines

    pngs, failures = draw_plots(_sweep_plots(report), report, run_id)
    text = render_text(report).splitlines()
    options = []
    if report.spec.lr_grid:
        options.append(figure_html(
            GRID_PNG, pngs.get(GRID_PNG), "Held-out accuracy against the learning rate per batch size",
            f"Held-out accuracy (fraction of the held-out digits) after {report.spec.epochs} epochs against the "
            "learning rate (log scale), one panel per reduction, one line per batch size (mean over frameworks). "
            "Circles: the lr a rule predicts (multiplier 1); stars: the best measured lr on the grid.",
            failures.get(GRID_PNG)))
    if report.spec.weighted:
        options.append(figure_html(
            WEIGHTS_PNG, pngs.get(WEIGHTS_PNG), "sum(w)/N of every batch per batch size",
            "Per batch size, sum(w) / N of every step's batch (dots; box: quartiles, whiskers: min and max): a "
            "sum_over_batch_size step is the weighted mean's step times this factor, so it changes from batch to "
            "batch and no constant lr factor turns one into the other.", failures.get(WEIGHTS_PNG)))
    parts = [
        *page_head(f"gradparity train --sweep: {report.spec.base.optimizer} (run {run_id})"),
        "<h1>gradparity train --sweep</h1>", f'<ul class="facts"><li>{html_escape(text[0])}</li></ul>',
        "<h2>Learning-rate recipe</h2>", "<pre>" + html_escape("\n".join(recipe_lines(report))) + "</pre>",
        figure_html(RECIPE_PNG, pngs.get(RECIPE_PNG), "Held-out accuracy against batch size per learning-rate rule",
                f"Held-out accuracy (fraction of the {report.held_out} digits never trained on) after "
                f"{report.spec.epochs} epochs at "
                "each batch size, per learning-rate rule (lines: mean over frameworks; x: each framework, computed "
                f"from its own parameters). {report.description}.", failures.get(RECIPE_PNG)),
        figure_html(EPOCHS_PNG, pngs.get(EPOCHS_PNG), "Held-out accuracy after each epoch per batch size and rule",
                f"Held-out accuracy after each epoch, one panel per batch size, in {report.spec.base.backends[0]} "
                "(the other frameworks agree: see the text below).", failures.get(EPOCHS_PNG)),
        *options,
        "<h2>Do the frameworks train identically?</h2>", "<pre>" + html_escape("\n".join(parity_lines(report))) + "</pre>",
        "<h2>Every configuration</h2>", "<pre>" + html_escape("\n".join(text[1:])) + "</pre>",
        "<h2>Benchmark</h2>", "<pre>" + html_escape("\n".join(timing_lines(report))) + "</pre>",
        f"<p>Written with report.json and report.md (run {html_escape(run_id)}); report.json lists every file's "
        "SHA-256.</p>", *page_tail(),
    ]
    return "\n".join(parts), pngs


def write_sweep_report(report, folder: OutputDir, run_id: str) -> None:
    """The sweep's files into the claimed ``folder`` as one staged set: report.md, report.html, its PNGs, and
    report.json last, with every other file's SHA-256."""
    from gradparity.commands.sweep import render_text, to_dict
    from gradparity.report.render import write_files

    page, pngs = render_sweep_html(report, run_id)
    write_files(folder, run_id, None, None, render_text(report) + "\n", dict(to_dict(report), run_id=run_id),
                extra={"report.html": page, **pngs})
