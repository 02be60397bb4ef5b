"""`gradparity train --sweep`: batch size x learning-rate rule x framework, and the learning rate to use.

The blog's recipe is mean reduction with ``lr = B * lr0 / B0``; the forum's claim is that Adam absorbs the
constant factor between sum and mean. The sweep measures both on real training runs: from the tuned point
(B0, lr0), each batch size B is trained for the same number of epochs under each rule, in every framework
(one worker per framework runs all of its configurations), from the same start on the same data order:

- SGD and momentum: ``mean`` at lr0 (no scaling), ``mean_linear`` at lr0 * B / B0 (the blog's rule), ``sum``
  at lr0 / B0 (the summed loss: the per-example step stays lr0 / B0 whatever B is, linear scaling built in);
- Adam: ``mean`` at lr0, ``mean_sqrt`` at lr0 * sqrt(B / B0), ``mean_linear`` at lr0 * B / B0, and ``sum`` at
  lr0 (Adam is invariant to the loss's scale up to epsilon).

Held-out accuracy is measured after every epoch from each framework's own parameters (one float64 numpy
forward pass for all), and the frameworks' final parameters are compared with each other. The recipe: per
rule and batch size, the accuracy reached and how far it is from B0's; the rule to use at each B is the best
measured one, and the linear rule "holds" up to the largest B where it stays within ``HOLDS`` of B0.

Three options extend it (each off by default, so the default sweep is the one above):

- ``class_weights`` ("balanced" | "skewed"): every example carries the weight of its class, w_i = c[y_i]
  (``class_weights``; both scaled so that the training split's mean example weight is 1). "balanced" is
  n / (K n_k) from the training split (the digits are nearly balanced: the weights stay within a few percent
  of 1); "skewed" gives the classes, in a seeded order, weights from 1/SKEW to SKEW in geometric steps, so
  that batches differ in their total weight. The rules then reduce with the weights, each framework natively
  (``protocol.TRAIN_REDUCTIONS``): ``mean*`` by the weighted mean sum(w l) / sum(w) (torch
  ``CrossEntropyLoss(weight=...)``, Keras "mean_with_sample_weight"), ``sum`` by sum(w l), and ``sobs*``
  (same scalings as ``mean*``) by Keras' "sum_over_batch_size" sum(w l) / N. A ``sobs`` step is the weighted
  mean's step times sum(w) / N of its batch; the report measures that factor on the batches.
- ``last_batch`` ("keep"): every epoch ends with the short batch of the n mod B examples left over (at the
  same lr as the others); the same rules are also run with it dropped, on the same data order, and the
  report gives, per rule, how much an example of the short batch weighs against one of a full batch (lr
  times its factor in the reduced loss, per unit of sample weight, from the batches) and the difference
  keep - drop in held-out accuracy and final parameters.
- ``lr_grid`` (multipliers, e.g. 0.25, 0.5, 1, 2, 4): every rule is also run at its learning rate times each
  multiplier (runs with the same batches, reduction and lr are trained once); the report gives, per batch
  size and reduction, the best measured lr and its accuracy against each rule's prediction, and where linear
  scaling stops holding (its accuracy more than ``HOLDS`` below the grid's best).

report.json stays schema "gradparity.train.sweep/1": the keys of the default sweep keep their meaning ("cells"
are the main configurations, one per framework, batch size and rule: multiplier 1 and the chosen last-batch
mode; "reduction" takes the weighted names with ``class_weights``), and these keys were added: top-level
"class_weights", "last_batch", "lr_grid" (the multipliers or null), "weights" (null, or the per-class weights
and per batch size the spread of sum(w) / N over the steps), "last_batch_effect" (null, or per batch size and
rule: b_last, the short batch's per-example weight over a full batch's, accuracies and parameter distance
keep vs drop), "grid" (null, or every measured (B, reduction, lr) point, the best per B and reduction with the
rules' predictions, and where linear scaling holds), "extra_cells" (the grid's and the dropped-last-batch
runs, each with "role", "multiplier" and "last_batch"), per cell "role", "multiplier", "last_batch" and "seed",
"seeds" (the seeds run) and "accuracy_by_seed" (per batch size and rule, each seed's accuracy, mean over the
frameworks, and their standard deviation, null with one seed). With several seeds (``seeds``) every
accuracy is the mean over frameworks and seeds, and the recipe states the seed-to-seed spread.
"""
from __future__ import annotations

import itertools
import math
import os
import signal
import time
from dataclasses import dataclass, field, replace

import numpy as np

from gradparity.backends import BACKENDS, make_job
from gradparity.backends.protocol import WorkerJob, builtin_payload, step_losses, step_params
from gradparity.commands.train import (DEFAULT_LR, HELD_OUT, TrainSpec, check_spec, held_out_accuracy,
                                       split_digits)
from gradparity.commands.user_models import is_check_config, open_models, read_models
from gradparity.compare.trajectories import relative_distance
from gradparity.errors import ConfigError, Interrupted
from gradparity.experiment.inputs import seeded_rng, init_params
from gradparity.experiment.models import MLP
from gradparity.reference.train import loss_scale
from gradparity.run.runner import WorkerRun, run_jobs

