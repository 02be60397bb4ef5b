"""Canonical inputs: the parameters and the batch, generated once and shared by every backend.

Everything here is numpy and deterministic in the experiment's seed. The
data is validated before any backend starts: a NaN, a label out of range or
a shape that does not fit is a ConfigError (exit code 2), never a number
silently computed from garbage.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradparity.errors import ConfigError
from gradparity.experiment.causes import dropout_masks, part_arrays
from gradparity.experiment.models import CNN, MLP, Model, Sequence
from gradparity.experiment.spec import DataSpec, Experiment, ModelSpec

#: Biases are drawn from U(-BIAS_RANGE, BIAS_RANGE), not zeros, so that a
#: backend that fails to load the biases cannot agree by accident.
BIAS_RANGE = 0.1


@dataclass(frozen=True)
class CanonicalInputs:
    """The initial parameters and the batch, in the experiment's dtype."""

    model: Model
    params: dict[str, np.ndarray] = field(repr=False)
    batch: dict[str, np.ndarray] = field(repr=False)
    data_description: str

    @property
    def n_examples(self) -> int:
        return int(self.batch["y"].shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """Flat ``params/NAME`` and ``batch/NAME`` arrays, as saved in inputs.npz."""
        out = {f"params/{k}": v for k, v in self.params.items()}
        out.update({f"batch/{k}": v for k, v in self.batch.items()})
        return out

    def checksums(self) -> dict[str, str]:
        """SHA-256 (first 16 hex digits) of each array's bytes, for rechecking a report."""
        return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:16]
                for k, v in self.arrays().items()}


def seeded_rng(seed: int, stream: int) -> np.random.Generator:
    # Independent streams: changing the data does not change the parameters.
    return np.random.default_rng([seed, stream])


def digits_dataset() -> tuple[np.ndarray, np.ndarray, str]:
    from sklearn.datasets import load_digits  # data ships inside scikit-learn: no download

    d = load_digits()
    return d.data / 16.0, d.target.astype(np.int64), "scikit-learn digits (8x8 pixels / 16)"


