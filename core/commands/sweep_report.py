"""What `gradparity train --sweep` writes and prints: the recipe and the options' tables, the plots, the text.

``commands/sweep.py`` measures (the cells, the options' figures: ``weight_stats``, ``last_batch_effect``,
``grid_results``, ``framework_parity``); this module says what they show, in three forms from the same tables
(``Table``): the terminal text (aligned columns), report.md (markdown tables) and report.html (HTML tables, the
plots embedded). ``train --sweep --out DIR`` writes report.md, report.html, recipe.png (accuracy against batch
size per rule), epochs.png (accuracy per epoch), with ``--lr-grid`` grid.png (accuracy against lr per batch size
and reduction), with ``--class-weights`` weights.png (sum(w)/N of every batch), and report.json last.

Every claim about where linear scaling stops holding is weighed against what the sweep can resolve: with one
seed it is provisional (the seed-to-seed spread is unmeasured), with several the gap is compared with its
standard error over the seeds; without B0 among the batch sizes there is no reference, and the text says so.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field

import numpy as np

from gradparity.commands.sweep import (B0, HOLDS, SKEW, SweepReport, SweepSpec, _holds_up_to, concurrent_workers,
                                       framework_parity, grid_results, last_batch_effect, to_dict, weight_stats)
from gradparity.report.html import (draw_plots, figure_html, html_escape, html_table, not_computed, page_head,
                                    page_tail, png_bytes)
from gradparity.report.outdir import OutputDir

RECIPE_PNG, EPOCHS_PNG, GRID_PNG, WEIGHTS_PNG = "recipe.png", "epochs.png", "grid.png", "weights.png"
SWEEP_FILES = ("report.md", "report.html", RECIPE_PNG, EPOCHS_PNG, GRID_PNG, WEIGHTS_PNG, "report.json")
LINEAR = "mean_linear"


# --- tables ----------------------------------------------------------------------------------------------------

@dataclass
class Table:
    """One of the report's tables: the sentences before it, its head and rows (text cells), the sentences after
    it. ``left``: the columns of words (the terminal aligns them left, the numbers right)."""

    intro: list[str]
    head: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    left: frozenset = frozenset()

    def text(self) -> list[str]:
        """The terminal's form: the intro, aligned columns, the notes (indented)."""
        widths = [max([len(h)] + [len(r[i]) for r in self.rows]) for i, h in enumerate(self.head)]

        def line(cells):
            return "  ".join(c.ljust(w) if i in self.left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        return [*self.intro, line(self.head), *[line(r) for r in self.rows], *[f"  {n}" for n in self.notes]]

    def markdown(self) -> list[str]:
        """report.md's form: the intro as paragraphs, a markdown table, the notes as a list."""
        cell = lambda c: c.replace("|", "\\|")  # noqa: E731
        out = [x for s in self.intro for x in (s, "")]
        out += ["| " + " | ".join(cell(h) for h in self.head) + " |",
                "|" + "".join("---|" if i in self.left else "---:|" for i in range(len(self.head)))]
        out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in self.rows]
        return out + ([""] + [f"- {n}" for n in self.notes] if self.notes else [])

    def html(self) -> str:
        """report.html's form: the intro as paragraphs, an HTML table, the notes as a list."""
        numeric = {i for i in range(len(self.head)) if i not in self.left}
        return "\n".join([f"<p>{html_escape(s)}</p>" for s in self.intro]
                         + [html_table(self.head, self.rows, numeric=numeric)]
                         + (["<ul>" + "".join(f"<li>{html_escape(n)}</li>" for n in self.notes) + "</ul>"]
                            if self.notes else []))


def _missing(report: SweepReport, rule: str, b: int) -> str:
    """Why a main configuration has no accuracy: 'not run' (an interrupted sweep), or its cells' status words."""
    statuses = {c.status for c in report.main_cells if c.rule == rule and c.batch_size == b}
    return ", ".join(sorted(not_computed(s) for s in statuses)) or "not run"


