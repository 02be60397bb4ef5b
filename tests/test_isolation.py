"""One backend's crash, hang, exception or missing framework never costs the other results."""
import dataclasses
import json

import numpy as np
import pytest

from gradparity.backends import BACKENDS
from gradparity.compare.verdict import EXIT_DISAGREE, EXIT_INCOMPLETE
from gradparity.experiment.spec import load_experiment
from gradparity.commands.run import run_experiment

from conftest import TINY, fake


def run_with(mode, tmp_path, fake_env, timeout=60.0, methods=("sum", "mean", "one_by_one")):
    info = fake(mode)
    exp = dataclasses.replace(load_experiment(overrides=TINY), backends=("numpy", info.name),
                              methods=methods, timeout_s=timeout)
    report = run_experiment(exp, tmp_path, registry={**BACKENDS, info.name: info}, extra_env=fake_env)
    rows = {(r.backend, r.method): r for r in report.results}
    return report, rows, info.name


def assert_reference_kept(report, rows, tmp_path):
    assert all(rows[("numpy", m)].ok for m in report.experiment.methods)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert [r["status"] for r in doc["results"] if r["backend"] == "numpy"] == ["ok"] * len(report.experiment.methods)
    with np.load(tmp_path / "gradients.npz") as z:
        assert any(k.startswith("numpy/") for k in z.files)


def test_crash_mid_run_keeps_finished_methods(tmp_path, fake_env):
    report, rows, name = run_with("crash_after_first", tmp_path, fake_env)
    assert rows[(name, "sum")].ok  # finished before the SIGKILL: kept
    for m in ("mean", "one_by_one"):
        assert rows[(name, m)].status == "crashed"
        assert "SIGKILL" in rows[(name, m)].error and "out-of-memory" in rows[(name, m)].error
    assert_reference_kept(report, rows, tmp_path)
    assert report.verdict.exit_code == EXIT_INCOMPLETE


def test_hang_is_killed_at_the_timeout(tmp_path, fake_env):
    report, rows, name = run_with("hang", tmp_path, fake_env, timeout=5.0)
    assert all(rows[(name, m)].status == "timeout" for m in report.experiment.methods)
    assert "timeout_s = 5 s" in rows[(name, "sum")].error
    assert_reference_kept(report, rows, tmp_path)


def test_exception_in_one_method_fails_only_that_row(tmp_path, fake_env):
    report, rows, name = run_with("raise_in_sum", tmp_path, fake_env)
    assert rows[(name, "sum")].status == "error"
    assert "simulated failure inside the sum method" in rows[(name, "sum")].error
    assert rows[(name, "mean")].ok and rows[(name, "one_by_one")].ok
    assert report.verdict.exit_code == EXIT_INCOMPLETE


def test_missing_framework_names_the_extra(tmp_path, fake_env, monkeypatch):
    # The fake backend's framework is not installed, so its worker imports none: the fast tier may start it.
    monkeypatch.delenv("GRADPARITY_NO_FRAMEWORK_WORKERS", raising=False)
    report, rows, name = run_with("missing", tmp_path, fake_env)
    row = rows[(name, "mean")]
    assert row.status == "missing"
    assert "framework_that_is_not_installed is not installed" in row.error
    assert "pip install 'gradparity[fake]'" in row.error
    assert_reference_kept(report, rows, tmp_path)


def test_segfault_at_setup(tmp_path, fake_env):
    report, rows, name = run_with("segfault", tmp_path, fake_env)
    assert rows[(name, "mean")].status == "crashed" and "SIGSEGV" in rows[(name, "mean")].error
    assert_reference_kept(report, rows, tmp_path)


def test_wrong_gradient_shape_is_a_backend_error_not_a_comparison(tmp_path, fake_env):
    report, rows, name = run_with("wrong_shape", tmp_path, fake_env)
    assert rows[(name, "mean")].status == "error"
    assert "has shape (4, 5), expected (5, 4)" in rows[(name, "mean")].error


def test_a_missing_one_over_n_is_found_and_explained(tmp_path, fake_env):
    report, rows, name = run_with("forgets_mean", tmp_path, fake_env)
    assert report.verdict.exit_code == EXIT_DISAGREE
    text = " ".join(report.verdict.explanation)
    assert f"{name}/mean" in text and "N = 6: a 1/N normalization is missing" in text
    doc = json.loads((tmp_path / "report.json").read_text())
    bad = [c for c in doc["comparisons"] if not c["agree"]]
    assert bad and all(f"{name}/mean" in (c["a"], c["b"]) for c in bad)


def test_a_running_worker_reports_its_finished_methods(fake_env):
    """run_backend(on_progress=...) hears, while the worker runs, how many of its methods are done: never going
    back, never above the total, and the job still ends with every method."""
    from gradparity.experiment.inputs import build_inputs
    from gradparity.run.execute import run_backend
    from gradparity.commands.run import experiment_job

    info = fake("slow")
    methods = ("sum", "mean", "one_by_one")
    exp = dataclasses.replace(load_experiment(overrides=TINY), backends=(info.name,), methods=methods)
    calls = []
    outcome = run_backend(experiment_job(exp, build_inputs(exp), info, methods), info, 60.0, extra_env=fake_env,
                          on_progress=lambda done, total: calls.append((done, total)))
    assert outcome.status == "ok" and all(outcome.methods[m].status == "ok" for m in methods)
    dones = [d for d, _ in calls]
    assert calls and {t for _, t in calls} == {3}
    assert dones == sorted(dones) and 0 <= dones[0] and dones[-1] <= 3 and max(dones) >= 1


def test_a_worker_that_outgrows_the_free_memory_is_stopped_as_a_failed_row(tmp_path, fake_env, monkeypatch):
    """A model too big for the memory left becomes a failed row naming the memory, never a machine brought down:
    with the floor set 600 MiB below what is free now, the worker that keeps allocating is stopped once it holds
    about that much; the reference's rows and the rows finished before are kept."""
    from gradparity.run.execute import MEMORY_FLOOR_ENV, meminfo

    available = meminfo("MemAvailable:")
    if available is None:
        pytest.skip("no /proc/meminfo: the memory guard works on Linux")
    monkeypatch.setenv(MEMORY_FLOOR_ENV, str(available // 2 ** 20 - 600))
    report, rows, name = run_with("hog", tmp_path, fake_env, timeout=120.0, methods=("sum", "mean"))
    assert rows[(name, "sum")].ok
    assert rows[(name, "mean")].status == "crashed"
    assert "stopped by gradparity" in rows[(name, "mean")].error and "memory" in rows[(name, "mean")].error
    assert_reference_kept(report, rows, tmp_path)
    assert report.verdict.exit_code == EXIT_INCOMPLETE
