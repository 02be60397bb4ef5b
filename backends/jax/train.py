"""JAX training runs (task "train"): the Flax NNX MLP trained with optax, parameters recorded every step.

Contract (shared by ``backends/{torch,keras,jax}/train.py``): ``open_session(job)`` returns a session whose
``compute(case)`` runs ``job.payload["runs"][case]`` = ``{"optimizer": OptimizerConfig dict, "lrs": [lr at
step 1..K], "reduction": "mean" | "sum"}`` (a run with ``"weights": true``: "sum" | "weighted_mean" |
"sum_over_batch_size" of the per-example weights ``…/batches/t/w``, see ``protocol.TRAIN_REDUCTIONS``) from
scratch: fresh parameters from the canonical ``job.params`` and a fresh optimizer state, then for t = 1..K the
cross-entropy of batch t (``job.batch["batches/t/x"]``, ``["batches/t/y"]``; the last batch of an epoch may be
short) reduced over the batch, its gradient, and one optimizer step at ``lrs[t-1]``. It returns
``RawResult(loss=loss_K, grads={"t/NAME": parameters after step t (canonical layout, job dtype)} |
{"loss/t": loss_t}, info={"optimizer": ..., "loop": ...})``.

Here that is the functional NNX/optax idiom: ``graphdef, params = nnx.split(model)``, a loss
``jnp.mean | jnp.sum(optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, params)(x), y))``,
and one ``jax.jit``-compiled step ``jax.value_and_grad`` -> ``opt.update`` -> ``optax.apply_updates``, with the
model, its canonical mapping, device and precision of ``session.py``, the optax transformation of
``optimizers.py`` and its learning-rate schedule ``count -> lrs[count]`` (the table an argument of the step).
With weights the per-example losses are multiplied by w and summed, then divided by ``jnp.sum(w)``
("weighted_mean") or by N ("sum_over_batch_size"); optax has no reduction of its own. The step is compiled once per optimizer (lr aside), reduction and batch shape
(a short last batch is a second trace; the worker's warm-up call pays them); every call starts from fresh
parameters and ``opt.init``.

Read at import by jax: ``JAX_ENABLE_X64`` (float64 jobs need it; see ``session.start``). Imported only
inside a worker process.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradparity.backends.jax.optimizers import build_transformation, environment_note
from gradparity.backends.jax.session import state_to_canonical, build_mlp, linear_precision, mlp_environment, start
from gradparity.backends.protocol import RawResult, WorkerJob, train_batches, train_result, train_run, train_weights

LOOP = ("jax.jit(step): loss, grads = jax.value_and_grad(loss_fn)(params, x_t, y_t[, w_t]); "
        "updates, opt_state = opt.update(grads, opt_state, params); params = optax.apply_updates(params, updates) "
        "[loss_fn: jnp.REDUCTION(optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, params)(x), y)); "
        "weighted: jnp.sum(l * w) [/ jnp.sum(w) | / N]]")


class JaxTrainSession:
    """Initial parameters and batches on the device; one jitted step function per case."""

    def __init__(self, job: WorkerJob):
        if job.model.get("kind", "mlp") != "mlp" or job.batchnorm_epsilon is not None:
            raise ValueError("jax training runs take the built-in MLP without batch normalization")
        if any(job.switches.values()):
            raise ValueError(f"jax training runs take no discrepancy switches (got {job.switches})")
        self.job = job
        self.device, self.device_note = start(job)
        self.layer_precision = linear_precision(job)
        # Immutable arrays: every compute() can start from these very parameters, no copy needed.
        self.graphdef, self.params, _ = build_mlp(job, self.device, self.layer_precision)
        self._batches: dict[str, list] = {}
        self._weights: dict[str, list] = {}
        # On the device once: a timed compute() is the loop alone.
        self._run_weights = {case: self.weights(case) for case in job.payload["runs"]}
        self._steps: dict[tuple, tuple] = {}
        self._tables: dict[str, object] = {}

    def batches(self, run: dict) -> list:
        """The run's batches on the device (int32 labels, as session.py has them), converted on first use."""
        prefix = run.get("batches", "")
        if prefix not in self._batches:
            dtype = jnp.dtype(self.job.dtype)
            self._batches[prefix] = [(jax.device_put(np.asarray(x, dtype=dtype), self.device),
                                      jax.device_put(np.asarray(y).astype(np.int32), self.device))
                                     for x, y in train_batches(self.job, prefix)]
        return self._batches[prefix]

    def weights(self, case: str) -> list | None:
        """The case's per-example weights per step on the device (once per batch sequence), or None (unweighted);
        its batches converted too."""
        run = self.job.payload["runs"][case]
        weights = train_weights(self.job, case, len(self.batches(run)))
        if weights is None:
            return None
        prefix = run.get("batches", "")
        if prefix not in self._weights:
            dtype = jnp.dtype(self.job.dtype)
            self._weights[prefix] = [jax.device_put(np.asarray(w, dtype=dtype), self.device) for w in weights]
        return self._weights[prefix]

    def environment(self) -> dict:
        first = next(iter(self._batches.values()))
        return mlp_environment(self.job, self.params, first[0][0].dtype, self.device, self.device_note,
                               self.layer_precision)

    def _compiled(self, config: dict, reduction: str):
        """(jitted opt.init, jitted step) for an optimizer config (its lr aside) and a reduction, built on first
        use. The step takes the run's learning rates as an argument: ``schedule(count) = table[count]``, as
        ``optimizers.lr_schedule`` reads its table, but traced rather than baked in, so that runs differing only
        in their learning rates (a sweep's grid) share one compilation per batch shape."""
        key = (json.dumps({k: v for k, v in config.items() if k != "lr"}, sort_keys=True), reduction)
        if key not in self._steps:
            graphdef = self.graphdef
            reduce = {"mean": lambda l, w: jnp.mean(l), "sum": lambda l, w: jnp.sum(l if w is None else l * w),
                      "weighted_mean": lambda l, w: jnp.sum(l * w) / jnp.sum(w),
                      "sum_over_batch_size": lambda l, w: jnp.sum(l * w) / l.shape[0]}[reduction]

            def loss_fn(params, x, y, w):
                logits = nnx.merge(graphdef, params)(x)
                return reduce(optax.softmax_cross_entropy_with_integer_labels(logits, y), w)

            def step(params, opt_state, x, y, w, table):
                opt = build_transformation(config, lambda count: table[count])
                loss, grads = jax.value_and_grad(loss_fn)(params, x, y, w)
                updates, opt_state = opt.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            # The state's structure does not depend on the schedule's values. opt.init jitted too, so its zero
            # moments and count land on the parameters' device.
            init = build_transformation(config, lambda count: jnp.zeros((), jnp.dtype(self.job.dtype))).init
            self._steps[key] = (jax.jit(init), jax.jit(step))
        return self._steps[key]

    def table(self, case: str, lrs: list[float]):
        """The case's learning rates on the device in the job's dtype (the schedule's table), once per case."""
        if case not in self._tables:
            self._tables[case] = jax.device_put(np.asarray(lrs, dtype=self.job.dtype), self.device)
        return self._tables[case]

    def compute(self, case: str) -> RawResult:
        """Train for K steps from the canonical start; the parameters after every step and every step's loss."""
        run = self.job.payload["runs"][case]
        batches = self.batches(run)
        config, lrs, reduction, record = train_run(self.job, case, len(batches))
        weights = self._run_weights[case] or [None] * len(batches)  # None: an empty pytree under jit
        init, step = self._compiled(config, reduction)
        table = self.table(case, lrs)
        params = self.params
        opt_state = init(params)
        history, losses = [], []
        for t, ((x, y), w) in enumerate(zip(batches, weights), start=1):
            params, opt_state, loss = step(params, opt_state, x, y, w, table)
            # Arrays are immutable: keeping each step's params is free, read back once after the loop.
            if t in record:
                history.append((t, params))
            losses.append(loss)
        arrays = {f"{t}/{name}": np.array(value, copy=True)
                  for t, p in history for name, value in state_to_canonical(p).items()}
        return train_result(self.job, arrays, [float(v) for v in losses],
                            {"optimizer": environment_note(config), "loop": LOOP})


def open_session(job: WorkerJob) -> JaxTrainSession:
    """The worker's entry for task "train": check x64, pick the device, pin precision, build the parameters."""
    return JaxTrainSession(job)