def recipe_table(report: SweepReport) -> Table:
    """The learning rate to use at each batch size: per batch size and rule the held-out accuracy (± its spread
    over the seeds) at the rule's lr, and the best rule; the notes weigh linear scaling against B0's accuracy
    (``linear_lines``) and state the seed-to-seed spread."""
    spec = report.spec
    table, seeds = spec.rules(), report.seeds
    names = list(table)
    intro = [f"learning-rate recipe from (B0 = {B0}, lr0 = {report.lr0:g}), {spec.base.optimizer}, held-out "
             f"accuracy after {spec.epochs} epochs (mean over frameworks"
             + (f" and {len(seeds)} seeds, ± their standard deviation" if len(seeds) > 1 else "")
             + "); each cell: the accuracy at the rule's learning rate for that B:"]
    rows = []
    for b in spec.batch_sizes:
        accs = {n: report.accuracy(n, b) for n in names}
        cells = []
        for n in names:
            _, lr = table[n](report.lr0, b)
            a, sd = accs[n], report.spread(n, b)
            text = (f"{a:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")) if a is not None else _missing(report, n, b)
            cells.append(f"{text} (lr {lr:.3g})")
        best = max((n for n in names if accs[n] is not None), key=lambda n: accs[n], default=None)
        rows.append([str(b), *cells, best or "-"])
    notes = []
    if spec.weighted or spec.last_batch == "keep":
        notes.append(f"reductions: {_reduction_words(spec)}; "
                     f"{'short last batch kept' if spec.last_batch == 'keep' else 'short last batch dropped'}")
    notes += linear_lines(report)
    noise = [v for v in (report.spread(n, b) for n in names for b in spec.batch_sizes) if v is not None]
    if noise:
        notes.append(f"seed-to-seed standard deviation of these accuracies: median {np.median(noise):.3f}, "
                     f"largest {max(noise):.3f} ({len(seeds)} seeds); a difference below about twice it is "
                     "not resolved by this sweep"
                     + (f", and HOLDS = {HOLDS:g} is within it" if np.median(noise) * 2 > HOLDS else ""))
    return Table(intro, ["B", *names, "best"], rows, notes, left=frozenset({len(names) + 1}))


def _examples(report: SweepReport, gap: float) -> str:
    """A gap in accuracy as a count of held-out examples (the accuracy's unit)."""
    if not report.held_out:
        return ""
    return f", {abs(gap) * report.held_out:.0f} of {report.held_out} held-out examples"


def linear_lines(report: SweepReport) -> list[str]:
    """Does linear scaling (mean at lr0 * B / B0) keep B0's accuracy within ``HOLDS``, and where does it stop?
    Without B0 among the batch sizes there is no reference (said, with the sizes run); with one seed a stop is
    provisional (the seed-to-seed spread is unmeasured); with several, a gap counts only when it exceeds twice
    its standard error over the seeds."""
    sizes = report.spec.batch_sizes
    if B0 not in sizes:
        return [f"no linear-scaling verdict: every rule scales lr0 from B0 = {B0} (the batch size lr0 is tuned "
                f"for), and each B is held to B0's accuracy, but the batch sizes run ({', '.join(map(str, sizes))}) "
                f"do not include {B0}, so there is no reference accuracy; add {B0} to --batch-sizes (the accuracies "
                "above compare the rules with each other only)"]
    ref = report.accuracy("mean", B0)
    if ref is None:
        return [f"no linear-scaling verdict: the reference, mean at B0 = {B0} with lr0, has no accuracy "
                f"({_missing(report, 'mean', B0)})"]
    gaps = {b: ref - a for b in sizes if (a := report.accuracy(LINEAR, b)) is not None}
    up_to, stops = _holds_up_to(sizes, {b: g <= HOLDS for b, g in gaps.items()})
    head = (f"linear scaling (mean, lr = B * lr0 / {B0}) keeps the accuracy of B0 = {B0} ({ref:.3f}) within "
            f"{HOLDS:g} up to B = {up_to or B0}")
    if stops is None:
        return [head + " (every larger B measured)"]
    n = len(report.seeds)
    errors = {b: _standard_error(report, b) for b in gaps}
    if n < 2 or errors[stops] is None:
        widest = max((b for b in gaps if b >= stops), key=lambda b: gaps[b])
        largest = (f" (the largest gap: {gaps[widest]:.4f} at B = {widest}{_examples(report, gaps[widest])})"
                   if widest != stops else "")
        return [head + f"; it falls {gaps[stops]:.4f} below at B = {stops}{_examples(report, gaps[stops])}, so it "
                f"would stop holding there{largest}, but this is provisional: "
                + ("the sweep ran one seed, so the seed-to-seed spread is unmeasured" if n < 2 else
                   "the seeds' spread could not be measured there (a configuration failed)")
                + " and a gap of this size may be the seed's (its start, held-out split and data order); "
                "--seeds 0,1,2 measures the spread"]
    failing = [b for b in sorted(gaps) if b >= stops and gaps[b] > HOLDS and errors[b] is not None]
    resolved = next((b for b in failing if gaps[b] > 2 * errors[b]), None)
    parts = [f"at B = {b} it is {gaps[b]:.4f} below, within twice its standard error {errors[b]:.4f} over {n} "
             "seeds: not resolved" for b in failing if resolved is None or b < resolved]
    if resolved is not None:
        parts.append(f"it stops holding at B = {resolved} ({gaps[resolved]:.4f} below, more than twice its "
                     f"standard error {errors[resolved]:.4f} over {n} seeds)")
    else:
        parts.append("so this sweep does not show that it stops holding; more seeds or epochs would decide")
    return [head + "; " + "; ".join(parts)]


