"""``run --data-parallel R`` in core: the factor between an engine's gradient and the single-device one, the
documented conventions, and bad input refused before any process starts (exit 2). No framework: the engines
themselves are tested in tests/test_parallel_{torch,keras,jax}.py and end to end in tests/test_parallel_run.py."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from cli_harness import run_cli as gradparity

from gradparity.compare.parallel import compare_case, factor_text
from gradparity.experiment.parallel import advice, batch_arrays, expected_factor, expected_refusal, global_batches

RNG = np.random.default_rng(3)
#: Per-example gradients of 12 examples of a two-tensor model, as any framework would give them.
PER_EXAMPLE = {"w": RNG.normal(size=(12, 5, 3)), "b": RNG.normal(size=(12, 3))}
RTOL = 1e-12   # float64 sums of 12 terms: far above their rounding, far below any factor's effect


def mean(rows) -> dict:
    return {k: v[rows].mean(axis=0) for k, v in PER_EXAMPLE.items()}


def summed(rows) -> dict:
    return {k: v[rows].sum(axis=0) for k, v in PER_EXAMPLE.items()}


@pytest.mark.parametrize("factor", [1.0, 0.25, 4.0, 1 / 3, 64 / 3])
def test_a_scaled_gradient_is_one_constant_factor_named_as_a_fraction(factor):
    single = mean(slice(None))
    dp = {k: factor * v for k, v in single.items()}
    got = compare_case(dp, single, RTOL, {}, 12, 4)
    assert got["factor"] == pytest.approx(factor, rel=1e-14)
    assert Fraction(got["factor_text"]) == Fraction(factor).limit_denominator(100)
    assert (got["max_rel"] <= RTOL) == (factor == 1.0)


def test_ddp_means_of_unequal_shards_are_no_constant_factor():
    # DDP averages the replicas' means: shards of 4, 4 and 3 examples weigh each example 1/(3 n_r), not 1/11.
    shards = [range(0, 4), range(4, 8), range(8, 11)]
    dp = {k: np.mean([mean(list(s))[k] for s in shards], axis=0) for k in PER_EXAMPLE}
    got = compare_case(dp, mean(list(range(11))), RTOL, {}, 11, 3)
    assert got["factor"] is None and got["factor_text"] is None
    assert got["residual"] > 1e-3


def test_a_padding_sampler_repeats_examples_so_the_factor_is_not_constant():
    # DistributedSampler(drop_last=False): 11 examples over 3 replicas become 12, example 0 twice.
    dp = {k: v / 3 for k, v in summed(list(range(11)) + [0]).items()}
    got = compare_case(dp, summed(list(range(11))), RTOL, {}, 11, 3)
    assert got["factor"] is None


def test_the_factor_text_only_names_a_fraction_within_the_tolerance():
    assert factor_text(0.25 * (1 + 1e-13), 1e-12, 12, 4) == "1/4"
    assert factor_text(0.25 * (1 + 1e-6), 1e-12, 12, 4) == f"{0.25 * (1 + 1e-6):.6g}"


def test_the_global_batches_and_the_conventions():
    assert global_batches(64, 4) == global_batches(64, 4).__class__(64, 63)
    assert global_batches(63, 4).even == 60 and global_batches(63, 4).uneven == 63
    arrays = batch_arrays(np.arange(12 * 2).reshape(12, 2), np.arange(12), 3)
    assert arrays["x"].shape == (12, 2) and arrays["uneven/y"].tolist() == list(range(11))
    # PyTorch's DDP averages; tf.distribute sums; a loss divided by the global batch is the mean.
    assert expected_factor("torch", "ddp", "sum", [4, 4, 4], 12) == Fraction(1, 3)
    assert expected_factor("torch", "ddp", "mean", [4, 4, 4], 12) == 1
    assert expected_factor("torch", "ddp", "mean", [4, 4, 3], 11) is None
    assert expected_factor("torch", "sampler", "sum", [4, 4, 4], 11) is None    # padded: 12 seen of 11
    # Keras 3's loss object scales a mean by 1/R (cast through float32) under a strategy, which sums.
    assert expected_factor("keras-tensorflow", "mirrored_loop", "mean", [4, 4, 4], 12) == 3 * Fraction(
        float(np.float32(1 / 3)))
    assert expected_factor("keras-tensorflow", "mirrored_fit", "sum", [4, 4, 3], 11) == 1
    assert expected_factor("tf-keras", "mirrored_loop", "sum", [4, 4, 4], 12) == 1
    assert expected_factor("keras-tensorflow", "mirrored_average", "mean", [4, 4, 3], 11) == 1
    # shard_map (check_vma=True, the default): jax.grad in the body already sums the shards: psum adds R more.
    assert expected_factor("jax", "shard_map_psum", "sum", [4, 4, 4], 12) == 3
    assert expected_factor("jax", "shard_map_pmean", "mean", [4, 4, 4], 12) == 3


def test_the_advice_names_the_fix_in_the_engines_terms():
    assert "multiply the loss (or the learning rate) by R = 4" in advice("torch", "ddp", "sum", 4, 64, [16] * 4,
                                                                         64, 0.25, 1e-6)
    assert "tf.nn.compute_average_loss" in advice("tf-keras", "mirrored_average", "mean", 4, 64, [16] * 4, 64,
                                                  4.0, 1e-6)
    assert "weighed unequally" in advice("torch", "ddp", "mean", 3, 11, [4, 4, 3], 11, None, 1e-6)
    assert "repeated 1 example" in advice("torch", "sampler", "sum", 3, 11, [4, 4, 4], 12, None, 1e-6)
    assert "dropped 2 example" in advice("torch", "sampler_drop", "sum", 3, 11, [3, 3, 3], 9, None, 1e-6)
    assert "take jax.grad outside shard_map" in advice("jax", "shard_map_pmean", "mean", 3, 12, [4] * 3, 12, 3.0,
                                                       1e-6)
    assert "float32" in advice("keras-tensorflow", "mirrored_fit", "mean", 3, 12, [4] * 3, 12,
                               3 * float(np.float32(1 / 3)), 1e-12)
    assert expected_refusal("jax", "jit_sharding", "mean", 11, 3) and not expected_refusal("jax", "jit_sharding",
                                                                                          "mean", 12, 3)
    assert "SUM_OVER_BATCH_SIZE" in expected_refusal("tf-keras", "mirrored_loop", "mean", 12, 3)


@pytest.mark.parametrize("argv, fragment", [
    (["--data-parallel", "1"], "parallel.replicas = 1 is one device"),
    (["--data-parallel", "40"], "more than half the batch of 64"),
    (["--data-parallel", "-2"], "whole number of replicas"),
    (["--data-parallel", "4", "--backends", "numpy"], "no backend of the run (numpy) has a data-parallel engine"),
    (["--data-parallel", "4", "--model", "cnn"], "data-parallel runs the built-in MLP"),
])
def test_bad_data_parallel_settings_are_exit_2_before_any_worker(tmp_path, argv, fragment):
    r = gradparity("run", *argv, "--out", tmp_path / "out")
    assert r.returncode == 2 and fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_a_missing_engine_framework_an_unbindable_port_and_too_little_memory_are_exit_2(tmp_path, monkeypatch):
    import importlib.util
    import socket

    import gradparity.run.runner as runner

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real_find(name, *a))
    r = gradparity("run", "--data-parallel", "4", "--out", tmp_path / "o1")
    assert r.returncode == 2 and "jax's data-parallel engines need jax" in r.stderr and "'.[jax]'" in r.stderr
    monkeypatch.setattr(importlib.util, "find_spec", real_find)

    def refuse(self, address):
        raise OSError(99, "Cannot assign requested address")

    monkeypatch.setattr(socket.socket, "bind", refuse)
    r = gradparity("run", "--data-parallel", "4", "--backends", "torch", "--out", tmp_path / "o2")
    assert r.returncode == 2 and "no port of 127.0.0.1 can be bound here" in r.stderr, r.stderr
    monkeypatch.undo()
    monkeypatch.setattr(runner, "available_memory_bytes", lambda: 2**30)
    r = gradparity("run", "--data-parallel", "8", "--backends", "torch", "--out", tmp_path / "o3")
    assert r.returncode == 2 and "8 torch replicas need about" in r.stderr, r.stderr
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
    r = gradparity("run", "--data-parallel", "8", "--backends", "torch", "--check")   # --check checks it too
    assert r.returncode == 2 and "8 torch replicas need about" in r.stderr, r.stderr


def test_run_check_names_the_data_parallel_backends():
    r = gradparity("run", "--data-parallel", "4", "--check")
    assert r.returncode == 0, r.stderr
    assert "data-parallel on 4 replicas: torch, keras-tensorflow, tf-keras, jax" in r.stdout
