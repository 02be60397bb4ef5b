"""JAX data parallelism on R devices of one machine (task "data_parallel", ``protocol.parallel``): the gradient
that ``jax.jit`` over sharded arrays, and ``jax.shard_map`` with ``lax.pmean`` / ``lax.psum``, hand an optimizer.

The model, its pure loss and the canonical converters are the model session's (``session.ModelSession``: the
built-in model of the job loaded with ``job.params``); the loss of a case is ``ModelSession.loss(params, x, y,
METHOD)``: ``jnp.mean`` or ``jnp.sum`` of the per-example losses of the rows it is given. The devices are R
devices of the session's platform (host CPUs: core starts the worker with
``XLA_FLAGS=--xla_force_host_platform_device_count=R``, read once at ``import jax``), in one
``Mesh(devices[:R], ("data",))``; the parameters are replicated on it (``NamedSharding(mesh, P())``).

Configurations (``protocol.parallel.ENGINES["jax"]``):

- "jit_sharding": the global batch placed with ``jax.device_put(x, NamedSharding(mesh, P("data")))`` and the
  same jitted ``jax.value_and_grad`` of the global batch's loss the single-device case runs: XLA partitions it
  and inserts the all-reduce of the replicated parameters' gradients itself.
- "shard_map_pmean" / "shard_map_psum": ``jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data"),
  P("data")), out_specs=P()))`` with ``jax.shard_map``'s defaults (``check_vma=True``); the body takes
  ``jax.value_and_grad`` of its shard's loss and all-reduces (loss, gradients) with ``lax.pmean`` or
  ``lax.psum`` over "data". shard_map is handed the host arrays, so that it splits the batch itself.
  With ``check_vma=True`` JAX tracks which values vary over "data": the replicated parameters do not, so
  using them with the shard's rows inserts ``pvary`` (``pcast(..., to="varying")``), whose transpose is a
  ``psum`` (jax/_src/lax/parallel.py, ``_pvary_transpose_rule``): the gradient ``jax.grad`` returns inside
  the body is already the sum over the shards, and ``lax.psum`` of such an invariant value multiplies it by
  R (``bind_psum_invariant`` pvary's it first), ``lax.pmean`` leaves it as it is. ``CHECK_VMA = False``
  gives the pmap-era semantics instead (the gradient the body sees is its shard's own).
- "single": no engine: the same jitted function on the session's device (the first of the mesh).

A global batch R does not divide: ``jax.device_put`` with the sharding raises ``IndivisibleError`` and
``shard_map`` a ``ValueError`` ("... not evenly divisible ..."); the case raises ``EngineRefused`` with that
message. Each case returns replica 0's copy of the (replicated) gradient and loss.

Task "data_parallel_train" (``DataParallelTrainer``): each case "CONFIG@even/METHOD" trains K steps from
``job.params`` with the package trainer's optax transformation (``optimizers.build_transformation`` of the run's
config, learning rate ``count -> lrs[count]`` from a table handed to the step, as ``train.ModelTrainer`` feeds it),
one step per global batch "batches/T":

- "single": the package trainer itself (``train.ModelTrainer``, the run's reduction the case's METHOD) on the
  session's device.
- "jit_sharding": the trainer's own jitted step (``ModelTrainer._compiled``: ``jax.value_and_grad`` of the
  global batch's loss, ``opt.update``, ``optax.apply_updates``), called with the parameters, the optimizer state
  and the lr table replicated (``P()``) and the batch split (``P("data")``): XLA partitions the same program.
- "shard_map_pmean" / "shard_map_psum": the step users write inside ``jax.shard_map`` (``check_vma=True``): the
  body's ``jax.value_and_grad`` of its shard's loss, ``lax.pmean`` / ``lax.psum`` of (loss, gradients), then
  ``opt.update`` and ``optax.apply_updates`` on every replica; parameters and optimizer state in and out with
  ``P()``. The gradient the optimizer receives is the one task "data_parallel" measures (R times the mean's for
  a mean loss under pmean), so SGD's trajectory (with or without momentum: its update is linear in the gradient)
  is that of single-device training at R times the lr; Adam's update is invariant to a constant factor but for
  its eps.

Every case returns replica 0's parameters after each step ("T/NAME", canonical) and each step's loss ("loss/T":
the engine's, replica 0's copy; under shard_map the collective's of the shards' losses); ``info`` is
``engine_info``'s with batch 1's shards, and ``steps`` (K) and ``optimizer`` (the optax transformation) added.

Imported only inside a worker process. Read at import by jax: ``XLA_FLAGS`` (the host device count),
``JAX_ENABLE_X64`` (float64 jobs need it), ``JAX_PLATFORMS``.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gradparity.backends.jax.device import pick_device
from gradparity.backends.jax.optimizers import build_transformation, environment_note
from gradparity.backends.jax.session import ModelSession
from gradparity.backends.jax.train import ModelTrainer
from gradparity.backends.protocol import DeviceUnavailable, RawResult, WorkerJob, train_result
from gradparity.backends.protocol.parallel import (TRAIN_TASK, EngineRefused, engine_info, global_batch,
                                                   parse_case, replicas)

#: The mesh axis the batch is split over.
AXIS = "data"
#: ``jax.shard_map``'s own default; False is the pmap-era semantics (module docstring).
CHECK_VMA = True
#: How each shard_map configuration all-reduces its (loss, gradients).
COLLECTIVES = {"shard_map_pmean": jax.lax.pmean, "shard_map_psum": jax.lax.psum}


def mesh_devices(job: WorkerJob, r: int) -> list:
    """The first R devices of the platform the job's device is on; DeviceUnavailable when there are fewer
    (the worker was started without R host devices), naming the flag that provides them."""
    device, _ = pick_device(job.device)
    devices = jax.devices(device.platform)
    if len(devices) < r:
        flags = os.environ.get("XLA_FLAGS", "")
        raise DeviceUnavailable(
            f"data-parallel on {r} replicas needs {r} JAX {device.platform} devices, but jax sees "
            f"{len(devices)} (XLA_FLAGS={flags!r}): start the worker with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={r} in its environment (jax reads it once, "
            "at import); gradparity's data-parallel runs set it")
    return devices[:r]


def open_mesh(job: WorkerJob, model: ModelSession, r: int) -> Mesh:
    """The one-axis mesh of the first R devices, whose first device must be the model session's (replica 0's
    copy is read there)."""
    devices = mesh_devices(job, r)
    if model.device != devices[0]:
        raise DeviceUnavailable(f"the model session runs on {model.device}, not on the mesh's first "
                                f"device {devices[0]}")
    return Mesh(np.array(devices), (AXIS,))


def shard_grads(model: ModelSession, method: str, collective):
    """Inside a shard_map body: ``(loss, grads)`` of the shard's loss (``model.loss`` reduced by ``method``),
    all-reduced over the mesh by ``collective`` (``lax.pmean`` or ``lax.psum``)."""
    def grads(params, x, y):
        loss, g = jax.value_and_grad(lambda p: model.loss(p, x, y, method))(params)
        return collective((loss, g), AXIS)
    return grads


def replica0(tree, device):
    """The pytree's values as numpy, each leaf read from ``device``'s copy (replica 0's) when it is
    replicated; a leaf split over the devices is assembled whole."""
    def one(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding.is_fully_replicated:
            return np.asarray(next(s.data for s in leaf.addressable_shards if s.device == device))
        return np.asarray(leaf)
    return jax.tree.map(one, tree)


class DataParallelSession:
    """The model session's loss on one device and on R devices of a mesh (module docstring); the jitted
    functions and the converted global batches are built once per job and reused by every case."""

    def __init__(self, job: WorkerJob):
        self.job = job
        self.r = replicas(job)
        self.cases = {case: parse_case(case, "jax") for case in job.methods}
        self.model = ModelSession(job)
        self.mesh = open_mesh(job, self.model, self.r)
        self.replicated = NamedSharding(self.mesh, P())
        self.split = NamedSharding(self.mesh, P(AXIS))
        self.params = jax.device_put(self.model.params, self.replicated)
        self._global: dict[str, object] = {}
        self._shard_map: dict[tuple[str, str], object] = {}
        self._batches: dict[str, tuple] = {}

    def environment(self) -> dict:
        return {**self.model.environment(), "replicas": self.r,
                "mesh": {"axis": AXIS, "devices": [str(d) for d in self.mesh.devices.flat]},
                "xla_flags": os.environ.get("XLA_FLAGS", ""), "shard_map_check_vma": CHECK_VMA}

    # -- the functions, once per method ---------------------------------------------------------------

    def global_fn(self, method: str):
        """jit(value_and_grad) of the global batch's loss: where its inputs live decides where it runs (one
        device, or partitioned over the mesh by XLA)."""
        if method not in self._global:
            m = self.model
            self._global[method] = jax.jit(jax.value_and_grad(lambda p, x, y: m.loss(p, x, y, method)))
        return self._global[method]

    def shard_map_fn(self, config: str, method: str):
        """jit(shard_map(body)): the body's value_and_grad of its shard's loss, all-reduced over the mesh by
        the configuration's collective; also returns the rows each device saw."""
        key = (config, method)
        if key not in self._shard_map:
            grads = shard_grads(self.model, method, COLLECTIVES[config])

            def body(params, x, y):
                rows = jnp.full((1,), y.shape[0], np.int32)
                return grads(params, x, y), rows

            self._shard_map[key] = jax.jit(jax.shard_map(
                body, mesh=self.mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=((P(), P()), P(AXIS)),
                check_vma=CHECK_VMA))
        return self._shard_map[key]

    def batch(self, sharding: str):
        """(x, y) of the global batch converted by the model session, on its device, and as host arrays."""
        if sharding not in self._batches:
            x, y = self.model.convert(*global_batch(self.job, sharding))
            self._batches[sharding] = (x, y, jax.tree.map(np.asarray, x), np.asarray(y))
        return self._batches[sharding]

    # -- the cases -------------------------------------------------------------------------------------

    def compute(self, case: str) -> RawResult:
        """One "CONFIG@SHARDING/METHOD" case: replica 0's loss and canonical gradient after the engine's
        reduction, and what each device saw; EngineRefused when JAX will not split the batch over R devices."""
        c = self.cases.get(case) or parse_case(case, "jax")
        x, y, x_host, y_host = self.batch(c.sharding)
        n = int(y.shape[0])
        device = self.model.device
        if c.single:
            loss, grads = self.global_fn(c.method)(self.model.params, x, y)
            shards, note = [n], f"jax.jit(jax.value_and_grad(loss)) on {device}"
        elif c.config == "jit_sharding":
            try:
                xs, ys = jax.device_put((x, y), self.split)
            except ValueError as exc:  # jax's IndivisibleError
                if n % self.r:
                    raise self._refused(exc, "jax.device_put(batch, NamedSharding(mesh, P('data')))", n) from None
                raise
            loss, grads = self.global_fn(c.method)(self.params, xs, ys)
            shards = [int(s.data.shape[0]) for s in sorted(ys.addressable_shards, key=self._rank)]
            specs = sorted({str(g.sharding.spec) for g in jax.tree.leaves(grads)})
            note = (f"jax.jit(jax.value_and_grad(loss)) of the global batch, placed with NamedSharding(mesh, "
                    f"P('{AXIS}')), parameters replicated (P()); XLA's all-reduce; the gradients come out "
                    f"with {', '.join(specs)}")
        else:
            try:
                (loss, grads), rows = self.shard_map_fn(c.config, c.method)(self.params, x_host, y_host)
            except ValueError as exc:
                if n % self.r:
                    raise self._refused(exc, "jax.shard_map(in_specs=P('data'))", n) from None
                raise
            shards = [int(v) for v in np.asarray(rows)]
            op = "pmean" if c.config == "shard_map_pmean" else "psum"
            note = (f"jax.jit(jax.shard_map(check_vma={CHECK_VMA})): value_and_grad of the shard's loss, then "
                    f"lax.{op}((loss, grads), '{AXIS}')"
                    + ("; with check_vma the gradient of the replicated parameters is already summed over "
                       "the shards inside the body (the transpose of JAX's implicit pvary is a psum)"
                       if CHECK_VMA else ""))
        loss, grads = replica0((loss, grads), device)
        return RawResult(float(loss), self.model.canonical(grads),
                         engine_info("jax", c, shards, note=note))

    def _rank(self, shard) -> int:
        return list(self.mesh.devices.flat).index(shard.device)

    def _refused(self, exc: Exception, what: str, n: int) -> EngineRefused:
        return _refused(exc, what, n, self.r)


