"""``gradparity check`` on users' own models: the example CNN in torch, Keras and Flax, planted porting bugs,
models that fail, and bad input.

The models are plain user code (examples/port_check, tests/port_models), built by each framework's worker
from a 'module:function' factory. Every assertion compares numbers the frameworks computed: the faithful
ports must agree with torch within the dtype's tolerance for every method, and each planted bug must be
named at its layer, as torch names it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_harness import run_cli as gradparity

from gradparity.cli import main
from gradparity.commands.check import compare_models
from gradparity.testing import assert_same_gradients, assert_same_outputs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "port_check"
PATH = [str(EXAMPLE), str(Path(__file__).resolve().parent / "port_models")]
BATCH = tuple(np.load(EXAMPLE / "batch.npz")[k] for k in ("x", "y"))
SMALL = (BATCH[0][:8], BATCH[1][:8])

needs_all = pytest.mark.frameworks("torch", "keras-tensorflow", "jax")


def check(**kwargs):
    kwargs.setdefault("batch", SMALL)
    kwargs.setdefault("sys_path", PATH)
    return compare_models(**kwargs)


# --- the faithful ports ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faithful64():
    # localize="always": the layer-by-layer capture also runs on an agreeing check (by default it is a second
    # pass made only when the gradients disagree).
    return check(torch="nets_torch:TorchCNN", jax="nets_flax:flax_cnn", dtype="float64", localize="always")


@pytest.mark.frameworks("torch", "jax")
def test_faithful_flax_port_agrees_with_torch_in_float64_for_every_method(faithful64):
    r = faithful64
    assert [o.status for o in r.outcomes] == ["ok"] * 2
    assert len(r.results) == 8 and all(res.ok for res in r.results)
    assert r.verdict.status == "agree", r.verdict.summary
    # float64: the two frameworks' arithmetic differs only in rounding order (~1e-15).
    assert max(c.max_rel for c in r.comparisons) < 1e-12
    assert all(res.dtype == "float64" for res in r.results)
    assert r.first_layer is None and len(r.localizations) == 1
    loc = r.localizations[0]
    assert all(c.agree for c in loc.checkpoints)
    # Every layer's input and output, and the logits, were compared (Flax fuses no activation).
    points = {(c.layer, c.point) for c in loc.checkpoints}
    assert {(name, p) for name in ("features.0", "features.3", "classifier.1", "classifier.2", "classifier.4")
            for p in ("input", "output")} | {("logits", "logits")} <= points


@needs_all
def test_none_vectorized_runs_on_users_ports_and_agrees_with_the_mean():
    """Per-example gradients of a user's own model in one vectorized call (torch.func.vmap, tf.vectorized_map,
    jax.vmap), summed, are the mean's gradient times N, in every framework: the ports agree within float32's
    tolerance (float64 would single out TensorFlow's GELU, as the test below shows)."""
    r = check(torch="nets_torch:TorchCNN", keras="nets_keras:keras_cnn", jax="nets_flax:flax_cnn",
              dtype="float32", methods=["none_vectorized", "mean"])
    assert all(res.ok for res in r.results) and len(r.results) == 6, [res.error for res in r.results]
    assert r.verdict.status == "agree", r.verdict.summary
    assert {res.method for res in r.results} == {"none_vectorized", "mean"}


@pytest.mark.frameworks("torch", "jax")
def test_weights_are_mapped_by_structure_in_call_order(faithful64):
    """Flax lists its state alphabetically (fc2 before norm); the call order pairs the layers."""
    assign = faithful64.maps["jax"].assign
    assert assign["conv2.kernel"] == "features.3.weight" and assign["norm.scale"] == "classifier.2.weight"
    assert assign["fc2.kernel"] == "classifier.4.weight" and len(assign) == 10
    losses = [res.loss for res in faithful64.results]
    assert max(losses) - min(losses) < 1e-13


@needs_all
def test_tensorflow_float64_gelu_is_found_and_localized():
    """Measured (TF 2.21): tf.nn.gelu's exact form in float64 is off by up to 5e-9, so a float64 check of the
    faithful Keras port differs from torch at about 1e-8, first seen after the fused Conv2D+GELU layers."""
    r = check(torch="nets_torch:TorchCNN", keras="nets_keras:keras_cnn", dtype="float64", methods=["mean"])
    loc = r.localizations[0]
    assert r.verdict.status == "disagree" and 1e-10 < loc.max_rel < 1e-6
    assert loc.first_layer == "features.0" and "features.1 (GELU)" in loc.candidates
    assert "features.4 (GELU)" in loc.candidates
    # The layers Keras does not fuse agree before their inputs carry the difference in.
    assert loc.checkpoints[0].layer == "features.0" and loc.checkpoints[0].agree


@needs_all
def test_faithful_ports_agree_in_float32_through_the_cli_and_toml(tmp_path):
    out = tmp_path / "out"
    proc = gradparity("check", EXAMPLE / "check.toml", "--out", out, "--methods", "mean,one_by_one", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["schema"] == "gradparity.check/1" and doc["verdict"]["status"] == "agree"
    assert doc["localization"]["first_layer"] is None
    assert {b["environment"]["dtype"] for b in doc["backends"]} == {"float32"}
    # float32: differences are rounding-sized and inside the stated tolerance, well above float64's.
    worst = max(c["max_rel"] for c in doc["comparisons"])
    assert 1e-9 < worst <= doc["comparisons"][0]["tolerance"]
    assert len(doc["mapping"]["keras"]["params"]) == 10 and len(doc["mapping"]["jax"]["params"]) == 10
    with np.load(out / "gradients.npz") as z:
        assert "jax/mean/features.0.weight" in z.files and z["jax/mean/features.0.weight"].shape == (3, 3, 1, 8)
    assert "weights torch -> jax" in proc.stdout and "jax:conv1.kernel <- torch:features.0.weight" in proc.stdout


# --- planted bugs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted():
    """Flax: asymmetric "SAME" padding at the stride-2 conv; Keras: tanh-approximate GELU after the LayerNorm
    (float32, the default: TensorFlow's float64 GELU would show first, see above)."""
    return check(torch="nets_torch:TorchCNN", keras="nets_keras:keras_cnn_tanh_gelu",
                 jax="nets_flax:flax_cnn_same_padding", methods=["mean"])


@needs_all
def test_planted_padding_and_gelu_bugs_are_named_at_their_layers(planted):
    r = planted
    assert r.verdict.status == "disagree" and r.exit_code == 1
    by = {loc.backend: loc for loc in r.localizations}
    assert by["jax"].first_layer == "features.3" and by["jax"].where == "output"
    assert by["keras-tensorflow"].first_layer == "classifier.3" and by["keras-tensorflow"].where == "input"
    # What to change: the Keras port's next input is the tanh GELU of torch's LayerNorm output, torch's the exact.
    assert "tanh approximation" in by["keras-tensorflow"].suggestion
    assert "keras.ops.gelu(x, approximate=False)" in by["keras-tensorflow"].suggestion
    # The Flax port's stride-2 "SAME" pads (0, 1) per axis on its 4 x 4 input ((2 - 1) * 2 + 3 - 4 = 1 in all, the
    # extra at the end), torch's padding=1 pads (1, 1): the convolution with each padding reproduces each side.
    assert "pads its input (top 0, bottom 1, left 0, right 1) where torch's pads (top 1, bottom 1, left 1, right " \
           "1)" in by["jax"].suggestion, by["jax"].suggestion
    # The earliest in torch's call order is the report's first layer.
    assert r.first_layer == "features.3" and r.to_dict()["localization"]["first_layer"] == "features.3"
    # Before the bug, everything agrees to float32 rounding.
    jax_checks = by["jax"].checkpoints
    assert all(c.agree for c in jax_checks[:jax_checks.index(next(c for c in jax_checks if not c.agree))])
    assert "features.3" in r.verdict.explanation[0] or "features.3" in " ".join(r.verdict.explanation)


@pytest.fixture(scope="module")
def planted_more():
    """Flax: the LayerNorm at Flax's default epsilon (float64: the difference is small); Keras: a convolution
    that reads its kernel transposed."""
    return check(torch="nets_torch:TorchCNN", jax="port_bugs_flax:flax_cnn_epsilon_default",
                 keras="port_bugs_keras:keras_cnn_swapped_kernel", dtype="float64", methods=["mean"])


@needs_all
def test_planted_epsilon_and_transposed_kernel_are_named(planted_more):
    by = {loc.backend: loc for loc in planted_more.localizations}
    eps, swapped = by["jax"], by["keras-tensorflow"]
    assert eps.first_layer == "classifier.2" and eps.where == "output"
    # An epsilon of 1e-6 instead of 1e-5 is a small difference: far above float64 rounding, far below 1%.
    assert 1e-9 < eps.max_rel < 1e-2
    # Keras fuses the GELU into the convolution, so the first comparable checkpoint comes after it.
    assert swapped.first_layer == "features.0" and swapped.max_rel > 1e-3
    assert planted_more.verdict.status == "disagree"


@pytest.mark.frameworks("torch", "keras-tensorflow")
def test_pytest_helpers_pass_agreeing_methods_and_fail_with_the_layer():
    report = assert_same_gradients(torch="nets_torch:TorchCNN", batch=SMALL, sys_path=PATH)
    assert report.verdict.status == "agree" and len(report.results) == 4
    named = r"first differs at classifier\.4's input.*classifier\.3 \(GELU\)"
    with pytest.raises(AssertionError, match=r"(?s)gradients differ.*" + named):
        assert_same_gradients(torch="nets_torch:TorchCNN", keras="nets_keras:keras_cnn_tanh_gelu", batch=SMALL,
                              sys_path=PATH, methods=["mean"])
    with pytest.raises(AssertionError, match=r"(?s)outputs differ.*" + named):
        assert_same_outputs(torch="nets_torch:TorchCNN", keras="nets_keras:keras_cnn_tanh_gelu", batch=SMALL,
                            sys_path=PATH)


# --- models that fail ----------------------------------------------------------------------------

@needs_all
def test_a_raising_factory_and_a_wrong_output_shape_become_failed_rows():
    r = check(torch="nets_torch:TorchCNN", jax="port_bugs_flax:flax_raises", keras="port_bugs_flax:not_a_model",
              methods=["mean", "sum"])
    rows = {(res.backend, res.method): res for res in r.results}
    assert rows[("torch", "mean")].ok and rows[("torch", "sum")].ok
    assert "this factory fails on purpose" in rows[("jax", "mean")].error
    assert "not a keras.Model" in rows[("keras-tensorflow", "sum")].error or "Model" in rows[
        ("keras-tensorflow", "sum")].error
    assert r.verdict.status == "incomplete" and r.exit_code == 3
    r = check(torch="nets_torch:TorchCNN", jax="port_bugs_flax:flax_wrong_shape", methods=["mean"])
    jax_row = next(res for res in r.results if res.backend == "jax")
    assert jax_row.status == "error" and "shape [8, 7]" in jax_row.error and "[8, 10]" in jax_row.error


@pytest.mark.frameworks("torch", "jax")
def test_a_hanging_or_crashing_model_is_stopped_and_the_others_are_kept():
    r = check(torch="nets_torch:TorchCNN", jax="port_bugs_flax:flax_hangs", methods=["mean"], timeout_s=12)
    rows = {res.backend: res for res in r.results}
    assert rows["torch"].ok and rows["jax"].status == "timeout" and "timed out" in rows["jax"].error
    r = check(torch="nets_torch:TorchCNN", jax="port_bugs_flax:flax_crashes", methods=["mean"])
    rows = {res.backend: res for res in r.results}
    assert rows["torch"].ok and rows["jax"].status == "crashed" and "SIGABRT" in rows["jax"].error


# --- bad input: exit 2 ---------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["check", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("args,message", [
    (["--torch", "nets_torch"], "is not 'module:function'"),
    (["--torch", "no_such_nets:Net"], "no module 'no_such_nets'"),
    (["--torch", "nets_torch:TorchCNN", "--loss", "hinge"], "unknown loss 'hinge'"),
    (["--torch", "nets_torch:TorchCNN", "--methods", "mean,vmap"], "methods ['vmap']"),
    (["--torch", "nets_torch:TorchCNN", "--weights-from", "jax"], "weights = 'jax' names no given model"),
    (["--torch", "nets_torch:TorchCNN", "--dtype", "float16"], "dtype = 'float16'"),
    (["--data", "BATCH"], "no model given"),
    (["--torch", "nets_torch:TorchCNN"], "no batch given"),
])
def test_bad_settings_exit_2_before_any_worker(capsys, tmp_path, args, message):
    np.savez(tmp_path / "b.npz", x=SMALL[0], y=SMALL[1])
    args = [str(tmp_path / "b.npz") if a == "BATCH" else a for a in args]
    if "--data" not in args and "no batch given" not in message:
        args += ["--data", str(tmp_path / "b.npz")]
    code, text = run_cli(capsys, *args, "--out", str(tmp_path / "out"))
    assert code == 2 and message in text, text
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize("x,y,message", [
    (np.full((4, 8, 8, 1), np.nan, np.float32), np.zeros(4, np.int64), "NaN/inf"),
    (np.zeros((4, 8, 8, 1), np.float32), np.zeros(3, np.int64), "axis 0 must match"),
    (np.zeros((4, 8, 8, 1), np.float32), np.full(4, -1), "negative class -1"),
    (np.zeros((4, 8, 8, 1), np.float32), np.zeros(4, np.float32), "integer class targets"),
])
def test_bad_batches_exit_2(capsys, tmp_path, x, y, message):
    np.savez(tmp_path / "b.npz", x=x, y=y)
    code, text = run_cli(capsys, "--torch", "nets_torch:TorchCNN", "--data", str(tmp_path / "b.npz"))
    assert code == 2 and message in text, text