def _standard_error(report: SweepReport, b: int) -> float | None:
    """The standard error over the seeds of (mean at B0) - (mean_linear at b), a difference of two means; None
    without two seeds' values on both sides."""
    a, c = report.spread("mean", B0), report.spread(LINEAR, b)
    if a is None or c is None:
        return None
    return math.hypot(a, c) / math.sqrt(len(report.seeds))


def weight_table(report: SweepReport) -> Table | None:
    """With class weights: the per-class weights, and per batch size how far sum(w) / N strays from batch to batch,
    with the accuracy of the weighted mean and of sum_over_batch_size at the same lr."""
    stats = weight_stats(report)
    if stats is None:
        return None
    spec, c = report.spec, report.class_weights
    how = ("n / (10 n_k) from the training split" if spec.class_weights == "balanced" else
           f"per class from 1/{SKEW:g} to {SKEW:g} in geometric steps, classes in a seeded order")
    intro = [f"class weights ({spec.class_weights}: {how}; scaled to mean example weight 1 over the training "
             f"split): " + ", ".join(f"{k}: {v:.3f}" for k, v in enumerate(c)),
             "a sum_over_batch_size step is the weighted mean's step times sum(w) / N of its batch; measured on this "
             "sweep's batches (every step of every epoch):"]
    pairs = [(m, "sobs" + m[4:]) for m in spec.rules() if m.startswith("mean")]
    rows = []
    for s in stats:
        b = s["batch_size"]
        accs = []
        for m, o in pairs:
            am, ao = report.accuracy(m, b), report.accuracy(o, b)
            if am is not None and ao is not None:
                accs.append(f"{m} {am:.3f} / {o} {ao:.3f}")
        rows.append([str(b), str(s["steps"]), f"{s['min']:.3f}", f"{s['max']:.3f}", f"{s['mean']:.3f}",
                     f"{s['std']:.3f}", f"{s['max_over_min']:.2f}", ", ".join(accs)])
    widest = max(stats, key=lambda s: s["max_over_min"])
    notes = [f"no constant lr factor converts one into the other: the factor that would give sum_over_batch_size "
             f"the weighted mean's step is N / sum(w), from {1 / widest['max']:.3f} to {1 / widest['min']:.3f} "
             f"between batches at B = {widest['batch_size']} (a {widest['max_over_min']:.2f}x range); its mean "
             f"over batches, 1 / {widest['mean']:.3f}, is right only on average"]
    return Table(intro, ["B", "steps", "min", "max", "mean", "std", "max/min", "accuracy mean vs sobs (same lr)"],
                 rows, notes, left=frozenset({7}))


