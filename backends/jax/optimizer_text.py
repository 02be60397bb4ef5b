"""optax optimizers as text: read one (``parse``) and write one (``render``) for ``gradparity translate``.

Signatures and defaults read in optax 0.2.8 ``optax/_src/alias.py``: ``sgd(learning_rate, momentum=None,
nesterov=False, accumulator_dtype=None)``, ``adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
mu_dtype=None, *, nesterov=False)``, ``adamw(..., weight_decay=1e-4, mask=None, ...)``; an
``optax.chain(optax.add_decayed_weights(wd), optax.sgd|adam(...))`` is the L2 form (the decay reaches the
momentum or Adam's moments). What they compute: ``backends/jax/optimizers.py``. Importing this module imports
no framework.

``render`` writes chains of optax's own transformations where ``optax.sgd|adam|adamw``'s arguments do not
suffice, each exact under any schedule: Keras' velocity (``scale_by_learning_rate`` then ``trace``, Keras'
decoupled decay after them at each step's own lr), torch's dampening (``scale_by_schedule`` of the update count
before ``trace``), L2 and decoupled decay, and epsilon on the uncorrected ``sqrt(v)`` (``inject_hyperparams``).
"""
from __future__ import annotations

from gradparity.errors import ConfigError
from gradparity.experiment.optimizer_text import OptimizerCall, OptimizerRendering, bind, number
from gradparity.experiment.optimizers import OptimizerConfig

CONSTRUCTORS = ("sgd", "adam", "adamw", "chain")
_ADAM = ("learning_rate", "b1", "b2", "eps", "eps_root", "mu_dtype")
_ADAM_DEFAULTS = {"learning_rate": None, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0}
_AS_IS = {"mu_dtype": None, "accumulator_dtype": None, "nesterov_adam": (False,), "mask": (None,)}


def parse(call: OptimizerCall) -> tuple[OptimizerConfig, set[str]]:
    """(config, fields set explicitly) of ``optax.sgd|adam|adamw(...)`` or ``optax.chain(optax.add_decayed_weights
    (wd), optax.sgd|adam(...))``; ConfigError otherwise."""
    if call.short_name == "chain":
        parts = list(call.args)
        if call.kwargs or len(parts) != 2 or not all(isinstance(p, OptimizerCall) for p in parts) \
                or parts[0].short_name != "add_decayed_weights" or parts[1].short_name not in ("sgd", "adam"):
            raise ConfigError(f"{call.name}: gradparity reads optax.chain(optax.add_decayed_weights(wd), "
                              "optax.sgd(...) or optax.adam(...)) (L2 weight decay), no other chain")
        values, _ = bind(parts[0], ("weight_decay", "mask"), {"weight_decay": 0.0}, {"mask": (None,)})
        config, explicit = parse(parts[1])
        wd = number(parts[0], "weight_decay", values["weight_decay"])
        return OptimizerConfig(**{**config.to_dict(), "weight_decay": wd}), explicit | {"weight_decay"}
    name = call.short_name
    if name == "sgd":
        values, explicit = bind(call, ("learning_rate", "momentum", "nesterov", "accumulator_dtype"),
                                {"momentum": None, "nesterov": False}, _AS_IS, required=("learning_rate",))
        mu = number(call, "momentum", values["momentum"], allow_none=True) or 0.0
        config = OptimizerConfig("sgd", number(call, "learning_rate", values["learning_rate"]), momentum=mu,
                                 nesterov=bool(values["nesterov"]) and mu > 0)
        return config, _fields(explicit)
    if name in ("adam", "adamw"):
        signature = _ADAM + (("weight_decay", "mask") if name == "adamw" else ())
        defaults = {k: v for k, v in _ADAM_DEFAULTS.items() if k != "learning_rate"}
        if name == "adamw":
            defaults["weight_decay"] = 1e-4
        as_is = {**_AS_IS, "nesterov": (False,)}
        values, explicit = bind(call, signature, defaults, as_is, required=("learning_rate",))
        b1, b2 = number(call, "b1", values["b1"]), number(call, "b2", values["b2"])
        if not (b1 < 1 and b2 < 1):
            raise ConfigError(f"{call.name}: b1 and b2 must be below 1, got {b1}, {b2}")
        config = OptimizerConfig(name, number(call, "learning_rate", values["learning_rate"]), beta1=b1, beta2=b2,
                                 eps=number(call, "eps", values["eps"]),
                                 eps_root=number(call, "eps_root", values["eps_root"]),
                                 weight_decay=number(call, "weight_decay", values.get("weight_decay", 0.0)))
        return config, _fields(explicit)
    raise ConfigError(f"{call.name}: gradparity translates optax.sgd, optax.adam, optax.adamw and "
                      "optax.chain(optax.add_decayed_weights(wd), optax.sgd|adam(...))")


