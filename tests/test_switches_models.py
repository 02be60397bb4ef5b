"""The discrepancy switches and none_vectorized on the built-in CNN and sequence model, in every framework.

Since every built-in model runs through one model session per framework, the switches that do not act on the
MLP's hidden layers (dropout, batchnorm) work for the CNN and the sequence model too. Each run is float64 on a
small batch; the expected result of every method is the switch's formula applied to per-example gradients of
the float64 reference's hand-written backward pass (``reference.models.per_example``, itself checked against
finite differences in test_reference_models.py) — not to any backend's output. A sequence example holds T
tokens: sums divide by N·T, one_by_one adds per-example means (see ``causes.rules``).
"""
import numpy as np
import pytest

from gradparity import load_experiment, run_experiment
from gradparity.reference import models as reference

from conftest import installed

FRAMEWORKS = ("torch", "keras-tensorflow", "jax")
BACKENDS = ["numpy", *(b for b in FRAMEWORKS if installed(b))]
RTOL = 1e-10  # float64: the switches are exact rescalings and re-orderings
N = 8
KINDS = {
    "cnn": {"model.kind": "cnn", "model.channels": [3], "model.strides": [1]},
    "sequence": {"model.kind": "sequence", "model.width": 8, "model.heads": 2, "model.mlp_width": 8,
                 "model.seq_len": 4, "model.vocab": 6},
}
RUNS = {
    # (kind, switch): its overrides. The CNN's example is one term, as the MLP's (whose every switch
    # tests/test_causes.py checks): one run shows its session reads the accumulator; the sequence model's
    # T terms per example change the formulas (per-token weights, parts divided by N·T).
    ("cnn", "unzeroed_gradients"): {"causes.unzeroed_gradients": True},
    ("sequence", "class_weights"): {"causes.class_weights": [1.0, 2.0, 0.5, 3.0, 1.5, 0.75]},
    ("sequence", "short_last_batch"): {"causes.short_last_batch": 3},
    ("sequence", "padding"): {"causes.padding": 2, "causes.micro_batches": 2, "causes.accumulate": "mean"},
}
METHODS = ("none_loop", "none_vectorized", "sum", "mean", "one_by_one")


@pytest.fixture(scope="module")
def runs():
    out = {}
    for (kind, switch), overrides in RUNS.items():
        exp = load_experiment(None, {"backends": BACKENDS, "dtype": "float64", "device": "cpu", "timeout_s": 300,
                                     "data.batch_size": N, "methods": list(METHODS), **KINDS[kind], **overrides})
        out[(kind, switch)] = run_experiment(exp)
    return out


def _per_example(report, part: str = "", weights=None):
    """(per-example gradients (N, ...), tokens per example) of the batch or of a part, by the reference."""
    inp = report.inputs
    x, y = inp.batch[f"{part}x"], inp.batch[f"{part}y"]
    x = x.astype(np.float64) if x.dtype.kind == "f" else x
    params = {k: v.astype(np.float64) for k, v in inp.params.items()}
    _, g = reference.per_example(params, x, y, inp.model.to_dict(), weights=weights)
    return g, int(np.prod(y.shape[1:]))


