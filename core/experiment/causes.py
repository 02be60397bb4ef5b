"""Known discrepancy causes as opt-in switches of an experiment (the ``[causes]`` table).

Each switch reproduces one way a user's own bookkeeping makes the methods
disagree, so that a run shows its signature and ``gradparity diagnose`` can
be checked against it:

- ``unzeroed_gradients``: the per-example loops (``none_loop``,
  ``one_by_one``) read the gradient accumulator after every example and
  never zero it, so example i is counted N - i times. Done natively in
  every backend (torch ``.grad``; the carried-over accumulator in Keras and
  JAX; the numpy reference's prefix sums).
- ``missing_normalization``: ``sum``'s gradient is taken as the mean (its
  1/N left out): N times the others.
- ``double_normalization``: ``mean``'s gradient divided by N again.
- ``short_last_batch = r``: the data holds the experiment's batch and a
  last batch of r further examples; the per-example methods divide their
  sums over both batches by the number of examples, ``sum`` / N and
  ``mean`` average the two batch means (the seed question's second answer).
- ``replicas = R``: the batch split over R data-parallel replicas
  (``numpy.array_split``: uneven when R does not divide N); each computes
  its method on its local batch and the all-reduce averages the R results,
  so a summed loss comes out R times smaller after the usual 1/N.
- ``micro_batches = k``: gradient accumulation over k micro-batches that
  adds the micro-batch results without dividing by k: a mean-reduced loss
  comes out k times larger. With ``accumulate = "mean"`` the results are
  averaged instead (as ``optax.MultiSteps`` and Keras'
  ``gradient_accumulation_steps`` do): right for equal micro-batches, but
  when k does not divide N the short micro-batch's examples weigh more in
  the mean of micro-batch means (the per-token form of this is the 2024
  transformers accumulation bug).
- ``class_weights = [w_0, ..., w_{C-1}]``: a class-weighted cross-entropy,
  each framework's own way: torch ``CrossEntropyLoss(weight=w)`` (its mean
  divides by sum_i w[y_i], and on one example the weight cancels), Keras
  ``sample_weight=w[y]`` (``sum_over_batch_size`` divides by N), optax losses
  times ``w[y]`` then ``jnp.mean`` (N); the numpy reference divides by N.
- ``autocast = "bfloat16" | "float16"``: a float32 run's forward and
  backward passes in reduced precision, the framework's own way
  (``torch.autocast``, Keras' ``mixed_bfloat16`` / ``mixed_float16`` layer
  policies, Flax layers with a bfloat16 compute dtype over float32
  parameters); the numpy reference stays float64. Pairs are then held to
  the narrower format's rounding.
- ``dropout = p``: dropout in training mode after every hidden activation.
  A forward pass of the batch (``none_loop``, ``sum``, ``mean``) draws one
  (N, H) keep-mask, shared by those methods as when the same seed is set
  before each; a forward pass of one example (``one_by_one``, and
  ``none_vectorized``, whose vmap runs one per example) draws its own row.
  The masks come from core ('dropout/batch/i', 'dropout/single/i', entries
  0 or 1/(1-p) in the experiment's dtype) and every backend multiplies by
  them: frameworks' random generators differ, so native dropout layers could
  not be compared with each other or with the reference.
- ``batchnorm = true``: batch normalization in training mode between every
  hidden Dense layer and its activation (parameters 'norms.i.scale|bias';
  epsilon ``BATCHNORM_EPSILON`` set explicitly in every framework, Keras'
  default is 1e-3). The framework's own layer normalizes with the statistics
  of the batch it sees: an example alone (``one_by_one``, and each vmapped
  example of ``none_vectorized``) has no variance, normalizes to the layer's
  shift, and passes no gradient to the layers before it; torch refuses a
  training-mode batch of one outright, which its report rows show.
- ``padding = p``: the batch's last p examples are padding, their targets the
  ignored class ``IGNORE_INDEX`` (-100), each framework's own way: torch
  ``CrossEntropyLoss(ignore_index=-100)``, Keras ``ignore_class=-100``, a
  mask in optax/numpy. Every mean is over the valid examples (the common
  convention becomes 1/V, V the valid count), and ``one_by_one`` feeds only
  valid examples (a padding example alone has no loss: 0/0). An example
  stands for a token: with ``micro_batches = k`` the micro-batches hold
  different numbers of valid tokens, and ``accumulate`` says how their
  results are combined: "mean" (a mean of micro-batch means, the 2024
  transformers accumulation bug), or "num_items" (every micro-batch's summed
  loss over the whole batch's valid count, the ``num_items_in_batch`` fix).

The parts (extra or sub-batches) run natively as cases 'METHOD@PART' in the
workers; core combines them (``rules``): a method's result is
sum_parts weight * native(part), written out in its factor label.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# SEPARATE_FORWARD: the methods with one forward pass per example, part of the backends' contract.
from gradparity.backends.protocol import IGNORE_INDEX, SEPARATE_FORWARD
from gradparity.experiment.methods import METHODS
from gradparity.experiment.models import BATCHNORM_EPSILON

#: Switches, in the order the report lists them.
SWITCHES = ("unzeroed_gradients", "missing_normalization", "double_normalization", "short_last_batch",
            "replicas", "micro_batches", "accumulate", "class_weights", "autocast", "dropout", "batchnorm",
            "padding")
#: The switches that put the model in training mode (layers whose output depends on the forward pass).
TRAIN_MODE_SWITCHES = ("dropout", "batchnorm")
#: How micro-batch results are combined: added (no 1/k), averaged, or weighted by their valid counts
#: (each micro-batch's summed loss divided by the whole batch's valid count: num_items_in_batch).
ACCUMULATE = ("sum", "mean", "num_items")
#: The reduced-precision formats ``autocast`` takes ("none": off).
AUTOCAST = ("none", "bfloat16", "float16")
#: The switches that need parts (extra or sub-batches); at most one per run.
PART_SWITCHES = ("short_last_batch", "replicas", "micro_batches")
#: The methods each switch changes (a run without any of them shows nothing).
AFFECTS = {
    "unzeroed_gradients": ("none_loop", "one_by_one"),
    "missing_normalization": ("sum",),
    "double_normalization": ("mean",),
    "short_last_batch": ("none_loop", "none_vectorized", "one_by_one", "sum", "mean"),
    "replicas": ("none_loop", "none_vectorized", "one_by_one", "sum"),
    "micro_batches": ("mean",),
    "accumulate": ("mean",),
    "class_weights": ("none_loop", "none_vectorized", "sum", "mean", "one_by_one"),
    "autocast": ("none_loop", "none_vectorized", "sum", "mean", "one_by_one"),
    "dropout": SEPARATE_FORWARD,
    "batchnorm": SEPARATE_FORWARD,
    "padding": ("none_loop", "none_vectorized", "sum", "mean", "one_by_one"),
}
#: The diagnose cause each switch produces.
CAUSE_IDS = {
    "unzeroed_gradients": "unzeroed_gradients", "missing_normalization": "missing_normalization",
    "double_normalization": "double_normalization", "short_last_batch": "short_last_batch",
    "replicas": "data_parallel_average", "micro_batches": "accumulation_normalization",
    "accumulate": "accumulation_normalization",
    "class_weights": "weighted_mean_mismatch",
    "autocast": "reduced_precision",
    "dropout": "dropout_train_mode",
    "batchnorm": "batchnorm_train_mode",
    "padding": "accumulation_normalization",
}
#: The diagnose causes no switch reproduces, and why: diagnose finds them in numbers made elsewhere.
DIAGNOSE_ONLY = {
    "clean": "no cause: every pair agrees within rounding",
    "unknown": "no known cause explains the numbers",
    "grad_not_zeroed_between_methods": "the methods of one run are computed apart, each from fresh gradients; "
                                       "the pattern is a user's script comparing methods in one accumulator",
    "port_difference": "gradparity run's models are built by gradparity in every framework; a port's layer "
                       "difference comes from `gradparity check` on a user's own models",
}


@dataclass(frozen=True)
class Causes:
    """The switches of one experiment; all off by default (integers: 0 is off)."""

    unzeroed_gradients: bool = False
    missing_normalization: bool = False
    double_normalization: bool = False
    short_last_batch: int = 0
    replicas: int = 0
    micro_batches: int = 0
    accumulate: str = "sum"
    class_weights: tuple[float, ...] = ()
    autocast: str = "none"
    dropout: float = 0.0
    batchnorm: bool = False
    padding: int = 0

    def on(self) -> list[str]:
        """The switches that are on, in SWITCHES order."""
        return [name for name in SWITCHES if _is_on(getattr(self, name), name)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_weights"] = list(self.class_weights)
        return d

    def describe(self) -> dict[str, str]:
        """What each switch that is on does, in words."""
        text = {
            "unzeroed_gradients": "none_loop and one_by_one read the gradient accumulator after every example "
                                  "without zeroing it (example i counted N - i times)",
            "missing_normalization": "sum's gradient is not divided by N",
            "double_normalization": "mean's gradient is divided by N again",
            "short_last_batch": f"a last batch of {self.short_last_batch} examples follows the batch; per-example "
                                "methods divide their sums over both by the number of examples, sum / N and mean "
                                "average the two batch means",
            "replicas": f"the batch is split over {self.replicas} data-parallel replicas whose results are "
                        "averaged (all-reduce mean)",
            "micro_batches": f"the batch is split into {self.micro_batches} micro-batches whose results are "
                             + {"sum": "added without dividing by their number",
                                "mean": "averaged (a mean of micro-batch means)",
                                "num_items": "weighted by their valid counts (summed losses over the batch's "
                                             "valid count: num_items_in_batch)"}[self.accumulate],
            "accumulate": "micro-batch results averaged, as optax.MultiSteps and Keras' "
                          "gradient_accumulation_steps do" if self.accumulate == "mean" else
                          "micro-batch results weighted by their valid counts, the num_items_in_batch fix",
            "class_weights": f"class-weighted cross-entropy, weights {list(self.class_weights)}, each "
                             "framework's own way (torch's mean divides by the sum of the weights of the "
                             "targets, Keras' sum_over_batch_size and jnp.mean by N)",
            "autocast": f"forward and backward passes in {self.autocast} (autocast / mixed-precision layers) over "
                        "float32 parameters; the numpy reference stays float64",
            "dropout": f"dropout (rate {self.dropout}) in training mode after every hidden activation; the "
                       "batch's forward pass shares one mask, each example's own forward pass "
                       "(one_by_one, none_vectorized) draws its own",
            "batchnorm": "batch normalization in training mode before every hidden activation (epsilon "
                         f"{BATCHNORM_EPSILON:g}); an example alone (one_by_one, none_vectorized) is normalized "
                         "by its own statistics: no variance, so its output is the layer's shift and the layers "
                         "before it get no gradient (torch refuses a training-mode batch of one outright)",
            "padding": f"the batch's last {self.padding} examples are padding (target {IGNORE_INDEX}, ignored by "
                       "each framework's loss); means are over the valid examples, one_by_one feeds valid ones",
        }
        return {name: text[name] for name in self.on()}


def _is_on(value, name: str) -> bool:
    if name == "autocast":
        return value != "none"
    if name == "class_weights":
        return bool(value)
    if name == "accumulate":
        return value != "sum"
    if name == "dropout":
        return value > 0
    return bool(value) if name not in ("replicas", "micro_batches") else value > 1


def check(causes: Causes, methods: tuple[str, ...], batch_size: int, dtype: str = "float32") -> list[str]:
    """Problems of a switch combination for these methods, batch size and dtype (empty when fine)."""
    problems = []
    if causes.autocast != "none" and dtype != "float32":
        problems.append(f"causes.autocast = {causes.autocast!r} runs a float32 model in reduced precision; "
                        f"the experiment's dtype is {dtype!r} (set dtype = \"float32\")")
    parts = [name for name in PART_SWITCHES if name in causes.on()]
    train = [name for name in TRAIN_MODE_SWITCHES if name in causes.on()]
    if train and (parts or causes.autocast != "none"):
        other = parts + (["autocast"] if causes.autocast != "none" else [])
        problems.append(f"causes: {', '.join(train)} (training mode) cannot be combined with "
                        f"{', '.join(other)} yet; turn one of them off")
    if causes.batchnorm and batch_size < 2:
        problems.append("causes.batchnorm needs a batch of at least 2 examples (a batch of one has no variance)")
    if len(parts) > 1:
        problems.append(f"causes: {', '.join(parts)} each split or extend the batch; turn on one at a time")
    for name in causes.on():
        if not set(AFFECTS[name]) & set(methods):
            problems.append(f"causes.{name} changes {', '.join(AFFECTS[name])}, and methods has none of them")
    if causes.padding:
        others = [name for name in causes.on() if name not in ("padding", "micro_batches", "accumulate")]
        if others:
            problems.append(f"causes.padding combines with micro_batches and accumulate only, not with "
                            f"{', '.join(others)}; turn them off")
        if causes.padding >= batch_size:
            problems.append(f"causes.padding = {causes.padding} leaves no valid example in the batch of {batch_size}")
        k = causes.micro_batches
        if k > 1 and k <= batch_size:
            valid = np.arange(batch_size) < batch_size - causes.padding
            empty = [i for i, part in enumerate(np.array_split(valid, k)) if not part.any()]
            if empty:
                problems.append(f"causes.padding = {causes.padding} leaves micro-batch {empty[0]} of {k} with no "
                                "valid example (its mean would be 0/0); pad fewer or split into fewer")
    if causes.accumulate == "num_items" and not causes.padding:
        problems.append("causes.accumulate = 'num_items' weighs micro-batches by their valid counts; set "
                        "causes.padding too (without padding it equals 'mean' on equal splits)")
    if causes.accumulate != "sum" and causes.micro_batches <= 1:
        problems.append(f"causes.accumulate = {causes.accumulate!r} says how micro-batches are combined; set "
                        "causes.micro_batches too")
    if parts and (causes.missing_normalization or causes.double_normalization):
        problems.append(f"causes: {parts[0]} changes how results are combined and normalized; turn "
                        "missing_normalization / double_normalization off with it")
    for name in ("replicas", "micro_batches"):
        k = getattr(causes, name)
        if k > batch_size:
            problems.append(f"causes.{name} = {k} is more than the batch's {batch_size} examples")
    return problems


def part_arrays(causes: Causes, x: np.ndarray, y: np.ndarray, extra_x: np.ndarray | None = None,
                extra_y: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The parts as batch arrays 'parts/NAME/x|y' (and 'parts/NAME/valid' with padding): the short last
    batch (given), or sub-batches of (x, y)."""
    if causes.short_last_batch:
        return {"parts/last/x": extra_x, "parts/last/y": extra_y}
    k = causes.replicas if causes.replicas > 1 else causes.micro_batches if causes.micro_batches > 1 else 0
    out = {}
    for i, (xs, ys) in enumerate(zip(np.array_split(x, k), np.array_split(y, k)) if k else ()):
        out[f"parts/p{i}/x"], out[f"parts/p{i}/y"] = xs, ys
    if causes.padding:
        valid = valid_mask(causes, len(y))
        out["valid"] = valid
        for i, vs in enumerate(np.array_split(valid, k) if k else ()):
            out[f"parts/p{i}/valid"] = vs
    return out


