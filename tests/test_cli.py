"""The command line end to end on a tiny experiment: files, schema, exit codes, recheckability."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import FRAMEWORK_BACKENDS, installed

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


FRAMEWORKS = ("torch", "jax", "keras-tensorflow")


def framework():
    return next((b for b in FRAMEWORKS if installed(b)), None)


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


@pytest.mark.frameworks(*FRAMEWORKS, required=False)  # numpy and the first framework installed
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
    # The shadow makes the jax worker import no framework: the fast tier may let it start.
    proc = gradparity("run", str(tiny), "--backends", "numpy,jax", "--out", str(out),
                      env={"PYTHONPATH": str(shadow.parent), "GRADPARITY_NO_FRAMEWORK_WORKERS": ""})
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


# --- one pipeline under every command: flags, exit codes, JSON, doctor ----------------------------------------

FRAMEWORK_MODULES = ("torch", "tensorflow", "keras", "jax", "jaxlib", "flax", "optax", "tf_keras")


def _commands_with(flag):
    from gradparity.cli import _parser

    sub = next(a for a in _parser()._actions if a.choices and "run" in a.choices)
    return sorted(name for name, p in sub.choices.items() if any(flag in a.option_strings for a in p._actions))


def _only_a_usage_error(proc, command):
    """Exit 2 from argparse, before any work: stderr holds the usage and the error, no worker's progress line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    error = f"gradparity {command}: error: " if command else "gradparity: error: "
    for line in proc.stderr.splitlines():
        assert line.startswith(("usage: ", " ", error)), f"not argparse's usage error: {line!r}\n{proc.stderr}"
    assert error in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv, suggestion", [
    (["run", "--dtyp", "float64"], "did you mean --dtype?"),
    (["train", "--epoch", "1", "--sweep"], "did you mean --epochs?"),
    (["run", "--backend", "torch"], "did you mean --backends?"),
    (["run", "--backend=torch"], "did you mean --backends?"),
    (["compare-losses", "--keras-backnd", "jax"], "did you mean --keras-backend?"),
    (["translate", "x", "--time=3"], "did you mean --timeout"),
])
def test_abbreviated_or_misspelled_flags_are_usage_errors_with_a_suggestion(argv, suggestion, tmp_path):
    proc = gradparity(*argv, cwd=tmp_path)
    _only_a_usage_error(proc, argv[0])
    unknown = next(a for a in argv[1:] if a.startswith("--"))
    assert "unrecognized arguments: " + unknown in proc.stderr and suggestion in proc.stderr, proc.stderr
    assert not os.listdir(tmp_path), "a rejected command wrote files"


def test_an_unknown_command_names_the_closest_one():
    proc = gradparity("rnu", "--backends", "numpy")
    _only_a_usage_error(proc, None)
    assert "invalid choice: 'rnu'" in proc.stderr and "did you mean 'run'?" in proc.stderr, proc.stderr


def test_every_parser_rejects_abbreviations():
    from gradparity.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.choices and "run" in a.choices)
    assert parser.allow_abbrev is False
    assert all(p.allow_abbrev is False for p in sub.choices.values())


TIMEOUT_COMMANDS = _commands_with("--timeout")


def test_the_timeout_commands_are_all_there():
    assert set(TIMEOUT_COMMANDS) >= {"run", "translate", "compare-losses", "check", "loss-table", "optimizers",
                                     "train", "benchmark"}


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0"])
@pytest.mark.parametrize("command", TIMEOUT_COMMANDS)
def test_a_bad_timeout_is_exit_2_before_any_worker(command, value, tmp_path):
    proc = gradparity(command, "--timeout", value, cwd=tmp_path)
    _only_a_usage_error(proc, command)
    assert "argument --timeout: must be a positive number of seconds" in proc.stderr, proc.stderr
    assert not os.listdir(tmp_path), "a rejected command wrote files"


def test_every_timeout_help_states_its_default():
    from gradparity.cli import _parser

    sub = next(a for a in _parser()._actions if a.choices and "run" in a.choices)
    for name in TIMEOUT_COMMANDS:
        action = next(a for a in sub.choices[name]._actions if "--timeout" in a.option_strings)
        assert "(default: " in action.help, (name, action.help)
        if action.default is not None:
            assert f"(default: {action.default:g})" in action.help, (name, action.help)


