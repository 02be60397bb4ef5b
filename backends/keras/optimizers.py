"""keras.optimizers on a fixed gradient sequence: the worker side of the optimizer measurement (issue 9).

Contract: ``backends/protocol/optimizers.py``.

What Keras computes (keras 3.15.1, ``keras/src/optimizers/sgd.py``,
``adam.py``, ``adamw.py``, ``base_optimizer.py``; the torch backend swaps
in ``backend/torch/optimizers/torch_{sgd,adam}.py``, the same formulas in
``torch._foreach_*`` form):

- weight decay, whenever ``weight_decay`` is not None and for *every*
  optimizer (SGD and Adam included, not only AdamW): ``p -= lr * wd * p``
  before the update (decoupled, scaled by the current lr; never L2);
- ``SGD``: ``v = mu*v - lr*g; p += v``; nesterov ``p += mu*v - lr*g`` (with
  the new v). The lr sits inside the velocity, so a changed lr does not
  rescale past momentum (unlike torch and optax, which scale the buffer);
- ``Adam``: ``a = lr * sqrt(1-b2^t) / (1-b1^t)``; ``m += (g-m)*(1-b1)``;
  ``v += (g*g-v)*(1-b2)``; ``p -= a * m / (sqrt(v) + eps)``: eps is added to
  the *uncorrected* sqrt(v) ("epsilon hat"), i.e. torch's eps times
  sqrt(1-b2^t);
- ``AdamW``: ``Adam`` with a required ``weight_decay`` (the same decay).

Precision, measured (keras 3.15.1, 2 tensors, 6 steps): the hyperparameters
Keras converts with ``ops.cast(python_float, variable.dtype)`` -- SGD's
``momentum``, ``weight_decay``, and ``beta_1``/``beta_2`` inside the
bias-correction powers -- are used *rounded to float32* on the tensorflow
backend even for float64 variables (``tf.cast`` turns a Python float into a
float32 tensor before casting), e.g. momentum 0.8999999761581421 and
``1 - beta_2`` off by 1.3e-5 relative; the jax and torch backends use them
exactly. That is Keras' own behaviour with the floats a user writes, so it
is kept (passing ``np.float64`` hyperparameters would avoid it). In float32
every backend computes ``1 - beta^t`` in float32, so Adam's step size
carries ~1e-5 relative error from cancellation (torch computes the bias
corrections in Python floats).

This module imports keras at the top: only a worker process imports it.
"""
from __future__ import annotations

import keras
import numpy as np

from gradparity.backends.protocol import OptimizerSession, compile_generated, cpu_environment, package_versions


class StepTable(keras.optimizers.schedules.LearningRateSchedule):
    """``lrs[step]``: the learning rate Keras asks for with ``optimizer.iterations`` (0 at the first apply)."""

    def __init__(self, lrs, dtype):
        # A tensor in the job's dtype, not a Python list: the lookup must work
        # on a symbolic step too, and a float32 table would round every lr of
        # a float64 job (SGD's torch-backend path never casts the lr).
        self.table = keras.ops.convert_to_tensor(np.asarray(lrs, dtype=dtype), dtype=dtype)
        self.lrs = [float(lr) for lr in lrs]

    def __call__(self, step):
        return keras.ops.take(self.table, keras.ops.convert_to_tensor(step, dtype="int32"))

    def get_config(self):
        return {"lrs": self.lrs, "dtype": keras.backend.standardize_dtype(self.table.dtype)}


def build_optimizer(config: dict, learning_rate) -> keras.optimizers.Optimizer:
    """The Keras optimizer ``config`` names, with ``learning_rate`` (a float or a schedule); with a ``"code"``
    key, the one that rendered code's ``make_optimizer(learning_rate)`` builds."""
    if config.get("code"):
        return compile_generated(config["code"])["make_optimizer"](learning_rate)
    name = config["name"]
    wd = float(config["weight_decay"])
    k = int(config.get("accumulation", 1))
    # Keras' own accumulation: apply() adds to accumulators and updates on every k-th call with (g + acc) / k;
    # iterations still counts every call (the schedule and Adam's bias correction see micro-steps).
    common = {"gradient_accumulation_steps": k} if k > 1 else {}
    if name == "sgd":
        # weight_decay=None, not 0.0, when there is none: any non-None value
        # makes base_optimizer apply the decay step (a no-op multiply by 1).
        # momentum must be a Python float: SGD rejects an int 0. Python
        # floats throughout, as a user writes them (see the module docstring
        # on the tensorflow backend's float32 rounding of them).
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=float(config["momentum"]),
                                    nesterov=bool(config["nesterov"]), weight_decay=wd or None, **common)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate, beta_1=float(config["beta1"]),
                                     beta_2=float(config["beta2"]), epsilon=float(config["eps"]),
                                     weight_decay=wd or None, **common)
    if name == "adamw":
        # AdamW requires a weight decay (None raises); 0.0 decays by nothing.
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=wd,
                                      beta_1=float(config["beta1"]), beta_2=float(config["beta2"]),
                                      epsilon=float(config["eps"]), **common)
    raise ValueError(f"unknown optimizer {name!r} (expected 'sgd', 'adam' or 'adamw')")


