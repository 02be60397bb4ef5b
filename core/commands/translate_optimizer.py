"""``gradparity translate`` for optimizers: one written in one framework, rendered for the others, and run.

The pipeline's stages, for an optimizer instead of a loss:

    text -> (framework, OptimizerConfig) (parse) -> Semantics (what its update computes)
         -> per target framework: the configuration with the same Semantics (rendered as code), and the naive port
            (the same class and the arguments the text sets, the target's defaults for the rest)
         -> one worker per framework runs the source and every rendering, unchanged, on fixed gradient sequences
         -> compare each rendering's parameters with the source's at every step -> report (text or JSON)

Three sequences, each from the same start (``gradparity optimizers``' fixed gradients): N(0, 1) gradients at a
constant learning rate ("unit"); the same times 1e-7 ("tiny": where epsilon is no longer small against
sqrt(v), as for the blank pixels of an image); and N(0, 1) gradients with the learning rate halved halfway
("schedule": where the lr inside Keras' velocity parts from torch's and optax's buffer). Tolerance at step t:
``rtol(t) = SAFETY * u * t``, as ``gradparity optimizers``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from gradparity.backends import BACKENDS, KERAS_VARIANTS, make_job
from gradparity.commands.optimizers import fixed_gradients
from gradparity.compare.tolerance import SAFETY, UNIT_ROUNDOFF, effective_unit_roundoff, step_rtol
from gradparity.compare.trajectories import first_beyond, relative_distance
from gradparity.errors import ConfigError
from gradparity.experiment.optimizer_text import OptimizerRendering, parse_optimizer_text
from gradparity.experiment.optimizers import (DEFAULTS, FRAMEWORKS, OptimizerConfig, Semantics, reference_steps,
                                              semantics_of)
from gradparity.backends.protocol import WorkerJob, step_params
from gradparity.run.runner import WorkerRun, raise_if_stopped, run_jobs_until_stopped

from gradparity.exit_codes import EXIT_INCOMPLETE, EXIT_MATCH, EXIT_MISMATCH  # 0, 1, 3
#: name -> (gradient scale, schedule): see the module doc.
SEQUENCES = {"unit": (1.0, "constant"), "tiny": (1e-7, "constant"), "schedule": (1.0, "step")}
CONSTANT_LR = ("unit", "tiny")


def renderer(framework: str):
    """The framework's optimizer_text module (parse, render); importing it imports no framework."""
    return importlib.import_module(f"gradparity.backends.{framework}.optimizer_text")


def translated_config(framework: str, s: Semantics) -> tuple[OptimizerConfig | None, str]:
    """(the config whose update in ``framework`` is ``s`` under any learning-rate schedule, or None; why none).

    Native forms where the framework has them; otherwise ``epsilon_form`` / ``decay_form`` / ``momentum_form``
    say what the rendering adds (a hook, a subclass, a chain), dampening included (torch's argument; a Keras
    ``update_step`` override or an optax chain elsewhere). The result is checked: its Semantics must equal ``s``
    (``Semantics.normalized``: the same update at every step, whatever the lr does).
    """
    s = s.normalized()
    if s.eps_root and framework != "jax":
        return None, "eps_root (epsilon inside the square root) exists in optax only"
    if s.dampening and s.velocity:  # no framework's text reads to this: dampening is torch's, a buffer's
        return None, "dampening of a velocity (the lr inside the momentum) is no framework's update"
    common = {"lr": s.lr, "weight_decay": s.weight_decay}
    if s.family == "sgd":
        native_decay = "decoupled" if framework == "keras" else "l2"
        native_velocity = framework == "keras"
        # Without momentum both decays are one update (Semantics.normalized): the native argument serves.
        decay_form = "" if s.decay in ("none", native_decay) or not s.momentum else s.decay
        momentum_form = ("" if not s.momentum or s.velocity == native_velocity
                         else "velocity" if s.velocity else "buffer")
        config = OptimizerConfig("sgd", momentum=s.momentum, nesterov=s.nesterov, dampening=s.dampening,
                                 decay_form=decay_form, momentum_form=momentum_form, **common)
    else:
        native_eps = "hat" if framework == "keras" else "corrected"
        name = "adamw" if s.decay == "decoupled" and framework != "keras" else "adam"
        decay_form = "l2" if framework == "keras" and s.decay == "l2" else ""
        config = OptimizerConfig(name, beta1=s.beta1, beta2=s.beta2, eps=s.eps, eps_root=s.eps_root,
                                 epsilon_form="" if s.epsilon == native_eps else s.epsilon, decay_form=decay_form,
                                 **common)
    got = semantics_of(framework, config).normalized()
    if got != s:  # a gradparity bug: say so rather than print a wrong translation
        raise AssertionError(f"translation to {framework} computes {got}, not {s}")
    return config, ""