def single_device_job(job: WorkerJob, cases: dict) -> WorkerJob:
    """The job of the package trainer (task "train") for the same runs, each run's reduction its case's
    METHOD: the single-device runs, and the trainer whose step "jit_sharding" compiles for the mesh."""
    runs = {case: {**run, "reduction": cases[case].method} for case, run in job.payload["runs"].items()}
    return replace(job, task="train", payload={**job.payload, "runs": runs})


class DataParallelTrainer:
    """Task "data_parallel_train": K optimizer steps per case, through the engine or (single) the package's
    trainer (module docstring). The mesh, the replicated parameters, the batches (split for jit, on the host for
    shard_map) and every compiled step are built once per job and reused by every case and call."""

    def __init__(self, job: WorkerJob):
        self.job = job
        self.r = replicas(job)
        self.cases = {case: parse_case(case, "jax") for case in job.methods}
        uneven = [case for case, c in self.cases.items() if c.sharding != "even"]
        if uneven:
            raise ValueError(f"data-parallel training steps on global batches R = {self.r} divides: cases "
                             f"{uneven} must be CONFIG@even/METHOD")
        self.trainer = ModelTrainer(single_device_job(job, self.cases))
        self.model = self.trainer.model
        self.mesh = open_mesh(job, self.model, self.r)
        self.replicated = NamedSharding(self.mesh, P())
        self.split = NamedSharding(self.mesh, P(AXIS))
        self.params = jax.device_put(self.model.params, self.replicated)
        # The runs share the job's one sequence of global batches: the trainer converted it, on its device.
        batches = self.trainer.settings(next(iter(self.cases)))[0]
        self.host = [(jax.tree.map(np.asarray, x), np.asarray(y)) for x, y in batches]
        self._placed: list | None = None
        self._steps: dict[tuple, tuple] = {}
        self._tables: dict[str, object] = {}

    def environment(self) -> dict:
        return {**self.model.environment(), "replicas": self.r,
                "mesh": {"axis": AXIS, "devices": [str(d) for d in self.mesh.devices.flat]},
                "xla_flags": os.environ.get("XLA_FLAGS", ""), "shard_map_check_vma": CHECK_VMA}

    def placed(self) -> list:
        """Every global batch split over the mesh (``NamedSharding(mesh, P("data"))``), placed once;
        EngineRefused with JAX's message for a batch R does not divide."""
        if self._placed is None:
            placed = []
            for t, (x, y) in enumerate(self.host, start=1):
                try:
                    placed.append(jax.device_put((x, y), self.split))
                except ValueError as exc:  # jax's IndivisibleError
                    if y.shape[0] % self.r:
                        raise _refused(exc, f"jax.device_put(batch {t}, NamedSharding(mesh, P('data')))",
                                       y.shape[0], self.r) from None
                    raise
            self._placed = placed
        return self._placed

    def table(self, case: str, lrs: list[float]):
        """The case's learning rates in the job's dtype, replicated on the mesh (the schedule's table)."""
        if case not in self._tables:
            self._tables[case] = jax.device_put(np.asarray(lrs, dtype=self.job.dtype), self.replicated)
        return self._tables[case]

    def shard_map_step(self, config: dict, engine: str, method: str):
        """(jitted opt.init, jit(shard_map(step))): the body's all-reduced (loss, gradients) of its shard, then
        the optax update on every replica; parameters, optimizer state and lr table replicated (``P()``).
        Compiled once per optimizer config (lr aside), configuration and reduction."""
        key = (json.dumps({k: v for k, v in config.items() if k != "lr"}, sort_keys=True), engine, method)
        if key not in self._steps:
            grads = shard_grads(self.model, method, COLLECTIVES[engine])

            def body(params, opt_state, x, y, table):
                opt = build_transformation(config, lambda count: table[count])
                loss, g = grads(params, x, y)
                updates, opt_state = opt.update(g, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            step = jax.jit(jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P()),
                                         out_specs=(P(), P(), P()), check_vma=CHECK_VMA))
            init = build_transformation(config, lambda count: jnp.zeros((), self.model.dtype)).init
            self._steps[key] = (jax.jit(init), step)
        return self._steps[key]

    def compute(self, case: str) -> RawResult:
        """Train case ``case`` from the canonical start with a fresh optimizer state: replica 0's canonical
        parameters after every recorded step and every step's loss (``protocol.train_result``)."""
        c = self.cases.get(case) or parse_case(case, "jax")
        _, config, lrs, _, record = self.trainer.settings(case)
        sizes = [int(y.shape[0]) for _, y in self.host]
        if c.single:
            raw = self.trainer.compute(case)
            info = engine_info("jax", c, [sizes[0]], note=f"the package trainer on {self.model.device}: "
                               f"{raw.info['loop']}")
            return RawResult(raw.loss, raw.grads, {**info, "optimizer": raw.info["optimizer"],
                                                    "steps": len(sizes)})
        table = self.table(case, lrs)
        if c.config == "jit_sharding":
            init, step = self.trainer._compiled(config, c.method)
            batches = self.placed()

            def one(params, state, x, y):
                return step(params, state, x, y, None, table)
            note = (f"the package trainer's jitted step (jax.value_and_grad of the global batch's "
                    f"{c.method} loss, opt.update, optax.apply_updates) with every global batch placed with "
                    f"NamedSharding(mesh, P('{AXIS}')), parameters, optimizer state and lr table replicated (P())")
        else:
            init, step = self.shard_map_step(config, c.config, c.method)
            batches = self.host  # shard_map splits the host arrays itself

            def one(params, state, x, y):
                return step(params, state, x, y, table)
            op = "pmean" if c.config == "shard_map_pmean" else "psum"
            note = (f"jax.jit(jax.shard_map(step, check_vma={CHECK_VMA})): the shard's {c.method} loss, "
                    f"jax.value_and_grad, lax.{op}((loss, grads), '{AXIS}'), opt.update and optax.apply_updates "
                    "on every replica")
        params = self.params
        state = jax.device_put(init(params), self.replicated)
        history, losses = [], []
        for t, (x, y) in enumerate(batches, start=1):
            try:
                params, state, loss = one(params, state, x, y)
            except ValueError as exc:  # shard_map's "... not evenly divisible ..."
                if y.shape[0] % self.r:
                    raise _refused(exc, f"jax.shard_map(in_specs=P('{AXIS}')) on batch {t}", y.shape[0],
                                   self.r) from None
                raise
            if t in record:
                history.append((t, params))
            losses.append(loss)
        specs = sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(params)})
        note += f"; the parameters come out with {', '.join(specs)}"
        device = self.model.device
        arrays = {f"{t}/{key}": np.array(value, copy=True) for t, p in history
                  for key, value in self.model.canonical(replica0(p, device)).items()}
        info = engine_info("jax", c, [sizes[0] // self.r] * self.r, note=note)
        info.update(optimizer=environment_note(config), steps=len(sizes))
        return train_result(self.job, arrays, [float(replica0(v, device)) for v in losses], info)


def _refused(exc: Exception, what: str, n: int, r: int) -> EngineRefused:
    # JAX's message on one line (shard_map's spans several): every word of it kept.
    return EngineRefused(f"{what} refused a global batch of {n} examples on {r} devices: "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())}")


def open_session(job: WorkerJob) -> DataParallelSession | DataParallelTrainer:
    """Task "data_parallel": check the cases and that jax sees R devices, build the model session, the mesh
    and the replicated parameters. Task "data_parallel_train": the same, and the package trainer for the runs."""
    if job.task == TRAIN_TASK:
        return DataParallelTrainer(job)
    return DataParallelSession(job)