def run_steps(config: dict, params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]],
              lrs: list[float], dtype: str) -> list[dict[str, np.ndarray]]:
    """Run Keras' own optimizer for ``len(grads)`` steps on fixed gradients; parameters after each step.

    ``params`` become ``keras.Variable``s of ``dtype``; the optimizer is
    built on them, then step t is ``optimizer.apply(grads[t], variables)``
    with the learning rate ``lrs[t]`` supplied by a ``LearningRateSchedule``
    that Keras calls with ``optimizer.iterations`` (t at step t). Runs
    eagerly on every backend. Returns K dicts ``{name: ndarray}`` (same
    names and shapes, ``dtype``), the variables after steps 1..K.

    On the jax backend a float64 job needs JAX's x64 mode
    (``JAX_ENABLE_X64=1`` before jax is imported).
    """
    if len(lrs) != len(grads):
        raise ValueError(f"{len(grads)} gradient steps but {len(lrs)} learning rates")
    if dtype == "float64" and keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            # Without x64, jax stores a "float64" variable as float32, silently.
            raise RuntimeError("keras-jax: float64 needs JAX's x64 mode, which is off "
                               "(start the worker with JAX_ENABLE_X64=1)")
    names = list(params)
    # Explicit dtype on every variable: a Variable's dtype otherwise defaults
    # to keras.config.floatx() (float32), and the optimizer's slot variables
    # (momentum, m, v) copy their reference variable's dtype. Names are
    # positional because Keras forbids "/" in a variable name. A copy: the
    # torch backend may wrap a numpy array without copying (torch.as_tensor),
    # and its optimizers update the variables in place.
    variables = [keras.Variable(np.array(params[n], dtype=dtype, copy=True), dtype=dtype, name=f"param_{i}")
                 for i, n in enumerate(names)]
    # The per-step lr as a schedule of optimizer.iterations rather than
    # assigning optimizer.learning_rate before each apply: a float
    # learning_rate lives in a Variable of dtype floatx() (float32 by
    # default), which would round a float64 job's lrs, and the schedule is
    # how Keras itself varies the lr. Keras reads it (self.learning_rate ->
    # schedule(self._iterations)) once for the weight decay and once for the
    # update, both before apply() increments iterations, so step t (from 0)
    # sees lrs[t] everywhere. Works on the tensorflow, jax and torch backends.
    schedule = StepTable(lrs, dtype)
    optimizer = build_optimizer(config, schedule)
    # Build first, on the variables: the slot variables (SGD's momentums,
    # Adam's m and v) are created by build(), zero-initialised with each
    # variable's shape and dtype. apply() would build lazily on its first
    # call; building explicitly fixes which variables the optimizer tracks
    # before any step (and apply() checks every later call against them).
    optimizer.build(variables)
    history = []
    for step_grads in grads:
        # Backend tensors, not numpy: the torch backend's SGD/Adam feed the
        # gradients straight to torch._foreach_* ops.
        tensors = [keras.ops.convert_to_tensor(np.asarray(step_grads[n], dtype=dtype), dtype=dtype)
                   for n in names]
        # Eager on every backend: no tf.function or jax.jit around apply();
        # for K steps on a few small arrays there is nothing to gain, and on
        # the jax backend apply() assigns the variables in place eagerly
        # (stateless_apply is Keras' form for use inside jax.jit).
        optimizer.apply(tensors, variables)
        # Copy: on the torch backend convert_to_numpy may share the variable's storage.
        history.append({n: np.array(keras.ops.convert_to_numpy(v.value), dtype=dtype, copy=True)
                        for n, v in zip(names, variables)})
    return history


def environment_note(config: dict) -> str:
    """One line naming the Keras class (and its gradient_accumulation_steps) ``run_steps`` constructs."""
    if config.get("code"):
        return (f"the rendered code's make_optimizer(learning_rate) [keras {keras.__version__}, backend "
                f"{keras.backend.backend()}]")
    k = int(config.get("accumulation", 1))
    return _class_note(config) + (f", gradient_accumulation_steps={k}" if k > 1 else "")


def _class_note(config: dict) -> str:
    """One line naming the Keras class, the arguments ``run_steps`` passes, and the Keras backend."""
    name = config["name"]
    lr = "LearningRateSchedule(lrs[optimizer.iterations])"
    wd = float(config["weight_decay"])
    where = f"[keras {keras.__version__}, backend {keras.backend.backend()}]"
    if name == "sgd":
        return (f"keras.optimizers.SGD(learning_rate={lr}, momentum={config['momentum']}, "
                f"nesterov={bool(config['nesterov'])}, weight_decay={wd or None}) {where}")
    if name == "adam":
        return (f"keras.optimizers.Adam(learning_rate={lr}, beta_1={config['beta1']}, beta_2={config['beta2']}, "
                f"epsilon={config['eps']}, weight_decay={wd or None}) {where}")
    if name == "adamw":
        return (f"keras.optimizers.AdamW(learning_rate={lr}, weight_decay={wd}, beta_1={config['beta1']}, "
                f"beta_2={config['beta2']}, epsilon={config['eps']}) {where}")
    raise ValueError(f"unknown optimizer {name!r} (expected 'sgd', 'adam' or 'adamw')")


def open_session(job) -> OptimizerSession:
    """The worker's entry for task "optimizer_steps": Keras' optimizers on its configured backend, CPU."""
    # floatx as a fresh process has it: a served worker's earlier model job may have set it to its dtype, and the
    # optimizer's own tensors (its learning rate, its iteration count's casts) follow floatx, not the variables.
    keras.config.set_floatx("float32")
    versions = package_versions("keras", {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[
        keras.backend.backend()])
    return OptimizerSession(job, run_steps, environment_note,
                            cpu_environment("keras", versions, job.dtype, f"Keras backend {keras.backend.backend()}"))
