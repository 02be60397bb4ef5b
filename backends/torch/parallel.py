"""PyTorch's data-parallel engines (task "data_parallel", contract in ``protocol.parallel``): torch.distributed
with the gloo backend, R replica processes on 127.0.0.1, started and supervised by the worker.

Configurations (``ENGINES["torch"]``), each replica computing its shard's loss with ``F.cross_entropy(reduction=
METHOD)`` on the model session's module and calling ``backward()``; the gradient read is ``param.grad`` of
replica 0 after the engine's all-reduce:

- ``ddp``: ``DistributedDataParallel(model)``, the global batch split by ``torch.tensor_split`` (contiguous
  shards, the first N mod R one example larger);
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard(model)`` on a CPU device mesh, the same shards; the gradient
  is a ``DTensor`` sharded over the replicas, gathered with ``full_tensor()``;
- ``sampler`` / ``sampler_drop``: ``DistributedSampler(dataset, shuffle=False, drop_last=False | True)`` over
  the global batch as a ``TensorDataset``, one ``DataLoader`` batch per replica, with DDP. The sampler deals the
  examples out strided (replica r gets r, r + R, ...); without drop_last it pads the dataset to R * ceil(N / R)
  by repeating its first examples, with drop_last it cuts it to R * floor(N / R).

Replicas: ``python -m gradparity.backends.torch.parallel --replica RANK DIR``, started once per job (on the
first engine case) with MASTER_ADDR / MASTER_PORT (a free port from binding port 0) and
``init_process_group("gloo")``. Each computes every configuration's cases and writes them to DIR; each step
it reaches is written to DIR too, and the worker's watchdog fails the run when no replica progressed for
payload "replica_timeout_s" (default 60 s), or as soon as one exits without its result: it stops the others
(SIGTERM, then SIGKILL) and every engine case fails with an error naming the replica, its pid and its error (the
traceback's tail, or the exit code). The replicas share the worker's process group (the runner's kill reaches
them) and die with the worker (``PR_SET_PDEATHSIG``). Payload "fault" (tests): replica ``rank`` raises
("crash"), sleeps forever ("hang") or calls ``os._exit(3)`` ("exit") after importing torch, before its work.

"single@…" cases run in the worker on the model session itself, without any process group.

Task "data_parallel_train" (the same session, ``job.task`` says which): each case ``"CONFIG@even/METHOD"`` trains
K steps from ``job.params``, one per global batch ``batches/T``, in the replicas started once per job: per case a
fresh module (``fully_shard`` changes it for good) wrapped by the engine, and a fresh optimizer of
``optimizers.build_optimizer`` over the wrapped module's trainable parameters (FSDP2: its sharded ``DTensor``
parameters, so each replica steps its shard), fed ``lrs[t]`` through ``param_groups[0]["lr"]`` before each
``step()``, as the trainer (``train.py``) does: ``optimizer.zero_grad(); loss = F.cross_entropy(wrapped(x_r),
y_r, reduction=METHOD); loss.backward(); optimizer.step()`` on replica r's ``tensor_split`` shard (or
DistributedSampler's) of batch T. It returns replica 0's canonical parameters after every recorded step
(FSDP2's gathered with ``full_tensor()``) and replica 0's loss of its shard per step (``train_result``).
"single@even/METHOD" is the trainer's own loop (``train.TorchTraining``) on the whole global batch.

Imported only inside a worker process (or a replica), so importing torch at the top is intended.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from gradparity.backends.protocol import RawResult, WorkerJob, select_output, train_batches, train_result, train_run
from gradparity.backends.protocol.parallel import (TASK, TRAIN_TASK, Case, EngineRefused, engine_info, training_view,
                                                  global_batch, parse_case, replicas)
from gradparity.backends.torch.optimizers import build_optimizer, environment_note
from gradparity.backends.torch.session import ModelSession, to_canonical
from gradparity.backends.torch.train import LOOP, TorchTraining
from gradparity.backends.protocol.jobs import JOB_DIR_PREFIX

FRAMEWORK = "torch"
#: Seconds without progress from any replica after which the worker calls the run hung (payload
#: "replica_timeout_s" overrides it).
REPLICA_TIMEOUT_S = 60.0
#: The process group's own timeout is this many times the watchdog's: the watchdog fires first and names the
#: replica that stalled, not a peer whose collective timed out waiting for it.
GROUP_TIMEOUT_FACTOR = 2.0
#: Seconds a stopped replica gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 2.0
#: Lines of a failed replica's output quoted in the error (the traceback's tail).
TAIL_LINES = 12
FAULTS = ("crash", "hang", "exit")


class ReplicaFailed(RuntimeError):
    """A replica crashed, hung or exited early: every engine case of the job fails with this error."""


# -- the worker side ------------------------------------------------------------------------------------------


def replica_timeout(job: WorkerJob) -> float:
    """Payload "replica_timeout_s" (seconds without progress before the run is called hung), default
    ``REPLICA_TIMEOUT_S``; ValueError unless a positive number."""
    value = job.payload.get("replica_timeout_s", REPLICA_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"payload 'replica_timeout_s' must be a positive number of seconds, got {value!r}")
    return float(value)


def check_fault(job: WorkerJob, r: int) -> None:
    """Refuse a malformed payload "fault" (tests only) before any replica starts."""
    fault = job.payload.get("fault")
    if fault is None:
        return
    if not isinstance(fault, dict) or fault.get("kind") not in FAULTS or fault.get("rank") not in range(r):
        raise ValueError(f"payload 'fault' must be {{'rank': 0..{r - 1}, 'kind': one of {FAULTS}}}, got {fault!r}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` the OS says is free (bound to port 0, then released) for the rendezvous;
    ReplicaFailed, saying so, when no port can be bound."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])
    except OSError as exc:
        raise ReplicaFailed(f"cannot bind a TCP port on {host} for torch.distributed's rendezvous (MASTER_PORT): "
                            f"{exc}; the replicas were not started") from exc


class ParallelSession:
    """The job's cases: "single@…" on the model session in this process, the engine cases from the replicas,
    which run once (on the first engine case) and whose results (or failure) every later case reads."""

    def __init__(self, job: WorkerJob):
        if job.device != "cpu":
            raise ValueError(f"torch's data-parallel engines run here on the CPU (gloo, one process per replica); "
                             f"this job asks for device {job.device!r}")
        self.job = job
        self.r = replicas(job)
        self.timeout_s = replica_timeout(job)
        check_fault(job, self.r)
        self.cases = {c: parse_case(c, FRAMEWORK) for c in job.methods}
        self.train = job.task == TRAIN_TASK
        # Training: the trainer's session (its model session is the model), its batches converted once.
        self.trainer = TorchTraining(training_view(job, FRAMEWORK)) if self.train else None
        self.model = self.trainer.model if self.train else ModelSession(job)
        self._engine: dict[str, tuple[RawResult | None, str | None]] | None = None
        self._failure: str | None = None

    def environment(self) -> dict:
        """The model session's environment, plus the replicas and how they communicate."""
        env = self.model.environment()
        env.update(replicas=self.r, distributed="torch.distributed, gloo, 127.0.0.1 (one process per replica)")
        return env

    def compute(self, case: str) -> RawResult:
        """One case: the single-device gradient, or the engine's (the replicas run on the first engine case);
        EngineRefused when the engine raised on this configuration, ReplicaFailed when a replica failed."""
        c = self.cases.get(case) or parse_case(case, FRAMEWORK)
        if c.single:
            return self._single(c)
        if self._engine is None and self._failure is None:
            try:
                self._engine = collect(self.job, run_replicas(self.job, self.r, self.timeout_s), self.r)
            except Exception as exc:  # kept: the replicas run once, and every engine case fails alike
                self._failure = str(exc) if isinstance(exc, ReplicaFailed) else f"{type(exc).__name__}: {exc}"
        if self._failure is not None:
            raise ReplicaFailed(self._failure)
        if case not in self._engine:
            raise ValueError(f"case {case!r} was not computed by the replicas (the job's cases are fixed at start)")
        result, error = self._engine[case]
        if error is not None:
            raise EngineRefused(error)
        return result

    def _single(self, c: Case) -> RawResult:
        """The model session's gradient of the whole global batch with torch's reduction, no process group;
        training: the trainer's run on the whole global batches."""
        if self.train:
            raw = self.trainer.compute(str(c))
            n = len(self.job.batch["batches/1/y"])
            return RawResult(raw.loss, raw.grads, {**engine_info(FRAMEWORK, c, [n], note="one process, no process "
                                                                 "group: the trainer's loop"), **raw.info})
        m = self.model
        x, y = m.convert(*global_batch(self.job, c.sharding))
        m.model.zero_grad(set_to_none=True)
        loss = m.loss(m.forward(x), y, c.method)
        loss.backward()
        grads = {k: np.array(v, copy=True) for k, v in m._grads().items()}
        n = len(y)
        return RawResult(loss.item(), grads, engine_info(FRAMEWORK, c, [n], note="one process, no process group"))


