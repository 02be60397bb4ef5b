"""`gradparity train`: the built-in MLP trained for K steps in every framework from one start, step by step.

The pipeline's stages, for a training run: spec (flags) -> canonical inputs (seeded parameters, the digits
shuffled by the seed and cut into K batches) -> one worker per framework (task "train", each framework's
own model, loss, autodiff and optimizer) -> compare -> report. Every framework's parameters after every step
are compared with

- the float64 numpy trajectory that uses *that framework's* optimizer rule (``core/reference/train.py``):
  agreement means the framework trains as its documented semantics say, to rounding;
- every other framework: where two part, from which step and by how much, and whether their optimizer rules
  (not rounding) predict it.

Tolerance at step t, relative to the parameters' largest entry: ``rtol(t) = rtol_gradient(u) * t``, where
``rtol_gradient`` is the run command's gradient tolerance for this model and batch size (rounding of one
step's update) and the steps add up at most linearly while the trajectories stay close. Asserted at every
step, not only the last.
"""
from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass, field, replace

import numpy as np

from gradparity.backends import BACKENDS, make_job
from gradparity.backends.protocol import WorkerJob, builtin_payload, step_losses, step_params
from gradparity.compare.tolerance import UNIT_ROUNDOFF, effective_unit_roundoff, tolerance_for, training_rtol
from gradparity.compare.trajectories import first_beyond, relative_distance
from gradparity.errors import ConfigError, Interrupted
from gradparity.experiment.inputs import digits_dataset, seeded_rng, init_params
from gradparity.experiment.models import MLP
from gradparity.experiment.optimizers import FRAMEWORKS, OptimizerConfig
from gradparity.run.runner import WorkerRun, run_jobs

