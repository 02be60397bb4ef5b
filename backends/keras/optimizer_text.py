"""keras.optimizers as text: read one (``parse``) and write one (``render``) for ``gradparity translate``.

Signatures and defaults read in keras 3.15 ``keras/src/optimizers/{sgd,adam,adamw}.py``:
``SGD(learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=None, ...)``, ``Adam(learning_rate=0.001,
beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, weight_decay=None, ...)``, ``AdamW(learning_rate=0.001,
weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, ...)``; every one's ``weight_decay``
is decoupled. What they compute: ``backends/keras/optimizers.py``. Importing this module imports no framework.

``render`` writes Keras' own class where its arguments suffice, else a subclass overriding ``update_step``
(the documented way to change an optimizer's update), which runs on every Keras backend: L2 decay, epsilon on
the bias-corrected ``sqrt(v_hat)``, and ``BufferSGD``, torch's and optax's lr-free momentum buffer (with torch's
dampening) in place of Keras' velocity. The overrides cast
hyperparameters as Keras' own code does (``ops.cast``), so they keep its precision on each backend: on TensorFlow
that rounds a Python float through float32 (see ``backends/keras/optimizers.py``).
"""
from __future__ import annotations

from gradparity.errors import ConfigError
from gradparity.experiment.optimizer_text import OptimizerCall, OptimizerRendering, bind, number
from gradparity.experiment.optimizers import OptimizerConfig

CONSTRUCTORS = ("SGD", "Adam", "AdamW")
#: Base-optimizer arguments that leave the update alone at these values (None: any value).
_AS_IS = {"name": None, "clipnorm": (None,), "clipvalue": (None,), "global_clipnorm": (None,), "use_ema": (False,),
          "loss_scale_factor": (None,), "gradient_accumulation_steps": (None, 1), "amsgrad": (False,),
          "ema_momentum": None, "ema_overwrite_frequency": None}


