"""`gradparity check` refuses a factory that its module does not define before any worker starts (exit 2).

The modules are written as users write them (plain torch code); the parent never imports them, it reads them.
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gradparity.commands.check import _factory_problems

NETS = textwrap.dedent("""
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)


    def make_net():
        return Net()

    build = make_net
""")


def check(tmp_path, factory):
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 4), np.float32), y=np.array([0, 1]))
    return subprocess.run([sys.executable, "-m", "gradparity", "check", "--torch", factory, "--data", "b.npz",
                           "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("factory, message", [
    ("nets:make", "defines no 'make' at its top level (it defines Net, build, make_net, nn, torch)"),
    ("nets:Nett.build", "defines no 'Nett'"),
])
def test_a_missing_factory_is_exit_2_before_any_worker(tmp_path, factory, message):
    (tmp_path / "nets.py").write_text(NETS)
    proc = check(tmp_path, factory)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert "describing" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_module_that_does_not_parse_is_exit_2(tmp_path):
    (tmp_path / "nets.py").write_text(NETS + "\ndef broken(:\n    pass\n")
    proc = check(tmp_path, "nets:make_net")
    assert proc.returncode == 2 and "does not parse" in proc.stderr and "line" in proc.stderr


@pytest.mark.parametrize("name", ["make_net", "Net", "build", "torch", "nn"])
def test_every_kind_of_top_level_name_counts(tmp_path, name):
    (tmp_path / "nets.py").write_text(NETS)
    assert _factory_problems(f"nets:{name}", (str(tmp_path),)) == []


def test_what_the_source_cannot_tell_is_left_to_the_worker(tmp_path):
    (tmp_path / "star.py").write_text("from os.path import *\n")
    (tmp_path / "lazy.py").write_text("def __getattr__(name):\n    return name\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "nets.py").write_text(NETS)
    folders = (str(tmp_path),)
    assert _factory_problems("star:anything", folders) == []
    assert _factory_problems("lazy:anything", folders) == []
    assert _factory_problems("pkg.nets:make_net", folders) == []
    assert "defines no 'nope'" in _factory_problems("pkg.nets:nope", folders)[0]


@pytest.mark.frameworks("torch")
@pytest.mark.parametrize("x, message", [
    # 7 features into nn.Linear(4, 3): torch's own words name the product that failed
    (np.zeros((2, 7), np.float32), "(float32, shape (2, 7)) do not fit the model"),
    # an extra axis runs (nn.Linear maps the last one), but logits (2, 2, 3) need targets (2, 2)
    (np.zeros((2, 2, 4), np.float32), "needs integer targets of shape [2, 2]; y has shape [2]"),
])
def test_a_batch_that_does_not_fit_the_source_model_is_exit_2(tmp_path, x, message):
    """The source model's first forward pass (the describe stage, seconds) refuses the batch: exit 2 with the
    model's own error, before the methods, weights or training run."""
    (tmp_path / "nets.py").write_text(NETS)
    np.savez(tmp_path / "b.npz", x=x, y=np.array([0, 1]))
    proc = subprocess.run([sys.executable, "-m", "gradparity", "check", "--torch", "nets:make_net", "--data",
                           "b.npz", "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.frameworks("keras-tensorflow")
def test_a_batch_that_does_not_fit_a_keras_source_model_is_exit_2(tmp_path):
    (tmp_path / "knets.py").write_text(textwrap.dedent("""
        import keras


        def make_net():
            return keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(3)])
    """))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 7), np.float32), y=np.array([0, 1]))
    proc = subprocess.run([sys.executable, "-m", "gradparity", "check", "--keras", "knets:make_net", "--data",
                           "b.npz", "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert "(float32, shape (2, 7)) do not fit the model" in proc.stderr and "Traceback" not in proc.stderr