def test_bad_toml_exits_2(capsys, tmp_path):
    (tmp_path / "c.toml").write_text('[models]\ntorch = "a:b"\npytorch = "c:d"\n[check]\nbatch = "x.npz"\n')
    code, text = run_cli(capsys, str(tmp_path / "c.toml"))
    assert code == 2 and "unknown key 'pytorch' in [models]" in text and "unknown key 'batch' in [check]" in text


@pytest.mark.frameworks("torch")
def test_labels_beyond_the_models_classes_exit_2(tmp_path):
    with pytest.raises(Exception, match=r"y holds class 12, but the model has 10 classes"):
        check(torch="nets_torch:TorchCNN", batch=(SMALL[0], np.full(8, 12)))


@pytest.mark.frameworks("torch", "jax")
def test_an_unmappable_port_is_a_mapping_error_with_both_parameter_lists(tmp_path):
    from gradparity.experiment.weights import MappingError

    (tmp_path / "tiny_flax.py").write_text(
        "from flax import nnx\n"
        "class Tiny(nnx.Module):\n"
        "    def __init__(self):\n"
        "        self.fc = nnx.Linear(64, 10, rngs=nnx.Rngs(0))\n"
        "    def __call__(self, x):\n"
        "        return self.fc(x.reshape(x.shape[0], -1))\n")
    with pytest.raises(MappingError) as info:
        check(torch="nets_torch:TorchCNN", jax="tiny_flax:Tiny", sys_path=PATH + [str(tmp_path)])
    text = str(info.value)
    assert "torch has 5 layers with parameters to map, jax has 1" in text
    assert "features.0 (Conv2d)" in text and "fc (Linear)" in text  # side by side


