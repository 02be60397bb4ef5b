"""Task "data_parallel": the gradient a framework's own data-parallel engine applies, on R replicas of one machine.

Contract (shared by ``backends/{torch,keras,tf_keras,jax}/parallel.py``; core builds the job in
``core/experiment/parallel.py``):

- ``job.payload``: ``builtin`` (the model, as for task "gradients"), ``mode``, ``loss``, ``replicas`` (R >= 2),
  and optionally ``fault`` (tests only: ``{"rank": r, "kind": "crash" | "hang" | "exit"}``, what replica r does
  instead of its work, for the engines that start processes).
- ``job.params``: the canonical parameters (every replica starts from them). ``job.batch``: ``x``, ``y`` (the
  even global batch, R divides its size) and ``uneven/x``, ``uneven/y`` (a global batch R does not divide).
- ``job.methods``: cases ``"CONFIG@SHARDING/METHOD"`` (``parse_case``): CONFIG an engine configuration of the
  backend (``ENGINES``), SHARDING "even" | "uneven" (which global batch), METHOD "mean" | "sum" (the reduction
  the configuration's loss uses, in that engine's own terms: see ``ENGINES``); and ``"single@SHARDING/METHOD"``,
  the same framework's single-device gradient of that global batch with that reduction, computed in the
  worker without any engine (what the data-parallel gradient is compared with).
- Each case returns ``RawResult(loss, grads, info)``: ``grads`` the canonical gradient of every parameter as the
  optimizer would receive it after the engine's reduction (replica 0's, after the all-reduce), in the job's
  dtype; ``loss`` the loss value the engine reports (replica 0's, or the strategy's reduced one); ``info``
  ``engine_info(...)``: the engine's own name, the examples each replica saw, how many examples were seen in all
  (a sampler that pads repeats some), and a note.
- An engine that refuses a configuration (an uneven batch it cannot shard) raises ``EngineRefused`` with the
  engine's own message: the case fails with status "error" and that message, the others go on.
- Replicas the worker starts (torch's processes) are its children: it waits for them with a timeout, and when one
  crashes, hangs or exits, it stops the others and raises naming the replica and its error; the runner kills the
  worker's whole process group on a timeout or a signal, so no replica outlives the run.

Task "data_parallel_train" (``gradparity train --data-parallel R``; same modules, ``open_session`` sees
``job.task``): training runs instead of one gradient. ``job.payload["runs"]`` maps each case
``"CONFIG@even/METHOD"`` (and ``"single@even/METHOD"``) to ``{"optimizer": OptimizerConfig dict, "lrs": [lr at
step 1..K]}``; ``job.batch`` holds the global batches ``"batches/T/x"``, ``"batches/T/y"`` (T = 1..K, R divides
each). Each case trains from ``job.params`` with a fresh optimizer of the framework's own (the package's
``optimizers.py`` builds it from the config, as the trainer does), one step per batch through the engine (the
batch split over the replicas the way the configuration splits it, the loss reduced by METHOD, the engine's
reduction, the optimizer's step), and returns ``protocol.train_result``'s encoding: the canonical parameters after
every step ("T/NAME", replica 0's) and every step's loss ("loss/T"); ``info`` is ``engine_info``'s.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from gradparity.backends.protocol.jobs import WorkerJob
from gradparity.backends.protocol.train import train_batches

TASK = "data_parallel"
TRAIN_TASK = "data_parallel_train"
SHARDINGS = ("even", "uneven")
METHODS = ("mean", "sum")
SINGLE = "single"

#: Engine configurations per framework package: key -> (the engine's own name, the reduction each METHOD means).
#: The key is what cases and report.json's ``config`` carry; the name is report.json's ``engine``.
ENGINES: dict[str, dict[str, tuple[str, dict[str, str]]]] = {
    "torch": {
        "ddp": ("DistributedDataParallel (gloo)",
                {"mean": "F.cross_entropy(reduction='mean') on the replica's shard",
                 "sum": "F.cross_entropy(reduction='sum') on the replica's shard"}),
        "fsdp2": ("FSDP2 fully_shard (gloo)",
                  {"mean": "F.cross_entropy(reduction='mean') on the replica's shard",
                   "sum": "F.cross_entropy(reduction='sum') on the replica's shard"}),
        "sampler": ("DistributedDataParallel + DistributedSampler(drop_last=False) (gloo)",
                    {"mean": "reduction='mean' on the sampler's shard", "sum": "reduction='sum' on the sampler's shard"}),
        "sampler_drop": ("DistributedDataParallel + DistributedSampler(drop_last=True) (gloo)",
                         {"mean": "reduction='mean' on the sampler's shard",
                          "sum": "reduction='sum' on the sampler's shard"}),
    },
    "keras": {   # Keras 3 on TensorFlow (MirroredStrategy) or on JAX (keras.distribution.DataParallel)
        "mirrored_fit": ("MirroredStrategy + Keras train step (fit)",
                         {"mean": "loss reduction 'sum_over_batch_size' (Keras scales by 1/replicas)",
                          "sum": "loss reduction 'sum'"}),
        "mirrored_loop": ("MirroredStrategy custom loop",
                          {"mean": "Keras' loss object, reduction 'sum_over_batch_size' (it scales by 1/replicas "
                                   "under a strategy)", "sum": "Keras' loss object, reduction 'sum'"}),
        "mirrored_average": ("MirroredStrategy + compute_average_loss",
                             {"mean": "tf.nn.compute_average_loss(per-example losses, global_batch_size=N)",
                              "sum": "tf.nn.compute_average_loss(per-example losses * N, global_batch_size=N)"}),
        "data_parallel": ("keras.distribution.DataParallel (JAX)",
                          {"mean": "loss reduction 'sum_over_batch_size'", "sum": "loss reduction 'sum'"}),
    },
    "tf_keras": {
        "mirrored_loop": ("MirroredStrategy custom loop (TF-Keras 2)",
                          {"mean": "tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE",
                           "sum": "tf.keras.losses.Reduction.SUM"}),
        "mirrored_average": ("MirroredStrategy + compute_average_loss (TF-Keras 2)",
                             {"mean": "Reduction.NONE, then tf.nn.compute_average_loss(global_batch_size=N)",
                              "sum": "Reduction.NONE, then tf.nn.compute_average_loss(losses * N, "
                                     "global_batch_size=N)"}),
    },
    "jax": {
        "jit_sharding": ("jit + NamedSharding", {"mean": "jnp.mean over the global batch",
                                                 "sum": "jnp.sum over the global batch"}),
        "shard_map_pmean": ("shard_map + pmean", {"mean": "jnp.mean over the shard, grads lax.pmean'd",
                                                  "sum": "jnp.sum over the shard, grads lax.pmean'd"}),
        "shard_map_psum": ("shard_map + psum", {"mean": "jnp.mean over the shard, grads lax.psum'd",
                                                "sum": "jnp.sum over the shard, grads lax.psum'd"}),
    },
}


class EngineRefused(RuntimeError):
    """The engine refuses this configuration (its own message): the case fails, the others go on."""


@dataclass(frozen=True)
class Case:
    """One data-parallel case: ``config`` (a key of ``ENGINES[framework]``, or "single"), ``sharding``,
    ``method``."""

    config: str
    sharding: str
    method: str

    @property
    def single(self) -> bool:
        return self.config == SINGLE

    def __str__(self) -> str:
        return f"{self.config}@{self.sharding}/{self.method}"


def parse_case(case: str, framework: str | None = None) -> Case:
    """``"CONFIG@SHARDING/METHOD"`` as a Case; ValueError naming what is wrong (an unknown configuration for
    ``framework`` when given)."""
    try:
        head, method = case.rsplit("/", 1)
        config, sharding = head.split("@", 1)
    except ValueError:
        raise ValueError(f"data-parallel case {case!r} is not CONFIG@SHARDING/METHOD") from None
    if sharding not in SHARDINGS or method not in METHODS:
        raise ValueError(f"data-parallel case {case!r}: sharding must be one of {SHARDINGS}, method one of {METHODS}")
    if framework is not None and config != SINGLE and config not in ENGINES.get(framework, {}):
        raise ValueError(f"data-parallel case {case!r}: {framework} has no engine configuration {config!r} "
                         f"(it has: {', '.join(ENGINES.get(framework, {}))})")
    return Case(config, sharding, method)


def global_batch(job: WorkerJob, sharding: str) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) global batch of ``sharding``: the job's batch ("even") or its "uneven/" one."""
    prefix = "" if sharding == "even" else "uneven/"
    return job.batch[f"{prefix}x"], job.batch[f"{prefix}y"]


