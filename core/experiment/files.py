"""One reader for every input file a user gives gradparity: .npz arrays, TOML, JSON and text.

Every command reads its files through these functions, so the same bad file
(a missing path, a folder, an empty or truncated file, a single .npy array
saved under an .npz name, a zip that is not an .npz, a pickled object array,
bytes that are not UTF-8, invalid TOML or JSON) is the same clear
``ConfigError`` (exit code 2) everywhere, never a traceback. Each message
names what the file is for (``label``: "data.path", "--data", "the batch
file", ...) and its path.

numpy and the standard library only; nothing here ever unpickles.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tomllib
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from gradparity.errors import ConfigError

#: How an .npz (a zip: local file header, or the end record of an empty zip) and a .npy file begin.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
NPY_MAGIC = b"\x93NUMPY"
#: The first byte of a pickle of protocol 2 and later.
PICKLE_MAGIC = b"\x80"
#: What reading a zip member can raise besides OSError / ValueError / EOFError: a bad zip structure or CRC,
#: a truncated deflate stream, an encrypted member, an unsupported compression method.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError)


def where(path: str | Path, label: str) -> str:
    """``label 'path'``: how every message names a file."""
    return f"{label} {str(path)!r}"


@contextlib.contextmanager
def _reading(path: Path, label: str, kind: str):
    """Turn what opening or reading ``path`` raises into a ConfigError naming it (missing, a folder, unreadable)."""
    try:
        yield
    except FileNotFoundError:
        raise ConfigError(f"{where(path, label)} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{where(path, label)} is a folder, not {kind}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {where(path, label)}: {exc.strerror or exc}") from None


def _head(path: Path, label: str, n: int, kind: str) -> bytes:
    """The first ``n`` bytes of a regular file; ConfigError when it is missing, a folder or unreadable."""
    with _reading(path, label, kind):
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{where(path, label)} is a folder, not {kind}")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{where(path, label)} is not a regular file ({kind} is read by seeking in it)")
        with open(path, "rb") as f:
            return f.read(n)


def read_npz(path: str | Path, label: str, keys: Iterable[str] | None = None,
             hint: str = "") -> dict[str, np.ndarray]:
    """The arrays of an .npz file: all of them, or the named ``keys`` (in that order).

    Never unpickles (an object array is refused, saying so). Every failure is a ConfigError naming
    ``label`` and the path: a missing file, a folder, an empty file, a file that is not a zip (a single
    .npy array under any name, a pickle, text), a truncated or corrupt zip (found also when a member is
    read, so every member is read here), a member that is not a .npy array (a zip that is not an .npz), a
    missing key (the message lists what the file holds). ``hint`` (how to write the file the caller
    needs) ends the messages about a single array or a missing key.
    """
    path = Path(path)
    at = where(path, label)
    tail = f" ({hint})" if hint else ""
    head = _head(path, label, len(NPY_MAGIC), "an .npz file")
    if not head:
        raise ConfigError(f"{at} is empty, not an .npz file")
    if head.startswith(NPY_MAGIC):
        raise ConfigError(f"{at} is a single .npy array, not an .npz of named arrays{tail}")
    if not head.startswith(ZIP_MAGIC):
        what = "a Python pickle, which gradparity never unpickles" if head.startswith(PICKLE_MAGIC) else \
            "not an .npz file"
        raise ConfigError(f"{at} is {what}: an .npz is a zip of .npy arrays, as np.savez writes it{tail}")
    member = None
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):  # the magic said zip; numpy disagrees
                raise ConfigError(f"{at} is not an .npz of named arrays{tail}")
            names = list(keys) if keys is not None else list(z.files)
            missing = [k for k in names if k not in z.files]
            if missing:
                raise ConfigError(f"{at} has no array {' or '.join(map(repr, missing))}; it holds "
                                  f"{', '.join(map(repr, z.files)) or 'nothing'}{tail}")
            out = {}
            for member in names:
                value = z[member]
                if not isinstance(value, np.ndarray):  # numpy hands back a non-.npy member's raw bytes
                    raise ConfigError(f"{at}: {member!r} is not a .npy array, so this zip is not an .npz "
                                      f"(np.savez writes one .npy per array){tail}")
                out[member] = value
            return out
    except ConfigError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickled" in str(exc):
            inside = f"array {member!r}" if member is not None else "it"
            raise ConfigError(f"{at}: {inside} holds Python objects (dtype object), which gradparity never "
                              "unpickles; save numeric arrays") from None
        raise ConfigError(f"cannot read {at} as .npz: {_why(exc, member)}") from None
    except MemoryError:
        raise ConfigError(f"cannot read {at} as .npz: {_why('its arrays do not fit in memory', member)}") from None
    except (OSError, EOFError, *_ZIP_ERRORS) as exc:
        raise ConfigError(f"cannot read {at} as .npz: {_why(exc, member)}") from None


def _why(exc, member: str | None) -> str:
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
    return f"{text} (reading array {member!r})" if member is not None else text


def read_bytes(path: str | Path, label: str, kind: str = "a file") -> bytes:
    """A file's bytes; ConfigError when it is missing, a folder or unreadable."""
    path = Path(path)
    with _reading(path, label, kind):
        return path.read_bytes()


def _utf8(data: bytes, path: Path, label: str, kind: str, bom: bool = False) -> str:
    """``data`` decoded as UTF-8 (dropping a leading byte-order mark when ``bom``); ConfigError saying
    where the first bad byte is."""
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where(path, label)} is not UTF-8 text ({kind} must be): byte "
                          f"0x{exc.object[exc.start]:02x} at offset {exc.start}") from None


def read_text(path: str | Path, label: str, kind: str = "a text file") -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped); ConfigError for anything unreadable."""
    path = Path(path)
    return _utf8(read_bytes(path, label, kind), path, label, kind, bom=True)


def read_json(path: str | Path, label: str) -> Any:
    """A JSON file's value; ConfigError for anything unreadable or invalid."""
    path = Path(path)
    text = _utf8(read_bytes(path, label, "a JSON file"), path, label, "JSON", bom=True)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where(path, label)} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where(path, label)} is not valid JSON: nested too deeply") from None


def read_toml(path: str | Path, label: str) -> dict:
    """A user's TOML file as a dict; ConfigError naming ``label`` and the path for anything unreadable.

    TOML is UTF-8 by definition: other bytes are an error saying where the first bad byte is.
    """
    path = Path(path)
    text = _utf8(read_bytes(path, label, "a TOML file"), path, label, "TOML")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where(path, label)} is not valid TOML: {exc}") from None
