"""`gradparity optimizers`: the same named optimizer in torch, Keras and optax, measured step by step.

Every framework's native optimizer is fed the same starting parameters and the same fixed sequence of
gradients (no model, so nothing but the optimizer can differ), in its own worker process. Core then
measures two things per scenario and step:

- semantics: each framework's parameters against the numpy rule written from its source
  (``gradparity.experiment.optimizers``): within rounding, or the framework does not do what we read;
- parity: every pair of frameworks, and where two part, from which step, by how much, and why (the rules
  differ, and the numpy rules reproduce the difference).

Tolerance at step t: ``rtol(t) = SAFETY * u * t``, u the unit roundoff of the dtype: rounding of each
update is a few ulps of the parameters, and it accumulates at most linearly over the steps.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from gradparity.backends import BACKENDS, BackendInfo, make_job
from gradparity.backends.protocol import WorkerJob, step_params
from gradparity.compare.tolerance import SAFETY, UNIT_ROUNDOFF, effective_unit_roundoff, step_rtol
from gradparity.compare.trajectories import first_beyond, relative_distance
from gradparity.errors import ConfigError
from gradparity.experiment.optimizers import DEFAULTS, FRAMEWORKS, OptimizerConfig, reference_steps
from gradparity.run.runner import WorkerRun, raise_if_stopped, run_jobs_until_stopped

PARAM_SHAPES = {"kernel": (4, 3), "bias": (3,)}


@dataclass(frozen=True)
class Scenario:
    """One comparison: a config per framework (their own defaults where the scenario says so), a schedule."""

    id: str
    title: str
    configs: dict[str, OptimizerConfig]
    schedule: str = "constant"     # "constant" | "step" (lr halved after the first half)
    grad_scale: float = 1.0
    why_apart: str = ""             # the known semantic difference, when the rules differ


def _same(config: OptimizerConfig) -> dict[str, OptimizerConfig]:
    return {fw: config for fw in FRAMEWORKS}


def _defaults(name: str, **kw) -> dict[str, OptimizerConfig]:
    """The optimizer with each framework's own defaults for epsilon (and AdamW's weight decay)."""
    out = {}
    for fw in FRAMEWORKS:
        d = DEFAULTS[fw]
        extra = {"weight_decay": d["adamw_weight_decay"]} if name == "adamw" else {}
        out[fw] = OptimizerConfig(name, eps=d["adam_eps"], **extra, **kw)
    return out


SCENARIOS = (
    Scenario("sgd_momentum", "SGD, momentum 0.9, constant lr", _same(OptimizerConfig("sgd", 0.1, momentum=0.9))),
    Scenario("sgd_momentum_schedule", "SGD, momentum 0.9, lr halved halfway",
             _same(OptimizerConfig("sgd", 0.1, momentum=0.9)), schedule="step",
             why_apart="Keras keeps lr inside its velocity (v = mu*v - lr*g; p += v), torch and optax apply the "
                       "current lr to the whole buffer (b = mu*b + g; p -= lr*b): equal while lr is constant, "
                       "apart from the first step after it changes"),
    Scenario("sgd_nesterov", "SGD, Nesterov momentum 0.9, constant lr",
             _same(OptimizerConfig("sgd", 0.1, momentum=0.9, nesterov=True))),
    Scenario("sgd_weight_decay", "SGD, momentum 0.9, weight_decay 0.01",
             _same(OptimizerConfig("sgd", 0.1, momentum=0.9, weight_decay=0.01)),
             why_apart="torch's SGD (and optax's add_decayed_weights) add wd*p to the gradient, which then goes "
                       "through the momentum; Keras decays the weights directly (p -= lr*wd*p), outside it"),
    Scenario("adam_same_eps", "Adam, eps 1e-8 everywhere", _same(OptimizerConfig("adam", 1e-2, eps=1e-8)),
             why_apart="Keras adds epsilon to the uncorrected sqrt(v) ('epsilon hat'), torch and optax to the "
                       "bias-corrected sqrt(v_hat): the same eps weighs sqrt(1 - beta2^t) times less in Keras"),
    Scenario("adam_defaults_tiny_gradients", "Adam with each framework's default eps, gradients of size 1e-7",
             _defaults("adam", lr=1e-2), grad_scale=1e-7,
             why_apart="the default epsilon differs (torch and optax 1e-8, Keras 1e-7, applied to the "
                       "uncorrected sqrt(v)) and matters once sqrt(v) is no longer much larger than it"),
    Scenario("adamw_defaults", "AdamW with each framework's default weight decay and eps",
             _defaults("adamw", lr=1e-2),
             why_apart="default weight decay: torch 0.01, Keras 0.004, optax 1e-4 (and Keras' epsilon)"),
    Scenario("adamw_same", "AdamW, weight_decay 0.01, eps 1e-8 everywhere",
             _same(OptimizerConfig("adamw", 1e-2, weight_decay=0.01, eps=1e-8)),
             why_apart="Keras' epsilon hat (see adam_same_eps); the decoupled decay is the same"),
)
SCENARIOS += (
    Scenario("sgd_momentum_accumulation", "SGD, momentum 0.9, gradients accumulated over 4 micro-steps",
             _same(OptimizerConfig("sgd", 0.1, momentum=0.9, accumulation=4))),
    Scenario("adam_accumulation", "Adam, eps 1e-8, gradients accumulated over 4 micro-steps",
             _same(OptimizerConfig("adam", 1e-2, eps=1e-8, accumulation=4)),
             why_apart="Keras' epsilon hat, as without accumulation (Adam's bias correction counts updates in "
                       "every framework: Keras' iterations is the call count // 4)"),
)
BY_ID = {s.id: s for s in SCENARIOS}


def learning_rates(scenario: Scenario, lr: float, steps: int) -> list[float]:
    if scenario.schedule == "step":
        return [lr if t < steps // 2 else lr / 2 for t in range(steps)]
    return [lr] * steps


def fixed_gradients(seed: int, steps: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Starting parameters and ``steps`` gradients, N(0, 1), from ``seed`` (float64)."""
    rng = np.random.default_rng([seed, 7])
    params = {k: rng.standard_normal(s) for k, s in PARAM_SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in PARAM_SHAPES.items()} for _ in range(steps)]
    return params, grads