def naive_config(source: str, config: OptimizerConfig, explicit: set[str], framework: str) -> OptimizerConfig:
    """The port people write: the same optimizer class in ``framework`` with the arguments the text sets, and
    ``framework``'s defaults for the rest (epsilon, AdamW's weight decay); what has no argument there is dropped."""
    d = DEFAULTS[framework]
    wd = config.weight_decay if "weight_decay" in explicit else (d["adamw_weight_decay"] if config.name == "adamw"
                                                                 else 0.0)
    return OptimizerConfig(config.name, config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           dampening=config.dampening if framework == "torch" else 0.0, weight_decay=wd,
                           beta1=config.beta1, beta2=config.beta2,
                           eps=config.eps if "eps" in explicit else d["adam_eps"],
                           eps_root=config.eps_root if framework == "jax" else 0.0)


@dataclass
class SequenceResult:
    """One rendering against the source on one gradient sequence."""

    per_step: list[float]
    rtol: list[float]
    predicted: list[float]            # the same measure between the two updates' numpy rules, float64
    rounding_only: bool = False       # apart only by Keras-on-TensorFlow's float32 hyperparameters

    @property
    def first_apart(self) -> int | None:
        return first_beyond(self.per_step, self.rtol)

    @property
    def rules_apart(self) -> int | None:
        """The first step where the two updates' numpy rules part (beyond rtol): where the forms differ."""
        return first_beyond(self.predicted, self.rtol)

    @property
    def same(self) -> bool:
        return self.first_apart is None or self.rounding_only


@dataclass
class Candidate:
    """A rendering in one framework: the source itself, the translation, or the naive port."""

    framework: str
    role: str                          # "source" | "translation" | "naive"
    backend: str
    config: OptimizerConfig | None
    rendering: OptimizerRendering | None
    semantics: Semantics | None
    reason: str = ""                   # why there is no translation
    status: str = "not run"
    error: str | None = None
    note: str = ""                     # what ran, from the worker
    versions: dict = field(default_factory=dict)
    #: vs its own numpy rule, per sequence: (largest per-step difference, rtol at the last step, "exact" |
    #: "float32 hyperparameters" | "neither")
    vs_rule: dict[str, tuple[float, float, str]] = field(default_factory=dict)
    sequences: dict[str, SequenceResult] = field(default_factory=dict)
    same_code_as: str | None = None   # the naive port that is the translation's own code

    @property
    def case(self) -> str:
        return f"{self.role}:{self.framework}"

    def verdict(self) -> str:
        """reproduces | constant_lr_only | differs | failed | none"""
        if self.rendering is None:
            return "none"
        if self.status != "ok":
            return "failed"
        if not all(self.sequences[s].same for s in CONSTANT_LR):
            return "differs"
        return "reproduces" if self.sequences["schedule"].same else "constant_lr_only"


@dataclass
class OptimizerTranslation:
    text: str
    framework: str
    config: OptimizerConfig
    semantics: Semantics
    dtype: str
    steps: int
    candidates: list[Candidate]
    status: str = ""
    exit_code: int = EXIT_MATCH
    summary: str = ""

    def to_dict(self) -> dict:
        return to_dict(self)


def backend_for(framework: str, keras_backend: str) -> str:
    return f"keras-{keras_backend}" if framework == "keras" else framework


