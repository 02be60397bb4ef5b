"""``gradparity run --data-parallel R``: the run's stages for every framework's own data-parallel engines.

spec (``[parallel]``, checked with the experiment; ``preflight`` before any process) -> canonical inputs (the
run's model, parameters and batch, cut into an even and an uneven global batch) -> one worker per backend, task
"data_parallel" (R replicas of this machine: torch's processes over gloo, TensorFlow's logical CPU devices, XLA's
host devices) -> compare each engine's gradient with the single-device one (``compare.parallel``) -> report
(report.json ``data_parallel``, schema ``gradparity.data_parallel/1``; the text and report.md section).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from gradparity.backends import BACKENDS
from gradparity.backends.protocol.parallel import ENGINES, SINGLE, parse_case, shard_sizes
from gradparity.compare.parallel import ParallelRow, compare_case
from gradparity.compare.tolerance import UNIT_ROUNDOFF, effective_unit_roundoff
from gradparity.experiment.parallel import (Batches, ParallelSpec, advice, data_parallel_job, expected_factor,
                                            expected_refusal, framework_of, global_batches, worker_env)
from gradparity.report.parallel import summary_lines
from gradparity.run.execute import BackendOutcome
from gradparity.run.runner import WorkerRun, run_jobs

SCHEMA = "gradparity.data_parallel/1"
#: How a worker reports ``protocol.parallel.EngineRefused``: the row's status becomes "refused".
REFUSED = "EngineRefused:"


@dataclass
class DataParallelReport:
    """Every engine configuration's gradient against the single-device one, per backend."""

    spec: ParallelSpec
    batches: Batches
    rows: list[ParallelRow] = field(default_factory=list)
    outcomes: dict[str, BackendOutcome] = field(default_factory=dict)
    interrupted: str | None = None

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "replicas": self.spec.replicas,
                "global_batches": {"even": self.batches.even, "uneven": self.batches.uneven},
                "interrupted": self.interrupted,
                "backends": [{"backend": o.backend, "status": o.status, "error": o.error,
                              "wall_seconds": o.wall_seconds, "environment": o.environment}
                             for o in self.outcomes.values()],
                "results": [r.to_dict() for r in self.rows],
                "summary": summary_lines(self)}


def data_parallel_jobs(exp, inputs) -> list[WorkerRun]:
    """One worker run per backend of ``exp.parallel``: every configuration, both global batches, both
    reductions, and the single-device gradients they are compared with."""
    model = inputs.model.to_dict()
    mode = "training" if model.get("batchnorm") else "inference"
    x, y = inputs.batch["x"], inputs.batch["y"]
    # A worker starts R replicas and imports its framework once; give it the run's timeout for the lot.
    return [WorkerRun(data_parallel_job(BACKENDS[b], model, inputs.params, x, y, exp.parallel.replicas,
                                        dtype=exp.dtype, loss=exp.loss.name, mode=mode),
                      BACKENDS[b], exp.timeout_s,
                      label=f"running {b}'s data-parallel engines on {exp.parallel.replicas} replicas ...")
            for b in exp.parallel.backends]


def run_data_parallel(exp, inputs, tolerance, say) -> DataParallelReport:
    """Run every backend's engines (one worker at a time: each holds R replicas) and compare. ``Interrupted``
    propagates with the outcomes so far (``report_from``)."""
    outcomes = run_jobs(data_parallel_jobs(exp, inputs), say=say, parallel=1,
                        extra_env=worker_env(exp.parallel.replicas))
    return report_from(exp, inputs, tolerance, outcomes)


def report_from(exp, inputs, tolerance, outcomes: dict[str, BackendOutcome], interrupted: str | None = None
                ) -> DataParallelReport:
    r = exp.parallel.replicas
    report = DataParallelReport(exp.parallel, global_batches(inputs.n_examples, r), [], dict(outcomes), interrupted)
    for backend, o in outcomes.items():
        report.rows += backend_rows(backend, o, report.batches, r, tolerance, exp.dtype)
    return report


def backend_rows(backend: str, o: BackendOutcome, batches: Batches, r: int, tolerance, dtype: str
                 ) -> list[ParallelRow]:
    """A backend's rows: each engine case against the single-device case of its batch and reduction."""
    rows = []
    fw = framework_of(backend)
    u = effective_unit_roundoff(o.environment or {}) or UNIT_ROUNDOFF[dtype]
    for case_text, row in o.methods.items():
        case = parse_case(case_text)
        if case.single:
            continue
        n = batches.even if case.sharding == "even" else batches.uneven
        name, reductions = ENGINES[fw][case.config]
        tol = tolerance_at(tolerance, n).rtol(u)
        out = ParallelRow(backend, case.config, name, case.sharding, case.method, r, n, row.status, row.error,
                          reduction=reductions[case.method], tolerance=tol)
        if row.status == "error" and (row.error or "").startswith(REFUSED):
            out.status, out.error = "refused", row.error[len(REFUSED):].strip()
        single = o.methods.get(f"{SINGLE}@{case.sharding}/{case.method}")
        if row.status == "ok" and (single is None or single.status != "ok"):
            out.status, out.error = "error", ("no single-device gradient to compare with: "
                                              + ((single.error if single else None) or "not computed"))
        if out.status == "ok":
            info = row.info or {}
            out.shards = [int(v) for v in info.get("shards", [])]
            out.examples_seen = info.get("examples_seen")
            out.note = info.get("note", "")
            out.__dict__.update(compare_case(row.grads, single.grads, tol, tolerance.term_scale, n, r))
            out.advice = advice(backend, case.config, case.method, r, n, out.shards, out.examples_seen,
                                out.factor, tol)
        expected = expected_factor(backend, case.config, case.method, out.shards or shard_sizes(n, r), n)
        out.expected, out.expected_constant = expected, expected is not None
        out.expected_refusal = expected_refusal(backend, case.config, case.method, n, r)
        rows.append(out)
    return rows


def tolerance_at(tolerance, n: int):
    """The run's tolerance model for a global batch of ``n`` examples (the engines' sums are that long)."""
    return replace(tolerance, longest_sum=max(tolerance.longest_sum, n))