@dataclass
class PairDrift:
    a: str
    b: str
    per_step: list[float]           # max|p_a - p_b| / max(max|p_a|, max|p_b|) after each step
    rtol: list[float]
    first_apart: int | None          # first step beyond rtol (1-based), None if never
    predicted: list[float]           # the same measure between the two frameworks' numpy rules
    #: the same with exact hyperparameters everywhere (differs from ``predicted`` only when a side is Keras on
    #: TensorFlow in float64, which rounds them to float32)
    predicted_exact: list[float] = field(default_factory=list)

    @property
    def apart(self) -> bool:
        return self.first_apart is not None


@dataclass
class ScenarioResult:
    scenario: Scenario
    semantics: dict[str, float] = field(default_factory=dict)   # framework -> max per-step rel. vs its own rule
    semantics_rtol: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)          # framework -> the optimizer that ran
    pairs: list[PairDrift] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    #: backend -> (vs the rule with exact hyperparameters, vs the rule with float32 ones): Keras on TensorFlow
    #: casts Python-float hyperparameters through float32 even in a float64 run.
    float32_hyper: dict[str, tuple[float, float]] = field(default_factory=dict)


def _job(info: BackendInfo, dtype: str, params, grads, scenarios, lr_of) -> WorkerJob:
    batch = {f"grads/{t}/{k}": np.asarray(v, dtype=dtype)
             for t, g in enumerate(grads, start=1) for k, v in g.items()}
    payload = {"configs": {s.id: s.configs[info.framework].to_dict() for s in scenarios},
               "lrs": {s.id: lr_of(s) for s in scenarios},
               "scales": {s.id: s.grad_scale for s in scenarios}}
    return make_job(info, "optimizer_steps", [s.id for s in scenarios], dtype=dtype,
                    params={k: np.asarray(v, dtype=dtype) for k, v in params.items()}, batch=batch, payload=payload)


