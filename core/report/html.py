"""report.html: one self-contained page (no network, plots embedded as PNG) beside report.json.

``render_html(report)`` returns the page and the PNG files it embeds, so the
same bytes are written beside it (``heatmap.png``, ``max_rel.png``). The page
holds the markdown report's facts (header, verdict, environment, results,
comparisons, errors) and two plots:

- a heat map of every pair's max_rel / rtol (the share of its tolerance the
  pair used; log colour scale, diverging at 1, disagreeing pairs hatched);
- a bar chart of every result's max_rel against the reference row, with
  each pair's rtol drawn over its bar.

matplotlib is imported only here, inside the drawing functions, with the Agg
canvas and the object API (no pyplot, no global state), so ``import
gradparity`` stays light. A plot that cannot be drawn leaves a visible note in
the page instead of losing the report.
"""
from __future__ import annotations

import base64
import html
import io
import math

from gradparity.compare.pairs import pair_index
from gradparity.report.render import (environment_lines, error_lines, fmt_g, header_line, reference_label,
                                      reference_note, report_rows, verdict_reading)
from gradparity.compare.results import Report

HEATMAP_PNG = "heatmap.png"
MAX_REL_PNG = "max_rel.png"
#: The PNG files report.html embeds (and a run writes beside it), in order.
PLOT_FILES = (HEATMAP_PNG, MAX_REL_PNG)

#: The heat map's colour range, as max_rel / rtol (values outside are clipped to the ends).
SHARE_MIN, SHARE_MAX = 1e-4, 1e2
_DPI = 100


# --- plots -------------------------------------------------------------------------------------