def collect(job: WorkerJob, results: list[dict], r: int) -> dict[str, tuple[RawResult | None, str | None]]:
    """{case: (RawResult, None) | (None, the engine's error)} from every replica's result: replica 0's
    gradient and loss, the examples each replica saw, and whether the replicas hold the same gradient."""
    out = {}
    for case, c in ((m, parse_case(m, FRAMEWORK)) for m in job.methods):
        if c.single:
            continue
        rows = [res["cases"][case] for res in results]
        errors = {row["error"]: rank for rank, row in enumerate(rows) if row["error"]}
        if errors:
            same = len(errors) == 1 and all(row["error"] for row in rows)
            out[case] = (None, next(iter(errors)) if same else "; ".join(f"replica {rank}: {e}"
                                                                         for e, rank in errors.items()))
            continue
        grads = results[0]["grads"][case]
        spread = max((float(np.max(np.abs(res["grads"][case][k] - g))) for res in results[1:]
                      for k, g in grads.items()), default=0.0)
        shards = [len(row["indices"]) for row in rows]
        what = "parameters" if "losses" in rows[0] else "gradient"
        note = (f"{rows[0]['split']}; examples per replica{' (each step)' if 'losses' in rows[0] else ''}: "
                + ", ".join(f"{rank}: {row['indices']}" for rank, row in enumerate(rows))
                + (f"; the {r} replicas hold the same {what}" if spread == 0.0
                   else f"; the replicas' {what} differ from replica 0's by up to {spread:.3g}"))
        info = engine_info(FRAMEWORK, c, shards, note=note)
        if "losses" in rows[0]:   # a training run: replica 0's parameters after each step and its losses
            info.update(optimizer=rows[0]["optimizer"], loop=rows[0]["loop"])
            out[case] = (train_result(job, grads, rows[0]["losses"], info), None)
        else:
            out[case] = (RawResult(rows[0]["loss"], grads, info), None)
    return out