OPTIMIZER_CHOICES = {
    "sgd": lambda lr: OptimizerConfig("sgd", lr),
    "momentum": lambda lr: OptimizerConfig("sgd", lr, momentum=0.9),
    "nesterov": lambda lr: OptimizerConfig("sgd", lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: OptimizerConfig("adam", lr, eps=1e-8),
    "adamw": lambda lr: OptimizerConfig("adamw", lr, eps=1e-8, weight_decay=0.01),
}
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adam": 1e-2, "adamw": 1e-2}


@dataclass(frozen=True)
class TrainSpec:
    optimizer: str = "momentum"
    lr: float | None = None          # None: DEFAULT_LR[optimizer]
    steps: int = 30
    batch_size: int = 32
    reduction: str = "mean"
    schedule: str = "constant"       # constant | step (lr halved after the first half)
    dtype: str = "float32"
    hidden: tuple[int, ...] = (32,)
    activation: str = "relu"
    seed: int = 0
    backends: tuple[str, ...] = ("torch", "keras-tensorflow", "jax")
    timeout_s: float = 600.0
    #: Also train with the other reduction, at the learning rate that should make the updates identical: the
    #: summed loss at lr / B for SGD (its gradient is B times the mean's), at the same lr for Adam (scale-free
    #: but for epsilon). The main run keeps ``reduction``.
    equivalence: bool = False
    #: The built-in model: "mlp" (hidden, activation) on the digits, "cnn" on the digits as 8x8x1 images, or
    #: "sequence" (the causal transformer) on seeded token sequences; cnn and sequence take ``gradparity run``'s
    #: default settings for them (``activation`` applies to the cnn).
    model: str = "mlp"
    #: With ``model`` a check config (``CHECK.toml``): an .npz of examples to train on instead of the check's
    #: batch (the same array names).
    data: str | None = None

    @property
    def optimizer_text(self) -> str | None:
        """The optimizer as written in a framework (``torch.optim.Adam(params, lr=1e-3)``), when ``optimizer``
        is one rather than a name: its framework trains with it, every other with its translation."""
        return self.optimizer if "(" in self.optimizer else None

    def config(self) -> OptimizerConfig:
        if self.optimizer_text:
            from gradparity.experiment.optimizer_text import parse_optimizer_text

            config = parse_optimizer_text(self.optimizer_text)[1]
            return config if self.lr is None else replace(config, lr=self.lr)
        return OPTIMIZER_CHOICES[self.optimizer](self.lr if self.lr is not None else DEFAULT_LR[self.optimizer])

    def framework_config(self, framework: str) -> OptimizerConfig:
        """The optimizer ``framework`` trains with: the named one everywhere; for an optimizer text, the text's in
        its own framework and, in the others, the configuration ``gradparity translate`` gives (its forms set)."""
        if not self.optimizer_text:
            return self.config()
        from gradparity.commands.translate_optimizer import translated_config
        from gradparity.experiment.optimizer_text import framework_of
        from gradparity.experiment.optimizers import semantics_of

        source = framework_of(self.optimizer_text)
        if framework == source:
            return self.config()
        config, reason = translated_config(framework, semantics_of(source, self.config()))
        if config is None:
            raise ConfigError(f"{self.optimizer_text} has no translation to {framework}: {reason}")
        return config

    def rendered(self, framework: str) -> dict:
        """``framework_config`` as a worker receives it: with an optimizer text, the rendered code it runs."""
        config = self.framework_config(framework)
        if not self.optimizer_text:
            return config.to_dict()
        from gradparity.commands.translate_optimizer import renderer

        return {**config.to_dict(), "code": renderer(framework).render(config).code}

    def lrs(self) -> list[float]:
        lr = self.config().lr
        if self.schedule == "step":
            return [lr if t < self.steps // 2 else lr / 2 for t in range(self.steps)]
        return [lr] * self.steps

    def runs(self) -> dict[str, dict]:
        """The runs each worker trains: "run", and with ``equivalence`` the other reduction ("other") at the
        learning rate that should give the same updates."""
        runs = {"run": {"optimizer": self.config().to_dict(), "lrs": self.lrs(), "reduction": self.reduction}}
        if self.equivalence:
            other = "sum" if self.reduction == "mean" else "mean"
            terms = self.batch_size * self.terms_per_example()   # what the mean divides by
            factor = 1.0 if self.config().name in ("adam", "adamw") else (
                1.0 / terms if other == "sum" else float(terms))
            runs["other"] = {"optimizer": self.config().to_dict(), "lrs": [lr * factor for lr in self.lrs()],
                             "reduction": other}
        return runs


    def terms_per_example(self) -> int:
        """Loss terms one example adds (the sequence model: one per token)."""
        return builtin_experiment(self).model.seq_len if self.model == "sequence" else 1


MODELS = ("mlp", "cnn", "sequence")


def builtin_experiment(spec: TrainSpec):
    """``gradparity run``'s validated experiment for the spec's built-in model (its default settings)."""
    from gradparity.experiment.spec import load_experiment

    overrides = {"model.kind": spec.model, "seed": spec.seed, "dtype": spec.dtype}
    if spec.model == "cnn":
        overrides["model.activation"] = spec.activation
    return load_experiment(None, overrides)


def check_spec(spec: TrainSpec) -> None:
    """Every problem of the spec at once, as a ConfigError (exit 2) before any worker starts."""
    problems = [] if spec.backends else ["--backends names no backend: give at least one, e.g. torch,jax"]
    if spec.optimizer_text:
        try:
            for b in spec.backends:
                if b in BACKENDS and BACKENDS[b].framework in FRAMEWORKS:
                    spec.rendered(BACKENDS[b].framework)
        except ConfigError as exc:
            problems += exc.problems
    elif spec.optimizer not in OPTIMIZER_CHOICES:
        problems.append(f"optimizer {spec.optimizer!r} is not one of {', '.join(OPTIMIZER_CHOICES)} or an "
                        "optimizer as written in torch, Keras or optax (e.g. \"torch.optim.Adam(params, lr=1e-3)\")")
    if spec.lr is not None and not (np.isfinite(spec.lr) and spec.lr > 0):
        problems.append(f"lr must be a positive number, got {spec.lr!r}")
    if not 1 <= spec.steps <= 10_000:
        problems.append(f"steps must be in 1..10000, got {spec.steps}")
    if not 1 <= spec.batch_size <= 1797:
        problems.append(f"batch size must be in 1..1797 (the digits), got {spec.batch_size}")
    if spec.data is not None and not spec.model.endswith(".toml"):
        problems.append("--data gives the examples of a check config's models: use it with --model CHECK.toml")
    for name, value, choices in (("model", spec.model, MODELS + ("CHECK.toml",) if not spec.model.endswith(".toml")
                                  else (spec.model,)), ("reduction", spec.reduction, ("mean", "sum")),
                                 ("schedule", spec.schedule, ("constant", "step")),
                                 ("dtype", spec.dtype, ("float32", "float64"))):
        if value not in choices:
            problems.append(f"{name} {value!r} is not one of {', '.join(choices)}")
    for b in spec.backends:
        if b not in BACKENDS or BACKENDS[b].framework not in FRAMEWORKS:
            problems.append(f"backend {b!r}: training runs in torch, keras-tensorflow/-jax/-torch and jax")
    if problems:
        raise ConfigError(problems)


#: Share of the digits held out (never trained on) to measure accuracy.
HELD_OUT = 0.2


def held_out_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of n examples: a seeded order, its last HELD_OUT held out."""
    order = seeded_rng(seed, 4).permutation(n)
    cut = int(round(n * (1 - HELD_OUT)))
    return order[:cut], order[cut:]


def split_digits(spec: TrainSpec) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], str]:
    """(training split, held-out split, description): the digits in a seeded order, the last 20% held out (as
    8x8x1 images for the cnn); for the sequence model, seeded token sequences split alike."""
    if spec.model == "sequence":
        from gradparity.experiment.inputs import token_sequences

        exp = builtin_experiment(spec)
        m, n = exp.model, exp.data.num_examples
        seq = token_sequences(n, m.seq_len, m.vocab, seeded_rng(spec.seed, 2))
        x, y = seq[:, :-1], seq[:, 1:]
        desc = (f"synthetic token sequences ({n} of length {m.seq_len}, vocabulary {m.vocab}: stride 1-3 modulo the "
                "vocabulary, 10% noise; targets the next token)")
    else:
        x, y, desc = digits_dataset()
        if spec.model == "cnn":
            x, desc = x.reshape(-1, 8, 8, 1), desc + " as 8x8x1 images"
    train, held = held_out_split(len(y), spec.seed)
    cut = len(train)
    held_x = x[held] if spec.model == "sequence" else x[held].astype(spec.dtype)   # token ids stay integers
    return ((x[train], y[train].astype(np.int64)), (held_x, y[held].astype(np.int64)),
            f"{desc}: {cut} to train on, {len(held)} held out")


def build_batches(spec: TrainSpec, split=None) -> tuple[MLP, dict[str, np.ndarray], list, str]:
    """(model, canonical initial parameters, K batches, description): the training split (``split_digits``'s,
    or ``split`` when the caller has it) shuffled by the seed, cut into consecutive batches (a new shuffle
    each epoch), parameters as ``gradparity run`` draws them."""
    (x, y), _, desc = split if split is not None else split_digits(spec)
    n = len(y)
    model = build_model(spec, x.shape[1:])
    rng = seeded_rng(spec.seed, 1)
    order, batches = np.empty(0, dtype=np.int64), []
    for _ in range(spec.steps):
        if len(order) < spec.batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        rows, order = order[:spec.batch_size], order[spec.batch_size:]
        batches.append((x[rows] if spec.model == "sequence" else x[rows].astype(spec.dtype), y[rows].astype(np.int64)))
    desc += f"; {spec.steps} batches of {spec.batch_size} (seeded shuffle, reshuffled each epoch)"
    return model, init_params(model, spec.seed, spec.dtype), batches, desc


def build_model(spec: TrainSpec, example_shape: tuple[int, ...]):
    """The built-in model the spec names, for examples of ``example_shape`` and the digits' 10 classes."""
    if spec.model == "mlp":
        return MLP((example_shape[0], *spec.hidden, 10), spec.activation)
    from gradparity.experiment.inputs import cnn_model
    from gradparity.experiment.models import Sequence

    m = builtin_experiment(spec).model
    if spec.model == "cnn":
        return cnn_model(m, example_shape, 10)
    return Sequence(m.vocab, m.seq_len, m.width, m.heads, m.mlp_width, m.options)


def held_out_accuracy(model, steps: list[dict[str, np.ndarray]], held: tuple[np.ndarray, np.ndarray]) -> list[float]:
    """Accuracy on the held-out split of the parameters after each step, by the float64 numpy forward pass
    (the same arithmetic for every framework's parameters); for token targets, over every token."""
    if isinstance(model, MLP):
        from gradparity.reference.mlp import forward

        x, y = np.asarray(held[0], dtype=np.float64), held[1]
        return [float(np.mean(np.argmax(forward(p, x, model.to_dict()).logits, axis=1) == y)) for p in steps]
    from gradparity.reference.models import logits

    x, y = held
    return [float(np.mean(np.argmax(logits(p, x, model.to_dict()), axis=-1) == y)) for p in steps]


def train_job(spec: TrainSpec, backend: str, model: MLP, params, batches) -> WorkerJob:
    """The job of one framework's worker: the spec's runs of ``model`` from ``params`` on ``batches``."""
    info = BACKENDS[backend]
    batch = {}
    for t, (x, y) in enumerate(batches, start=1):
        batch[f"batches/{t}/x"], batch[f"batches/{t}/y"] = x, y
    runs = spec.runs()
    if spec.optimizer_text:
        for run in runs.values():
            run["optimizer"] = spec.rendered(info.framework)
    # Every built-in model trains in its framework's one trainer (task "train"), on the model its model session
    # builds for `gradparity run` (payload "builtin").
    task, payload = "train", builtin_payload(model.to_dict(), mode="training", runs=runs)
    return make_job(info, task, runs, dtype=spec.dtype, model=model.to_dict(), loss={"name": "cross_entropy"},
                    params=params, batch=batch, payload=payload)


@dataclass
class Trajectory:
    backend: str
    status: str
    error: str | None = None
    params: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)
    losses: list[float] = field(default_factory=list)
    unit_roundoff: float | None = None
    environment: dict | None = None
    info: dict | None = None
    seconds: float | None = None
    vs_rule: list[float] = field(default_factory=list)      # per step, vs numpy with its own optimizer rule
    rule_rtol: list[float] = field(default_factory=list)
    #: with ``equivalence``: per step, the other reduction's run vs this one, and the same for the numpy rule
    vs_other: list[float] = field(default_factory=list)
    other_predicted: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)      # held-out, after each step
    #: the parameter tensor farthest from the rule at the first step off it (its own largest |difference|)
    worst_param: str | None = None

    @property
    def first_off_rule(self) -> int | None:
        return first_beyond(self.vs_rule, self.rule_rtol)


