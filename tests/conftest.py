"""Shared fixtures: tiny experiments, fault-injecting backends, framework availability."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from gradparity.backends import BACKENDS, BackendInfo

TESTS = Path(__file__).resolve().parent

#: Tiny problem used wherever the numbers themselves are not the point.
TINY = {
    "data.source": "synthetic", "data.batch_size": 6, "data.num_features": 5,
    "data.num_classes": 3, "model.hidden": [4], "model.activation": "tanh", "device": "cpu",
    "timeout_s": 120,
}


def installed(backend: str) -> bool:
    """True when every module the backend needs can be found (found, not imported)."""
    return all(importlib.util.find_spec(m) is not None for m in BACKENDS[backend].requires)


def fake(mode: str) -> BackendInfo:
    """A registry entry for tests/fake_backends.py in failure ``mode`` (see that module)."""
    requires = ("numpy", "framework_that_is_not_installed") if mode == "missing" else ("numpy",)
    return BackendInfo(f"fake-{mode}", "fake", "fake_backends", "fake", requires,
                       frozenset({"cross_entropy"}), variant=mode)


@pytest.fixture
def fake_env():
    """Environment for workers that must import tests/fake_backends.py."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(TESTS) + (os.pathsep + path if path else "")}
