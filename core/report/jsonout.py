"""The one JSON policy of everything gradparity writes or prints as JSON (``--json``, report.json).

Strict JSON (RFC 8259), always: a non-finite float (NaN, inf, -inf) becomes ``null``, since JSON has no
token for it and ``NaN`` in a file breaks strict readers (``jq``, JavaScript, ``json.loads`` with
``parse_constant``); numpy scalars and arrays become numbers and lists (their non-finite values null too),
tuples and sets lists, and anything else (a path) its ``str``. Serialized with ``allow_nan=False``, so a
non-finite number that slipped through would be an error here, never invalid output.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any


def strict(value: Any, default: Callable[[Any], Any] = str) -> Any:
    """``value`` made of JSON types only: non-finite floats None, numpy values Python ones, recursively."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_key(k): strict(v, default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v, default) for v in value]
    if isinstance(value, (set, frozenset)):
        return [strict(v, default) for v in sorted(value, key=repr)]
    if isinstance(value, PurePath):
        return str(value)
    np = _numpy()
    if np is not None:
        if isinstance(value, np.ndarray):
            return strict(value.tolist(), default)
        if isinstance(value, np.generic):  # np.float32, np.int64, np.bool_, np.str_ ...
            return strict(value.item(), default)
    return str(value) if default is str else strict(default(value), str)


def dumps(doc: Any, *, indent: int | None = 1, default: Callable[[Any], Any] | None = None) -> str:
    """``doc`` as strict JSON text (see the module doc); ``default`` converts what JSON has no type for
    (``str`` unless given)."""
    return json.dumps(strict(doc, default or str), indent=indent, allow_nan=False)


def _key(key: Any) -> str | int | float | bool | None:
    """A mapping key json.dumps accepts (it takes str, int, float, bool, None; numpy ones converted)."""
    if key is None or isinstance(key, (str, bool, int)):
        return key
    if isinstance(key, float):
        return key if math.isfinite(key) else str(key)
    converted = strict(key)
    return converted if isinstance(converted, (str, int, float, bool)) or converted is None else str(key)


def _numpy():
    """numpy when it is already imported (no import just for this: a value can only be numpy's if it is)."""
    import sys

    return sys.modules.get("numpy")