def _synthetic(spec: DataSpec, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    check_size(f"synthetic data of {spec.num_examples:,} x {spec.num_features:,} float64 values",
               8.0 * spec.num_examples * (spec.num_features + 1))
    rng = seeded_rng(seed, 2)
    x = rng.standard_normal((spec.num_examples, spec.num_features))
    y = rng.integers(0, spec.num_classes, spec.num_examples)
    # Every class present when there is room, so the output layer is fully exercised.
    if spec.num_examples >= spec.num_classes:
        y[: spec.num_classes] = np.arange(spec.num_classes)
    return x, y.astype(np.int64), (f"synthetic N(0,1) features, uniform labels "
                                   f"({spec.num_examples}x{spec.num_features}, {spec.num_classes} classes)")


def _load_npz(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, str]:
    """Read ``x_key`` and ``y_key`` from an .npz (never unpickling); any unreadable file is a ConfigError."""
    from gradparity.experiment.files import read_npz

    path = Path(spec.path)
    arrays = read_npz(path, "data.path", (spec.x_key, spec.y_key),
                      hint=f"save it with np.savez(path, {spec.x_key}=..., {spec.y_key}=...), "
                           "or set data.x_key / data.y_key")
    return arrays[spec.x_key], arrays[spec.y_key], f"npz file {path.name} ({spec.x_key!r}, {spec.y_key!r})"


def check_data(x: np.ndarray, y: np.ndarray, num_classes: int | None, images: bool = False) -> tuple[int, bool]:
    """Validate a whole dataset; return (number of classes, whether it was inferred from the labels).

    ``images``: inputs are (examples, height, width, channels), for the CNN; else (examples, features).
    Raises ConfigError listing every problem: shapes, dtypes, NaN/inf, empty
    data, labels out of range.
    """
    problems = []
    ndim = 4 if images else 2
    if x.ndim != ndim:
        problems.append(f"inputs must be {ndim}-D " + ("(examples, height, width, channels), channels last,"
                                                        if images else "(examples, features),")
                        + f" got shape {x.shape}")
    elif 0 in x.shape[1:]:
        problems.append(f"inputs have no features (shape {x.shape}): the model needs at least one")
    if y.ndim != 1:
        problems.append(f"labels must be 1-D (examples,), got shape {y.shape}")
    if x.ndim >= 1 and y.ndim >= 1 and x.shape[0] != y.shape[0]:
        problems.append(f"inputs have {x.shape[0]} examples but labels have {y.shape[0]}")
    elif (x.ndim >= 1 and x.shape[0] == 0) or (y.ndim >= 1 and y.shape[0] == 0):
        problems.append("the data has no examples")
    numeric = np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
    if not numeric:
        problems.append(f"inputs must be real numbers, got dtype {x.dtype}")
    elif x.ndim == ndim and x.size and not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))
        problems.append(f"inputs contain {len(bad)} NaN/inf value(s), first at example {bad[0][0]}")
    inferred = num_classes is None
    if not np.issubdtype(y.dtype, np.integer):
        problems.append(f"labels must be integer class indices, got dtype {y.dtype}")
    elif y.ndim == 1 and y.size:
        lo, hi = int(y.min()), int(y.max())
        if num_classes is None:
            num_classes = max(hi + 1, 0)
        if lo < 0 or hi >= num_classes:
            bad = int(np.argmax((y < 0) | (y >= num_classes)))
            problems.append(f"labels must lie in [0, {num_classes}), found {int(y[bad])} at example {bad}")
        elif num_classes < 2:
            problems.append(f"cross-entropy needs at least 2 classes, the labels give {num_classes}")
    if problems:
        raise ConfigError(problems)
    return int(num_classes), inferred


