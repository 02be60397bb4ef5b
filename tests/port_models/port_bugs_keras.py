"""A Keras port of examples/port_check's TorchCNN with a planted bug (imported by gradparity's keras worker)."""
import keras
from keras import layers

import nets_keras


class SwappedConv2D(layers.Conv2D):
    """A convolution that reads its (kh, kw, in, out) kernel as (kw, kh, in, out): a transposed kernel."""

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, keras.ops.transpose(kernel, (1, 0, 2, 3)))


def keras_cnn_swapped_kernel():
    model = nets_keras.keras_cnn()
    swapped = SwappedConv2D(8, 3, padding="same", activation="gelu")
    return keras.Sequential([keras.Input((8, 8, 1)), swapped, *model.layers[1:]])