def run_replicas(job: WorkerJob, r: int, timeout_s: float) -> list[dict]:
    """Start the R replicas on the job (saved into a private folder), supervise them until each has written its
    result, and return those results in rank order; ReplicaFailed (after stopping every replica) otherwise."""
    port = free_port()
    # Named like a job folder of this worker (it holds the job file): a worker killed before removing it leaves
    # it to the next run's remove_stale_job_dirs.
    with tempfile.TemporaryDirectory(prefix=f"{JOB_DIR_PREFIX}{os.getpid()}-torch-replicas-") as tmp:
        folder = Path(tmp)
        job.save(folder)
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(r),
                   LOCAL_WORLD_SIZE=str(r), GRADPARITY_PARENT_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
        procs: list[subprocess.Popen] = []
        try:
            for rank in range(r):
                with open(folder / f"replica-{rank}.log", "wb") as log:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "gradparity.backends.torch.parallel", "--replica", str(rank), tmp],
                        env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL))
            supervise(procs, folder, timeout_s)
        finally:
            stop(procs)
        return [read_result(folder, rank) for rank in range(r)]


def supervise(procs: list[subprocess.Popen], folder: Path, timeout_s: float) -> None:
    """Wait until every replica has exited 0 with its result written; ReplicaFailed naming the first replica
    that exited otherwise, or, when no replica progressed for ``timeout_s``, those furthest behind."""
    stages = [read_stage(folder, rank) for rank in range(len(procs))]
    last_change = time.monotonic()
    while True:
        done = 0
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if code is None:
                continue
            if code == 0 and (folder / f"result-{rank}.json").exists():
                done += 1
                continue
            raise ReplicaFailed(exit_error(procs, folder, rank, code))
        if done == len(procs):
            return
        now_stages = [read_stage(folder, rank) for rank in range(len(procs))]
        if now_stages != stages:
            stages, last_change = now_stages, time.monotonic()
        elif time.monotonic() - last_change > timeout_s:
            raise ReplicaFailed(hang_error(procs, stages, timeout_s))
        time.sleep(0.05)


