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
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from gradparity.backends import BACKENDS
from gradparity.backends.protocol import WorkerJob
from gradparity.commands.train import DEFAULT_LR, TrainSpec, check_spec, held_out_accuracy, split_digits
from gradparity.compare.trajectories import relative_distance
from gradparity.errors import ConfigError
from gradparity.experiment.inputs import _rng, init_params
from gradparity.experiment.models import MLP
from gradparity.run.execute import remove_stale_job_dirs, run_backend

B0 = 32
#: The linear rule "holds" at B while its held-out accuracy is within this of B0's (accuracy, fraction).
HOLDS = 0.01


def rules(optimizer: str) -> dict[str, callable]:
    """Rule name -> (lr0, B) -> (reduction, lr)."""
    if optimizer in ("adam", "adamw"):
        return {"mean": lambda lr0, b: ("mean", lr0),
                "mean_sqrt": lambda lr0, b: ("mean", lr0 * math.sqrt(b / B0)),
                "mean_linear": lambda lr0, b: ("mean", lr0 * b / B0),
                "sum": lambda lr0, b: ("sum", lr0)}
    return {"mean": lambda lr0, b: ("mean", lr0),
            "mean_linear": lambda lr0, b: ("mean", lr0 * b / B0),
            "sum": lambda lr0, b: ("sum", lr0 / B0)}


@dataclass(frozen=True)
class SweepSpec:
    base: TrainSpec
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128)
    epochs: int = 3


@dataclass
class Cell:
    """One (batch size, rule) in one framework."""

    backend: str
    batch_size: int
    rule: str
    reduction: str
    lr: float
    status: str
    error: str | None = None
    accuracy: list[float] = field(default_factory=list)      # after each epoch
    epoch_loss: list[float] = field(default_factory=list)    # mean per-example training loss of each epoch
    final: dict | None = field(default=None, repr=False)
    seconds: float | None = None   # the timed training call (after one warm-up call), all its steps
    steps: int = 0


@dataclass
class SweepReport:
    spec: SweepSpec
    lr0: float
    cells: list[Cell]
    parity: dict          # (batch size, rule) -> largest final-parameter difference between frameworks
    description: str
    wall_seconds: dict = field(default_factory=dict)   # backend -> its worker's wall time, import included
    total_seconds: float = 0.0

    def accuracy(self, rule: str, b: int) -> float | None:
        """The held-out accuracy after the last epoch, averaged over the frameworks that ran (they agree)."""
        values = [c.accuracy[-1] for c in self.cells if c.rule == rule and c.batch_size == b and c.status == "ok"]
        return float(np.mean(values)) if values else None


def _epoch_batches(x, y, b: int, epochs: int, seed: int, dtype: str):
    """The training split in ``epochs`` seeded shuffles, cut into batches of ``b`` (the last short batch of an
    epoch dropped, as drop_last does: every step sees B examples); the steps that end an epoch."""
    rng = _rng(seed, 1)
    batches, ends = [], []
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y) - b + 1, b):
            rows = order[start:start + b]
            batches.append((x[rows].astype(dtype), y[rows]))
        ends.append(len(batches))
    return batches, ends


