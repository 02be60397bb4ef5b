"""Optimizers as each framework defines them: configurations, defaults, and their update rules in numpy.

The same named optimizer is not the same update everywhere. Each rule below is written from the
framework's own source (torch 2.13 ``torch/optim/{sgd,adam,adamw}.py``, keras 3.15
``keras/src/optimizers/{sgd,adam,base_optimizer}.py``, optax 0.2.8 ``optax/_src/{alias,transform}.py``),
in float64, and is the hand-computed yardstick each framework's native optimizer is measured against on a
fixed gradient sequence (``backends/FRAMEWORK/optimizers.py``):

- SGD momentum: torch ``b = mu*b + (1 - tau)*g`` (``b = g`` at the first step), ``p -= lr*b``; nesterov uses
  ``g + mu*b``. optax ``trace``: ``t = g + mu*t``, the same with tau = 0. Keras ``v = mu*v - lr*g; p += v``
  folds the learning rate into the velocity: equal to torch at a constant lr, apart under a schedule;
  Keras nesterov ``p += mu*v - lr*g``.
- Adam: torch and optax ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` (optax: ``sqrt(v_hat + eps_root)``), with
  bias-corrected moments; Keras ``p -= alpha * m / (sqrt(v) + eps)``, ``alpha = lr*sqrt(1 - b2^t)/(1 - b1^t)``:
  epsilon is added to the uncorrected ``sqrt(v)`` ("epsilon hat"), i.e. eps * sqrt(1 - b2^t) in torch's terms.
- Gradient accumulation over k micro-steps: every framework updates with the mean of k gradients and counts
  updates for Adam's bias correction, but a Keras learning-rate schedule is called with the count of micro-steps
  (optax's inner schedule with the count of updates), and ``optax.MultiSteps`` stores its running mean in
  float32 by default (``accumulator_dtype``), even in a float64 run.
- Weight decay: torch SGD and Adam add ``wd*p`` to the gradient (L2), as an ``optax.add_decayed_weights``
  before the optimizer does; torch AdamW, optax.adamw and every Keras optimizer's ``weight_decay`` decay
  decoupled, ``p -= lr*wd*p`` (Keras in ``BaseOptimizer._apply_weight_decay`` and torch before the update, optax
  from the same old ``p``: identical). Keras' SGD without momentum is still decoupled, but there the two are one
  update (``p - lr*wd*p - lr*g = p - lr*(g + wd*p)``): ``Semantics.normalized`` compares them as equal while
  ``describe`` says which one the framework does.
- Dampening (torch's SGD only, as an argument): ``b = mu*b + (1 - tau)*g`` after the first step, ``b = g`` at it;
  optax and Keras have no argument for it, and ``gradparity translate`` renders it as a transformation there.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from gradparity.backends import FRAMEWORKS  # noqa: F401 - the optimizer commands import it from here

OPTIMIZERS = ("sgd", "adam", "adamw")
#: Defaults a port inherits when it sets nothing (read in each framework's source).
DEFAULTS = {
    "torch": {"adam_eps": 1e-8, "adamw_weight_decay": 1e-2},
    "keras": {"adam_eps": 1e-7, "adamw_weight_decay": 4e-3},
    "jax": {"adam_eps": 1e-8, "adamw_weight_decay": 1e-4},
}


@dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer, framework-neutral; ``to_dict()`` is what a backend's ``run_steps`` receives.

    ``dampening`` is an argument of torch's SGD only (elsewhere a rendered transformation: ``momentum_form``
    "buffer" in Keras, a chain in optax), ``eps_root`` of optax only (0 elsewhere). ``weight_decay`` means
    what the framework's optimizer does with it (see the module doc): L2 in torch's SGD and Adam and in the
    optax chain that mirrors them, decoupled in AdamW and in every Keras optimizer.
    """

    name: str
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0
    #: Gradient accumulation over this many micro-steps (1: none): torch a manual loop adding g/k to .grad,
    #: Keras ``gradient_accumulation_steps``, optax ``MultiSteps(use_grad_mean=True)``.
    accumulation: int = 1
    #: Force a form the framework does not use natively ("": its own), as ``gradparity translate`` renders it:
    #: ``epsilon_form`` "corrected" | "hat" (where Adam adds eps), ``decay_form`` "l2" | "decoupled".
    epsilon_form: str = ""
    decay_form: str = ""
    #: "velocity" (the lr inside the momentum, as Keras) | "buffer" (an lr-free buffer the lr multiplies, as torch
    #: and optax) | "" (the framework's own form)
    momentum_form: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        parts = [f"lr={self.lr:g}"]
        if self.name == "sgd":
            if self.momentum:
                parts.append(f"momentum={self.momentum:g}" + (", nesterov" if self.nesterov else ""))
            if self.dampening:
                parts.append(f"dampening={self.dampening:g}")
        else:
            parts.append(f"betas=({self.beta1:g}, {self.beta2:g}), eps={self.eps:g}")
            if self.eps_root:
                parts.append(f"eps_root={self.eps_root:g}")
        if self.weight_decay:
            parts.append(f"weight_decay={self.weight_decay:g}")
        if self.accumulation > 1:
            parts.append(f"accumulated over {self.accumulation} micro-steps")
        return f"{self.name}({', '.join(parts)})"


