"""report.html: self-contained, beside report.json, its plots embedded and written as PNG; loads in a browser."""
import base64
import dataclasses
import html
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gradparity
from gradparity.backends import BACKENDS
from gradparity.report.outdir import sha256

from conftest import TINY, fake

METHODS = ["none_loop", "sum", "mean", "one_by_one"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]+)">')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One numpy-only run (float64 reference, 4 methods, tiny synthetic data) written to a folder."""
    out = tmp_path_factory.mktemp("html") / "out"
    exp = gradparity.load_experiment(None, {**TINY, "backends": ["numpy"], "methods": METHODS})
    report = gradparity.run_experiment(exp, out)
    return out, report


def test_report_html_is_self_contained_and_embeds_the_pngs_beside_it(run_dir):
    out, report = run_dir
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Nothing from the network, nothing from beside it: no external src/href, no script or style files.
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.I)
    assert "<script src" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert "http://" not in page and "https://" not in page
    # The verdict, the run id and every result's label are in the page.
    assert report.verdict.status == "agree"
    assert html.escape(report.verdict.summary) in page
    assert report.run_id in page
    for r in report.results:
        assert f"<td>{r.backend}</td><td>{r.method}</td>" in page, r.label
    # Two PNG plots, each decoding to exactly the file written beside the page, with alt text and a caption.
    images = IMG_RE.findall(page)
    assert len(images) == 2 and page.count("<img") == 2
    for (data, alt), name in zip(images, ("heatmap.png", "max_rel.png")):
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG_MAGIC) and png == (out / name).read_bytes(), name
        assert alt and f"also saved as {name}" in page
    assert page.count("<figcaption>") == 2 and "dtype float32" in page and "rtol float32" in page
    # report.json lists (and checksums) every other file, the page and the plots included.
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["files"]) == {"inputs.npz", "gradients.npz", "report.md", "report.html", "heatmap.png",
                                 "max_rel.png"}
    for name, entry in doc["files"].items():
        assert sha256(out / name) == entry["sha256"], name


def test_pngs_carry_the_run_id_and_matplotlib_is_not_imported_by_gradparity(run_dir):
    out, report = run_dir
    for name in ("heatmap.png", "max_rel.png"):
        assert f"gradparity run {report.run_id}".encode() in (out / name).read_bytes()
    code = "import sys, gradparity, gradparity.report.render, gradparity.report.html; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_failed_and_disagreeing_results_are_shown(tmp_path, fake_env):
    """A backend that forgets 1/N in "mean" and one whose "sum" raises: the page still renders both plots."""
    forgets, raises = fake("forgets_mean"), fake("raise_in_sum")
    exp = dataclasses.replace(gradparity.load_experiment(None, TINY), backends=("numpy", forgets.name, raises.name),
                              methods=("sum", "mean"))
    report = gradparity.run_experiment(exp, tmp_path, registry={**BACKENDS, forgets.name: forgets,
                                                               raises.name: raises}, extra_env=fake_env)
    assert report.verdict.status == "disagree"
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(IMG_RE.findall(page)) == 2 and 'class="verdict disagree"' in page
    assert '<tr class="failed"><td>fake-raise_in_sum</td><td>sum</td>' in page
    assert '<tr class="bad"><td>fake-forgets_mean</td><td>mean</td>' in page
    assert (tmp_path / "heatmap.png").read_bytes().startswith(PNG_MAGIC)


# --- in a real browser ---------------------------------------------------------------------------

def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not installed (apt-get install -y chromium); the browser check of report.html needs it")