def last_batch_table(report: SweepReport) -> Table | None:
    """With ``keep``: per batch size and rule the short batch's weight per example, and keep - drop."""
    effect = last_batch_effect(report)
    if effect is None:
        return None
    intro = ["short last batch kept (each epoch ends with the n mod B examples left, at the rule's lr) vs dropped "
             "(same data order): an example's weight in the update is lr x its factor in the reduced loss "
             "(per unit of sample weight); short / full = that weight in the short step over a full step's:"]
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    rows = [[str(e["batch_size"]), str(e["b_last"]),
             f"{e['batch_size'] / e['b_last']:.3f}" if e["b_last"] else "-", e["rule"],
             fmt(e["short_over_full"], ".3f"), fmt(e["accuracy_keep"], ".3f"), fmt(e["accuracy_drop"], ".3f"),
             fmt(e["accuracy_difference"], "+.3f"), fmt(e["max_rel_param_difference"], ".3g")] for e in effect]
    notes = ["mean and sum_over_batch_size divide by the batch's own size, so a short-batch example weighs "
             "B/b_last times a full-batch one; sum weighs every example the same; the weighted mean divides by "
             f"the batch's own total weight; accuracy in fractions of the {report.held_out} held-out examples, "
             f"one example = {1 / max(report.held_out, 1):.4f}; parameters as the largest |difference| over the "
             "largest |parameter|"]
    return Table(intro, ["B", "b_last", "B/b_last", "rule", "short/full", "acc keep", "acc drop", "keep-drop",
                         "params keep vs drop"], rows, notes, left=frozenset({3}))


def grid_table(report: SweepReport) -> Table | None:
    """With an lr grid: per batch size and reduction the best measured lr against the rules' predictions."""
    grid = grid_results(report)
    if grid is None:
        return None
    intro = [f"learning-rate grid: each rule's lr x {', '.join(f'{m:g}' for m in grid['multipliers'])} "
             f"({len(grid['points'])} distinct (B, reduction, lr) points, held-out accuracy after "
             f"{report.spec.epochs} epochs, mean over frameworks):"]
    rows = []
    for row in grid["best"]:
        n = sum(1 for p in grid["points"] if p["batch_size"] == row["batch_size"] and p["reduction"] == row["reduction"])
        preds = ", ".join(f"{p['rule']} {p['lr']:.3g} ({p['accuracy']:.3f}, {p['best_lr_over_predicted']:.3g}x)"
                          if p["accuracy"] is not None else f"{p['rule']} failed" for p in row["predictions"])
        rows.append([str(row["batch_size"]), row["reduction"], str(n),
                     f"{row['lr']:.4g}" + (" (edge)" if row["at_grid_edge"] else ""), f"{row['multiple_of_lr0']:.3g}",
                     f"{row['accuracy']:.3f}", preds])
    notes = []
    if any(row["at_grid_edge"] for row in grid["best"]):
        notes.append("(edge): the best lr is the smallest or largest measured at that B: the optimum may lie beyond "
                     "the grid")
    one = 1.0 / report.held_out if report.held_out else 0.0
    apart = [p for p in grid["points"] if p["accuracy_max"] - p["accuracy_min"] > one]
    if apart:
        notes.append("frameworks apart by more than one held-out example (" + f"{one:.4f}" + ") at: " + "; ".join(
            f"B {p['batch_size']} {p['reduction']} lr {p['lr']:.3g} ({p['accuracy_min']:.3f} to "
            f"{p['accuracy_max']:.3f})" for p in apart) + " (a learning rate at which training is unstable amplifies "
            "the frameworks' rounding differences)")
    gap = grid["linear_gap_to_best"]
    if gap:
        worst = max(gap, key=lambda b: gap[b])
        at, stops = grid["linear_holds_at"], grid["linear_stops_at"]
        caveat = ("; one seed: provisional, the seed-to-seed spread of these accuracies is unmeasured"
                  if len(report.seeds) < 2 else
                  "; each point is a mean over the seeds: weigh these gaps against the seed-to-seed deviation above")
        notes.append(f"linear scaling against the grid: {grid['linear_rule']} (lr0 * B / {B0}) is within {HOLDS:g} "
                     f"of the best measured lr's accuracy at B = {', '.join(map(str, at)) or 'none'}"
                     + ("" if not stops else
                        f"; it fails already at B0 = {B0}, where lr0 is {gap[str(stops)]:.3f} below the grid's best "
                        f"(lr0 is not the best lr at B0 for this configuration)" if stops == B0 else
                        f"; from B0 = {B0} on it stops holding at B = {stops} ({gap[str(stops)]:.3f} below the best)")
                     + f"; largest gap {gap[worst]:.3f} at B = {worst}" + caveat)
    return Table(intro, ["B", "reduction", "points", "best lr", "x lr0", "acc",
                         "rule predictions: lr (accuracy, best / predicted lr)"], rows, notes,
                 left=frozenset({1, 6}))