def compare_optimizers(scenarios=SCENARIOS, backends=("torch", "keras-tensorflow", "jax"), dtype: str = "float64",
                       steps: int = 20, seed: int = 0, timeout_s: float = 600.0, progress=None) -> list[ScenarioResult]:
    """Run every scenario natively in each backend (one worker each) and measure semantics and parity."""
    if not backends or not scenarios:
        raise ConfigError("nothing to compare: --backends and --scenarios each need at least one name")
    for b in backends:
        if b not in BACKENDS or BACKENDS[b].framework not in FRAMEWORKS:
            raise ConfigError(f"optimizers run in torch, keras-tensorflow/-jax/-torch and jax, not {b!r}")
    if steps < 2:
        raise ConfigError(f"steps must be at least 2, got {steps}")
    if steps > 10_000:  # as translate's: every step's gradients are drawn and held in memory
        raise ConfigError(f"steps must be at most 10000, got {steps}")
    say = progress or (lambda _m: None)
    params, grads = fixed_gradients(seed, steps)
    lr_of = {s.id: learning_rates(s, s.configs["torch"].lr, steps) for s in scenarios}
    # What every worker was fed, in float64: the start and each scenario's gradients, rounded to the dtype.
    rounded = {k: np.asarray(v, dtype=dtype).astype(np.float64) for k, v in params.items()}
    scaled = {s.id: [{k: g[k] * s.grad_scale for k in g} for g in grads] for s in scenarios}
    fed = {s.id: [{k: np.asarray(v, dtype=dtype).astype(np.float64) for k, v in g.items()} for g in scaled[s.id]]
           for s in scenarios}
    rules: dict[tuple, list] = {}

    def rule(s: Scenario, framework: str, **flags) -> list[dict[str, np.ndarray]]:
        """float64 numpy trajectory of ``framework``'s rule on the exact inputs (computed once per flags)."""
        key = (s.id, framework, tuple(sorted(flags.items())))
        if key not in rules:
            rules[key] = reference_steps(framework, s.configs[framework], params, scaled[s.id], lr_of[s.id], **flags)
        return rules[key]

    native: dict[str, dict] = {}
    results = {s.id: ScenarioResult(s) for s in scenarios}
    outcomes, stopped = run_jobs_until_stopped([WorkerRun(_job(BACKENDS[b], dtype, params, grads, scenarios, lambda s: lr_of[s.id]),
                                   BACKENDS[b], timeout_s,
                                   label=f"running {b} ({len(scenarios)} optimizers, {steps} steps, {dtype}) ...")
                         for b in backends], say=say, parallel=len(backends))
    for b in backends:
        info, outcome = BACKENDS[b], outcomes[b]
        u = effective_unit_roundoff(outcome.environment) or UNIT_ROUNDOFF[dtype]
        bound = step_rtol(u, steps)[-1]
        for s in scenarios:
            row = outcome.methods.get(s.id)
            if row is None or row.status != "ok":
                results[s.id].errors[b] = (row.error if row is not None else outcome.error) or outcome.status
                continue
            traj = step_params(row.grads, range(1, steps + 1), params)
            native[(b, s.id)] = [traj, u, False]
            results[s.id].notes[b] = (row.info or {}).get("optimizer", "")
            ref = reference_steps(info.framework, s.configs[info.framework], rounded, fed[s.id], lr_of[s.id])
            results[s.id].semantics[b] = max(relative_distance(n, r) for n, r in zip(traj, ref))
            results[s.id].semantics_rtol[b] = bound
            if info.variant == "tensorflow" and dtype == "float64" and results[s.id].semantics[b] > bound:
                rounded_ref = reference_steps("keras", s.configs["keras"], rounded, fed[s.id], lr_of[s.id],
                                              float32_hyperparameters=True)
                matched = max(relative_distance(n, r) for n, r in zip(traj, rounded_ref))
                if matched <= bound:
                    results[s.id].float32_hyper[b] = (results[s.id].semantics[b], matched)
                    results[s.id].semantics[b] = matched
                    native[(b, s.id)][2] = True  # the rule it follows, for the pairs' prediction
    for s in scenarios:
        ok = [b for b in backends if (b, s.id) in native]
        for a, b in itertools.combinations(ok, 2):
            (ta, ua, fa), (tb, ub, fb) = native[(a, s.id)], native[(b, s.id)]
            u = max(ua, ub)
            per_step = [relative_distance(x, y) for x, y in zip(ta, tb)]
            rtol = step_rtol(u, steps)
            fw_a, fw_b = BACKENDS[a].framework, BACKENDS[b].framework
            ra, rb = rule(s, fw_a, float32_hyperparameters=fa), rule(s, fw_b, float32_hyperparameters=fb)
            ea, eb = rule(s, fw_a, float32_accumulator=False), rule(s, fw_b, float32_accumulator=False)
            results[s.id].pairs.append(PairDrift(a, b, per_step, rtol, first_beyond(per_step, rtol),
                                                 [relative_distance(x, y) for x, y in zip(ra, rb)],
                                                 [relative_distance(x, y) for x, y in zip(ea, eb)]))
    return raise_if_stopped(stopped, [results[s.id] for s in scenarios])


