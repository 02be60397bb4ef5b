"""The grid of loss configurations every framework's loss module is checked on, and how to run it.

Shared by tests/test_loss_reference.py (finite differences) and the per-framework
parity tests: one definition of "every kind, option, divisor rule and last-axis
convention", and one worker launch per framework for all of it.
"""
import dataclasses
import itertools

import numpy as np

from gradparity.backends import BACKENDS
from gradparity.losses.batches import generate_batches, make_loss_job
from gradparity.losses.catalogue import DIVISORS, LOSSES, LossSemantics

W5 = (1.0, 2.0, 0.5, 3.0, 1.5)
PW5 = (1.0, 2.0, 3.0, 0.5, 1.0)
SHAPES = ((6, 5), (3, 7, 5))


def semantics_grid() -> list[LossSemantics]:
    """Every kind with its options on and off, every divisor rule that applies, both last-axis conventions."""
    out = []
    for kind, loss in LOSSES.items():
        options = [{}]
        if "class_weight" in loss.options:
            options.append({"class_weight": W5})
        if "label_smoothing" in loss.options:
            options.append({"label_smoothing": 0.2})
        if "pos_weight" in loss.options:
            options.append({"pos_weight": PW5, "class_weight": W5, "label_smoothing": 0.1})
        if "ignore_index" in loss.options:
            options.append({"ignore_index": -100})
            options.append({"ignore_index": -100, "class_weight": W5})
            options.append({"ignore_index": 3, "label_smoothing": 0.2})  # an ignored class inside [0, C)
            options.append({"ignore_index": -1, "class_weight": W5, "label_smoothing": 0.1})
        if "delta" in loss.options:
            options.append({"delta": 0.7})
        axes = ("elementwise", "mean") if kind in ("binary_cross_entropy", "mse", "l1", "huber") else ("elementwise",)
        for opt, axis, rule, weighted in itertools.product(options, axes, DIVISORS, (False, True)):
            if rule == "class_weight_sum" and kind != "cross_entropy":
                continue
            out.append(LossSemantics(kind, rule, last_axis=axis, sample_weight=weighted, **opt))
    return out


def grid_id(sem: LossSemantics) -> str:
    return (f"{sem.kind}-{sem.divisor}-{sem.last_axis}{'-w' if sem.sample_weight else ''}"
            f"{'-cw' if sem.class_weight else ''}{'-ls' if sem.label_smoothing else ''}"
            f"{f'-ign{sem.ignore_index}' if sem.ignore_index is not None else ''}{'-pw' if sem.pos_weight else ''}"
            f"{'-d' if sem.delta != 1.0 else ''}")


def grid_batches(tag: str, i: int, sem: LossSemantics, shapes=SHAPES):
    """The generated batches, renamed per semantics; weighted ones also get (N, T) sample weights."""
    batches = [dataclasses.replace(b, name=f"{tag}{i}-{b.name}")
               for b in generate_batches(sem, seed=i, shapes=shapes)]
    if sem.sample_weight:
        three_d = batches[-1]
        rng = np.random.default_rng(i)
        batches.append(dataclasses.replace(three_d, name=f"{tag}{i}-tokens",
                                           sample_weight=rng.uniform(0.25, 2.0, three_d.logits.shape[:2])))
    return batches


def run_grid(backend: str, semantics: list[LossSemantics], render, tag: str = "S"):
    """Every rendering of ``semantics`` on its own batches, in one worker of ``backend``: (outcome, batches)."""
    from gradparity.run.execute import run_backend

    per_sem = [grid_batches(tag, i, sem) for i, sem in enumerate(semantics)]
    functions = {f"{tag}{i}": render(sem).function for i, sem in enumerate(semantics)}
    cases = tuple(f"{tag}{i}@{b.name}" for i, batches in enumerate(per_sem) for b in batches)
    job = make_loss_job(BACKENDS[backend], functions, [b for bs in per_sem for b in bs], cases=cases)
    outcome = run_backend(job, BACKENDS[backend], timeout_s=300)
    assert outcome.status == "ok", outcome.error
    return outcome, per_sem