def recipe_tables(report: SweepReport) -> list[Table]:
    """The recipe, and the tables of the options that ran (class weights, the short last batch, the lr grid)."""
    return [t for t in (recipe_table(report), weight_table(report), last_batch_table(report), grid_table(report))
            if t is not None]


def recipe_lines(report: SweepReport) -> list[str]:
    """The recipe and the options' tables as the terminal prints them (and report.json's "recipe" holds)."""
    lines = []
    for i, t in enumerate(recipe_tables(report)):
        lines += ([""] if i else []) + t.text()
    return lines


def cells_table(report: SweepReport) -> Table:
    """Every main configuration in every framework: its lr, held-out accuracy after each epoch and the
    per-example training loss of the last epoch; a configuration that did not finish, why."""
    seeds = len(report.seeds) > 1
    rows = []
    for c in sorted(report.main_cells, key=lambda c: (c.batch_size, c.rule, c.backend, c.seed)):
        row = [str(c.batch_size), c.rule, c.backend] + ([str(c.seed)] if seeds else []) + [f"{c.lr:.4g}"]
        if c.status != "ok":
            rows.append(row + [f"{not_computed(c.status).upper()}: {(c.error or c.status).splitlines()[0]}", ""])
        else:
            rows.append(row + [" ".join(f"{a:.3f}" for a in c.accuracy), f"{c.epoch_loss[-1]:.4f}"])
    intro = ["per framework (held-out accuracy after each epoch; per-example training loss of the last epoch"
             + (", weighted by w" if report.spec.weighted else "") + "):"]
    notes = []
    extra = [c for c in report.cells if c.role != "main"]
    if extra:
        failed = [c for c in extra if c.status != "ok"]
        notes.append(f"and {len(extra)} grid / dropped-last-batch framework runs (report.json's extra_cells), "
                     f"{len(failed)} did not finish" + (": " if failed else "") + "; ".join(
                         f"B {c.batch_size} {c.rule} x{c.multiplier:g} {c.last_batch} {c.backend} "
                         f"{not_computed(c.status)}: {(c.error or c.status).splitlines()[0]}" for c in failed))
    head = ["B", "rule", "framework"] + (["seed"] if seeds else []) + ["lr", "accuracy per epoch", "loss"]
    return Table(intro, head, rows, notes, left=frozenset({1, 2, len(head) - 2}))


def parity_lines(report: SweepReport) -> list[str]:
    """Do the frameworks train identically? Per pair, the largest final difference and why."""
    lines = ["do the frameworks train identically (same start, same batches, final parameters compared)?"]
    for p in framework_parity(report):
        if p["max_rel_final_params"] is None:
            lines.append(f"  {p['a']} vs {p['b']}: no configuration ran in both")
            continue
        w = p["where"]
        where = f"B {w['batch_size']}, {w['rule']}" + (f" x{w['multiplier']:g}" if w["multiplier"] != 1 else "") + (
            f", seed {w['seed']}" if len(report.seeds) > 1 else "")
        why = ("the same update in both at a constant lr (their optimizer rules agree), so the difference is "
               "rounding, amplified by training (most where the lr is large)" if p["same_update"] else
               "their optimizer rules differ (" + "; ".join(p["rule_differences"]) + "): `gradparity optimizers` "
               "measures it, `gradparity translate` gives the configuration that removes it")
        lines.append(f"  {p['a']} vs {p['b']}: largest difference {p['max_rel_final_params']:.3g} (relative to the "
                     f"largest parameter; {where}); why: {why}")
    return lines


