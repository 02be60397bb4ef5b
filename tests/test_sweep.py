"""`gradparity train --sweep`: batch sizes x learning-rate rules, with sample weights, a short last batch and an
lr grid.

The numbers the sweep reports are checked against what they must be: the float64 reference's weighted
reductions against a hand computation, every framework's weighted and short-batch trajectory against the
float64 trajectory within the tolerance ``gradparity train`` uses, the short batch's per-example weight against
B / b_last (b_last = n mod B by hand), and the grid's best lr against the argmax of its measured accuracies.
"""
import numpy as np
import pytest

from gradparity.commands.sweep import (B0, SweepSpec, build_sequence, check_sweep, class_weights, job_arrays,
                                       last_batch_effect, recipe_lines, run_sweep, to_dict, train_job)
from gradparity.commands.train import TrainSpec, split_digits
from gradparity.errors import ConfigError
from gradparity.experiment.inputs import init_params
from gradparity.experiment.models import MLP
from gradparity.experiment.optimizers import OptimizerConfig
from gradparity.reference.mlp import backward, cross_entropy, forward
from gradparity.reference.train import loss_scale, trajectory

from conftest import installed

#: The digits' training split (80% of 1,797) the sweep cuts into batches.
N_TRAIN = 1438


def _digits(dtype="float64"):
    spec = TrainSpec(dtype=dtype)
    (x, y), held, _ = split_digits(spec)
    model = MLP((x.shape[1], *spec.hidden, 10), spec.activation)
    return spec, x, y, held, model, init_params(model, spec.seed, dtype)


# --- the float64 reference ---------------------------------------------------------------------------------------

def test_reference_weighted_reductions_against_a_hand_computation():
    """On 4 digits with weights 0.5, 1, 2, 4.5 (sum 8, N 4): the reference's sum_over_batch_size loss is
    sum(w l) / 4 and its weighted mean sum(w l) / 8, with l computed here by hand (ReLU MLP, log-sum-exp); one
    plain SGD step at lr 1 moves sum_over_batch_size exactly sum(w)/N = 2 times as far as the weighted mean, and
    its gradient matches central finite differences of the hand-computed loss."""
    _, x, y, _, model, params = _digits()
    xb, yb = x[:4], y[:4]
    w = np.array([0.5, 1.0, 2.0, 4.5])
    p = {k: v.astype(np.float64) for k, v in params.items()}

    def hand_losses(q):
        h = np.maximum(xb @ q["layers.0.kernel"] + q["layers.0.bias"], 0.0)
        z = h @ q["layers.1.kernel"] + q["layers.1.bias"]
        m = z.max(axis=1)
        return m + np.log(np.exp(z - m[:, None]).sum(axis=1)) - z[np.arange(4), yb]

    by_hand = float(w @ hand_losses(p))
    np.testing.assert_allclose(loss_scale("sum_over_batch_size", 4, w), w / 4, rtol=0, atol=0)
    np.testing.assert_allclose(loss_scale("weighted_mean", 4, w), w / 8, rtol=0, atol=0)
    sgd = OptimizerConfig("sgd", 1.0)
    steps = {}
    for reduction in ("sum_over_batch_size", "weighted_mean", "sum"):
        after, losses = trajectory(p, [(xb, yb)], model.to_dict(), sgd, [1.0], reduction, "torch", weights=[w])
        steps[reduction] = {k: p[k] - after[0][k] for k in p}
        divisor = {"sum_over_batch_size": 4.0, "weighted_mean": 8.0, "sum": 1.0}[reduction]
        assert losses[0] == pytest.approx(by_hand / divisor, rel=1e-13)
    for k in p:
        np.testing.assert_allclose(steps["sum_over_batch_size"][k], 2.0 * steps["weighted_mean"][k], rtol=1e-12,
                                   atol=1e-15)
    direction = {k: np.random.default_rng(3).standard_normal(v.shape) for k, v in p.items()}
    h = 1e-6
    fd = (float(w @ hand_losses({k: p[k] + h * direction[k] for k in p}))
          - float(w @ hand_losses({k: p[k] - h * direction[k] for k in p}))) / (2 * h) / 4.0
    analytic = sum(float(np.sum(steps["sum_over_batch_size"][k] * direction[k])) for k in p)
    assert fd == pytest.approx(analytic, rel=1e-6)
    with pytest.raises(ValueError, match="no reduction 'mean' with weights"):
        loss_scale("mean", 4, w)


