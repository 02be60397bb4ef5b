"""How a user tests a port in their own suite: ``pytest examples/port_check/test_port.py``.

Each assertion builds the models in their own worker processes (torch's weights mapped onto the ports)
and fails with gradparity's report, which names the first layer that differs.
"""
from pathlib import Path

import numpy as np
import pytest

from gradparity.testing import assert_same_gradients, assert_same_outputs

HERE = Path(__file__).resolve().parent
BATCH = tuple(np.load(HERE / "batch.npz")[k] for k in ("x", "y"))


def test_flax_and_keras_ports_have_torchs_gradients():
    assert_same_gradients(torch="nets_torch:TorchCNN", jax="nets_flax:flax_cnn", keras="nets_keras:keras_cnn",
                          batch=BATCH, methods=["mean"], sys_path=[HERE])


def test_the_planted_padding_bug_is_caught_and_named():
    with pytest.raises(AssertionError, match="features.3"):
        assert_same_outputs(torch="nets_torch:TorchCNN", jax="nets_flax:flax_cnn_same_padding", batch=BATCH,
                            sys_path=[HERE])
