"""Shared fixtures (tiny experiments, fault-injecting backends), framework availability, and the two test tiers.

Declaring a framework
---------------------
A test that needs a framework, in a worker or in this process, says so once, with the ``frameworks`` marker;
the names are backend names of ``gradparity.backends.BACKENDS`` other than "numpy" (torch, jax,
keras-tensorflow, keras-jax, keras-torch, tf-keras)::

    @pytest.mark.frameworks("torch", "jax")                   # a test function or a class
    pytestmark = pytest.mark.frameworks("keras-tensorflow")   # a whole module
    pytest.param("jax", marks=pytest.mark.frameworks("jax"))  # one parametrized case

Every ``frameworks`` mark on a test counts (function, class, module, parametrization), and
``pytest_collection_modifyitems`` below gives such a test

- a skip, naming the missing modules and the pip extra, unless every module in ``BACKENDS[name].requires`` of
  every named backend is installed (found with ``importlib.util.find_spec``, not imported), and
- the ``slow`` marker.

``required=False`` (``@pytest.mark.frameworks("torch", "jax", required=False)``) is for a test that runs every
framework it finds installed and numpy alone where none is: it is marked slow, never skipped. An unknown name is
a usage error, so a typo cannot quietly run a test nowhere.

The tiers
---------
::

    python -m pytest -m "not slow"   # fast: no framework is imported or started (a few minutes on 2 cores)
    python -m pytest -m slow         # every test that declares a framework
    python -m pytest                 # both

When the ``-m`` expression says ``not slow``, this conftest sets ``GRADPARITY_NO_FRAMEWORK_WORKERS=1`` in
``os.environ`` for the session (subprocesses such as ``python -m gradparity`` inherit it), so a framework worker
started by a test that did not declare its framework is refused ("not started: ...", see
``gradparity.run.execute``) and the test fails; and a test that imports a framework into this process fails
too. tests/test_tiers.py checks that the two tiers are both non-empty and together the whole suite.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from gradparity.backends import BACKENDS, BackendInfo
from gradparity.run.execute import NO_FRAMEWORK_WORKERS_ENV

TESTS = Path(__file__).resolve().parent

#: Tiny problem used wherever the numbers themselves are not the point.
TINY = {
    "data.source": "synthetic", "data.batch_size": 6, "data.num_features": 5,
    "data.num_classes": 3, "model.hidden": [4], "model.activation": "tanh", "device": "cpu",
    "timeout_s": 120,
}


@functools.cache
def missing_modules(backend: str) -> tuple[str, ...]:
    """The modules ``backend`` needs that cannot be found (found, not imported)."""
    return tuple(m for m in BACKENDS[backend].requires if importlib.util.find_spec(m) is None)


def installed(backend: str) -> bool:
    """True when every module the backend needs can be found (found, not imported)."""
    return not missing_modules(backend)


def fake(mode: str) -> BackendInfo:
    """A registry entry for tests/fake_backends.py in failure ``mode`` (see that module)."""
    requires = ("numpy", "framework_that_is_not_installed") if mode == "missing" else ("numpy",)
    return BackendInfo(f"fake-{mode}", "fake", (("gradients", "fake_backends"),), "fake", requires,
                       frozenset({"cross_entropy"}), variant=mode)


@pytest.fixture
def fake_env():
    """Environment for workers that must import tests/fake_backends.py."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(TESTS) + (os.pathsep + path if path else "")}


@pytest.fixture
def workers_started(monkeypatch):
    """The list of jobs a command tried to start in a worker (none is started): for tests of bad input, which
    must be refused before any worker starts. Every command starts its workers through the one runner."""
    started = []
    monkeypatch.setattr("gradparity.run.runner.run_backend", lambda job, info, *a, **k: started.append(info.name))
    return started


# --- the tiers: the ``frameworks`` marker, ``slow``, and the fast tier's guard ------------------------------

#: What the ``frameworks`` marker takes: every backend but the numpy reference.
FRAMEWORK_BACKENDS = tuple(name for name in BACKENDS if name != "numpy")
#: The frameworks' thread-pool sizes the suite sets to 1 (torch's and numpy's OpenMP, TensorFlow's two pools).
SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")

#: The top-level modules no fast-tier test may import into this process.
FRAMEWORK_MODULES = ("torch", "tensorflow", "keras", "jax", "jaxlib", "flax", "optax", "tf_keras")


def is_fast_tier(config) -> bool:
    """True when the ``-m`` expression leaves the slow tests out (it says ``not slow``)."""
    return re.search(r"\bnot\s+slow\b", config.getoption("markexpr") or "") is not None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "frameworks(*backends, required=True): the test runs these framework backends (names of "
                   "gradparity.backends.BACKENDS, numpy excepted); it is marked slow, and skipped unless all are "
                   "installed (never skipped with required=False: it uses those it finds). See tests/conftest.py.")
    config.addinivalue_line(
        "markers", "slow: starts or imports a framework; tests/conftest.py adds it to every test marked "
                   "frameworks. The fast tier is -m 'not slow'.")
    if is_fast_tier(config):
        os.environ[NO_FRAMEWORK_WORKERS_ENV] = "1"
    # The test processes run side by side (pyproject's -n 2) and their problems are tiny: one thread per
    # framework job wastes less of the cores on thread pools waiting for work (a variable you set wins).
    for name in SINGLE_THREAD_ENV:
        os.environ.setdefault(name, "1")