def test_keep_weighs_a_short_batch_example_by_the_reduction():
    """With keep, every epoch ends with n mod B examples (14 at B = 16, 30 at B = 64: 1438 = 89*16 + 14 =
    22*64 + 30). Per unit of sample weight, every example weighs lr0/B0 under sum at lr0/B0 (the same number in
    every step); under mean and sum_over_batch_size a short-batch example weighs B / b_last times a full batch's;
    under the weighted mean, sum(w) of a full batch / sum(w) of the short one. And the reference's update on a
    short batch is exactly those factors times the per-example gradients."""
    spec, x, y, _, model, params = _digits()
    c = class_weights(y, "skewed", spec.seed)
    for b, b_last in ((16, 14), (64, 30)):
        plain, _ = build_sequence(x, y, b, 2, spec.seed, "float64", "keep")
        weighted, batches = build_sequence(x, y, b, 2, spec.seed, "float64", "keep", c)
        assert plain.sizes == ([b] * (N_TRAIN // b) + [b_last]) * 2
        assert plain.ends == [N_TRAIN // b + 1, 2 * (N_TRAIN // b + 1)]
        short = [t - 1 for t in plain.ends]
        summed = np.concatenate(plain.example_factors("sum", 0.05 / B0))
        assert summed.min() == summed.max() == 0.05 / B0
        for seq, reduction in ((plain, "mean"), (weighted, "sum_over_batch_size")):
            factors = seq.example_factors(reduction, 0.05)
            for t, f in enumerate(factors):
                assert f == pytest.approx(np.full(len(f), 0.05 / (b_last if t in short else b)), rel=1e-12)
            assert factors[short[0]][0] / factors[0][0] == pytest.approx(b / b_last, rel=1e-12)
        wmean = weighted.example_factors("weighted_mean", 0.05)
        totals = [float(np.sum(w)) for w in weighted.weights]
        assert wmean[short[0]][0] / wmean[0][0] == pytest.approx(totals[0] / totals[short[0]], rel=1e-12)
        # The reference applies exactly these factors: its SGD step on the short batch (lr 1) is the factors
        # times the per-example gradients, summed.
        xs, ys = batches[short[0]]
        p = {k: v.astype(np.float64) for k, v in params.items()}
        after, _ = trajectory(p, [(xs, ys)], model.to_dict(), OptimizerConfig("sgd", 1.0), [1.0],
                              "weighted_mean", "torch", weights=[weighted.weights[short[0]]])
        f = forward(p, xs, model.to_dict())
        per_example = backward(p, f, cross_entropy(f.logits, ys)[1], model.to_dict(), per_example=True)
        unit = weighted.example_factors("weighted_mean", 1.0)[short[0]] * weighted.weights[short[0]]
        for k in p:
            np.testing.assert_allclose(p[k] - after[0][k], np.tensordot(unit, per_example[k], axes=1),
                                       rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("spec, message", [
    (SweepSpec(TrainSpec(), class_weights="heavy"), "class weights 'heavy'"),
    (SweepSpec(TrainSpec(), last_batch="pad"), "last batch 'pad'"),
    (SweepSpec(TrainSpec(), lr_grid=(0.5, -1.0)), r"lr grid multipliers must be positive numbers, got \[-1.0\]"),
    (SweepSpec(TrainSpec(), lr_grid=(1.0, float("nan"))), "must be positive numbers"),
    (SweepSpec(TrainSpec(), lr_grid=(1.0, 1.0)), "distinct multipliers"),
    (SweepSpec(TrainSpec(), batch_sizes=(0,)), "batch sizes must be"),
    (SweepSpec(TrainSpec(optimizer="rmsprop")), "optimizer 'rmsprop'"),
    (SweepSpec(TrainSpec(), seeds=(1, 1)), "distinct non-negative integers"),
    (SweepSpec(TrainSpec(), seeds=(0, -1)), "distinct non-negative integers"),
])
def test_bad_sweep_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        check_sweep(spec)


@pytest.mark.parametrize("argv, message", [
    (["--lr-grid=0.5,-2"], "positive numbers"),
    (["--lr-grid", "0.5,x"], "comma-separated numbers"),
    (["--class-weights", "heavy", "--last-batch", "pad"], "2 problems"),
    (["--seeds", "0,x"], "comma-separated integers"),
])
def test_bad_sweep_flags_exit_2_before_anything_runs(tmp_path, capsys, argv, message):
    from gradparity.cli import main

    out = tmp_path / "never"
    assert main(["train", "--sweep", "--backends", "torch", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err and not out.exists()
    assert main(["train", "--lr-grid", "1,2", "--out", str(out)]) == 2  # sweep options need --sweep
    assert "only with --sweep" in capsys.readouterr().err


def test_the_lr_grid_flag_without_a_value_is_the_default_grid():
    """``--lr-grid`` alone means ``DEFAULT_GRID``, and the help text names those multipliers."""
    from gradparity.cli import _parser
    from gradparity.commands.sweep import DEFAULT_GRID

    parser = _parser()
    args = parser.parse_args(["train", "--sweep", "--lr-grid"])
    assert args.lr_grid == "default"
    train = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if "--lr-grid" in
                 a.option_strings)
    assert ",".join(f"{m:g}" for m in DEFAULT_GRID) in train.help


@pytest.mark.parametrize("holds, expected", [
    ({32: True, 64: True, 128: False}, (64, 128)),
    ({32: True, 64: False, 128: True}, (32, 64)),    # holding again at 128 does not extend "up to"
    ({32: False, 64: True, 128: True}, (None, 32)),
    ({16: False, 32: True, 64: True, 128: True}, (128, None)),  # below B0 does not count
])
def test_linear_scaling_holds_up_to_the_first_batch_size_where_it_fails(holds, expected):
    from gradparity.commands.sweep import _holds_up_to

    assert _holds_up_to((16, 32, 64, 128), holds) == expected


# --- every framework against the float64 reference -----------------------------------------------------------

@pytest.fixture(scope="module")
def weighted_runs():
    """One train job per installed framework, as the sweep builds them: skewed class weights, B = 64 with the
    short batch kept (22 full steps, then one of 30), momentum; the weighted mean (at lr0 and 2 lr0: runs that
    share one compiled step in JAX), sum_over_batch_size and the weighted sum, and the unweighted mean on the same
    batches; every step recorded. Returns (runs, their optimizer configs, sequence, batches, model, params,
    outcome by backend)."""
    from dataclasses import replace

    from gradparity.backends import BACKENDS
    from gradparity.run.execute import remove_stale_job_dirs, run_backend

    base = TrainSpec(optimizer="momentum", timeout_s=300, backends=("torch", "jax", "keras-tensorflow"))
    spec, x, y, _, model, params = _digits("float32")
    seq, batches = build_sequence(x, y, 64, 1, spec.seed, "float32", "keep", class_weights(y, "skewed", spec.seed))
    steps = list(range(1, len(seq.sizes) + 1))
    runs, configs = {}, {}
    for case, reduction, lr, weighted in (("wmean", "weighted_mean", 0.05, True),
                                          ("wmean2", "weighted_mean", 0.1, True),
                                          ("sobs", "sum_over_batch_size", 0.05, True),
                                          ("wsum", "sum", 0.05 / B0, True), ("mean", "mean", 0.05, False)):
        configs[case] = replace(base.config(), lr=lr)
        runs[case] = {"optimizer": configs[case].to_dict(), "lrs": [lr] * len(steps), "reduction": reduction,
                      "batches": seq.prefix, "record": steps, "weights": weighted}
    remove_stale_job_dirs()
    outcomes = {b: run_backend(train_job(base, b, model, params, job_arrays(seq, batches), runs), BACKENDS[b], 300)
                for b in base.backends if installed(b)}
    return runs, configs, seq, batches, model, params, outcomes


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.frameworks(b))
                                     for b in ("torch", "jax", "keras-tensorflow")])
def test_weighted_short_batch_training_follows_the_float64_trajectory(weighted_runs, backend):
    """Each framework's native weighted reductions (torch CrossEntropyLoss(reduction='none') * w; optax
    per-example losses * w; Keras' loss object with sample_weight and its own reduction names) and its step on
    the short last batch (a new shape: JAX and tf.function retrace) stay on the float64 numpy trajectory within
    rtol(t) = rtol_gradient(u) * t at every step; the weighted mean and sum_over_batch_size trajectories are far
    more than that apart, so a framework that ignored the weights or divided by the wrong total would fail."""
    from gradparity.backends import BACKENDS
    from gradparity.compare.tolerance import UNIT_ROUNDOFF, effective_unit_roundoff, tolerance_for
    from gradparity.compare.trajectories import relative_distance

    runs, configs, seq, batches, model, params, outcomes = weighted_runs
    outcome = outcomes[backend]
    assert outcome.status == "ok", outcome.error
    u = effective_unit_roundoff(outcome.environment) or UNIT_ROUNDOFF["float32"]
    rtol = tolerance_for(model, 64).rtol(u)
    framework = BACKENDS[backend].framework
    start = {k: v.astype(np.float64) for k, v in params.items()}
    got = {}
    for case, run in runs.items():
        row = outcome.methods[case]
        assert row.status == "ok", row.error
        ref, ref_losses = trajectory(start, batches, model.to_dict(), configs[case], run["lrs"], run["reduction"],
                                     framework, weights=seq.weights if run["weights"] else None)
        got[case] = [{k: np.asarray(row.grads[f"{t}/{k}"], dtype=np.float64) for k in params}
                     for t in run["record"]]
        distances = [relative_distance(p, r) for p, r in zip(got[case], ref)]
        assert all(d <= rtol * t for t, d in enumerate(distances, start=1)), (case, distances, rtol)
        losses = [float(row.grads[f"loss/{t}"]) for t in run["record"]]
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert seq.sizes[-1] == 30 and len(got["wmean"]) == 23
    apart = relative_distance(got["wmean"][-1], got["sobs"][-1])
    assert apart > 10 * rtol * 23, apart  # 0.016 against rtol(23) = 3.5e-4 in float32


@pytest.mark.frameworks("torch")
def test_sweep_with_weights_keep_and_a_grid_in_torch():
    """A torch sweep (1 epoch, B = 16 and 64, skewed class weights, the short batch kept, lr x 0.5 and 2):
    sum(w)/N per batch size as computed here from the labels; the short batch's per-example weight over a full
    batch's is B / b_last under mean-like sobs and 1 under sum; keep - drop is reported per rule; the grid's best
    lr per (B, reduction) is the argmax of its points' accuracies; report.json keeps schema /1 with the new keys."""
    spec = SweepSpec(TrainSpec(optimizer="momentum", backends=("torch",), timeout_s=300), batch_sizes=(16, 64),
                     epochs=1, class_weights="skewed", last_batch="keep", lr_grid=(0.5, 2.0))
    report = run_sweep(spec)
    assert all(c.status == "ok" for c in report.cells), [c.error for c in report.cells if c.error]
    _, x, y, _, _, _ = _digits()
    doc = to_dict(report)
    c = class_weights(y, "skewed", 0)
    for row in doc["weights"]["sum_w_over_n_per_batch_size"]:
        seq, batches = build_sequence(x, y, row["batch_size"], 1, 0, "float32", "keep", c)
        ratios = [float(np.sum(c[by].astype(np.float32), dtype=np.float64)) / len(by) for _, by in batches]
        assert row["min"] == pytest.approx(min(ratios), rel=1e-12)
        assert row["max"] == pytest.approx(max(ratios), rel=1e-12)
        assert row["max_over_min"] > 1.3  # the skew shows at both batch sizes
    effect = {(e["batch_size"], e["rule"]): e for e in last_batch_effect(report)}
    for b, b_last in ((16, 14), (64, 30)):
        assert effect[(b, "sobs")]["b_last"] == b_last
        assert effect[(b, "sobs")]["short_over_full"] == pytest.approx(b / b_last, rel=1e-12)
        assert effect[(b, "sobs_linear")]["short_over_full"] == pytest.approx(b / b_last, rel=1e-12)
        assert effect[(b, "sum")]["short_over_full"] == pytest.approx(1.0, rel=1e-12)
        for e in (effect[(b, r)] for r in spec.rules()):
            assert e["accuracy_difference"] == pytest.approx(e["accuracy_keep"] - e["accuracy_drop"], abs=1e-12)
            assert e["max_rel_param_difference"] > 1e-4  # the short batch's step changes the end point
    grid = doc["grid"]
    for best in grid["best"]:
        points = [p for p in grid["points"] if p["batch_size"] == best["batch_size"]
                  and p["reduction"] == best["reduction"]]
        accs = [p["accuracy"] for p in points]
        assert best["accuracy"] == max(accs) and best["lr"] == points[int(np.argmax(accs))]["lr"]
        # every point is the mean over frameworks of the cells at that lr (torch alone here)
        for p in points:
            cells = [c for c in report.cells if c.batch_size == p["batch_size"] and c.reduction == p["reduction"]
                     and c.role in ("main", "grid") and abs(c.lr - p["lr"]) <= 1e-12 * p["lr"]]
            assert cells and all(c.accuracy[-1] == p["accuracy"] for c in cells)
    # B = 16, weighted mean: lr0 x {0.5, 1, 2} and lr0/2 x {0.5, 1, 2} are 4 distinct learning rates
    assert sum(1 for p in grid["points"] if p["batch_size"] == 16 and p["reduction"] == "weighted_mean") == 4
    assert doc["schema"] == "gradparity.train.sweep/1" and len(doc["cells"]) == 2 * 5
    assert {c["role"] for c in doc["extra_cells"]} == {"grid", "drop"}
    text = "\n".join(recipe_lines(report))
    assert "no constant lr factor converts one into the other" in text and "learning-rate grid" in text


# --- the default sweep (moved from test_train.py) -------------------------------------------------------------

@pytest.mark.frameworks("torch", "jax")
def test_sweep_sum_at_lr_over_b0_is_linear_scaling_and_frameworks_agree():
    """The sweep's sum rule (lr0 / B0 on the summed loss) and the blog's linear rule (lr0 * B / B0 on the mean)
    are the same update at every batch size: same held-out accuracy and final parameters to rounding, in
    every framework; the frameworks' final parameters agree within float32 rounding of a training run. The two
    workers run side by side (parallel=2), as they do where cores allow."""
    report = run_sweep(SweepSpec(TrainSpec(optimizer="momentum", backends=("torch", "jax"), timeout_s=300),
                                 batch_sizes=(16, 32), epochs=1, parallel=2))
    assert all(c.status == "ok" for c in report.cells), [c.error for c in report.cells if c.error]
    by = {(c.backend, c.batch_size, c.rule): c for c in report.cells}
    for backend in ("torch", "jax"):
        for b in (16, 32):
            linear, summed = by[(backend, b, "mean_linear")], by[(backend, b, "sum")]
            assert linear.accuracy == summed.accuracy
            assert max(float(np.max(np.abs(linear.final[k] - summed.final[k]))) for k in linear.final) < 1e-5
    assert all(v is not None and v < 1e-5 for v in report.parity.values()), report.parity
    lines = recipe_lines(report)
    assert lines[0].startswith("learning-rate recipe from (B0 = 32") and "linear scaling" in lines[-1]


@pytest.mark.frameworks("torch")
def test_benchmark_command_reports_wall_time_and_time_per_step(capsys):
    """`gradparity benchmark` reports, per framework, its worker's wall time and the time per step of the timed
    runs (figures, not asserted: no timing assertions in tests), as JSON with --json."""
    import json

    from gradparity.cli import main

    assert main(["benchmark", "--batch-sizes", "32", "--epochs", "1", "--backends", "torch", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"total_seconds", "worker_wall_seconds", "timed_seconds", "steps"}
    assert set(doc["worker_wall_seconds"]) == {"torch"} and doc["steps"]["torch"] == 3 * (1438 // 32)


def _report_files(out, tmp_path, pngs):
    """report.json's SHA-256 of every file, the PNGs embedded byte for byte, and the page loading in chromium."""
    import base64
    import hashlib
    import json
    import re

    from test_html_report import _load

    doc = json.loads((out / "report.json").read_text())
    for name, entry in doc["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"], name
    page = (out / "report.html").read_text(encoding="utf-8")
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert embedded == [(out / name).read_bytes() for name in pngs]
    attrs, console = _load(out / "report.html", tmp_path)
    assert console == [] and attrs == {"images-total": str(len(pngs)), "images-loaded": str(len(pngs))}
    return doc


@pytest.mark.frameworks("torch")
def test_the_sweep_writes_its_recipe_report(tmp_path):
    """`gradparity train --sweep --out`: report.html with the recipe plot and the per-epoch plot embedded byte for
    byte, report.json (schema gradparity.train.sweep/1) listing every file's SHA-256; loads in chromium. The
    options are off: their keys are null and no other runs are made."""
    from gradparity.cli import main

    out = tmp_path / "sweep-out"
    assert main(["train", "--sweep", "--batch-sizes", "16,32", "--epochs", "1", "--backends", "torch",
                 "--out", str(out)]) == 0
    doc = _report_files(out, tmp_path, ["recipe.png", "epochs.png"])
    assert doc["schema"] == "gradparity.train.sweep/1" and doc["recipe"][0].startswith("learning-rate recipe")
    assert (doc["class_weights"], doc["last_batch"], doc["lr_grid"]) == ("none", "drop", None)
    assert doc["weights"] is doc["grid"] is doc["last_batch_effect"] is None and doc["extra_cells"] == []
    assert len(doc["cells"]) == 2 * 3


@pytest.mark.frameworks("torch")
def test_the_sweep_report_with_every_option(tmp_path):
    """With --class-weights, --last-batch keep and --lr-grid, report.html also embeds grid.png and weights.png and
    report.json carries the weights' spread, the short batch's effect and the grid."""
    from gradparity.cli import main

    out = tmp_path / "sweep-options"
    assert main(["train", "--sweep", "--batch-sizes", "32", "--epochs", "1", "--backends", "torch",
                 "--class-weights", "balanced", "--last-batch", "keep", "--lr-grid", "0.5,2", "--out", str(out)]) == 0
    doc = _report_files(out, tmp_path, ["recipe.png", "epochs.png", "grid.png", "weights.png"])
    assert doc["weights"]["scheme"] == "balanced" and len(doc["weights"]["per_class"]) == 10
    assert {e["rule"] for e in doc["last_batch_effect"]} == {"mean", "mean_linear", "sum", "sobs", "sobs_linear"}
    assert doc["grid"]["multipliers"] == [0.5, 2.0] and doc["grid"]["best"]


@pytest.mark.frameworks("torch")
def test_several_seeds_are_each_seeds_own_sweep_and_their_spread():
    """--seeds 0,1: every cell keeps its seed; seed 1's accuracies are those of a sweep run with seed 1 alone
    (its own parameters, split and order); the accuracy is the mean over seeds, the spread their std (ddof 1)."""
    from gradparity.commands.sweep import run_sweep

    base = TrainSpec(backends=("torch",), timeout_s=300)
    both = run_sweep(SweepSpec(base, batch_sizes=(16, 32), epochs=1, seeds=(0, 1)))
    alone = run_sweep(SweepSpec(base, batch_sizes=(16, 32), epochs=1, seeds=(1,)))
    assert both.seeds == [0, 1] and {c.seed for c in alone.cells} == {1}
    for b in (16, 32):
        for rule in ("mean", "mean_linear", "sum"):
            per = both.per_seed(rule, b)
            assert per[1] == alone.accuracy(rule, b)
            assert both.accuracy(rule, b) == pytest.approx((per[0] + per[1]) / 2, abs=1e-12)
            assert both.spread(rule, b) == pytest.approx(abs(per[0] - per[1]) / np.sqrt(2), abs=1e-12)
    assert any(per[0] != per[1] for per in (both.per_seed(r, b) for r in ("mean", "sum") for b in (16, 32)))
    assert "seed-to-seed standard deviation" in "\n".join(recipe_lines(both))


def test_framework_parity_names_the_rule_difference_or_rounding():
    """The sweep's answer to 'do the frameworks train identically': per pair the largest final difference (here
    planted), and why: Adam's rules differ between Keras (epsilon hat) and torch/optax, momentum's do not."""
    from gradparity.commands.sweep import Cell, SweepReport, framework_parity

    p = {"w": np.array([1.0, -2.0])}
    cells = [Cell(backend, 32, "mean", "mean", 0.01, "ok", final={"w": p["w"] + shift})
             for backend, shift in (("torch", 0.0), ("jax", 1e-7), ("keras-tensorflow", 0.02))]
    for optimizer in ("adam", "momentum"):
        spec = SweepSpec(TrainSpec(optimizer=optimizer, backends=("torch", "jax", "keras-tensorflow")),
                         batch_sizes=(32,))
        rows = {(r["a"], r["b"]): r for r in framework_parity(SweepReport(spec, 0.01, cells, {}, ""))}
        assert rows[("torch", "jax")]["max_rel_final_params"] == pytest.approx(1e-7 / 2, rel=1e-6)
        assert rows[("torch", "keras-tensorflow")]["max_rel_final_params"] == pytest.approx(0.02 / 2.0, rel=1e-6)
        assert rows[("torch", "jax")]["same_update"]
        assert rows[("torch", "keras-tensorflow")]["same_update"] is (optimizer == "momentum")
        if optimizer == "adam":
            assert "epsilon: corrected (torch) vs hat (keras-tensorflow)" in rows[("torch", "keras-tensorflow")][
                "rule_differences"]


def test_workers_run_side_by_side_where_cores_allow(monkeypatch):
    """One framework worker per CORES_PER_WORKER cores, at most one per framework, at least one."""
    from gradparity.commands import sweep

    spec = SweepSpec(TrainSpec(backends=("torch", "keras-tensorflow", "jax")))
    for cores, expected in ((2, 1), (8, 2), (16, 3), (None, 1)):
        monkeypatch.setattr(sweep.os, "cpu_count", lambda cores=cores: cores)
        assert sweep.concurrent_workers(spec) == expected
    assert sweep.concurrent_workers(SweepSpec(TrainSpec(backends=("torch",)), parallel=4)) == 1


def test_the_epoch_plot_has_whole_epochs_and_keeps_coinciding_rules_visible():
    """report.html's accuracy-per-epoch panels: a 2-epoch sweep has ticks at whole epochs only (not 1.25), and two
    rules that train alike (sum at lr/B0 is mean_linear) are drawn in different line styles, so one does not
    hide the other. The figure is read back from matplotlib, not from an image."""
    from types import SimpleNamespace

    from gradparity.commands.sweep import Cell
    from gradparity.commands.sweep_report import epochs_figure

    cells = [Cell("torch", b, rule, "sum" if rule == "sum" else "mean", 0.01, "ok", accuracy=[0.5, 0.8])
             for b in (32, 64) for rule in ("mean_linear", "sum")]
    report = SimpleNamespace(spec=SimpleNamespace(batch_sizes=(32, 64), base=SimpleNamespace(backends=("torch",))),
                             main_cells=cells)
    fig = epochs_figure(report)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        styles = {(line.get_label(), line.get_linestyle(), line.get_marker()) for line in ax.get_lines()}
        assert len({(style, marker) for _, style, marker in styles}) == 2, styles


# --- what the report says, on sweeps written here as plain numbers ------------------------------------------------

#: Held-out examples of the sweeps below (the digits' 20% split); accuracies are counts of them.
HELD = 360


def _sweep(sizes, accuracy, seeds=(0,), lr_grid=(), lr0=0.05):
    """A sweep report of plain numbers: every rule at every batch size (and every grid multiplier) in torch, with
    ``accuracy(rule, B, seed, multiplier)`` as its final held-out accuracy; the rules' own lr and reduction."""
    from gradparity.commands.sweep import Cell, SweepReport

    spec = SweepSpec(TrainSpec(optimizer="sgd", backends=("torch",)), batch_sizes=tuple(sizes), epochs=2,
                     lr_grid=tuple(lr_grid), seeds=tuple(seeds) if len(seeds) > 1 else ())
    cells = []
    for seed in seeds:
        for b in sizes:
            for name, rule in spec.rules().items():
                reduction, lr = rule(lr0, b)
                for m in (1.0, *[m for m in lr_grid if m != 1]):
                    a = accuracy(name, b, seed, m)
                    cells.append(Cell("torch", b, name, reduction, lr * m, "ok", accuracy=[a - 0.1, a],
                                      epoch_loss=[1.0, 0.5], seed=seed, multiplier=m,
                                      role="main" if m == 1 else "grid"))
    return SweepReport(spec, lr0, cells, {}, "plain numbers", held_out=HELD)


def _recipe_text(report) -> str:
    from gradparity.commands.sweep_report import recipe_lines

    return "\n".join(recipe_lines(report))


def test_the_sweep_plots_keep_their_legends_off_the_data():
    """recipe.png, epochs.png and grid.png: every legend lies outside every axes' data area (they covered the
    curves). Read back from matplotlib's layout, not from an image."""
    from gradparity.commands.sweep_report import epochs_figure, grid_figure, recipe_figure
    from test_html_report import legend_overlaps

    report = _sweep((16, 32, 64, 128), lambda rule, b, seed, m: 0.9 - 0.001 * b * m ** 2, seeds=(0, 1),
                    lr_grid=(0.5, 1, 2))
    for figure in (recipe_figure, epochs_figure, grid_figure):
        assert legend_overlaps(figure(report)) == [], figure.__name__


def test_the_recipe_is_a_table_in_report_html_and_report_md():
    """The learning-rate recipe: an HTML table in report.html and a markdown table in report.md (it was a
    monospace text block), a row per batch size, a column per rule, each cell the mean accuracy (computed here
    from the numbers written) at the rule's lr, and the best rule."""
    import re

    from gradparity.commands.sweep_report import render_markdown, render_sweep_html

    acc = {16: 0.91, 32: 0.93, 64: 0.92}
    report = _sweep((16, 32, 64), lambda rule, b, seed, m: acc[b] - (0.02 if rule == "sum" else 0.0) + seed * 0.01,
                    seeds=(0, 1))
    rules = list(report.spec.rules())
    page, _ = render_sweep_html(report, "run1")
    recipe = page.split("<h2>Learning-rate recipe</h2>")[1].split("<figure")[0]
    assert "<pre>" not in recipe
    table = re.search(r"<table>(.*?)</table>", recipe, re.S).group(1)
    assert re.findall(r"<th>([^<]*)</th>", table) == ["B", *rules, "best"]
    body = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])]
    assert [row[0] for row in body] == ["16", "32", "64"]
    for row, b in zip(body, (16, 32, 64)):
        for cell, rule in zip(row[1:-1], rules):
            values = [acc[b] - (0.02 if rule == "sum" else 0.0) + s * 0.01 for s in (0, 1)]
            lr = report.spec.rules()[rule](report.lr0, b)[1]
            assert cell == f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} (lr {lr:.3g})", (b, rule, cell)
        assert row[-1] == "mean"   # ties with mean_linear at B0 go to the first rule; sum is 0.02 below
    md = render_markdown(report).splitlines()
    head = md.index("| B | " + " | ".join(rules) + " | best |")
    assert md[head + 1].startswith("|---:|") and [line.split(" | ")[0] for line in md[head + 2:head + 5]] == [
        "| 16", "| 32", "| 64"]