def png_bytes(fig, run_id: str) -> bytes:
    """The figure as PNG bytes, carrying the run id (a tEXt "Comment" chunk: ``PIL.Image.open(p).text``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None, "Comment": f"gradparity run {run_id}"})
    return buf.getvalue()


def _rtol_text(report: Report) -> str:
    rtol = report.tolerance.to_dict()["rtol"]
    return f"rtol float32 {rtol['float32']:.3g}, float64 {rtol['float64']:.3g}"


def _context(report: Report) -> str:
    exp = report.experiment
    return f"experiment {exp.name!r}, dtype {exp.dtype}, device {exp.device}"


def heatmap_png(report: Report) -> bytes:
    """Every pair's max_rel / rtol, rows x columns = the results' labels; failed results grey 'n/a'."""
    import numpy as np
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    labels = [r.label for r in report.results]
    pairs = pair_index(report.comparisons)
    n = len(labels)
    side = max(4.5, 0.42 * n + 3.0)
    fig = Figure(figsize=(side + 1.6, side), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(f"max_rel / rtol, every pair\n{_context(report)}", fontsize=9)
    if not report.comparisons:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no pair of results to compare", ha="center", va="center", transform=ax.transAxes)
        return png_bytes(fig, report.run_id)
    lo, hi = math.log10(SHARE_MIN), math.log10(SHARE_MAX)
    values = np.full((n, n), np.nan)
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            c = pairs.get((a, b)) if i != j else None
            if c is not None:
                share = c.max_rel / c.tolerance if c.tolerance else math.inf
                share = share if not math.isnan(share) else math.inf
                values[i, j] = hi if share == math.inf else lo if share <= 0 else min(max(math.log10(share), lo), hi)
    cmap = _share_colormap(lo, hi).with_extremes(bad="#d9d9d9")
    image = ax.imshow(values, cmap=cmap, norm=Normalize(vmin=lo, vmax=hi), aspect="equal")
    small = n > 14
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            c = pairs.get((a, b)) if i != j else None
            if i == j:
                ax.add_patch(_cell(i, j, facecolor="white", edgecolor="#bbbbbb"))
                ax.text(j, i, "-", ha="center", va="center", fontsize=7, color="#888888")
            elif c is None:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=6 if small else 7, color="#555555")
            else:
                if not c.agree:
                    ax.add_patch(_cell(i, j, facecolor="none", edgecolor="black", hatch="///", linewidth=1.2))
                share = c.max_rel / c.tolerance if c.tolerance else math.inf
                if not small:
                    ax.text(j, i, _short(share), ha="center", va="center", fontsize=7,
                            color="white" if not -2.5 <= values[i, j] <= 1.3 else "black",
                            fontweight="normal" if c.agree else "bold")
    status = {r.label: r.status for r in report.results}
    ax.set_xticks(range(n), labels=[_tick(label, status[label]) for label in labels], rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels=[_tick(label, status[label]) for label in labels], fontsize=7)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = list(range(int(lo), int(hi) + 1))
    bar.set_ticks(ticks, labels=[f"1e{t}" if t else "1" for t in ticks])
    bar.set_label("max_rel / rtol (>1: disagree)")
    bar.ax.axhline(0.0, color="black", linewidth=1.5)
    return png_bytes(fig, report.run_id)


def _share_colormap(lo: float, hi: float):
    """Over log10(max_rel / rtol) from ``lo`` to ``hi``: blue (far inside the tolerance) through white (at
    it, log10 = 0) to red (beyond it)."""
    from matplotlib.colors import LinearSegmentedColormap

    at = -lo / (hi - lo)  # where the tolerance (share 1) falls on the scale
    return LinearSegmentedColormap.from_list(
        "share_of_rtol", [(0.0, "#2c7bb6"), (at * 0.6, "#abd9e9"), (at, "#f7f7f7"),
                          (at + (1 - at) * 0.3, "#fdae61"), (1.0, "#b2182b")])


def _cell(i: int, j: int, **kw):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, **kw)


#: How a row that computed nothing is marked on a plot, by its status ("failed" for the rest).
_NOT_COMPUTED = {"interrupted": "not run", "missing": "not installed", "timeout": "timed out",
                 "nonfinite": "non-finite"}


def not_computed(status: str) -> str:
    """Why a row with ``status`` has no value, in words ("not run", "not installed", "timed out", "non-finite",
    else "failed")."""
    return _NOT_COMPUTED.get(status, "failed")


def _tick(label: str, status: str) -> str:
    """A row's label, with why it has no value when it has none (an interrupted run's rows never ran)."""
    return label if status == "ok" else f"{label} ({_NOT_COMPUTED.get(status, 'failed')})"


def _short(share: float) -> str:
    if math.isnan(share):
        return "nan"
    if not math.isfinite(share):
        return "inf"
    if share == 0:
        return "0"
    if 0.01 <= share < 100:
        return f"{share:.2g}"
    mantissa, exponent = f"{share:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


#: The bar chart's colours: a row the verdict counts right (in the consensus), and one it names wrong.
RIGHT_COLOUR, WRONG_COLOUR = "#4d9221", "#c51b7d"


def bar_colours(report: Report) -> dict[str, tuple[str, str]]:
    """Per finite row other than the reference: (colour, legend label), from the verdict's own reading of the
    rows (``render.verdict_reading``), so the chart cannot call a row right that the verdict names wrong; where
    the verdict names no consensus, from the row's pair with the reference (which is then a convention)."""
    ref = reference_label(report)
    reading = verdict_reading(report)
    pairs = pair_index(report.comparisons)
    out = {}
    for r in report.results:
        if not r.ok or ref is None or r.label == ref.label:
            continue
        if reading is not None:
            out[r.label] = ((RIGHT_COLOUR, "right: in the consensus") if r.label in reading[0] else
                            (WRONG_COLOUR, "named wrong by the verdict"))
        else:
            c = pairs.get((r.label, ref.label))
            out[r.label] = ((RIGHT_COLOUR, "agrees with the reference") if c is not None and c.agree else
                            (WRONG_COLOUR, "disagrees with the reference"))
    return out


def outside_legend(fig, handles, ncols: int = 1):
    """A legend beside the axes (to the right, in the figure's constrained layout), never over the data."""
    return fig.legend(handles=handles, loc="outside right upper", fontsize=7, ncols=ncols, frameon=True)


