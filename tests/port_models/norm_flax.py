"""Flax NNX ports of norm_torch.Net, each with one normalization's epsilon left at another value than torch's."""
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self, bn_epsilon=1e-5, ln_epsilon=1e-5, features=6, width=8, classes=4):
        r = nnx.Rngs(0)
        self.fc1 = nnx.Linear(features, width, rngs=r)
        self.bn = nnx.BatchNorm(width, epsilon=bn_epsilon, rngs=r)
        self.fc2 = nnx.Linear(width, width, rngs=r)
        self.norm = nnx.LayerNorm(width, epsilon=ln_epsilon, rngs=r)
        self.head = nnx.Linear(width, classes, rngs=r)

    def __call__(self, x):
        h = jnp.tanh(self.bn(self.fc1(x)))
        return self.head(jnp.tanh(self.norm(self.fc2(h))))


def layernorm_default():
    """The LayerNorm at Flax's default epsilon (1e-6; torch's is 1e-5)."""
    return Net(ln_epsilon=nnx.LayerNorm(1, rngs=nnx.Rngs(0)).epsilon)


def batchnorm_keras_epsilon():
    """The BatchNorm with Keras' epsilon (1e-3), copied from a Keras version of the model."""
    return Net(bn_epsilon=1e-3)


def layernorm_own_epsilon():
    """The LayerNorm with an epsilon no framework defaults to."""
    return Net(ln_epsilon=3e-4)