def render_text(results: list[ScenarioResult], dtype: str, steps: int) -> str:
    lines = [f"gradparity optimizers: each framework's native optimizer on one fixed gradient sequence "
             f"({steps} steps, {dtype}, parameters {', '.join(f'{k} {v}' for k, v in PARAM_SHAPES.items())}); "
             f"tolerance rtol(t) = {SAFETY:g} * u * t", ""]
    for r in results:
        s = r.scenario
        lines.append(f"== {s.id}: {s.title}" + (f" (gradients x {s.grad_scale:g})" if s.grad_scale != 1 else "")
                     + (", lr halved after step " + str(steps // 2) if s.schedule == "step" else ""))
        for b, err in r.errors.items():
            lines.append(f"  {b}: FAILED: {err.splitlines()[0]}")
        for b, e in r.semantics.items():
            verdict = "as its source says" if e <= r.semantics_rtol[b] else "NOT what its source says"
            lines.append(f"  {b}: {r.notes.get(b, '')}: {verdict} (max rel. {e:.2g} vs the numpy rule, "
                         f"rtol {r.semantics_rtol[b]:.2g})")
            if b in r.float32_hyper:
                exact, rounded = r.float32_hyper[b]
                lines.append(f"    ... with its hyperparameters rounded to float32 (momentum, weight decay, the betas "
                             f"of its bias correction): {rounded:.2g}; with them exact {exact:.2g}. Keras' "
                             "TensorFlow backend casts a Python float through float32 (tf.cast), even in float64")
        for p in r.pairs:
            if p.apart:
                why = []
                if any(e > rt for e, rt in zip(p.predicted_exact, p.rtol)) and s.why_apart:
                    why.append(s.why_apart)
                if any(b in r.float32_hyper for b in (p.a, p.b)):
                    why.append(f"keras-tensorflow's float32 hyperparameters (with exact ones the rules predict "
                               f"{p.predicted_exact[-1]:.3g})")
                if any(BACKENDS[b].framework == "jax" for b in (p.a, p.b)) and max(
                        c.accumulation for c in s.configs.values()) > 1:
                    why.append("optax.MultiSteps keeps its running mean in float32 between micro-steps "
                               f"(accumulator_dtype; in exact arithmetic the rules predict "
                               f"{p.predicted_exact[-1]:.3g})")
                lines.append(f"  {p.a} vs {p.b}: APART from step {p.first_apart} "
                             f"({p.per_step[p.first_apart - 1]:.3g}), "
                             f"{p.per_step[-1]:.3g} after step {len(p.per_step)}; the numpy rules predict "
                             f"{p.predicted[-1]:.3g}" + (f"; why: {'; and '.join(why)}" if why else ""))
            else:
                lines.append(f"  {p.a} vs {p.b}: same trajectory (largest {max(p.per_step):.2g}, "
                             f"within rtol {p.rtol[-1]:.2g} at every step)")
        lines.append("")
    return "\n".join(lines)


def to_dict(results: list[ScenarioResult], dtype: str, steps: int) -> dict:
    return {"schema": "gradparity.optimizers/1", "dtype": dtype, "steps": steps, "safety": SAFETY,
            "scenarios": [{
                "id": r.scenario.id, "title": r.scenario.title, "schedule": r.scenario.schedule,
                "grad_scale": r.scenario.grad_scale,
                "configs": {fw: c.to_dict() for fw, c in r.scenario.configs.items()},
                "native": r.notes, "errors": r.errors,
                "semantics": {b: {"max_rel_vs_rule": e, "rtol": r.semantics_rtol[b],
                                  **({"float32_hyperparameters": {"vs_exact_rule": r.float32_hyper[b][0],
                                                                  "vs_float32_rule": r.float32_hyper[b][1]}}
                                     if b in r.float32_hyper else {})}
                              for b, e in r.semantics.items()},
                "pairs": [{"a": p.a, "b": p.b, "first_apart": p.first_apart, "per_step": p.per_step,
                           "rtol": p.rtol, "predicted_by_rules": p.predicted,
                           "predicted_with_exact_hyperparameters": p.predicted_exact} for p in r.pairs],
                "why_apart": r.scenario.why_apart or None} for r in results]}
