"""Data-parallel experiments (``gradparity run --data-parallel R``, ``[parallel]``): what to run on each framework's
own data-parallel engine, the global batches, the worker's environment, and what each configuration should
give (``expected_factor``, the frameworks' documented conventions), checked before any process starts.

The worker side is task "data_parallel" (``backends/protocol/parallel.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from gradparity.backends import BACKENDS, BackendInfo, make_job
from gradparity.backends.protocol import builtin_payload
from gradparity.backends.protocol.parallel import ENGINES, METHODS, SHARDINGS, SINGLE, TASK

#: Backends with data-parallel engines, in report order, and the engine configurations each runs by default.
#: Keras 3 runs MirroredStrategy on its TensorFlow backend and keras.distribution.DataParallel on JAX.
CONFIGS: dict[str, tuple[str, ...]] = {
    "torch": ("ddp", "fsdp2", "sampler", "sampler_drop"),
    "keras-tensorflow": ("mirrored_fit", "mirrored_loop", "mirrored_average"),
    "tf-keras": ("mirrored_loop", "mirrored_average"),
    "jax": ("jit_sharding", "shard_map_pmean", "shard_map_psum"),
    "keras-jax": ("data_parallel",),
}
#: The environment variable that gives a data-parallel worker its replica count before any framework is imported
#: (and keeps it apart from the served workers of other jobs).
REPLICAS_ENV = "GRADPARITY_REPLICAS"


#: Resident memory of one replica process that imports torch (measured here: about 0.35 GiB each), for the check
#: that R replicas fit before any starts.
REPLICA_MEMORY_BYTES = 400 * 2 ** 20


@dataclass(frozen=True)
class ParallelSpec:
    """``[parallel]``: ``replicas`` R (0: off) and the backends whose engines run (every backend of the run
    that has engines, TF-Keras 2 beside Keras on TensorFlow, unless given)."""

    replicas: int = 0
    backends: tuple[str, ...] = ()

    @property
    def on(self) -> bool:
        return self.replicas > 0

    def to_dict(self) -> dict:
        return {"replicas": self.replicas, "backends": list(self.backends)}


def default_backends(run_backends: tuple[str, ...]) -> tuple[str, ...]:
    """The run's backends that have data-parallel engines, and TF-Keras 2 when Keras runs on TensorFlow."""
    out = [b for b in run_backends if b in CONFIGS]
    if "keras-tensorflow" in out and "tf-keras" not in out:
        out.insert(out.index("keras-tensorflow") + 1, "tf-keras")
    return tuple(out)


def check_parallel(table: dict, run_backends: tuple[str, ...], batch_size: int, model_kind: str,
                   switches) -> tuple[ParallelSpec, list[str]]:
    """The ``[parallel]`` table as a ParallelSpec, and every problem with it (config only: what is installed, the
    ports and the memory are ``preflight``'s)."""
    problems = []
    r = table.get("replicas", 0)
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        return ParallelSpec(), [f"parallel.replicas must be a whole number of replicas (0: off), got {r!r}"]
    if r == 0:
        return ParallelSpec(), []
    if r == 1:
        problems.append("parallel.replicas = 1 is one device, the single-device gradient itself: give R >= 2 "
                        "replicas (or 0 to turn data-parallel off)")
    elif r > batch_size // 2:
        problems.append(f"parallel.replicas = {r} is more than half the batch of {batch_size}: every replica needs "
                        f"at least 2 examples of the even global batch and 1 of the uneven one; give R <= "
                        f"{batch_size // 2} or a larger data.batch_size")
    given = table.get("backends")
    if given is not None and (not isinstance(given, list) or not all(isinstance(b, str) for b in given)):
        problems.append(f"parallel.backends must be a list of backend names, got {given!r}")
        given = None
    backends = tuple(given) if given is not None else default_backends(run_backends)
    unknown = [b for b in backends if b not in CONFIGS]
    if unknown:
        problems.append(f"parallel.backends {unknown}: data-parallel engines exist for {', '.join(CONFIGS)}")
    if not backends:
        problems.append(f"no backend of the run ({', '.join(run_backends)}) has a data-parallel engine: add one of "
                        f"{', '.join(CONFIGS)} to backends, or name them in parallel.backends")
    if model_kind != "mlp":
        problems.append(f"data-parallel runs the built-in MLP (model.kind = 'mlp'), not {model_kind!r}")
    if switches:
        problems.append(f"the discrepancy switches ({', '.join(switches)}) act on the single-device methods, not on "
                        "the data-parallel engines: turn them off to run parallel.replicas")
    return ParallelSpec(r, backends), problems


