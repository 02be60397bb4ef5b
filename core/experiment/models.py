"""Model architectures defined once, framework-neutral: parameter names and shapes.

Canonical layout (what every backend reads and returns): dense kernels are
``(in, out)`` (Keras and Flax layout; PyTorch's ``nn.Linear.weight`` is the
transpose), biases ``(out,)``, named ``layers.{i}.kernel`` / ``layers.{i}.bias``; a batch
normalization after hidden layer i has ``norms.{i}.scale`` / ``norms.{i}.bias``
(torch ``weight``/``bias``, Keras ``gamma``/``beta``, Flax ``scale``/``bias``).
"""
from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")
#: Batch normalization's epsilon, passed explicitly to every framework: the defaults differ
#: (torch and Flax 1e-5, Keras 1e-3), and a port that keeps each default is not the same model.
BATCHNORM_EPSILON = 1e-5


@dataclass(frozen=True)
class MLP:
    """A multilayer perceptron: Dense -> activation -> ... -> Dense (logits).

    ``sizes`` lists every width from the input features to the number of
    classes, e.g. ``(64, 32, 10)`` is one hidden layer of 32 units. The
    activation follows every layer but the last. With ``batchnorm`` a batch
    normalization (training mode, epsilon ``BATCHNORM_EPSILON``) sits between
    every hidden layer and its activation.
    """

    sizes: tuple[int, ...]
    activation: str
    batchnorm: bool = False

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self.sizes[1:-1])

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names mapped to shapes, in layer order."""
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            shapes[f"layers.{i}.kernel"] = (fan_in, fan_out)
            shapes[f"layers.{i}.bias"] = (fan_out,)
            if self.batchnorm and i < self.num_layers - 1:
                shapes[f"norms.{i}.scale"] = (fan_out,)
                shapes[f"norms.{i}.bias"] = (fan_out,)
        return shapes

    def num_params(self) -> int:
        total = 0
        for shape in self.param_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def describe(self) -> str:
        norm = f", batch norm (training mode, eps {BATCHNORM_EPSILON:g})" if self.batchnorm else ""
        return f"mlp {'-'.join(map(str, self.sizes))} {self.activation}{norm}"

    def to_dict(self) -> dict:
        d = {"kind": "mlp", "sizes": list(self.sizes), "activation": self.activation}
        if self.batchnorm:
            d["batchnorm"] = {"epsilon": BATCHNORM_EPSILON, "mode": "training"}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MLP":
        return cls(tuple(int(s) for s in d["sizes"]), str(d["activation"]), bool(d.get("batchnorm")))