def max_rel_figure(report: Report):
    """Each result's max_rel against the reference row (log scale), with each pair's rtol over its bar, coloured
    by the verdict's reading (``bar_colours``); the legend outside the axes."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ref = reference_label(report)
    pairs = pair_index(report.comparisons)
    others = [r for r in report.results if ref is None or r.label != ref.label]
    width = max(5.5, 0.5 * len(others) + 2.5) + 2.2   # the legend's column beside the axes
    fig = Figure(figsize=(width, 4.6), layout="constrained")
    ax = fig.add_subplot()
    if ref is None or not others:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no result to compare with a reference", ha="center", va="center",
                transform=ax.transAxes)
        return fig
    reading = verdict_reading(report)
    why = ("reference by convention: no consensus" if reading is None else
           "reference: in the consensus" if reading[1] else "every result agrees")
    ax.set_title(f"max_rel of each result vs {ref.label} ({why})\n{_context(report)}", fontsize=9)
    colours = bar_colours(report)
    rows = [(r, pairs.get((r.label, ref.label))) for r in others]
    measured = [c.max_rel for _, c in rows if c is not None and math.isfinite(c.max_rel) and c.max_rel > 0]
    tols = [c.tolerance for _, c in rows if c is not None and c.tolerance > 0]
    floor = 10.0 ** math.floor(math.log10(min(measured + tols) / 100.0)) if measured + tols else 1e-20
    top = max([v for v in measured + tols if math.isfinite(v)] + [floor * 10]) * 30.0
    ax.set_yscale("log")
    ax.set_ylim(floor, top)
    odd = False   # a consensus row over rtol against this reference (the consensus joins through other rows)
    for x, (r, c) in enumerate(rows):
        if c is None:
            ax.text(x, floor * 3, f"n/a ({_NOT_COMPUTED.get(r.status, 'failed')})" if not r.ok else "n/a",
                    rotation=90, ha="center", va="bottom",
                    fontsize=7, color="#555555")
            continue
        value = c.max_rel if math.isfinite(c.max_rel) else top
        height = max(value, floor)
        colour, _ = colours[r.label]
        hatch = "//" if reading is not None and colour == RIGHT_COLOUR and not c.agree else None
        odd = odd or hatch is not None
        ax.bar(x, height - floor, bottom=floor, width=0.7, color=colour, hatch=hatch, edgecolor="black" if hatch
               else colour, label=r.label)
        ax.hlines(c.tolerance, x - 0.45, x + 0.45, colors="black", linewidth=2)
        text = "0" if c.max_rel == 0 else "inf" if not math.isfinite(c.max_rel) else f"{c.max_rel:.2g}"
        ax.text(x, height * 1.4, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), labels=[r.label for r, _ in rows], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.set_ylabel(f"max_rel vs {ref.label}\n(max |a_p - b_p| / S_p)", fontsize=8)
    labels = dict(colours.values())
    handles = [Patch(color=colour, label=labels[colour]) for colour in (RIGHT_COLOUR, WRONG_COLOUR)
               if colour in labels]
    if odd:
        handles.append(Patch(facecolor=RIGHT_COLOUR, edgecolor="black", hatch="//",
                             label="in the consensus, over rtol\nagainst this reference"))
    outside_legend(fig, handles + [Line2D([], [], color="black", linewidth=2, label="rtol of the pair")])
    ax.grid(axis="y", which="major", alpha=0.3)
    return fig


def max_rel_png(report: Report) -> bytes:
    """``max_rel_figure`` as PNG bytes."""
    return png_bytes(max_rel_figure(report), report.run_id)


# --- the page -----------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto;
       max-width: 72em; padding: 0 1em; color: #1a1a1a; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
ul.facts li { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em; }
.verdict { padding: 0.6em 1em; border-left: 6px solid #888; background: #f6f6f6; }
.verdict.agree { border-color: #1a9641; } .verdict.disagree { border-color: #d7191c; }
.verdict.incomplete, .verdict.interrupted { border-color: #e6a100; }
.verdict p.summary { font-weight: bold; margin: 0.2em 0 0.5em; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #eee; } tr.bad td { background: #fde0e0; } tr.failed td { color: #777; }
td.num { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #333; max-width: 60em; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; font-size: 0.8em; white-space: pre-wrap; }
.note { color: #a00; font-weight: bold; }
"""

