"""`gradparity train --model cnn|sequence`: the built-in CNN and transformer trained natively in every framework,
each step compared with the float64 numpy trajectory of that framework's optimizer rule (numpy in, numpy out)."""
from __future__ import annotations

import numpy as np
import pytest

from gradparity.cli import main
from gradparity.commands.train import TrainSpec, build_batches, run_training, split_digits
from gradparity.experiment.optimizers import OptimizerConfig


def test_the_reference_mean_divides_by_every_token():
    """For the sequence model the mean averages N*T loss terms: one SGD step on the mean at lr equals one on
    the sum at lr / (N*T), to float64 rounding (and not at lr / N)."""
    from gradparity.reference.models import trajectory

    spec = TrainSpec(model="sequence", steps=1, dtype="float64", batch_size=8)
    model, params, batches, _ = build_batches(spec, split_digits(spec))
    terms = batches[0][1].size
    assert terms == 8 * model.seq_len
    sgd = OptimizerConfig("sgd", 0.5)
    (mean,), _ = trajectory(params, batches, model.to_dict(), sgd, [0.5], "mean", "torch")
    (summed,), _ = trajectory(params, batches, model.to_dict(), sgd, [0.5 / terms], "sum", "torch")
    (per_example,), _ = trajectory(params, batches, model.to_dict(), sgd, [0.5 / 8], "sum", "torch")
    for k in params:
        assert np.allclose(mean[k], summed[k], rtol=0, atol=1e-14 * max(1.0, np.max(np.abs(mean[k]))))
    assert max(np.max(np.abs(mean[k] - per_example[k])) for k in params) > 1e-3


@pytest.mark.frameworks("torch", "jax", "keras-tensorflow")
def test_the_cnn_trains_as_its_rule_says_in_every_framework():
    """float64, momentum: torch, JAX and Keras on TensorFlow each within rtol(t) of the float64 numpy
    trajectory of their own rule at every step; torch and JAX the same trajectory."""
    report = run_training(TrainSpec(model="cnn", steps=6, dtype="float64",
                                    backends=("torch", "jax", "keras-tensorflow"), timeout_s=300))
    assert report.exit_code == 0, [(t.backend, t.error) for t in report.trajectories]
    for t in report.trajectories:
        assert t.first_off_rule is None and max(t.vs_rule) <= t.rule_rtol[-1], t.backend
        assert len(t.accuracy) == 6 and 0.0 <= t.accuracy[-1] <= 1.0
    pair = next(p for p in report.pairs if {p.a, p.b} == {"torch", "jax"})
    assert pair.first_apart is None
    assert "cnn 8x8x1" in report.model


@pytest.mark.frameworks("keras-tensorflow", "torch")
def test_keras_tensorflow_adam_on_an_embedding_is_not_adam_but_its_momentum_is_on_track():
    """The sequence model in float32: with momentum Keras on TensorFlow follows its rule at every step; with Adam
    it leaves it at step 1, farthest in the token embedding (sparse IndexedSlices updates per occurrence), while
    torch stays on its rule."""
    momentum = run_training(TrainSpec(model="sequence", steps=3, backends=("keras-tensorflow",), timeout_s=300))
    assert momentum.exit_code == 0 and momentum.trajectories[0].first_off_rule is None
    adam = run_training(TrainSpec(model="sequence", steps=3, optimizer="adam",
                                  backends=("keras-tensorflow", "torch"), timeout_s=300))
    keras, torch = adam.trajectories
    assert torch.first_off_rule is None, max(torch.vs_rule)
    assert keras.first_off_rule == 1 and keras.worst_param == "embed.embedding"
    assert max(keras.vs_rule) > 100 * keras.rule_rtol[-1]
    assert adam.rounding_only == {"block.attn.key.bias"}


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--model", "resnet"], "model 'resnet'"),
    (["train", "--model", "cnn", "--sweep"], "--sweep trains the built-in MLP or a check config"),
])
def test_bad_model_choices_are_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def _port_check(jax_factory: str, dtype: str):
    from pathlib import Path

    from gradparity.commands.check import ModelCheck, check_spec, run_check

    folder = Path(__file__).resolve().parents[1] / "examples" / "port_check"
    with np.load(folder / "batch.npz") as data:
        x, y = data["x"], data["y"]
    spec = ModelCheck({"torch": "nets_torch:TorchCNN", "jax": jax_factory}, x, y, methods=("mean",), dtype=dtype,
                      train_steps=3, train_optimizer="momentum", train_lr=0.05, sys_path=(str(folder),))
    return run_check(check_spec(spec))


@pytest.mark.frameworks("torch", "jax")
def test_a_faithful_port_trains_on_the_sources_trajectory():
    """`check --train-steps`: the example's Flax port of the torch CNN, trained 3 momentum steps from torch's
    weights in float64, stays on torch's trajectory at every step (exit 0)."""
    report = _port_check("nets_flax:flax_cnn", "float64")
    (pair,) = report.training.pairs
    assert report.exit_code == 0 and pair["first_apart"] is None and pair["tensors"] >= 8
    assert max(pair["per_step"]) <= pair["rtol"][0]


@pytest.mark.frameworks("torch", "jax")
def test_a_buggy_port_leaves_the_sources_trajectory_at_step_1():
    """The planted bug (SAME padding of the stride-2 convolution): apart from step 1, exit 1."""
    report = _port_check("nets_flax:flax_cnn_same_padding", "float32")
    (pair,) = report.training.pairs
    assert pair["first_apart"] == 1 and pair["per_step"][-1] > 100 * pair["rtol"][-1]
    assert report.exit_code == 1


@pytest.mark.frameworks("torch", "keras-tensorflow")
def test_an_optimizer_text_trains_every_framework_with_its_translation():
    """`train --optimizer "keras.optimizers.Adam(learning_rate=1e-2)"`: Keras trains with the text, torch with
    the translation (epsilon hat through its before_step hook): both on the Keras rule at every step and on one
    trajectory, where torch's own Adam parts from Keras at step 1 (the named optimizer's run, test_train)."""
    spec = TrainSpec(optimizer="keras.optimizers.Adam(learning_rate=1e-2)", steps=6,
                     backends=("torch", "keras-tensorflow"), timeout_s=300)
    assert spec.framework_config("torch").epsilon_form == "hat" and spec.config().eps == 1e-7
    assert "def before_step" in spec.rendered("torch")["code"]
    report = run_training(spec)
    assert report.exit_code == 0, [(t.backend, t.error) for t in report.trajectories]
    (pair,) = report.pairs
    assert pair.first_apart is None and max(pair.predicted) <= pair.rtol[0]


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--optimizer", "optax.adam(1e-3, eps_root=1e-8)"], "eps_root (epsilon inside the square root)"),
    (["train", "--sweep", "--optimizer", "torch.optim.Adam(params)"], "named optimizer"),
    (["train", "--optimizer", "torch.optim.Adam(params, amsgrad=True)"], "amsgrad"),
])
def test_optimizer_texts_that_cannot_train_are_exit_2(argv, fragment, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert fragment in capsys.readouterr().err and not (tmp_path / "out").exists()