#: What a config's ``epsilon_form`` / ``decay_form`` may force ("" keeps the framework's own form).
EPSILON_FORMS = ("", "corrected", "hat")
DECAY_FORMS = ("", "l2", "decoupled")
MOMENTUM_FORMS = ("", "velocity", "buffer")


@dataclass(frozen=True)
class Semantics:
    """The update an optimizer computes, framework-neutral: what ``gradparity translate`` matches.

    ``family`` "sgd" | "adam"; ``decay`` "none" | "l2" (``wd*p`` added to the gradient, so momentum and Adam's
    moments see it) | "decoupled" (``p -= lr*wd*p``, outside them); ``epsilon`` "corrected" (added to the
    bias-corrected ``sqrt(v_hat)``: torch, optax) | "hat" (to the uncorrected ``sqrt(v)``: Keras);
    ``velocity``: the learning rate sits inside the momentum (Keras ``v = mu*v - lr*g``), which equals the buffer
    form (``b = mu*b + g; p -= lr*b``) while the learning rate is constant and parts from it when it changes.
    Fields that do not apply to the family are normalised (0 / False / "") so that equal updates compare equal.
    """

    family: str
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0
    velocity: bool = False
    decay: str = "none"
    weight_decay: float = 0.0
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    epsilon: str = ""
    eps_root: float = 0.0

    def normalized(self) -> "Semantics":
        """The same update, spelled one way where two spellings compute it: SGD without momentum decays the
        weights identically in both forms (``p - lr*wd*p - lr*g = p - lr*(g + wd*p)``, at any lr), so its
        decoupled decay compares as L2. Equal ``normalized()`` means the same update under any schedule."""
        if self.family == "sgd" and not self.momentum and self.decay == "decoupled":
            return replace(self, decay="l2")
        return self

    def at_constant_lr(self) -> "Semantics":
        """The same update with the velocity form dropped: equal to this one while the lr is constant."""
        return replace(self.normalized(), velocity=False)

    def describe(self) -> str:
        """One line a person reads: the update this is."""
        if self.family == "sgd":
            if not self.momentum:
                head = f"SGD p -= lr*g, lr {self.lr:g}"
            else:
                form = ("velocity v = mu*v - lr*g; p += " + ("mu*v - lr*g" if self.nesterov else "v")
                        if self.velocity else
                        "buffer b = mu*b + " + (f"(1 - {self.dampening:g})*g, b = g at the first step"
                                                  if self.dampening else "g")
                        + "; p -= lr*" + ("(g + mu*b)" if self.nesterov else "b"))
                head = f"SGD with momentum mu = {self.momentum:g} ({form}), lr {self.lr:g}"
        else:
            where = ("the bias-corrected sqrt(v_hat)" if self.epsilon == "corrected"
                     else "the uncorrected sqrt(v) ('epsilon hat')")
            root = f", eps_root {self.eps_root:g} inside the square root" if self.eps_root else ""
            head = (f"Adam, lr {self.lr:g}, betas ({self.beta1:g}, {self.beta2:g}), eps {self.eps:g} added to "
                    f"{where}{root}")
        decay = {"none": "no weight decay",
                 "l2": f"L2 weight decay {self.weight_decay:g} (wd*p added to the gradient)",
                 "decoupled": f"decoupled weight decay {self.weight_decay:g} (p -= lr*wd*p before the update, "
                              + ("outside the momentum" if self.family == "sgd" and self.momentum else
                                 "outside Adam's moments" if self.family == "adam" else
                                 "which without momentum is the same update as L2, wd*p added to the gradient")
                              + ")"}[self.decay]
        return f"{head}; {decay}"


