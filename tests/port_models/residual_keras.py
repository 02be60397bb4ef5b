"""The Keras 3 port of residual_torch.Net as first written: the second block adds its residual to the normalized
tensor instead of the block's input."""
import keras
from keras import layers


class Block(layers.Layer):
    def __init__(self, dim, wrong_residual=False, **kwargs):
        super().__init__(**kwargs)
        self.norm = layers.LayerNormalization(epsilon=1e-5)
        self.fc1 = layers.Dense(2 * dim)
        self.fc2 = layers.Dense(dim)
        self.wrong_residual = wrong_residual

    def call(self, x):
        h = self.norm(x)
        return (h if self.wrong_residual else x) + self.fc2(keras.ops.tanh(self.fc1(h)))


def wrong_residual(features=6, dim=8, classes=4):
    x = keras.Input((features,))
    h = layers.Dense(dim, name="embed")(x)
    h = Block(dim, name="block0")(h)
    h = Block(dim, wrong_residual=True, name="block1")(h)
    return keras.Model(x, layers.Dense(classes, name="head")(h))
