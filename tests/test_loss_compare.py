"""``gradparity compare-losses``: configurations run natively on shared batches, every pair classified."""
import json

import numpy as np
import pytest
from cli_harness import run_cli

from gradparity.cli import main

CONFIGS = [
    "torch.nn.MSELoss(reduction='sum')",
    "keras.losses.MeanSquaredError(reduction='sum')",
    "optax.squared_error(predictions, targets).sum()",
    "torch.nn.MSELoss()",
    "keras.losses.MeanSquaredError(reduction='sum')(targets, predictions, sample_weight=w)",
]


@pytest.mark.frameworks("torch", "jax", "keras-tensorflow")
def test_every_kind_of_relation_is_measured():
    proc = run_cli("compare-losses", *CONFIGS, "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert all(c["agreement"]["status"] == "ok" for c in doc["configurations"])
    rel = {(p["a"], p["b"]): p for p in doc["pairs"]}
    assert rel[(0, 2)]["relation"] == "equal"
    # Keras averages the last axis before summing: PyTorch's sum is C times Keras' on every batch.
    c = doc["batches"][0]["shape"][-1]
    assert rel[(0, 1)]["relation"] == "constant_factor"
    np.testing.assert_allclose(rel[(0, 1)]["ratios"], c, rtol=1e-12)
    # sum vs mean: the factor is the number of elements, which changes with the batch.
    assert rel[(0, 3)]["relation"] == "batch_dependent_factor"
    sizes = [np.prod(b["shape"]) for b in doc["batches"]]
    np.testing.assert_allclose(rel[(0, 3)]["ratios"], sizes, rtol=1e-12)
    assert rel[(0, 4)]["relation"] == "not_equivalent"  # sample weights change the direction
    assert sorted(map(sorted, doc["classes"])) == [[0, 2], [1], [3], [4]]


def test_incompatible_configurations_are_exit_2(capsys, workers_started):
    started = workers_started
    assert main(["compare-losses", "torch.nn.CrossEntropyLoss()", "torch.nn.MSELoss()"]) == 2
    assert "same kind of targets" in capsys.readouterr().err
    assert main(["compare-losses", "torch.nn.MSELoss()"]) == 2
    assert "at least two" in capsys.readouterr().err
    assert not started


@pytest.mark.frameworks("torch", "jax", "keras-tensorflow")
def test_the_structured_example_measures_each_frameworks_own_divisor():
    """examples/compare_losses.toml: three means over N (or N*T) are equal; the sum is N times them, per batch."""
    proc = run_cli("compare-losses", "--config", "examples/compare_losses.toml", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    sizes = [float(np.prod(b["shape"][:-1])) for b in doc["batches"]]
    measured = [[b["measured_divisor"] for b in c["agreement"]["batches"]] for c in doc["configurations"]]
    np.testing.assert_allclose(measured[0], sizes, rtol=1e-12)  # torch's mean: every example/token counts
    np.testing.assert_allclose(measured[1], 1.0, rtol=1e-12)    # torch's sum
    np.testing.assert_allclose(measured[2], sizes, rtol=1e-12)  # Keras' sum_over_batch_size
    np.testing.assert_allclose(measured[3], sizes, rtol=1e-12)  # optax then .mean()
    assert sorted(map(sorted, doc["classes"])) == [[0, 2, 3], [1]]
    rel = {(p["a"], p["b"]): p for p in doc["pairs"]}
    assert rel[(0, 1)]["relation"] == "batch_dependent_factor"
    np.testing.assert_allclose(rel[(0, 1)]["ratios"], 1 / np.array(sizes), rtol=1e-12)  # loss_0 / loss_1


@pytest.mark.frameworks("torch", "jax", "keras-tensorflow")
def test_the_code_translate_prints_is_accepted_as_it_is_printed():
    """A user pastes what ``gradparity translate`` printed (``criterion = ...`` then ``loss = criterion(...)``, and
    optax's ``loss = ...``) into ``compare-losses``: it reads the assignments as the loss they build."""
    source = "keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction='sum')"
    printed = run_cli("translate", source)
    assert printed.returncode == 0, printed.stdout[-3000:] + printed.stderr[-2000:]
    blocks = {}
    for block in printed.stdout.split("\n== ")[1:]:
        head, *lines = block.splitlines()
        code = []
        for line in lines:  # the code: the lines before its indented notes and measurements
            if not line or line.startswith(" "):
                break
            code.append(line)
        blocks[head.split(" ")[0]] = "\n".join(code)
    assert blocks["torch"].startswith("criterion = torch.nn.CrossEntropyLoss") and "\n" in blocks["torch"]
    assert blocks["jax"].startswith("loss = optax.")
    proc = run_cli("compare-losses", source, blocks["torch"], blocks["jax"], "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert {p["relation"] for p in doc["pairs"]} == {"equal"}