def preflight(spec: ParallelSpec, memory_available: int | None = None) -> None:
    """What must hold before any process starts (ConfigError, exit 2): every engine's framework installed, a
    loopback port to bind for torch's replicas, and memory for R replica processes."""
    import importlib.util
    import socket

    from gradparity.errors import ConfigError

    problems = []
    for b in spec.backends:
        info = BACKENDS[b]
        missing = [m for m in info.requires if importlib.util.find_spec(m) is None]
        if missing:
            problems.append(f"{b}'s data-parallel engines need {', '.join(missing)}, which is not installed: "
                            f"pip install -c constraints.txt -e '.[{info.extra}]', or leave {b} out of "
                            "parallel.backends")
    if "torch" in spec.backends:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
        except OSError as exc:
            problems.append(f"torch's replicas talk over the loopback interface, and no port of 127.0.0.1 can be "
                            f"bound here: {exc}")
        if memory_available is not None and spec.replicas * REPLICA_MEMORY_BYTES > memory_available:
            problems.append(f"{spec.replicas} torch replicas need about {spec.replicas * REPLICA_MEMORY_BYTES / 2**30:.1f}"
                            f" GiB ({REPLICA_MEMORY_BYTES / 2**20:.0f} MiB each), and this machine has "
                            f"{memory_available / 2**30:.1f} GiB available: give fewer replicas")
    if problems:
        raise ConfigError(problems)


@dataclass(frozen=True)
class Batches:
    """The two global batches: ``even`` examples (R divides it) and ``uneven`` (R does not)."""

    even: int
    uneven: int


def global_batches(n: int, r: int) -> Batches:
    """The even global batch is the first R * floor(N / R) examples of the experiment's batch; the uneven one the
    whole batch when R does not divide N, else its first N - 1 examples."""
    even = r * (n // r)
    return Batches(even, n if n % r else n - 1)


def batch_arrays(x: np.ndarray, y: np.ndarray, r: int) -> dict[str, np.ndarray]:
    """The job's batch: "x", "y" (the even global batch) and "uneven/x", "uneven/y" (``global_batches``)."""
    b = global_batches(len(y), r)
    return {"x": x[:b.even], "y": y[:b.even], "uneven/x": x[:b.uneven], "uneven/y": y[:b.uneven]}


def cases(backend: str, configs: tuple[str, ...] | None = None) -> list[str]:
    """Every case a backend's data-parallel worker runs: each configuration and the single-device gradient, on
    both global batches, with both reductions (``protocol.parallel.parse_case``)."""
    chosen = configs if configs is not None else CONFIGS[backend]
    return [f"{c}@{s}/{m}" for c in (SINGLE, *chosen) for s in SHARDINGS for m in METHODS]


def worker_env(r: int) -> dict[str, str]:
    """What a data-parallel worker starts with: R (``REPLICAS_ENV``), and R host devices for XLA (read once, at
    ``import jax``), kept with any XLA_FLAGS the user set."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    return {REPLICAS_ENV: str(r), "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={r}".strip()}


def data_parallel_job(info: BackendInfo, model: dict, params: dict, x: np.ndarray, y: np.ndarray, r: int, *,
                      dtype: str, loss: str = "cross_entropy", mode: str = "inference",
                      configs: tuple[str, ...] | None = None, fault: dict | None = None):
    """The job of ``info``'s data-parallel worker: ``cases(info.name, configs)`` on the built-in ``model`` (a
    ``to_dict()``) from ``params``, the global batches cut from (x, y) for R replicas. ``fault`` (tests):
    what one replica does instead of its work."""
    extra = {"replicas": int(r)}
    if fault is not None:
        extra["fault"] = dict(fault)
    return make_job(info, TASK, cases(info.name, configs), dtype=dtype, model=model, loss={"name": loss},
                    params=params, batch=batch_arrays(x, y, r),
                    payload=builtin_payload(model, mode=mode, loss=loss, **extra))


def keras_scale(r: int) -> Fraction:
    """The 1/R Keras 3 multiplies a mean loss by under a strategy: ``ops.cast(1.0 / R, dtype)``, which TensorFlow
    converts through float32 (so R * scale is 1 + 3e-8 for R = 3 in float64, exactly 1 for a power of two)."""
    return Fraction(float(np.float32(1.0 / r)))


def expected_refusal(backend: str, config: str, method: str, n: int, r: int) -> str | None:
    """Why the engine refuses this configuration by its own rules, or None when it runs it."""
    if backend in ("jax", "keras-jax") and n % r:
        return f"XLA's sharding needs R = {r} to divide the global batch of {n}"
    if backend == "tf-keras" and config == "mirrored_loop" and method == "mean":
        return ("TF-Keras 2 refuses Reduction.SUM_OVER_BATCH_SIZE (and AUTO) inside a strategy's custom loop: "
                "use Reduction.SUM or NONE with tf.nn.compute_average_loss")
    return None


def framework_of(backend: str) -> str:
    """The package whose ``ENGINES`` a backend's configurations are (Keras 3 on any backend: "keras")."""
    return BACKENDS[backend].framework