def test_a_one_seed_sweep_calls_a_small_gap_provisional():
    """One seed, linear scaling 4 held-out examples below B0's accuracy at B = 64 (more than HOLDS = 0.01): the
    recipe must not state flatly that it stops holding there; it says the seed-to-seed spread is unmeasured and the
    claim provisional, and gives the gap in examples."""
    ref = 0.95
    report = _sweep((32, 64, 128), lambda rule, b, seed, m: ref - (4 / HELD if (rule, b) == ("mean_linear", 64) else 0))
    text = _recipe_text(report)
    assert ref - report.accuracy("mean_linear", 64) > 0.01
    assert "provisional" in text and "one seed" in text and "seed-to-seed spread is unmeasured" in text
    assert f"4 of {HELD} held-out examples" in text
    assert "it stops holding at B = 64" not in text


@pytest.mark.parametrize("noise, gap, resolved", [(0.02, 0.015, False), (0.002, 0.05, True)])
def test_several_seeds_weigh_the_gap_against_their_spread(noise, gap, resolved):
    """Three seeds: a gap below B0's accuracy larger than HOLDS is said to stop linear scaling only when it exceeds
    twice its standard error over the seeds, sqrt(sd_B0^2 + sd_B^2) / sqrt(n) (sd with ddof 1, computed here
    from the numbers written); otherwise it is reported as not resolved."""
    shifts = {0: -noise, 1: 0.0, 2: noise}   # per seed, at B = 64 only; B0's accuracy is the same for every seed
    report = _sweep((32, 64), lambda rule, b, seed, m: 0.95 - ((gap + shifts[seed]) if (rule, b) == (
        "mean_linear", 64) else 0.0), seeds=(0, 1, 2))
    text = _recipe_text(report)
    se = np.hypot(0.0, np.std([gap + v for v in shifts.values()], ddof=1)) / np.sqrt(3)
    assert bool(gap > 2 * se) == resolved
    assert f"{se:.4f}" in text
    assert ("it stops holding at B = 64" in text) is resolved
    assert ("not resolved" in text and "does not show that it stops holding" in text) is not resolved


def test_a_sweep_without_b0_says_why_it_has_no_reference():
    """Batch sizes 16 and 64, not B0 = 32: the recipe says there is no linear-scaling verdict, why (no reference
    accuracy at B0), which B0 it needed and which batch sizes ran."""
    report = _sweep((16, 64), lambda rule, b, seed, m: 0.9)
    text = _recipe_text(report)
    assert f"B0 = {B0}" in text and "no linear-scaling verdict" in text
    assert "(16, 64)" in text and f"add {B0} to --batch-sizes" in text