@dataclass
class Pair:
    a: str
    b: str
    per_step: list[float]
    rtol: list[float]
    predicted: list[float]    # the numpy trajectories with each side's optimizer rule
    #: the same with exact hyperparameters on both sides (differs from ``predicted`` only for Keras on
    #: TensorFlow in float64, which rounds them to float32)
    predicted_exact: list[float] = field(default_factory=list)

    @property
    def first_apart(self) -> int | None:
        return first_beyond(self.per_step, self.rtol)


@dataclass
class TrainReport:
    spec: TrainSpec
    description: str
    trajectories: list[Trajectory]
    pairs: list[Pair]
    reference_losses: dict[str, list[float]]
    reference_accuracy: dict[str, list[float]] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict, repr=False)     # the canonical start
    batches: list = field(default_factory=list, repr=False)                     # (x, y) per step
    model: str = ""                                                              # what was trained, in words
    #: tensors left out of every comparison (``rounding_only_under_adam``)
    rounding_only: frozenset = frozenset()
    #: the signal that stopped the run (its unfinished trajectories say "interrupted"), or None
    interrupted: int | None = None

    @property
    def interrupted_by(self) -> str | None:
        return None if self.interrupted is None else signal.Signals(self.interrupted).name

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return 128 + self.interrupted
        if any(t.status != "ok" for t in self.trajectories):
            return 3
        return 1 if any(t.first_off_rule for t in self.trajectories) else 0


