"""``gradparity diagnose`` on tables of pairwise differences as users write them (plain CSV text).

A table of max |a - b| has no magnitudes: diagnose judges it against the dtype's rounding bound at the
gradients' scale (given with --grad-scale or a max_rel column, else assumed and said), and claims a factor
only where a ratio column shows one. Expected figures come from the tolerance formula
(rtol = 16 u sqrt(K) L, L = 2, K the batch size) or from the numbers written into the table.
"""
import json
import math

import numpy as np

from gradparity.cli import main

#: A user's table: four methods of a float32 run, every pair at float32 rounding (7.5e-10 ... 2.6e-9).
ROUNDING_TABLE = """\
a,b,max_abs
mean,sum,7.5e-10
mean,none_loop,1.9e-9
mean,one_by_one,2.6e-9
sum,none_loop,1.4e-9
sum,one_by_one,2.2e-9
none_loop,one_by_one,1.1e-9
"""
N = 64


def float32_rtol(n: int) -> float:
    """gradparity's gradient bound for float32 (docs: rtol = 16 u sqrt(K) L, u = 2^-24, L = 2, K = n)."""
    return 16 * 2.0 ** -24 * math.sqrt(n) * 2


def diagnose(capsys, path, *flags):
    """(exit code, --json document, text) of one table."""
    code = main(["diagnose", str(path), "--json", *flags])
    doc = json.loads(capsys.readouterr().out)
    assert main(["diagnose", str(path), *flags]) == code
    return code, doc, capsys.readouterr().out


def test_a_table_at_float32_rounding_is_clean_and_says_the_scale_it_assumed(tmp_path, capsys):
    path = tmp_path / "diffs.csv"
    path.write_text(ROUNDING_TABLE)
    code, doc, text = diagnose(capsys, path, "--dtype", "float32", "--batch-size", str(N))
    assert code == 0 and doc["causes"][0]["id"] == "clean", text
    assert "nothing to diagnose" in text
    assert all(p["kind"] == "rounding" for p in doc["pairs"])
    # The verdict holds for gradients whose largest entries are at least max|a-b| / rtol, and the text says so.
    least = 2.6e-9 / float32_rtol(N)
    assert f"{least:.3g}" in text and "absolute differences only" in text and "--grad-scale" in text
    scores = {c["id"]: c["score"] for c in doc["causes"]}
    assert scores["dropout_train_mode"] == 0.0 and scores["batchnorm_train_mode"] == 0.0


def test_a_table_cannot_show_a_factor_and_says_so(tmp_path, capsys):
    path = tmp_path / "diffs.csv"
    path.write_text("a,b,max_abs\nfull_batch,accumulated,0.0316\n")
    _, doc, text = diagnose(capsys, path, "--micro-batches", "4")
    assert "no pair differs by a factor" not in text
    accumulation = next(c for c in doc["causes"] if c["id"] == "accumulation_normalization")
    assert any("cannot be read from absolute differences" in e for e in accumulation["evidence"])
    _, _, rounding = diagnose(capsys, tmp_path / "diffs.csv", "--micro-batches", "4", "--dtype", "float32")
    assert "no pair differs by a factor" not in rounding


def test_the_gradients_scale_or_a_relative_column_decides(tmp_path, capsys):
    # Largest gradient entries of 1e-5: the same absolute differences are now 2.6e-4 relative, beyond float32.
    path = tmp_path / "diffs.csv"
    path.write_text(ROUNDING_TABLE)
    code, doc, _ = diagnose(capsys, path, "--dtype", "float32", "--batch-size", str(N), "--grad-scale", "1e-5")
    assert doc["causes"][0]["id"] != "clean" and code != 0
    assert all(p["kind"] == "large" for p in doc["pairs"])
    # A max_rel column at a gradient scale of 0.05: every pair well within the bound, judged for sure.
    rows = [line.split(",") for line in ROUNDING_TABLE.splitlines()[1:]]
    rel = tmp_path / "rel.csv"
    rel.write_text("a,b,max_abs,max_rel\n" + "".join(f"{a},{b},{v},{float(v) / 0.05!r}\n" for a, b, v in rows))
    code, doc, text = diagnose(capsys, rel, "--dtype", "float32", "--batch-size", str(N))
    assert code == 0 and doc["causes"][0]["id"] == "clean" and doc["causes"][0]["score"] > 0.9, text
    assert "max_rel column" in text
    assert max(p["rel"] for p in doc["pairs"]) == 2.6e-9 / 0.05


def test_a_ratio_column_shows_the_factor(tmp_path, capsys):
    """Four mean-reduced micro-batch losses added without dividing by 4: the user's table gives a / b."""
    g = np.random.default_rng(0).normal(scale=0.01, size=50)
    full, accumulated = g, 4 * g
    path = tmp_path / "diffs.csv"
    path.write_text("a,b,max_abs,ratio\n"
                    f"full_batch,accumulated,{float(np.max(np.abs(full - accumulated)))!r},"
                    f"{float(full @ accumulated / (accumulated @ accumulated))!r}\n")
    code, doc, text = diagnose(capsys, path, "--micro-batches", "4")
    assert code == 1 and doc["causes"][0]["id"] == "accumulation_normalization", text
    assert doc["pairs"][0]["kind"] == "factor" and abs(doc["pairs"][0]["factor"] - 0.25) < 1e-12


def test_a_table_of_results_that_grow_in_their_order(tmp_path, capsys):
    """No zero_grad between three methods: result k holds k copies of the gradient, so results i and j differ
    by |i - j| max|g| (the table written from plain numpy arrays, in the order the methods ran)."""
    g = np.random.default_rng(1).normal(scale=0.02, size=40)
    results = {"mean": g, "sum": 2 * g, "one_by_one": 3 * g}
    names = list(results)
    rows = "".join(f"{a},{b},{float(np.max(np.abs(results[a] - results[b])))!r}\n"
                   for i, a in enumerate(names) for b in names[i + 1:])
    path = tmp_path / "diffs.csv"
    path.write_text("a,b,max_abs\n" + rows)
    code, doc, text = diagnose(capsys, path)
    assert code == 1 and doc["causes"][0]["id"] == "grad_not_zeroed_between_methods", text
    assert "cannot prove" in text  # a table of absolute differences: the pattern, not a proof
