"""``gradparity run``: spec -> canonical inputs -> workers -> normalize -> compare -> report, one direction."""
from __future__ import annotations

import datetime as _dt
import signal
from pathlib import Path
from typing import Callable

from gradparity.backends import BACKENDS, BackendInfo, make_job
from gradparity.backends.protocol import WorkerJob, builtin_payload
from gradparity.compare.layers import defaults_notes, gelu_notes
from gradparity.compare.normalize import normalize
from gradparity.compare.pairs import compare_all
from gradparity.compare.results import Report
from gradparity.compare.tolerance import problem_term_scale, tolerance_for
from gradparity.compare.verdict import decide
from gradparity.errors import Interrupted
from gradparity.experiment import causes
from gradparity.experiment.inputs import CanonicalInputs, build_inputs
from gradparity.experiment.spec import Experiment
from gradparity.report.outdir import OutputDir, new_run_id
from gradparity.report.render import REPORT_FILES
from gradparity.run.execute import BackendOutcome
from gradparity.run.runner import WorkerRun, run_jobs, signals_deferred


def experiment_job(exp: Experiment, inputs: CanonicalInputs, info: BackendInfo,
                   methods: tuple[str, ...] | None = None) -> WorkerJob:
    """The job one backend's worker receives: the experiment's settings and the canonical arrays.

    Every built-in model (the MLP, the CNN, the sequence model) runs in its framework's one model session (task
    "gradients", payload "builtin"), the one that runs users' own models; the numpy reference computes every
    built-in model in its own session.
    """
    model = inputs.model.to_dict()
    mode = "training" if model.get("batchnorm") else "inference"
    task, payload = "gradients", builtin_payload(model, mode=mode, loss=exp.loss.name)
    return make_job(info, task, causes.cases(exp.methods, inputs.batch, exp.causes) if methods is None else methods,
                    dtype=exp.dtype, device=exp.device, precision=exp.precision, model=model,
                    loss={"name": exp.loss.name}, params=inputs.params, batch=inputs.batch, payload=payload,
                    switches=causes.job_switches(exp.causes))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _progress_line(exp: Experiment, info: BackendInfo) -> str:
    arithmetic = (f"float64 reference on {exp.dtype}-rounded inputs, cpu" if info.reference
                  else f"{exp.dtype}, device={exp.device}")
    return f"running {info.name} ({len(exp.methods)} methods, {arithmetic}) ..."


def run_experiment(
    exp: Experiment,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    registry: dict[str, BackendInfo] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Report:
    """Run ``exp`` on every backend it names, compare, and (with ``out_dir``) write the report files.

    Everything a user can get wrong is checked before any backend starts and
    raised as ConfigError: the config, the data, the problem's size, and the
    output folder (which is then locked for this run). Backend failures never
    raise: they become failed rows. An interruption (Ctrl-C, or ``Interrupted``
    raised by a signal handler) stops the workers, writes a partial report
    marked interrupted, and raises ``Interrupted`` carrying it (``.report``).
    ``registry`` and ``extra_env`` exist for tests that add fault-injecting backends.
    """
    registry = registry or BACKENDS
    say = progress or (lambda _msg: None)
    started, run_id = _now(), new_run_id()
    inputs = build_inputs(exp)
    if exp.parallel.on:
        from gradparity.experiment.parallel import preflight
        from gradparity.run.runner import available_memory_bytes

        preflight(exp.parallel, available_memory_bytes())
    out = OutputDir.claim(out_dir, run_id, REPORT_FILES) if out_dir is not None else None
    try:
        runs = [WorkerRun(experiment_job(exp, inputs, registry[name]), registry[name], exp.timeout_s,
                          label=_progress_line(exp, registry[name])) for name in exp.backends]
        interrupted: Interrupted | None = None
        try:
            outcomes = list(run_jobs(runs, say=say, parallel=len(runs), extra_env=extra_env).values())
        except Interrupted as exc:
            interrupted = exc
            outcomes = list(exc.outcomes.values())
            say(f"  interrupted by {interrupted.signal_name}: writing what finished")
        parallel = None
        if exp.parallel.on and interrupted is None:
            parallel, interrupted = _data_parallel_stage(exp, inputs, say)
        report = None
        try:
            with signals_deferred():
                report = _conclude(exp, inputs, outcomes, started, run_id, interrupted)
                report.data_parallel = parallel
                if out is not None:
                    from gradparity.report.render import write_report

                    write_report(report, out)
        except (Interrupted, KeyboardInterrupt) as exc:
            # A signal held while the report was written arrives now: the report is complete.
            if report is None:
                raise
            late = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            interrupted = interrupted or late
    finally:
        if out is not None:
            out.release()
    if interrupted is not None:
        interrupted.report = report
        raise interrupted
    return report


def _data_parallel_stage(exp: Experiment, inputs: CanonicalInputs, say):
    """The engines' stage (``commands.data_parallel``) after the methods: its report, and the interruption that
    stopped it (its finished backends kept)."""
    from gradparity.commands import data_parallel as dp

    tol = tolerance_for(inputs.model, inputs.n_examples, problem_term_scale(inputs.params, inputs.batch,
                                                                            inputs.model))
    try:
        return dp.run_data_parallel(exp, inputs, tol, say), None
    except Interrupted as exc:
        say(f"  interrupted by {exc.signal_name}: writing what finished")
        return dp.report_from(exp, inputs, tol, exc.outcomes, exc.signal_name), exc


def _conclude(exp: Experiment, inputs: CanonicalInputs, outcomes: list[BackendOutcome], started: str,
              run_id: str, interrupted: Interrupted | None) -> Report:
    """normalize -> compare -> verdict, over whatever the workers produced."""
    results = normalize(outcomes, exp.methods, inputs.n_examples,
                        causes.rules(exp.methods, inputs.n_examples, inputs.batch, exp.causes,
                                     inputs.model.loss_terms()))
    tol = tolerance_for(inputs.model, inputs.n_examples,
                        problem_term_scale(inputs.params, inputs.batch, inputs.model))
    comparisons = compare_all(results, tol)
    verdict = decide(results, comparisons, tol, inputs.n_examples, exp.dtype, interrupted,
                     tuple(exp.causes.on()))
    # A built-in model's layer settings and its frameworks' GELU, measured (nothing for the MLP).
    verdict.explanation.extend(defaults_notes(inputs, results, outcomes, tol)
                               + gelu_notes(outcomes, results, comparisons, tol))
    return Report(exp, inputs, outcomes, results, tol, comparisons, verdict, started, _now(), run_id,
                  interrupted.signal_name if interrupted else None)