def _float32_hyper(spec: TrainSpec, backend: str) -> bool:
    """Keras on TensorFlow rounds its hyperparameters to float32, which shows in a float64 run (see
    ``gradparity optimizers``): its numpy trajectory does the same."""
    return BACKENDS[backend].variant == "tensorflow" and spec.dtype == "float64"


def rounding_only_under_adam(spec: TrainSpec, model, params, batches) -> frozenset:
    """The parameter tensors whose gradient is zero in exact arithmetic but not in floating point (the
    attention key's bias: softmax ignores it), when the optimizer is Adam: Adam divides by sqrt(v) + eps, so
    their gradient of pure rounding delta becomes a step of lr * min(delta / eps, 1), not lr * delta, and
    their trajectories are rounding, amplified. Found on batch 1 by float64 numpy (largest |gradient| at most
    1e-9 of the model's largest, not exactly 0); the MLP has none."""
    if spec.config().name not in ("adam", "adamw") or isinstance(model, MLP):
        return frozenset()
    from gradparity.reference.models import loss_and_grads

    x, y = batches[0]
    _, grads = loss_and_grads(params, x, y, model.to_dict())   # float64 throughout, inputs cast by the reference
    largest = max(float(np.max(np.abs(g))) for g in grads.values())
    return frozenset(k for k, g in grads.items() if 0 < np.max(np.abs(g)) <= 1e-9 * largest)


