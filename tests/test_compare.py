"""Normalization factors, pair metrics, tolerances and verdicts on synthetic results (numpy only)."""
import math

import numpy as np
import pytest

from gradparity.backends.numpy.session import NumpySession
from gradparity.backends.protocol import WorkerJob
from gradparity.compare.normalize import Result, normalize
from gradparity.compare.tolerance import UNIT_ROUNDOFF
from gradparity.compare.pairs import compare_all, compare_pair
from gradparity.compare.tolerance import SAFETY, tolerance_for
from gradparity.compare.verdict import EXIT_AGREE, EXIT_DISAGREE, EXIT_INCOMPLETE, decide
from gradparity.experiment.inputs import init_params
from gradparity.experiment.methods import METHODS
from gradparity.experiment.models import MLP
from gradparity.reference.mlp import term_scale
from gradparity.run.execute import BackendOutcome, MethodOutcome

MODEL = MLP((8, 6, 4), "tanh")
N = 16
TOL = tolerance_for(MODEL, N)


def grads_like(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in MODEL.param_shapes().items()}


def result(backend, method, grads, loss=1.5, dtype="float32", status="ok"):
    u = UNIT_ROUNDOFF[dtype] if status == "ok" else None
    return Result(backend, method, status, None if status == "ok" else "boom", loss if status == "ok" else None,
                  loss, 1.0, "1", 1.0 if status == "ok" else None, 0.001, dtype, "cpu", u,
                  grads if status == "ok" else None)


def perturbed(grads, rel, seed=1):
    """Each tensor plus noise of size ``rel`` x its largest entry."""
    rng = np.random.default_rng(seed)
    return {k: g + rel * np.max(np.abs(g)) * rng.uniform(-1, 1, g.shape) for k, g in grads.items()}


def test_normalization_factors():
    assert {m: METHODS[m].normalization_factor(N) for m in METHODS} == {
        "none_loop": 1 / N, "none_vectorized": 1 / N, "sum": 1 / N, "mean": 1.0, "one_by_one": 1 / N}


def test_normalize_rescales_native_results_and_keeps_failures():
    g = grads_like()
    outcome = BackendOutcome("b", "ok", None, {"dtype": "float32", "device": "cpu", "tf32": False}, {
        "sum": MethodOutcome("ok", loss=N * 2.0, seconds=0.1, grads={k: N * v for k, v in g.items()}),
        "mean": MethodOutcome("ok", loss=2.0, seconds=0.1, grads=g),
        "none_loop": MethodOutcome("error", error="boom"),
    }, 1.0)
    rows = {r.method: r for r in normalize([outcome], ("sum", "mean", "none_loop"), N)}
    assert rows["sum"].normalization_factor == 1 / N and rows["sum"].factor_label == f"1/{N}"
    assert rows["sum"].loss == pytest.approx(2.0, rel=1e-15)
    for k in g:
        np.testing.assert_allclose(rows["sum"].grads[k], g[k], rtol=1e-15)
    assert rows["mean"].normalization_factor == 1.0
    assert rows["none_loop"].status == "error" and rows["none_loop"].grads is None
    assert rows["mean"].unit_roundoff == 2.0 ** -24


def test_tf32_changes_the_unit_roundoff():
    outcome = BackendOutcome("b", "ok", None, {"dtype": "float32", "tf32": True},
                             {"mean": MethodOutcome("ok", loss=1.0, grads=grads_like())}, 1.0)
    assert normalize([outcome], ("mean",), N)[0].unit_roundoff == 2.0 ** -11


def test_tolerance_formula_and_dtype_ordering():
    k = max(N, *MODEL.sizes)
    assert TOL.rtol(UNIT_ROUNDOFF["float32"]) == pytest.approx(SAFETY * 2.0 ** -24 * math.sqrt(k) * 2)
    # float64 must be far tighter than float32: the ratio is the ratio of unit roundoffs, 2^29.
    assert TOL.rtol(UNIT_ROUNDOFF["float32"]) / TOL.rtol(UNIT_ROUNDOFF["float64"]) == pytest.approx(2.0 ** 29)