# A self-check, not needed to read the page: once loaded, count the plots that decoded (body's
# data-images-loaded / data-images-total; the browser test reads them) and say so when one did not.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesTotal = String(imgs.length);
  document.body.dataset.imagesLoaded = String(loaded);
  if (loaded < imgs.length) { document.getElementById("broken").hidden = false; }
});
"""


def page_head(title: str) -> list[str]:
    """The lines that open a self-contained report page: head, inline CSS, and the note a broken plot shows."""
    return ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{html_escape(title)}</title>",
            f"<style>{_CSS}</style>", "</head>", "<body>",
            '<p id="broken" class="note" hidden>An embedded plot did not load: the file may be damaged; the PNG '
            "files beside it hold the same plots.</p>"]


def page_tail() -> list[str]:
    """The lines that close a report page, with the self-check the browser test reads."""
    return [f"<script>{_SCRIPT}</script>", "</body>", "</html>", ""]


def html_escape(text) -> str:
    return html.escape(str(text), quote=True)


def html_table(head: list[str], rows: list[list[str]], classes: list[str] | None = None,
                numeric: set[int] = frozenset()) -> str:
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html_escape(h)}</th>" for h in head) + "</tr></thead>", "<tbody>"]
    for k, row in enumerate(rows):
        cls = f' class="{classes[k]}"' if classes and classes[k] else ""
        cells = "".join(f'<td class="num">{html_escape(c)}</td>' if i in numeric else f"<td>{html_escape(c)}</td>"
                        for i, c in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def figure_html(name: str, png: bytes | None, alt: str, caption: str, failure: str | None) -> str:
    if png is None:
        return f'<p class="note">{html_escape(name)} could not be drawn: {html_escape(failure)}</p>'
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{html_escape(name)}">\n<img src="data:image/png;base64,{data}" alt="{html_escape(alt)}">\n'
            f"<figcaption>{html_escape(caption)} (also saved as {html_escape(name)} beside this file.)</figcaption>\n</figure>")


def draw_plots(draws, *args) -> tuple[dict[str, bytes], dict[str, str]]:
    """``draws``: (file name, function of ``*args`` returning PNG bytes). The PNGs that could be drawn, and for
    the others why not (the report is never lost to a plot)."""
    pngs, failures = {}, {}
    for name, draw in draws:
        try:
            pngs[name] = draw(*args)
        except ImportError as exc:
            failures[name] = f"matplotlib is not importable ({exc}); pip install matplotlib"
        except Exception as exc:  # noqa: BLE001 - a plotting bug must not cost the measured report
            failures[name] = f"{type(exc).__name__}: {exc}"
    return pngs, failures


def _bar_caption(report: Report) -> str:
    """What the bar chart's colours mean for this report."""
    if verdict_reading(report) is None:
        return ("The verdict names no consensus, so no row is known right: green, the pair with the reference "
                "agrees; magenta, it does not.")
    return ("Colours follow the verdict: green, a row it counts right (in the consensus, the largest group of "
            "results that agree); magenta, a row it names wrong. A green bar hatched and over its rtol is in the "
            "consensus through other rows, not through its pair with the reference.")


def parallel_html(section) -> list[str]:
    """The data-parallel engines' section (``run --data-parallel``): its table, rows that differ from the
    single-device gradient marked, and the per-backend summary."""
    from gradparity.report.parallel import summary_lines, table_rows

    head, rows = table_rows(section)
    b = section.batches
    classes = ["" if r[-1] == "yes" else "failed" if r[-1] == "-" else "bad" for r in rows]
    return ["<h2>Data-parallel engines</h2>",
            f"<p>R = {section.spec.replicas} replicas on this machine; global batches: even {b.even} examples, uneven "
            f"{b.uneven}. factor = the engine's gradient over the single-device gradient of the same global batch "
            "with the same reduction (when one constant; dimensionless); expected = what the framework's documented "
            "convention gives; max_rel and rtol as for the results above.</p>",
            html_table(head, rows, classes, numeric={7, 8}),
            "<ul>" + "".join(f"<li>{html_escape(line.strip())}</li>" for line in summary_lines(section)) + "</ul>"]


