"""Training trajectories: every framework trains the MLP from one start on the same batches, step by step.

Each framework's parameters after every step are compared with the float64 numpy trajectory that uses that
framework's own optimizer rule (hand-written gradient and update): within rtol(t) = rtol_gradient(u) * t at
every step, not only the last. Pairs part exactly where their optimizer rules say they part.
"""
import numpy as np
import pytest

from gradparity.reference.train import trajectory
from gradparity.commands.train import TrainSpec, build_batches, check_spec, run_training
from gradparity.errors import ConfigError
from gradparity.experiment.optimizers import OptimizerConfig


def test_reference_sgd_step_is_the_gradient_step():
    """One plain SGD step of the numpy trajectory is p - lr * (mean-loss gradient), the gradient checked
    against central finite differences of the mean loss along a random direction."""
    spec = TrainSpec(optimizer="sgd", steps=1, batch_size=8, dtype="float64")
    model, params, batches, _ = build_batches(spec)
    steps, losses = trajectory(params, batches, model.to_dict(), OptimizerConfig("sgd", 1.0), [1.0], "mean", "torch")
    grad = {k: params[k] - steps[0][k] for k in params}  # lr 1: the update is the gradient
    rng = np.random.default_rng(1)
    direction = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    h = 1e-6

    def loss_at(sign):
        shifted = {k: params[k] + sign * h * direction[k] for k in params}
        return trajectory(shifted, batches, model.to_dict(), OptimizerConfig("sgd", 0.0), [0.0], "mean", "torch")[1][0]

    fd = (loss_at(1) - loss_at(-1)) / (2 * h)
    analytic = sum(float(np.sum(grad[k] * direction[k])) for k in params)
    assert fd == pytest.approx(analytic, rel=1e-6)
    assert losses[0] == pytest.approx((loss_at(1) + loss_at(-1)) / 2, rel=1e-9)


@pytest.mark.parametrize("spec, message", [
    (TrainSpec(optimizer="rmsprop"), "optimizer 'rmsprop'"),
    (TrainSpec(steps=0), "steps must be"),
    (TrainSpec(reduction="avg"), "reduction 'avg'"),
    (TrainSpec(lr=-1.0), "lr must be a positive"),
    (TrainSpec(backends=("numpy",)), "backend 'numpy'"),
])
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        check_spec(spec)


@pytest.mark.frameworks("torch", "keras-jax", "jax")
def test_every_framework_follows_its_own_rule_and_keras_parts_under_a_schedule():
    """Momentum SGD with the lr halved halfway, float64: every framework on its own rule's trajectory at
    every step; torch and optax together; Keras apart from the step after the change, as its rule predicts."""
    spec = TrainSpec(optimizer="momentum", steps=8, batch_size=16, schedule="step", dtype="float64",
                     backends=("torch", "keras-jax", "jax"), timeout_s=300)
    report = run_training(spec)
    assert all(t.status == "ok" for t in report.trajectories), [t.error for t in report.trajectories]
    for t in report.trajectories:
        assert t.first_off_rule is None, (t.backend, t.vs_rule)
        assert max(t.vs_rule) < 1e-13, (t.backend, t.vs_rule)
    pairs = {(p.a, p.b): p for p in report.pairs}
    assert pairs[("torch", "jax")].first_apart is None
    for key in (("torch", "keras-jax"), ("keras-jax", "jax")):
        assert pairs[key].first_apart == spec.steps // 2 + 1, pairs[key].per_step
        assert pairs[key].per_step[-1] == pytest.approx(pairs[key].predicted[-1], rel=1e-6)
    assert report.exit_code == 0


@pytest.mark.frameworks("torch", "keras-tensorflow", "jax")
def test_float32_adam_stays_on_track_in_every_framework():
    spec = TrainSpec(optimizer="adam", steps=10, batch_size=16, backends=("torch", "keras-tensorflow", "jax"),
                     timeout_s=300)
    report = run_training(spec)
    for t in report.trajectories:
        assert t.status == "ok", t.error
        assert t.first_off_rule is None, (t.backend, t.vs_rule, t.rule_rtol)
    pairs = {(p.a, p.b): p for p in report.pairs}
    assert pairs[("torch", "jax")].first_apart is None
    # Keras' epsilon hat shows from step 1 on the digits, whose blank pixels give near-zero gradients: the
    # float64 trajectories of the two rules are as far apart as the frameworks.
    keras = pairs[("torch", "keras-tensorflow")]
    assert keras.first_apart == 1
    assert keras.per_step[-1] == pytest.approx(keras.predicted[-1], rel=1e-2)


