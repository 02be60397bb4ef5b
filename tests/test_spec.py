"""Invalid experiments and data are rejected before any work starts, with every problem named (exit 2)."""
import numpy as np
import pytest

from gradparity.cli import main
from gradparity.errors import ConfigError
from gradparity.experiment.inputs import build_inputs
from gradparity.experiment.spec import load_experiment

from conftest import TINY


def problems(overrides=None, path=None):
    with pytest.raises(ConfigError) as info:
        exp = load_experiment(path, overrides)
        build_inputs(exp)
    return info.value.problems


def test_default_experiment_is_valid_and_resolves_keras():
    exp = load_experiment()
    assert exp.backends == ("numpy", "torch", "keras-tensorflow", "jax")
    assert exp.methods == ("none_loop", "none_vectorized", "sum", "mean", "one_by_one")
    inputs = build_inputs(exp)
    assert inputs.model.sizes == (64, 32, 10) and inputs.n_examples == 64
    assert inputs.batch["x"].dtype == np.float32 and inputs.batch["y"].dtype == np.int64
    assert load_experiment(overrides={"keras.backend": "jax"}).backends[2] == "keras-jax"


def test_inputs_are_deterministic_in_the_seed():
    a, b = build_inputs(load_experiment()), build_inputs(load_experiment())
    c = build_inputs(load_experiment(overrides={"seed": 1}))
    assert a.checksums() == b.checksums()
    assert a.checksums()["params/layers.0.kernel"] != c.checksums()["params/layers.0.kernel"]
    assert a.checksums()["batch/x"] != c.checksums()["batch/x"]


def test_unknown_keys_are_named_with_a_suggestion():
    p = problems({"data.batchsize": 3, "learning_rate": 0.1})
    assert any("'data.batchsize'" in x and "did you mean 'batch_size'" in x for x in p)
    assert any("'learning_rate'" in x for x in p)


def test_every_problem_is_reported_at_once():
    p = problems({"dtype": "float16", "device": "tpu", "backends": ["torch", "pytorch"],
                  "methods": ["mean", "avg"], "model.hidden": [0], "seed": -1, "timeout_s": 0})
    assert len(p) == 7, p


def test_unknown_loss_and_activation():
    p = problems({"loss.name": "hinge", "model.activation": "swish"})
    assert any("loss.name = 'hinge'" in x for x in p) and any("model.activation" in x for x in p)


def test_source_specific_keys_are_rejected_for_other_sources():
    p = problems({"data.num_features": 4})
    assert any("data.num_features applies only to source = 'synthetic'" in x for x in p)


def test_batch_larger_than_the_data():
    p = problems({"data.batch_size": 1000, "data.batch_index": 1})
    assert any("needs 2000 examples, but the data has 1797" in x for x in p)


def test_duplicate_backends_after_alias_resolution():
    p = problems({"backends": ["keras", "keras-tensorflow"]})
    assert any("more than once" in x for x in p)


def write_npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    cfg = tmp_path / "exp.toml"
    cfg.write_text('[data]\nsource = "npz"\npath = "data.npz"\nbatch_size = 4\n')
    return cfg


def test_npz_with_nan_is_rejected(tmp_path):
    x = np.ones((8, 3)); x[5, 1] = np.nan
    p = problems(path=write_npz(tmp_path, x=x, y=np.arange(8) % 2))
    assert any("NaN/inf" in s and "example 5" in s for s in p)


def test_npz_labels_out_of_range_and_shapes(tmp_path):
    cfg = write_npz(tmp_path, x=np.ones((8, 3)), y=np.array([0, 1, 2, 3, 0, 1, 2, 3]))
    ok = build_inputs(load_experiment(cfg))  # 4 classes inferred from the labels
    assert ok.model.sizes[-1] == 4
    p = problems({"data.num_classes": 3}, path=cfg)
    assert any("labels must lie in [0, 3), found 3 at example 3" in s for s in p)
    p = problems(path=write_npz(tmp_path, x=np.ones((8, 3)), y=np.zeros(7, dtype=int)))
    assert any("inputs have 8 examples but labels have 7" in s for s in p)
    p = problems(path=write_npz(tmp_path, x=np.ones((8, 3)), y=np.zeros(8)))
    assert any("labels must be integer class indices" in s for s in p)


def test_npz_missing_key_and_file(tmp_path):
    p = problems(path=write_npz(tmp_path, inputs=np.ones((8, 3)), y=np.zeros(8, dtype=int)))
    assert any("has no array 'x'" in s for s in p)
    (tmp_path / "data.npz").unlink()
    assert any("does not exist" in s for s in problems(path=tmp_path / "exp.toml"))