def render_html(report: Report) -> tuple[str, dict[str, bytes]]:
    """report.html's text and the PNG files it embeds ({file name: bytes})."""
    pngs, failures = draw_plots(((HEATMAP_PNG, heatmap_png), (MAX_REL_PNG, max_rel_png)), report)
    exp, verdict = report.experiment, report.verdict
    ref = reference_label(report)
    rtol_text = _rtol_text(report)
    head, rows = report_rows(report)
    agree_col = head.index("agree")
    classes = ["failed" if not r.ok else "bad" if row[agree_col] == "NO" else ""
               for r, row in zip(report.results, rows)]
    parts = [
        *page_head(f"gradparity report: {exp.name} ({verdict.status}, run {report.run_id})"),
        "<h1>gradparity report</h1>",
        '<ul class="facts">' + "".join(f"<li>{html_escape(line)}</li>" for line in header_line(report)) + "</ul>",
        "<h2>Verdict</h2>",
        f'<div class="verdict {html_escape(verdict.status)}">',
        f'<p class="summary">{html_escape(verdict.summary)}</p>',
        "<ul>" + "".join(f"<li>{html_escape(line)}</li>" for line in verdict.explanation) + "</ul>",
        "</div>",
        "<h2>Plots</h2>",
        figure_html(HEATMAP_PNG, pngs.get(HEATMAP_PNG),
                "Heat map of max_rel / rtol for every pair of results",
                "Every pair of results (rows x columns: backend/method), coloured by max_rel / rtol, the share "
                "of its tolerance the pair used (dimensionless; log colour scale from 1e-4 to 1e2, values "
                "beyond clipped to the ends; blue: well inside, white: at the tolerance, red: beyond it). "
                "max_rel is the largest |a_p - b_p| / S_p over parameter tensors. Hatched cells: the pair "
                "disagrees (max_rel or the loss difference above rtol). Grey 'n/a': a failed result, not "
                f"compared. {_context(report)}; {rtol_text}; the pair's rtol is that of its less precise side.",
                failures.get(HEATMAP_PNG)),
        figure_html(MAX_REL_PNG, pngs.get(MAX_REL_PNG),
                f"Bar chart of each result's max_rel against {ref.label if ref else 'the reference'}, "
                "with each pair's tolerance",
                f"max_rel of each result against the reference row, {reference_note(report)} (dimensionless: "
                "max |a_p - b_p| / S_p over parameter tensors; log scale). Black bars across each column: "
                f"that pair's rtol. {_bar_caption(report)} {_context(report)}; {rtol_text}.",
                failures.get(MAX_REL_PNG)),
        "<h2>Results</h2>",
        "<p>Times are wall-clock milliseconds, the median of 3 calls after one warm-up call, gradients "
        "copied to host memory included.</p>",
        html_table(head, rows, classes, numeric={5, 7, 8, 9}),
    ]
    errors = error_lines(report)
    if errors:
        parts += ["<h2>Errors</h2>"] + [f"<pre>{html_escape(e)}</pre>" for e in errors]
    if report.data_parallel is not None:
        parts += parallel_html(report.data_parallel)
    comps = sorted(report.comparisons, key=lambda c: (c.agree, -(c.max_rel / c.tolerance)))
    parts += [
        "<h2>Comparisons</h2>",
        f"<p>{len(report.comparisons)} pairs, disagreeing first, then by share of tolerance used. max_rel is "
        "relative to each parameter tensor's scale S_p (see the tolerance line).</p>",
        html_table(["a", "b", "max_abs", "max_rel", "max_rel / rtol", "worst param", "cosine", "loss_rel", "rtol",
                     "agree"],
                    [[c.a, c.b, fmt_g(c.max_abs), fmt_g(c.max_rel), fmt_g(c.max_rel / c.tolerance if c.tolerance else None),
                      c.worst_param, f"{c.cosine:.9f}", fmt_g(c.loss_rel), fmt_g(c.tolerance), "yes" if c.agree else "NO"]
                     for c in comps],
                    ["" if c.agree else "bad" for c in comps], numeric={2, 3, 4, 6, 7, 8}),
        "<h2>Environment</h2>",
        '<ul class="facts">' + "".join(f"<li>{html_escape(line)}</li>" for line in environment_lines(report)) + "</ul>",
        f"<p>Written with report.json, report.md, inputs.npz and gradients.npz (run {html_escape(report.run_id)}); "
        "report.json lists every file's SHA-256.</p>",
        *page_tail(),
    ]
    return "\n".join(parts), pngs
