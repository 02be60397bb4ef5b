"""``gradparity doctor``: which frameworks are installed, their versions, and the device each would use.

Each backend is probed in its own worker process (the same path a real run
takes), with a job that computes nothing: import, device choice, precision.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from gradparity.backends import BACKENDS
from gradparity.experiment.spec import load_experiment
from gradparity.losses.batches import make_loss_job
from gradparity.run.execute import BackendOutcome, run_backend
from gradparity.run.pipeline import make_job


def probe(device: str = "auto", backends: tuple[str, ...] | None = None,
          timeout_s: float = 180.0) -> list[BackendOutcome]:
    """Open a session in every backend (no method run) and return what each reported."""
    from gradparity.experiment.inputs import build_inputs

    exp = load_experiment(overrides={
        "device": device, "data.source": "synthetic", "data.batch_size": 2,
        "data.num_features": 3, "data.num_classes": 2, "model.hidden": []})
    inputs = build_inputs(exp)
    names = backends or tuple(BACKENDS)

    def job(info):
        # A backend that only runs loss functions (tf-keras) is probed through its loss module.
        return make_job(exp, inputs, info, methods=()) if info.losses else make_loss_job(info, {}, [])

    # Probes only import and pick a device (no timing), so they may overlap.
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda n: run_backend(job(BACKENDS[n]), BACKENDS[n], timeout_s), names))


def render(outcomes: list[BackendOutcome]) -> str:
    lines = []
    for o in outcomes:
        env = o.environment or {}
        if o.status == "ok":
            versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
            note = f" ({env['device_note']})" if env.get("device_note") else ""
            tf32 = "TF32 possible" if env.get("tf32") else "no TF32"
            lines.append(f"{o.backend:17s} ok       {versions}; device {env.get('device')}{note}; "
                         f"{tf32} at precision=highest")
        else:
            first = (o.error or "").splitlines()[0] if o.error else ""
            lines.append(f"{o.backend:17s} {o.status:8s} {first}")
    return "\n".join(lines)
