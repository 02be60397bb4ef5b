"""The structured TOML form of a loss: the same loss text, as fields.

A file for ``gradparity translate --config`` / ``compare-losses --config``::

    [[losses]]
    loss = "torch.nn.CrossEntropyLoss"                  # the constructor or function, with its module
    options = { weight = [1.0, 2.0, 0.5], ignore_index = -100, label_smoothing = 0.1 }

    [[losses]]
    loss = "keras.losses.SparseCategoricalCrossentropy"
    options = { from_logits = true, reduction = "mean_with_sample_weight" }
    call = ["targets", "logits", "sample_weight=w"]     # the per-batch call, as written

    [[losses]]
    loss = "optax.softmax_cross_entropy_with_integer_labels"
    arguments = ["logits", "labels"]                     # positional arguments, as written
    reduce = "mean"                                      # .mean() / .sum() after it

An option's value is a TOML value (number, string, boolean, list), or
``{ data = "NAME" }`` for an array of ``--data``, or ``{ enum = "tf.keras.losses.Reduction.SUM" }``.
Each table becomes the loss text it stands for and is read by the same
reader as a text (``gradparity.losses.text``), so both forms are validated,
and mean, the same; the report shows the text.
"""
from __future__ import annotations

import ast
import math

from gradparity.errors import ConfigError

#: The keys of one [[losses]] table.
KEYS = ("loss", "arguments", "options", "call", "reduce")
#: The top-level keys of a losses file.
FILE_KEYS = ("losses",)


def _literal(value, where: str) -> str:
    """A TOML value as Python source the loss reader accepts; ConfigError for what it cannot stand for."""
    if isinstance(value, bool) or isinstance(value, (int, str)):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v, where) for v in value) + "]"
    if isinstance(value, dict):
        if set(value) == {"data"} and isinstance(value["data"], str) and value["data"].isidentifier():
            return value["data"]
        if set(value) == {"enum"} and isinstance(value["enum"], str) and ".Reduction." in value["enum"]:
            return _one_argument(value["enum"], where)
        raise ConfigError(f"{where}: a table value must be {{ data = \"NAME\" }} (an array of --data) or "
                          f"{{ enum = \"tf.keras.losses.Reduction.NAME\" }}, got {value!r}")
    raise ConfigError(f"{where}: cannot stand for {value!r} ({type(value).__name__}) in a loss")


def _one_argument(text, where: str) -> str:
    """``text`` when it is exactly one call argument as written in code (``logits``, ``w[:, None]``,
    ``sample_weight=w``); ConfigError otherwise (it is read as code by the loss reader, never run)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: expected an argument as written in code, e.g. \"logits\", got {text!r}")
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except (SyntaxError, RecursionError):
        call = None
    if not (isinstance(call, ast.Call) and len(call.args) + len(call.keywords) == 1
            and not any(isinstance(a, ast.Starred) for a in call.args)
            and all(k.arg is not None for k in call.keywords)):
        raise ConfigError(f"{where}: {text!r} is not one argument as written in code")
    return text.strip()


def _strings(table: dict, key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{where}.{key} must be a list of strings as written in code, got {value!r}")
    return [_one_argument(v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]


def loss_text(table: dict, where: str = "losses[0]") -> str:
    """The loss text a structured [[losses]] table stands for (read by ``parse_loss_text`` afterwards)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table with keys {', '.join(KEYS)}, got {table!r}")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a loss table takes "
                          f"{', '.join(KEYS)}")
    name = table.get("loss")
    if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
        raise ConfigError(f"{where}.loss must be the dotted name of the loss as written in code, e.g. "
                          f"\"torch.nn.CrossEntropyLoss\", got {name!r}")
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}.options must be a table of option = value, got {options!r}")
    bad = [k for k in options if not k.isidentifier()]
    if bad:
        raise ConfigError(f"{where}.options: {bad[0]!r} is not an option name")
    parts = _strings(table, "arguments", where)
    parts += [f"{k}={_literal(v, f'{where}.options.{k}')}" for k, v in options.items()]
    text = f"{name}({', '.join(parts)})"
    if "call" in table:
        text += f"({', '.join(_strings(table, 'call', where))})"
    if "reduce" in table:
        if table["reduce"] not in ("mean", "sum"):
            raise ConfigError(f"{where}.reduce must be \"mean\" or \"sum\", got {table['reduce']!r}")
        text += f".{table['reduce']}()"
    return text


def read_loss_file(path: str) -> list[str]:
    """The loss texts of a TOML file's [[losses]] tables, in order; ConfigError for anything unreadable."""
    from gradparity.experiment.files import read_toml

    doc = read_toml(path, "--config")
    unknown = sorted(set(doc) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(f"--config {path!r}: unknown key(s) {', '.join(map(repr, unknown))}; a losses file "
                          "holds [[losses]] tables only")
    tables = doc.get("losses")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"--config {path!r} holds no [[losses]] table")
    return [loss_text(t, f"losses[{i}]") for i, t in enumerate(tables)]