def _fields(explicit: set[str]) -> set[str]:
    """optax argument names -> OptimizerConfig fields."""
    names = {"learning_rate": {"lr"}, "b1": {"beta1"}, "b2": {"beta2"}, "eps": {"eps"}, "eps_root": {"eps_root"},
             "weight_decay": {"weight_decay"}, "momentum": {"momentum"}, "nesterov": {"nesterov"}}
    return set().union(*(names.get(k, set()) for k in explicit))


def _sgd_chain(config: OptimizerConfig) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(chain parts as (expression, why), lines before the return, notes) of SGD with momentum where optax.sgd's
    arguments do not suffice: Keras' velocity (the lr inside the momentum), torch's dampening, or a decay
    outside the trace. Each part's order is the update's: L2 before the momentum sees the gradient, decoupled
    decay after it."""
    mu, wd, nesterov = config.momentum, config.weight_decay, bool(config.nesterov)
    l2, decoupled = wd and config.decay_form != "decoupled", wd and config.decay_form == "decoupled"
    parts, before, notes = [], [], []
    if l2:
        parts.append((f"optax.add_decayed_weights({wd!r})", "L2: wd * p added to the gradient, before the momentum"))
    trace = (f"optax.trace(decay={mu!r}, nesterov={nesterov!r})", "")
    if config.momentum_form == "velocity":
        if config.dampening:
            raise ConfigError("gradparity renders dampening on a momentum buffer, not on Keras' velocity")
        notes.append("optax.sgd multiplies its trace by the current lr (t = g + mu*t; p -= lr*t); Keras keeps the "
                     "lr inside its velocity (v = mu*v - lr*g), which is optax.trace of the lr-scaled gradients")
        parts += [("optax.scale_by_learning_rate(learning_rate)", "Keras' velocity: v = mu*v - lr*g, then p += v"),
                  trace]
        if decoupled:
            notes.append("Keras' weight_decay is decoupled, p -= lr*wd*p at the step's own lr, outside the velocity: "
                         "optax.add_decayed_weights with the schedule -wd * lr(count), chained after the trace "
                         "(the velocity holds past lrs, so no single lr factor after the chain can carry the decay)")
            before = ["    schedule = learning_rate if callable(learning_rate) else "
                      "optax.constant_schedule(learning_rate)"]
            parts.append((f"optax.add_decayed_weights(lambda count: -{wd!r} * schedule(count))",
                          "decoupled decay at this step's lr, outside the velocity: p -= lr * wd * p"))
        return parts, before, notes
    if config.dampening:
        keep = 1.0 - config.dampening
        notes.append(f"optax has no dampening: torch's buffer b = mu*b + (1 - {config.dampening:g})*g, b = g at the "
                     f"first step, is optax.trace of the gradient scaled by 1 at the first update and {keep!r} "
                     "after (optax.scale_by_schedule of the update count)")
        parts.append((f"optax.scale_by_schedule(lambda count: jnp.where(count == 0, 1.0, {keep!r}))",
                      f"torch's dampening: the first gradient whole, every later one times 1 - {config.dampening!r}"))
    parts.append(trace)
    if decoupled:
        notes.append("optax.sgd takes no weight decay; decoupled decay (outside the momentum) is the decay chained "
                     "after the trace and before the learning rate")
        parts.append((f"optax.add_decayed_weights({wd!r})", "decoupled decay, outside the momentum"))
    parts.append(("optax.scale_by_learning_rate(learning_rate)", ""))
    return parts, before, notes


def render(config: OptimizerConfig) -> OptimizerRendering:
    """Code defining ``make_optimizer(learning_rate)`` (a float or an optax schedule) that computes what
    ``config`` says, ``epsilon_form``, ``decay_form``, ``momentum_form`` and torch's dampening included (as
    chains of optax's own transformations, exact under any schedule)."""
    wd, notes = config.weight_decay, []
    native, before, parts = True, [], None
    if config.dampening and not (config.name == "sgd" and config.momentum):
        raise ConfigError("dampening acts on SGD's momentum only")
    if config.name == "sgd":
        momentum = config.momentum or None
        sgd = f"optax.sgd(learning_rate, momentum={momentum!r}, nesterov={bool(config.nesterov)!r})"
        complex_form = momentum and (config.momentum_form == "velocity" or config.dampening or
                                     (wd and config.decay_form == "decoupled"))
        if complex_form:
            parts, before, notes = _sgd_chain(config)
            native = False
        elif wd:
            notes.append("optax.sgd takes no weight decay; L2 (as torch's SGD) is optax.add_decayed_weights chained "
                         "before it" + ("" if momentum else "; without momentum it is also a decoupled decay's "
                                        "update (Keras' weight_decay): p - lr*wd*p - lr*g = p - lr*(g + wd*p)"))
            expr = f"optax.chain(optax.add_decayed_weights({wd!r}), {sgd})"
            native = False
        else:
            expr = sgd
    else:
        hat = config.epsilon_form == "hat"
        fn = "optax.adamw" if config.name == "adamw" and wd else "optax.adam"
        if hat:
            notes.append("optax adds eps to the bias-corrected sqrt(v_hat); on the uncorrected sqrt(v) (Keras' "
                         "'epsilon hat') it is eps / sqrt(1 - b2^t), a schedule of the step count given through "
                         "optax.inject_hyperparams")
            native = False
        eps = (f"lambda count: {config.eps!r} / jnp.sqrt(1.0 - {config.beta2!r} ** (count + 1))" if hat
               else repr(config.eps))
        args = (f"learning_rate=learning_rate, b1={config.beta1!r}, b2={config.beta2!r}, eps={eps}, "
                f"eps_root={config.eps_root!r}" + (f", weight_decay={wd!r}" if fn == "optax.adamw" else ""))
        expr = f"optax.inject_hyperparams({fn})({args})" if hat else f"{fn}({args})"
        if wd and config.name == "adam":
            notes.append("optax.adam takes no weight decay; L2 (as torch's Adam) is optax.add_decayed_weights "
                         "chained before it")
            expr = f"optax.chain(optax.add_decayed_weights({wd!r}), {expr})"
            native = False
    if parts is not None:
        body = [*before, "    return optax.chain("]
        for part, why in parts:
            body += [f"        # {why}"] * bool(why) + [f"        {part},"]
        body.append("    )")
    else:
        body = [f"    return {expr}"]
    uses_jnp = any("jnp." in line for line in body)
    lines = [*(["import jax.numpy as jnp"] if uses_jnp else []), "import optax", "", "",
             "def make_optimizer(learning_rate):", *body]
    usage = f"optimizer = make_optimizer(learning_rate={config.lr!r})"
    return OptimizerRendering("jax", native, "\n".join(lines) + "\n", usage, tuple(notes))
