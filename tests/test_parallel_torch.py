"""PyTorch's data-parallel engines for real (task "data_parallel", ``backends/torch/parallel.py``): R = 3 gloo
replica processes on 127.0.0.1 running DistributedDataParallel, FSDP2's ``fully_shard`` and DistributedSampler
with and without ``drop_last``, against per-example gradients computed here in plain torch; and task
"data_parallel_train" (DDP and FSDP2 training with torch.optim.SGD, momentum 0.9) against training written here
in plain torch.

What torch documents, written out as the formulas the tests hold the engines to:

- DDP: "gradients from each node are averaged" (``DistributedDataParallel``: the all-reduce divides the sum of
  the replicas' gradients by the world size). With replica r's shard S_r and per-example gradients g_i, a
  replica's ``reduction='sum'`` loss gives (1/R) sum_r sum_{i in S_r} g_i, and ``reduction='mean'`` gives
  (1/R) sum_r (1/|S_r|) sum_{i in S_r} g_i: the single-device mean only when every |S_r| = N/R.
- FSDP2 (``fully_shard``) reduce-scatters the gradients with the same averaging over the data-parallel ranks.
- ``DistributedSampler(shuffle=False)``: without drop_last it "pads the data by repeating" indices, adding the
  first R * ceil(N/R) - N indices at the end; with drop_last it keeps the first R * floor(N/R); replica r takes
  ``indices[r::R]`` (torch/utils/data/distributed.py, ``__iter__``).
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest

from gradparity.backends import BACKENDS
from gradparity.experiment.inputs import build_inputs
from gradparity.experiment.parallel import data_parallel_job, worker_env
from gradparity.experiment.spec import load_experiment
from gradparity.run.runner import WorkerRun, run_jobs

pytestmark = pytest.mark.frameworks("torch")

R = 3
#: float64: the engines' gradients match the formulas to rounding (about 1e-16 relative measured here).
TOL = 1e-12
PROBLEM = {"dtype": "float64", "data.source": "synthetic", "data.batch_size": 12, "data.num_features": 5,
           "data.num_classes": 3, "model.hidden": [4], "model.activation": "tanh", "device": "cpu"}
CONFIGS = ("ddp", "fsdp2", "sampler", "sampler_drop")


def _job(configs=CONFIGS, fault=None, timeout_s=None):
    inp = build_inputs(load_experiment(None, PROBLEM))
    job = data_parallel_job(BACKENDS["torch"], inp.model.to_dict(), inp.params, inp.batch["x"], inp.batch["y"], R,
                            dtype="float64", configs=configs, fault=fault)
    if timeout_s is not None:
        job.payload["replica_timeout_s"] = timeout_s
    return job


def _run(job):
    return run_jobs([WorkerRun(job, BACKENDS["torch"], 240)], extra_env=worker_env(R))["torch"]


@pytest.fixture(scope="module")
def ran():
    """(the job, its outcome): every configuration, both global batches, both reductions, run once."""
    job = _job()
    return job, _run(job)


def per_example_grads(job, sharding: str) -> tuple[list[dict[str, np.ndarray]], int]:
    """Each example's gradient of its cross-entropy, canonical names and layout (kernels (in, out)), from a plain
    torch MLP holding the job's parameters; and N. (torch is imported here: collecting this module in the fast
    tier must not import it.)"""
    import torch
    import torch.nn.functional as F
    from torch import nn

    prefix = "" if sharding == "even" else "uneven/"
    x = torch.from_numpy(job.batch[prefix + "x"])
    y = torch.from_numpy(job.batch[prefix + "y"]).long()
    p = job.params
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for k, layer in ((0, model[0]), (1, model[2])):
            layer.weight.copy_(torch.from_numpy(p[f"layers.{k}.kernel"].T.copy()))
            layer.bias.copy_(torch.from_numpy(p[f"layers.{k}.bias"]))
    grads = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        grads.append({f"layers.{k}.kernel": layer.weight.grad.numpy().T.copy() for k, layer in
                      ((0, model[0]), (1, model[2]))}
                     | {f"layers.{k}.bias": layer.bias.grad.numpy().copy() for k, layer in ((0, model[0]), (1, model[2]))})
    return grads, len(y)


def shards_of(config: str, n: int) -> list[list[int]]:
    """The examples each replica gets: contiguous ``tensor_split`` shards, or DistributedSampler's (module doc)."""
    if config in ("ddp", "fsdp2"):
        return [part.tolist() for part in np.array_split(np.arange(n), R)]
    if config == "sampler":
        total = R * math.ceil(n / R)
        indices = list(range(n)) + list(range(total - n))
    else:
        total = R * (n // R)
        indices = list(range(total))
    return [indices[r:total:R] for r in range(R)]


def combine(grads, groups: list[list[int]], method: str, scale: float) -> dict[str, np.ndarray]:
    """scale * sum over groups of (each group's summed, or mean, per-example gradient)."""
    out = {}
    for key in grads[0]:
        parts = [sum(grads[i][key] for i in g) / (len(g) if method == "mean" else 1) for g in groups]
        out[key] = scale * sum(parts)
    return out


def rel_err(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    return max(float(np.max(np.abs(got[k] - want[k]))) for k in want) / max(float(np.max(np.abs(w))) for w in
                                                                              want.values())


def best_constant(got: dict, ref: dict) -> tuple[float, float]:
    """(c, max |got - c ref| / max |got|): the least-squares factor between two gradients and how far from it."""
    a = np.concatenate([got[k].ravel() for k in ref])
    b = np.concatenate([ref[k].ravel() for k in ref])
    c = float(a @ b / (b @ b))
    return c, float(np.max(np.abs(a - c * b)) / np.max(np.abs(a)))


@pytest.mark.parametrize("sharding", ["even", "uneven"])
@pytest.mark.parametrize("method", ["mean", "sum"])
def test_single_device_is_the_global_batch_reduced_by_torch(ran, sharding, method):
    job, out = ran
    grads, n = per_example_grads(job, sharding)
    row = out.methods[f"single@{sharding}/{method}"]
    assert row.status == "ok", row.error
    assert rel_err(row.grads, combine(grads, [list(range(n))], method, 1.0)) < TOL


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("sharding", ["even", "uneven"])
@pytest.mark.parametrize("method", ["mean", "sum"])
def test_each_engine_averages_the_replicas_gradients_over_what_each_saw(ran, config, sharding, method):
    """Every engine's gradient is (1/R) sum_r (replica r's reduction over its shard), on the examples the
    engine deals out (contiguous shards, or the sampler's strided, padded or cut ones), and info says so."""
    job, out = ran
    grads, n = per_example_grads(job, sharding)
    groups = shards_of(config, n)
    row = out.methods[f"{config}@{sharding}/{method}"]
    assert row.status == "ok", row.error
    assert rel_err(row.grads, combine(grads, groups, method, 1.0 / R)) < TOL
    assert row.info["shards"] == [len(g) for g in groups]
    assert row.info["examples_seen"] == sum(len(g) for g in groups)
    assert (row.info["config"], row.info["sharding"], row.info["method"]) == (config, sharding, method)
    for r, g in enumerate(groups):
        assert f"{r}: {g}" in row.info["note"]


@pytest.mark.parametrize("config", CONFIGS)
def test_factors_against_the_single_device_gradient(ran, config):
    """The conventions in one line each: sum -> 1/R of the single-device sum when every example is seen once;
    mean -> the single-device mean on equal shards; on the uneven batch mean is no constant factor (and the
    samplers' sum neither: they repeat or drop examples)."""
    _, out = ran
    single = {f"{s}/{m}": out.methods[f"single@{s}/{m}"].grads for s in ("even", "uneven") for m in ("mean", "sum")}
    engine = {key: out.methods[f"{config}@{key}"].grads for key in single}
    assert rel_err(engine["even/mean"], single["even/mean"]) < TOL
    assert rel_err(engine["even/sum"], {k: v / R for k, v in single["even/sum"].items()}) < TOL
    _, spread = best_constant(engine["uneven/mean"], single["uneven/mean"])
    assert spread > 1e-3, "with shards of 4, 4, 3 the replicas' means weigh examples unequally"
    if config in ("ddp", "fsdp2"):
        assert rel_err(engine["uneven/sum"], {k: v / R for k, v in single["uneven/sum"].items()}) < TOL
    else:
        _, spread = best_constant(engine["uneven/sum"], single["uneven/sum"])
        assert spread > 1e-3, "the sampler repeats (or drops) examples: not the global batch's sum"


def _assert_replicas_gone(error: str) -> None:
    """Every replica pid the error names has ended and was reaped (no process, not even a zombie)."""
    pids = {int(p) for p in re.findall(r"pid (\d+)", error)}
    assert len(pids) == R, error
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("kind,says", [("crash", r"replica 1 \(pid \d+\) crashed .*injected fault"),
                                       ("hang", r"replica 1 \(pid \d+\) hung: no replica progressed for 10 s")])
def test_a_failed_replica_fails_every_engine_case_and_none_outlives_the_job(kind, says):
    job = _job(configs=("ddp",), fault={"rank": 1, "kind": kind}, timeout_s=10)
    out = _run(job)
    engine = [m for m in job.methods if m.startswith("ddp@")]
    errors = {out.methods[m].error for m in engine}
    assert {out.methods[m].status for m in engine} == {"error"}
    assert len(errors) == 1, "every engine case fails with the one replica failure"
    (error,) = errors
    assert re.search(says, error, re.S), error
    assert "the worker stopped the" in error
    _assert_replicas_gone(error)
    assert all(out.methods[m].status == "ok" for m in job.methods if m.startswith("single@"))


def test_a_port_that_cannot_be_bound_is_a_clear_error():
    """192.0.2.1 (TEST-NET-1, RFC 5737) is no address of this machine: binding it fails as a taken port would."""
    from gradparity.backends.torch import parallel

    with pytest.raises(parallel.ReplicaFailed, match=r"cannot bind a TCP port on 192\.0\.2\.1 for torch\.distributed's "
                                                     r"rendezvous \(MASTER_PORT\): .*; the replicas were not started"):
        parallel.free_port("192.0.2.1")


# -- task "data_parallel_train": K optimizer steps through the engine -------------------------------------------
#
# With SGD and momentum mu (torch.optim.SGD: b_t = mu b_{t-1} + g_t, p_t = p_{t-1} - lr_t b_t), a gradient scaled
# by a constant c gives buffers c b_t, so training on c g at lr_t is training on g at c lr_t, step for step. DDP
# and FSDP2 average the replicas' gradients: with equal shards a per-replica mean averages into the global mean
# (c = 1, the single-device trajectory), a per-replica sum into (1/R) the global sum (c = 1/R: single-device
# training of the summed loss at lr_t / R).

STEPS = 4
LRS = [0.05, 0.04, 0.03, 0.02]   # one per step: the lr feeding is part of what is compared
MOMENTUM = 0.9
#: float64, 4 steps: the engines' trajectories follow the plain loop to rounding (about 1e-16 relative measured).
TRAIN_TOL = 1e-12
TRAIN_CONFIGS = ("ddp", "fsdp2")


def _train_job(cases):
    from gradparity.experiment.optimizers import OptimizerConfig
    from gradparity.experiment.parallel import data_parallel_train_job

    inp = build_inputs(load_experiment(None, PROBLEM))
    rng = np.random.default_rng(7)
    batches = [(rng.normal(size=(12, 5)), rng.integers(0, 3, size=12)) for _ in range(STEPS)]
    opt = OptimizerConfig("sgd", LRS[0], momentum=MOMENTUM).to_dict()
    runs = {case: {"optimizer": opt, "lrs": LRS} for case in cases}
    return data_parallel_train_job(BACKENDS["torch"], inp.model.to_dict(), inp.params, batches, R, runs,
                                   dtype="float64")


@pytest.fixture(scope="module")
def trained():
    """(the job, its outcome): single-device, DDP and FSDP2 training with both reductions, run once."""
    job = _train_job([f"{c}@even/{m}" for c in ("single", *TRAIN_CONFIGS) for m in ("mean", "sum")])
    return job, _run(job)


def plain_training(job, reduction: str, lrs: list[float]) -> tuple[list[dict], list[float]]:
    """Plain torch: the MLP from the job's parameters trained with torch.optim.SGD(momentum=0.9) on the job's
    batches with ``reduction`` over each whole batch at ``lrs``; (canonical parameters after each step, the loss
    replica 0's shard -- the batch's first N/R examples -- has under ``reduction`` before each step)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    p = job.params
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    layers = ((0, model[0]), (1, model[2]))
    with torch.no_grad():
        for k, layer in layers:
            layer.weight.copy_(torch.from_numpy(p[f"layers.{k}.kernel"].T.copy()))
            layer.bias.copy_(torch.from_numpy(p[f"layers.{k}.bias"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=lrs[0], momentum=MOMENTUM)
    params, shard_losses = [], []
    for t, lr in enumerate(lrs, start=1):
        x = torch.from_numpy(job.batch[f"batches/{t}/x"])
        y = torch.from_numpy(job.batch[f"batches/{t}/y"]).long()
        n0 = len(y) // R
        with torch.no_grad():
            shard_losses.append(F.cross_entropy(model(x[:n0]), y[:n0], reduction=reduction).item())
        optimizer.zero_grad()
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()
        params.append({f"layers.{k}.kernel": layer.weight.detach().numpy().T.copy() for k, layer in layers}
                      | {f"layers.{k}.bias": layer.bias.detach().numpy().copy() for k, layer in layers})
    return params, shard_losses


def trajectory(row) -> list[dict]:
    """The parameters after each step, as the worker returned them ("T/NAME")."""
    return [{k.split("/", 1)[1]: v for k, v in row.grads.items() if k.startswith(f"{t}/")}
            for t in range(1, STEPS + 1)]


def test_single_device_training_is_the_plain_loop(trained):
    job, out = trained
    for method in ("mean", "sum"):
        row = out.methods[f"single@even/{method}"]
        assert row.status == "ok", row.error
        want, _ = plain_training(job, method, LRS)
        for t, (got, ref) in enumerate(zip(trajectory(row), want), start=1):
            assert rel_err(got, ref) < TRAIN_TOL, (method, t)


@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_engine_training_with_the_mean_stays_on_the_single_device_trajectory(trained, config):
    """Equal shards (4, 4, 4), each replica's mean loss, the replicas' gradients averaged: the global mean, so
    every step's parameters are single-device training's (c = 1); the loss is replica 0's, of its shard."""
    job, out = trained
    row = out.methods[f"{config}@even/mean"]
    assert row.status == "ok", row.error
    want, shard_losses = plain_training(job, "mean", LRS)
    for t, (got, ref) in enumerate(zip(trajectory(row), want), start=1):
        assert rel_err(got, ref) < TRAIN_TOL, t
    losses = [float(row.grads[f"loss/{t}"]) for t in range(1, STEPS + 1)]
    assert np.allclose(losses, shard_losses, rtol=TRAIN_TOL, atol=0)
    assert row.info["shards"] == [4, 4, 4] and row.info["engine"].startswith(("DistributedDataParallel", "FSDP2"))
    assert f"the {R} replicas hold the same parameters" in row.info["note"]


@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_engine_training_with_the_sum_is_single_device_training_at_lr_over_r(trained, config):
    """Each replica's summed loss, averaged: (1/R) the global sum's gradient, so the trajectory is single-device
    training of the sum at lr / R (c = 1/R), and not the one at lr."""
    job, out = trained
    row = out.methods[f"{config}@even/sum"]
    assert row.status == "ok", row.error
    want, shard_losses = plain_training(job, "sum", [lr / R for lr in LRS])
    for t, (got, ref) in enumerate(zip(trajectory(row), want), start=1):
        assert rel_err(got, ref) < TRAIN_TOL, t
    losses = [float(row.grads[f"loss/{t}"]) for t in range(1, STEPS + 1)]
    assert np.allclose(losses, shard_losses, rtol=TRAIN_TOL, atol=0)
    same_lr, _ = plain_training(job, "sum", LRS)
    assert rel_err(trajectory(row)[-1], same_lr[-1]) > 1e-3, "at the same lr the sum takes R times the step"


def test_a_training_case_without_its_run_is_refused_before_any_replica_starts():
    from gradparity.backends.torch import parallel

    job = _train_job(["ddp@even/mean"])
    job.payload["runs"]["ddp@even/sum"] = job.payload["runs"].pop("ddp@even/mean")
    with pytest.raises(ValueError, match=r"case 'ddp@even/mean' has no run in payload 'runs'"):
        parallel.open_session(job)
    job = _train_job(["ddp@even/mean"])
    job.payload["runs"]["ddp@even/mean"]["reduction"] = "sum"
    with pytest.raises(ValueError, match=r"its run's reduction 'sum' is not its method 'mean'"):
        parallel.open_session(job)
