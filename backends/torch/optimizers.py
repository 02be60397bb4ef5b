"""torch.optim on a fixed gradient sequence: the worker side of the optimizer measurement (issue 9).

Contract: ``backends/protocol/optimizers.py``: torch's own optimizer
class is handed ``grads[t]`` as ``.grad`` at step t, with the learning rate ``lrs[t]``.

The classes and what they compute (torch 2.13, ``torch/optim/sgd.py``,
``adam.py``, ``adamw.py``, single-tensor path):

- ``torch.optim.SGD``: ``g += wd * p`` (L2, into the gradient);
  with momentum ``b = g`` at the first step, then ``b = mu*b + (1-dampening)*g``;
  nesterov ``d = g + mu*b``, else ``d = b``; ``p -= lr * d``. The learning
  rate multiplies the whole buffer, so a changed lr rescales past momentum too.
- ``torch.optim.Adam``: ``g += wd * p`` (L2); ``m = lerp(m, g, 1-b1)``,
  ``v = b2*v + (1-b2)*g*g``; ``p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``
  (eps outside the square root, added after the bias correction of v).
- ``torch.optim.AdamW``: Adam with ``p *= 1 - lr*wd`` first (decoupled,
  scaled by the current lr) and no L2 in the gradient.

This module imports torch at the top: only a worker process imports it.
"""
from __future__ import annotations

import numpy as np
import torch

from gradparity.backends.protocol import OptimizerSession, compile_generated, cpu_environment

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_optimizer(config: dict, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The torch optimizer ``config`` names, over ``tensors`` (one param group); with a ``"code"`` key, the one
    that rendered code's ``make_optimizer(params, lr)`` builds, its ``before_step(optimizer, t)`` (if any)
    registered as a step pre-hook, so every loop that calls ``step()`` runs it as the code says."""
    if config.get("code"):
        code = compile_generated(config["code"])
        optimizer = code["make_optimizer"](tensors, lr=float(config["lr"]))
        before_step = code.get("before_step")
        if before_step is not None:
            steps = [0]

            def hook(opt, _args, _kwargs):
                steps[0] += 1
                before_step(opt, steps[0])

            optimizer.register_step_pre_hook(hook)
        return optimizer
    name = config["name"]
    # foreach=False (and fused left at None, i.e. off): with foreach=None
    # torch picks the _foreach_ ("multi tensor") implementation whenever the
    # parameters sit on CUDA/XPU and the single-tensor loop otherwise. Both
    # compute the same formulas (foreach with torch._foreach_* kernels that
    # may round differently on a GPU; on CPU float64 they agree bit for bit,
    # fused=True to 4e-16); pinning the single-tensor path makes the
    # measured code the same on every device and the one the module
    # docstring transcribes.
    if name == "sgd":
        return torch.optim.SGD(tensors, lr=float(config["lr"]), momentum=float(config["momentum"]),
                               dampening=float(config["dampening"]), nesterov=bool(config["nesterov"]),
                               weight_decay=float(config["weight_decay"]), foreach=False)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        # maximize / amsgrad / capturable / differentiable stay at their
        # defaults (False): they select other algorithms or other code paths
        # (capturable keeps step on the device and builds the step size from
        # tensors), and the measurement is of plain Adam. betas must be
        # Python floats: torch rejects a float/int mix.
        return cls(tensors, lr=float(config["lr"]), betas=(float(config["beta1"]), float(config["beta2"])),
                   eps=float(config["eps"]), weight_decay=float(config["weight_decay"]), foreach=False)
    raise ValueError(f"unknown optimizer {name!r} (expected 'sgd', 'adam' or 'adamw')")


def run_steps(config: dict, params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]],
              lrs: list[float], dtype: str) -> list[dict[str, np.ndarray]]:
    """Run torch's own optimizer for ``len(grads)`` steps on fixed gradients; parameters after each step.

    ``params`` become leaf tensors (``requires_grad=True``, as a model's
    parameters are) in ``dtype`` on the CPU; before step t every tensor's
    ``.grad`` is set to ``grads[t][name]`` and the param group's ``"lr"`` to
    ``lrs[t]``, then ``optimizer.step()`` runs. Returns K dicts
    ``{name: ndarray}`` (same names and shapes, ``dtype``), the parameters
    after steps 1..K.
    """
    if len(lrs) != len(grads):
        raise ValueError(f"{len(grads)} gradient steps but {len(lrs)} learning rates")
    torch_dtype = TORCH_DTYPES[dtype]
    names = list(params)
    tensors = [torch.tensor(np.asarray(params[n]), dtype=torch_dtype, requires_grad=True) for n in names]
    optimizer = build_optimizer(config, tensors)
    (group,) = optimizer.param_groups
    k = int(config.get("accumulation", 1))
    history = []
    for t, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        # The documented way to change the learning rate between steps (what
        # torch.optim.lr_scheduler does): step() reads group["lr"] afresh
        # each time, and a Python float keeps it exact in float64.
        group["lr"] = float(lr)
        for name, tensor in zip(names, tensors):
            # A fresh tensor each step: SGD's first momentum buffer is a clone
            # of the gradient, and nothing may alias the caller's arrays.
            g = torch.tensor(np.asarray(step_grads[name]), dtype=torch_dtype)
            if k > 1:
                # The manual accumulation loop: (loss / k).backward() per micro-batch adds g / k to .grad.
                g = g / k
                tensor.grad = g if tensor.grad is None else tensor.grad + g
            else:
                tensor.grad = g
        if t % k:
            history.append({n: t_.detach().cpu().numpy().copy() for n, t_ in zip(names, tensors)})
            continue
        optimizer.step()
        if k > 1:
            optimizer.zero_grad(set_to_none=True)
        # step() updates the tensors in place: copy out each step's values.
        history.append({n: t.detach().cpu().numpy().copy() for n, t in zip(names, tensors)})
    return history


def environment_note(config: dict) -> str:
    """One line naming the torch class and the arguments ``run_steps`` constructs it with."""
    if config.get("code"):
        return f"the rendered code's make_optimizer(params, lr) [torch {torch.__version__}]"
    k = int(config.get("accumulation", 1))
    note = _class_note(config)
    return note if k == 1 else (f"a manual accumulation loop ((loss / {k}).backward() per micro-step, step() and "
                                f"zero_grad() every {k}) around " + note)


def _class_note(config: dict) -> str:
    name = config["name"]
    lr = "lrs[t] (param_groups[0]['lr'] set before step t)"
    if name == "sgd":
        return (f"torch.optim.SGD(lr={lr}, momentum={config['momentum']}, dampening={config['dampening']}, "
                f"nesterov={bool(config['nesterov'])}, weight_decay={config['weight_decay']}, foreach=False) "
                f"[torch {torch.__version__}]")
    cls = {"adam": "Adam", "adamw": "AdamW"}.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r} (expected 'sgd', 'adam' or 'adamw')")
    return (f"torch.optim.{cls}(lr={lr}, betas=({config['beta1']}, {config['beta2']}), eps={config['eps']}, "
            f"weight_decay={config['weight_decay']}, amsgrad=False, foreach=False) [torch {torch.__version__}]")


def open_session(job) -> OptimizerSession:
    """The worker's entry for task "optimizer_steps": torch's optimizers, on the CPU."""
    return OptimizerSession(job, run_steps, environment_note,
                            cpu_environment("torch", {"torch": torch.__version__}, job.dtype))