def semantics_of(framework: str, config: OptimizerConfig) -> Semantics:
    """What ``framework``'s optimizer built from ``config`` computes (see the module doc for each source)."""
    wd = config.weight_decay
    if not wd:
        decay = "none"
    elif config.decay_form:
        decay = config.decay_form
    elif framework == "keras" or config.name == "adamw":
        decay = "decoupled"
    else:
        decay = "l2"
    common = {"lr": config.lr, "decay": decay, "weight_decay": wd if decay != "none" else 0.0}
    if config.name == "sgd":
        mu = config.momentum
        return Semantics("sgd", momentum=mu, nesterov=bool(mu and config.nesterov),
                         dampening=config.dampening if mu else 0.0,
                         velocity=bool(mu and (config.momentum_form == "velocity"
                                               or (framework == "keras" and config.momentum_form != "buffer"))),
                         **common)
    epsilon = config.epsilon_form or ("hat" if framework == "keras" else "corrected")
    return Semantics("adam", beta1=config.beta1, beta2=config.beta2, eps=config.eps, epsilon=epsilon,
                     eps_root=config.eps_root, **common)


def _cast(x: float, rounded: bool) -> float:
    """A hyperparameter as ``ops.cast(x, variable.dtype)`` gives it: on Keras' TensorFlow backend, tf.cast
    first makes a float32 tensor of the Python float, so a float64 run still sees it rounded to float32."""
    return float(np.float32(x)) if rounded else x


def semantic_rule(s: Semantics, rounded: bool = False):
    """``step(p, g, state, lr, t) -> new p`` for one parameter tensor in numpy: the update ``s`` describes.

    ``rounded``: momentum, weight decay, the share of the gradient dampening keeps (1 - tau) and the betas of
    the bias correction rounded to float32, as Keras' TensorFlow backend uses them (see ``_cast``; the Keras
    renderings cast them as Keras' own code does); the moments' own betas stay exact, as there.
    """
    mu, wd = _cast(s.momentum, rounded), _cast(s.weight_decay, rounded)
    keep = _cast(1.0 - s.dampening, rounded)
    b1_power, b2_power = _cast(s.beta1, rounded), _cast(s.beta2, rounded)

    def sgd(p, g, state, lr, t):
        if not s.momentum:
            return p - lr * g
        if s.velocity:
            v = mu * state.get("v", 0.0) - lr * g
            state["v"] = v
            return p + (mu * v - lr * g if s.nesterov else v)
        b = g if t == 1 else mu * state["b"] + keep * g
        state["b"] = b
        return p - lr * (g + mu * b if s.nesterov else b)

    def adam(p, g, state, lr, t):
        m = state.get("m", 0.0) + (g - state.get("m", 0.0)) * (1.0 - s.beta1)
        v = state.get("v", 0.0) + (g * g - state.get("v", 0.0)) * (1.0 - s.beta2)
        state["m"], state["v"] = m, v
        if s.epsilon == "hat":
            alpha = lr * math.sqrt(1.0 - b2_power ** t) / (1.0 - b1_power ** t)
            return p - alpha * m / (np.sqrt(v) + s.eps)
        m_hat, v_hat = m / (1.0 - b1_power ** t), v / (1.0 - b2_power ** t)
        return p - lr * m_hat / (np.sqrt(v_hat + s.eps_root) + s.eps)

    update = sgd if s.family == "sgd" else adam

    def step(p, g, state, lr, t):
        if s.decay == "decoupled":
            p = p - lr * wd * p
        elif s.decay == "l2":
            g = g + wd * p
        return update(p, g, state, lr, t)
    return step


