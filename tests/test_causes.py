"""Discrepancy switches ([causes]): each produces its signature in every backend, and diagnose names it.

Each switch runs once on a small float64 problem in every installed backend.
The expected results are computed here from per-example gradients of the
float64 reference's forward/backward (tested against finite differences in
test_reference.py), by the formula the switch stands for; then `gradparity
diagnose` reads the report folder, with what a user would know, and must rank
the switch's cause first.
"""
import numpy as np
import pytest

from gradparity.cli import main
from gradparity.commands import diagnose as dg
from gradparity.experiment.causes import CAUSE_IDS
from gradparity.experiment.spec import load_experiment
from gradparity.commands.run import run_experiment
from gradparity.reference.mlp import backward, cross_entropy, forward

from conftest import installed

FRAMEWORKS = ("torch", "keras-tensorflow", "jax")
BACKENDS = ["numpy", *(b for b in FRAMEWORKS if installed(b))]
#: The tests that run every installed backend (numpy alone where no framework is).
every_installed = pytest.mark.frameworks(*FRAMEWORKS, required=False)
N = 8
RTOL = 1e-10  # float64 throughout; the switches are exact rescalings and re-orderings

SWITCHES = {
    "unzeroed_gradients": (True, {}),
    "missing_normalization": (True, {}),
    "double_normalization": (True, {}),
    "short_last_batch": (3, {"dataset_size": N + 3}),
    "replicas": (3, {"replicas": 3}),
    "micro_batches": (2, {"micro_batches": 2}),
    "accumulate": ("mean", {"micro_batches": 3}),  # with micro_batches = 3: 8 examples as 3, 3, 2
    "class_weights": ([1.0, 2.0, 0.5, 3.0, 1.5], {"loss_reduction": "class-weighted mean"}),
    "autocast": ("bfloat16", {}),
    "dropout": (0.5, {}),
    "batchnorm": (True, {}),
    # The last 3 of 8 examples padding, 2 micro-batches averaged: 4 and 1 valid examples.
    "padding": (3, {"micro_batches": 2, "padding": 3}),
}
#: Further keys a switch's run needs.
SWITCH_EXTRA = {"accumulate": {"causes.micro_batches": 3},
                "padding": {"causes.micro_batches": 2, "causes.accumulate": "mean"}}
