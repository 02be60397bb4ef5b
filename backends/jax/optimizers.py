"""optax on a fixed gradient sequence: the worker side of the optimizer measurement (issue 9).

Contract: ``backends/protocol/optimizers.py``.

The transformations and what they compute (optax 0.2.8,
``optax/_src/alias.py``, ``transform.py``):

- ``optax.sgd`` = ``trace(momentum, nesterov)`` then
  ``scale_by_learning_rate``: ``t = g + mu*t`` (t starts at 0, so t = g at
  the first step; no dampening), nesterov ``d = g + mu*t`` (new t), else
  ``d = t``; ``u = -lr*d``. With weight decay it is chained after
  ``add_decayed_weights(wd)`` (``g + wd*p``, L2 into the gradient, as
  torch.optim.SGD does);
- ``optax.adam`` = ``scale_by_adam`` then ``scale_by_learning_rate``:
  ``m = (1-b1)*g + b1*m``, ``v = (1-b2)*g*g + b2*v``, bias-corrected
  ``m^ = m/(1-b1^t)``, ``v^ = v/(1-b2^t)``; ``u = -lr * m^/(sqrt(v^ + eps_root) + eps)``;
  weight decay as for SGD (L2, like torch.optim.Adam);
- ``optax.adamw`` = ``scale_by_adam``, ``add_decayed_weights(wd)``,
  ``scale_by_learning_rate``: ``u = -lr * (adam + wd*p)`` (decoupled, scaled
  by the current lr, like torch.optim.AdamW up to rounding).

``count``, the step number optax hands a schedule, starts at 0: step t
(from 0) uses ``lrs[t]``.

Precision, measured (optax 0.2.8): Adam's bias correction ``1 - b^count``
is a Python float raised to an int32 count, so its precision follows jax's
x64 mode, not the job's dtype: in a float32 job (worker without x64) it is
computed in float32 and the cancellation in ``1 - b2^t`` puts ~1e-5
relative error into the step size; with x64 on it is exact to double and
only cast to float32 afterwards.

This module imports jax and optax at the top: only a worker process
imports it. A float64 job needs ``JAX_ENABLE_X64=1`` in the worker's
environment (jax reads it at import).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradparity.backends.protocol import OptimizerSession, compile_generated, cpu_environment, package_versions


def build_transformation(config: dict, schedule) -> optax.GradientTransformation:
    """The optax transformation ``config`` names, with ``schedule`` as its learning rate; with a ``"code"`` key,
    the one that rendered code's ``make_optimizer(learning_rate)`` builds."""
    if config.get("code"):
        return compile_generated(config["code"])["make_optimizer"](schedule)
    name = config["name"]
    wd = float(config["weight_decay"])
    if name == "sgd":
        # momentum=None, not 0.0: None is optax's "no trace" (identity);
        # trace(0.0) would compute the same numbers through an extra state.
        momentum = float(config["momentum"]) or None
        opt = optax.sgd(learning_rate=schedule, momentum=momentum, nesterov=bool(config["nesterov"]))
    elif name == "adam":
        opt = optax.adam(learning_rate=schedule, b1=float(config["beta1"]), b2=float(config["beta2"]),
                         eps=float(config["eps"]), eps_root=float(config["eps_root"]))
    elif name == "adamw":
        # adamw decays inside its own chain (after Adam's scaling, before the lr).
        return optax.adamw(learning_rate=schedule, b1=float(config["beta1"]), b2=float(config["beta2"]),
                           eps=float(config["eps"]), eps_root=float(config["eps_root"]), weight_decay=wd)
    else:
        raise ValueError(f"unknown optimizer {name!r} (expected 'sgd', 'adam' or 'adamw')")
    if wd:
        # optax.sgd / optax.adam take no weight decay; torch's SGD/Adam
        # semantics (L2: decay added to the raw gradient) is the decay
        # transformation chained *before* the optimizer, so momentum and
        # Adam's moments see g + wd*p.
        return optax.chain(optax.add_decayed_weights(wd), opt)
    return opt


def lr_schedule(lrs: list[float], dtype: str):
    """The learning rates as an optax schedule: ``count -> lrs[count]`` (optax's count is 0 at the first update)."""
    # The table in the job's dtype: scale_by_schedule casts the schedule's
    # value to the update's dtype, so a float32 table would round a float64
    # job's learning rates before the cast could help.
    table = jnp.asarray(np.asarray(lrs, dtype=dtype))

    def schedule(count):
        # count is optax's int32 step counter (a traced value under jit):
        # array indexing, not a Python list lookup.
        return table[count]

    return schedule


