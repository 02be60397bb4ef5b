"""The whole job, one direction: spec -> canonical inputs -> workers -> normalize -> compare -> report."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gradparity.backends import BACKENDS, BackendInfo
from gradparity.backends.protocol import WorkerJob
from gradparity.compare import Comparison, Tolerance, compare_all, problem_term_scale, tolerance_for
from gradparity.execute import BackendOutcome, run_backend
from gradparity.inputs import CanonicalInputs, build_inputs
from gradparity.normalize import Result, normalize
from gradparity.spec import Experiment
from gradparity.verdict import Verdict, decide


@dataclass
class Report:
    """Everything one run measured; ``gradparity.report`` renders and writes it."""

    experiment: Experiment
    inputs: CanonicalInputs
    outcomes: list[BackendOutcome]
    results: list[Result]
    tolerance: Tolerance
    comparisons: list[Comparison]
    verdict: Verdict
    started_utc: str
    finished_utc: str


def make_job(exp: Experiment, inputs: CanonicalInputs, info: BackendInfo,
             methods: tuple[str, ...] | None = None) -> WorkerJob:
    """The job one backend's worker receives: the experiment's settings and the canonical arrays."""
    return WorkerJob(
        backend=info.name, framework=info.framework, variant=info.variant, module=info.module,
        extra=info.extra, requires=info.requires,
        methods=exp.methods if methods is None else methods,
        dtype=exp.dtype, device=exp.device, precision=exp.precision,
        model=inputs.model.to_dict(), loss={"name": exp.loss.name},
        params=inputs.params, batch=inputs.batch)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_experiment(
    exp: Experiment,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    registry: dict[str, BackendInfo] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Report:
    """Run ``exp`` on every backend it names, compare, and (with ``out_dir``) write the report files.

    Raises ConfigError for invalid data before any backend starts. Backend
    failures never raise: they become failed rows. ``registry`` and
    ``extra_env`` exist for tests that add fault-injecting backends.
    """
    registry = registry or BACKENDS
    say = progress or (lambda _msg: None)
    started = _now()
    inputs = build_inputs(exp)
    outcomes = []
    for name in exp.backends:
        say(f"running {name} ({len(exp.methods)} methods, {exp.dtype}, device={exp.device}) ...")
        outcome = run_backend(make_job(exp, inputs, registry[name]), registry[name], exp.timeout_s, extra_env)
        say(f"  {name}: {outcome.status} in {outcome.wall_seconds:.1f} s"
            + (f" - {outcome.error.splitlines()[0]}" if outcome.error else ""))
        outcomes.append(outcome)
    results = normalize(outcomes, exp.methods, inputs.n_examples)
    tol = tolerance_for(inputs.model, inputs.n_examples,
                        problem_term_scale(inputs.params, inputs.batch, inputs.model))
    comparisons = compare_all(results, tol)
    verdict = decide(results, comparisons, tol, inputs.n_examples, exp.dtype)
    report = Report(exp, inputs, outcomes, results, tol, comparisons, verdict, started, _now())
    if out_dir is not None:
        from gradparity.report import write_report

        write_report(report, Path(out_dir))
    return report