def run_training(spec: TrainSpec, progress=None) -> TrainReport:
    """Train in every backend, compute the numpy trajectories, compare step by step."""
    if spec.model.endswith(".toml"):
        from gradparity.commands.user_models import NOT_WITHOUT_SWEEP

        raise ConfigError(NOT_WITHOUT_SWEEP)
    from gradparity.reference.models import trajectory as model_trajectory
    from gradparity.reference.train import trajectory as mlp_trajectory

    check_spec(spec)
    say = progress or (lambda _m: None)
    split = split_digits(spec)
    held = split[1]
    model, params, batches, desc = build_batches(spec, split)
    config = spec.config()
    grad_tol = tolerance_for(model, spec.batch_size)
    skip = rounding_only_under_adam(spec, model, params, batches)

    rounded = {k: v.astype(np.float64) for k, v in params.items()}
    references: dict[tuple[str, bool, str], tuple[list, list]] = {}

    trajectory = mlp_trajectory if isinstance(model, MLP) else model_trajectory

    def reference(framework: str, f32_hyper: bool = False, run: str = "run"):
        if (framework, f32_hyper, run) not in references:
            r = spec.runs()[run]
            references[(framework, f32_hyper, run)] = trajectory(rounded, batches, model.to_dict(),
                                                                 spec.framework_config(framework), r["lrs"],
                                                                 r["reduction"], framework, f32_hyper)
        return references[(framework, f32_hyper, run)]

    out = []
    interrupted = None
    try:
        outcomes = run_jobs([WorkerRun(train_job(spec, b, model, params, batches), BACKENDS[b], spec.timeout_s,
                                       label=f"running {b} ({spec.steps} steps of {config.label()}, {spec.dtype}) ...")
                             for b in spec.backends], say=say, parallel=len(spec.backends))
    except Interrupted as exc:  # what finished is compared and reported; the report says the run was stopped
        interrupted, outcomes = exc.signum, exc.outcomes
    for b in spec.backends:
        info, outcome = BACKENDS[b], outcomes[b]
        row = outcome.methods.get("run")
        if row is None or row.status != "ok":
            out.append(Trajectory(b, row.status if row else outcome.status,
                                  (row.error if row else None) or outcome.error))
            continue
        u = effective_unit_roundoff(outcome.environment) or UNIT_ROUNDOFF[spec.dtype]
        steps = step_params(row.grads, range(1, spec.steps + 1), params)
        tr = Trajectory(b, "ok", None, steps, step_losses(row.grads, spec.steps),
                        u, outcome.environment, row.info, row.seconds)
        ref, _ = reference(info.framework, _float32_hyper(spec, b))
        tr.vs_rule = [relative_distance(p, r, skip) for p, r in zip(steps, ref)]
        tr.accuracy = held_out_accuracy(model, steps, held)
        tr.rule_rtol = training_rtol(grad_tol, u, spec.steps)
        if tr.first_off_rule:
            at, r = steps[tr.first_off_rule - 1], ref[tr.first_off_rule - 1]
            tr.worst_param = max((k for k in at if k not in skip), key=lambda k: float(np.max(np.abs(at[k] - r[k]))))
        other = outcome.methods.get("other")
        if spec.equivalence and other is not None and other.status == "ok":
            other_steps = step_params(other.grads, range(1, spec.steps + 1), params)
            tr.vs_other = [relative_distance(p, q, skip) for p, q in zip(steps, other_steps)]
            ref_other, _ = reference(info.framework, _float32_hyper(spec, b), "other")
            tr.other_predicted = [relative_distance(p, q, skip) for p, q in zip(ref, ref_other)]
        out.append(tr)
    ok = [t for t in out if t.status == "ok"]
    pairs = []
    for a, b in itertools.combinations(ok, 2):
        u = max(a.unit_roundoff, b.unit_roundoff)
        ra, rb = (reference(BACKENDS[t.backend].framework, _float32_hyper(spec, t.backend))[0] for t in (a, b))
        ea, eb = (reference(BACKENDS[t.backend].framework)[0] for t in (a, b))
        pairs.append(Pair(a.backend, b.backend, [relative_distance(x, y, skip) for x, y in zip(a.params, b.params)],
                          training_rtol(grad_tol, u, spec.steps), [relative_distance(x, y, skip) for x, y in zip(ra, rb)],
                          [relative_distance(x, y, skip) for x, y in zip(ea, eb)]))
    frameworks = sorted({BACKENDS[t.backend].framework for t in ok})
    return TrainReport(spec, desc, out, pairs, {fw: reference(fw)[1] for fw in frameworks},
                       {fw: held_out_accuracy(model, reference(fw)[0], held) for fw in frameworks}, params, batches,
                       model.describe(), skip, interrupted)


