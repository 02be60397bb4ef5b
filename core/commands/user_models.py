"""A ``gradparity check`` config's models as what ``gradparity train --sweep`` trains (``--model CHECK.toml``).

The check's stages up to the weights (``check.describe_models``: every framework describes the user's model, the
source's weights are mapped onto each port), then the sweep's: the data (the check's batch file, or ``--data``)
split into a training part and a held-out part, every configuration trained natively in every framework by its
trainer (task "model_train", from the source's weights), and the held-out accuracy measured *in the worker*
after every epoch (``protocol.ModelTraining.held_out_accuracy``): core has no forward pass of a user's model.

What a check config may hold that training does not take is refused before any worker starts (exit 2): models
called with named inputs, weights = "own", TF-Keras 2 models, the mse loss (the sweep measures accuracy of class
labels), class weights (they are drawn for the digits' ten classes).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from gradparity.backends.protocol import WorkerJob, step_accuracy
from gradparity.errors import ConfigError
from gradparity.commands.train import HELD_OUT, held_out_split

#: Why ``gradparity train --model CHECK.toml`` needs ``--sweep``.
NOT_WITHOUT_SWEEP = (
    "--model CHECK.toml trains a check config's models with --sweep (the learning-rate recipe for them). Without "
    "--sweep, train compares every framework with the float64 trajectory of its optimizer rule, computed by "
    "gradparity's own forward and backward pass, which a user's model does not have; to follow the ports step by "
    "step against the source, use gradparity check CHECK.toml --train-steps K")


def is_check_config(model: str) -> bool:
    """Whether ``--model`` names a check config (a .toml file) rather than a built-in model."""
    return isinstance(model, str) and model.endswith(".toml")


def read_models(path: str, data: str | None = None):
    """The check config at ``path`` as a ModelCheck whose batch is the whole dataset (``data``: another .npz
    with the same array names, e.g. more examples than the check's batch). ConfigError (exit 2) for what
    training cannot take (see the module doc)."""
    from gradparity.commands.check import load_batch, read_check_config

    if not Path(path).is_file():
        raise ConfigError(f"--model {path!r}: no such check config (a .toml file with [models] and [check])")
    spec = read_check_config(path, {})
    if data is not None:
        x, y, named = load_batch(Path(data), spec.inputs or None, spec.targets)
        spec = replace(spec, x=x, y=y, named=named)
    problems = []
    if spec.named:
        problems.append("the models take named inputs (inputs = {...}): training feeds one input tensor")
    if spec.own_weights:
        problems.append("weights = \"own\": training starts every framework from the source's weights; give "
                        "weights_from = one of the models")
    if "tf_keras" in spec.factories:
        problems.append("a TF-Keras 2 model (tf_keras) has no trainer yet: drop it from [models] to train the others")
    if spec.loss == "mse":
        problems.append("loss mse: the sweep measures held-out accuracy of class labels (cross_entropy, causal_lm)")
    if problems:
        raise ConfigError([f"--model {path}: {p}" for p in problems])
    return spec


def split_examples(x: np.ndarray, y: np.ndarray, seed: int, dtype: str
                   ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], str]:
    """(training split, held-out split, description): the examples in a seeded order (the digits' split, see
    ``train.split_digits``), the last HELD_OUT of them held out; inputs in ``dtype`` unless integer (token
    ids), targets int64. ValueError when either part would be empty."""
    x, y = np.asarray(x), np.asarray(y)
    if not np.issubdtype(x.dtype, np.integer):
        x = x.astype(dtype)
    n = len(y)
    train, held = held_out_split(n, seed)
    cut = len(train)
    if cut < 1 or cut == n:
        raise ValueError(f"{n} examples cannot be split into a training part and a held-out part "
                         f"({HELD_OUT:.0%} held out)")
    return ((x[train], y[train].astype(np.int64)), (x[held], y[held].astype(np.int64)),
            f"{n} examples of the check's data ({tuple(x.shape[1:])} each): {cut} to train on, {n - cut} held out")


@dataclass
class UserModels:
    """The described models of a check config, ready to train: the source's canonical start, each framework's
    assignment of it, and the frameworks that could not be built (failed, with why)."""

    spec: object                         # the ModelCheck (the whole dataset as its batch)
    path: str
    values: dict[str, np.ndarray] = field(repr=False)   # every described tensor (buffers too), source names
    assigns: dict[str, dict[str, str]]
    failed: dict[str, str]               # framework -> why it cannot train
    trainable: tuple[str, ...] = ()      # the source names of the trained tensors (what a trainer returns)

    @property
    def frameworks(self) -> list[str]:
        """The frameworks that train: the source first."""
        return [fw for fw in self.spec.frameworks if fw in self.assigns]

    def backend(self, framework: str) -> str:
        return self.spec.backend(framework).name

    def framework_of(self, backend: str) -> str:
        return next(fw for fw in self.spec.frameworks if self.backend(fw) == backend)

    def describe(self) -> str:
        names = ", ".join(f"{fw} {self.spec.factories[fw]}" for fw in self.spec.frameworks)
        return f"the models of {self.path} ({names}; every framework from {self.spec.source}'s weights)"

    def split(self, seed: int, dtype: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], str]:
        """``split_examples`` of the check's data, targets as the loss reads them (causal_lm: shifted, see
        ``ModelCheck.job_targets``)."""
        try:
            return split_examples(self.spec.x, self.spec.job_targets, seed, dtype)
        except ValueError as exc:
            raise ConfigError(f"{self.path}: {exc}; give a larger dataset with --data FILE.npz") from None

    def job(self, backend: str, batch: dict, runs: dict, held: tuple[np.ndarray, np.ndarray]) -> WorkerJob:
        """The framework's "model_train" job: ``runs`` on ``batch``, the held-out examples for its accuracy."""
        from gradparity.commands.check import train_job

        fw = self.framework_of(backend)
        return train_job(self.spec, fw, self.values, self.assigns[fw], {**batch, "held/x": held[0],
                                                                        "held/y": held[1]}, runs)

    @staticmethod
    def accuracy(arrays: dict[str, np.ndarray], steps) -> list[float]:
        """The held-out accuracy the worker measured after each of ``steps``."""
        return step_accuracy(arrays, steps)


def open_models(spec, path: str, say) -> UserModels:
    """Describe ``spec``'s models and map the source's weights (check's first stages, in workers). ConfigError
    when the source cannot be built (nothing to start from)."""
    from gradparity.commands.check import describe_models

    d = describe_models(spec, say)
    if spec.source in d.failed or spec.source not in d.layouts:
        why = d.failed[spec.source].error if spec.source in d.failed else "it could not be described"
        raise ConfigError(f"{path}: the source model ({spec.source}) could not be built: {why}")
    trainable = tuple(p.name for p in d.layouts[spec.source].all_params() if p.trainable)
    assigns = {fw: d.assign(spec, fw) for fw in spec.frameworks if fw not in d.failed}
    failed = {fw: o.error or o.status for fw, o in d.failed.items()}
    return UserModels(spec, path, d.values, assigns, failed, trainable)