def timing_lines(report: SweepReport) -> list[str]:
    """The benchmark: the sweep's wall time, and per framework its worker's wall time and time per step."""
    lines = [f"benchmark: the sweep took {report.total_seconds:.1f} s wall in all ({len(report.cells)} "
             f"configurations x framework runs); per framework:"]
    for backend, wall in report.wall_seconds.items():
        cells = [c for c in report.cells if c.backend == backend and c.status == "ok" and c.seconds]
        steps = sum(c.steps for c in cells)
        timed = sum(c.seconds for c in cells)
        per_step = f"{1000 * timed / steps:.3f} ms/step over {steps} steps" if steps else "no timed steps"
        lines.append(f"  {backend:<18} worker {wall:6.1f} s wall (import, set-up, one warm-up run per "
                     f"configuration and the timed run); timed training {timed:6.2f} s: {per_step}")
    lines.append("  (CPU wall-clock time on this machine; one timed run per configuration after its warm-up run, "
                 "which pays compilation; the per-step time includes keeping each step's loss for the report"
                 + ("; the workers ran side by side, sharing the cores" if concurrent_workers(report.spec) > 1
                    else "") + ")")
    return lines


def _reduction_words(spec: SweepSpec) -> str:
    if not spec.weighted:
        return "mean = sum(l) / N, sum = sum(l)"
    return ("weighted: mean* = sum(w l) / sum(w) (torch CrossEntropyLoss(weight=...), Keras mean_with_sample_weight), "
            "sobs* = sum(w l) / N (Keras sum_over_batch_size with sample_weight), sum = sum(w l)")


def _head_lines(report: SweepReport) -> list[str]:
    """The interruption (if any) and the line saying what was swept."""
    base = report.spec.base
    lines = [f"INTERRUPTED by {signal.Signals(report.interrupted).name}: only what finished before it is reported"] \
        if report.interrupted is not None else []
    model = ("" if report.spec.models is not None else  # a check config's models: the description names them
             f"MLP 64-{'-'.join(map(str, base.hidden))}-10 {base.activation}, ")
    return lines + [f"gradparity train --sweep: {base.optimizer}, {model}{base.dtype}; {report.description}"]


def render_text(report: SweepReport) -> str:
    """The terminal's text: what was swept, the recipe and the options' tables, every configuration, the
    benchmark and (with several frameworks) whether they train identically."""
    lines = []
    for line in _head_lines(report):
        lines += [line, ""]
    lines += recipe_lines(report) + [""] + cells_table(report).text()
    lines += [""] + timing_lines(report)
    if len(report.spec.base.backends) > 1:
        lines += [""] + parity_lines(report)
    return "\n".join(lines)


def render_markdown(report: SweepReport) -> str:
    """report.md: the terminal's content, its tables as markdown tables."""
    md = ["# gradparity train --sweep", ""] + [f"- {line}" for line in _head_lines(report)]
    md += ["", "## Learning-rate recipe", ""]
    for t in recipe_tables(report):
        md += t.markdown() + [""]
    md += ["## Every configuration", ""] + cells_table(report).markdown()
    if len(report.spec.base.backends) > 1:
        lines = parity_lines(report)
        md += ["", "## Do the frameworks train identically?", "", lines[0], ""] + [f"- {x.strip()}" for x in lines[1:]]
    lines = timing_lines(report)
    md += ["", "## Benchmark", "", lines[0], ""] + [f"- {x.strip()}" for x in lines[1:]]
    return "\n".join(md) + "\n"


# --- plots ----------------------------------------------------------------------------------------------------

