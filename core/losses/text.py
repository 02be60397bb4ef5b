"""Read a loss as a user writes it in their code, safely: Python's ``ast``, never ``eval``.

Accepted, for instance::

    torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=-100, label_smoothing=0.1)
    nn.BCEWithLogitsLoss(pos_weight=pos)                       # a named array, given with --data
    keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits, sample_weight=w)
    optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

Values may be literals (numbers, strings, True/False/None, lists and tuples
of them), ``torch.tensor([...])`` / ``np.array([...])`` / ``jnp.array([...])``
/ ``tf.constant([...])`` of literals, or names of arrays the caller supplies.
Anything else is a ConfigError naming what was not understood.

The generic structure is found here; what a constructor and its options mean
is decided by each framework's ``gradparity.backends.<fw>.losses.parse``.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

import numpy as np

from gradparity.errors import ConfigError
from gradparity.losses.catalogue import LossCall

#: The leading names that say which framework a text is written for.
FRAMEWORK_PREFIXES = {
    "torch": "torch", "nn": "torch", "F": "torch",
    "keras": "keras", "tf": "keras", "tf_keras": "tf_keras",
    "optax": "jax", "jnp": "jax", "jax": "jax",
}
_ARRAY_FUNCTIONS = {"tensor", "array", "asarray", "constant", "as_tensor", "convert_to_tensor", "Tensor",
                    "FloatTensor"}


@dataclass(frozen=True)
class LossExpression:
    """The structure of a loss text: the constructor (or function) called, its arguments, any call.

    ``name`` is the dotted callee, e.g. 'torch.nn.CrossEntropyLoss'; ``args``
    and ``kwargs`` hold evaluated values; ``call`` describes a second call on
    the constructed object (``Loss(...)(y, logits, sample_weight=w)``);
    ``method`` a trailing reduction method (``.mean()``, ``.sum()``) or an
    enclosing ``jnp.mean(...)`` / ``jnp.sum(...)``.
    """

    framework: str
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    call: LossCall | None = None
    method: str | None = None

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def dotted_name(node: ast.AST) -> str | None:
    """'a.b.c' for a Name or an Attribute chain of Names (a callee as written), None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


