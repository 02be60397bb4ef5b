"""`import gradparity` (and every module the parent process may use) imports no framework.

The modules are discovered, not listed: every module of the installed `gradparity` package except the worker
side of the framework backends, which the registry names (the module each framework backend runs a task in,
and the `models` module those build their networks with). A new parent-side module is checked the day it lands.
"""
import importlib
import pkgutil
import subprocess
import sys

import gradparity
import gradparity.backends
from gradparity.backends import BACKENDS

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "jaxlib", "flax", "optax", "tf_keras")


def worker_side_modules() -> set[str]:
    """The modules only a worker imports: every module of a framework backend's package but its ``*_text``
    modules (``loss_text``, ``optimizer_text``: they read and render texts in the parent)."""
    out = set()
    for info in BACKENDS.values():
        if set(info.requires) <= {"numpy"}:
            continue
        package = info.module_for(info.tasks[0]).rsplit(".", 1)[0]
        for m in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if not m.name.endswith("_text"):
                out.add(f"{package}.{m.name}")
    return out


def parent_side_modules() -> list[str]:
    worker = worker_side_modules()
    # core/ and backends/ are two folders mapped onto one package: walk both.
    found = ["gradparity", "gradparity.backends"]
    for package in (gradparity, gradparity.backends):
        found += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted({m for m in found if m not in worker and not m.endswith(".__main__")})


def test_discovery_sees_every_layer():
    modules = parent_side_modules()
    for expected in ("gradparity.cli", "gradparity.run.runner", "gradparity.compare.tolerance",
                     "gradparity.experiment.files", "gradparity.backends.protocol", "gradparity.backends.worker",
                     "gradparity.backends.torch.loss_text", "gradparity.backends.jax.optimizer_text"):
        assert expected in modules
    assert "gradparity.backends.torch.session" not in modules and "gradparity.backends.jax.models" not in modules


def test_parent_process_imports_no_framework():
    modules = parent_side_modules()
    code = (
        "import sys\n"
        f"for m in {modules!r}: __import__(m)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"framework modules imported by one of {len(modules)} modules: {out.stdout.strip()}"
