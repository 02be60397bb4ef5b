"""``gradparity train --sweep --model CHECK.toml``: the learning-rate sweep on a check config's models (issue 19).

The models are tests/port_models/clf_*.py, a classifier as a user writes it in PyTorch, Flax NNX and Keras 3; the
data is a plain npz of three noisy clusters. The sweep trains every framework natively and measures held-out
accuracy in the worker; the test trains the same configuration in plain PyTorch and measures it itself.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_harness import run_cli as gradparity

from gradparity.commands.user_models import split_examples

MODELS = Path(__file__).resolve().parent / "port_models"


def write_config(folder: Path, n: int = 200, frameworks=("torch", "jax"), extra: str = "") -> Path:
    """A check config as a user writes it (plain TOML) and its data (plain numpy): n examples of 6 features in
    three clusters."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, size=n)
    centers = rng.normal(size=(3, 6))
    x = centers[y] + 0.8 * rng.normal(size=(n, 6))
    np.savez(folder / "data.npz", x=x.astype(np.float64), y=y.astype(np.int64))
    factories = {"torch": "clf_torch:Classifier", "jax": "clf_flax:Classifier", "keras": "clf_keras:classifier"}
    models = "\n".join(f'{fw} = "{factories[fw]}"' for fw in frameworks)
    (folder / "check.toml").write_text(f'[models]\n{models}\n\n[check]\ndata = "data.npz"\nweights_from = "torch"\n'
                                       f'dtype = "float64"\n{extra}')
    for f in MODELS.glob("clf_*.py"):
        (folder / f.name).write_text(f.read_text())
    return folder / "check.toml"


def plain_torch_accuracy(x, y, held, reduction: str, lr: float, epochs: int) -> list[float]:
    """Full-batch SGD on (x, y) in plain PyTorch, float64, from the factory's weights: held-out accuracy after
    each epoch (one step per epoch: the batch is the whole training split)."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(MODELS))
    try:
        from clf_torch import Classifier
    finally:
        sys.path.remove(str(MODELS))
    model = Classifier().double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xh, yh = torch.from_numpy(held[0]), torch.from_numpy(held[1])
    out = []
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt, reduction=reduction).backward()
        opt.step()
        with torch.no_grad():
            out.append(float((model(xh).argmax(dim=1) == yh).double().mean()))
    return out


@pytest.mark.frameworks("torch", "jax")
def test_the_sweep_trains_a_check_configs_models_and_measures_their_held_out_accuracy(tmp_path):
    config = write_config(tmp_path)
    r = gradparity("train", "--model", str(config), "--sweep", "--batch-sizes", "160", "--epochs", "4",
                   "--optimizer", "sgd", "--lr", "0.5", "--dtype", "float64", "--json",
                   "--out", str(tmp_path / "out"))
    code, out, err = r.returncode, r.stdout, r.stderr
    assert code == 0, err
    report = json.loads(out)
    data = np.load(tmp_path / "data.npz")
    (x, y), held, _ = split_examples(data["x"], data["y"], 0, "float64")
    assert len(y) == 160 and len(held[1]) == 40
    cells = [c for c in report["cells"] if c["role"] == "main"]
    assert {c["backend"] for c in cells} == {"torch", "jax"}
    assert {c["rule"] for c in cells} == {"mean", "mean_linear", "sum"}
    for c in cells:
        expected = plain_torch_accuracy(x, y, held, c["reduction"], c["lr"], 4)
        # float64 throughout: the same argmax unless a held-out example sits on a tie (none here), so exact.
        assert c["held_out_accuracy_per_epoch"] == pytest.approx(expected, abs=1e-12), (c["backend"], c["rule"])
    # The rules differ: sum at lr0/B0 on B = 160 is 5x the mean's step, so not every rule reaches one accuracy.
    assert len({tuple(c["held_out_accuracy_per_epoch"]) for c in cells}) > 1


def test_what_training_cannot_take_is_refused_before_any_worker(tmp_path):
    config = write_config(tmp_path, n=40)
    r = gradparity("train", "--model", str(config), "--sweep", "--batch-sizes", "16,64",
                   "--out", str(tmp_path / "o1"))
    code, _, err = r.returncode, r.stdout, r.stderr
    assert code == 2 and "[64] are larger than the 32 training examples" in err
    r = gradparity("train", "--model", str(config), "--sweep", "--class-weights", "balanced",
                            "--batch-sizes", "16", "--out", str(tmp_path / "o2"))
    code, _, err = r.returncode, r.stdout, r.stderr
    assert code == 2 and "--class-weights with --model CHECK.toml" in err
    r = gradparity("train", "--model", str(config), "--out", str(tmp_path / "o3"))
    code, _, err = r.returncode, r.stdout, r.stderr
    assert code == 2 and "--train-steps" in err
    r = gradparity("train", "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "o4"))
    code, _, err = r.returncode, r.stdout, r.stderr
    assert code == 2 and "--data gives the examples of a check config" in err
    mse = write_config(tmp_path, n=40, extra='loss = "mse"\n')
    r = gradparity("train", "--model", str(mse), "--sweep", "--batch-sizes", "16",
                   "--out", str(tmp_path / "o5"))
    code, _, err = r.returncode, r.stdout, r.stderr
    assert code == 2 and "mse" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