def test_rounding_level_difference_agrees_and_real_difference_does_not():
    g = grads_like()
    rtol32 = TOL.rtol(UNIT_ROUNDOFF["float32"])
    close = compare_pair(result("a", "mean", g), result("b", "mean", perturbed(g, rtol32 / 10)), TOL)
    far = compare_pair(result("a", "mean", g), result("b", "mean", perturbed(g, rtol32 * 10)), TOL)
    assert close.agree and close.max_rel <= rtol32
    assert not far.agree and far.max_rel > rtol32
    # The same tiny difference that float32 forgives is a disagreement in float64.
    strict = compare_pair(result("a", "mean", g, dtype="float64"),
                          result("b", "mean", perturbed(g, rtol32 / 10), dtype="float64"), TOL)
    assert not strict.agree


def test_max_rel_is_relative_to_the_tensors_largest_entry():
    g = {k: np.zeros(s) for k, s in MODEL.param_shapes().items()}
    g["layers.0.kernel"][0, 0] = 2.0
    h = {k: v.copy() for k, v in g.items()}
    h["layers.0.kernel"][1, 1] = 1e-3  # a near-zero entry: absolute error counts against 2.0
    c = compare_pair(result("a", "mean", g), result("b", "mean", h), TOL)
    assert c.max_abs == pytest.approx(1e-3) and c.max_rel == pytest.approx(5e-4)
    assert c.worst_param == "layers.0.kernel"


def test_loss_difference_alone_is_a_disagreement():
    g = grads_like()
    c = compare_pair(result("a", "mean", g, loss=1.0), result("b", "mean", g, loss=1.01), TOL)
    assert c.max_rel == 0.0 and not c.agree and c.loss_rel == pytest.approx(0.01 / 1.01)


def test_nan_gradient_never_agrees():
    g = grads_like()
    h = {k: v.copy() for k, v in g.items()}
    h["layers.1.bias"][0] = np.nan
    c = compare_pair(result("a", "mean", g), result("b", "mean", h), TOL)
    assert not c.agree
    v = decide([result("a", "mean", g), result("b", "mean", h)], [c], TOL, N)
    assert v.exit_code == EXIT_DISAGREE


def test_verdict_agree_explains_linearity():
    g = grads_like()
    rs = [result("a", m, perturbed(g, 1e-8, seed=i)) for i, m in enumerate(("sum", "mean", "none_loop"))]
    v = decide(rs, compare_all(rs, TOL), TOL, N)
    assert v.status == "agree" and v.exit_code == EXIT_AGREE
    assert any("linear" in line for line in v.explanation)


def test_verdict_names_a_missing_one_over_n():
    g = grads_like()
    rs = [result(b, m, g) for b in ("x", "y") for m in ("sum", "mean")]
    rs.append(result("z", "mean", {k: N * v for k, v in g.items()}))
    v = decide(rs, compare_all(rs, TOL), TOL, N)
    assert v.status == "disagree" and v.exit_code == EXIT_DISAGREE
    text = " ".join(v.explanation)
    assert "z/mean" in text and f"N = {N}" in text and "normalization" in text


def test_verdict_blames_a_whole_backend_when_its_methods_agree_among_themselves():
    g, other = grads_like(0), grads_like(7)
    rs = [result(b, m, g) for b in ("x", "y") for m in ("sum", "mean", "one_by_one")]
    rs += [result("w", m, other) for m in ("sum", "mean", "one_by_one")]
    v = decide(rs, compare_all(rs, TOL), TOL, N)
    text = " ".join(v.explanation)
    assert v.status == "disagree" and "every method of w" in text


