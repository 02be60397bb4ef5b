"""diagnose on gradients computed by code written directly in a framework, not by gradparity's pipeline.

Each case in tests/framework_cases/ is a short script in the framework's own idiom that writes an npz of
METHOD/PARAM gradients; the diagnosis, given what its author would know, must rank the true cause first.
(The seed question's own PyTorch reproduction, examples/seed_question_torch.py, is tested in test_diagnose.py.)
"""
import os
import subprocess
import sys

import pytest

from gradparity.commands import diagnose as dg

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "framework_cases")


def run_case(script: str, tmp_path, *args: str) -> dg.Observations:
    out = tmp_path / "gradients.npz"
    proc = subprocess.run([sys.executable, os.path.join(CASES, script), str(out), *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dg.read_gradients(str(out))


@pytest.mark.frameworks("jax")
def test_jax_micro_batch_means_added_without_one_over_k(tmp_path):
    obs = run_case("jax_accumulation.py", tmp_path)
    obs.info = dg.Info(micro_batches=3, dtype="float64")
    d = dg.diagnose(obs)
    assert d.top.id == "accumulation_normalization", dg.render_text(d)
    # optax.MultiSteps averages the micro-batch gradients: it agrees with the full batch.
    assert sorted(map(sorted, d.clusters)) == [["accumulated"], ["full_batch", "multisteps"]]


@pytest.mark.frameworks("keras-tensorflow")
def test_keras_sum_over_batch_size_against_mean_with_sample_weight(tmp_path):
    obs = run_case("keras_weighted_means.py", tmp_path)
    assert obs.labels == ["sum_over_batch_size", "mean_with_sample_weight"]  # Keras paths keep their '/'
    obs.info = dg.Info(dtype="float64", loss_reduction="class-weighted mean, weights as sample_weight")
    d = dg.diagnose(obs)
    assert d.top.id == "weighted_mean_mismatch", dg.render_text(d)


@pytest.mark.frameworks("jax")
def test_optax_multisteps_accumulates_in_float32_by_default(tmp_path):
    """Measured (optax 0.2.8): MultiSteps' accumulator is float32 unless accumulator_dtype says otherwise, so a
    float64 run's averaged gradient is off by float32 rounding, not float64's."""
    import numpy as np

    obs = run_case("jax_accumulation.py", tmp_path, "default-accumulator")
    full, multi = obs.grads["full_batch"], obs.grads["multisteps"]
    rel = max(float(np.max(np.abs(full[k] - multi[k])) / np.max(np.abs(full[k]))) for k in full)
    assert 1e-12 < rel < 2.0 ** -24 * 64, rel  # beyond float64 rounding, within float32's


@pytest.mark.frameworks("keras-tensorflow")
def test_keras_gradient_accumulation_steps_averages_micro_batch_means(tmp_path):
    """Measured (keras 3.15): optimizer.gradient_accumulation_steps applies the plain average of the micro-batch
    gradients. Equal micro-batches give the full-batch gradient; uneven ones (4, 4, 2) do not, since the short
    micro-batch's examples weigh 1/6 each instead of 1/10."""
    import numpy as np

    obs = run_case("keras_accumulation.py", tmp_path)
    g = obs.grads

    def rel(a, b):
        return max(float(np.max(np.abs(g[a][k] - g[b][k])) / np.max(np.abs(g[b][k]))) for k in g[b])

    assert rel("accumulated_even", "full_batch_even") < 1e-12
    assert rel("accumulated_uneven", "mean_of_means_uneven") < 1e-12
    assert rel("accumulated_uneven", "full_batch_uneven") > 0.05


@pytest.mark.frameworks("torch")
def test_torch_dropout_left_in_training_mode(tmp_path):
    """nn.Dropout without model.eval(): every forward pass draws a fresh mask, so even sum and mean differ."""
    obs = run_case("torch_dropout.py", tmp_path)
    obs.info = dg.Info(dtype="float64", batch_size=16)
    d = dg.diagnose(obs)
    assert d.top.id == "dropout_train_mode", dg.render_text(d)
    assert len(d.clusters) == 4  # no two methods agree


@pytest.mark.frameworks("torch")
def test_torch_reseeding_before_each_method_draws_the_same_dropout_masks(tmp_path):
    """Measured (torch 2.13, CPU): with torch.manual_seed(0) before each method, one (16, 12) mask and sixteen
    (1, 12) masks come from the same stream in the same order, so even one_by_one sees the batch's masks and
    all four methods agree to rounding: reseeding hides dropout from this comparison."""
    obs = run_case("torch_dropout.py", tmp_path, "reseed")
    obs.info = dg.Info(dtype="float64", batch_size=16)
    assert dg.diagnose(obs).top.id == "clean"


@pytest.mark.frameworks("jax")
def test_flax_batchnorm_in_training_mode(tmp_path):
    """nnx.BatchNorm(use_running_average=False): vmap and one example at a time normalize single examples,
    which have no variance, so nothing before the normalization gets a gradient from them."""
    obs = run_case("jax_batchnorm.py", tmp_path)
    obs.info = dg.Info(dtype="float64", batch_size=16)
    d = dg.diagnose(obs)
    assert d.top.id == "batchnorm_train_mode", dg.render_text(d)
    assert d.top.score >= 0.9 and "no gradient for dense1.kernel" in " ".join(d.top.evidence)
    assert sorted(map(sorted, d.clusters)) == [["mean", "none", "sum"], ["one_by_one", "vmap"]]
