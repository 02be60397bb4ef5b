"""``gradparity doctor``: which frameworks are installed, their versions, and the device each would use.

By default (``installed``) nothing is imported: each backend's required
modules are looked up (``importlib.util.find_spec``) and their versions read
from the installed distributions' metadata, in well under a second. With
``--devices`` (``probe``) each backend is also probed in its own worker process
(the same path a real run takes), with a job that computes nothing: import,
device choice, precision.
"""
from __future__ import annotations

from dataclasses import dataclass

from gradparity.backends import BACKENDS
from gradparity.experiment.spec import load_experiment
from gradparity.losses.batches import make_loss_job
from gradparity.run.execute import BackendOutcome
from gradparity.commands.run import experiment_job
from gradparity.run.runner import WorkerRun, run_jobs


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
        return experiment_job(exp, inputs, info, methods=()) if info.losses else make_loss_job(info, {}, [])

    # Probes only import and pick a device (no timing), so they may overlap.
    return list(run_jobs([WorkerRun(job(BACKENDS[n]), BACKENDS[n], timeout_s) for n in names],
                         parallel=3).values())


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


# --- what is installed, without importing any framework (the default ``gradparity doctor``) ---------------------

#: The distributions whose versions doctor reports (``importlib.metadata`` names), in this order.
DISTRIBUTIONS = ("numpy", "torch", "tensorflow", "keras", "tf-keras", "jax", "jaxlib", "flax", "optax")
#: A backend's required module -> the distribution that installs it, where the names differ.
_DISTRIBUTION_OF = {"tf_keras": "tf-keras"}


@dataclass(frozen=True)
class Installed:
    """One backend's requirements as found on disk: ``missing`` modules (``importlib.util.find_spec``), each
    required module's distribution version (None: not installed), and the pip extra that installs them."""

    backend: str
    requires: tuple[str, ...]
    missing: tuple[str, ...]
    versions: dict[str, str | None]
    extra: str | None

    @property
    def ok(self) -> bool:
        return not self.missing

    @property
    def install(self) -> str:
        return f"pip install 'gradparity[{self.extra}]'" if self.extra else "pip install gradparity"


def distribution_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when it is not installed); reads metadata only."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def module_found(name: str) -> bool:
    """Whether ``import name`` would find a module, without importing it (a top-level name: no parent runs)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules without a __spec__
        return False


def installed(backends: tuple[str, ...] | None = None) -> list[Installed]:
    """Every backend's (or ``backends``') required modules and their versions, importing no framework."""
    rows = []
    for name in backends or tuple(BACKENDS):
        info = BACKENDS[name]
        versions = {m: distribution_version(_DISTRIBUTION_OF.get(m, m)) for m in info.requires}
        missing = tuple(m for m in info.requires if not module_found(m))
        rows.append(Installed(name, info.requires, missing, versions, info.extra))
    return rows


def versions() -> dict[str, str | None]:
    """``DISTRIBUTIONS`` -> installed version (None: not installed)."""
    return {d: distribution_version(d) for d in DISTRIBUTIONS}


def render_installed(rows: list[Installed]) -> str:
    """One line per backend: ok with its modules' versions, or missing with what is absent and the pip extra."""
    lines = []
    for r in rows:
        found = ", ".join(f"{m} {r.versions.get(m) or '(version unknown)'}" for m in r.requires
                          if m not in r.missing)
        if r.ok:
            lines.append(f"{r.backend:17s} ok       {found}")
        else:
            absent = ", ".join(f"{m} not installed" for m in r.missing)
            lines.append(f"{r.backend:17s} missing  {absent}{'; ' + found if found else ''}; {r.install}")
    return "\n".join(lines)