B0 = 32
#: The linear rule "holds" at B while its held-out accuracy is within this of B0's (accuracy, fraction).
HOLDS = 0.01
CLASS_WEIGHTS = ("none", "balanced", "skewed")
LAST_BATCH = ("drop", "keep")
#: At most this many seeds (the sweep runs once per seed).
MAX_SEEDS = 10
#: The "skewed" class weights run from 1/SKEW to SKEW (before scaling the mean example weight to 1).
SKEW = 4.0
#: ``--lr-grid`` without a value: small, so a grid sweep stays within a few minutes on two CPU cores.
DEFAULT_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
#: At most this many multipliers (every one is a full set of training runs per framework).
MAX_GRID = 9
CLASSES = 10


def rules(optimizer: str, weighted: bool = False) -> dict[str, callable]:
    """Rule name -> (lr0, B) -> (reduction, lr). Weighted: ``mean*`` reduce by the weighted mean, ``sum`` by the
    weighted sum, and ``sobs*`` (the mean's scalings) by Keras' sum_over_batch_size."""
    adam = optimizer in ("adam", "adamw")
    scalings = {"": lambda b: 1.0, "_sqrt": lambda b: math.sqrt(b / B0), "_linear": lambda b: b / B0}
    if not adam:
        del scalings["_sqrt"]

    def scaled(reduction, scale):
        return lambda lr0, b: (reduction, lr0 * scale(b))

    out = {f"mean{k}": scaled("weighted_mean" if weighted else "mean", s) for k, s in scalings.items()}
    out["sum"] = scaled("sum", (lambda b: 1.0) if adam else (lambda b: 1.0 / B0))
    if weighted:
        out.update({f"sobs{k}": scaled("sum_over_batch_size", s) for k, s in scalings.items()})
    return out


@dataclass(frozen=True)
class SweepSpec:
    base: TrainSpec
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128)
    epochs: int = 3
    class_weights: str = "none"          # none | balanced | skewed
    last_batch: str = "drop"             # drop | keep (keep: the drop runs too, for comparison)
    lr_grid: tuple[float, ...] = ()      # multipliers of every rule's lr; () = off
    #: Several seeds (each its own parameters, held-out split, data order and skewed weights; the whole sweep
    #: once per seed); () = the base spec's seed alone.
    seeds: tuple[int, ...] = ()
    #: Framework workers at once: None = where cores allow (``concurrent_workers``); the benchmark runs 1, so
    #: that no worker's timing shares the cores with another's.
    parallel: int | None = None
    #: ``--model CHECK.toml``: the check config's models, described and mapped (``user_models.open_models``;
    #: ``run_sweep`` opens them when None).
    models: object = field(default=None, repr=False, compare=False)

    @property
    def weighted(self) -> bool:
        return self.class_weights != "none"

    def rules(self) -> dict[str, callable]:
        return rules(self.base.optimizer, self.weighted)


def check_sweep(spec: SweepSpec) -> None:
    """Every problem of the sweep's spec as one ConfigError (exit 2), before any worker starts or any output
    folder is claimed."""
    check_spec(spec.base)
    problems = []
    if spec.base.optimizer_text:
        problems.append("the sweep takes a named optimizer (sgd, momentum, nesterov, adam, adamw), not an optimizer "
                        "text: its learning-rate rules are per optimizer family")
    if not spec.batch_sizes or any(not 1 <= b <= 512 for b in spec.batch_sizes) or not 1 <= spec.epochs <= 50:
        problems.append(f"batch sizes must be in 1..512 and epochs in 1..50, got {list(spec.batch_sizes)} and "
                        f"{spec.epochs}")
    if spec.class_weights not in CLASS_WEIGHTS:
        problems.append(f"class weights {spec.class_weights!r} is not one of {', '.join(CLASS_WEIGHTS)}")
    if spec.last_batch not in LAST_BATCH:
        problems.append(f"last batch {spec.last_batch!r} is not one of {', '.join(LAST_BATCH)}")
    bad = [m for m in spec.lr_grid if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0)]
    if bad:
        problems.append(f"lr grid multipliers must be positive numbers, got {bad}")
    elif len(set(spec.lr_grid)) != len(spec.lr_grid) or len(spec.lr_grid) > MAX_GRID:
        problems.append(f"lr grid: at most {MAX_GRID} distinct multipliers, got {list(spec.lr_grid)}")
    if is_check_config(spec.base.model):
        if spec.weighted:
            problems.append("--class-weights with --model CHECK.toml: the class weights are drawn for the digits' "
                            "ten classes; train a check config's models without them")
        user = read_models(spec.base.model, spec.base.data)
        n = int(round(len(user.y) * (1 - HELD_OUT)))
        big = [b for b in spec.batch_sizes if b > n]
        if big:
            problems.append(f"batch sizes {big} are larger than the {n} training examples of {spec.base.model}'s "
                            f"data ({len(user.y)} examples, {HELD_OUT:.0%} held out); give more examples with "
                            "--data FILE.npz or smaller --batch-sizes")
    if spec.seeds and (len(set(spec.seeds)) != len(spec.seeds) or len(spec.seeds) > MAX_SEEDS
                       or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in spec.seeds)):
        problems.append(f"seeds: at most {MAX_SEEDS} distinct non-negative integers, got {list(spec.seeds)}")
    if problems:
        raise ConfigError(problems)