def _declared(item) -> tuple[list[str], list[str]]:
    """(required, optional) backend names of every ``frameworks`` mark on ``item``; UsageError for a bad mark."""
    required, optional = [], []
    for mark in item.iter_markers("frameworks"):
        unknown = [n for n in mark.args if n not in FRAMEWORK_BACKENDS]
        extra = set(mark.kwargs) - {"required"}
        if not mark.args or unknown or extra:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.frameworks({', '.join(map(repr, mark.args))}) "
                + (f"takes no {sorted(extra)}; " if extra else "")
                + f"takes one or more of {', '.join(FRAMEWORK_BACKENDS)}"
                + (f", not {', '.join(map(repr, unknown))}" if unknown else ""))
        names = required if mark.kwargs.get("required", True) else optional
        names.extend(n for n in mark.args if n not in names)
    return required, optional


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection, which must see the slow marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        required, optional = _declared(item)
        if not (required or optional):
            continue
        item.add_marker(pytest.mark.slow)
        missing = [b for b in required if not installed(b)]
        if missing:
            modules = sorted({m for b in missing for m in missing_modules(b)})
            extras = list(dict.fromkeys(part for b in missing for part in BACKENDS[b].extra.split(",")))
            item.add_marker(pytest.mark.skip(
                reason=f"needs {', '.join(required)}; not installed: {', '.join(modules)} "
                       f"(pip install 'gradparity[{','.join(extras)}]')"))


def _check_no_framework_imported(item):
    """Around each phase of a fast-tier test: a framework module that appeared in this process fails the test."""
    if not is_fast_tier(item.config):
        return (yield)
    before = {m for m in FRAMEWORK_MODULES if m in sys.modules}
    result = yield
    new = [m for m in FRAMEWORK_MODULES if m in sys.modules and m not in before]
    if new:
        pytest.fail(f"{item.nodeid} imported {', '.join(new)} in the fast tier (-m 'not slow'): declare it with "
                    f"@pytest.mark.frameworks(...) (tests/conftest.py)", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _check_no_framework_imported(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _check_no_framework_imported(item))


#: Idle served workers all test processes together may keep (0.3 to 0.9 GiB each, TensorFlow's the largest:
#: about 20 GiB at most; measured, the lowest MemAvailable of a full run on a 24 GiB machine was 11.4 GiB with
#: 32 in all, 16 GiB with 16), shared out among pytest-xdist's processes (``-n``, see pyproject.toml).
MAX_IDLE_WORKERS = 32


def _test_processes() -> int:
    """How many pytest processes run the session (pytest-xdist's worker count; 1 without it)."""
    return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(scope="session", autouse=True)
def shared_worker_processes(request):
    """One served worker process per backend and environment for the whole session (``gradparity.run.pool``):
    the tests that run jobs in this process pay each framework's import once, not once per job. A job that
    crashes, hangs or is stopped still takes its worker down, so the isolation tests test the same thing.
    Under pytest-xdist each test process has its own pool; ``--dist loadfile`` keeps a module's tests (and its
    module-scoped fixtures) in one of them."""
    from gradparity.run.pool import shared_workers

    # Room for every backend x (cpu | auto) x precision x JAX's x64 a process's modules use, so few start twice.
    with shared_workers(max_idle=max(4, MAX_IDLE_WORKERS // _test_processes())) as pool:
        yield
        stats = {"started": pool.started, "reused": pool.reused}
        workeroutput = getattr(request.config, "workeroutput", None)
        if workeroutput is not None:   # an xdist worker: the controller adds up every process's figures
            workeroutput["gradparity_pool"] = stats
        else:
            _add_pool_stats(stats)


#: What the session's pools did, for the summary line (filled when the session, or each xdist process, ends).
_POOL_STATS: dict[str, int] = {}


def _add_pool_stats(stats: dict[str, int]) -> None:
    for key, value in stats.items():
        _POOL_STATS[key] = _POOL_STATS.get(key, 0) + int(value)
    _POOL_STATS["processes"] = _POOL_STATS.get("processes", 0) + 1


@pytest.hookimpl(optionalhook=True)   # pytest-xdist's hook: unknown (and never called) without it
def pytest_testnodedown(node, error):
    """(pytest-xdist, in the controller) One test process ended: add up its pool's figures."""
    stats = getattr(node, "workeroutput", {}).get("gradparity_pool")
    if stats:
        _add_pool_stats(stats)


def pytest_terminal_summary(terminalreporter):
    """One line saying how many worker processes the session started and how many jobs reused one."""
    if _POOL_STATS.get("started") or _POOL_STATS.get("reused"):
        n = _POOL_STATS.get("processes", 1)
        terminalreporter.write_line(f"served workers: {_POOL_STATS['started']} started, "
                                    f"{_POOL_STATS['reused']} jobs ran in one already started"
                                    + (f" ({n} test processes, a pool each)" if n > 1 else ""))