def test_verdict_blames_one_method_everywhere():
    g, other = grads_like(0), grads_like(3)
    rs = [result(b, m, g) for b in ("x", "y", "z") for m in ("sum", "mean")]
    rs += [result(b, "one_by_one", other) for b in ("x", "y", "z")]
    v = decide(rs, compare_all(rs, TOL), TOL, N)
    assert "method one_by_one disagrees with the consensus in every backend" in " ".join(v.explanation)


def test_failed_rows_make_the_verdict_incomplete_not_agree():
    g = grads_like()
    rs = [result("a", "mean", g), result("b", "mean", g), result("c", "mean", g, status="crashed")]
    v = decide(rs, compare_all(rs, TOL), TOL, N)
    assert v.status == "incomplete" and v.exit_code == EXIT_INCOMPLETE
    assert compare_all(rs, TOL) and all(c.a != "c/mean" and c.b != "c/mean" for c in compare_all(rs, TOL))


def test_tf32_rows_are_flagged_in_the_explanation():
    g = grads_like()
    a = result("a", "mean", g)
    b = Result("b", "mean", "ok", None, 1.5, 1.5, 1.0, "1", 1.0, 0.001, "float32", "cuda:0", 2.0 ** -11, g)
    v = decide([a, b], compare_all([a, b], TOL), TOL, N)
    assert v.status == "agree" and any("TF32 was possible in b" in line for line in v.explanation)


def test_cancelling_terms_widen_the_scale_of_that_tensor_only():
    # A gradient of size 1e-3 summed from terms of size 1: rounding of the terms (1e-7 absolute)
    # is 1e-4 of the result - a false alarm if measured against the result alone.
    g = grads_like()
    g["layers.1.bias"] = g["layers.1.bias"] * 1e-3 / np.max(np.abs(g["layers.1.bias"]))
    h = {k: v.copy() for k, v in g.items()}
    h["layers.1.bias"][0] += 1e-7
    plain = compare_pair(result("a", "mean", g), result("b", "mean", h), TOL)
    scaled_tol = tolerance_for(MODEL, N, {"layers.1.bias": 1.0})
    scaled = compare_pair(result("a", "mean", g), result("b", "mean", h), scaled_tol)
    assert not plain.agree and plain.max_rel == pytest.approx(1e-4, rel=1e-6)
    assert scaled.agree and scaled.max_rel == pytest.approx(1e-7, rel=1e-6)


def test_term_scale_bounds_the_gradient_and_equals_it_for_one_example():
    rng = np.random.default_rng(5)
    model = MLP((6, 5, 3), "tanh")
    params = init_params(model, 0, "float64")
    for n in (1, 9):
        x, y = rng.standard_normal((n, 6)), rng.integers(0, 3, n)
        t = term_scale(params, x, y, model.to_dict())
        job = WorkerJob("numpy", "numpy", None, "", None, (), ("mean",), "float64", "cpu", "highest",
                        model.to_dict(), {"name": "cross_entropy"}, params, {"x": x, "y": y})
        mean = NumpySession(job).compute("mean").grads
        for k, g in mean.items():
            if n == 1:
                assert t[k] == pytest.approx(np.max(np.abs(g)), rel=1e-12)
            else:  # |mean_i g_i| <= mean_i |g_i| entry by entry
                assert np.max(np.abs(g)) <= t[k] * (1 + 1e-12)


def test_a_backend_that_narrowed_float64_is_named():
    g = grads_like()
    a = result("a", "mean", g, dtype="float64")
    b = result("b", "mean", g, dtype="float32")
    v = decide([a, b], compare_all([a, b], TOL), TOL, N, requested_dtype="float64")
    assert any(line.startswith("b computed part of this float64 run in float32") for line in v.explanation)
    assert compare_all([a, b], TOL)[0].tolerance == TOL.rtol(UNIT_ROUNDOFF["float32"])