def class_weights(y: np.ndarray, scheme: str, seed: int) -> np.ndarray | None:
    """Per-class weights (float64, one per class) for ``scheme``, scaled so that the mean weight of the
    examples ``y`` (the training split) is 1; None for "none"."""
    if scheme == "none":
        return None
    counts = np.bincount(y, minlength=CLASSES).astype(np.float64)
    if scheme == "balanced":
        c = len(y) / (CLASSES * np.maximum(counts, 1.0))
    else:
        ranks = seeded_rng(seed, 5).permutation(CLASSES)
        c = SKEW ** (2.0 * ranks / (CLASSES - 1) - 1.0)
    return c * len(y) / float(counts @ c)


@dataclass
class Sequence:
    """One batch sequence of the sweep (a batch size and a last-batch mode): per step its size and, with class
    weights, its per-example weights (as the workers get them, in the job's dtype); the steps ending epochs."""

    batch_size: int
    last_batch: str
    sizes: list[int]
    ends: list[int]
    weights: list[np.ndarray] | None = field(default=None, repr=False)

    @property
    def prefix(self) -> str:
        return f"b{self.batch_size}{'k' if self.last_batch == 'keep' else ''}/"

    def example_factors(self, reduction: str, lr: float) -> list[np.ndarray]:
        """Per step, what each example's loss gradient is multiplied by in the update: lr times its factor in the
        reduced loss (``loss_scale``), per unit of its sample weight (so that the reduction's share shows, not
        the class weight). Read off the batches as the workers get them."""
        out = []
        for t, n in enumerate(self.sizes):
            w = None if self.weights is None else self.weights[t]
            unit = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
            out.append(lr * loss_scale(reduction, n, w) / unit)
        return out

    def weight_ratios(self) -> np.ndarray | None:
        """sum(w) / N of every step: how much larger a sum_over_batch_size step is than the weighted mean's."""
        if self.weights is None:
            return None
        return np.array([float(np.sum(w, dtype=np.float64)) / len(w) for w in self.weights])


def _epoch_batches(x, y, b: int, epochs: int, seed: int, dtype: str, keep: bool = False):
    """The training split in ``epochs`` seeded shuffles, cut into batches of ``b``; the last short batch of an
    epoch (n mod b examples) dropped, as drop_last does, or with ``keep`` its own step at the end of the epoch.
    The shuffles do not depend on ``keep``: the kept sequence is the dropped one plus the short batches. Also the
    steps that end an epoch."""
    rng = seeded_rng(seed, 1)
    batches, ends = [], []
    for _ in range(epochs):
        order = rng.permutation(len(y))
        stops = list(range(b, len(y) + 1, b)) + ([len(y)] if keep and len(y) % b else [])
        for start, stop in zip([0, *stops[:-1]], stops):
            rows = order[start:stop]
            batches.append((x[rows].astype(dtype), y[rows]))
        ends.append(len(batches))
    return batches, ends


def build_sequence(x, y, b: int, epochs: int, seed: int, dtype: str, last_batch: str = "drop",
                   weights_per_class: np.ndarray | None = None) -> tuple[Sequence, list]:
    """A batch sequence (``_epoch_batches``) with its per-example weights w = c[y] in ``dtype`` when there are
    class weights; and its (x, y) batches."""
    batches, ends = _epoch_batches(x, y, b, epochs, seed, dtype, keep=last_batch == "keep")
    seq = Sequence(b, last_batch, [len(by) for _, by in batches], ends)
    if weights_per_class is not None:
        seq.weights = [weights_per_class[by].astype(dtype) for _, by in batches]
    return seq, batches


def job_arrays(seq: Sequence, batches: list) -> dict[str, np.ndarray]:
    """A sequence's entries of a train job's ``batch``: ``PREFIX + "batches/T/x" | "/y" | "/w"``."""
    out = {}
    for t, (bx, by) in enumerate(batches, start=1):
        out[f"{seq.prefix}batches/{t}/x"], out[f"{seq.prefix}batches/{t}/y"] = bx, by
        if seq.weights is not None:
            out[f"{seq.prefix}batches/{t}/w"] = seq.weights[t - 1]
    return out


def train_job(base: TrainSpec, backend: str, model: MLP, params: dict, batch: dict, runs: dict) -> WorkerJob:
    """The one train job a framework's worker runs for the sweep: every run of ``runs`` on ``batch``."""
    return make_job(BACKENDS[backend], "train", runs, dtype=base.dtype, model=model.to_dict(),
                    loss={"name": "cross_entropy"}, params=params, batch=batch,
                    payload=builtin_payload(model.to_dict(), mode="training", runs=runs))


