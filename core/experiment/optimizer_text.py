"""Read an optimizer as a user writes it, safely (Python's ``ast``, never ``eval``), and say what it computes.

Accepted, for instance::

    torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1e-4)
    keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, nesterov=True)
    tf.keras.optimizers.AdamW(1e-3)
    optax.adamw(1e-3, weight_decay=1e-2)
    optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))

Argument values must be literals (numbers, True/False/None, tuples); the parameters a torch optimizer takes
(``params``, ``model.parameters()``) may be any expression and are not read. What each constructor and its
defaults mean is decided by the framework's ``gradparity.backends.<fw>.optimizer_text.parse``; this module
finds the structure and which framework a text is written for.
"""
from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass, field

from gradparity.errors import ConfigError
from gradparity.losses.text import dotted_name

#: The leading names that say which framework an optimizer text is written for.
PREFIXES = {"torch": "torch", "optim": "torch", "keras": "keras", "tf": "keras", "optax": "jax"}


@dataclass(frozen=True)
class Expression:
    """An argument that is not a literal (``model.parameters()``), kept as its source text."""

    text: str


@dataclass(frozen=True)
class OptimizerCall:
    """The structure of an optimizer text: the dotted callee, its evaluated arguments, nested calls.

    ``args`` and ``kwargs`` hold literal values, an ``Expression`` where the text is not a literal, or an
    ``OptimizerCall`` for a call inside (``optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1))``).
    """

    framework: str
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    #: The call as the text wrote it (what messages quote), or "" when built otherwise.
    text: str = field(default="", compare=False)

    def __repr__(self) -> str:
        return self.text or f"{self.name}(...)"

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def _value(node: ast.expr, framework: str, source: str):
    if isinstance(node, ast.Call) and dotted_name(node.func) and dotted_name(node.func).split(".")[0] in PREFIXES:
        return _call(node, framework, source)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return Expression(ast.get_source_segment(source, node) or ast.dump(node))


def _call(node: ast.Call, framework: str, source: str) -> OptimizerCall:
    name = dotted_name(node.func)
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        raise ConfigError(f"{name}(...): *args and **kwargs cannot be read; write the arguments out")
    return OptimizerCall(framework, name, tuple(_value(a, framework, source) for a in node.args),
                         {k.arg: _value(k.value, framework, source) for k in node.keywords},
                         ast.get_source_segment(source, node) or name)


def framework_of(text: str) -> str | None:
    """The framework an optimizer text is written for, or None when it does not name a known optimizer (or is
    nested too deeply to read: ast.parse and dotted_name recurse; or holds a byte of argv that is not UTF-8)."""
    try:
        return _framework_of(text)
    except (RecursionError, UnicodeEncodeError):
        return None


def _framework_of(text: str) -> str | None:
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        # A text that does not parse still names what it calls: "torch.optim.SGD(lr=0.1" is an optimizer
        # text with a syntax error (its reader says so), not a loss text.
        leading = re.match(r"\s*([A-Za-z_][\w.]*)\s*\(", text)
        return _framework_of_name(leading.group(1)) if leading else None
    node = tree.body
    if not isinstance(node, ast.Call) or dotted_name(node.func) is None:
        return None
    return _framework_of_name(dotted_name(node.func))


def _framework_of_name(name: str) -> str | None:
    """The framework whose optimizer the dotted callable ``name`` is, or None."""
    framework = PREFIXES.get(name.split(".")[0])
    if framework == "torch" and ".optim." not in f".{name}." and not name.startswith("optim."):
        return None
    if framework == "keras" and ".optimizers." not in f".{name}.":
        return None
    if framework == "jax" and name.rsplit(".", 1)[-1] not in _backend("jax").CONSTRUCTORS:
        return None
    return framework


def _backend(framework: str):
    """The framework's optimizer_text module (parse, render); importing it imports no framework."""
    return importlib.import_module(f"gradparity.backends.{framework}.optimizer_text")