def update_rule(framework: str, config: OptimizerConfig, float32_hyperparameters: bool = False):
    """``step(p, g, state, lr, t) -> new p`` (``state`` a dict it updates, ``t`` from 1): ``framework``'s
    optimizer for one parameter tensor, in numpy. ``float32_hyperparameters``: Keras with its momentum,
    weight decay and the betas of its bias correction rounded to float32 (its TensorFlow backend does)."""
    return semantic_rule(semantics_of(framework, config), float32_hyperparameters and framework == "keras")


def reference_steps(framework: str, config: OptimizerConfig, params: dict[str, np.ndarray],
                    grads: list[dict[str, np.ndarray]], lrs: list[float],
                    float32_hyperparameters: bool = False,
                    float32_accumulator: bool = True) -> list[dict[str, np.ndarray]]:
    """The parameters after each of the ``len(grads)`` steps of ``framework``'s optimizer fed ``grads``
    (step t's gradient, whatever the parameters are) at learning rates ``lrs``, in float64.

    The two flags model precision the frameworks lose on their own: Keras on TensorFlow rounding its
    hyperparameters to float32 (off by default), optax.MultiSteps storing its accumulator in float32 (on by
    default, as optax does; off gives the rule in exact arithmetic)."""
    rules = {name: update_rule(framework, config, float32_hyperparameters) for name in params}
    states: dict[str, dict] = {name: {} for name in params}
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    k = config.accumulation
    acc = {name: 0.0 for name in params}
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        n = (t - 1) % k  # micro-gradients already accumulated in this window
        for name in params:
            acc[name] = _accumulate(framework, acc[name], np.asarray(g[name], dtype=np.float64), n, k,
                                    float32_accumulator)
        if t % k:  # a micro-step: gradients accumulate, parameters stay
            out.append(dict(p))
            continue
        # The update sees the mean of the k micro-gradients, and every optimizer counts updates (j) for Adam's
        # bias correction (Keras: its iterations property is the call count // k). The learning rate: Keras'
        # schedule is called with the raw call count (lrs[t - 1]), torch's manual loop steps at the lr set
        # then (lrs[t - 1]), optax's inner schedule counts updates (lrs[j - 1]).
        j = t // k
        rate = float(lrs[j - 1]) if framework == "jax" else float(lr)
        mean = {name: acc[name] / k if framework == "keras" else acc[name] for name in params}
        p = {name: rules[name](p[name], mean[name], states[name], rate, j) for name in p}
        acc = {name: 0.0 for name in params}
        out.append(dict(p))
    return out


def _accumulate(framework: str, acc, g, n: int, k: int, float32_accumulator: bool = True):
    """One micro-gradient into a window's accumulator (``n`` already in it, ``k`` per window).

    torch's manual loop adds g / k to .grad (the sum is the mean); Keras adds g to a sum and divides by k at
    the update (the caller does); optax.MultiSteps keeps a running mean, acc + (g - acc) / (n + 1), stored
    between micro-steps in its accumulator_dtype, float32 by default even in a float64 run.
    """
    if k == 1 or framework == "keras":
        return acc + g
    if framework == "torch":
        return acc + g / k
    mean = acc + (g - acc) / (n + 1)
    if n + 1 == k or not float32_accumulator:
        return mean
    return np.asarray(mean, dtype=np.float32).astype(np.float64)
