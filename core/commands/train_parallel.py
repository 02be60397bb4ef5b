"""``gradparity train --data-parallel R``: training on each framework's own data-parallel engines against
single-device training from the same start, step by step.

spec (train's, plus R; refused before any process as ``run --data-parallel`` is) -> canonical inputs (the digits'
training split cut into ``steps`` global batches of ``--batch-size``, R dividing it; the MLP's parameters) -> one
worker per backend, task "data_parallel_train" (every engine configuration and the single-device run, each with
the reduction ``mean`` at the lr and ``sum`` at lr / B, the lr that makes the single-device sum the mean's update)
-> compare each engine's trajectory with the single-device trajectory of the same reduction (``relative_distance``
per step against rtol(t), as ``gradparity train`` compares frameworks) -> report: the configurations that train as
one device does, and for the others the factor their gradient has (``experiment.parallel.expected_factor``) and
the learning rate that makes their SGD steps the single-device ones (lr / factor).
"""
from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass, field, replace
from fractions import Fraction

from gradparity.backends import BACKENDS
from gradparity.backends.protocol import step_losses, step_params
from gradparity.backends.protocol.parallel import ENGINES, SINGLE, parse_case
from gradparity.compare.tolerance import UNIT_ROUNDOFF, effective_unit_roundoff, tolerance_for, training_rtol
from gradparity.compare.trajectories import first_beyond, relative_distance
from gradparity.errors import ConfigError, Interrupted
from gradparity.experiment.parallel import (ParallelSpec, data_parallel_train_job, default_backends,
                                            expected_factor, framework_of, preflight, worker_env)
from gradparity.run.runner import WorkerRun, available_memory_bytes, run_jobs

SCHEMA = "gradparity.train.data_parallel/1"
#: The configurations trained per backend (each with mean and sum): the ones a user trains with.
TRAIN_CONFIGS = {
    "torch": ("ddp", "fsdp2"),
    "keras-tensorflow": ("mirrored_fit", "mirrored_loop", "mirrored_average"),
    "tf-keras": ("mirrored_average",),
    "jax": ("jit_sharding", "shard_map_pmean"),
}


@dataclass
class ParallelTrajectory:
    """One engine configuration's training against the single-device training of the same reduction."""

    backend: str
    config: str
    engine: str
    method: str
    lr: float
    status: str = "ok"
    error: str | None = None
    per_step: list[float] = field(default_factory=list)   # relative_distance to single-device, per step
    rtol: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    expected_factor: str | None = None                    # the gradient's factor by the convention

    @property
    def first_apart(self) -> int | None:
        return first_beyond(self.per_step, self.rtol) if self.status == "ok" else None

    @property
    def on_track(self) -> bool:
        return self.status == "ok" and self.first_apart is None

    def to_dict(self) -> dict:
        return {"backend": self.backend, "engine": self.engine, "config": self.config, "method": self.method,
                "lr": self.lr, "status": self.status, "error": self.error, "per_step": self.per_step,
                "rtol_per_step": self.rtol, "first_apart": self.first_apart, "on_single_device_trajectory":
                self.on_track, "losses": self.losses, "expected_gradient_factor": self.expected_factor}


@dataclass
class ParallelTrainReport:
    spec: object          # TrainSpec
    replicas: int
    description: str
    rows: list[ParallelTrajectory]
    single: dict[str, dict] = field(default_factory=dict)   # backend -> {method: losses}
    interrupted: int | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return 128 + self.interrupted
        return 3 if any(r.status != "ok" for r in self.rows) else 0