def plan(text: str, to: tuple[str, ...], keras_backend: str) -> tuple[str, OptimizerConfig, Semantics,
                                                                        list[Candidate]]:
    """Parse and render everything (every ConfigError raised here, before any worker starts)."""
    unknown = [f for f in to if f not in FRAMEWORKS]
    if unknown or not to:
        raise ConfigError(f"--to takes {', '.join(FRAMEWORKS)} for an optimizer, got {', '.join(unknown) or 'none'}")
    if keras_backend not in KERAS_VARIANTS:
        raise ConfigError(f"--keras-backend must be one of {', '.join(KERAS_VARIANTS)}, got {keras_backend!r}")
    framework, config, explicit = parse_optimizer_text(text)
    semantics = semantics_of(framework, config)
    candidates = [Candidate(framework, "source", backend_for(framework, keras_backend), config,
                            renderer(framework).render(config), semantics)]
    for target in (f for f in to if f != framework):
        backend = backend_for(target, keras_backend)
        translated, reason = translated_config(target, semantics)
        rendering = renderer(target).render(translated) if translated is not None else None
        candidates.append(Candidate(target, "translation", backend, translated, rendering,
                                    semantics_of(target, translated) if translated else None, reason))
        naive = naive_config(framework, config, explicit, target)
        naive_rendering = renderer(target).render(naive)
        candidates.append(Candidate(target, "naive", backend, naive, naive_rendering, semantics_of(target, naive),
                                    same_code_as="translation" if rendering and rendering.code == naive_rendering.code
                                    else None))
    return framework, config, semantics, candidates


def _lrs(lr: float, schedule: str, steps: int) -> list[float]:
    return [lr if schedule == "constant" or t < steps // 2 else lr / 2 for t in range(steps)]


def _job(backend: str, dtype: str, params, grads, cases: dict[str, dict], lrs: dict, scales: dict) -> WorkerJob:
    batch = {f"grads/{t}/{k}": np.asarray(v, dtype=dtype) for t, g in enumerate(grads, start=1) for k, v in g.items()}
    return make_job(BACKENDS[backend], "optimizer_steps", cases, dtype=dtype,
                    params={k: np.asarray(v, dtype=dtype) for k, v in params.items()}, batch=batch,
                    payload={"configs": cases, "lrs": lrs, "scales": scales})


def translate_optimizer(text: str, to: tuple[str, ...] = FRAMEWORKS, dtype: str = "float64", steps: int = 20,
                        seed: int = 0, keras_backend: str = "tensorflow", timeout_s: float = 600.0,
                        progress=None) -> OptimizerTranslation:
    """Parse, render, run the source and every rendering natively on the fixed gradient sequences, compare."""
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"--dtype must be float32 or float64, got {dtype!r}")
    if not 2 <= steps <= 10_000:
        raise ConfigError(f"--steps must be in 2..10000, got {steps}")
    framework, config, semantics, candidates = plan(text, to, keras_backend)
    say = progress or (lambda _m: None)
    params, grads = fixed_gradients(seed, steps)
    lrs = {name: _lrs(config.lr, schedule, steps) for name, (_, schedule) in SEQUENCES.items()}
    fed = {name: [{k: np.asarray(v * scale, dtype=dtype).astype(np.float64) for k, v in g.items()} for g in grads]
           for name, (scale, _) in SEQUENCES.items()}
    start = {k: np.asarray(v, dtype=dtype).astype(np.float64) for k, v in params.items()}
    runs: dict[str, dict[str, list]] = {}
    rules: dict[tuple, list] = {}

    def rule(c: Candidate, name: str, rounded: bool = False) -> list[dict[str, np.ndarray]]:
        """float64 numpy trajectory of ``c``'s update on sequence ``name`` as the workers were fed it (once)."""
        key = (c.case, name, rounded)
        if key not in rules:
            rules[key] = reference_steps(c.framework, c.config, start, fed[name], lrs[name],
                                         float32_hyperparameters=rounded)
        return rules[key]

    worker_runs, mine_of = [], {}
    for backend in dict.fromkeys(c.backend for c in candidates):
        mine = [c for c in candidates if c.backend == backend and c.rendering is not None and not c.same_code_as]
        cases = {f"{c.case}@{name}": {**c.config.to_dict(), "code": c.rendering.code}
                 for c in mine for name in SEQUENCES}
        job = _job(backend, dtype, params, grads, cases, {case: lrs[case.split("@")[1]] for case in cases},
                   {case: SEQUENCES[case.split("@")[1]][0] for case in cases})
        worker_runs.append(WorkerRun(job, BACKENDS[backend], timeout_s,
                                     label=f"running {backend}: {len(mine)} rendering(s) x {len(SEQUENCES)} "
                                           f"gradient sequences, {steps} steps, {dtype} ..."))
        mine_of[backend] = mine
    outcomes, stopped = run_jobs_until_stopped(worker_runs, say=say, parallel=len(worker_runs))
    for backend, mine in mine_of.items():
        outcome = outcomes[backend]
        u = effective_unit_roundoff(outcome.environment) or UNIT_ROUNDOFF[dtype]
        for c in mine:
            c.versions = dict((outcome.environment or {}).get("versions", {}))
            rows = {name: outcome.methods.get(f"{c.case}@{name}") for name in SEQUENCES}
            bad = [r for r in rows.values() if r is None or r.status != "ok"]
            if bad:
                c.status = "failed"
                c.error = (bad[0].error if bad[0] is not None else outcome.error) or outcome.status
                continue
            c.status = "ok"
            c.note = (rows["unit"].info or {}).get("optimizer", "")
            runs[c.case] = {name: (step_params(row.grads, range(1, steps + 1), params), u)
                            for name, row in rows.items()}
            keras_tf = BACKENDS[backend].variant == "tensorflow" and dtype == "float64"
            for name in SEQUENCES:
                traj, _ = runs[c.case][name]
                bound = step_rtol(u, steps)[-1]
                exact = max(relative_distance(n, r) for n, r in zip(traj, rule(c, name)))
                follows = "exact" if exact <= bound else "neither"
                if follows == "neither" and keras_tf:
                    rounded = max(relative_distance(n, r) for n, r in zip(traj, rule(c, name, rounded=True)))
                    if rounded <= bound:
                        follows, exact = "float32 hyperparameters", rounded
                c.vs_rule[name] = (exact, bound, follows)
    source = candidates[0]
    for c in candidates[1:]:
        if c.same_code_as:
            twin = next(x for x in candidates if x.framework == c.framework and x.role == c.same_code_as)
            c.status, c.error, c.note, c.versions = twin.status, twin.error, twin.note, twin.versions
            c.vs_rule, c.sequences = twin.vs_rule, twin.sequences
            continue
        if c.status != "ok" or source.status != "ok":
            continue
        for name in SEQUENCES:
            (ta, ua), (tb, ub) = runs[source.case][name], runs[c.case][name]
            per_step = [relative_distance(x, y) for x, y in zip(ta, tb)]
            rtol = step_rtol(max(ua, ub), steps)
            predicted = [relative_distance(x, y) for x, y in zip(rule(source, name), rule(c, name))]
            result = SequenceResult(per_step, rtol, predicted)
            same_rule = first_beyond(predicted, rtol) is None
            rounded = any(x.vs_rule[name][2] == "float32 hyperparameters" for x in (source, c))
            result.rounding_only = bool(result.first_apart and same_rule and rounded)
            c.sequences[name] = result
    return raise_if_stopped(stopped, _finish(OptimizerTranslation(text, framework, config, semantics, dtype, steps,
                                                                  candidates)))