def valid_mask(causes: Causes, n: int) -> np.ndarray:
    """The switch 'padding': 1 for the batch's valid examples, 0 for its last ``causes.padding`` (int8)."""
    return (np.arange(n) < n - causes.padding).astype(np.int8)


def valid_count(batch: dict[str, np.ndarray], part: str | None = None) -> int:
    """The valid (non-padding) examples of the batch or of a part."""
    key = "valid" if part is None else f"parts/{part}/valid"
    if key in batch:
        return int(batch[key].sum())
    return int(batch["y" if part is None else f"parts/{part}/y"].shape[0])


def part_sizes(batch: dict[str, np.ndarray]) -> dict[str, int]:
    """Part name -> its number of examples, from the batch arrays."""
    return {k.split("/")[1]: int(v.shape[0]) for k, v in batch.items() if k.startswith("parts/") and
            k.endswith("/y")}


@dataclass(frozen=True)
class Rule:
    """How a method's result is made from native cases: sum of weight * native(case), and its label."""

    terms: tuple[tuple[str, float], ...]
    label: str

    @property
    def factor(self) -> float | None:
        """The single factor when the rule has one term (the usual normalization), else None."""
        return self.terms[0][1] if len(self.terms) == 1 else None


def cases(methods: tuple[str, ...], batch: dict[str, np.ndarray], causes: Causes) -> tuple[str, ...]:
    """The cases a worker runs: each method on the batch, and on every part when a part switch is on."""
    sizes = part_sizes(batch)
    if causes.short_last_batch:
        return tuple(c for m in methods for c in (m, f"{m}@last"))
    if sizes:
        return tuple(f"{m}@{p}" for m in methods for p in sizes)
    return tuple(methods)


