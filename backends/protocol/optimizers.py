"""Task "optimizer_steps": a framework's optimizer fed a fixed gradient sequence."""
from __future__ import annotations

import numpy as np

from gradparity.backends.protocol.jobs import RawResult, WorkerJob


# --- Optimizers on a fixed gradient sequence (task "optimizer_steps") ---------------------------------------
#
# Each ``backends/{torch,keras,jax}/optimizers.py`` exposes
#     run_steps(config, params, grads, lrs, dtype) -> the K parameter dicts after steps 1..K
#     environment_note(config) -> one line naming the class / transformation and its arguments
# ``config`` is ``OptimizerConfig.to_dict()`` (gradparity.experiment.optimizers), ``params`` the start
# {name: ndarray}, ``grads`` K gradient dicts of the same names and shapes, ``lrs`` the K per-step learning
# rates, ``dtype`` "float32" | "float64". No model and no loss: the framework's own optimizer applies grads[t]
# at lrs[t]; the parameters come back as numpy arrays in ``dtype``.
#
# ``payload``: {"configs": {CASE: OptimizerConfig.to_dict()}, "lrs": {CASE: [lr at step 1, ...]},
#              "scales": {CASE: factor the gradients are multiplied by (default 1)}}
# ``params``: the starting parameters; ``batch``: "grads/T/NAME", the gradient fed at step T (from 1).
# A case returns loss NaN and grads {"T/NAME": parameters after step T}; info {"optimizer": what ran}.
# A config with a "code" key runs that rendered source instead of the class its fields name (``gradparity
# translate``; ``gradparity.experiment.optimizer_text.OptimizerRendering``): its ``make_optimizer`` builds the
# optimizer, fed the same gradients and learning rates, with torch's ``before_step(optimizer, t)`` where defined.



def step_gradients(job: WorkerJob) -> list[dict[str, np.ndarray]]:
    """The gradient sequence of an optimizer job, step 1 first."""
    out, t = [], 1
    while f"grads/{t}/{next(iter(job.params))}" in job.batch:
        out.append({name: job.batch[f"grads/{t}/{name}"] for name in job.params})
        t += 1
    return out



class OptimizerSession:
    """A backend's native optimizers behind the Session protocol: ``compute(case)`` runs one config."""

    def __init__(self, job: WorkerJob, run_steps, describe, environment: dict):
        self.job, self.run_steps, self.describe, self.env = job, run_steps, describe, environment
        self.grads = step_gradients(job)

    def environment(self) -> dict:
        return dict(self.env)

    def compute(self, case: str) -> RawResult:
        config = self.job.payload["configs"][case]
        scale = float(self.job.payload.get("scales", {}).get(case, 1.0))
        grads = self.grads if scale == 1.0 else [{k: (g * scale).astype(g.dtype) for k, g in step.items()}
                                                 for step in self.grads]
        steps = self.run_steps(config, self.job.params, grads, self.job.payload["lrs"][case], self.job.dtype)
        arrays = {f"{t}/{name}": np.asarray(v) for t, p in enumerate(steps, start=1) for name, v in p.items()}
        return RawResult(float("nan"), arrays, {"optimizer": self.describe(config)})


def cpu_environment(framework: str, versions: dict, dtype: str, note: str | None = None) -> dict:
    """The environment of a backend that computes on the CPU in ``dtype`` (an optimizer job)."""
    return {"framework": framework, "versions": versions, "device": "cpu", "device_kind": "cpu",
            "device_note": note, "dtype": dtype, "precision": {}, "tf32": False}
