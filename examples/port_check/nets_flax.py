"""The Flax NNX port of nets_torch.TorchCNN: one faithful, one with a planted porting bug."""
import jax
import jax.numpy as jnp
from flax import nnx


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # jax.nn.gelu is the tanh approximation unless told otherwise


class FlaxCNN(nnx.Module):
    def __init__(self, stride2_padding=((1, 1), (1, 1)), rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self.conv1 = nnx.Conv(1, 8, (3, 3), padding="SAME", rngs=rngs)
        # torch's padding=1 pads both sides; "SAME" with stride 2 pads only the bottom/right here.
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), padding=stride2_padding, rngs=rngs)
        self.fc1 = nnx.Linear(16 * 2 * 2, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, epsilon=1e-5, rngs=rngs)  # Flax's default epsilon is 1e-6
        self.fc2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = gelu(self.conv1(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = gelu(self.conv2(x))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # flatten in torch's (C, H, W) order
        x = gelu(self.norm(self.fc1(x)))
        return self.fc2(x)


def flax_cnn():
    return FlaxCNN()


def flax_cnn_same_padding():
    """The planted bug: padding="SAME" at the stride-2 convolution (asymmetric, unlike torch's padding=1)."""
    return FlaxCNN(stride2_padding="SAME")
