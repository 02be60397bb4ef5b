"""report.html: self-contained, beside report.json, its plots embedded and written as PNG; loads in a browser."""
import base64
import dataclasses
import html
import json
import re
import shutil
import subprocess
import sys

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