def _load(page, tmp_path) -> tuple[dict[str, str], list[str]]:
    """Open ``page`` in headless chromium: the body's data-* attributes after load, and console messages."""
    done = subprocess.run(
        [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stdout[:2000]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    # chromium logs every console message (console.log/error, uncaught exceptions) as ":CONSOLE" lines.
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return attrs, console


def test_report_html_loads_in_a_headless_browser_with_its_plots(run_dir, tmp_path):
    out, _ = run_dir
    attrs, console = _load(out / "report.html", tmp_path)
    assert console == []
    assert attrs == {"images-total": "2", "images-loaded": "2"}

    # The check can fail: a damaged plot lowers the count, and a console message is seen.
    page = (out / "report.html").read_text(encoding="utf-8")
    data = IMG_RE.findall(page)[1][0]
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace(data, "AAAA" + data[40:], 1), encoding="utf-8")
    attrs, _ = _load(broken, tmp_path)
    assert attrs == {"images-total": "2", "images-loaded": "1"}
    noisy = tmp_path / "noisy.html"
    noisy.write_text(page.replace("</body>", "<script>console.error('boom'); nosuchfunction();</script></body>"),
                     encoding="utf-8")
    _, console = _load(noisy, tmp_path)
    assert any("boom" in line for line in console) and any("nosuchfunction" in line for line in console)


def test_rows_that_never_ran_are_not_called_failed():
    """An interrupted run's rows never started: the plots say so ("not run"), and name a missing framework or a
    timeout as such; only an error is "failed"."""
    from gradparity.report.html import _tick

    assert _tick("jax/mean", "interrupted") == "jax/mean (not run)"
    assert _tick("jax/mean", "missing") == "jax/mean (not installed)"
    assert _tick("jax/mean", "timeout") == "jax/mean (timed out)"
    assert _tick("jax/mean", "crashed") == "jax/mean (failed)"
    assert _tick("jax/mean", "ok") == "jax/mean"


# --- the plots follow the verdict and hide nothing -----------------------------------------------------------------

def legend_overlaps(fig) -> list[str]:
    """Every (legend, axes) pair whose boxes overlap on the drawn canvas, by more than a pixel each way; and an
    entry when the figure has no legend at all (so that a check cannot pass by having none). Deterministic
    geometry: the boxes are those matplotlib lays out when drawing, in display pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    if not legends:
        return ["no legend"]
    out = []
    for legend in legends:
        lb = legend.get_window_extent(renderer)
        for k, ax in enumerate(fig.axes):
            ab = ax.get_window_extent(renderer)   # the axes' data area (its background patch)
            wide = min(lb.x1, ab.x1) - max(lb.x0, ab.x0)
            high = min(lb.y1, ab.y1) - max(lb.y0, ab.y0)
            if wide > 1 and high > 1:
                out.append(f"legend {[t.get_text() for t in legend.get_texts()]} over axes {k} "
                           f"({ax.get_title()!r}): {wide:.0f} x {high:.0f} px")
    return out


DOUBLE_NORMALIZATION_TOML = """\
# A user's experiment: the mean loss divided by the batch size a second time, as a user's own code might.
backends = ["numpy"]
methods = ["none_loop", "sum", "mean", "one_by_one"]
device = "cpu"

[data]
source = "synthetic"
batch_size = 6
num_features = 5
num_classes = 3

[model]
hidden = [4]
activation = "tanh"

[causes]
double_normalization = true
"""


@pytest.fixture(scope="module")
def wrong_reference(tmp_path_factory):
    """A run whose usual reference row, numpy/mean, is the wrong result: the config above, written as a user
    writes it."""
    folder = tmp_path_factory.mktemp("wrongref")
    (folder / "exp.toml").write_text(DOUBLE_NORMALIZATION_TOML)
    report = gradparity.run_experiment(gradparity.load_experiment(folder / "exp.toml"), folder / "out")
    return folder / "out", report


def _majority(out) -> tuple[set[str], set[str]]:
    """From gradients.npz alone, with plain numpy: the largest group of rows whose gradients are equal to float64
    rounding (np.allclose, rtol 1e-9), and the other rows."""
    arrays = np.load(out / "gradients.npz")
    rows: dict[str, dict[str, np.ndarray]] = {}
    for key in arrays.files:
        backend, method, param = key.split("/", 2)
        rows.setdefault(f"{backend}/{method}", {})[param] = arrays[key]
    same = lambda a, b: all(np.allclose(rows[a][p], rows[b][p], rtol=1e-9, atol=0) for p in rows[a])  # noqa: E731
    groups = []
    for label in rows:
        group = next((g for g in groups if same(label, g[0])), None)
        if group is None:
            groups.append([label])
        else:
            group.append(label)
    best = max(groups, key=len)
    return set(best), set(rows) - set(best)


def test_the_bar_chart_and_the_table_follow_the_verdict_when_numpy_mean_is_wrong(wrong_reference):
    """causes.double_normalization makes numpy/mean, the usual reference row, one of the wrong results: the bar
    chart and the results table must not then show the right rows as disagreeing. The reference is a row of the
    majority (found here from the arrays with plain numpy), the bars are coloured by the verdict's reading, and
    report.md says why the reference is that row."""
    from gradparity.report.html import RIGHT_COLOUR, WRONG_COLOUR, max_rel_figure

    out, report = wrong_reference
    right, wrong = _majority(out)
    assert wrong == {"numpy/mean"} and len(right) == 3        # the switch's definition: mean divided by N again
    assert report.verdict.status == "disagree" and "numpy/mean: disagrees with the consensus" in "\n".join(
        report.verdict.explanation)

    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| backend |"))
    reference = header.split("max_rel vs ")[1].split(" |")[0]
    assert reference in right, header
    for line in md.splitlines():
        if line.startswith("| numpy |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            label = f"numpy/{cells[1]}"
            if label != reference:
                assert cells[-1] == ("NO" if label in wrong else "yes"), line
    assert "numpy/mean, the usual reference, is among those it names wrong" in md

    fig = max_rel_figure(report)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert reference not in ticks and set(ticks) == (right | wrong) - {reference}
    bars = {ticks[round(p.get_x() + p.get_width() / 2)]: p for p in ax.patches}
    assert set(bars) == set(ticks)
    from matplotlib.colors import to_hex

    for label, bar in bars.items():
        assert to_hex(bar.get_facecolor()) == (WRONG_COLOUR if label in wrong else RIGHT_COLOUR), label
    assert reference in ax.get_title() and "in the consensus" in ax.get_title()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Colours follow the verdict" in page and html.escape(f"{reference}, one of the 3 results") in page


def test_the_run_plots_keep_their_legends_off_the_data(wrong_reference, run_dir):
    """The bar chart's legend sits outside its axes (it covered the bars at upper left), for a disagreeing run
    and an agreeing one."""
    from gradparity.report.html import max_rel_figure

    for _, report in (wrong_reference, run_dir):
        assert legend_overlaps(max_rel_figure(report)) == []
