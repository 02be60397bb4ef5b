"""Its Flax NNX port with padding="SAME", which for stride 2 on an even size pads nothing at the top/left and one
row/column at the bottom/right: the output has torch's shape, not its values."""
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self, channels=4, classes=3):
        r = nnx.Rngs(0)
        self.conv = nnx.Conv(2, channels, kernel_size=(3, 3), strides=(2, 2), padding="SAME", rngs=r)
        self.head = nnx.Linear(channels, classes, rngs=r)

    def __call__(self, x):
        return self.head(jnp.tanh(self.conv(x)).mean(axis=(1, 2)))