def test_toml_reads_models_settings_and_explicit_mapping(tmp_path):
    from gradparity.commands.check import read_check_config

    np.savez(tmp_path / "b.npz", x=SMALL[0], y=SMALL[1])
    # Found beside the TOML file and read, never imported here.
    (tmp_path / "nets_torch.py").write_text("import torch\n\n\nclass TorchCNN(torch.nn.Module):\n    pass\n")
    (tmp_path / "nets_flax.py").write_text("from flax import nnx\n\n\ndef flax_cnn():\n    return nnx.Linear(2, 2, rngs=nnx.Rngs(0))\n")
    (tmp_path / "c.toml").write_text(
        '[models]\ntorch = "nets_torch:TorchCNN"\njax = "nets_flax:flax_cnn"\n'
        '[check]\ndata = "b.npz"\ndtype = "float64"\nmethods = ["mean", "sum"]\nmode = "training"\n'
        '[mapping.jax]\n"fc2.kernel" = "classifier.4.weight"\n')
    spec = read_check_config(tmp_path / "c.toml", {"dtype": "float32"})  # flags override the file
    assert spec.factories == {"torch": "nets_torch:TorchCNN", "jax": "nets_flax:flax_cnn"}
    assert spec.dtype == "float32" and spec.methods == ("mean", "sum") and spec.mode == "training"
    assert spec.mapping == {"jax": {"fc2.kernel": "classifier.4.weight"}} and spec.source == "torch"
    assert spec.sys_path == (str(tmp_path),) and spec.x.shape == SMALL[0].shape
    (tmp_path / "d.toml").write_text(
        '[models]\ntorch = "a:b"\n[check]\ndata = "b.npz"\n[mapping.torch]\n"x" = "y"\n')
    with pytest.raises(Exception, match="only a framework whose weights are mapped"):
        read_check_config(tmp_path / "d.toml", {})


