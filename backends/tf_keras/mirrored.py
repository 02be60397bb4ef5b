"""``tf.distribute.MirroredStrategy`` over R logical CPU devices: what the data-parallel sessions of Keras 3 on
TensorFlow (``backends/keras/parallel.py``) and of TF-Keras 2 (``backends/tf_keras/parallel.py``) share.

TensorFlow only (no Keras of either kind is imported here), like ``device.pin_tf_device``. Imported only inside a
worker process. ``logical_cpus`` must run before TensorFlow's runtime starts (before any tensor exists): the
logical devices of a physical CPU can only be configured then.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf



def logical_cpus(r: int) -> list[str]:
    """The names of R logical CPU devices, configured on the first physical CPU before the runtime starts
    (``tf.config.set_logical_device_configuration``). A worker that already configured them (a served worker's
    second job of the same R) reuses them; RuntimeError when the runtime started with fewer."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * r)
    except RuntimeError:  # the runtime has started: the devices are whatever it started with
        pass
    names = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(names) < r:
        raise RuntimeError(f"data-parallel on {r} replicas needs {r} logical CPU devices, but TensorFlow's "
                           f"runtime started with {len(names)} before they could be configured (something "
                           "created a tensor first)")
    return names[:r]


#: The strategy of each set of devices, one per process (``mirrored_strategy``).
_STRATEGIES: dict[tuple[str, ...], object] = {}


def mirrored_strategy(devices: list[str]):
    """``tf.distribute.MirroredStrategy(devices)``, made once per process: a served worker's later job reuses
    it. A second strategy's collective all-reduces would start again from the first one's instance keys, which
    TensorFlow's collective executor still holds with the first job's dtype and refuses ("Collective instance
    100 expected ... data_type 2 but got ... data_type 1" for a float32 job after a float64 one)."""
    key = tuple(devices)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = tf.distribute.MirroredStrategy(devices)
    return _STRATEGIES[key]


def strategy_facts(strategy) -> dict:
    """The strategy's devices and the cross-device all-reduce it chose (for ``environment()``)."""
    ops = strategy.extended._cross_device_ops  # noqa: SLF001 - the only place TensorFlow records its choice
    return {"strategy": type(strategy).__name__, "devices": list(strategy.extended.worker_devices),
            "cross_device_ops": type(ops).__name__ if ops is not None else None}


def distribute(strategy, x, y):
    """(x, y) of one global batch as tf.distribute splits it: ``experimental_distribute_dataset`` of the
    batch as one element (``Dataset.from_tensor_slices((x, y)).batch(N)``), what ``fit`` and a custom loop
    iterate; returns (per-replica x, per-replica y, the examples each replica got, in replica order)."""
    n = int(y.shape[0])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(n)
    px, py = next(iter(strategy.experimental_distribute_dataset(dataset)))
    return px, py, [int(t.shape[0]) for t in strategy.experimental_local_results(py)]


def last_batch_shards(strategy, x, y, batch_size: int) -> list[int]:
    """The examples each replica gets of the last batch of ``Dataset.from_tensor_slices((x, y)).batch(B)``
    (the epoch ``fit`` iterates, distributed as ``fit`` distributes it)."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    last = None
    for last in strategy.experimental_distribute_dataset(dataset):
        pass
    return [int(t.shape[0]) for t in strategy.experimental_local_results(last[1])]


def replica_copies(strategy, variables) -> tuple[list[np.ndarray], float]:
    """Replica 0's value of each mirrored variable, and the largest difference between any replica's copy and
    replica 0's (0 when the all-reduce handed every replica the same gradient)."""
    first, spread = [], 0.0
    for v in variables:
        copies = [np.asarray(c.numpy()) for c in strategy.experimental_local_results(v)]
        first.append(np.array(copies[0], copy=True))
        spread = max([spread, *(float(np.max(np.abs(c - copies[0]), initial=0.0)) for c in copies[1:])])
    return first, spread


def agreement(spread: float) -> str:
    """The note's words on the replicas' copies of the applied gradient."""
    return ("every replica's copy of it is identical" if spread == 0.0
            else f"the replicas' copies of it differ by up to {spread:.3g}")