def _expected(kind: str, switch: str, report, backend: str) -> dict[str, dict[str, np.ndarray]]:
    """Each method's normalized result under the switch, by the switch's formula."""
    g, t = _per_example(report)
    total = {k: v.sum(axis=0) for k, v in g.items()}
    mean = {k: v / (N * t) for k, v in total.items()}
    out = {m: mean for m in METHODS}
    if switch == "unzeroed_gradients":  # read after every example, never zeroed: sum_j (N - j) g_j
        w = np.arange(N, 0, -1, dtype=np.float64)
        bug = {k: np.tensordot(w, v, axes=1) / (N * t) for k, v in g.items()}
        out.update(none_loop=bug, one_by_one=bug)
    elif switch == "class_weights":
        cw = np.asarray(RUNS[(kind, switch)]["causes.class_weights"])
        w = cw[report.inputs.batch["y"]]
        gw, _ = _per_example(report, weights=w)  # sum over an example's terms of w[y] * their gradient
        weighted = {k: v.sum(axis=0) / (N * t) for k, v in gw.items()}
        out = {m: weighted for m in METHODS}
        if backend == "torch":  # CrossEntropyLoss(weight=w): 'mean' divides by sum w[y]; an example by its own
            per_row = w.reshape(N, -1).sum(axis=1)
            out["mean"] = {k: v.sum(axis=0) / w.sum() for k, v in gw.items()}
            out["one_by_one"] = {k: np.tensordot(t / per_row, v, axes=1) / (N * t) for k, v in gw.items()}
    elif switch == "short_last_batch":
        last, _ = _per_example(report, "parts/last/")
        r = len(report.inputs.batch["parts/last/y"])
        over_examples = {k: (total[k] + last[k].sum(axis=0)) / ((N + r) * t) for k in g}
        mean_of_means = {k: (total[k] / (N * t) + last[k].sum(axis=0) / (r * t)) / 2 for k in g}
        out = {m: over_examples for m in ("none_loop", "none_vectorized", "one_by_one")}
        out.update(sum=mean_of_means, mean=mean_of_means)
    elif switch == "padding":  # 6 valid of 8; micro-batches 0..3 (4 valid) and 4..7 (2 valid), means averaged
        valid = {k: v[:6] for k, v in g.items()}
        over_valid = {k: v.sum(axis=0) / (6 * t) for k, v in valid.items()}
        out = {m: over_valid for m in METHODS}
        out["mean"] = {k: (v[0:4].sum(axis=0) / (4 * t) + v[4:6].sum(axis=0) / (2 * t)) / 2 for k, v in g.items()}
    return out


def _close(a: dict, b: dict) -> float:
    scale = max(float(np.max(np.abs(v))) for v in b.values())
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in b) / scale


@pytest.mark.frameworks(*FRAMEWORKS, required=False)
@pytest.mark.parametrize("kind, switch", list(RUNS))
def test_every_backend_computes_the_switch_on_the_model(runs, kind, switch):
    report = runs[(kind, switch)]
    got = {(r.backend, r.method): r for r in report.results}
    environments = {o.backend: o.environment or {} for o in report.outcomes}
    for backend in BACKENDS:
        # TensorFlow's float64 GELU is off by up to ~5e-9 (the worker measures its own, as for any model): a
        # sequence model's gradients inherit that, so its rows are held to what the run measured.
        gelu = (environments[backend].get("gelu_accuracy") or {}).get("max_abs_error", 0.0)
        tol = max(RTOL, gelu)
        for method, want in _expected(kind, switch, report, backend).items():
            row = got[(backend, method)]
            assert row.ok, f"{kind}/{switch}: {backend}/{method} failed: {row.error}"
            err = _close(row.grads, want)
            assert err <= tol, f"{kind}/{switch}: {backend}/{method} is {err:.2e} off the switch's formula"


@pytest.mark.parametrize("model, loss, switches, batch, message", [
    ({"kind": "cnn"}, "cross_entropy", {}, {"dropout/batch/0": np.ones((2, 3))}, "the built-in cnn model has no such"),
    (None, "cross_entropy", {}, {"dropout/single/0": np.ones((2, 3))}, "a user's model has no such layers"),
    ({"kind": "mlp"}, "mse", {"class_weights": [1.0, 2.0]}, {}, "need the loss 'cross_entropy', not 'mse'"),
    ({"kind": "mlp"}, "hinge", {}, {}, "has no loss 'hinge'"),
])
def test_every_model_session_refuses_a_switch_its_model_cannot_take(model, loss, switches, batch, message):
    """The one check every framework's model session runs before it builds anything (protocol.check_switches)."""
    from gradparity.backends import BACKENDS, make_job
    from gradparity.backends.protocol import builtin_payload, check_switches

    payload = {"factory": "nets:make", "loss": loss} if model is None else builtin_payload(model, mode="inference",
                                                                                          loss=loss)
    job = make_job(BACKENDS["torch"], "gradients" if model else "model_check", ("mean",), dtype="float32",
                   model=model or {}, batch={"x": np.zeros((2, 4)), "y": np.zeros(2, np.int64), **batch},
                   payload=payload, switches=switches)
    with pytest.raises(ValueError, match=message):
        check_switches(job)