def engine_name(backend: str, config: str) -> str:
    return ENGINES[framework_of(backend)][config][0]


def expected_factor(backend: str, config: str, method: str, shards: list[int], n: int) -> Fraction | None:
    """The factor the framework's documented convention predicts between the engine's gradient and the
    single-device gradient of the same global batch of ``n`` with the same reduction, for replicas holding
    ``shards`` examples (what they saw: a padding sampler's shards sum past n); None when it is not one constant
    (the examples are weighed unequally, or some are missing or repeated)."""
    r = len(shards)
    same_examples = sum(shards) == n
    equal = len(set(shards)) == 1
    if not same_examples:
        return None  # a sampler that pads repeats examples, one that drops loses some: another batch's gradient
    if config in ("shard_map_pmean", "shard_map_psum"):
        # shard_map's default check_vma=True: the replicated parameters meet the shard through an implicit pvary,
        # whose transpose is a psum, so jax.grad inside the body already sums the shards' gradients (JAX's
        # shard_map guide, "Tracking how values vary over manual mesh axes"); pmean of that invariant value
        # leaves it, psum adds R copies. sum -> sum (pmean) or R * sum (psum); mean -> R * mean or R^2 * mean.
        if not equal and method == "mean":
            return None
        base = Fraction(1) if method == "sum" else Fraction(r)
        return base if config == "shard_map_pmean" else base * r
    if config in ("ddp", "fsdp2", "sampler", "sampler_drop"):
        # The replicas' gradients are averaged: sum -> (1/R) sum; mean -> (1/R) sum_r mean_r, which is the mean
        # only when every shard has N/R examples.
        if method == "sum":
            return Fraction(1, r)
        return Fraction(1) if equal else None
    if config in ("mirrored_fit", "mirrored_loop") and backend != "tf-keras":
        # Keras 3's loss object scales "sum_over_batch_size" and "mean" by 1/R under a strategy, in fit and in a
        # custom loop alike (keras/src/losses/loss.py, reduce_values -> scale_loss_for_distribution), with 1/R
        # cast to float32 first; "sum" is never scaled. The strategy sums the replicas' gradients.
        if method == "sum":
            return Fraction(1)
        return r * keras_scale(r) if equal else None
    if config == "mirrored_loop":
        # TF-Keras 2: Reduction.SUM sums each replica's shard, the strategy sums them (its mean is refused).
        return Fraction(1) if method == "sum" else None
    if config == "mirrored_average":
        return Fraction(1)   # divided by the global batch, summed: exactly the single-device reduction
    if config in ("jit_sharding", "data_parallel"):
        return Fraction(1)   # the loss is the global batch's: the compiler's reduction is the single-device one
    raise ValueError(f"no convention recorded for {backend} {config!r}")


#: The fix for a per-replica mean on unequal shards, in each framework's terms: divide by the global batch.
_GLOBAL_MEAN = {
    "torch": "make each replica's loss its summed loss times R / N (DDP then averages it into the global mean)",
    "keras": "divide by the global batch: tf.nn.compute_average_loss(per_example_loss, global_batch_size=N)",
    "tf_keras": "divide by the global batch: Reduction.NONE, then tf.nn.compute_average_loss(per_example_loss, "
                "global_batch_size=N)",
    "jax": "sum each shard's loss terms and divide by the global batch N before the psum (or pmean times R)",
}
#: What the engine does with the replicas' gradients, by configuration.
_COMBINES = {"ddp": "averages", "fsdp2": "averages", "sampler": "averages", "sampler_drop": "averages",
             "shard_map_pmean": "sums inside jax.grad (shard_map's check_vma), then pmean leaves",
             "mirrored_loop": "sums (after Keras' loss object scaled a mean by 1/R; TF-Keras 2's does not)",
             "shard_map_psum": "sums inside jax.grad (shard_map's check_vma), then psum sums again",
             "mirrored_fit": "sums (after Keras' loss object scaled a mean by 1/R)",
             "mirrored_average": "sums",
             "jit_sharding": "leaves to the compiler (the loss is the global batch's)",
             "data_parallel": "leaves to the compiler (the loss is the global batch's)"}


