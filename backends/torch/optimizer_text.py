"""torch.optim optimizers as text: read one (``parse``) and write one (``render``) for ``gradparity translate``.

Signatures and defaults read in torch 2.13 ``torch/optim/{sgd,adam,adamw}.py``: ``SGD(params, lr=1e-3,
momentum=0, dampening=0, weight_decay=0, nesterov=False, *, maximize, foreach, differentiable, fused)``,
``Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *, foreach, maximize,
capturable, differentiable, fused, decoupled_weight_decay=False)``, ``AdamW`` the same with weight_decay=1e-2.
What they compute: ``backends/torch/optimizers.py``. Importing this module imports no framework.
"""
from __future__ import annotations

from gradparity.errors import ConfigError
from gradparity.experiment.optimizer_text import OptimizerCall, OptimizerRendering, bind, number
from gradparity.experiment.optimizers import OptimizerConfig

CONSTRUCTORS = ("SGD", "Adam", "AdamW")
#: Arguments that select a code path, not the numbers (or only the value that keeps the plain algorithm).
_AS_IS = {"foreach": None, "fused": None, "differentiable": (False,), "capturable": None,
          "maximize": (False,), "amsgrad": (False,)}


def parse(call: OptimizerCall) -> tuple[OptimizerConfig, set[str]]:
    """(config, fields set explicitly) of ``torch.optim.SGD|Adam|AdamW(...)``; ConfigError otherwise."""
    name = call.short_name
    if name == "SGD":
        values, explicit = bind(call, ("params", "lr", "momentum", "dampening", "weight_decay", "nesterov"),
                                {"params": None, "lr": 1e-3, "momentum": 0.0, "dampening": 0.0,
                                 "weight_decay": 0.0, "nesterov": False}, _AS_IS)
        mu = number(call, "momentum", values["momentum"])
        if values["nesterov"] and (mu <= 0 or values["dampening"]):
            raise ConfigError(f"{call.name}: Nesterov momentum requires a momentum and zero dampening "
                              "(torch raises the same)")
        config = OptimizerConfig("sgd", number(call, "lr", values["lr"]), momentum=mu,
                                 nesterov=bool(values["nesterov"]),
                                 dampening=number(call, "dampening", values["dampening"]),
                                 weight_decay=number(call, "weight_decay", values["weight_decay"]))
        return config, _fields(explicit)
    if name in ("Adam", "AdamW"):
        values, explicit = bind(call, ("params", "lr", "betas", "eps", "weight_decay", "amsgrad"),
                                {"params": None, "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                 "weight_decay": 1e-2 if name == "AdamW" else 0.0, "decoupled_weight_decay": False},
                                _AS_IS)
        betas = values["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ConfigError(f"{call.name}: betas must be a pair of numbers, got {betas!r}")
        b1, b2 = (number(call, "betas", b) for b in betas)
        if not (b1 < 1 and b2 < 1):
            raise ConfigError(f"{call.name}: betas must be below 1, got {betas!r}")
        decoupled = name == "AdamW" or bool(values["decoupled_weight_decay"])
        config = OptimizerConfig("adamw" if decoupled else "adam", number(call, "lr", values["lr"]), beta1=b1,
                                 beta2=b2, eps=number(call, "eps", values["eps"]),
                                 weight_decay=number(call, "weight_decay", values["weight_decay"]))
        return config, _fields(explicit)
    raise ConfigError(f"{call.name}: gradparity translates torch.optim.{', torch.optim.'.join(CONSTRUCTORS)}")


def _fields(explicit: set[str]) -> set[str]:
    """torch argument names -> OptimizerConfig fields."""
    names = {"lr": {"lr"}, "betas": {"beta1", "beta2"}, "eps": {"eps"}, "weight_decay": {"weight_decay"},
             "momentum": {"momentum"}, "nesterov": {"nesterov"}, "dampening": {"dampening"}}
    return set().union(*(names.get(k, set()) for k in explicit))


def _constructor(config: OptimizerConfig) -> str:
    if config.name == "sgd":
        return (f"torch.optim.SGD(params, lr=lr, momentum={config.momentum!r}, dampening={config.dampening!r}, "
                f"weight_decay={(config.weight_decay if config.decay_form != 'decoupled' else 0.0)!r}, "
                f"nesterov={bool(config.nesterov)!r})")
    cls = "AdamW" if config.name == "adamw" else "Adam"
    return (f"torch.optim.{cls}(params, lr=lr, betas=({config.beta1!r}, {config.beta2!r}), eps={config.eps!r}, "
            f"weight_decay={config.weight_decay!r})")


_VELOCITY_SGD = '''import torch


class VelocitySGD(torch.optim.Optimizer):
    """SGD with the learning rate inside the velocity (Keras' SGD): v = momentum * v - lr * g, then p += v
    (nesterov: p += momentum * v - lr * g). Decoupled weight decay first multiplies p by (1 - lr * wd); L2 decay
    adds wd * p to g. Exact under any learning-rate schedule, lr = 0 included (the weights still move by
    momentum * v); a parameter without a gradient is left alone, as torch's and Keras' optimizers do."""

    def __init__(self, params, lr, momentum, nesterov=False, weight_decay=0.0, decoupled=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      decoupled=decoupled))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd and group["decoupled"]:
                    p.sub_(p * wd * lr)
                elif wd:
                    g = g + wd * p
                v = self.state[p].setdefault("velocity", torch.zeros_like(p))
                v.mul_(mu).sub_(g * lr)
                p.add_(v * mu - g * lr if group["nesterov"] else v)


def make_optimizer(params, lr):
    return VelocitySGD(params, lr=lr, momentum=MOMENTUM, nesterov=NESTEROV, weight_decay=WEIGHT_DECAY,
                       decoupled=DECOUPLED)
'''


def _velocity_sgd(config: OptimizerConfig) -> OptimizerRendering:
    """SGD whose momentum keeps the lr inside the velocity (Keras' form) as a small ``torch.optim.Optimizer``:
    torch's SGD multiplies its buffer by the current lr, so no rescaling of it can reproduce a step at lr 0."""
    wd = config.weight_decay if config.decay_form else 0.0
    code = (_VELOCITY_SGD.replace("MOMENTUM", repr(config.momentum)).replace("NESTEROV", repr(bool(config.nesterov)))
            .replace("WEIGHT_DECAY", repr(wd)).replace("DECOUPLED", repr(config.decay_form != "l2")))
    notes = ("torch's SGD multiplies its whole momentum buffer by the current lr (b = mu*b + g; p -= lr*b); this "
             "update keeps the lr inside the velocity (v = mu*v - lr*g; p += v), which differs whenever the lr "
             "changes and still moves the weights at lr 0: written as a torch.optim.Optimizer subclass",)
    if wd and config.decay_form != "l2":
        notes += ("the decay is decoupled (p -= lr * wd * p before the update), not torch SGD's weight_decay, "
                  "which adds wd * p to the gradient before the momentum",)
    return OptimizerRendering("torch", False, code, f"optimizer = make_optimizer(model.parameters(), "
                              f"lr={config.lr!r})", notes)


def render(config: OptimizerConfig) -> OptimizerRendering:
    """Code defining ``make_optimizer(params, lr)`` (and ``before_step(optimizer, t)`` where the update needs
    one) that computes what ``config`` says, ``epsilon_form``/``decay_form`` included. ConfigError for a form
    torch cannot take (an ``eps_root``)."""
    if config.eps_root:
        raise ConfigError("torch's Adam has no eps_root (epsilon inside the square root)")
    if config.name != "sgd" and config.decay_form:
        raise ConfigError("torch renders Adam's decay as Adam (L2) or AdamW (decoupled), not a decay_form")
    if config.name == "sgd" and config.momentum and config.momentum_form == "velocity" and not config.dampening:
        return _velocity_sgd(config)
    hooks, notes = [], []
    if config.name == "sgd" and not config.momentum and config.weight_decay and not config.decay_form:
        notes.append("torch's SGD adds its weight_decay to the gradient (L2); without momentum that is also the "
                     "update of a decoupled decay such as Keras' (p - lr*wd*p - lr*g = p - lr*(g + wd*p))")
    if config.decay_form == "decoupled" and config.weight_decay:
        notes.append("torch's SGD adds its weight_decay to the gradient (L2), which then goes through the "
                     "momentum; the decoupled decay is a multiplication of the weights before each step")
        hooks += ["    # Decoupled weight decay, outside the momentum: p -= lr * wd * p before the update, on the",
                  "    # parameters the step updates (torch's optimizers leave one without a gradient alone).",
                  "    with torch.no_grad():",
                  "        for group in optimizer.param_groups:",
                  "            for p in group['params']:",
                  "                if p.grad is not None:",
                  f"                    p.mul_(1.0 - group['lr'] * {config.weight_decay!r})"]
    if config.name == "sgd" and config.momentum and config.momentum_form == "velocity":
        notes.append("torch multiplies the whole momentum buffer by the current lr (b = mu*b + g; p -= lr*b); "
                     "Keras keeps the lr inside its velocity (v = mu*v - lr*g), which is torch's buffer rescaled by "
                     "lr_before / lr_now whenever the learning rate changes")
        hooks += ["    # Keras' velocity form: when the lr changes, rescale the buffer by lr_before / lr_now.",
                  "    for group in optimizer.param_groups:",
                  "        before = group.setdefault('lr_of_buffer', group['lr'])",
                  "        if before != group['lr']:",
                  "            for p in group['params']:",
                  "                buffer = optimizer.state[p].get('momentum_buffer')",
                  "                if buffer is not None:",
                  "                    buffer.mul_(before / group['lr'])",
                  "        group['lr_of_buffer'] = group['lr']"]
    if config.name != "sgd" and config.epsilon_form == "hat":
        notes.append("torch adds eps to the bias-corrected sqrt(v_hat); adding it to the uncorrected sqrt(v) "
                     "(Keras' 'epsilon hat') is torch's eps set to eps / sqrt(1 - beta2^t) before step t")
        hooks += ["    # Epsilon on the uncorrected sqrt(v): torch's eps at step t is eps / sqrt(1 - beta2**t).",
                  "    for group in optimizer.param_groups:",
                  f"        group['eps'] = {config.eps!r} / math.sqrt(1.0 - {config.beta2!r} ** t)"]
    uses_math = config.name != "sgd" and config.epsilon_form == "hat"
    lines = [*(["import math", ""] if uses_math else []), "import torch", "", "", "def make_optimizer(params, lr):",
             f"    return {_constructor(config)}"]
    if hooks:
        lines += ["", "", "def before_step(optimizer, t):",
                  '    """Call before the t-th optimizer.step() (t = 1, 2, ...)."""', *hooks]
    usage = (f"optimizer = make_optimizer(model.parameters(), lr={config.lr!r})"
             + ("; before each optimizer.step() number t: before_step(optimizer, t)" if hooks else ""))
    return OptimizerRendering("torch", not hooks, "\n".join(lines) + "\n", usage, tuple(notes))
