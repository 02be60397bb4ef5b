"""The command line end to end on a tiny experiment: files, schema, exit codes, recheckability."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import installed

TINY_TOML = textwrap.dedent("""
    name = "tiny"
    device = "cpu"
    timeout_s = 300
    [model]
    hidden = [4]
    activation = "tanh"
    [data]
    source = "synthetic"
    batch_size = 6
    num_features = 5
    num_classes = 3
""")


def gradparity(*args, env=None, cwd=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "gradparity", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=900)


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


def framework():
    return next((b for b in ("torch", "jax", "keras-tensorflow") if installed(b)), None)


def recheck(comparison, grads, term_scale):
    """max_rel recomputed from gradients.npz: per tensor, max|a-b| / max(|a|, |b|, T_p)."""
    worst = 0.0
    prefix_a, prefix_b = comparison["a"] + "/", comparison["b"] + "/"
    for key in grads:
        if key.startswith(prefix_a):
            param = key[len(prefix_a):]
            a, b = grads[key], grads[prefix_b + param]
            scale = max(np.max(np.abs(a)), np.max(np.abs(b)), term_scale[param])
            worst = max(worst, np.max(np.abs(a - b)) / scale)
    return worst


def test_run_writes_a_complete_recheckable_report(tiny, tmp_path):
    backends = ["numpy"] + ([framework()] if framework() else [])
    out = tmp_path / "out"
    proc = gradparity("run", str(tiny), "--backends", ",".join(backends), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "AGREE" in proc.stdout
    doc = json.loads((out / "report.json").read_text())
    assert doc["schema_version"] == 1 and doc["verdict"]["status"] == "agree"
    assert doc["experiment"]["name"] == "tiny" and doc["problem"]["sizes"] == [5, 4, 3]
    for b in doc["backends"]:
        assert b["status"] == "ok" and b["environment"]["versions"] and b["environment"]["device"]
    n_results = 5 * len(backends)
    assert len(doc["results"]) == n_results
    assert len(doc["comparisons"]) == n_results * (n_results - 1) // 2
    for r in doc["results"]:
        assert {"backend", "method", "loss", "normalization_factor", "grad_norm", "seconds", "status",
                "error"} <= set(r)
        assert r["normalization_factor"] == (1.0 if r["method"] == "mean" else 1 / 6)
    with np.load(out / "gradients.npz") as z:
        grads = {k: z[k] for k in z.files}
    assert "numpy/mean/layers.0.kernel" in grads and grads["numpy/mean/layers.0.kernel"].shape == (5, 4)
    for c in doc["comparisons"]:
        assert c["max_rel"] == pytest.approx(recheck(c, grads, doc["tolerance"]["term_scale"]),
                                             rel=1e-9, abs=1e-300)
        assert c["agree"] == (c["max_rel"] <= c["tolerance"] and c["loss_rel"] <= c["tolerance"])
    with np.load(out / "inputs.npz") as z:
        assert set(z.files) == {"params/layers.0.kernel", "params/layers.0.bias", "params/layers.1.kernel",
                                "params/layers.1.bias", "batch/x", "batch/y"}
    assert "## Verdict" in (out / "report.md").read_text()
    assert not [p for p in os.listdir(out) if p.startswith(".")], "temporary files left behind"


def test_float64_tolerances_are_far_tighter_than_float32(tiny, tmp_path):
    tols = {}
    for dtype in ("float32", "float64"):
        out = tmp_path / dtype
        proc = gradparity("run", str(tiny), "--backends", "numpy", "--dtype", dtype, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        doc = json.loads((out / "report.json").read_text())
        tols[dtype] = {c["tolerance"] for c in doc["comparisons"]}
    # The numpy reference always computes in float64: both runs compare float64 results.
    assert tols["float32"] == tols["float64"] and max(tols["float64"]) < 1e-12


def test_missing_framework_is_a_failed_row_naming_the_extra(tiny, tmp_path):
    shadow = tmp_path / "shadow" / "jax"
    shadow.mkdir(parents=True)
    # Shadows an installed jax, as if it were not installed.
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'jax'\", name='jax')\n")
    out = tmp_path / "out"
    proc = gradparity("run", str(tiny), "--backends", "numpy,jax", "--out", str(out),
                      env={"PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    doc = json.loads((out / "report.json").read_text())
    jax_rows = [r for r in doc["results"] if r["backend"] == "jax"]
    assert [r["status"] for r in jax_rows] == ["missing"] * 5
    assert "pip install 'gradparity[jax]'" in jax_rows[0]["error"]
    assert all(r["status"] == "ok" for r in doc["results"] if r["backend"] == "numpy")
    assert doc["verdict"]["status"] == "incomplete" and "INCOMPLETE" in proc.stdout


def test_invalid_config_file_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nbatch_sise = 3\n')
    proc = gradparity("run", str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "did you mean 'batch_size'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_doctor_lists_every_backend():
    proc = gradparity("doctor", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    for name in ("numpy", "torch", "jax", "keras-tensorflow", "keras-jax", "keras-torch"):
        line = next(l for l in proc.stdout.splitlines() if l.startswith(name + " "))
        assert (" ok " in line) or (" missing " in line and "pip install" in line), line


def test_default_config_is_printed_and_parses(tmp_path):
    proc = gradparity("default-config")
    assert proc.returncode == 0
    path = tmp_path / "default.toml"
    path.write_text(proc.stdout)
    assert gradparity("run", str(path), "--check").returncode == 0


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".toml")))
def test_example_configs_are_valid_where_they_stand(name):
    """Experiment files pass `run --check`; loss files ([[losses]] tables) read as valid losses."""
    import tomllib

    from gradparity.commands.translate import loss_module
    from gradparity.losses.config import read_loss_file
    from gradparity.losses.text import parse_loss_text

    path = os.path.join(EXAMPLES, name)
    with open(path, "rb") as f:
        if "losses" in tomllib.load(f):
            for text in read_loss_file(path):
                expr = parse_loss_text(text)
                loss_module(expr.framework).parse(expr)
            return
    proc = gradparity("run", path, "--check")
    assert proc.returncode == 0, proc.stderr


def test_shipped_example_data_is_what_make_npz_writes(tmp_path):
    subprocess.run([sys.executable, os.path.join(EXAMPLES, "make_npz.py"), str(tmp_path / "fresh.npz")],
                   check=True)
    with np.load(os.path.join(EXAMPLES, "my_data.npz")) as shipped, np.load(tmp_path / "fresh.npz") as fresh:
        assert shipped.files == fresh.files
        for key in fresh.files:
            np.testing.assert_array_equal(shipped[key], fresh[key])


def test_version_flag():
    proc = gradparity("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("gradparity ")


def test_recheck_example_verifies_the_file_set(tiny, tmp_path):
    out = tmp_path / "out"
    assert gradparity("run", str(tiny), "--backends", "numpy", "--out", str(out)).returncode == 0
    script = os.path.join(EXAMPLES, "recheck_report.py")
    ok = subprocess.run([sys.executable, script, str(out)], capture_output=True, text=True)
    assert ok.returncode == 0 and "6 files match" in ok.stdout, ok.stdout + ok.stderr
    with np.load(out / "inputs.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["batch/x"] = arrays["batch/x"] + 1  # as if another run had written it
    np.savez(out / "inputs.npz", **arrays)
    bad = subprocess.run([sys.executable, script, str(out)], capture_output=True, text=True)
    assert bad.returncode == 1 and "inputs.npz is not the file written with report.json" in bad.stdout