#: What a framework refuses natively under a switch: (backend, switch) -> {method: text of its error}.
REFUSED = {
    ("torch", "batchnorm"): {"one_by_one": "Expected more than 1 value per channel when training",
                             "none_vectorized": "BatchNorm1d in training mode"},
}
#: Switches checked by their formula; autocast is checked by its rounding (no numpy bfloat16 to compute it).
FORMULA_SWITCHES = [s for s in SWITCHES if s != "autocast"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run per switch, every installed backend, reports written (shared by the tests below)."""
    out = {}
    for name, (value, _) in SWITCHES.items():
        dtype = "float32" if name == "autocast" else "float64"  # autocast runs a float32 model narrower
        extra = SWITCH_EXTRA.get(name, {})
        exp = load_experiment(None, {"backends": BACKENDS, "dtype": dtype, "data.source": "synthetic",
                                     "data.batch_size": N, "data.num_examples": 16, f"causes.{name}": value,
                                     **extra})
        folder = tmp_path_factory.mktemp(name)
        out[name] = (run_experiment(exp, folder), folder)
    return out


def per_example(report, part: str | None = None) -> dict[str, np.ndarray]:
    """Per-example gradients (N, ...) of the batch (or of a part) from the reference's own functions."""
    inputs = report.inputs
    key = "" if part is None else f"parts/{part}/"
    x, y = inputs.batch[f"{key}x"].astype(np.float64), inputs.batch[f"{key}y"]
    params = {k: v.astype(np.float64) for k, v in inputs.params.items()}
    f = forward(params, x, inputs.model.to_dict())
    _, dlogits = cross_entropy(f.logits, y)
    return backward(params, f, dlogits, inputs.model.to_dict(), per_example=True)


def results(report) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    return {(r.backend, r.method): r.grads for r in report.results if r.ok}


def close(a: dict, b: dict) -> bool:
    # Relative to the largest entry of any tensor: a Dense bias before a batch normalization has a zero
    # gradient, which rounding leaves at ~1e-17.
    scale = max(float(np.max(np.abs(v))) for v in b.values())
    return all(np.max(np.abs(a[k] - b[k])) <= RTOL * scale for k in b)


def training_mode(report) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the batch's forward pass, each example's own) mean-loss gradients under dropout / batch norm."""
    inputs = report.inputs
    model, x, y = inputs.model.to_dict(), inputs.batch["x"].astype(np.float64), inputs.batch["y"]
    params = {k: v.astype(np.float64) for k, v in inputs.params.items()}

    def grad(xs, ys, masks):
        f = forward(params, xs, model, masks)
        return backward(params, f, cross_entropy(f.logits, ys)[1] / len(ys), model)

    def masks(kind, rows=slice(None)):
        found = [inputs.batch[k] for k in sorted(inputs.batch) if k.startswith(f"dropout/{kind}/")]
        return [m[rows] for m in found] or None

    singles = [grad(x[i:i + 1], y[i:i + 1], masks("single", slice(i, i + 1))) for i in range(N)]
    return grad(x, y, masks("batch")), {k: sum(s[k] for s in singles) / N for k in params}


def expected(name: str, report, backend: str) -> dict[str, dict[str, np.ndarray]]:
    """Each method's result under the switch in ``backend``, by its formula (see gradparity.experiment.causes)."""
    if name in ("dropout", "batchnorm"):
        shared, single = training_mode(report)
        out = {m: shared for m in ("none_loop", "sum", "mean")}
        out.update(none_vectorized=single, one_by_one=single)
        return {m: v for m, v in out.items() if m not in REFUSED.get((backend, name), {})}
    g = per_example(report)
    if name == "class_weights":
        w = np.asarray(SWITCHES[name][0])[report.inputs.batch["y"]]
        weighted = {k: np.tensordot(w, v, axes=1) for k, v in g.items()}  # sum_i w[y_i] g_i
        out = {m: {k: v / N for k, v in weighted.items()} for m in ("none_loop", "none_vectorized", "sum")}
        if backend == "torch":
            # CrossEntropyLoss(weight=w): 'mean' divides by sum_i w[y_i]; on one example the weight cancels.
            out["mean"] = {k: v / w.sum() for k, v in weighted.items()}
            out["one_by_one"] = {k: v.mean(axis=0) for k, v in g.items()}
        else:  # Keras sum_over_batch_size with sample_weight = w[y], jnp.mean(w[y] * l), the reference: / N
            out["mean"] = out["one_by_one"] = out["sum"]
        return out
    mean = {k: v.mean(axis=0) for k, v in g.items()}
    out = {m: mean for m in ("none_loop", "none_vectorized", "sum", "mean", "one_by_one")}
    if name == "unzeroed_gradients":
        # Read after every example, never zeroed: sum_i sum_{j<=i} g_j = sum_j (N - j) g_j.
        weights = np.arange(N, 0, -1, dtype=np.float64)
        bug = {k: np.tensordot(weights, v, axes=1) / N for k, v in g.items()}
        out.update(none_loop=bug, one_by_one=bug)
    elif name == "missing_normalization":
        out["sum"] = {k: N * v for k, v in mean.items()}
    elif name == "double_normalization":
        out["mean"] = {k: v / N for k, v in mean.items()}
    elif name == "short_last_batch":
        last = per_example(report, "last")
        r = len(report.inputs.batch["parts/last/y"])
        over_examples = {k: (g[k].sum(axis=0) + last[k].sum(axis=0)) / (N + r) for k in g}
        mean_of_means = {k: (g[k].mean(axis=0) + last[k].mean(axis=0)) / 2 for k in g}
        out = {m: over_examples for m in ("none_loop", "none_vectorized", "one_by_one")}
        out.update(sum=mean_of_means, mean=mean_of_means)
    elif name == "replicas":
        sizes = [len(p) for p in np.array_split(np.arange(N), 3)]  # 3, 3, 2: uneven
        local_means = [{k: v[a:b].mean(axis=0) for k, v in g.items()}
                       for a, b in zip(np.cumsum([0] + sizes[:-1]), np.cumsum(sizes))]
        smaller = {k: v / 3 for k, v in mean.items()}  # a summed loss, all-reduce averaged, then / N
        out = {m: smaller for m in ("none_loop", "none_vectorized", "sum", "one_by_one")}
        out["mean"] = {k: sum(lm[k] for lm in local_means) / 3 for k in g}
    elif name == "micro_batches":
        out["mean"] = {k: sum(v[a:a + N // 2].mean(axis=0) for a in (0, N // 2)) for k, v in g.items()}
    elif name == "padding":  # valid: 0..4; micro-batches 0..3 (4 valid) and 4..7 (1 valid)
        g = {k: np.where((np.arange(N) < 5).reshape(-1, *[1] * (v.ndim - 1)), v, 0.0) for k, v in g.items()}
        over_valid = {k: v.sum(axis=0) / 5 for k, v in g.items()}
        out = {m: over_valid for m in ("none_loop", "none_vectorized", "sum", "one_by_one")}
        out["mean"] = {k: (v[0:4].mean(axis=0) + v[4]) / 2 for k, v in g.items()}
    elif name == "accumulate":  # the mean of the means of 3, 3 and 2 examples
        out["mean"] = {k: (v[0:3].mean(axis=0) + v[3:6].mean(axis=0) + v[6:8].mean(axis=0)) / 3
                       for k, v in g.items()}
    return out


@every_installed
@pytest.mark.parametrize("name", FORMULA_SWITCHES)
def test_every_backend_computes_what_the_switch_stands_for(runs, name):
    report, _ = runs[name]
    got = results(report)
    for backend in BACKENDS:
        for method, grads in expected(name, report, backend).items():
            assert (backend, method) in got, f"{backend}/{method} failed: {report.verdict.summary}"
            assert close(got[(backend, method)], grads), f"{name}: {backend}/{method} is not the switch's formula"
        for method, text in REFUSED.get((backend, name), {}).items():
            (row,) = [r for r in report.results if (r.backend, r.method) == (backend, method)]
            assert not row.ok and text in row.error, f"{backend}/{method} under {name}: {row.error}"
    assert report.verdict.status == "disagree"  # every formula switch changes some method


@every_installed
def test_autocast_runs_every_framework_in_bfloat16_and_holds_it_to_that_rounding(runs):
    """Each framework reports bfloat16 arithmetic; its results differ from the float64 reference by more than
    float32 rounding allows and by less than bfloat16's; the numpy reference stays float64."""
    report, _ = runs["autocast"]
    dtypes = {o.backend: o.environment["dtype"] for o in report.outcomes}
    assert dtypes == {b: ("float64" if b == "numpy" else "bfloat16") for b in BACKENDS}
    got = results(report)
    reference = got[("numpy", "mean")]
    float32_rtol = report.tolerance.rtol(2.0 ** -24)
    for backend in BACKENDS[1:]:
        for method in ("none_loop", "none_vectorized", "sum", "mean", "one_by_one"):
            g = got[(backend, method)]
            rel = max(float(np.max(np.abs(g[k] - reference[k])) / np.max(np.abs(reference[k]))) for k in g)
            assert float32_rtol < rel < 16 * 2.0 ** -8, f"{backend}/{method}: {rel}"
    assert report.verdict.status == "agree"  # within bfloat16's tolerance, which the verdict says it used
    assert any("computed in bfloat16" in line for line in report.verdict.explanation)


@every_installed
@pytest.mark.parametrize("name", list(SWITCHES))
def test_diagnose_names_the_switch_from_the_report(runs, name, capsys):
    _, folder = runs[name]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SWITCHES[name][1].items()]
    main(["diagnose", str(folder), "--json", *flags])
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["causes"][0]["id"] == CAUSE_IDS[name], doc["causes"][:3]


@every_installed
def test_num_items_in_batch_fixes_padded_accumulation(tmp_path):
    """The same padded micro-batches as the 'padding' run, combined the num_items_in_batch way (each
    micro-batch's summed loss over the batch's valid count): every method in every backend agrees."""
    exp = load_experiment(None, {"backends": BACKENDS, "dtype": "float64", "data.source": "synthetic",
                                 "data.batch_size": N, "causes.padding": 3, "causes.micro_batches": 2,
                                 "causes.accumulate": "num_items"})
    report = run_experiment(exp, tmp_path)
    assert report.verdict.status == "agree", report.verdict.summary
    assert len([r for r in report.results if r.ok]) == 5 * len(BACKENDS)


@every_installed
def test_the_report_says_what_the_switch_did(runs):
    report, folder = runs["missing_normalization"]
    text = (folder / "report.md").read_text()
    assert "causes.missing_normalization ON" in text and "effect: largest difference" in text
    sums = [r for r in report.results if r.method == "sum"]
    assert all(r.factor_label.startswith("1 (switch missing_normalization") for r in sums)


@pytest.mark.parametrize("overrides,message", [
    ({"causes.replicas": 2, "causes.micro_batches": 2}, "one at a time"),
    ({"causes.replicas": 99}, "more than the batch"),
    ({"causes.unzeroed_gradients": 1}, "true or false"),
    ({"causes.short_last_batch": -1}, ">= 0"),
    ({"causes.missing_normalization": True, "methods": ["mean", "none_loop"]}, "changes sum"),
    ({"causes.zero_grad": True}, "unknown key"),
    ({"causes.autocast": "bfloat16", "dtype": "float64"}, "set dtype"),
    ({"causes.autocast": "fp8"}, "causes.autocast"),
    ({"causes.accumulate": "mean"}, "set causes.micro_batches"),
    ({"causes.accumulate": "avg", "causes.micro_batches": 2}, "causes.accumulate"),
    ({"causes.class_weights": [1.0, -1.0]}, "non-negative"),
    ({"causes.class_weights": [0.0, 0.0]}, "not all 0"),
    ({"causes.class_weights": "1,2"}, "list of finite"),
    ({"causes.short_last_batch": 2, "causes.double_normalization": True}, "turn missing_normalization"),
    ({"causes.dropout": 1.0}, r"rate in \[0, 1\)"),
    ({"causes.dropout": True}, "rate in"),
    ({"causes.batchnorm": 1}, "true or false"),
    ({"causes.dropout": 0.5, "causes.replicas": 2}, "cannot be combined with replicas"),
    ({"causes.batchnorm": True, "causes.autocast": "bfloat16"}, "cannot be combined with autocast"),
    ({"causes.batchnorm": True, "data.batch_size": 1}, "at least 2 examples"),
    ({"causes.dropout": 0.5, "model.hidden": []}, "model.hidden is empty"),
    ({"causes.dropout": 0.5, "methods": ["sum", "mean"]}, "changes none_vectorized, one_by_one"),
    ({"causes.padding": 64}, "no valid example"),
    ({"causes.padding": 40, "causes.micro_batches": 2}, "micro-batch 1 of 2 with no valid example"),
    ({"causes.padding": 2, "causes.replicas": 2}, "not with replicas"),
    ({"causes.accumulate": "num_items", "causes.micro_batches": 2}, "set causes.padding"),
])
def test_bad_switches_are_config_errors(overrides, message):
    from gradparity.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_experiment(None, overrides)


def test_class_weights_need_one_weight_per_class():
    from gradparity.errors import ConfigError
    from gradparity.experiment.inputs import build_inputs

    exp = load_experiment(None, {"causes.class_weights": [1.0, 2.0]})  # digits: 10 classes
    with pytest.raises(ConfigError, match="2 weights for 10 classes"):
        build_inputs(exp)


def test_a_short_last_batch_needs_the_examples(capsys):
    assert main(["run", "--check", "--batch-size", "1797"]) == 0
    from gradparity.errors import ConfigError
    from gradparity.experiment.inputs import build_inputs

    exp = load_experiment(None, {"data.batch_size": 1797, "causes.short_last_batch": 1})
    with pytest.raises(ConfigError, match="1798 examples"):
        build_inputs(exp)


@every_installed
def test_a_clean_run_is_diagnosed_clean(tmp_path, capsys):
    """No switch: every backend agrees, and diagnose on the report folder says clean (exit 0)."""
    exp = load_experiment(None, {"backends": BACKENDS, "data.source": "synthetic", "data.batch_size": N})
    report = run_experiment(exp, tmp_path)
    assert report.verdict.status == "agree"
    assert main(["diagnose", str(tmp_path), "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["causes"][0]["id"] == "clean" and doc["causes"][0]["score"] == 1.0


@every_installed
def test_diagnose_sees_only_what_the_report_records_not_the_switch(runs):
    """The report's own switch settings are not read as the user's knowledge: the diagnosis must come from
    the numbers (and the batch size and dtype the run records)."""
    _, folder = runs["replicas"]
    obs, info = dg.read_report(str(folder))
    assert info.replicas is None and info.micro_batches is None and info.batch_size == N