def test_overflowing_results_are_named_non_finite_never_a_factor():
    """Float32 overflow: inf loss and inf/NaN gradients beside finite float64 ones (issue: 'a constant factor 1')."""
    g = grads_like()
    bad = {k: v.copy() for k, v in g.items()}
    bad["layers.0.kernel"][0, :] = np.inf
    env = {"dtype": "float32", "device": "cpu", "tf32": False}
    outcomes = [
        BackendOutcome("ref", "ok", None, dict(env, dtype="float64"),
                       {m: MethodOutcome("ok", 2.0, 0.1, None, g) for m in ("mean", "sum")}, 1.0),
        BackendOutcome("f32", "ok", None, env,
                       {m: MethodOutcome("ok", math.inf, 0.1, None, bad) for m in ("mean", "sum")}, 1.0),
    ]
    rs = normalize(outcomes, ("mean", "sum"), N)
    rows = {r.label: r for r in rs}
    assert rows["f32/mean"].status == "nonfinite" and rows["f32/mean"].grads is None
    assert "loss is inf" in rows["f32/mean"].error and "6 of" in rows["f32/mean"].error
    comparisons = compare_all(rs, TOL)
    assert {(c.a, c.b) for c in comparisons} == {("ref/mean", "ref/sum")}  # non-finite rows not compared
    v = decide(rs, comparisons, TOL, N)
    text = v.summary + " ".join(v.explanation)
    assert v.status == "disagree" and v.exit_code == EXIT_DISAGREE
    assert "NaN/inf" in v.summary and "f32/mean" in text
    assert "factor" not in v.summary and "constant factor" not in text and "normalization" not in text


def test_all_non_finite_is_incomplete():
    g = {k: np.full(v.shape, np.nan) for k, v in grads_like().items()}
    env = {"dtype": "float32", "device": "cpu", "tf32": False}
    outcomes = [BackendOutcome(b, "ok", None, env, {"mean": MethodOutcome("ok", math.nan, 0.1, None, g)}, 1.0)
                for b in ("x", "y")]
    rs = normalize(outcomes, ("mean",), N)
    v = decide(rs, compare_all(rs, TOL), TOL, N)
    assert v.status == "incomplete" and v.exit_code == EXIT_INCOMPLETE and "finite" in v.summary


def test_headline_names_the_largest_difference_and_the_pair_closest_to_its_bound():
    """Float64 pairs have a far tighter bound: the pair nearest its bound is not the largest difference."""
    g = grads_like()
    a64, b64 = result("n", "mean", g, dtype="float64"), result("n", "sum", perturbed(g, 1e-14), dtype="float64")
    c32 = result("t", "mean", perturbed(g, 1e-7, seed=5))
    rs = [a64, b64, c32]
    cs = compare_all(rs, TOL)
    v = decide(rs, cs, TOL, N)
    assert v.status == "agree"
    largest = max(cs, key=lambda c: c.max_rel)
    closest = max(cs, key=lambda c: c.max_rel / c.tolerance)
    assert largest is not closest  # the case the headline must not conflate
    assert f"largest difference max_rel {largest.max_rel:.3g} ({largest.a} vs {largest.b}" in v.summary
    assert f"closest to its bound: {closest.a} vs {closest.b}, max_rel {closest.max_rel:.3g}" in v.summary


def test_untested_causes_read_as_hypotheses():
    g = grads_like()
    rs = [result("only", m, perturbed(g, 1e-9, seed=i)) for i, m in enumerate(("sum", "mean"))]
    v = decide(rs, compare_all(rs, TOL), TOL, N)
    text = " ".join(v.explanation)
    assert "Not tested by this run" in text and "hypotheses" in text
    assert "look for" not in text  # no untested cause stated as the answer


def test_interrupted_verdict_covers_only_what_finished():
    import signal as _signal

    from gradparity.errors import Interrupted

    g = grads_like()
    rs = [result("a", "mean", g), result("a", "sum", g), result("b", "mean", g, status="interrupted")]
    v = decide(rs, compare_all(rs, TOL), TOL, N, interrupted=Interrupted(_signal.SIGTERM))
    assert v.status == "interrupted" and v.exit_code == 143
    assert v.summary.startswith("INTERRUPTED by SIGTERM: 2 of 3 results")
