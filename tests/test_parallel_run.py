"""``gradparity run --data-parallel R`` end to end (on JAX, whose worker starts fastest; every engine's own
factors are tested in tests/test_parallel_{torch,keras,tf_keras,jax}.py): every engine's factor in report.json's ``data_parallel``
section, against the frameworks' documented conventions written here (PyTorch: DDP averages the replicas'
gradients; JAX: under shard_map's default check_vma=True the gradient inside the body is already summed over the
shards, so pmean leaves it and psum adds R copies; a batch R does not divide is refused by JAX's sharding)."""
from __future__ import annotations

import json
from fractions import Fraction

import pytest
from cli_harness import run_cli as gradparity

R, N = 3, 12


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "out"
    r = gradparity("run", "--data-parallel", R, "--batch-size", N, "--backends", "numpy,jax",
                   "--dtype", "float64", "--methods", "mean,sum", "--out", out)
    assert r.returncode == 0, r.stderr
    return (json.loads((out / "report.json").read_text()), r.stdout,
            (out / "report.md").read_text() + (out / "report.html").read_text())


def rows(doc, backend):
    return {(x["config"], x["sharding"], x["method"]): x for x in doc["data_parallel"]["results"]
            if x["backend"] == backend}


#: (config, sharding, method) -> the factor by the framework's convention, or None: no constant factor.
JAX = {("jit_sharding", "even", "mean"): 1, ("jit_sharding", "even", "sum"): 1,
       ("shard_map_pmean", "even", "mean"): R, ("shard_map_pmean", "even", "sum"): 1,
       ("shard_map_psum", "even", "mean"): R * R, ("shard_map_psum", "even", "sum"): R}


@pytest.mark.frameworks("jax")
@pytest.mark.parametrize("backend, table", [("jax", JAX)])
def test_every_engines_factor_is_the_conventions(report, backend, table):
    doc = report[0]
    got = rows(doc, backend)
    assert doc["data_parallel"]["schema"] == "gradparity.data_parallel/1"
    assert doc["data_parallel"]["global_batches"] == {"even": N, "uneven": N - 1}
    for key, factor in table.items():
        row = got[key]
        assert row["status"] == "ok", (key, row["error"])
        assert row["replicas"] == R and row["batch"] == (N if key[1] == "even" else N - 1)
        if factor is None:
            assert row["factor"] is None and row["agree_with_single_device"] is False, key
        else:
            # float64: the engines' sums differ from one device's by rounding only (rtol ~1e-13 here).
            assert row["factor"] == pytest.approx(float(factor), rel=1e-9), key
            assert Fraction(row["factor_text"]) == Fraction(factor), key
            assert row["agree_with_single_device"] is (factor == 1), key
        assert row["as_expected"] is True, key


@pytest.mark.frameworks("jax")
def test_what_each_replica_saw_and_what_jax_refuses(report):
    doc, text, md = report
    jax = rows(doc, "jax")
    assert jax[("jit_sharding", "even", "mean")]["shards"] == [4, 4, 4]
    for config in ("jit_sharding", "shard_map_pmean", "shard_map_psum"):
        assert jax[(config, "uneven", "mean")]["status"] == "refused"
        assert "11" in jax[(config, "uneven", "mean")]["error"]
        assert jax[(config, "uneven", "mean")]["as_expected"] is True     # XLA's sharding needs R | N
    assert "Data-parallel engines, R = 3 replicas" in text and "## Data-parallel engines" in md
    assert "<h2>Data-parallel engines</h2>" in md and "shard_map + psum" in md
    assert "take jax.grad outside shard_map" in text


@pytest.mark.frameworks("jax")
def test_train_data_parallel_follows_one_device_where_the_gradient_is_the_same(tmp_path):
    r = gradparity("train", "--data-parallel", R, "--backends", "jax", "--batch-size", N, "--steps", 3,
                   "--dtype", "float64", "--json", "--out", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "gradparity.train.data_parallel/1"
    got = {(t["config"], t["method"]): t for t in doc["trajectories"]}
    # jit + NamedSharding computes the global batch's loss: one device's steps, to float64 rounding.
    assert got[("jit_sharding", "mean")]["on_single_device_trajectory"] is True
    assert max(got[("jit_sharding", "mean")]["per_step"]) < 1e-12
    # shard_map + pmean with a mean loss: R times the gradient, so the trajectory leaves at step 1.
    assert got[("shard_map_pmean", "mean")]["first_apart"] == 1
    assert got[("shard_map_pmean", "mean")]["expected_gradient_factor"] == str(R)
    assert got[("shard_map_pmean", "sum")]["on_single_device_trajectory"] is True
    assert json.loads((tmp_path / "t" / "report.json").read_text())["trajectories"] == doc["trajectories"]


@pytest.mark.parametrize("argv, fragment", [
    (["--data-parallel", "5", "--batch-size", "12"], "R = 5 must divide it"),
    (["--data-parallel", "3", "--batch-size", "12", "--sweep"], "does not combine with --sweep"),
    (["--data-parallel", "3", "--batch-size", "12", "--optimizer", "torch.optim.SGD(params, lr=0.1)"],
     "takes a named optimizer"),
])
def test_train_data_parallel_refuses_before_any_process(tmp_path, argv, fragment):
    r = gradparity("train", *argv, "--out", tmp_path / "t")
    assert r.returncode == 2 and fragment in r.stderr, r.stderr
    assert not (tmp_path / "t").exists()