def run_steps(config: dict, params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]],
              lrs: list[float], dtype: str) -> list[dict[str, np.ndarray]]:
    """Run optax for ``len(grads)`` steps on fixed gradients; parameters after each step.

    The parameters are a dict pytree of jax arrays in ``dtype``;
    ``state = opt.init(params)``, then per step ``updates, state =
    opt.update(grads[t], state, params)`` and ``params =
    optax.apply_updates(params, updates)``. The learning rate is a schedule
    ``count -> lrs[count]`` (optax's count is 0 at the first update).
    Returns K dicts ``{name: ndarray}`` (same names and shapes, ``dtype``),
    the parameters after steps 1..K.
    """
    if len(lrs) != len(grads):
        raise ValueError(f"{len(grads)} gradient steps but {len(lrs)} learning rates")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        # Without x64 jax silently turns float64 arrays into float32.
        raise RuntimeError("a float64 job needs JAX_ENABLE_X64=1 in the worker's environment "
                           "(jax reads it at import); it is not set")
    schedule = lr_schedule(lrs, dtype)
    opt = build_transformation(config, schedule)
    k = int(config.get("accumulation", 1))
    if k > 1:
        # optax's accumulation: the running mean of k micro-gradients, the inner optimizer updated (and its
        # count advanced) on every k-th call only, zero updates in between.
        opt = optax.MultiSteps(opt, every_k_schedule=k, use_grad_mean=True)
    names = list(params)
    state_params = {n: jnp.asarray(np.asarray(params[n], dtype=dtype)) for n in names}
    state = opt.init(state_params)
    history = []
    for step_grads in grads:
        g = {n: jnp.asarray(np.asarray(step_grads[n], dtype=dtype)) for n in names}
        # No jax.jit around the step: K steps on a few small arrays cost
        # nothing either way, and unjitted the operations run one by one as
        # optax writes them (only optax's own small jitted helpers, such as
        # the bias correction, are compiled), so XLA has no larger
        # expression to fuse or reassociate.
        updates, state = opt.update(g, state, state_params)
        state_params = optax.apply_updates(state_params, updates)
        history.append({n: np.array(state_params[n], dtype=dtype, copy=True) for n in names})
    return history


def environment_note(config: dict) -> str:
    """One line naming the optax transformation (inside MultiSteps when accumulating) ``run_steps`` builds."""
    if config.get("code"):
        return f"the rendered code's make_optimizer(learning_rate) [optax {optax.__version__}, jax {jax.__version__}]"
    k = int(config.get("accumulation", 1))
    note = _class_note(config)
    return note if k == 1 else f"optax.MultiSteps({note}, every_k_schedule={k}, use_grad_mean=True)"


def _class_note(config: dict) -> str:
    """One line naming the optax transformation ``run_steps`` builds."""
    name = config["name"]
    lr = "schedule(count -> lrs[count])"
    wd = float(config["weight_decay"])
    where = f"[optax {optax.__version__}, jax {jax.__version__}]"
    if name == "adamw":
        return (f"optax.adamw(learning_rate={lr}, b1={config['beta1']}, b2={config['beta2']}, eps={config['eps']}, "
                f"eps_root={config['eps_root']}, weight_decay={wd}) {where}")
    if name == "sgd":
        momentum = float(config["momentum"]) or None
        text = f"optax.sgd(learning_rate={lr}, momentum={momentum}, nesterov={bool(config['nesterov'])})"
    elif name == "adam":
        text = (f"optax.adam(learning_rate={lr}, b1={config['beta1']}, b2={config['beta2']}, eps={config['eps']}, "
                f"eps_root={config['eps_root']})")
    else:
        raise ValueError(f"unknown optimizer {name!r} (expected 'sgd', 'adam' or 'adamw')")
    if wd:
        text = f"optax.chain(optax.add_decayed_weights({wd}), {text})"
    return f"{text} {where}"


def open_session(job) -> OptimizerSession:
    """The worker's entry for task "optimizer_steps": optax's transformations, on the CPU."""
    return OptimizerSession(job, run_steps, environment_note,
                            cpu_environment("jax", package_versions("jax", "optax"), job.dtype))
