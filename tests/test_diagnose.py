"""``gradparity diagnose``: the true cause ranks first on generated cases; clean is clean; noise is unknown.

Each case builds per-example gradients from a seed, then the methods' results
the way the cause makes them (numpy in, numpy out); the diagnosis sees only
the results (and, where a case says so, what a user would know).
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from gradparity.cli import main
from gradparity.commands import diagnose as dg
from gradparity.errors import ConfigError

N = 64
SEED_TABLE = """\
Maximum discrepancy between reduction = none and sum: 0.0316
Maximum discrepancy between reduction = none and avg: 0.0316
Maximum discrepancy between reduction = none and one-by-one: 0.0
Maximum discrepancy between reduction = sum and avg: 0.0
Maximum discrepancy between reduction = sum and one-by-one: 0.0316
Maximum discrepancy between reduction = avg and one-by-one: 0.0316
"""


def per_example(n=N, p=40, seed=0) -> np.ndarray:
    """(n, p) per-example gradients: a shared direction plus per-example spread, float32."""
    rng = np.random.default_rng(seed)
    return (0.05 * rng.standard_normal(p) + 0.02 * rng.standard_normal((n, p))).astype(np.float32)


def methods(g: np.ndarray) -> dict[str, np.ndarray]:
    """The seed's four methods done right in float32: each adds in its own order, all the batch mean."""
    n = len(g)
    none = np.zeros(g.shape[1], np.float32)
    for row in g:
        none = none + row
    return {"none": none / np.float32(n), "sum": g.sum(axis=0, dtype=np.float32) / np.float32(n),
            "mean": g.mean(axis=0, dtype=np.float32),
            "one_by_one": np.add.reduce(g[::-1], axis=0, dtype=np.float32) / np.float32(n)}


def observe(results: dict[str, np.ndarray], **info) -> dg.Diagnosis:
    grads = {m: {"w": np.asarray(v, np.float64).reshape(8, -1)} for m, v in results.items()}
    obs = dg.from_gradients(grads, "generated")
    obs.info = dg.Info.from_dict(info, "test")
    return dg.diagnose(obs)


def test_a_clean_run_is_clean():
    d = observe(methods(per_example()), batch_size=N, dtype="float32")
    assert d.top.id == "clean" and d.top.score == 1.0
    assert dg.exit_code(d) == dg.EXIT_CLEAN
    # sum / 64 and the mean add in the same order; 64 is a power of two, so they are equal bit for bit.
    assert any("power of two" in note for note in d.notes)


def test_a_missing_one_over_n_is_named_with_its_factor():
    r = methods(per_example())
    r["sum"] = r["sum"] * N
    d = observe(r, batch_size=N)
    assert d.top.id == "missing_normalization", dg.render_text(d)
    assert any("sum = 64" in e for e in d.top.evidence)


def test_a_doubled_one_over_n_is_named():
    r = methods(per_example())
    r["mean"] = r["mean"] / N
    d = observe(r, batch_size=N)
    assert d.top.id == "double_normalization", dg.render_text(d)


def test_a_result_holding_another_results_gradient_is_unzeroed():
    """a - b = c for a third result c: the evidence of a gradient left in the accumulator.
    (With c equal to b it would be a factor 2, which other counts explain as well: see the next test.)"""
    r = methods(per_example())
    # The previous step's gradient (another batch) was still in .grad when mean's backward ran.
    r["previous_step"] = methods(per_example(seed=9))["mean"]
    r["mean"] = r["mean"] + r["previous_step"]
    d = observe(r, batch_size=N)
    assert d.top.id == "unzeroed_gradients" and d.top.score >= 0.9, dg.render_text(d)


def test_a_factor_two_without_counts_is_not_claimed_with_confidence():
    r = methods(per_example())
    r["mean"] = r["mean"] + r["sum"]
    d = observe(r, batch_size=N)
    assert d.top.score <= 0.5, dg.render_text(d)
    assert {c.id for c in d.causes if c.score >= 0.45} >= {"unzeroed_gradients", "data_parallel_average",
                                                             "accumulation_normalization"}


def test_per_example_loops_reading_an_unzeroed_accumulator():
    """The seed's bug: reading .grad after each example without zeroing counts example i N - i times."""
    g = per_example()
    r = methods(g)
    prefix = np.cumsum(g, axis=0, dtype=np.float32).sum(axis=0) / N
    r["none"], r["one_by_one"] = prefix, prefix.copy()
    d = observe(r, batch_size=N)
    assert d.top.id == "unzeroed_gradients" and d.top.score >= 0.8, dg.render_text(d)
    assert sorted(map(sorted, d.clusters)) == [["mean", "sum"], ["none", "one_by_one"]]