class _Values:
    """Evaluates argument nodes to Python values (and named arrays), or explains what it cannot read."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def value(self, node: ast.AST):
        try:
            return ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
        if isinstance(node, ast.Name):
            if node.id in self.arrays:
                return np.asarray(self.arrays[node.id]).tolist()
            raise ConfigError(f"{node.id!r} is a name gradparity cannot see: write its values in the text "
                              f"(e.g. torch.tensor([1.0, 2.0])) or pass an npz holding an array {node.id!r} "
                              "with --data")
        if isinstance(node, ast.Call):
            callee = dotted_name(node.func) or ""
            if callee.rsplit(".", 1)[-1] in _ARRAY_FUNCTIONS and len(node.args) >= 1:
                return self.value(node.args[0])
        if isinstance(node, ast.Attribute):
            dotted = dotted_name(node) or ""
            # An enum such as tf.keras.losses.Reduction.SUM is passed through by name.
            if ".Reduction." in f".{dotted}":
                return ("enum", dotted)
        raise ConfigError(f"cannot read {ast.unparse(node)!r}: gradparity reads literals, "
                          "torch.tensor([...]) / np.array([...]) of literals and named arrays, never code")


def _call_info(node: ast.Call) -> LossCall:
    return LossCall(len(node.args), tuple(k.arg for k in node.keywords if k.arg))


def parse_loss_text(text: str, arrays: dict[str, np.ndarray] | None = None) -> LossExpression:
    """Parse ``text`` into a LossExpression; ConfigError for anything that is not a loss expression."""
    try:
        return _parse_loss_text(text, arrays)
    except RecursionError:  # ast.parse, ast.unparse and dotted_name recurse: '-' * 1000 + '1', 'a' + '.a' * 1000
        raise ConfigError("the loss text is nested too deeply to read") from None
    except UnicodeEncodeError:  # a byte of argv that is not UTF-8 ('\udcff'): ast.parse cannot encode it
        raise ConfigError(f"the loss text holds bytes that are not UTF-8 text: {text!r}") from None


def _assignments_as_expression(text: str) -> ast.Expression | None:
    """Code as ``gradparity translate`` prints it and users write it, ``criterion = torch.nn.CrossEntropyLoss(...)``
    then ``loss = criterion(logits, targets)``, as one expression (each name replaced by what it was assigned,
    ``torch.nn.CrossEntropyLoss(...)(logits, targets)``); None when the text is not a few single-name assignments
    (and an expression last)."""
    try:
        module = ast.parse(text, mode="exec")
    except SyntaxError:
        return None
    names: dict[str, ast.expr] = {}
    last = None
    for stmt in module.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = _Substitute(names).visit(stmt.value)
            names[stmt.targets[0].id] = value
            last = value
        elif isinstance(stmt, ast.Expr) and stmt is module.body[-1]:
            last = _Substitute(names).visit(stmt.value)
        else:
            return None
    return None if last is None else ast.fix_missing_locations(ast.Expression(last))


class _Substitute(ast.NodeTransformer):
    """Replace names by the expressions assigned to them earlier in the text."""

    def __init__(self, names: dict[str, ast.expr]):
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.expr:
        return self.names.get(node.id, node)


def _parse_loss_text(text: str, arrays: dict[str, np.ndarray] | None) -> LossExpression:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("the loss text is empty; write it as in your code, e.g. "
                          "\"torch.nn.CrossEntropyLoss(label_smoothing=0.1)\"")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        tree = _assignments_as_expression(text.strip())
        if tree is None:
            raise ConfigError(f"the loss text is not a Python expression: {exc.msg} at column {exc.offset}") from None
    node = tree.body
    values = _Values(arrays or {})
    method = None
    # jnp.mean(optax.f(...)) / jnp.sum(...): a reduction over everything, nothing else.
    if isinstance(node, ast.Call) and (dotted_name(node.func) or "") in ("jnp.mean", "jnp.sum", "jax.numpy.mean",
                                                                       "jax.numpy.sum") and node.args:
        if len(node.args) > 1 or node.keywords:
            raise ConfigError(f"{ast.unparse(node)!r}: only a reduction over every element can be compared "
                              "(jnp.mean(...) or jnp.sum(...) with no axis)")
        method = (dotted_name(node.func) or "").rsplit(".", 1)[-1]
        node = node.args[0]
    # loss(...).mean() / .sum()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Call):
        if node.func.attr not in ("mean", "sum"):
            raise ConfigError(f"cannot compare a reduction by .{node.func.attr}(): write .mean() or .sum()")
        if node.args or node.keywords:
            raise ConfigError(f"{ast.unparse(node)!r}: only a reduction over every element can be compared "
                              f"(.{node.func.attr}() with no axis)")
        method = node.func.attr
        node = node.func.value
    call = None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Call):
        call = _call_info(node)
        node = node.func
    if not isinstance(node, ast.Call):
        raise ConfigError(f"expected a loss constructor or function call, got {ast.unparse(node)!r}")
    name = dotted_name(node.func)
    if not name:
        raise ConfigError(f"cannot tell which loss {ast.unparse(node.func)!r} is")
    root = name.split(".", 1)[0]
    framework = FRAMEWORK_PREFIXES.get(root)
    if framework is None:
        raise ConfigError(f"cannot tell the framework of {name!r}: write it with its module, e.g. "
                          "torch.nn.CrossEntropyLoss, keras.losses.Huber or optax.huber_loss")
    if any(k.arg is None for k in node.keywords):
        raise ConfigError("**kwargs cannot be read: write each option out")
    args = tuple(values.value(a) if framework != "jax" else ast.unparse(a) for a in node.args)
    kwargs = {k.arg: values.value(k.value) for k in node.keywords}
    if framework == "keras" and any(isinstance(v, tuple) and v[:1] == ("enum",) for v in kwargs.values()):
        # tf.keras.losses.Reduction.* exists only in the legacy Keras 2 API (the tf_keras package).
        framework = "tf_keras"
    return LossExpression(framework, name, args, kwargs, call, method)


def is_number(value) -> bool:
    """An int or float read from a loss text (True/False are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bind_arguments(expr: LossExpression, params: tuple[str, ...], qualified: str,
                   unlisted: tuple[str, ...] = ()) -> dict:
    """A constructor's positional and keyword arguments by parameter name, as Python would bind them.

    ``qualified`` names the callee in messages (e.g. 'torch.nn.MSELoss');
    ``unlisted`` are parameters accepted but not offered in the message (deprecated
    ones). ConfigError for too many positional arguments, unknown or doubled options.
    """
    if len(expr.args) > len(params):
        raise ConfigError(f"{qualified} takes at most {len(params)} positional arguments "
                          f"({', '.join(params)}), got {len(expr.args)}")
    options = dict(zip(params, expr.args))
    for key, value in expr.kwargs.items():
        if key not in params:
            accepted = ", ".join(p for p in params if p not in unlisted)
            raise ConfigError(f"{qualified} has no option {key!r}; it accepts {accepted}")
        if key in options:
            raise ConfigError(f"{qualified} got two values for {key!r} (positional and keyword)")
        options[key] = value
    return options