def render_text(report: TrainReport) -> str:
    s = report.spec
    lines = [f"INTERRUPTED by {report.interrupted_by}: only what finished before it is reported", ""] \
        if report.interrupted is not None else []
    lines += [f"gradparity train: {s.steps} steps of {s.config().label()} ({s.schedule} lr), loss {s.reduction}-reduced "
             f"cross-entropy, {report.model}, {s.dtype}; "
             f"{report.description}",
             "every framework from the same canonical parameters on the same batches; tolerance at step t: "
             "rtol(t) = rtol_gradient(u) * t, relative to the parameters' largest entry", ""]
    if report.rounding_only:
        lines[-1:-1] = [f"left out of the comparison: {', '.join(sorted(report.rounding_only))}, whose gradient is "
                        "zero in exact arithmetic (float64 numpy: pure rounding) and which Adam turns into steps of "
                        "up to lr each (it divides by sqrt(v) + eps): their values are rounding, amplified"]
    lines.append(f"{'backend':<18} {'loss step 1':>12} {'loss last':>12} {'held-out acc.':>14} "
                 f"{'vs numpy, own rule':>19} {'first step off':>15} {'ms/step':>9}")
    for t in report.trajectories:
        if t.status != "ok":
            lines.append(f"{t.backend:<18} FAILED: {(t.error or t.status).splitlines()[0]}")
            continue
        first = t.first_off_rule
        ms = f"{1000 * t.seconds / s.steps:.2f}" if t.seconds else "-"
        lines.append(f"{t.backend:<18} {t.losses[0]:>12.6f} {t.losses[-1]:>12.6f} {t.accuracy[-1]:>14.4f} "
                     f"{max(t.vs_rule):>19.3g} {first if first else 'none':>15} {ms:>9}")
    for fw, losses in report.reference_losses.items():
        acc = report.reference_accuracy.get(fw, [float("nan")])[-1]
        lines.append(f"{'numpy (' + fw + ' rule)':<18} {losses[0]:>12.6f} {losses[-1]:>12.6f} {acc:>14.4f}")
    lines.append("")
    for p in report.pairs:
        first = p.first_apart
        if first is None:
            lines.append(f"{p.a} vs {p.b}: same trajectory within rtol at every step (largest {max(p.per_step):.3g}, "
                         f"rtol at the last step {p.rtol[-1]:.3g})")
            continue
        rules_apart = any(d > r for d, r in zip(p.predicted, p.rtol))
        why = (f"their optimizer rules differ (the float64 numpy trajectories with each rule are "
               f"{p.predicted[-1]:.3g} apart at the last step; `gradparity optimizers` names the difference)"
               if rules_apart else "the rules agree: rounding, amplified by training")
        if rules_apart and any(_float32_hyper(s, b) for b in (p.a, p.b)):
            exact_apart = any(d > r for d, r in zip(p.predicted_exact, p.rtol))
            why = (why + "; keras-tensorflow's hyperparameters are rounded to float32 (part of its rule in float64)"
                   if exact_apart else
                   "the same update with exact hyperparameters; keras-tensorflow rounds its hyperparameters to "
                   "float32 (tf.cast of a Python float), which a float64 run shows and its rule with float32 "
                   f"hyperparameters reproduces ({p.predicted[-1]:.3g} at the last step)")
        off_rule = [t.backend for t in report.trajectories if t.backend in (p.a, p.b) and t.first_off_rule]
        if off_rule:
            why += f"; and {', '.join(off_rule)} does not follow its own rule (below)"
        lines.append(f"{p.a} vs {p.b}: APART from step {first} ({p.per_step[first - 1]:.3g} > rtol "
                     f"{p.rtol[first - 1]:.3g}), {p.per_step[-1]:.3g} at step {len(p.per_step)}; why: {why}")
    lines += _equivalence_lines(report)
    off = [t for t in report.trajectories if t.status == "ok" and t.first_off_rule]
    lines.append("")
    if any(t.status != "ok" for t in report.trajectories):
        lines.append("INCOMPLETE: a framework failed (above); the others are compared")
    elif off:
        lines.append("OFF: " + ", ".join(f"{t.backend} leaves the numpy trajectory of its own optimizer rule at "
                                         f"step {t.first_off_rule} (farthest in {t.worst_param})" for t in off))
        if any(_sparse_adam(s, t) for t in off):
            lines.append("  known cause: Keras 3 on TensorFlow applies Adam to an embedding's sparse gradient "
                         "(tf.IndexedSlices) one occurrence at a time, so a token that appears k times in a batch "
                         "gets k partial moment updates instead of one Adam update of its summed gradient; SGD and "
                         "momentum, whose updates are linear, are unaffected (gradparity train --optimizer momentum "
                         "shows it on the same model)")
    else:
        lines.append("ON TRACK: every framework follows the float64 trajectory of its own optimizer rule within "
                     "rtol at every step")
    return "\n".join(lines)