def test_a_short_last_batch_averaged_as_a_mean_of_batch_means():
    g = per_example(n=100)
    size = 32
    batches = [g[i:i + size] for i in range(0, 100, size)]  # 32, 32, 32, 4
    over_examples = g.sum(axis=0) / 100
    mean_of_means = np.mean([b.mean(axis=0) for b in batches], axis=0)
    r = {"none": over_examples, "one_by_one": over_examples.copy(), "sum": mean_of_means,
         "mean": mean_of_means.copy()}
    d = observe(r, batch_size=size, dataset_size=100)
    assert d.top.id == "short_last_batch", dg.render_text(d)
    # With full batches the same numbers cannot come from a short one.
    full = observe(r, batch_size=25, dataset_size=100)
    assert next(c for c in full.causes if c.id == "short_last_batch").score == 0.0


@pytest.mark.parametrize("flag,cause", [("dropout", "dropout_train_mode"), ("batchnorm", "batchnorm_train_mode")])
def test_train_mode_layers_separate_the_one_by_one_method(flag, cause):
    g = per_example()
    r = methods(g)
    rng = np.random.default_rng(5)
    r["one_by_one"] = (g * (rng.random(g.shape) > 0.1) / 0.9).mean(axis=0)  # its own forward passes, other masks
    d = observe(r, batch_size=N, **{flag: True})
    assert d.top.id == cause, dg.render_text(d)


def test_reduced_precision_is_rounding_in_a_narrower_format():
    g = per_example()
    rng = np.random.default_rng(1)
    mean = g.mean(axis=0)
    # bfloat16 keeps 8 significant bits: each method's result rounded at that level, its own way.
    r = {m: mean * (1 + rng.uniform(-2 ** -8, 2 ** -8, mean.shape)) for m in ("none", "sum", "mean", "one_by_one")}
    d = observe(r, batch_size=N, dtype="bfloat16")
    assert d.top.id == "reduced_precision", dg.render_text(d)
    # The same numbers said to be float64 still point to a narrower format than float64's bound allows.
    assert observe(r, batch_size=N, dtype="float64").top.id == "reduced_precision"


def test_a_non_integer_factor_is_a_weighted_mean_mismatch():
    g = per_example()
    r = methods(g)
    weights = np.array([1.0, 2.0, 0.5, 1.0, 3.0])[np.arange(N) % 5]
    # ÷ Σw (class-weighted mean) against ÷ N (sum_over_batch_size with the same weights): proportional on a batch.
    r["sum"] = (weights[:, None] * g).sum(axis=0) / weights.sum()
    r["mean"] = (weights[:, None] * g).sum(axis=0) / N
    d = observe({"sum": r["sum"], "mean": r["mean"], "none": r["sum"].copy()}, batch_size=N,
                loss_reduction="class-weighted mean vs sample-weighted sum_over_batch_size")
    assert d.top.id == "weighted_mean_mismatch", dg.render_text(d)


@pytest.mark.parametrize("key,cause", [("replicas", "data_parallel_average"),
                                       ("micro_batches", "accumulation_normalization")])
def test_a_factor_equal_to_a_count_the_user_gave(key, cause):
    r = methods(per_example())
    r["sum"] = r["sum"] / 4  # a summed loss averaged over 4 replicas / 4 micro-batch sums divided again
    d = observe(r, batch_size=N, **{key: 4})
    assert d.top.id == cause, dg.render_text(d)


def test_unrelated_gradients_are_unknown():
    rng = np.random.default_rng(2)
    r = {m: rng.standard_normal(40) for m in ("a", "b", "c")}
    d = observe(r)
    assert d.top.id == "unknown" and dg.exit_code(d) == dg.EXIT_UNKNOWN, dg.render_text(d)


def test_the_seed_table():
    """The seed's own table: the per-example loops against the batched reductions, explained, and the
    non-linearity of cross-entropy rejected."""
    obs = dg.read_table(SEED_TABLE, "seed")
    assert obs.labels == ["none", "sum", "avg", "one-by-one"] and obs.resolution == 5e-5
    d = dg.diagnose(obs)
    assert d.top.id == "unzeroed_gradients", dg.render_text(d)
    assert sorted(map(sorted, d.clusters)) == [["avg", "sum"], ["none", "one-by-one"]]
    ruled = {c.id for c in d.causes if c.score == 0}
    assert {"clean", "dropout_train_mode", "batchnorm_train_mode"} <= ruled
    assert any("non-linearity" in n for n in d.notes)
    assert any("printed precision" in n for n in d.notes)
    # Full batches rule the short last batch out; a short one keeps it in play.
    obs.info = dg.Info(batch_size=64, dataset_size=1024)
    assert next(c for c in dg.diagnose(obs).causes if c.id == "short_last_batch").score == 0.0