@dataclass(frozen=True)
class Config:
    """One training configuration: a rule at a batch size, its lr times ``multiplier``, on the ``last_batch``
    sequence. ``role``: "main" (multiplier 1, the chosen last-batch mode), "grid" (another multiplier) or "drop"
    (with ``keep``: the same rule with the short batch dropped, for comparison)."""

    batch_size: int
    rule: str
    multiplier: float = 1.0
    last_batch: str = "drop"
    role: str = "main"


def configurations(spec: SweepSpec) -> list[Config]:
    """The sweep's configurations: every rule at every batch size; with ``keep`` also with the short batch
    dropped; with a grid also at every other multiplier (on the chosen last-batch mode)."""
    out = []
    for b in spec.batch_sizes:
        for name in spec.rules():
            out.append(Config(b, name, 1.0, spec.last_batch, "main"))
            out += [Config(b, name, float(m), spec.last_batch, "grid") for m in spec.lr_grid if m != 1]
            if spec.last_batch == "keep":
                out.append(Config(b, name, 1.0, "drop", "drop"))
    return out


@dataclass
class Cell:
    """One configuration in one framework."""

    backend: str
    batch_size: int
    rule: str
    reduction: str
    lr: float
    status: str
    error: str | None = None
    accuracy: list[float] = field(default_factory=list)      # after each epoch
    epoch_loss: list[float] = field(default_factory=list)    # per-example training loss of each epoch (w-weighted)
    final: dict | None = field(default=None, repr=False)
    seconds: float | None = None   # the timed training call (after one warm-up call), all its steps
    steps: int = 0
    multiplier: float = 1.0
    last_batch: str = "drop"
    role: str = "main"
    #: the worker run this cell reads (configurations with the same batches, reduction and lr share one)
    case: str = ""
    seed: int = 0


@dataclass
class SweepReport:
    spec: SweepSpec
    lr0: float
    cells: list[Cell]
    parity: dict          # (batch size, rule) -> largest final-parameter difference between frameworks (main)
    description: str
    wall_seconds: dict = field(default_factory=dict)   # backend -> its worker's wall time, import included
    total_seconds: float = 0.0
    sequences: dict = field(default_factory=dict, repr=False)   # (batch size, last batch) -> Sequence
    class_weights: np.ndarray | None = None                      # per class, with ``spec.class_weights``
    parity_all: dict = field(default_factory=dict)  # (B, rule, multiplier, last batch) -> largest difference
    held_out: int = 0                                            # examples the accuracy is measured on
    interrupted: int | None = None     # the signal that stopped the sweep (unfinished cells say so), or None

    @property
    def exit_code(self) -> int:
        """128 + the signal when interrupted; 3 when a cell failed; else 0."""
        if self.interrupted is not None:
            return 128 + self.interrupted
        return 3 if any(c.status != "ok" for c in self.cells) else 0

    def accuracy(self, rule: str, b: int, multiplier: float = 1.0, last_batch: str | None = None) -> float | None:
        """The held-out accuracy after the last epoch of a configuration (the main one by default), averaged
        over the frameworks that ran (they agree) and the seeds."""
        values = self.per_seed(rule, b, multiplier, last_batch)
        return float(np.mean(list(values.values()))) if values else None

    def per_seed(self, rule: str, b: int, multiplier: float = 1.0, last_batch: str | None = None) -> dict:
        """seed -> the configuration's held-out accuracy after the last epoch, averaged over the frameworks."""
        last_batch = last_batch or self.spec.last_batch
        by_seed: dict[int, list[float]] = {}
        for c in self.cells:
            if (c.rule == rule and c.batch_size == b and c.status == "ok" and c.multiplier == multiplier
                    and c.last_batch == last_batch):
                by_seed.setdefault(c.seed, []).append(c.accuracy[-1])
        return {seed: float(np.mean(v)) for seed, v in by_seed.items()}

    def spread(self, rule: str, b: int) -> float | None:
        """The standard deviation over seeds (ddof 1) of the main configuration's accuracy; None with one seed."""
        values = list(self.per_seed(rule, b).values())
        return float(np.std(values, ddof=1)) if len(values) > 1 else None

    @property
    def seeds(self) -> list[int]:
        return sorted({c.seed for c in self.cells}) or [self.spec.base.seed]

    @property
    def main_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.role == "main"]


def _step_totals(seq: Sequence, reduction: str) -> list[tuple[float, float]]:
    """Per step (sum of the loss factors s_i, total sample weight): the reduced loss divided by the first is the
    weight-averaged per-example loss of the step, which the second weighs into the epoch's."""
    out = []
    for t, n in enumerate(seq.sizes):
        w = None if seq.weights is None else seq.weights[t]
        out.append((float(loss_scale(reduction, n, w).sum()), float(n if w is None else np.sum(w, dtype=np.float64))))
    return out