def _finish(report: OptimizerTranslation) -> OptimizerTranslation:
    source, translations = report.candidates[0], [c for c in report.candidates if c.role == "translation"]
    failed = [c for c in report.candidates if c.status == "failed"]
    off_rule = [c for c in report.candidates if c.status == "ok"
                and any(v[2] == "neither" for v in c.vs_rule.values())]
    verdicts = {c.framework: c.verdict() for c in translations}
    if source.status == "failed" or any(v == "failed" for v in verdicts.values()):
        report.status, report.exit_code = "incomplete", EXIT_INCOMPLETE
        report.summary = ("INCOMPLETE: " + ", ".join(f"{c.framework} ({c.role})" for c in failed)
                          + " could not be run")
    elif any(v in ("differs", "none") for v in verdicts.values()) or off_rule:
        report.status, report.exit_code = "mismatch", EXIT_MISMATCH
        parts = [f"{fw}: the translation differs from the source" for fw, v in verdicts.items() if v == "differs"]
        parts += [f"{c.framework}: no configuration reproduces it ({c.reason})" for c in translations
                  if c.verdict() == "none"]
        parts += [f"{c.framework} ({c.role}) does not follow its own rule" for c in off_rule]
        report.summary = "MISMATCH: " + "; ".join(parts)
    else:
        limited = [fw for fw, v in verdicts.items() if v == "constant_lr_only"]
        report.status, report.exit_code = "match", EXIT_MATCH
        report.summary = (f"MATCH: every translation reproduces the source's trajectory at every one of "
                          f"{report.steps} steps, within rtol(t) = {SAFETY:g}*u*t"
                          + (f" (at a constant learning rate only: {', '.join(limited)})" if limited else ""))
    return report


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _sequence_line(name: str, r: SequenceResult) -> str:
    scale, schedule = SEQUENCES[name]
    what = (f"{name:<8} (gradients x {scale:g}, " + ("constant lr" if schedule == "constant" else "lr halved halfway")
            + ")")
    if r.first_apart is None:
        return f"{what}: same trajectory, largest {max(r.per_step):.2g} (rtol {r.rtol[-1]:.2g} at step {len(r.rtol)})"
    if r.rounding_only:
        return (f"{what}: same update; apart by {max(r.per_step):.2g} only through Keras-on-TensorFlow rounding its "
                "hyperparameters to float32 (tf.cast of a Python float), which its own rule reproduces")
    early = ""
    if r.rules_apart is not None and r.first_apart < r.rules_apart:
        early = (f"; before step {r.rules_apart}, where the updates' forms part, only by rounding (largest "
                 f"{max(r.per_step[:r.rules_apart - 1]):.2g})")
    return (f"{what}: APART from step {r.first_apart} ({r.per_step[r.first_apart - 1]:.3g}){early}, "
            f"{r.per_step[-1]:.3g} after step {len(r.per_step)}; the numpy rules predict {r.predicted[-1]:.3g}")