def test_a_table_with_no_known_pattern_is_unknown():
    table = "a,b,max_abs\nx,y,0.3\nx,z,0.5\ny,z,0.2\n"
    d = dg.diagnose(dg.read_table(table, "t.csv"))
    assert d.top.id == "unknown", dg.render_text(d)


def test_every_table_form_reads_the_same():
    rows = [("none", "sum", 0.0316), ("none", "mean", 0.0)]
    csv_text = "a,b,max_abs\n" + "".join(f"{a},{b},{v}\n" for a, b, v in rows)
    json_text = json.dumps([{"a": a, "b": b, "max_abs": v} for a, b, v in rows])
    seed = "".join(f"Maximum discrepancy between reduction = {a} and {b}: {v}\n" for a, b, v in rows)
    read = [dg.read_table(t, "t").diffs for t in (csv_text, json_text, seed)]
    assert read[0] == read[1] == read[2] == {("none", "sum"): 0.0316, ("none", "mean"): 0.0}


@pytest.mark.parametrize("text,message", [
    ("nothing here", "no pairwise differences"),
    ("a,b,max_abs\nx,y\n", "expected a, b, max_abs"),
    ("a,b,max_abs\nx,y,-1\n", "finite non-negative"),
    ("a,b,max_abs\nx,x,0.1\n", "with itself"),
    ("[{\"a\": \"x\"}]", "JSON must be"),
])
def test_bad_tables_are_config_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        dg.read_table(text, "t")


def test_bad_input_is_exit_2(tmp_path, capsys):
    np.savez(tmp_path / "g.npz", **{"a/w": np.ones(3), "b/w": np.ones(4)})
    assert main(["diagnose", str(tmp_path / "g.npz")]) == 2
    assert "(4,) in 'b'" in capsys.readouterr().err
    np.savez(tmp_path / "nan.npz", **{"a/w": np.ones(3), "b/w": np.array([1.0, np.nan, 1.0])})
    assert main(["diagnose", str(tmp_path / "nan.npz")]) == 2
    (tmp_path / "info.toml").write_text("batch = 64\n")
    (tmp_path / "t.txt").write_text(SEED_TABLE)
    assert main(["diagnose", str(tmp_path / "t.txt"), "--info", str(tmp_path / "info.toml")]) == 2
    assert "unknown key(s) 'batch'" in capsys.readouterr().err
    assert main(["diagnose", str(tmp_path / "t.txt"), "--batch-size", "0"]) == 2
    assert main(["diagnose", str(tmp_path / "t.txt"), "--padding", "-1"]) == 2
    assert main(["diagnose", str(tmp_path / "t.txt"), "--padding", "64", "--batch-size", "64"]) == 2
    assert "leaves no valid item" in capsys.readouterr().err
    assert main(["diagnose", str(tmp_path / "missing")]) == 2


