"""The Keras 3 port of nets_torch.TorchCNN: one faithful, one with a planted porting bug."""
import keras
from keras import layers


def _build(final_gelu):
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(8, 3, padding="same", activation="gelu"),  # keras.activations.gelu: exact by default
        layers.MaxPooling2D(2),
        layers.ZeroPadding2D(1),  # torch's padding=1 on both sides; padding="same" would pad bottom/right only
        layers.Conv2D(16, 3, strides=2, padding="valid", activation="gelu"),
        layers.Permute((3, 1, 2)),  # flatten in torch's (C, H, W) order
        layers.Flatten(),
        layers.Dense(32),
        layers.LayerNormalization(epsilon=1e-5),  # Keras' default epsilon is 1e-3
        layers.Activation(final_gelu),
        layers.Dense(10),
    ])


def keras_cnn():
    return _build("gelu")


def keras_cnn_tanh_gelu():
    """The planted bug: keras.ops.gelu, whose default is the tanh approximation, after the LayerNorm."""
    return _build(keras.ops.gelu)