def _why_naive(source: Semantics, naive: Semantics) -> list[str]:
    """The differences between two updates, in words."""
    out = []
    a, b = source.normalized(), naive.normalized()   # the same update is not a difference, however spelled
    if a.decay != b.decay or a.weight_decay != b.weight_decay:
        out.append(f"weight decay: {a.decay} {a.weight_decay:g} vs {b.decay} {b.weight_decay:g}")
    if a.family == "adam":
        if a.eps != b.eps:
            out.append(f"epsilon {a.eps:g} vs {b.eps:g}")
        if a.epsilon != b.epsilon:
            out.append(f"epsilon added to {'sqrt(v_hat)' if a.epsilon == 'corrected' else 'sqrt(v) (epsilon hat)'} vs "
                       f"{'sqrt(v_hat)' if b.epsilon == 'corrected' else 'sqrt(v) (epsilon hat)'}")
        if a.eps_root != b.eps_root:
            out.append(f"eps_root {a.eps_root:g} vs {b.eps_root:g}")
    if a.dampening != b.dampening:
        out.append(f"dampening {a.dampening:g} vs {b.dampening:g}")
    if a.velocity != b.velocity:
        out.append("learning rate inside the velocity (Keras) vs applied to the buffer (torch, optax): apart when "
                   "the learning rate changes")
    return out