@pytest.mark.frameworks("torch", "jax")
def test_a_sequence_model_with_token_logits_maps_and_localizes_the_gelu():
    """(N, T) integer tokens -> (N, T, C) logits: the loss averages N*T terms; embeddings map as embeddings;
    the Flax port left at jax.nn.gelu's tanh default is named at torch's act (nn.GELU)."""
    tokens = np.random.default_rng(0).integers(0, 11, size=(3, 4))
    labels = np.random.default_rng(1).integers(0, 5, size=(3, 4))
    r = check(torch="seq_torch:TinyTransformer", jax="seq_flax:default_gelu", batch=(tokens, labels),
              dtype="float64", methods=["mean", "sum", "one_by_one"])
    assert r.loss_elements == 12 and r.maps["jax"].assign["embed.embedding"] == "embed.weight"
    loc = r.localizations[0]
    assert loc.first_layer == "act" and loc.where == "input", loc.explanation
    assert "tanh approximation" in loc.suggestion and "jax.nn.gelu(x, approximate=False)" in loc.explanation
    torch_rows = [res for res in r.results if res.backend == "torch"]
    assert all(res.ok for res in r.results)
    # Within torch the methods agree (sum / 12 and the mean of 3 example means over 4 tokens each).
    assert max(c.max_rel for c in r.comparisons if c.a.startswith("torch/") and c.b.startswith("torch/")) < 1e-13
    assert len(torch_rows) == 3 and r.verdict.status == "disagree"