@pytest.mark.frameworks("torch", "jax")
def test_sum_at_lr_over_b_is_mean_at_lr_and_adam_differs_by_epsilon():
    """SGD momentum: the summed loss at lr/B gives the mean's updates to rounding (B = 24, not a power of two,
    so they are not bit-identical). Adam at the same lr: apart by exactly what the float64 rules predict (the
    epsilon term)."""
    sgd = run_training(TrainSpec(optimizer="momentum", steps=6, batch_size=24, dtype="float64",
                                 backends=("torch", "jax"), equivalence=True, timeout_s=300))
    for t in sgd.trajectories:
        assert t.status == "ok", t.error
        assert 0 < max(t.vs_other) and all(d <= r for d, r in zip(t.vs_other, t.rule_rtol)), (t.backend, t.vs_other)
    adam = run_training(TrainSpec(optimizer="adam", steps=6, batch_size=24, dtype="float64",
                                  backends=("torch", "jax"), equivalence=True, timeout_s=300))
    for t in adam.trajectories:
        assert max(t.vs_other) > 1e-8  # epsilon, on the digits' near-zero gradients
        assert max(t.vs_other) == pytest.approx(max(t.other_predicted), rel=1e-6)


@pytest.mark.frameworks("torch", "jax")
def test_the_cli_writes_a_report_set_that_loads_in_a_browser(tmp_path):
    """`gradparity train --out`: report.json (schema gradparity.train/1) lists the SHA-256 of every other file;
    report.html embeds loss.png and drift.png byte for byte and loads in headless chromium without console
    errors (skipped without chromium)."""
    import base64
    import hashlib
    import json
    import re

    from gradparity.cli import main
    from test_html_report import _load

    out = tmp_path / "train-out"
    code = main(["train", "--optimizer", "sgd", "--steps", "4", "--batch-size", "8", "--backends", "torch,jax",
                 "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["schema"] == "gradparity.train/1" and len(doc["trajectories"]) == 2
    for name, entry in doc["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"], name
    page = (out / "report.html").read_text(encoding="utf-8")
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert embedded == [(out / "loss.png").read_bytes(), (out / "drift.png").read_bytes()]
    assert "http://" not in page and "https://" not in page
    attrs, console = _load(out / "report.html", tmp_path)
    assert console == [] and attrs == {"images-total": "2", "images-loaded": "2"}


# The sweep's tests (`train --sweep`, `benchmark`) are in test_sweep.py.


def test_the_train_plots_keep_their_legends_off_the_curves():
    """loss.png and drift.png: the legends (several frameworks, the numpy rules, the pairs and rtol) lie outside
    every axes' data area, where they covered the curves. Curves written here as plain lists; the figures are read
    back from matplotlib's layout (``legend_overlaps``), not from an image."""
    from gradparity.commands.train import Pair, TrainReport, Trajectory
    from gradparity.commands.train_report import drift_figure, loss_figure
    from test_html_report import legend_overlaps

    steps = 12
    decay = [float(np.exp(-0.2 * t)) for t in range(steps)]
    trajectories = [Trajectory(b, "ok", losses=[2.3 * d + k * 1e-3 for d in decay],
                               accuracy=[1 - 0.9 * d for d in decay], vs_rule=[1e-7 * (t + 1) for t in range(steps)],
                               rule_rtol=[1e-5 * (t + 1) for t in range(steps)])
                    for k, b in enumerate(("torch", "jax", "keras-tensorflow"))]
    pairs = [Pair(a.backend, b.backend, [2e-7 * (t + 1) for t in range(steps)], [1e-5 * (t + 1) for t in range(steps)],
                  [0.0] * steps) for i, a in enumerate(trajectories) for b in trajectories[i + 1:]]
    report = TrainReport(TrainSpec(steps=steps, backends=("torch", "jax", "keras-tensorflow")), "plain lists",
                         trajectories, pairs, {b: [2.3 * d for d in decay] for b in ("torch", "keras-tensorflow")},
                         {b: [1 - 0.9 * d for d in decay] for b in ("torch", "keras-tensorflow")})
    assert legend_overlaps(loss_figure(report)) == []
    assert legend_overlaps(drift_figure(report)) == []