def parse_optimizer_text(text: str):
    """``(framework, OptimizerConfig, explicit)``: what the text builds, with ``explicit`` the set of
    OptimizerConfig fields the text sets itself (the rest are its framework's defaults). ConfigError (exit 2)
    for a text that is not an optimizer gradparity reads, or an argument it does not translate."""
    framework = framework_of(text)
    if framework is None:
        raise ConfigError(f"not an optimizer gradparity reads: {text!r} (expected e.g. torch.optim.Adam(params, "
                          "lr=1e-3), keras.optimizers.SGD(learning_rate=0.01, momentum=0.9) or optax.adamw(1e-3))")
    source = text.strip()
    try:
        call = _call(ast.parse(source, mode="eval").body, framework, source)
    except RecursionError:  # optax.chain(optax.chain(...)) nested deeper than _call can recurse
        raise ConfigError(f"the optimizer text is nested too deeply to read: {text[:80]!r}...") from None
    except SyntaxError as exc:
        raise ConfigError(f"the optimizer text is not a Python expression: {exc.msg} at column {exc.offset}") from None
    config, explicit = _backend(framework).parse(call)
    return framework, config, explicit


def bind(call: OptimizerCall, signature: tuple[str, ...], defaults: dict, accepted_as_is: dict | None = None,
         required: tuple[str, ...] = ()) -> tuple[dict, set[str]]:
    """The call's arguments bound to ``signature`` (positional names in order) with ``defaults``; the names it
    sets. ``accepted_as_is``: arguments that change no number (``foreach``, ``name``), each with the values
    that keep it so (None: any value). Anything else, or a value outside those, is a ConfigError."""
    accepted_as_is = accepted_as_is or {}
    if len(call.args) > len(signature):
        raise ConfigError(f"{call.name}: {len(call.args)} positional arguments, it takes at most {len(signature)}")
    values = dict(zip(signature, call.args))
    for key, value in call.kwargs.items():
        if key in values:
            raise ConfigError(f"{call.name}: {key} given twice")
        values[key] = value
    problems = []
    for key, value in values.items():
        if key in accepted_as_is:
            allowed = accepted_as_is[key]
            if allowed is not None and value not in allowed:
                problems.append(f"{key}={value!r} is not translated (gradparity translates "
                                f"{' or '.join(repr(a) for a in allowed)})")
        elif key not in defaults and key not in required:
            problems.append(f"{key} is not an argument gradparity translates for {call.short_name} "
                            f"(it reads {', '.join([*required, *defaults])})")
        elif isinstance(value, OptimizerCall) and key in ("lr", "learning_rate"):
            problems.append(f"{key}={value.text} is a call, not a number: gradparity reads the learning rate as a "
                            "number written out (for a schedule, give the lr of one step)")
        elif isinstance(value, (Expression, OptimizerCall)) and key not in ("params",):
            problems.append(f"{key}={value.text} is not a literal value (a number written out)")
    missing = [k for k in required if k not in values]
    if missing:
        problems.append(f"{call.short_name} needs {', '.join(missing)}")
    if problems:
        raise ConfigError([f"{call.name}: {p}" for p in problems])
    explicit = {k for k in values if k in defaults or k in required}
    return {**defaults, **{k: v for k, v in values.items() if k in defaults or k in required}}, explicit


def number(call: OptimizerCall, key: str, value, allow_none: bool = False) -> float | None:
    """``value`` as a finite non-negative float (None kept where ``allow_none``); ConfigError otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0 \
            or value == float("inf"):
        raise ConfigError(f"{call.name}: {key} must be a non-negative number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class OptimizerRendering:
    """One optimizer written for one framework, as code a user pastes and a worker runs unchanged.

    ``code`` is self-contained (that framework, math) and defines ``make_optimizer`` (torch:
    ``make_optimizer(params, lr)``; Keras and optax: ``make_optimizer(learning_rate)``, a float or that
    framework's schedule) and, in torch where a step needs it, ``before_step(optimizer, t)`` to call before
    the t-th ``optimizer.step()`` (t from 1). ``native``: the framework's own optimizer with arguments only;
    False where the code adds to it (a hook, a subclass, a chain of transformations). ``notes``: why.
    """

    framework: str
    native: bool
    code: str
    usage: str
    notes: tuple[str, ...] = ()