def test_exit_codes_are_one_module():
    from gradparity import cli, exit_codes
    from gradparity.commands import compare_losses, diagnose, translate, translate_optimizer
    from gradparity.compare import verdict

    assert (exit_codes.AGREE, exit_codes.DISAGREE, exit_codes.INVALID, exit_codes.INCOMPLETE,
            exit_codes.INTERNAL) == (0, 1, 2, 3, 4)
    assert exit_codes.from_signal(2) == 130 and "SIGTERM" in exit_codes.describe(143)
    assert cli.EXIT_INTERNAL is exit_codes.INTERNAL and cli.EXIT_INVALID is exit_codes.INVALID
    assert (verdict.EXIT_AGREE, verdict.EXIT_DISAGREE, verdict.EXIT_INVALID, verdict.EXIT_INCOMPLETE) == (0, 1, 2, 3)
    assert (diagnose.EXIT_CLEAN, diagnose.EXIT_CAUSE, diagnose.EXIT_UNKNOWN) == (0, 1, 3)
    assert (compare_losses.EXIT_CONSISTENT, compare_losses.EXIT_MISREAD, compare_losses.EXIT_INCOMPLETE) == (0, 1, 3)
    for module in (translate, translate_optimizer):
        assert (module.EXIT_MATCH, module.EXIT_MISMATCH, module.EXIT_INCOMPLETE) == (0, 1, 3)


def _strict_loads(text):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_policy_non_finite_numbers_become_null():
    from pathlib import Path

    from gradparity.report.jsonout import dumps

    doc = {"nan": float("nan"), "inf": float("-inf"), "f32": np.float32("inf"), "i64": np.int64(7),
           "array": np.array([1.5, np.nan]), "nested": [{"x": (np.float64("nan"), 2.0)}], "path": Path("a/b"),
           np.int32(3): np.bool_(True)}
    out = _strict_loads(dumps(doc))
    assert out == {"nan": None, "inf": None, "f32": None, "i64": 7, "array": [1.5, None],
                   "nested": [{"x": [None, 2.0]}], "path": str(Path("a/b")), "3": True}
    with pytest.raises(ValueError, match="not strict JSON"):
        _strict_loads(json.dumps({"x": float("nan")}))  # the parser used above does refuse NaN


def test_report_json_and_json_output_are_strict(tiny, tmp_path):
    out = tmp_path / "out"
    assert gradparity("run", str(tiny), "--backends", "numpy", "--out", str(out)).returncode == 0
    _strict_loads((out / "report.json").read_text())
    proc = gradparity("diagnose", str(out), "--json")
    assert proc.returncode in (0, 1, 3), proc.stderr
    _strict_loads(proc.stdout)


_DOCTOR_SCRIPT = textwrap.dedent("""
    import sys
    {block}
    from gradparity.cli import main
    code = main(["doctor"])
    frameworks = {frameworks!r}
    print("LOADED:" + ",".join(sorted(m for m in sys.modules if m.split(".")[0] in frameworks)))
    sys.exit(code)
""")


def _doctor_in_process(block=""):
    code = _DOCTOR_SCRIPT.format(block=block, frameworks=FRAMEWORK_MODULES)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_doctor_imports_no_framework_and_lists_every_backend():
    from gradparity.backends import BACKENDS

    proc = _doctor_in_process()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LOADED:\n" in proc.stdout, "doctor imported a framework: " + proc.stdout.splitlines()[-1]
    assert proc.stdout.startswith("gradparity ") and "Python " in proc.stdout.splitlines()[0]
    assert "installed: numpy " in proc.stdout and ("torch " in proc.stdout)
    lines = proc.stdout.splitlines()
    for name, info in BACKENDS.items():
        line = next(l for l in lines if l.startswith(name + " "))
        if " ok " in line:
            for module in info.requires:
                assert f"{module} " in line, line  # each required module with its version
        else:
            assert " missing " in line and "not installed" in line and "pip install 'gradparity[" in line, line
    assert "--devices" in proc.stdout  # says how to check the devices
    assert "running " not in proc.stderr  # no worker started


def test_doctor_names_a_missing_module_and_its_extra():
    block = textwrap.dedent("""
        class _Hide:
            def find_spec(self, name, path=None, target=None):
                if name == "optax":
                    raise ModuleNotFoundError("hidden", name=name)
        sys.meta_path.insert(0, _Hide())
    """)
    proc = _doctor_in_process(block)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jax = next(l for l in proc.stdout.splitlines() if l.startswith("jax "))
    assert " missing " in jax and "optax not installed" in jax and "pip install 'gradparity[jax]'" in jax, jax
    keras_jax = next(l for l in proc.stdout.splitlines() if l.startswith("keras-jax "))
    assert " ok " in keras_jax, keras_jax


@pytest.mark.frameworks(*FRAMEWORK_BACKENDS, required=False)  # a worker per installed backend
def test_doctor_devices_probes_each_backend_in_its_worker():
    """``--devices``: the old probe (a worker per backend, importing its framework), after the fast listing."""
    from gradparity.backends import BACKENDS

    proc = gradparity("doctor", "--devices", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    head, _, devices = proc.stdout.partition("\ndevices (--device cpu")
    assert devices, proc.stdout
    for name in BACKENDS:
        line = next(l for l in devices.splitlines() if l.startswith(name + " "))
        assert (" ok " in line and "device cpu" in line) or (" missing " in line and "pip install" in line), line