def rules(methods: tuple[str, ...], n: int, batch: dict[str, np.ndarray], causes: Causes,
          terms: int = 1) -> dict[str, Rule]:
    """Per method, how its normalized (mean-convention) result is made from the native cases.

    ``n`` is the batch's number of examples; with 'padding' the mean is over the valid ones, counted from
    ``batch['valid']``. ``terms``: loss terms per example (T tokens of a sequence model): the mean is over
    n * terms of them, so sums divide by that, and one_by_one, adding n per-example means, by n.
    """
    sizes = part_sizes(batch)
    # Means are over the valid examples (all of them unless 'padding' marks some).
    n = valid_count(batch) if "valid" in batch else n
    out = {}
    for name in methods:
        sums = METHODS[name].sums_examples
        # A summed result adds every loss term (T per example of a sequence); one_by_one adds per-example means.
        t = terms if sums and name != "one_by_one" else 1
        per = f" x {t} tokens" if t > 1 else ""
        if causes.short_last_batch:
            r = sizes["last"]
            m = n + r
            if name in ("sum", "mean"):
                w0, w1 = (1 / (2 * n * t), 1 / (2 * r * t)) if sums else (0.5, 0.5)
                label = (f"mean of 2 batch means ({'sum/N' + per + ' per batch' if sums else 'mean per batch'}; "
                         f"N = {n}, {r})")
            else:
                w0 = w1 = 1 / (m * t)
                label = f"1/{m * t} (sum over both batches / examples{per})"
            out[name] = Rule(((name, w0), (f"{name}@last", w1)), label)
        elif sizes and causes.replicas > 1:
            k = causes.replicas
            w = 1 / (k * n * t) if sums else 1 / k
            out[name] = Rule(tuple((f"{name}@{p}", w) for p in sizes),
                             f"all-reduce mean over {k} replicas" + (f", then 1/{n * t}" if sums else ""))
        elif sizes and causes.micro_batches > 1:
            k = causes.micro_batches
            if sums:
                out[name] = Rule(tuple((f"{name}@{p}", 1 / (n * t)) for p in sizes),
                                 f"{k} micro-batch results added, then 1/{n * t}")
            elif causes.accumulate == "num_items":
                # mean_p = S_p / v_p natively; S_p / V is the num_items_in_batch fix.
                counts = {p: valid_count(batch, p) for p in sizes}
                out[name] = Rule(tuple((f"{name}@{p}", counts[p] / n) for p in sizes),
                                 f"{k} micro-batch means weighted by valid counts "
                                 f"{'/'.join(map(str, counts.values()))} of {n} (num_items_in_batch)")
            elif causes.accumulate == "mean":
                out[name] = Rule(tuple((f"{name}@{p}", 1 / k) for p in sizes), f"{k} micro-batch results averaged")
            else:
                out[name] = Rule(tuple((f"{name}@{p}", 1.0) for p in sizes),
                                 f"{k} micro-batch results added (no 1/k)")
        else:
            factor, label = METHODS[name].normalization_factor(n), METHODS[name].factor_label(n)
            if sums and terms > 1 and name != "one_by_one":
                factor, label = 1.0 / (n * terms), f"1/{n * terms} ({n} examples x {terms} tokens)"
            if name == "sum" and causes.missing_normalization:
                factor, label = 1.0, "1 (switch missing_normalization: 1/N left out)"
            if name == "mean" and causes.double_normalization:
                factor, label = 1.0 / n, f"1/{n} (switch double_normalization)"
            out[name] = Rule(((name, factor),), label)
    return out


def dropout_masks(causes: Causes, hidden: tuple[int, ...], n: int, rng: np.random.Generator,
                  dtype: str) -> dict[str, np.ndarray]:
    """The switch 'dropout': scaled keep-masks 'dropout/batch/i' and 'dropout/single/i', each (n, hidden[i]).

    Entries are 0 (dropped, probability p) or 1/(1-p) (inverted dropout, as every framework scales),
    in ``dtype``; empty when dropout is off.
    """
    p = causes.dropout
    if not p:
        return {}
    out = {}
    for kind in ("batch", "single"):
        for i, width in enumerate(hidden):
            keep = rng.random((n, width)) >= p
            out[f"dropout/{kind}/{i}"] = np.where(keep, 1.0 / (1.0 - p), 0.0).astype(dtype)
    return out


def job_switches(causes: Causes) -> dict:
    """The switches a backend reproduces natively (the rest are combined in core)."""
    out = {}
    if causes.unzeroed_gradients:
        out["unzeroed_gradients"] = True
    if causes.autocast != "none":
        out["autocast"] = causes.autocast
    if causes.class_weights:
        out["class_weights"] = list(causes.class_weights)
    if causes.dropout:
        out["dropout"] = causes.dropout
    return out