def replicas(job: WorkerJob) -> int:
    """R, the number of replicas (payload "replicas", at least 2)."""
    r = int(job.payload["replicas"])
    if r < 2:
        raise ValueError(f"a data-parallel job needs at least 2 replicas, got {r}")
    return r


def shard_sizes(n: int, r: int) -> list[int]:
    """How an engine that splits a batch of n into r contiguous shards sizes them: the first n mod r shards
    one larger (``np.array_split``, ``torch.tensor_split``, tf.distribute's split of a global batch)."""
    return [len(part) for part in np.array_split(np.arange(n), r)]


def engine_info(framework: str, case: Case, shards: list[int], seen: int | None = None, note: str = "") -> dict:
    """A case's ``RawResult.info``: the engine's own name (or "single device"), the examples each replica saw,
    the examples seen in all (default: their sum), the reduction the case's loss used, and a note."""
    if case.single:
        name, reduction = "single device", {"mean": "mean over the global batch", "sum": "sum over the global batch"}
    else:
        name, reduction = ENGINES[framework][case.config]
    return {"engine": name, "config": case.config, "sharding": case.sharding, "method": case.method,
            "shards": [int(s) for s in shards], "examples_seen": int(sum(shards) if seen is None else seen),
            "reduction": reduction[case.method], "note": note}


def training_view(job: WorkerJob, framework: str) -> WorkerJob:
    """A "data_parallel_train" job as the package trainers read it: each run's ``"reduction"`` its case's METHOD
    (the contract's runs carry none) and batch 1 as the model's ``x``, ``y`` (what a model session is built on).
    ValueError, before any replica or model is built, for a case that is not ``CONFIG@even/METHOD`` of
    ``framework`` with a run in payload "runs", or a run whose own reduction contradicts its METHOD."""
    runs = job.payload.get("runs")
    if not isinstance(runs, dict):
        raise ValueError("a data_parallel_train job needs payload 'runs': {case: {'optimizer': ..., 'lrs': [...]}}")
    out = {}
    for case in job.methods:
        c = parse_case(case, framework)
        if c.sharding != "even":
            raise ValueError(f"data-parallel training case {case!r}: training batches are even (R divides each), "
                             "so the sharding is 'even'")
        if case not in runs:
            raise ValueError(f"data-parallel training case {case!r} has no run in payload 'runs'")
        given = runs[case].get("reduction", c.method)
        if given != c.method:
            raise ValueError(f"data-parallel training case {case!r}: its run's reduction {given!r} is not its "
                             f"method {c.method!r}")
        out[case] = dict(runs[case], reduction=c.method)
    (x, y), *_ = train_batches(job)
    return replace(job, payload=dict(job.payload, runs=out), batch=dict(job.batch, x=x, y=y))
