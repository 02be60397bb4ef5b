"""Signals, concurrent runs and the output folder: no worker survives, no two runs' files mix.

The CLI runs in a real subprocess (signals need a real process), with the
fault-injecting backends of tests/fake_backends.py registered by a small
harness; each worker records its pid and job folder so the test can check
that nothing of the run is left behind.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gradparity.cli import main
from gradparity.errors import OutputError
from gradparity.experiment.spec import load_experiment
from gradparity.report.outdir import OutputDir, sha256
from gradparity.run.execute import JOB_DIR_PREFIX, remove_stale_job_dirs
from gradparity.commands.run import run_experiment

from conftest import TESTS, TINY

HARNESS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import fake
    from gradparity.backends import BACKENDS
    for mode in ("hang", "crash_after_first"):
        BACKENDS["fake-" + mode] = fake(mode)
    from gradparity.cli import main
    sys.exit(main(sys.argv[1:]))
""").format(tests=str(TESTS))

TINY_TOML = textwrap.dedent("""
    device = "cpu"
    methods = ["sum", "mean"]
    [model]
    hidden = [4]
    activation = "tanh"
    [data]
    source = "synthetic"
    batch_size = 6
    num_features = 5
    num_classes = 3
""")


def start_run(tmp_path, backends, out, pidfile):
    """``gradparity run`` of TINY_TOML with ``backends``, its temporary folder (TMPDIR: the workers' job folders)
    private to this test, so that no run of a test beside it (pytest-xdist) cleans up its job folders."""
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir(exist_ok=True)
    env = dict(os.environ, GRADPARITY_TEST_PIDFILE=str(pidfile), TMPDIR=str(private_tmp),
               PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", HARNESS, "run", str(config), "--backends", backends,
                             "--timeout", "120", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_worker(pidfile, proc, timeout=60.0):
    """(pid, job_dir) of the first fake worker once its session is open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pidfile.exists() and pidfile.read_text().strip():
            pid, job_dir = pidfile.read_text().split()[:2]
            return int(pid), Path(job_dir)
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.returncode}\n{proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("the fake worker never started")


def gone(pid):
    """True when no live process has this pid (a zombie left for init to reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not gone(pid):
        time.sleep(0.05)
    return gone(pid)


@pytest.mark.frameworks("jax")  # a real worker, importing jax, is running when the signal comes
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_every_worker_and_writes_a_partial_report(sig, code, tmp_path):
    out, pidfile = tmp_path / "out", tmp_path / "pids"
    proc = start_run(tmp_path, "numpy,fake-hang,jax", out, pidfile)
    pid, job_dir = wait_for_worker(pidfile, proc)
    assert job_dir.exists() and not gone(pid)
    # The workers run side by side: wait until the numpy reference has ended, so its rows are finished ones.
    seen = []
    while not any(line.startswith("  numpy: ok") for line in seen):
        line = proc.stderr.readline()
        assert line, "the run ended before the numpy reference finished: " + "".join(seen)
        seen.append(line)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    stderr = "".join(seen) + stderr
    assert proc.returncode == code, stdout + stderr
    assert "Traceback" not in stderr
    assert wait_gone(pid), f"worker {pid} survived {sig.name}"
    assert not job_dir.exists(), "the worker's job folder was left behind"
    doc = json.loads((out / "report.json").read_text())
    assert doc["interrupted"] == sig.name
    assert doc["verdict"]["status"] == "interrupted" and doc["verdict"]["exit_code"] == code
    status = {(r["backend"], r["method"]): r["status"] for r in doc["results"]}
    assert status[("numpy", "sum")] == status[("numpy", "mean")] == "ok"  # finished before: kept
    assert status[("fake-hang", "sum")] == "interrupted"
    # jax runs beside the others: finished before the signal (its rows kept, like numpy's), or stopped by it.
    if status[("jax", "sum")] != "ok":
        assert status[("jax", "sum")] == status[("jax", "mean")] == "interrupted"
        jax_error = next(r["error"] for r in doc["results"] if r["backend"] == "jax")
        assert sig.name in jax_error and ("not started" in jax_error or "the worker was stopped" in jax_error)
    assert f"INTERRUPTED by {sig.name}" in stdout
    with np.load(out / "gradients.npz") as z:
        finished = ["jax", "numpy"] if status[("jax", "sum")] == "ok" else ["numpy"]
        assert sorted({k.split("/")[0] for k in z.files}) == finished


def test_a_killed_parent_takes_its_worker_with_it(tmp_path):
    """SIGKILL cannot be handled: the worker asked the kernel to kill it when its parent dies."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux-only")
    out, pidfile = tmp_path / "out", tmp_path / "pids"
    proc = start_run(tmp_path, "numpy,fake-hang", out, pidfile)
    pid, job_dir = wait_for_worker(pidfile, proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert wait_gone(pid), "worker outlived a SIGKILLed parent"
    # Its job folder can only be removed by a later run: the next run cleans it up.
    assert job_dir.exists()
    removed = remove_stale_job_dirs(str(job_dir.parent))
    assert job_dir in removed and not job_dir.exists()


def test_stale_job_dirs_of_live_processes_are_kept(tmp_path):
    mine = tmp_path / f"{JOB_DIR_PREFIX}{os.getpid()}-numpy-abc"
    dead = tmp_path / f"{JOB_DIR_PREFIX}999999999-numpy-abc"  # above the kernel's pid limit
    other = tmp_path / f"{JOB_DIR_PREFIX}999999999-not-a-job"
    for d in (mine, dead, other):
        d.mkdir()
    (mine / "job.json").write_text("{}")
    (dead / "job.json").write_text("{}")
    assert remove_stale_job_dirs(str(tmp_path)) == [dead]
    assert mine.exists() and other.exists() and not dead.exists()


def test_a_second_run_into_a_busy_folder_stops_before_any_work(tmp_path, capsys):
    out, pidfile = tmp_path / "out", tmp_path / "pids"
    proc = start_run(tmp_path, "numpy,fake-hang", out, pidfile)
    try:
        wait_for_worker(pidfile, proc)
        code = main(["run", "--backends", "numpy", "--methods", "sum,mean", "--batch-size", "8",
                     "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "another gradparity run is writing to" in err
        assert not (out / "report.json").exists()  # the second run wrote nothing
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    doc = json.loads((out / "report.json").read_text())
    assert doc["interrupted"] == "SIGTERM"  # the first run's own report, whole


def test_lock_is_released_and_claims_exclude_each_other(tmp_path):
    first = OutputDir.claim(tmp_path / "o", "a")
    with pytest.raises(OutputError, match="another gradparity run"):
        OutputDir.claim(tmp_path / "o", "b")
    first.release()
    OutputDir.claim(tmp_path / "o", "c").release()


def test_report_files_form_one_set_and_follow_the_umask(tmp_path):
    exp = load_experiment(overrides={**TINY, "backends": ["numpy"], "methods": ["sum", "mean"]})
    old = os.umask(0o027)
    try:
        report = run_experiment(exp, tmp_path / "o")
    finally:
        os.umask(old)
    out = tmp_path / "o"
    assert sorted(os.listdir(out)) == ["gradients.npz", "heatmap.png", "inputs.npz", "max_rel.png", "report.html",
                                       "report.json", "report.md"]
    doc = json.loads((out / "report.json").read_text())
    assert doc["run_id"] == report.run_id and len(report.run_id) == 12
    for name in os.listdir(out):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
    for name, entry in doc["files"].items():
        assert sha256(out / name) == entry["sha256"], name
    for name in ("inputs.npz", "gradients.npz"):
        assert zipfile.ZipFile(out / name).comment.decode() == f"gradparity run {report.run_id}"
    assert report.run_id in (out / "report.md").read_text()


@pytest.mark.parametrize("below", ["", "sub"])
def test_unusable_out_is_exit_2_before_any_backend(below, tmp_path, capsys, workers_started):
    started = workers_started
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / below if below else tmp_path / "file"
    code = main(["run", "--backends", "numpy", "--methods", "sum,mean", "--batch-size", "8", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot use the output folder" in err and "Traceback" not in err
    assert not started


def test_unwritable_out_is_exit_2(tmp_path, capsys, workers_started):
    if os.geteuid() == 0:
        # root writes through directory permissions; a read-only mount is the portable case.
        target = Path("/proc/self")
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    started = workers_started
    code = main(["run", "--backends", "numpy", "--methods", "sum,mean", "--batch-size", "8",
                 "--out", str(target / "sub")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot" in err and "Traceback" not in err and not started


def test_a_report_replaces_the_earlier_reports_files_and_keeps_the_users(tmp_path, capsys):
    """A folder that held another command's report: its files that the new report does not write are removed
    (diagnose must never read one run's gradients.npz beside another run's report.json); a user's own file
    stays. The earlier report is a real `gradparity run`; the new one is written as `train --sweep` writes
    its report (no npz, an html page and PNGs of its own)."""
    from gradparity.report.outdir import OutputDir
    from gradparity.report.render import write_files

    out = tmp_path / "shared"
    assert main(["run", "--backends", "numpy", "--methods", "sum,mean", "--batch-size", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert (out / "gradients.npz").is_file() and (out / "heatmap.png").is_file()
    (out / "notes.txt").write_text("mine")
    folder = OutputDir.claim(out, "0123456789ab")
    try:
        write_files(folder, "0123456789ab", None, None, "# sweep\n", {"schema": "x"},
                    extra={"report.html": "<html></html>", "recipe.png": b"\x89PNG"})
    finally:
        folder.release()
    left = sorted(p.name for p in out.iterdir())
    assert left == ["notes.txt", "recipe.png", "report.html", "report.json", "report.md"], left