def exit_error(procs: list[subprocess.Popen], folder: Path, rank: int, code: int) -> str:
    """What replica ``rank`` did: raised (its traceback's tail), was killed by a signal, or exited early."""
    tail = log_tail(folder, rank)
    step = read_stage(folder, rank)[1]
    pid = procs[rank].pid
    if code < 0:
        what = f"replica {rank} (pid {pid}) was killed by {signal.Signals(-code).name} (last step: {step})"
    elif "Traceback" in tail:
        what = f"replica {rank} (pid {pid}) crashed with exit code {code} (last step: {step}):\n{tail}"
    else:
        what = (f"replica {rank} (pid {pid}) exited early with code {code}, without its result (last step: "
                f"{step})" + (f"; its output:\n{tail}" if tail else ""))
    return f"{what}\n{others_stopped(procs, rank)}"


def hang_error(procs: list[subprocess.Popen], stages: list[tuple[int, str]], timeout_s: float) -> str:
    """The replicas furthest behind hung: no replica progressed for ``timeout_s``."""
    behind = min(n for n, _ in stages)
    hung = [rank for rank, (n, _) in enumerate(stages) if n == behind and procs[rank].poll() is None]
    named = ", ".join(f"replica {rank} (pid {procs[rank].pid})" for rank in hung)
    steps = "; ".join(f"replica {rank}: {step}" for rank, (_, step) in enumerate(stages))
    return (f"{named} hung: no replica progressed for {timeout_s:g} s (payload 'replica_timeout_s'), and "
            f"{'it is' if len(hung) == 1 else 'they are'} furthest behind (last steps: {steps})\n"
            f"{others_stopped(procs, None)}")


def others_stopped(procs: list[subprocess.Popen], failed: int | None) -> str:
    """Which replicas the worker stops now (all still running but ``failed``), by rank and pid."""
    alive = [f"{rank} (pid {p.pid})" for rank, p in enumerate(procs) if rank != failed and p.poll() is None]
    if not alive:
        return "no other replica was running"
    return ("the worker stopped the replicas: " if failed is None else "the worker stopped the other replicas: ") \
        + ", ".join(alive)


