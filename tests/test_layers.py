"""The layers hold: experiment -> run -> compare -> report, commands on top, the entry points above them.

Measured on the source, not on a list: every ``import`` and ``from ... import`` of every module under core/
and backends/, at module level and inside functions (a lazy import is still a dependency), read with ``ast``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The layers of core/, lowest first: a module may import its own layer and the ones below, never above.
LAYERS = {
    "errors": 0, "exit_codes": 0, "version": 0,
    # The float64 reference (``gradparity.reference``): pure numpy mathematics on the experiment's definitions.
    "experiment": 1, "losses": 1, "reference": 1,
    "run": 2,
    "compare": 3,
    "report": 4,
    "commands": 5,
    # The entry points: the command line, the Python API (``gradparity.run_experiment``, ``compare_models``)
    # and the pytest helper.
    "cli": 6, "__init__": 6, "__main__": 6, "testing": 6,
}
#: What the backends' modules may import of core: the experiment's definitions and the errors, nothing that
#: runs, compares or reports (a worker computes; the parent judges). The numpy worker computes with the reference.
BACKEND_MAY_IMPORT = {"errors", "exit_codes", "experiment", "losses", "reference"}

#: Imports that break the layers today, each with its remedy; the test fails when one is added and when one
#: listed here is gone (so the list stays exact and only shrinks). Empty: the float64 reference the parent
#: computes with is a core library (``core/reference/``), no longer a backend package.
KNOWN: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts = ["gradparity"] + parts[1:] if parts[0] == "core" else ["gradparity", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> list[tuple[str, str]]:
    """(importer, imported) for every gradparity import in core/ and backends/."""
    out = []
    for path in sorted([*ROOT.glob("core/**/*.py"), *ROOT.glob("backends/**/*.py")]):
        me = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradparity"):
                out.append((me, node.module))
            elif isinstance(node, ast.Import):
                out += [(me, a.name) for a in node.names if a.name.startswith("gradparity")]
    return out


def layer_of(module: str) -> str | None:
    """The core layer of a module ('run', 'compare', ...), '__init__' for the package itself, None for backends."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return None if parts[1] == "backends" else parts[1]


def violations() -> set[tuple[str, str]]:
    bad = set()
    for me, target in imports():
        mine, theirs = layer_of(me), layer_of(target)
        if mine is None:  # a backend module
            if theirs is not None and theirs not in BACKEND_MAY_IMPORT:
                bad.add((me, target))
        elif theirs is None:  # core importing a backend: the registry, the protocol, parent-side readers
            if target.startswith("gradparity.backends.numpy"):
                bad.add((me, target))
        elif LAYERS[theirs] > LAYERS[mine]:
            bad.add((me, target))
    return bad


def test_every_core_module_has_a_layer():
    assert {layer_of(module_name(p)) for p in ROOT.glob("core/**/*.py")} <= set(LAYERS)


def test_nothing_imports_a_higher_layer():
    new = violations() - KNOWN
    assert not new, "imports against the layers: " + ", ".join(f"{a} -> {b}" for a, b in sorted(new))


def test_the_known_exceptions_are_exact():
    assert not KNOWN - violations(), f"no longer there, remove from KNOWN: {sorted(KNOWN - violations())}"


def test_only_the_entry_points_import_commands():
    importers = {me for me, target in imports()
                 if layer_of(target) == "commands" and layer_of(me) not in ("commands", "cli", "__init__", "testing")}
    assert not importers, importers