def check(spec, r: int) -> ParallelSpec:
    """The train spec with R replicas, refused before any process (ConfigError, exit 2)."""
    from gradparity.commands.train import check_spec

    check_spec(spec)
    problems = []
    if r < 2:
        problems.append(f"--data-parallel {r}: give R >= 2 replicas")
    elif spec.batch_size % r or spec.batch_size // r < 2:
        problems.append(f"--batch-size {spec.batch_size} is the global batch: R = {r} must divide it with at least "
                        "2 examples per replica")
    if spec.optimizer_text or spec.optimizer not in ("sgd", "momentum", "nesterov", "adam", "adamw"):
        problems.append("train --data-parallel takes a named optimizer (sgd, momentum, nesterov, adam, adamw)")
    if spec.model != "mlp" or spec.equivalence or spec.schedule != "constant":
        problems.append("train --data-parallel trains the built-in MLP at a constant lr (no --model, --equivalence, "
                        "--schedule)")
    backends = default_backends(spec.backends)
    if not backends:
        problems.append(f"none of --backends {', '.join(spec.backends)} has a data-parallel engine")
    if problems:
        raise ConfigError(problems)
    parallel = ParallelSpec(r, tuple(b for b in backends if b in TRAIN_CONFIGS))
    preflight(parallel, available_memory_bytes())
    return parallel