def memory_limit_bytes() -> int:
    """Memory this process may use: physical memory, or the cgroup's limit where that is lower."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            limit = min(limit, int(text))
    except OSError:
        pass
    return limit


def _gib(n_bytes: float) -> str:
    gib = n_bytes / 2 ** 30
    return f"{gib:,.0f} GiB" if gib >= 100 else f"{gib:.3g} GiB"


def check_size(what: str, n_bytes: float) -> None:
    """Reject work whose arrays alone would take more than half of this machine's memory.

    A clear exit 2 before anything is allocated beats a MemoryError or an
    out-of-memory kill halfway through.
    """
    budget = memory_limit_bytes() / 2
    if n_bytes > budget:
        raise ConfigError(f"{what} needs about {_gib(n_bytes)}, more than half of this machine's "
                          f"{_gib(2 * budget)} of memory; use a smaller problem")


def check_problem_size(model: Model, n_batch: int, num_classes_inferred: bool, max_label: int | None) -> None:
    """The largest arrays a run holds: N per-example gradients of every parameter, in float64.

    The reference (and the tolerance's term scale) and the vectorized methods
    materialize them, so N·P·8 bytes, twice over for temporaries, bound the run.
    """
    p = model.num_params()
    what = f"{model.describe()} ({p:,} parameters) on a batch of {n_batch}"
    if num_classes_inferred and max_label is not None:
        what += (f", with {model.num_classes:,} classes inferred from the largest label {max_label:,} "
                 "(labels must be class indices 0..C-1; set data.num_classes if that is intended)")
    check_size(what, 2.0 * 8.0 * n_batch * p + 8.0 * n_batch * model.loss_terms() * sum(model.widths()))


def init_params(model: Model, seed: int, dtype: str) -> dict[str, np.ndarray]:
    """Glorot-uniform kernels, U(-1, 1) embeddings, scales near 1 and small uniform biases, drawn in float64
    then cast to ``dtype``."""
    rng = seeded_rng(seed, 0)
    params = {}
    for name, shape in model.param_shapes().items():
        if name.endswith(".kernel"):
            # Glorot: a conv kernel's fans count its window (fan_in = kh*kw*c_in, fan_out = kh*kw*c_out).
            window = int(np.prod(shape[:-2]))
            limit = np.sqrt(6.0 / (window * (shape[-2] + shape[-1])))
            params[name] = rng.uniform(-limit, limit, shape).astype(dtype)
        elif name.endswith(".embedding"):
            params[name] = rng.uniform(-1.0, 1.0, shape).astype(dtype)
        elif name.endswith(".scale"):
            # Not all ones: a scale of exactly 1 would hide a scale applied twice or not at all.
            params[name] = (1.0 + rng.uniform(-0.25, 0.25, shape)).astype(dtype)
        else:
            params[name] = rng.uniform(-BIAS_RANGE, BIAS_RANGE, shape).astype(dtype)
    return params


def build_inputs(exp: Experiment) -> CanonicalInputs:
    """Load and check the data, pick the batch, build the model and its initial parameters."""
    spec = exp.data
    if exp.model.kind == "sequence":
        return _sequence_inputs(exp)
    if spec.source == "digits":
        x, y, desc = digits_dataset()
        if exp.model.kind == "cnn":
            x, desc = x.reshape(-1, 8, 8, 1), desc + " as 8x8x1 images"
    elif spec.source == "synthetic":
        x, y, desc = _synthetic(spec, exp.seed)
    else:
        x, y, desc = _load_npz(spec)
    x, y = np.asarray(x), np.asarray(y)
    num_classes, inferred = check_data(x, y, spec.num_classes, images=exp.model.kind == "cnn")

    n = x.shape[0]
    start, stop = spec.batch_index * spec.batch_size, (spec.batch_index + 1) * spec.batch_size
    last = exp.causes.short_last_batch
    if stop + last > n:
        need = f"{stop + last} examples" + (f" ({stop} up to the batch, {last} for causes.short_last_batch)"
                                             if last else "")
        raise ConfigError(
            f"data.batch_size = {spec.batch_size} with data.batch_index = {spec.batch_index} needs "
            f"{need}, but the data has {n}")
    weights = exp.causes.class_weights
    if weights and len(weights) != num_classes:
        raise ConfigError(f"causes.class_weights has {len(weights)} weights for {num_classes} classes")
    if exp.model.kind == "cnn":
        model = cnn_model(exp.model, x.shape[1:], num_classes)
    else:
        model = MLP((x.shape[1], *exp.model.hidden, num_classes), exp.model.activation, exp.causes.batchnorm)
    check_problem_size(model, spec.batch_size, inferred, int(y.max()))

    order = seeded_rng(exp.seed, 1).permutation(n) if spec.shuffle else np.arange(n)
    xb, yb = _rows(x, y, order[start:stop], exp.dtype)
    extra = _rows(x, y, order[stop:stop + last], exp.dtype) if last else (None, None)

    params = init_params(model, exp.seed, exp.dtype)
    desc += f", batch {spec.batch_index} of size {spec.batch_size}" + (" (seeded shuffle)" if spec.shuffle else "")
    if last:
        desc += f", then a short last batch of the next {last} examples (causes.short_last_batch)"
    batch = {"x": xb, "y": yb, **part_arrays(exp.causes, xb, yb, *extra)}
    if isinstance(model, MLP):  # dropout acts on the MLP's hidden layers (spec refuses it for another model)
        batch.update(dropout_masks(exp.causes, model.hidden, len(yb), seeded_rng(exp.seed, 3), exp.dtype))
    return CanonicalInputs(model, params, batch, desc)


def cnn_model(spec: ModelSpec, image: tuple[int, ...], num_classes: int) -> CNN:
    """The CNN for images of shape ``image`` (H, W, C); ConfigError when its convolutions and pooling leave
    no pixel."""
    model = CNN(tuple(int(v) for v in image), spec.channels, spec.strides, spec.kernel_size, spec.activation,
                num_classes, spec.options)
    sizes = model.feature_sizes()
    if min(min(hw) for hw in sizes) < 1:
        steps = " -> ".join(f"{h}x{w}" for h, w in [tuple(image[:2]), *sizes])
        raise ConfigError(f"images of {image[0]}x{image[1]} are too small for model.kernel_size = "
                          f"{spec.kernel_size}, strides {list(spec.strides)}, padding {spec.options.padding!r} and "
                          f"the 2x2 pooling: {steps}")
    return model


def token_sequences(n: int, seq_len: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sequences of ``seq_len + 1`` token ids with a rule to learn: each steps by its own stride
    (1..3) modulo ``vocab``, with one token in ten replaced by noise."""
    start = rng.integers(0, vocab, (n, 1))
    stride = rng.integers(1, 4, (n, 1))
    seq = (start + stride * np.arange(seq_len + 1)) % vocab
    noise = rng.random(seq.shape) < 0.1
    return np.where(noise, rng.integers(0, vocab, seq.shape), seq).astype(np.int64)


def _sequence_inputs(exp: Experiment) -> CanonicalInputs:
    """Token data (``data.source = 'tokens'``) for the sequence model: inputs are a sequence's first T ids,
    targets the next T (next-token prediction)."""
    spec, m = exp.data, exp.model
    model = Sequence(m.vocab, m.seq_len, m.width, m.heads, m.mlp_width, m.options)
    n = spec.num_examples
    start, stop = spec.batch_index * spec.batch_size, (spec.batch_index + 1) * spec.batch_size
    last = exp.causes.short_last_batch
    if stop + last > n:
        need = f"{stop + last} sequences" + (f" ({stop} up to the batch, {last} for causes.short_last_batch)"
                                              if last else "")
        raise ConfigError(f"data.batch_size = {spec.batch_size} with data.batch_index = {spec.batch_index} needs "
                          f"{need}, but data.num_examples = {n}")

    check_size(f"{n:,} token sequences of {m.seq_len + 1}", 8.0 * n * (m.seq_len + 1))
    check_problem_size(model, spec.batch_size, False, None)
    seq = token_sequences(n, m.seq_len, m.vocab, seeded_rng(exp.seed, 2))
    order = seeded_rng(exp.seed, 1).permutation(n) if spec.shuffle else np.arange(n)
    rows, extra = seq[order[start:stop]], seq[order[stop:stop + last]]
    desc = (f"synthetic token sequences ({n} of length {m.seq_len}, vocabulary {m.vocab}: stride 1-3 modulo "
            f"the vocabulary, 10% noise; targets the next token), batch {spec.batch_index} of size "
            f"{spec.batch_size}" + (" (seeded shuffle)" if spec.shuffle else ""))
    if last:
        desc += f", then a short last batch of the next {last} sequences (causes.short_last_batch)"
    x, y = rows[:, :-1].copy(), rows[:, 1:].copy()
    parts = part_arrays(exp.causes, x, y, extra[:, :-1].copy(), extra[:, 1:].copy()) if last else \
        part_arrays(exp.causes, x, y)
    return CanonicalInputs(model, init_params(model, exp.seed, exp.dtype), {"x": x, "y": y, **parts}, desc)


def _rows(x: np.ndarray, y: np.ndarray, rows: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The examples ``rows`` in ``dtype`` (labels int64); ConfigError when a value overflows ``dtype``."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, not warned about
        xb = x[rows].astype(dtype)
    if not np.all(np.isfinite(xb)):
        big = float(np.max(np.abs(x[rows][~np.isfinite(xb)])))
        raise ConfigError(f"inputs overflow {dtype}: a value of magnitude {big:.3g} in the batch is "
                          f"larger than {dtype} can represent ({np.finfo(dtype).max:.3g})")
    return xb, y[rows].astype(np.int64)
