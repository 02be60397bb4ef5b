"""Ports of examples/port_check's TorchCNN with one planted bug each, and models that fail on purpose.

Imported by gradparity's workers (the tests put this folder and examples/port_check on their sys.path).
"""
import os
import time

import jax
import numpy as np
from flax import nnx

from nets_flax import FlaxCNN


class _EpsilonDefault(FlaxCNN):
    def __init__(self):
        super().__init__()
        self.norm = nnx.LayerNorm(32, rngs=nnx.Rngs(1))  # Flax's default epsilon 1e-6, torch's 1e-5


def flax_cnn_epsilon_default():
    """The LayerNorm left at Flax's default epsilon (1e-6; torch uses 1e-5)."""
    return _EpsilonDefault()


class _SwappedConv(nnx.Conv):
    """A hand-written convolution that reads its (kh, kw, in, out) kernel as (kw, kh, in, out)."""

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(x, self.kernel[...].transpose(1, 0, 2, 3), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...]


class _Swapped(FlaxCNN):
    def __init__(self):
        super().__init__()
        self.conv1 = _SwappedConv(1, 8, (3, 3), padding="SAME", rngs=nnx.Rngs(2))


def flax_cnn_swapped_kernel():
    """The first convolution's kernel used with its height and width swapped (a transposed kernel)."""
    return _Swapped()


def flax_raises():
    raise RuntimeError("this factory fails on purpose")


def flax_hangs():
    time.sleep(3600)


def flax_crashes():
    os.abort()  # SIGABRT: the worker dies without a result


class _WrongShape(FlaxCNN):
    def __call__(self, x):
        return super().__call__(x)[:, :7]


def flax_wrong_shape():
    return _WrongShape()


def not_a_model():
    return np.zeros(3)
