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
    from gradparity.backends.numpy.models import trajectory

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
    (["train", "--model", "cnn", "--sweep"], "--sweep trains the built-in MLP only"),
])
def test_bad_model_choices_are_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
