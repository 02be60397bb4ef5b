"""Its Flax NNX port as first written: the (N, H, W, C) activation reshaped to (N, H*W*C), flattened channels-last
where torch's nn.Flatten flattens (N, C, H, W)."""
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self, channels=3, size=4, classes=5):
        r = nnx.Rngs(0)
        self.conv = nnx.Conv(1, channels, kernel_size=(3, 3), padding="SAME", rngs=r)
        self.fc = nnx.Linear(channels * size * size, classes, rngs=r)

    def __call__(self, x):
        h = jnp.tanh(self.conv(x))
        return self.fc(h.reshape(h.shape[0], -1))