def test_cli_json_has_the_documented_shape(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(SEED_TABLE)
    assert main(["diagnose", str(tmp_path / "t.txt"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in doc["causes"]][0] == "unzeroed_gradients"
    assert {c["id"] for c in doc["causes"]} == set(dg.CAUSES)
    assert all(set(c) == {"id", "score", "evidence", "fix"} for c in doc["causes"])


@pytest.mark.frameworks("torch")
def test_the_seed_reproduction_written_in_torch(tmp_path):
    """examples/seed_question_torch.py, the question's code with its bug and then fixed: diagnose names the
    bug first on its table and on its gradients, and calls the fixed gradients clean."""
    proc = subprocess.run([sys.executable, "examples/seed_question_torch.py", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = dg.diagnose(dg.read_table((tmp_path / "bug_table.txt").read_text(), "bug"))
    assert table.top.id == "unzeroed_gradients"
    info = dg.Info(batch_size=64, dtype="float32")
    bug = dg.read_gradients(str(tmp_path / "bug_gradients.npz"))
    bug.info = info
    assert dg.diagnose(bug).top.id == "unzeroed_gradients"
    fixed = dg.read_gradients(str(tmp_path / "fixed_gradients.npz"))
    fixed.info = info
    assert dg.diagnose(fixed).top.id == "clean"


def test_readme_shows_what_diagnose_prints_for_the_seed_table():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    page = open(os.path.join(root, "docs", "commands", "diagnose.md"), encoding="utf-8").read()
    shown = page.split("<!-- seed-diagnosis:start -->\n```text\n", 1)[1].split("\n```\n<!-- seed-diagnosis:end", 1)[0]
    proc = subprocess.run([sys.executable, "-m", "gradparity", "diagnose", "examples/seed_table.txt"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 1 and proc.stdout.rstrip("\n") == shown


def _short_last_batch_npz(tmp_path, labels):
    """A user's script's output, written with plain numpy: gradients of a 100-example dataset in batches of 32,
    averaged over examples (two per-example loops) and as a mean of batch means (two batched methods), saved
    under the user's own method names."""
    g = per_example(n=100)
    batches = [g[i:i + 32] for i in range(0, 100, 32)]  # 32, 32, 32, 4
    over_examples = g.sum(axis=0) / 100
    mean_of_means = np.mean([b.mean(axis=0) for b in batches], axis=0)
    values = [over_examples, over_examples.copy(), mean_of_means, mean_of_means.copy()]
    path = tmp_path / "grads.npz"
    np.savez(path, **{f"{label}/w": v for label, v in zip(labels, values)})
    return path


def test_labels_it_cannot_read_are_said_and_a_mapping_reads_them(tmp_path, capsys):
    path = _short_last_batch_npz(tmp_path, ["per_sample_a", "per_sample_b", "fullbatch_a", "fullbatch_b"])
    code = main(["diagnose", str(path), "--batch-size", "32", "--dataset-size", "100", "--json"])
    doc = json.loads(capsys.readouterr().out)
    # Unmapped: nothing tells the loops from the batched methods, and the diagnosis says how it read them.
    assert [r["how"] for r in doc["labels_read"]] == ["not understood"] * 4
    assert doc["causes"][0]["id"] != "short_last_batch"
    text_code = main(["diagnose", str(path), "--batch-size", "32", "--dataset-size", "100"])
    text = capsys.readouterr().out
    assert "per_sample_a -> not understood" in text and "--methods per_sample_a=" in text
    assert code == text_code
    # With the user's mapping the same numbers are the short last batch, as they are under gradparity's words.
    mapping = "per_sample_a=none_loop,per_sample_b=one_by_one,fullbatch_a=sum,fullbatch_b=mean"
    main(["diagnose", str(path), "--batch-size", "32", "--dataset-size", "100", "--methods", mapping, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["causes"][0]["id"] == "short_last_batch"
    assert [r["read_as"] for r in doc["labels_read"]] == ["none_loop", "one_by_one", "sum", "mean"]
    assert {r["how"] for r in doc["labels_read"]} == {"your mapping"}
    renamed = _short_last_batch_npz(tmp_path, ["none_loop", "one_by_one", "sum", "mean"])
    main(["diagnose", str(renamed), "--batch-size", "32", "--dataset-size", "100", "--json"])
    same = json.loads(capsys.readouterr().out)
    assert same["causes"][0]["id"] == "short_last_batch"
    assert same["causes"][0]["score"] == doc["causes"][0]["score"]


def test_a_mapping_to_no_method_word_is_exit_2(tmp_path, capsys):
    path = _short_last_batch_npz(tmp_path, ["a", "b", "c", "d"])
    assert main(["diagnose", str(path), "--methods", "a=loopy"]) == 2
    assert "'loopy', which is no method word" in capsys.readouterr().err


def test_results_that_accumulate_across_the_methods():
    """No zero_grad between the methods: each result holds the ones computed before it (here in float32, the
    saved order none, sum, mean, one_by_one)."""
    r = methods(per_example())
    running = np.zeros_like(r["none"])
    grown = {}
    for name, value in r.items():
        running = running + value
        grown[name] = running.copy()
    d = observe(grown, batch_size=N)
    assert d.top.id == "grad_not_zeroed_between_methods" and d.top.score >= 0.9, dg.render_text(d)
    # The same results in another order are no running sum: the cause does not claim them.
    shuffled = observe({k: grown[k] for k in ("mean", "none", "one_by_one", "sum")}, batch_size=N)
    assert next(c for c in shuffled.causes if c.id == "grad_not_zeroed_between_methods").score < 0.5


@pytest.mark.parametrize("replicas", [4, 3])
def test_a_summed_loss_under_data_parallel_against_a_single_device_mean(replicas):
    """DDP averages R replicas' summed local losses: (sum over the batch) / R, N/R times the single-device mean
    (3 does not divide 64: the factor 64/3 is no integer, and still exact)."""
    g = per_example()
    r = {"single_device": g.mean(axis=0), "ddp": sum(s.sum(axis=0) for s in np.array_split(g, replicas)) / replicas}
    d = observe(r, batch_size=N, replicas=replicas)
    assert d.top.id == "data_parallel_average" and d.top.score >= 0.9, dg.render_text(d)
    assert any(f"N/R = {N}/{replicas}" in e for e in d.top.evidence)
    assert next(c for c in d.causes if c.id == "weighted_mean_mismatch").score < 0.5


def test_micro_batch_means_averaged_when_only_their_number_is_known():
    g = per_example(n=30)
    parts = np.array_split(g, 4)  # 8, 8, 7, 7
    r = {"full": g.mean(axis=0), "accumulated": np.mean([p.mean(axis=0) for p in parts], axis=0)}
    d = observe(r, micro_batches=4)
    assert d.top.id == "accumulation_normalization", dg.render_text(d)


def test_a_bad_grad_scale_is_exit_2(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(SEED_TABLE)
    assert main(["diagnose", str(tmp_path / "t.txt"), "--grad-scale", "0"]) == 2
    assert "grad_scale must be a positive number" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("a,b,max_abs,norm\nx,y,0.1,3\n")
    assert main(["diagnose", str(tmp_path / "bad.csv")]) == 2
    assert "optional columns: max_rel, ratio" in capsys.readouterr().err


def test_every_cause_is_a_switch_or_said_to_be_diagnose_only():
    from gradparity.experiment.causes import CAUSE_IDS, DIAGNOSE_ONLY

    assert set(dg.CAUSES) == set(CAUSE_IDS.values()) | set(DIAGNOSE_ONLY)
    assert not set(CAUSE_IDS.values()) & set(DIAGNOSE_ONLY)


def _single_and_ddp(tmp_path, replicas=2):
    """A user's DDP comparison saved under their own labels, written with plain numpy: ``single`` the summed loss
    on one device, ``ddp`` the same summed loss under DDP (each replica's shard summed, the replicas averaged)."""
    g = per_example(n=8).astype(np.float64)
    path = tmp_path / "single_vs_ddp.npz"
    np.savez(path, **{"single/w": g.sum(axis=0),
                      "ddp/w": sum(s.sum(axis=0) for s in np.array_split(g, replicas)) / replicas})
    return path


@pytest.mark.parametrize("argv", [["--replicas", "2"], []], ids=["replicas-given", "ddp-label-only"])
def test_single_beside_data_parallel_results_is_one_device(tmp_path, capsys, argv):
    """Beside a result named for data-parallel training, "single" is one device, not one example at a time:
    no per-example cause (dropout, batch norm) is drawn from it, and "ddp" is not asked to be mapped to a method."""
    path = str(_single_and_ddp(tmp_path))
    assert main(["diagnose", path, *argv, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    read = {r["label"]: r for r in doc["labels_read"]}
    assert (read["single"]["read_as"], read["single"]["roles"]) == ("one_device", [])
    assert (read["ddp"]["read_as"], read["ddp"]["roles"]) == ("data_parallel", [])
    scores = {c["id"]: c["score"] for c in doc["causes"]}
    assert doc["causes"][0]["id"] == "data_parallel_average"
    assert scores["dropout_train_mode"] < 0.5 and scores["batchnorm_train_mode"] < 0.5
    main(["diagnose", path, *argv])
    text = capsys.readouterr().out
    assert "single -> one_device (its name, beside data-parallel results)" in text
    assert "--methods ddp=" not in text


def test_single_is_one_example_at_a_time_without_data_parallel_results_or_when_mapped(tmp_path, capsys):
    g = per_example(n=8).astype(np.float64)
    path = tmp_path / "seed_like.npz"
    np.savez(path, **{"mean/w": g.mean(axis=0), "single/w": sum(row / 8 for row in g)})
    assert main(["diagnose", str(path), "--json"]) == 0
    read = {r["label"]: r for r in json.loads(capsys.readouterr().out)["labels_read"]}
    assert read["single"]["read_as"] == "single" and "loop" in read["single"]["roles"]
    # Beside data-parallel results, the user's own mapping still decides.
    main(["diagnose", str(_single_and_ddp(tmp_path)), "--replicas", "2", "--methods", "single=sum", "--json"])
    read = {r["label"]: r for r in json.loads(capsys.readouterr().out)["labels_read"]}
    assert (read["single"]["read_as"], read["single"]["how"]) == ("sum", "your mapping")


def test_a_reader_that_leaves_the_pipe_stops_diagnose_quietly():
    """``gradparity diagnose TABLE | head -0``: the reader closed the pipe before anything was printed."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "gradparity", "diagnose", "examples/seed_table.txt"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "internal error" not in err, err