def run_parallel_training(spec, r: int, progress=None) -> ParallelTrainReport:
    """Train every backend's engines and the single-device runs, compare step by step."""
    from gradparity.commands.train import build_batches

    parallel = check(spec, r)
    say = progress or (lambda _m: None)
    model, params, batches, desc = build_batches(spec)
    config = spec.config()
    lr = config.lr
    lrs = {"mean": lr, "sum": lr / spec.batch_size}   # the single-device sum at lr / B is the mean's update

    def runs(backend: str) -> dict:
        out = {}
        for c in (SINGLE, *TRAIN_CONFIGS[backend]):
            for m in ("mean", "sum"):
                out[f"{c}@even/{m}"] = {"optimizer": replace(config, lr=lrs[m]).to_dict(), "lrs": [lrs[m]] * spec.steps}
        return out

    jobs = [WorkerRun(data_parallel_train_job(BACKENDS[b], model.to_dict(), params, batches, r, runs(b),
                                              dtype=spec.dtype), BACKENDS[b], spec.timeout_s,
                      label=f"training on {b}'s data-parallel engines ({r} replicas, {spec.steps} steps) ...")
            for b in parallel.backends]
    interrupted = None
    try:
        outcomes = run_jobs(jobs, say=say, parallel=1, extra_env=worker_env(r))
    except Interrupted as exc:
        interrupted, outcomes = exc.signum, exc.outcomes
    grad_tol = tolerance_for(model, spec.batch_size)
    report = ParallelTrainReport(spec, r, f"{desc}; global batch {spec.batch_size} over R = {r} replicas "
                                 f"({spec.batch_size // r} each)", [], {}, interrupted)
    for b, o in outcomes.items():
        u = effective_unit_roundoff(o.environment or {}) or UNIT_ROUNDOFF[spec.dtype]
        single = {}
        for m in ("mean", "sum"):
            row = o.methods.get(f"{SINGLE}@even/{m}")
            if row is not None and row.status == "ok":
                single[m] = step_params(row.grads, range(1, spec.steps + 1), params)
                report.single.setdefault(b, {})[m] = step_losses(row.grads, spec.steps)
        for case_text, row in o.methods.items():
            case = parse_case(case_text)
            if case.single:
                continue
            fw = framework_of(b)
            f = expected_factor(b, case.config, case.method, [spec.batch_size // r] * r, spec.batch_size)
            t = ParallelTrajectory(b, case.config, ENGINES[fw][case.config][0], case.method, lrs[case.method],
                                   row.status, row.error, expected_factor=None if f is None else str(f))
            if t.status == "ok" and case.method not in single:
                t.status, t.error = "error", "the single-device run it is compared with failed"
            if t.status == "ok":
                steps = step_params(row.grads, range(1, spec.steps + 1), params)
                t.per_step = [relative_distance(p, q) for p, q in zip(steps, single[case.method])]
                t.rtol = training_rtol(grad_tol, u, spec.steps)
                t.losses = step_losses(row.grads, spec.steps)
            report.rows.append(t)
    return report


def _fix(row: ParallelTrajectory, optimizer: str) -> str:
    """What makes a configuration that leaves the single-device trajectory follow it."""
    if row.expected_factor in (None, "1"):
        return ("its gradient is not one constant factor of the single-device one"
                if row.expected_factor is None else "the same gradient: rounding grown by training")
    if optimizer in ("adam", "adamw"):
        return (f"its gradient is {row.expected_factor} times the single-device one; Adam divides the factor out "
                "but for epsilon")
    f = Fraction(row.expected_factor)
    if abs(f - 1) < Fraction(1, 10 ** 6):
        return (f"its gradient is 1 + {float(f - 1):.2g} times the single-device one: Keras scales the mean by 1/R "
                "computed in float32, below float32's rounding and visible in float64 only")
    scale = f"lr x {1 / f}" if f < 1 else f"lr / {f}"
    return (f"its gradient is {row.expected_factor} times the single-device one: at {scale} = {row.lr / float(f):.4g} "
            "its SGD steps are the single-device ones")


def render_lines(report: ParallelTrainReport) -> list[str]:
    s = report.spec
    lines = ([f"INTERRUPTED by {signal.Signals(report.interrupted).name}"] if report.interrupted is not None
             else []) + [
        f"gradparity train --data-parallel {report.replicas}: {s.optimizer} (lr {s.config().lr:g} for mean, "
        f"{s.config().lr / s.batch_size:.4g} for sum), {s.steps} steps, {s.dtype}; {report.description}",
        "each engine's trajectory against the same framework's single-device training of the same reduction "
        "(largest relative parameter difference; rtol(t) = rtol_gradient * t):", ""]
    for b, rows in itertools.groupby(report.rows, key=lambda r: r.backend):
        for r in rows:
            if r.status != "ok":
                lines.append(f"  {b:<17} {r.engine:<44} {r.method:<4}  {r.status}: "
                             f"{' '.join((r.error or '').split())[:200]}")
                continue
            verdict = ("on the single-device trajectory" if r.on_track else
                       f"apart from step {r.first_apart} ({r.per_step[r.first_apart - 1]:.3g} > "
                       f"{r.rtol[r.first_apart - 1]:.3g}), {r.per_step[-1]:.3g} after step {len(r.per_step)}: "
                       + _fix(r, s.optimizer))
            lines.append(f"  {b:<17} {r.engine:<44} {r.method:<4}  max {max(r.per_step):.3g} (rtol at the end "
                         f"{r.rtol[-1]:.3g}): {verdict}")
    lines += ["", f"The global batch is R x the per-replica batch ({s.batch_size} = {report.replicas} x "
              f"{s.batch_size // report.replicas}): an lr tuned for one device's batch of {s.batch_size // report.replicas} "
              f"needs the linear rule (x {report.replicas}) under the mean, whose measured reach is "
              "`gradparity train --sweep`'s."]
    return lines


def to_dict(report: ParallelTrainReport) -> dict:
    return {"schema": SCHEMA, "replicas": report.replicas, "spec": {
                "optimizer": report.spec.optimizer, "lr": report.spec.config().lr, "steps": report.spec.steps,
                "batch_size": report.spec.batch_size, "dtype": report.spec.dtype, "seed": report.spec.seed},
            "data": report.description,
            "interrupted": signal.Signals(report.interrupted).name if report.interrupted is not None else None,
            "single_device_losses": report.single, "trajectories": [r.to_dict() for r in report.rows]}


def write_report(report: ParallelTrainReport, out, run_id: str) -> None:
    """report.json (schema ``SCHEMA``, every file's SHA-256) and report.md into the claimed ``out``."""
    from gradparity.report.render import write_files

    doc = {"run_id": run_id, **to_dict(report)}
    md = "\n".join(["# gradparity train --data-parallel", ""] + [f"    {line}" if line.startswith("  ") else line
                                                                  for line in render_lines(report)]) + "\n"
    write_files(out, run_id, None, None, md, doc)