def _sparse_adam(spec: TrainSpec, t: Trajectory) -> bool:
    """Whether the Keras-on-TensorFlow sparse-gradient Adam update explains ``t`` leaving its rule."""
    return (BACKENDS[t.backend].variant == "tensorflow" and spec.config().name in ("adam", "adamw")
            and bool(t.worst_param) and t.worst_param.endswith(".embedding"))


def _equivalence_lines(report: TrainReport) -> list[str]:
    """With ``equivalence``: per framework, how far the other reduction's run is from the main one."""
    s = report.spec
    if not s.equivalence:
        return []
    runs = s.runs()
    other, main = runs["other"], runs["run"]
    ratio = other["lrs"][0] / main["lrs"][0]
    adam = s.config().name in ("adam", "adamw")
    head = (f"update equivalence: {other['reduction']}-reduced loss at lr x {ratio:g} vs {main['reduction']} at lr "
            + ("(Adam is invariant to the loss's scale but for epsilon, which the summed loss's B-times larger "
               "gradients make relatively B times smaller)" if adam else
               f"(the summed loss's gradient is {s.batch_size * s.terms_per_example()} times the mean's, its "
               "number of loss terms: identical updates up to rounding)"))
    lines = ["", head]
    for t in report.trajectories:
        if t.status != "ok" or not t.vs_other:
            continue
        first = first_beyond(t.vs_other, t.rule_rtol)
        where = "within rtol(t) at every step" if first is None else f"beyond rtol(t) from step {first}"
        lines.append(f"  {t.backend}: largest per-step difference {max(t.vs_other):.3g} ({where}); "
                     f"float64 numpy with its rule: {max(t.other_predicted):.3g}")
    return lines


def to_dict(report: TrainReport) -> dict:
    s = report.spec
    return {
        "schema": "gradparity.train/1",
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()},
        "optimizer": s.config().to_dict(), "lrs": s.lrs(), "runs": s.runs(), "data": report.description,
        "model": report.model, "left_out_rounding_only": sorted(report.rounding_only),
        "interrupted": report.interrupted_by,
        "trajectories": [{
            "backend": t.backend, "status": t.status, "error": t.error, "losses": t.losses,
            "held_out_accuracy": t.accuracy,
            "vs_own_rule_per_step": t.vs_rule, "rtol_per_step": t.rule_rtol, "first_step_off_rule": t.first_off_rule,
            "farthest_parameter_off_rule": t.worst_param, "known_cause": ("keras_tensorflow_sparse_adam"
                                                                           if _sparse_adam(s, t) else None),
            "other_reduction_per_step": t.vs_other or None, "other_reduction_predicted": t.other_predicted or None,
            "environment": t.environment, "info": t.info, "seconds": t.seconds} for t in report.trajectories],
        "reference_losses": report.reference_losses, "reference_held_out_accuracy": report.reference_accuracy,
        "pairs": [{"a": p.a, "b": p.b, "per_step": p.per_step, "rtol_per_step": p.rtol,
                   "first_apart": p.first_apart, "predicted_by_rules": p.predicted,
                   "predicted_with_exact_hyperparameters": p.predicted_exact} for p in report.pairs],
    }