def parse(call: OptimizerCall) -> tuple[OptimizerConfig, set[str]]:
    """(config, fields set explicitly) of ``keras.optimizers.SGD|Adam|AdamW(...)``; ConfigError otherwise."""
    name = call.short_name
    if name == "SGD":
        values, explicit = bind(call, ("learning_rate", "momentum", "nesterov", "weight_decay"),
                                {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": None},
                                _AS_IS)
        mu = number(call, "momentum", values["momentum"])
        if mu >= 1:
            raise ConfigError(f"{call.name}: momentum must be in [0, 1), got {mu}")
        config = OptimizerConfig("sgd", _lr(call, values), momentum=mu, nesterov=bool(values["nesterov"]) and mu > 0,
                                 weight_decay=number(call, "weight_decay", values["weight_decay"], True) or 0.0)
        return config, _fields(explicit)
    if name in ("Adam", "AdamW"):
        signature = (("learning_rate", "beta_1", "beta_2", "epsilon", "amsgrad", "weight_decay") if name == "Adam"
                     else ("learning_rate", "weight_decay", "beta_1", "beta_2", "epsilon", "amsgrad"))
        values, explicit = bind(call, signature,
                                {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7,
                                 "weight_decay": 0.004 if name == "AdamW" else None}, _AS_IS)
        b1, b2 = number(call, "beta_1", values["beta_1"]), number(call, "beta_2", values["beta_2"])
        if not (b1 < 1 and b2 < 1):
            raise ConfigError(f"{call.name}: beta_1 and beta_2 must be below 1, got {b1}, {b2}")
        wd = number(call, "weight_decay", values["weight_decay"], allow_none=name == "Adam") or 0.0
        config = OptimizerConfig("adamw" if name == "AdamW" else "adam", _lr(call, values), beta1=b1, beta2=b2,
                                 eps=number(call, "epsilon", values["epsilon"]), weight_decay=wd)
        return config, _fields(explicit)
    raise ConfigError(f"{call.name}: gradparity translates keras.optimizers.{', keras.optimizers.'.join(CONSTRUCTORS)}")


def _lr(call: OptimizerCall, values: dict) -> float:
    return number(call, "learning_rate", values["learning_rate"])


def _fields(explicit: set[str]) -> set[str]:
    """Keras argument names -> OptimizerConfig fields."""
    names = {"learning_rate": {"lr"}, "beta_1": {"beta1"}, "beta_2": {"beta2"}, "epsilon": {"eps"},
             "weight_decay": {"weight_decay"}, "momentum": {"momentum"}, "nesterov": {"nesterov"}}
    return set().union(*(names.get(k, set()) for k in explicit))


_ADAM_STEP = '''    def update_step(self, gradient, variable, learning_rate):
        # keras.optimizers.Adam.update_step (keras 3.15){changes}.
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype){l2}
        local_step = ops.cast(self.iterations + 1, variable.dtype)
        beta_1_power = ops.power(ops.cast(self.beta_1, variable.dtype), local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, variable.dtype), local_step)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
        epsilon = {epsilon}
        self.assign_sub(variable, ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), epsilon)))
'''
_L2 = ("\n        # L2: wd * p added to the gradient, before the moments see it.\n"
       "        gradient = ops.add(gradient, ops.multiply(ops.cast({wd!r}, variable.dtype), variable))")

_BUFFER_STEP = '''    def update_step(self, gradient, variable, learning_rate):
        # keras.optimizers.SGD.update_step (keras 3.15) with torch's buffer in place of Keras' velocity.
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype){l2}
        momentum = ops.cast(self.momentum, variable.dtype)
        buffer = self.momentums[self._get_variable_index(variable)]{damp}
        self.assign(buffer, ops.add(ops.multiply(buffer, momentum), {share}))
        self.assign_sub(variable, ops.multiply({direction}, lr))
'''
_DAMP = ("\n        # torch's first step takes the gradient whole (b = g); every later one (1 - dampening) * g.\n"
         "        # self.iterations counts updates (0 at the first), gradient accumulation included.\n"
         "        keep = ops.where(ops.equal(self.iterations, 0), ops.cast(1.0, variable.dtype),\n"
         "                         ops.cast({keep!r}, variable.dtype))")


def _buffer_sgd(config: OptimizerConfig, l2: bool) -> tuple[str, list[str], list[str]]:
    """(class name, class body lines, notes) of an SGD keeping torch's and optax's lr-free momentum buffer
    (``b = mu*b + g; p -= lr*b``; with torch's dampening and L2 where ``config`` has them), as an
    ``update_step`` override of ``keras.optimizers.SGD``: Keras' own velocity ``v = mu*v - lr*g`` holds the lr of
    every past step, so it equals the buffer only while the lr is constant."""
    damp = bool(config.dampening)
    cls = "BufferSGD"
    what = ("b = momentum * b + (1 - dampening) * g (b = g at the first step)" if damp else "b = momentum * b + g")
    body = [f"class {cls}(keras.optimizers.SGD):",
            '    """keras.optimizers.SGD with the lr-free momentum buffer of torch.optim.SGD and optax.sgd:',
            f"    {what}; p -= lr * " + ("(g + momentum * b)" if config.nesterov else "b")
            + (" (g including wd * p: L2)" if l2 else "") + ".",
            "    Every step's lr multiplies the whole buffer, so it matches them under any schedule, lr 0 included",
            '    (the weights stay, the buffer still accumulates)."""',
            "",
            _BUFFER_STEP.format(l2=_L2.format(wd=config.weight_decay) if l2 else "",
                                damp=_DAMP.format(keep=1.0 - config.dampening) if damp else "",
                                share="ops.multiply(gradient, keep)" if damp else "gradient",
                                direction=("ops.add(gradient, ops.multiply(buffer, momentum))" if config.nesterov
                                           else "buffer")).rstrip("\n")]
    notes = ["Keras' SGD keeps the lr inside its velocity (v = mu*v - lr*g; p += v), torch's and optax's an lr-free "
             "buffer (b = mu*b + g; p -= lr*b): equal at a constant lr, apart once it changes; this update_step "
             "override keeps the buffer, exact under any schedule"]
    if damp:
        notes.append(f"torch's dampening {config.dampening:g} has no Keras argument: the override adds "
                     f"(1 - {config.dampening:g}) * g to the buffer, and g itself at the first update "
                     "(self.iterations == 0), as torch does")
    notes.append("the update_step override reads self.momentums and Keras' private self._get_variable_index, as "
                 "keras.optimizers.SGD.update_step does in keras 3.15.1 (the version this was checked with): a "
                 "later Keras may rename them, so check it after an upgrade")
    return cls, body, notes


def render(config: OptimizerConfig) -> OptimizerRendering:
    """Code defining ``make_optimizer(learning_rate)`` that computes what ``config`` says, ``epsilon_form`` and
    ``decay_form`` and ``momentum_form`` included. ConfigError for what Keras cannot take (eps_root; dampening of
    Keras' own velocity)."""
    buffer = config.name == "sgd" and config.momentum and config.momentum_form == "buffer"
    if config.dampening and not buffer:
        raise ConfigError("dampening is rendered in Keras on torch's momentum buffer (momentum_form 'buffer') only")
    if config.eps_root:
        raise ConfigError("Keras' Adam has no eps_root (epsilon inside the square root)")
    l2 = config.decay_form == "l2" and config.weight_decay
    corrected = config.name != "sgd" and config.epsilon_form == "corrected"
    notes, cls, body = [], None, []
    if l2:
        notes.append("Keras' weight_decay is decoupled (p -= lr*wd*p before the update, outside "
                     + ("the momentum" if config.name == "sgd" else "Adam's moments")
                     + "); L2 adds wd*p to the gradient, in an update_step override")
    if corrected:
        notes.append("Keras adds epsilon to the uncorrected sqrt(v) ('epsilon hat'); on the bias-corrected "
                     "sqrt(v_hat), as torch and optax, it is Keras' epsilon times sqrt(1 - beta_2^t), in an "
                     "update_step override")
    if config.name == "sgd":
        args = (f"learning_rate=learning_rate, momentum={config.momentum!r}, nesterov={bool(config.nesterov)!r}, "
                f"weight_decay={(config.weight_decay or None) if not l2 else None!r}")
        if buffer:
            cls, body, more = _buffer_sgd(config, bool(l2))
            notes += more
        elif l2:
            cls = "SGDWithL2"
            body = [f"class {cls}(keras.optimizers.SGD):",
                    '    """keras.optimizers.SGD with L2 weight decay (wd * p added to the gradient, as torch\'s '
                    'SGD does)."""', "",
                    "    def update_step(self, gradient, variable, learning_rate):",
                    "        gradient = ops.cast(gradient, variable.dtype)" + _L2.format(wd=config.weight_decay),
                    "        super().update_step(gradient, variable, learning_rate)"]
    else:
        decoupled = config.weight_decay if not l2 else 0.0
        base = "AdamW" if config.name == "adamw" and decoupled else "Adam"
        wd_arg = (f"weight_decay={decoupled!r}" if base == "AdamW" else f"weight_decay={decoupled or None!r}")
        args = (f"learning_rate=learning_rate, beta_1={config.beta1!r}, beta_2={config.beta2!r}, "
                f"epsilon={config.eps!r}, {wd_arg}")
        if l2 or corrected:
            notes.append("the update_step override reads Keras' private slots self._momentums, self._velocities and "
                         "self._get_variable_index, as keras.optimizers.Adam.update_step does in keras 3.15.1 (the "
                         "version this was checked with): a later Keras may rename them, so check it after an upgrade")
            cls = f"{base}" + ("WithL2" if l2 else "") + ("CorrectedEpsilon" if corrected else "")
            changes = " with " + " and ".join(
                ([] if not l2 else ["L2 weight decay in the gradient"])
                + ([] if not corrected else ["epsilon on the bias-corrected sqrt(v_hat): Keras' epsilon times "
                                             "sqrt(1 - beta_2^t)"]))
            epsilon = "ops.multiply(self.epsilon, ops.sqrt(1 - beta_2_power))" if corrected else "self.epsilon"
            body = [f"class {cls}(keras.optimizers.{base}):",
                    f'    """keras.optimizers.{base}{changes}."""', "",
                    _ADAM_STEP.format(changes=changes, l2=_L2.format(wd=config.weight_decay) if l2 else "",
                                      epsilon=epsilon).rstrip("\n")]
    ctor = f"{cls}({args})" if cls else f"keras.optimizers.{_native_class(config, l2)}({args})"
    lines = ["import keras", "from keras import ops", "", ""] + (body + ["", ""] if body else []) + [
        "def make_optimizer(learning_rate):", f"    return {ctor}"]
    usage = f"optimizer = make_optimizer(learning_rate={config.lr!r})"
    return OptimizerRendering("keras", cls is None, "\n".join(lines) + "\n", usage, tuple(notes))


def _native_class(config: OptimizerConfig, l2: bool) -> str:
    if config.name == "sgd":
        return "SGD"
    return "AdamW" if config.name == "adamw" and config.weight_decay and not l2 else "Adam"