def advice(backend: str, config: str, method: str, r: int, n: int, shards: list[int], seen: int | None,
           factor: float | None, tol: float) -> str:
    """What the measured factor means and what to change, in the engine's own terms."""
    fw = framework_of(backend)
    combines = _COMBINES.get(config, "combines")
    if seen is not None and seen > n:
        return (f"the sampler repeated {seen - n} example(s) so that every replica gets {max(shards)}: the gradient "
                f"of another batch ({seen} examples, some twice); use drop_last=True or a global batch R = {r} "
                "divides")
    if seen is not None and seen < n:
        return (f"drop_last dropped {n - seen} example(s): the gradient of {seen} examples, not {n}; use a global "
                f"batch R = {r} divides if every example must count")
    if config.startswith("shard_map") and factor is not None and abs(factor - 1) > tol:
        return (f"{factor_words(factor, r)}: under shard_map's default check_vma=True, jax.grad inside the body "
                "already sums the replicated parameters' gradient over the shards (the transpose of the implicit "
                "pvary is a psum), so a following lax.pmean changes nothing and lax.psum multiplies by R again; "
                "take jax.grad outside shard_map of the lax.pmean of each shard's mean loss, or divide each "
                "shard's summed loss by the global batch N inside the body (both give the single-device mean)")
    if factor is None:
        return (f"not one constant factor: the engine {combines} the replicas' gradients and each replica "
                f"reduced its own shard ({'/'.join(map(str, shards))} examples), so the examples are weighed "
                f"unequally; {_GLOBAL_MEAN[fw]}, or use a global batch R = {r} divides")
    if abs(factor - 1) <= tol:
        return "the single-device gradient: nothing to change"
    if fw == "keras" and method == "mean" and abs(factor - float(r * keras_scale(r))) <= tol:
        return (f"1 + {factor - 1:.2g}: Keras scales the mean by 1/R = 1/{r} computed in float32 (ops.cast(1.0 / R, "
                "dtype) goes through float32), the strategy sums; below float32's rounding, visible in float64; "
                "for an exact float64 mean divide by the global batch yourself (compute_average_loss)")
    if abs(factor * r - 1) <= tol * 1:
        return (f"{r} times smaller: the engine {combines} the replicas' gradients, so a summed loss comes out "
                f"1/R of the single-device sum; multiply the loss (or the learning rate) by R = {r}, or use the mean "
                "with equal shards")
    if abs(factor / r - 1) <= tol:
        return (f"{r} times larger: the engine {combines} the replicas' gradients, so each replica's mean adds "
                f"up to R = {r} times the single-device mean; {_GLOBAL_MEAN[fw]}"
                + (" (Keras' fit does it for you)" if fw == "keras" else "")
                + ("; or lax.pmean instead of lax.psum" if config == "shard_map_psum" else ""))
    return f"{factor_words(factor, r)}: the engine {combines} the replicas' gradients"


def factor_words(factor: float, r: int) -> str:
    """"R = 4 times larger", "R^2 = 16 times larger", "4 times smaller" or the number."""
    for power, name in ((1, f"R = {r}"), (2, f"R^2 = {r * r}")):
        if abs(factor / r ** power - 1) < 1e-6:
            return f"{name} times larger"
        if abs(factor * r ** power - 1) < 1e-6:
            return f"{name} times smaller"
    return f"{factor:.6g} times the single-device gradient"


def data_parallel_train_job(info: BackendInfo, model: dict, params: dict, batches: list, r: int, runs: dict, *,
                            dtype: str, loss: str = "cross_entropy", mode: str = "inference"):
    """The job of ``info``'s data-parallel trainer (task "data_parallel_train"): ``runs`` ({case: {"optimizer":
    OptimizerConfig dict, "lrs": [...]}}, cases "CONFIG@even/METHOD" and "single@even/METHOD") on the global
    ``batches`` [(x, y), ...] (R divides each), from ``params``."""
    from gradparity.backends.protocol.parallel import TRAIN_TASK

    batch = {}
    for t, (x, y) in enumerate(batches, start=1):
        if len(y) % r:
            raise ValueError(f"training batch {t} has {len(y)} examples, which R = {r} does not divide")
        batch[f"batches/{t}/x"], batch[f"batches/{t}/y"] = x, y
    return make_job(info, TRAIN_TASK, tuple(runs), dtype=dtype, model=model, loss={"name": loss}, params=params,
                    batch=batch, payload=builtin_payload(model, mode=mode, loss=loss, replicas=int(r), runs=runs))