def _epoch_losses(losses: list[float], totals: list[tuple[float, float]], ends: list[int]) -> list[float]:
    """Per epoch, the per-example training loss (weighted by the sample weights) from every step's reduced loss."""
    out, start = [], 0
    for end in ends:
        part = range(start, end)
        out.append(sum(losses[t] / totals[t][0] * totals[t][1] for t in part) / sum(totals[t][1] for t in part))
        start = end
    return out


#: Cores one framework worker is given when workers run side by side (each framework threads its own math).
CORES_PER_WORKER = 4


def concurrent_workers(spec: SweepSpec) -> int:
    """How many framework workers run at once: ``spec.parallel``, or where cores allow, one per
    ``CORES_PER_WORKER`` cores (one at a time on this repository's 2-core machine)."""
    if spec.parallel is not None:
        return max(1, min(spec.parallel, len(spec.base.backends)))
    return max(1, min(len(spec.base.backends), (os.cpu_count() or 1) // CORES_PER_WORKER))


def run_sweep(spec: SweepSpec, progress=None) -> SweepReport:
    """The sweep (see the module doc); with several seeds, once per seed, merged (``_merge_seeds``)."""
    check_sweep(spec)
    say = progress or (lambda _m: None)
    if is_check_config(spec.base.model) and spec.models is None:
        models = open_models(read_models(spec.base.model, spec.base.data), spec.base.model, say)
        spec = replace(spec, models=models, base=replace(spec.base, backends=tuple(
            models.backend(fw) for fw in models.spec.frameworks)))
    if len(spec.seeds) > 1:
        reports = []
        for i, seed in enumerate(spec.seeds, start=1):
            say(f"seed {seed} ({i} of {len(spec.seeds)}):")
            reports.append(run_sweep(replace(spec, base=replace(spec.base, seed=seed), seeds=()), progress))
            if reports[-1].interrupted is not None:
                break  # the seeds after it never ran: the merged report says the sweep was interrupted
        return _merge_seeds(spec, reports)
    if spec.seeds:
        spec = replace(spec, base=replace(spec.base, seed=spec.seeds[0]))
    base, user = spec.base, spec.models
    if user is None:
        (x, y), held, desc = split_digits(base)
        model = MLP((x.shape[1], *base.hidden, 10), base.activation)
        params = init_params(model, base.seed, base.dtype)
    else:  # a check config's models: the source's weights, the accuracy measured in each worker
        (x, y), held, desc = user.split(base.seed, base.dtype)
        model, params = None, {k: user.values[k] for k in user.trainable}
        desc = f"{user.describe()}; {desc}"

    def job(backend: str) -> WorkerJob:
        if user is None:
            return train_job(base, backend, model, params, batch, runs)
        return user.job(backend, batch, runs, held)

    def accuracy(arrays: dict, steps: list[dict], ends: list[int]) -> list[float]:
        return held_out_accuracy(model, steps, held) if user is None else user.accuracy(arrays, ends)
    lr0 = base.lr if base.lr is not None else DEFAULT_LR[base.optimizer]
    config = replace(base, lr=lr0).config()
    weights_per_class = class_weights(y, spec.class_weights, base.seed)
    configs = configurations(spec)
    batch, sequences = {}, {}
    for b, last in sorted({(c.batch_size, c.last_batch) for c in configs}):
        seq, batches = build_sequence(x, y, b, spec.epochs, base.seed, base.dtype, last, weights_per_class)
        sequences[(b, last)] = seq
        batch.update(job_arrays(seq, batches))
    runs, case_of, trained = {}, {}, {}
    for c in sorted(configs, key=lambda c: c.role != "main"):  # main runs first: the others may reuse them
        reduction, lr = spec.rules()[c.rule](lr0, c.batch_size)
        lr *= c.multiplier
        seq = sequences[(c.batch_size, c.last_batch)]
        same = (seq.prefix, reduction, float(f"{lr:.12g}"))
        # A grid or comparison run with the batches, reduction and lr of one already there is that run, trained
        # once; every main configuration keeps its own run (as the default sweep always had).
        case = trained.get(same) if c.role != "main" else None
        if case is None:
            case = f"{c.rule}@{c.batch_size}" + ("k" if c.last_batch == "keep" else "") + (
                f"x{c.multiplier:g}" if c.multiplier != 1 else "")
            trained.setdefault(same, case)
            runs[case] = {"optimizer": replace(config, lr=lr).to_dict(), "lrs": [lr] * len(seq.sizes),
                          "reduction": reduction, "batches": seq.prefix, "record": seq.ends}
            if spec.weighted:
                runs[case]["weights"] = True
        case_of[c] = (case, reduction, lr)
    cells, walls = [], {}
    started = time.perf_counter()
    totals = {}
    workers = concurrent_workers(spec)
    what = (f"{len(runs)} training runs for {len(configs)} configurations: batch sizes {list(spec.batch_sizes)} x "
            f"{len(spec.rules())} rules" + (f" x lr multipliers {list(spec.lr_grid)}" if spec.lr_grid else "")
            + (", last batch kept and dropped" if spec.last_batch == "keep" else "")
            + (f", {spec.class_weights} class weights" if spec.weighted else "")
            + f"; {spec.epochs} epochs each, {base.dtype}")

    if workers > 1:
        say(f"{workers} framework workers at a time ({os.cpu_count()} cores)")
    interrupted = None
    try:
        outcomes = run_jobs([WorkerRun(job(b), BACKENDS[b],
                                       base.timeout_s * max(1, len(runs) // 4), label=f"running {b} ({what}) ...")
                             for b in base.backends], say=say, parallel=workers, bars=progress is not None)
    except Interrupted as exc:  # the cells of what finished are kept; the others say "interrupted"
        interrupted, outcomes = exc.signum, exc.outcomes
    for backend in base.backends:
        outcome = outcomes[backend]
        walls[backend] = outcome.wall_seconds
        timed = set()
        for c in configs:
            case, reduction, lr = case_of[c]
            common = dict(multiplier=c.multiplier, last_batch=c.last_batch, role=c.role, case=case)
            row = outcome.methods.get(case)
            if row is None or row.status != "ok":
                cells.append(Cell(backend, c.batch_size, c.rule, reduction, lr, row.status if row else outcome.status,
                                  (row.error if row else None) or outcome.error, **common))
                continue
            seq = sequences[(c.batch_size, c.last_batch)]
            steps = step_params(row.grads, seq.ends, params)
            losses = step_losses(row.grads, seq.ends[-1])
            if (c.batch_size, c.last_batch, reduction) not in totals:
                totals[(c.batch_size, c.last_batch, reduction)] = _step_totals(seq, reduction)
            first = case not in timed   # a shared run's time counts once
            timed.add(case)
            cells.append(Cell(backend, c.batch_size, c.rule, reduction, lr, "ok", None,
                              accuracy(row.grads, steps, seq.ends),
                              _epoch_losses(losses, totals[(c.batch_size, c.last_batch, reduction)], seq.ends),
                              steps[-1], row.seconds if first else None, seq.ends[-1] if first else 0, **common))
    parity_all = {}
    for c in configs:
        finals = [x.final for x in cells if (x.batch_size, x.rule, x.multiplier, x.last_batch) ==
                  (c.batch_size, c.rule, c.multiplier, c.last_batch) and x.status == "ok"]
        parity_all[(c.batch_size, c.rule, c.multiplier, c.last_batch)] = max(
            (relative_distance(p, q) for p, q in itertools.combinations(finals, 2)), default=None)
    parity = {(b, name): parity_all[(b, name, 1.0, spec.last_batch)]
              for b, name in itertools.product(spec.batch_sizes, spec.rules())}
    last = ("last short batch of each epoch kept as its own step (and, for comparison, dropped)"
            if spec.last_batch == "keep" else "last short batch of each epoch dropped")
    description = f"{desc}; {spec.epochs} epochs per batch size ({last})"
    if spec.weighted:
        description += f"; {spec.class_weights} class weights"
    for cell in cells:
        cell.seed = base.seed
    return SweepReport(spec, lr0, cells, parity, description, walls, time.perf_counter() - started, sequences,
                       weights_per_class, parity_all, len(held[1]), interrupted)


def _merge_seeds(spec: SweepSpec, reports: list[SweepReport]) -> SweepReport:
    """One report of the per-seed sweeps: every cell (each keeps its seed), the largest framework difference of
    each configuration over the seeds, the summed times; the first seed's batch sequences and class weights
    (for the options' per-batch figures, which the seed changes only by its data order)."""
    first = reports[0]
    worst = lambda values: max((v for v in values if v is not None), default=None)  # noqa: E731
    walls = {b: sum(r.wall_seconds.get(b, 0.0) for r in reports) for b in first.wall_seconds}
    return SweepReport(spec, first.lr0, [c for r in reports for c in r.cells],
                       {k: worst(r.parity.get(k) for r in reports) for k in first.parity},
                       f"{first.description}; seeds {', '.join(map(str, spec.seeds))} (each its own parameters, "
                       "held-out split and data order)", walls, sum(r.total_seconds for r in reports),
                       first.sequences, first.class_weights,
                       {k: worst(r.parity_all.get(k) for r in reports) for k in first.parity_all}, first.held_out,
                       reports[-1].interrupted)


# --- what the options measure ---------------------------------------------------------------------------------

def weight_stats(report: SweepReport) -> list[dict] | None:
    """With class weights, per batch size: sum(w) / N over every step of the main sequence (min, max, mean,
    standard deviation, max / min): the factor between a sum_over_batch_size step and the weighted mean's."""
    if report.class_weights is None:
        return None
    out = []
    for b in report.spec.batch_sizes:
        r = report.sequences[(b, report.spec.last_batch)].weight_ratios()
        out.append({"batch_size": b, "steps": len(r), "min": float(r.min()), "max": float(r.max()),
                    "mean": float(r.mean()), "std": float(r.std()), "max_over_min": float(r.max() / r.min())})
    return out


def last_batch_effect(report: SweepReport) -> list[dict] | None:
    """With ``keep``, per batch size and rule: the short batch's size, how much one of its examples weighs in the
    update against an example of a full batch (the mean over the short steps of ``example_factors`` over the
    mean over the full steps; per unit of sample weight), and keep - drop in held-out accuracy (mean over
    frameworks) and in final parameters (the largest relative distance over the frameworks)."""
    spec = report.spec
    if spec.last_batch != "keep":
        return None
    out = []
    for b in spec.batch_sizes:
        seq = report.sequences[(b, "keep")]
        short = [t for t, n in enumerate(seq.sizes) if n < b]
        for name, rule in spec.rules().items():
            reduction, lr = rule(report.lr0, b)
            row = {"batch_size": b, "b_last": seq.sizes[short[0]] if short else 0, "rule": name,
                   "reduction": reduction, "lr": lr, "short_over_full": None}
            if short:
                factors = seq.example_factors(reduction, lr)
                full = np.concatenate([f for t, f in enumerate(factors) if t not in short])
                row["short_over_full"] = float(np.mean(np.concatenate([factors[t] for t in short])) / np.mean(full))
            keep, drop = report.accuracy(name, b, 1.0, "keep"), report.accuracy(name, b, 1.0, "drop")
            distances = []
            for backend in spec.base.backends:
                pair = [c.final for c in report.cells if c.backend == backend and c.batch_size == b and c.rule == name
                        and c.multiplier == 1.0 and c.status == "ok" and c.seed == report.seeds[0]]
                if len(pair) == 2:
                    distances.append(relative_distance(*pair))
            row.update(accuracy_keep=keep, accuracy_drop=drop,
                       accuracy_difference=None if keep is None or drop is None else keep - drop,
                       max_rel_param_difference=max(distances, default=None))
            out.append(row)
    return out


def grid_results(report: SweepReport) -> dict | None:
    """With an lr grid: every measured (B, reduction, lr) point with its accuracy (mean, min and max over
    frameworks) and the (rule, multiplier) pairs that name it; per B and reduction the best point (the highest
    mean accuracy; the smallest lr among ties; whether it is the smallest or largest lr measured, so that the
    optimum may lie beyond) and every rule's prediction (multiplier 1) with its accuracy; where linear scaling
    stays within ``HOLDS`` of the grid's best: at which B, up to which B from B0 on, and the first B where not."""
    spec = report.spec
    if not spec.lr_grid:
        return None
    points, best = [], []
    for b in spec.batch_sizes:
        reductions = dict.fromkeys(r(report.lr0, b)[0] for r in spec.rules().values())
        for reduction in reductions:
            measured: dict[float, dict] = {}
            for c in report.cells:
                if c.batch_size == b and c.reduction == reduction and c.role in ("main", "grid") and c.status == "ok":
                    key = float(f"{c.lr:.12g}")
                    p = measured.setdefault(key, {"batch_size": b, "reduction": reduction, "lr": c.lr,
                                                  "multiple_of_lr0": c.lr / report.lr0, "acc": [], "named": set()})
                    p["acc"].append(c.accuracy[-1])
                    p["named"].add((c.rule, c.multiplier))
            row = [dict(p, accuracy=float(np.mean(p["acc"])), accuracy_min=min(p["acc"]),
                        accuracy_max=max(p["acc"]), named=sorted(p["named"])) for _, p in sorted(measured.items())]
            for p in row:
                del p["acc"]
            points += row
            if not row:
                continue
            i = int(np.argmax([p["accuracy"] for p in row]))
            top = row[i]
            predictions = []
            for name, rule in spec.rules().items():
                r, lr = rule(report.lr0, b)
                if r == reduction:
                    acc = report.accuracy(name, b)
                    predictions.append({"rule": name, "lr": lr, "accuracy": acc, "best_lr_over_predicted": top["lr"] / lr})
            best.append({"batch_size": b, "reduction": reduction, "lr": top["lr"],
                         "multiple_of_lr0": top["multiple_of_lr0"], "accuracy": top["accuracy"],
                         "at_grid_edge": i in (0, len(row) - 1), "predictions": predictions})
    linear = "mean_linear"
    gap = {}
    for row in best:
        for p in row["predictions"]:
            if p["rule"] == linear and p["accuracy"] is not None:
                gap[row["batch_size"]] = row["accuracy"] - p["accuracy"]
    up_to, stops = _holds_up_to(spec.batch_sizes, {b: g <= HOLDS for b, g in gap.items()})
    return {"multipliers": list(spec.lr_grid), "points": points, "best": best,
            "linear_rule": linear, "linear_gap_to_best": {str(b): g for b, g in gap.items()},
            "linear_holds_at": [b for b in spec.batch_sizes if b in gap and gap[b] <= HOLDS],
            "linear_holds_up_to": up_to, "linear_stops_at": stops}


def _holds_up_to(sizes, holds: dict[int, bool]) -> tuple[int | None, int | None]:
    """(the largest B such that a rule holds at every measured B from B0 up to it, or None when it fails at B0;
    the first measured B beyond B0 where it fails, or None)."""
    measured = [b for b in sorted(sizes) if b >= B0 and b in holds]
    stops = next((b for b in measured if not holds[b]), None)
    kept = [b for b in measured if stops is None or b < stops]
    return (max(kept) if kept else None), stops


def framework_parity(report: SweepReport) -> list[dict]:
    """Per pair of frameworks: the largest relative distance between their final parameters over every
    configuration they both trained (where), and whether their optimizer rules are the same update at the
    sweep's constant learning rates (``semantics_of``) and, if not, what differs."""
    from gradparity.experiment.optimizers import semantics_of

    config = replace(report.spec.base, lr=report.lr0).config()
    finals: dict[tuple, dict[str, dict]] = {}
    for c in report.cells:
        if c.status == "ok" and c.final is not None:
            finals.setdefault((c.batch_size, c.rule, c.multiplier, c.last_batch, c.seed), {})[c.backend] = c.final
    out = []
    for a, b in itertools.combinations(report.spec.base.backends, 2):
        fa, fb = BACKENDS[a].framework, BACKENDS[b].framework
        sa, sb = (semantics_of(f, config).at_constant_lr() for f in (fa, fb))
        differs = [f"{k}: {getattr(sa, k)} ({a}) vs {getattr(sb, k)} ({b})" for k in vars(sa)
                   if getattr(sa, k) != getattr(sb, k)]
        worst, where = None, None
        for key, by_backend in finals.items():
            if a in by_backend and b in by_backend:
                d = relative_distance(by_backend[a], by_backend[b])
                if worst is None or d > worst:
                    worst, where = d, key
        out.append({"a": a, "b": b, "max_rel_final_params": worst,
                    "where": None if where is None else {"batch_size": where[0], "rule": where[1],
                                                         "multiplier": where[2], "last_batch": where[3],
                                                         "seed": where[4]},
                    "same_update": not differs, "rule_differences": differs})
    return out


# --- text: commands/sweep_report.py says what the sweep measured (the terminal, report.md, report.html) ---------

def render_text(report: SweepReport) -> str:
    """The terminal's text (``sweep_report.render_text``)."""
    from gradparity.commands.sweep_report import render_text as text

    return text(report)


def timing_lines(report: SweepReport) -> list[str]:
    """The benchmark's lines (``sweep_report.timing_lines``)."""
    from gradparity.commands.sweep_report import timing_lines as lines

    return lines(report)


def recipe_lines(report: SweepReport) -> list[str]:
    """The recipe and the options' tables as text (``sweep_report.recipe_lines``; report.json's "recipe")."""
    from gradparity.commands.sweep_report import recipe_lines as lines

    return lines(report)


def _cell_dict(c: Cell) -> dict:
    return {"backend": c.backend, "seed": c.seed, "batch_size": c.batch_size, "rule": c.rule, "reduction": c.reduction,
            "lr": c.lr, "status": c.status, "error": c.error, "held_out_accuracy_per_epoch": c.accuracy,
            "train_loss_per_epoch": c.epoch_loss, "role": c.role, "multiplier": c.multiplier,
            "last_batch": c.last_batch}


def to_dict(report: SweepReport) -> dict:
    """report.json (schema gradparity.train.sweep/1; the keys the options add: see the module docstring)."""
    spec = report.spec
    weights = None
    if report.class_weights is not None:
        weights = {"scheme": spec.class_weights, "per_class": [float(v) for v in report.class_weights],
                   "sum_w_over_n_per_batch_size": weight_stats(report)}
    return {"schema": "gradparity.train.sweep/1", "optimizer": spec.base.optimizer, "lr0": report.lr0,
            "B0": B0, "epochs": spec.epochs, "batch_sizes": list(spec.batch_sizes),
            "data": report.description,
            "class_weights": spec.class_weights, "last_batch": spec.last_batch,
            "lr_grid": list(spec.lr_grid) or None, "seeds": report.seeds,
            "interrupted": signal.Signals(report.interrupted).name if report.interrupted is not None else None,
            "accuracy_by_seed": [{"batch_size": b, "rule": n, "per_seed": {str(k): v for k, v in
                                                                        report.per_seed(n, b).items()},
                                  "std": report.spread(n, b)} for b in spec.batch_sizes for n in spec.rules()],
            "cells": [_cell_dict(c) for c in report.main_cells],
            "extra_cells": [_cell_dict(c) for c in report.cells if c.role != "main"],
            "parity_final_params": [{"batch_size": b, "rule": n, "max_rel": v} for (b, n), v in report.parity.items()],
            "weights": weights, "last_batch_effect": last_batch_effect(report), "grid": grid_results(report),
            "recipe": recipe_lines(report), "framework_parity": framework_parity(report),
            "benchmark": {"total_seconds": report.total_seconds, "worker_wall_seconds": report.wall_seconds,
                          "timed_seconds": {c.backend: sum(x.seconds or 0.0 for x in report.cells
                                                           if x.backend == c.backend) for c in report.cells},
                          "steps": {c.backend: sum(x.steps for x in report.cells if x.backend == c.backend)
                                    for c in report.cells}}}