def test_bad_toml_and_missing_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("dtype = float32\n")
    assert any("not valid TOML" in s for s in problems(path=bad))
    assert any("does not exist" in s for s in problems(path=tmp_path / "nope.toml"))


@pytest.mark.parametrize("argv", [
    ["run", "--dtype", "float16"],
    ["run", "--backends", "torch,caffe"],
    ["run", "--batch-size", "0"],
    ["run", "--methods", "mean,mean"],
])
def test_cli_exits_2_before_any_work(argv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 2
    assert "invalid experiment" in capsys.readouterr().err
    assert not out.exists()


def test_cli_check_validates_without_running(capsys, tmp_path):
    args = ["run", "--check", "--out", str(tmp_path / "o")] + [
        "--backends", "numpy", "--batch-size", "8"]
    assert main(args) == 0
    assert "valid" in capsys.readouterr().out and not (tmp_path / "o").exists()


def test_tiny_overrides_are_valid():
    exp = load_experiment(overrides=TINY)
    assert build_inputs(exp).model.sizes == (5, 4, 3)


def test_synthetic_data_covers_the_requested_batch_by_default():
    exp = load_experiment(overrides={**TINY, "data.batch_index": 2})
    assert exp.data.num_examples == 18
    assert build_inputs(exp).n_examples == 6


def test_nested_overrides_merge_like_toml_layering():
    exp = load_experiment(None, {"model": {"hidden": [8]}})
    assert exp.model.hidden == (8,) and exp.model.activation == "relu" and exp.model.kind == "mlp"
    assert load_experiment(None, {"data": {"batch_size": 8}}).data.source == "digits"


def test_a_scalar_where_a_table_belongs_is_a_config_error(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text("data = 5\n")
    p = problems({"data.batch_size": 3}, path=cfg)
    assert any("data is 5, not a table" in s for s in p)


def test_the_name_defaults_to_the_data_and_model(tmp_path):
    assert load_experiment().name == "digits-mlp"
    assert load_experiment(overrides=TINY).name == "synthetic-mlp"
    cfg = write_npz(tmp_path, x=np.ones((8, 3)), y=np.arange(8) % 2)
    assert load_experiment(cfg).name == "data-mlp"
    assert load_experiment(overrides={"name": "mine"}).name == "mine"


def test_problems_too_large_for_memory_are_rejected_before_allocating(tmp_path):
    from gradparity.experiment.inputs import memory_limit_bytes

    p = problems({"model.hidden": [10 ** 9]})
    assert any("parameters" in s and "more than half of this machine's" in s for s in p)
    p = problems({**TINY, "data.num_examples": 10 ** 13})
    assert any("synthetic data" in s for s in p)
    cfg = write_npz(tmp_path, x=np.ones((8, 3)), y=np.array([0, 1, 0, 1, 0, 1, 0, 10 ** 9]))
    p = problems(path=cfg)
    assert any("inferred from the largest label 1,000,000,000" in s and "data.num_classes" in s for s in p)
    assert memory_limit_bytes() > 2 ** 28


@pytest.mark.parametrize("x,y,message", [
    (np.zeros((0, 3)), np.zeros(0, dtype=int), "the data has no examples"),
    (np.zeros((8, 0)), np.arange(8) % 2, "inputs have no features"),
    (np.ones((8, 3), dtype=complex), np.arange(8) % 2, "inputs must be real numbers"),
    (np.ones((8, 3)), (np.arange(16) % 2).reshape(8, 2), "labels must be 1-D"),
])
def test_degenerate_npz_data_is_named(x, y, message, tmp_path):
    p = problems(path=write_npz(tmp_path, x=x, y=y))
    assert any(message in s for s in p), p


def test_a_single_npy_or_garbage_file_is_not_read_as_npz(tmp_path):
    cfg = write_npz(tmp_path, x=np.ones((8, 3)), y=np.arange(8) % 2)
    np.save(tmp_path / "data.npy", np.ones(3))
    (tmp_path / "data.npy").rename(tmp_path / "data.npz")
    assert any("single .npy array" in s for s in problems(path=cfg))
    (tmp_path / "data.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert any("cannot read data.path" in s for s in problems(path=cfg))


def test_at_most_one_result_is_a_config_error():
    p = problems({"backends": ["numpy"], "methods": ["mean"]})
    assert any("give one result" in s for s in p)