def recipe_figure(report: SweepReport):
    """Held-out accuracy after the last epoch against the batch size, one line per learning-rate rule (the mean
    over frameworks and seeds; with several seeds, bars of one standard deviation over them), each framework's
    value marked; the legend beside the axes."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(9.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    sizes = list(report.spec.batch_sizes)
    rules = list(report.spec.rules())
    for name in rules:
        acc = [report.accuracy(name, b) for b in sizes]
        spread = [report.spread(name, b) for b in sizes]
        line, marker, size = _RULE_STYLES[rules.index(name) % len(_RULE_STYLES)]
        ax.errorbar(sizes, [a if a is not None else float("nan") for a in acc], marker=marker, linestyle=line,
                    markersize=size + 2, markerfacecolor="none", label=name, capsize=3,
                    yerr=None if all(v is None for v in spread) else [v or 0.0 for v in spread])
        for c in report.cells:
            if c.rule == name and c.status == "ok" and c.role == "main":
                ax.plot([c.batch_size], [c.accuracy[-1]], marker="x", color="0.3", markersize=4, linestyle="")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size B")
    ax.set_ylabel(f"held-out accuracy after {report.spec.epochs} epochs (fraction)")
    seeds = report.seeds
    ax.set_title(f"{report.spec.base.optimizer}, lr0 = {report.lr0:g} at B0 = {B0}"
                 + ("" if B0 in sizes else " (not among the batch sizes: no reference)"), fontsize="small")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="x", color="0.3", linestyle="", label="each framework"))
    if len(seeds) > 1:
        handles.append(Line2D([], [], color="0.3", marker="|", linestyle="", markersize=10,
                              label=f"±1 std over {len(seeds)} seeds"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def recipe_png(report: SweepReport, run_id: str) -> bytes:
    """``recipe_figure`` as PNG bytes."""
    return png_bytes(recipe_figure(report), run_id)


#: Line styles and markers per rule, in turn: rules whose curves coincide (``sum`` and ``mean_linear`` train
#: alike) stay visible one over the other.
_RULE_STYLES = (("-", "o", 6), ("--", "s", 4), (":", "^", 3), ("-.", "D", 2), ((0, (1, 3)), "v", 2))


def epochs_figure(report: SweepReport):
    """The figure of ``epochs_png``: one panel per batch size, one line per rule (first framework), whole
    epochs on the x axis; one legend below the panels."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    sizes = list(report.spec.batch_sizes)
    fig = Figure(figsize=(max(3 * len(sizes), 6), 4.3), layout="constrained")
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    first = report.spec.base.backends[0]
    rules = list(dict.fromkeys(c.rule for c in report.main_cells))
    for ax, b in zip(axes, sizes):
        for c in report.main_cells:
            if c.batch_size == b and c.backend == first and c.status == "ok":
                k = rules.index(c.rule)   # a rule's colour and style, whatever its seed
                line, marker, size = _RULE_STYLES[k % len(_RULE_STYLES)]
                ax.plot(range(1, len(c.accuracy) + 1), c.accuracy, linestyle=line, marker=marker, color=f"C{k % 10}",
                        markersize=size, markerfacecolor="none", label=c.rule)
        ax.set_title(f"B = {b}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out accuracy ({first})")
    labelled = {}
    for ax in axes:   # one entry per rule, whichever panel drew it
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        fig.legend(list(labelled.values()), list(labelled), loc="outside lower center", fontsize="x-small",
                   ncols=min(len(labelled), 6))
    return fig


def epochs_png(report: SweepReport, run_id: str) -> bytes:
    """Held-out accuracy after each epoch, one panel per batch size, one line per rule (first framework)."""
    return png_bytes(epochs_figure(report), run_id)


