"""``gradparity benchmark --verdict``: the default ``gradparity run``'s wall time against its floor.

The floor is what no tool can avoid: one fresh Python process that imports PyTorch, TensorFlow with Keras and
JAX with Flax and Optax, and computes one gradient of the default problem's model (the MLP 64-32-10 ReLU,
cross-entropy, a batch of 64, float32) in each. Both are run as fresh processes, alternately (floor, run,
floor, run, ...), so that a machine that gets busier or quieter affects both alike; the report gives each
one's median wall and CPU time (user + system, of the process and its children) and their ratio. A
measurement, not a test: its figures depend on the machine and are reported with it.
"""
from __future__ import annotations

import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field

#: The floor's program (run with ``python -c``): imports and one gradient of the default MLP per framework.
FLOOR_PROGRAM = textwrap.dedent(r'''
    import os
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    y = rng.integers(0, 10, 64)

    import torch
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()

    import keras
    import tensorflow as tf
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        value = loss(y, model(x))
    tape.gradient(value, model.trainable_variables)

    import jax
    import optax
    from flax import nnx
    mlp = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(32, 10, rngs=nnx.Rngs(1)))
    nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(mlp)
    ''')


@dataclass
class Timing:
    """One kind of process timed ``len(wall)`` times: its wall and CPU seconds per run, and its exit codes."""

    label: str
    command: list[str]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time_once(t: Timing, timeout_s: float) -> None:
    cpu0, start = _children_cpu(), time.perf_counter()
    try:
        code = subprocess.run(t.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:  # run() killed it at --timeout: a failed run (exit 3), not a traceback
        code = -signal.SIGKILL
    t.wall.append(time.perf_counter() - start)
    t.cpu.append(_children_cpu() - cpu0)
    t.codes.append(code)


def time_to_verdict(repeat: int = 3, timeout_s: float = 600.0, progress=None) -> tuple[Timing, Timing]:
    """(floor, run): each timed ``repeat`` times, alternately, as fresh processes."""
    say = progress or (lambda _m: None)
    with tempfile.TemporaryDirectory(prefix="gradparity-benchmark-") as tmp:
        floor = Timing("floor: import torch, TensorFlow+Keras, JAX+Flax; one MLP gradient in each",
                       [sys.executable, "-c", FLOOR_PROGRAM])
        run = Timing("gradparity run (the embedded default experiment, 4 backends x 5 methods)",
                     [sys.executable, "-m", "gradparity", "run", "--quiet", "--out", os.path.join(tmp, "out")])
        for i in range(1, repeat + 1):
            for t in (floor, run):
                say(f"pair {i} of {repeat}: {t.label.split(':')[0]} ...")
                _time_once(t, timeout_s)
    return floor, run


def render(floor: Timing, run: Timing) -> str:
    lines = [f"time to a verdict, {len(run.wall)} alternating pairs of fresh processes; medians "
             f"(Python {platform.python_version()}, {os.cpu_count()} cores, {platform.platform()}):"]
    for t in (floor, run):
        lines.append(f"  {t.label}")
        lines.append(f"    wall {t.wall_median:6.1f} s   CPU {t.cpu_median:6.1f} s   "
                     f"(each: {', '.join(f'{w:.1f}' for w in t.wall)} s; exit {sorted(set(t.codes))})")
    lines.append(f"  ratio run / floor: wall {run.wall_median / floor.wall_median:.2f}x, "
                 f"CPU {run.cpu_median / floor.cpu_median:.2f}x")
    return "\n".join(lines)


def to_dict(floor: Timing, run: Timing) -> dict:
    return {"schema": "gradparity.benchmark.verdict/1", "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "floor": {"label": floor.label, "wall_s": floor.wall, "cpu_s": floor.cpu, "exit_codes": floor.codes},
            "run": {"label": run.label, "wall_s": run.wall, "cpu_s": run.cpu, "exit_codes": run.codes},
            "ratio_wall": run.wall_median / floor.wall_median, "ratio_cpu": run.cpu_median / floor.cpu_median}