def stop(procs: list[subprocess.Popen]) -> None:
    """End every replica still running: SIGTERM, then SIGKILL after ``STOP_GRACE_S``; each is waited for, so
    none is left running or as a zombie."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def read_stage(folder: Path, rank: int) -> tuple[int, str]:
    """(how many steps replica ``rank`` has reached, the last one), (0, "not started") before its first."""
    try:
        n, _, step = (folder / f"stage-{rank}").read_text().partition(" ")
        return int(n), step
    except (OSError, ValueError):
        return 0, "not started"


def log_tail(folder: Path, rank: int) -> str:
    try:
        lines = (folder / f"replica-{rank}.log").read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-TAIL_LINES:])


def read_result(folder: Path, rank: int) -> dict:
    """Replica ``rank``'s result: {"cases": {case: {"loss", "indices", "split", "error"}}, "grads": {case:
    {canonical key: array}}}."""
    cases = json.loads((folder / f"result-{rank}.json").read_text())
    grads: dict[str, dict[str, np.ndarray]] = {case: {} for case in cases}
    with np.load(folder / f"result-{rank}.npz") as z:
        for name in z.files:
            case, _, key = name.partition("::")
            grads[case][key] = z[name]
    return {"cases": cases, "grads": grads}


def open_session(job: WorkerJob) -> ParallelSession:
    """The worker's entry for tasks "data_parallel" and "data_parallel_train": check the payload, build the
    single-device model session (training: the trainer) (the replicas start on the first engine case)."""
    if job.task not in (TASK, TRAIN_TASK):
        raise ValueError(f"the torch data-parallel session runs {TASK!r} and {TRAIN_TASK!r} jobs, got task "
                         f"{job.task!r}")
    return ParallelSession(job)


# -- the replica side ---------------------------------------------------------------------------------------


class Progress:
    """Replica ``rank``'s steps, written (atomically) to ``stage-RANK`` for the worker's watchdog."""

    def __init__(self, folder: Path, rank: int):
        self.path, self.n = folder / f"stage-{rank}", 0

    def __call__(self, step: str) -> None:
        self.n += 1
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{self.n} {step}")
        os.replace(tmp, self.path)


def canonical_grads(session: ModelSession) -> dict[str, np.ndarray]:
    """The canonical gradient of every mapped trainable parameter from the module's *current* parameters
    (``fully_shard`` replaced them by DTensors: their sharded ``.grad`` is gathered with ``full_tensor()``, a
    collective every replica calls in the same order)."""
    out = {}
    for native, key in session.assign.items():
        module, pname, _, trainable = session.owner(native)
        if not trainable:
            continue
        g = getattr(module, pname).grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[key] = np.array(to_canonical(module, pname, g.detach().cpu().numpy()), copy=True)
    return out


def engine(config: str, session: ModelSession):
    """The module the replica runs ``config``'s forward pass through: DDP, or the module after ``fully_shard``."""
    if config == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        return fully_shard(session.model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(session.model)


def shard(config: str, x: torch.Tensor, y: torch.Tensor):
    """(x, y, the global indices of the examples, how they were chosen) of this replica's part of the global
    batch (x, y) (tensors): ``torch.tensor_split`` (ddp, fsdp2), or one DataLoader batch drawn by
    DistributedSampler."""
    index = torch.arange(len(y))
    rank, r = dist.get_rank(), dist.get_world_size()
    if config in ("ddp", "fsdp2"):
        return (torch.tensor_split(x, r)[rank], torch.tensor_split(y, r)[rank],
                torch.tensor_split(index, r)[rank].tolist(), "torch.tensor_split(global batch, R)")
    drop = config == "sampler_drop"
    dataset = TensorDataset(index, x, y)
    sampler = DistributedSampler(dataset, shuffle=False, drop_last=drop)  # R and rank from the process group
    (idx, xs, ys), = DataLoader(dataset, batch_size=max(1, len(sampler)), sampler=sampler)
    return xs, ys, idx.tolist(), f"DistributedSampler(shuffle=False, drop_last={drop}), one DataLoader batch"


def replica_cases(job: WorkerJob, folder: Path, progress: Progress) -> None:
    """Every engine case of the job on this replica, written to ``result-RANK.json`` / ``.npz``. A
    configuration whose engine raises is recorded as that configuration's error (the others go on)."""
    rank = dist.get_rank()
    by_config: dict[str, list[Case]] = {}
    for m in job.methods:
        c = parse_case(m, FRAMEWORK)
        if not c.single:
            by_config.setdefault(c.config, []).append(c)
    cases: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    if job.task == TRAIN_TASK:
        train_cases(training_view(job, FRAMEWORK), by_config, progress, cases, arrays)
    else:
        gradient_cases(job, by_config, progress, cases, arrays)
    progress("writing the result")
    np.savez(folder / f"result-{rank}.tmp.npz", **arrays)
    os.replace(folder / f"result-{rank}.tmp.npz", folder / f"result-{rank}.npz")
    (folder / f"result-{rank}.json.tmp").write_text(json.dumps(cases))
    os.replace(folder / f"result-{rank}.json.tmp", folder / f"result-{rank}.json")  # last: the worker's signal


def wrap(job: WorkerJob, config: str, todo: list[Case], progress: Progress, cases: dict):
    """(a fresh model session, its trainable parameters as (canonical key, module, name) in
    ``model.parameters()`` order, its module wrapped by ``config``'s engine), or None after recording the
    engine's refusal as every case of ``todo``'s error (every replica raises alike)."""
    progress(f"wrapping the model for {config}")
    try:
        session = ModelSession(job)   # a fresh module each time: fully_shard changes it for good
        # Read before the engine replaces any parameter (fully_shard swaps in DTensors of the same names, which
        # the session's own lookup by identity no longer finds).
        owners = [(key, owner, pname) for key, owner, pname, _ in session.trainable()]
        return session, owners, engine(config, session)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        cases.update({str(c): {"loss": None, "indices": [], "split": "", "error": error} for c in todo})
        return None


def gradient_cases(job: WorkerJob, by_config: dict[str, list[Case]], progress: Progress, cases: dict,
                   arrays: dict) -> None:
    """Task "data_parallel": one gradient per case, replica 0's after the engine's reduction, into ``cases``
    (loss, examples, split, error) and ``arrays`` ("CASE::NAME")."""
    for config, todo in by_config.items():
        wrapped = wrap(job, config, todo, progress, cases)
        if wrapped is None:
            continue
        session, _, wrapped = wrapped
        for c in todo:
            progress(f"computing {c}")
            session.model.zero_grad(set_to_none=True)
            xs, ys, indices, split = shard(config, *session.convert(*global_batch(job, c.sharding)))
            loss = session.loss(select_output(wrapped(xs), session.output_path, torch.is_tensor), ys, c.method)
            loss.backward()   # DDP / FSDP2 reduce the gradients across the replicas here
            cases[str(c)] = {"loss": loss.item(), "indices": indices, "split": split, "error": None}
            arrays.update({f"{c}::{k}": g for k, g in canonical_grads(session).items()})


def train_cases(job: WorkerJob, by_config: dict[str, list[Case]], progress: Progress, cases: dict,
                arrays: dict) -> None:
    """Task "data_parallel_train" (``job`` as ``training_view`` gives it): each case's K steps through the
    engine from the canonical start, into ``cases`` (losses, the examples of each step, split, optimizer, loop,
    error) and ``arrays`` ("CASE::T/NAME": replica 0's parameters after recorded step T)."""
    batches = train_batches(job)
    for config, todo in by_config.items():
        for c in todo:
            wrapped = wrap(job, config, [c], progress, cases)   # per case: training changes the module
            if wrapped is None:
                continue
            opt_config, lrs, _, record = train_run(job, str(c), len(batches))
            losses, snapshots, indices, split = train_steps(*wrapped, config, c.method, batches, opt_config, lrs,
                                                            record, lambda t, c=c: progress(f"training {c}, step {t}"))
            cases[str(c)] = {"loss": losses[-1], "losses": losses, "indices": indices, "split": split, "error": None,
                             "optimizer": environment_note(opt_config), "loop": LOOP}
            arrays.update({f"{c}::{t}/{k}": v for t, snap in snapshots.items() for k, v in snap.items()})


def train_steps(session: ModelSession, owners: list, module, config: str, method: str, batches: list,
                opt_config: dict, lrs: list[float], record: set[int], progress):
    """K optimizer steps of ``module`` (the engine's wrapping of ``session.model``), each on this replica's shard
    of global batch t with ``reduction=method``; (losses, {t: canonical parameters after step t}, the shard's
    indices in batch 1, how the batch was split). The optimizer is the trainer's (``build_optimizer``), over the
    ``owners``' parameters as the module holds them now (after ``fully_shard``: their DTensor shards), in
    ``model.parameters()`` order, lr fed as the trainer does."""
    optimizer = build_optimizer(opt_config, [getattr(owner, pname) for _, owner, pname in owners])
    (group,) = optimizer.param_groups
    losses, snapshots, first = [], {}, None
    for t, ((x, y), lr) in enumerate(zip(batches, lrs), start=1):
        progress(t)
        optimizer.zero_grad()
        xs, ys, indices, split = shard(config, *session.convert(x, y))
        first = first or (indices, split)
        loss = session.loss(select_output(module(xs), session.output_path, torch.is_tensor), ys, method)
        loss.backward()   # DDP / FSDP2 reduce the gradients across the replicas here
        group["lr"] = float(lr)
        optimizer.step()
        losses.append(loss.item())
        if t in record:
            snapshots[t] = canonical_values(owners)
    return losses, snapshots, *first


def canonical_values(owners: list[tuple[str, torch.nn.Module, str]]) -> dict[str, np.ndarray]:
    """The canonical value of each (key, module, name) parameter as the module holds it now (a DTensor shard is
    gathered with ``full_tensor()``, a collective every replica calls in the same order)."""
    out = {}
    for key, owner, pname in owners:
        value = getattr(owner, pname).detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[key] = np.array(to_canonical(owner, pname, value.cpu().numpy()), copy=True)
    return out


def replica_main(rank: int, folder: Path) -> int:
    """A replica: join the process group (env://), compute, write the result, wait at a barrier for every other
    replica's; the payload's fault first. On success the group is left to the process's exit (``__main__``)."""
    from gradparity.backends.worker import _die_with_parent

    _die_with_parent()   # GRADPARITY_PARENT_PID is the worker: a replica never outlives it
    progress = Progress(folder, rank)
    progress("imported torch")
    job = WorkerJob.load(folder)
    r = replicas(job)
    fault = job.payload.get("fault") or {}
    if fault.get("rank") == rank:
        if fault["kind"] == "crash":
            raise RuntimeError(f"injected fault: replica {rank} crashes before its work")
        if fault["kind"] == "hang":
            while True:
                time.sleep(3600)
        os._exit(3)
    # The replicas share the machine's cores; one intra-op pool each would oversubscribe them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // r))
    progress("joining the process group")
    timeout = datetime.timedelta(seconds=replica_timeout(job) * GROUP_TIMEOUT_FACTOR)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=r, timeout=timeout)
    try:
        replica_cases(job, folder, progress)
        progress("waiting for every replica before leaving")
        dist.barrier()   # every replica's result is written and no collective is pending in any of them
    except BaseException:
        dist.destroy_process_group()
        raise
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--replica":
        sys.exit("usage: python -m gradparity.backends.torch.parallel --replica RANK FOLDER")
    try:
        code = replica_main(int(sys.argv[2]), Path(sys.argv[3]))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    # Every replica's result is written and past the barrier: leave without tearing gloo down. Under load, torch
    # 2.13's teardown of a finished gloo process (destroy_process_group, then the interpreter's exit) now and
    # then aborts it ("terminate called without an active exception", SIGABRT), which would fail a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