def grid_figure(report: SweepReport):
    """With an lr grid: held-out accuracy against the learning rate, one panel per reduction, one line per batch
    size (mean over frameworks); each rule's prediction (multiplier 1) circled and the best point starred; one
    legend beside the panels."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter

    grid = grid_results(report)
    reductions = list(dict.fromkeys(p["reduction"] for p in grid["points"]))
    fig = Figure(figsize=(4.2 * len(reductions) + 1.8, 4.2), layout="constrained")
    axes = fig.subplots(1, len(reductions), sharey=True, squeeze=False)[0]
    labelled = {}
    for ax, reduction in zip(axes, reductions):
        for b in report.spec.batch_sizes:
            pts = [p for p in grid["points"] if p["batch_size"] == b and p["reduction"] == reduction]
            if not pts:
                continue
            (line,) = ax.plot([p["lr"] for p in pts], [p["accuracy"] for p in pts], marker=".", label=f"B = {b}")
            labelled.setdefault(f"B = {b}", line)
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
    handles = list(labelled.values()) + [
        Line2D([], [], marker="o", markersize=9, fillstyle="none", color="0.3", linestyle="", label="a rule's own lr"),
        Line2D([], [], marker="*", markersize=12, color="0.3", linestyle="", label="best on the grid")]
    fig.legend(handles=handles, loc="outside right upper", fontsize="x-small")
    fig.suptitle(f"{report.spec.base.optimizer}, lr0 = {report.lr0:g} at B0 = {B0}; rules' lr x "
                 f"{', '.join(f'{m:g}' for m in report.spec.lr_grid)}", fontsize="small")
    return fig


def grid_png(report: SweepReport, run_id: str) -> bytes:
    """``grid_figure`` as PNG bytes."""
    return png_bytes(grid_figure(report), run_id)


def weights_png(report: SweepReport, run_id: str) -> bytes:
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


def _sweep_plots(report: SweepReport) -> tuple:
    """The sweep's plots: the recipe and the epochs always, the grid and the weights with their options."""
    draws = [(RECIPE_PNG, recipe_png), (EPOCHS_PNG, epochs_png)]
    if report.spec.lr_grid:
        draws.append((GRID_PNG, grid_png))
    if report.spec.weighted:
        draws.append((WEIGHTS_PNG, weights_png))
    return tuple(draws)


# --- files ------------------------------------------------------------------------------------------------------

def render_sweep_html(report: SweepReport, run_id: str) -> tuple[str, dict[str, bytes]]:
    """report.html's text (the tables as HTML tables, the plots embedded) and its PNGs."""
    pngs, failures = draw_plots(_sweep_plots(report), report, run_id)
    tables = recipe_tables(report)
    options = []
    if report.spec.lr_grid:
        options.append(figure_html(
            GRID_PNG, pngs.get(GRID_PNG), "Held-out accuracy against the learning rate per batch size",
            f"Held-out accuracy (fraction of the held-out examples) after {report.spec.epochs} epochs against the "
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
        "<h1>gradparity train --sweep</h1>",
        '<ul class="facts">' + "".join(f"<li>{html_escape(line)}</li>" for line in _head_lines(report)) + "</ul>",
        "<h2>Learning-rate recipe</h2>", tables[0].html(),
        figure_html(RECIPE_PNG, pngs.get(RECIPE_PNG), "Held-out accuracy against batch size per learning-rate rule",
                f"Held-out accuracy (fraction of the {report.held_out} examples never trained on) after "
                f"{report.spec.epochs} epochs at "
                "each batch size, per learning-rate rule (lines: mean over frameworks; x: each framework, computed "
                f"from its own parameters). {report.description}.", failures.get(RECIPE_PNG)),
        figure_html(EPOCHS_PNG, pngs.get(EPOCHS_PNG), "Held-out accuracy after each epoch per batch size and rule",
                f"Held-out accuracy after each epoch, one panel per batch size, in {report.spec.base.backends[0]} "
                "(the other frameworks agree: see the text below).", failures.get(EPOCHS_PNG)),
        *[t.html() for t in tables[1:]],
        *options,
        "<h2>Do the frameworks train identically?</h2>", "<pre>" + html_escape("\n".join(parity_lines(report))) + "</pre>",
        "<h2>Every configuration</h2>", cells_table(report).html(),
        "<h2>Benchmark</h2>", "<pre>" + html_escape("\n".join(timing_lines(report))) + "</pre>",
        f"<p>Written with report.json and report.md (run {html_escape(run_id)}); report.json lists every file's "
        "SHA-256.</p>", *page_tail(),
    ]
    return "\n".join(parts), pngs


def write_sweep_report(report: SweepReport, folder: OutputDir, run_id: str) -> None:
    """The sweep's files into the claimed ``folder`` as one staged set: report.md, report.html, its PNGs, and
    report.json last, with every other file's SHA-256."""
    from gradparity.report.render import write_files

    page, pngs = render_sweep_html(report, run_id)
    write_files(folder, run_id, None, None, render_markdown(report), dict(to_dict(report), run_id=run_id),
                extra={"report.html": page, **pngs})