def render_text(report: OptimizerTranslation) -> str:
    source = report.candidates[0]
    lines = [f"gradparity translate (optimizer): {report.text}",
             f"  {report.framework} computes: {report.semantics.describe()}",
             f"  measured: the source and each rendering run unchanged in their frameworks on {len(SEQUENCES)} fixed "
             f"gradient sequences of {report.steps} steps, {report.dtype}, from the same start; compared at every "
             f"step with the source (max|p_a - p_b| / max|p|), rtol(t) = {SAFETY:g}*u*t", ""]
    if source.status != "ok":
        lines.append(f"source ({source.backend}) FAILED: {(source.error or source.status).splitlines()[0]}")
    else:
        worst = max(v[0] for v in source.vs_rule.values())
        follows = {v[2] for v in source.vs_rule.values()}
        how = ("DOES NOT follow the rule gradparity read (gradparity misreads this optimizer)" if "neither" in follows
               else "follows the rule gradparity read, with its hyperparameters rounded to float32 as Keras on "
                    "TensorFlow casts a Python float," if "float32 hyperparameters" in follows
               else "follows the rule gradparity read")
        lines.append(f"source ({source.backend}, {_versions(source)}): {how} to {worst:.2g} (largest relative "
                     "difference over the sequences)")
    for fw in dict.fromkeys(c.framework for c in report.candidates[1:]):
        tr = next(c for c in report.candidates if c.framework == fw and c.role == "translation")
        naive = next(c for c in report.candidates if c.framework == fw and c.role == "naive")
        lines += ["", f"== {fw} ({tr.backend})"]
        if tr.rendering is None:
            lines.append(f"  no configuration reproduces it: {tr.reason}; gradparity has no explicit transformation "
                         "for it")
        else:
            lines.append("  " + ("native: the framework's own optimizer" if tr.rendering.native else
                                 "no native argument does it; the explicit form:"))
            lines += [f"  | {line}" if line else "  |" for line in tr.rendering.code.rstrip("\n").splitlines()]
            lines.append(f"  usage: {tr.rendering.usage}")
            lines += [f"  why: {n}" for n in tr.rendering.notes]
            if tr.status != "ok":
                lines.append(f"  FAILED: {(tr.error or tr.status).splitlines()[0]}")
            else:
                verdict = {"reproduces": "REPRODUCES the source's trajectory",
                           "constant_lr_only": "REPRODUCES it at a constant learning rate",
                           "differs": "DIFFERS from the source"}[tr.verdict()]
                lines.append(f"  {verdict} ({_versions(tr)}):")
                lines += [f"    {_sequence_line(n, r)}" for n, r in tr.sequences.items()]
                if tr.verdict() == "constant_lr_only":
                    lines.append("    why: " + "; ".join(_why_naive(report.semantics, tr.semantics)))
        if naive.same_code_as:
            lines.append(f"  the naive port ({_call(naive)}) is this same code")
        elif naive.status == "ok" and tr.status in ("ok", "not run"):
            lines.append(f"  the naive port {_call(naive)}:")
            lines += [f"    {_sequence_line(n, r)}" for n, r in naive.sequences.items()]
            why = _why_naive(report.semantics, naive.semantics)
            if why:
                lines.append("    why: " + "; ".join(why))
        elif naive.status == "failed":
            lines.append(f"  the naive port FAILED: {(naive.error or naive.status).splitlines()[0]}")
    lines += ["", report.summary]
    return "\n".join(lines)


def _call(c: Candidate) -> str:
    code = c.rendering.code if c.rendering else ""
    ret = [line.strip().removeprefix("return ") for line in code.splitlines() if line.strip().startswith("return ")]
    return (ret[-1] if ret else c.framework).replace("learning_rate=learning_rate", f"learning_rate={c.config.lr!r}")


def _versions(c: Candidate) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.versions.items()) or "versions unknown"


def to_dict(report: OptimizerTranslation) -> dict:
    """The JSON report (schema gradparity.translate.optimizer/1)."""
    def seq(r: SequenceResult) -> dict:
        return {"first_apart": r.first_apart, "rules_apart": r.rules_apart, "per_step": r.per_step, "rtol": r.rtol,
                "predicted_by_rules": r.predicted, "rounding_only": r.rounding_only, "same": r.same}

    return {"schema": "gradparity.translate.optimizer/1", "text": report.text, "framework": report.framework,
            "config": report.config.to_dict(), "semantics": vars(report.semantics) | {"described":
                                                                                    report.semantics.describe()},
            "dtype": report.dtype, "steps": report.steps, "safety": SAFETY,
            "sequences": {k: {"gradient_scale": s, "schedule": sch} for k, (s, sch) in SEQUENCES.items()},
            "status": report.status, "exit_code": report.exit_code, "summary": report.summary,
            "candidates": [{"framework": c.framework, "role": c.role, "backend": c.backend,
                            "native": c.rendering.native if c.rendering else None,
                            "code": c.rendering.code if c.rendering else None,
                            "usage": c.rendering.usage if c.rendering else None,
                            "notes": list(c.rendering.notes) if c.rendering else [], "reason": c.reason or None,
                            "config": c.config.to_dict() if c.config else None, "status": c.status, "error": c.error,
                            "ran": c.note, "versions": c.versions, "verdict": c.verdict() if c.role != "source" else None,
                            "vs_own_rule": {k: {"max_rel": v[0], "rtol": v[1], "follows": v[2]}
                                            for k, v in c.vs_rule.items()},
                            "vs_source": {k: seq(r) for k, r in c.sequences.items()}}
                           for c in report.candidates]}