def run_sweep(spec: SweepSpec, progress=None) -> SweepReport:
    base = spec.base
    check_spec(base)
    if not spec.batch_sizes or any(not 1 <= b <= 512 for b in spec.batch_sizes) or not 1 <= spec.epochs <= 50:
        raise ConfigError(f"batch sizes must be in 1..512 and epochs in 1..50, got {list(spec.batch_sizes)} "
                          f"and {spec.epochs}")
    say = progress or (lambda _m: None)
    (x, y), held, desc = split_digits(base)
    model = MLP((x.shape[1], *base.hidden, 10), base.activation)
    params = init_params(model, base.seed, base.dtype)
    lr0 = base.lr if base.lr is not None else DEFAULT_LR[base.optimizer]
    config = replace(base, lr=lr0).config()
    batch, runs, ends_of = {}, {}, {}
    for b in spec.batch_sizes:
        batches, ends = _epoch_batches(x, y, b, spec.epochs, base.seed, base.dtype)
        ends_of[b] = ends
        for t, (bx, by) in enumerate(batches, start=1):
            batch[f"b{b}/batches/{t}/x"], batch[f"b{b}/batches/{t}/y"] = bx, by
        for name, rule in rules(base.optimizer).items():
            reduction, lr = rule(lr0, b)
            runs[f"{name}@{b}"] = {"optimizer": replace(config, lr=lr).to_dict(), "lrs": [lr] * len(batches),
                                   "reduction": reduction, "batches": f"b{b}/", "record": ends}
    remove_stale_job_dirs()
    cells, walls = [], {}
    started = time.perf_counter()
    for backend in base.backends:
        info = BACKENDS[backend]
        job = WorkerJob(backend=info.name, framework=info.framework, variant=info.variant,
                        module=info.module.rsplit(".", 1)[0] + ".train", extra=info.extra, requires=info.requires,
                        methods=tuple(runs), dtype=base.dtype, device="cpu", precision="highest",
                        model=model.to_dict(), loss={"name": "cross_entropy"}, params=params, batch=batch,
                        task="train", payload={"runs": runs})
        say(f"running {backend} ({len(runs)} configurations: batch sizes {list(spec.batch_sizes)} x "
            f"{len(rules(base.optimizer))} rules, {spec.epochs} epochs each, {base.dtype}) ...")
        outcome = run_backend(job, info, base.timeout_s * max(1, len(runs) // 4))
        say(f"  {backend}: {outcome.status} in {outcome.wall_seconds:.1f} s")
        walls[backend] = outcome.wall_seconds
        for case, run in runs.items():
            name, b = case.split("@")[0], int(case.split("@")[1])
            lr = run["lrs"][0]
            row = outcome.methods.get(case)
            if row is None or row.status != "ok":
                cells.append(Cell(backend, b, name, run["reduction"], lr, row.status if row else outcome.status,
                                  (row.error if row else None) or outcome.error))
                continue
            ends = ends_of[b]
            steps = [{k: np.asarray(row.grads[f"{t}/{k}"], dtype=np.float64) for k in params} for t in ends]
            losses = [float(row.grads[f"loss/{t}"]) for t in range(1, ends[-1] + 1)]
            per_example = [v / b if run["reduction"] == "sum" else v for v in losses]
            starts = [0, *ends[:-1]]
            cells.append(Cell(backend, b, name, run["reduction"], lr, "ok", None,
                              held_out_accuracy(model, steps, held),
                              [float(np.mean(per_example[s:e])) for s, e in zip(starts, ends)], steps[-1],
                              row.seconds, ends[-1]))
    parity = {}
    for b, name in itertools.product(spec.batch_sizes, rules(base.optimizer)):
        finals = [c.final for c in cells if c.batch_size == b and c.rule == name and c.status == "ok"]
        parity[(b, name)] = max((relative_distance(p, q) for p, q in itertools.combinations(finals, 2)), default=None)
    return SweepReport(spec, lr0, cells, parity, f"{desc}; {spec.epochs} epochs per batch size (last short batch "
                                                 "of each epoch dropped)", walls, time.perf_counter() - started)


def timing_lines(report: SweepReport) -> list[str]:
    """The benchmark: the sweep's wall time, and per framework its worker's wall time and time per step."""
    lines = [f"benchmark: the sweep took {report.total_seconds:.1f} s wall in all ({len(report.cells)} "
             f"configurations x framework runs); per framework:"]
    for backend, wall in report.wall_seconds.items():
        cells = [c for c in report.cells if c.backend == backend and c.status == "ok" and c.seconds]
        steps = sum(c.steps for c in cells)
        timed = sum(c.seconds for c in cells)
        per_step = f"{1000 * timed / steps:.3f} ms/step over {steps} steps" if steps else "no timed steps"
        lines.append(f"  {backend:<18} worker {wall:6.1f} s wall (import, set-up, one warm-up run per "
                     f"configuration and the timed run); timed training {timed:6.2f} s: {per_step}")
    lines.append("  (CPU wall-clock time on this machine; one timed run per configuration after its warm-up run, "
                 "which pays compilation; the per-step time includes keeping each step's loss for the report)")
    return lines


def recipe_lines(report: SweepReport) -> list[str]:
    """The learning rate to use at each batch size, with the sweep's evidence."""
    base, bs = report.spec.base, report.spec.batch_sizes
    names = list(rules(base.optimizer))
    ref = report.accuracy("mean", B0) if B0 in bs else None
    lines = [f"learning-rate recipe from (B0 = {B0}, lr0 = {report.lr0:g}), {base.optimizer}, "
             f"held-out accuracy after {report.spec.epochs} epochs (mean over frameworks):"]
    lines.append(f"{'B':>5} " + " ".join(f"{n:>22}" for n in names) + "   best")
    for b in bs:
        accs = {n: report.accuracy(n, b) for n in names}
        cells = []
        for n in names:
            reduction, lr = rules(base.optimizer)[n](report.lr0, b)
            a = accs[n]
            cells.append(f"{(f'{a:.3f}' if a is not None else 'failed') + f' (lr {lr:.3g})':>22}")
        best = max((n for n in names if accs[n] is not None), key=lambda n: accs[n], default=None)
        lines.append(f"{b:>5} " + " ".join(cells) + f"   {best or '-'}")
    if ref is not None:
        linear = "mean_linear"
        holds = [b for b in bs if b >= B0 and report.accuracy(linear, b) is not None
                 and report.accuracy(linear, b) >= ref - HOLDS]
        beyond = [b for b in bs if b > B0 and b not in holds]
        lines.append(f"linear scaling (mean, lr = B * lr0 / {B0}) keeps the accuracy of B0 = {B0} ({ref:.3f}) within "
                     f"{HOLDS:g} up to B = {max(holds) if holds else B0}"
                     + (f"; it stops holding at B = {min(beyond)}" if beyond else " (every larger B measured)"))
    return lines


def render_text(report: SweepReport) -> str:
    base = report.spec.base
    lines = [f"gradparity train --sweep: {base.optimizer}, MLP 64-{'-'.join(map(str, base.hidden))}-10 "
             f"{base.activation}, {base.dtype}; {report.description}", ""]
    lines += recipe_lines(report)
    lines += ["", "per framework (held-out accuracy after each epoch; mean per-example training loss of the last "
                  "epoch):"]
    for c in sorted(report.cells, key=lambda c: (c.batch_size, c.rule, c.backend)):
        if c.status != "ok":
            lines.append(f"  B {c.batch_size:>4} {c.rule:<12} {c.backend:<18} FAILED: "
                         f"{(c.error or c.status).splitlines()[0]}")
            continue
        lines.append(f"  B {c.batch_size:>4} {c.rule:<12} {c.backend:<18} lr {c.lr:<10.4g} "
                     f"accuracy {' '.join(f'{a:.3f}' for a in c.accuracy)}  loss {c.epoch_loss[-1]:.4f}")
    lines += [""] + timing_lines(report)
    worst = max(((k, v) for k, v in report.parity.items() if v is not None), key=lambda kv: kv[1], default=None)
    if worst:
        (b, name), v = worst
        lines += ["", f"frameworks' final parameters: largest difference {v:.3g} (relative to the largest "
                      f"parameter; B {b}, {name}) over all configurations"]
    return "\n".join(lines)


def to_dict(report: SweepReport) -> dict:
    return {"schema": "gradparity.train.sweep/1", "optimizer": report.spec.base.optimizer, "lr0": report.lr0,
            "B0": B0, "epochs": report.spec.epochs, "batch_sizes": list(report.spec.batch_sizes),
            "data": report.description,
            "cells": [{"backend": c.backend, "batch_size": c.batch_size, "rule": c.rule, "reduction": c.reduction,
                       "lr": c.lr, "status": c.status, "error": c.error, "held_out_accuracy_per_epoch": c.accuracy,
                       "train_loss_per_epoch": c.epoch_loss} for c in report.cells],
            "parity_final_params": [{"batch_size": b, "rule": n, "max_rel": v} for (b, n), v in report.parity.items()],
            "recipe": recipe_lines(report),
            "benchmark": {"total_seconds": report.total_seconds, "worker_wall_seconds": report.wall_seconds,
                          "timed_seconds": {c.backend: sum(x.seconds or 0.0 for x in report.cells
                                                           if x.backend == c.backend) for c in report.cells},
                          "steps": {c.backend: sum(x.steps for x in report.cells if x.backend == c.backend)
                                    for c in report.cells}}}
