"""Every command that reads a file turns a bad one into a clear exit 2, never a traceback (exit 4).

The bad files are made here as a user makes them, with plain numpy / zipfile / open calls; each command
runs as ``python -m gradparity ...`` in a subprocess, in a fresh folder. None of these may start a
framework worker: the file is read first, so nothing else is written in the folder and a ``check``
model module is never imported.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

# --- bad .npz files: each maker writes ``path`` given the array names the command reads ------------


def _good(path: Path, keys: tuple[str, ...]) -> None:
    np.savez(path, **{k: np.arange(4.0) if i else np.ones((4, 3)) for i, k in enumerate(keys)})


def npy_under_npz_name(path, keys):
    with open(path, "wb") as f:  # a file object: np.save would add '.npy' to the name
        np.save(f, np.ones((4, 3)))


def truncated_zip(path, keys):
    _good(path, keys)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_member(path, keys):
    """A zip whose directory is intact but one member's bytes changed: np.load succeeds, reading fails."""
    _good(path, keys)
    data = bytearray(path.read_bytes())
    buf = io.BytesIO()
    np.save(buf, np.ones((4, 3)))
    payload = buf.getvalue()
    at = bytes(data).find(payload)
    assert at > 0
    data[at + len(payload) - 1] ^= 0xFF  # the first array's last byte: its CRC no longer matches
    path.write_bytes(bytes(data))


def zip_not_npz(path, keys):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not arrays")


def empty_file(path, keys):
    path.write_bytes(b"")


def text_file(path, keys):
    path.write_text("x,y\n1.0,0\n2.0,1\n")


def folder(path, keys):
    path.mkdir()


def missing(path, keys):
    pass


def object_array(path, keys):
    """np.savez pickles an object array; gradparity must refuse it without unpickling."""
    arrays = {k: np.arange(4.0) for k in keys}
    arrays[keys[0]] = np.array([{"a": 1}, None, "b", 2.0], dtype=object)
    np.savez(path, **arrays)


def pickle_file(path, keys):
    with open(path, "wb") as f:
        pickle.dump({k: [1.0, 2.0] for k in keys}, f)


#: maker -> what the message says (a regex: a folder given to diagnose is read as a report folder).
NPZ_KINDS = {
    npy_under_npz_name: "single .npy array",
    truncated_zip: "cannot read .* as .npz",
    corrupt_member: "cannot read .* as .npz",
    zip_not_npz: "not a .npy array|has no array",
    empty_file: "is empty",
    text_file: "not an .npz file",
    folder: "is a folder|holds no report.json",
    missing: "does not exist",
    object_array: "Python objects",
    pickle_file: "pickle",
}

MODULE = """\
from pathlib import Path

Path(__file__).with_name("IMPORTED").write_text("a worker imported mymod")

import torch


def make():
    return torch.nn.Linear(3, 2)
"""


def _run_config(tmp: Path, bad: Path) -> list:
    (tmp / "exp.toml").write_text(f'backends = ["numpy"]\n\n[data]\nsource = "npz"\npath = "{bad.name}"\n'
                                  "batch_size = 4\n")
    return ["run", "exp.toml"]


def _check_data(tmp: Path, bad: Path) -> list:
    (tmp / "mymod.py").write_text(MODULE)
    (tmp / "check.toml").write_text('[models]\ntorch = "mymod:make"\n')
    return ["check", "check.toml", "--data", str(bad)]


def _diagnose_file(tmp: Path, bad: Path) -> list:
    return ["diagnose", str(bad)]


def _diagnose_folder(tmp: Path, bad: Path) -> list:
    (tmp / "report.json").write_text(json.dumps({"experiment": {"dtype": "float32", "data": {"batch_size": 4}}}))
    return ["diagnose", str(tmp)]


def _translate_data(tmp: Path, bad: Path) -> list:
    return ["translate", "torch.nn.CrossEntropyLoss()", "--data", str(bad)]


#: command -> (the bad file's name, the arrays it reads, the arguments given the folder and the file).
NPZ_COMMANDS = {
    "run CONFIG (data.path)": ("data.npz", ("x", "y"), _run_config),
    "check --data": ("batch.npz", ("x", "y"), _check_data),
    "diagnose FILE": ("grads.npz", ("a/w", "b/w"), _diagnose_file),
    "diagnose FOLDER (gradients.npz)": ("gradients.npz", ("torch/sum/w", "torch/mean/w"), _diagnose_folder),
    "translate --data": ("data.npz", ("logits", "targets"), _translate_data),
}


def gradparity(cwd: Path, args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradparity", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def assert_refused(tmp: Path, args: list, bad: Path, message: str) -> None:
    before = set(os.listdir(tmp))
    proc = gradparity(tmp, args)
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert str(bad) in err, err
    assert re.search(message, err), (message, err)
    # Nothing started: no output folder, no model imported, no worker's progress.
    assert set(os.listdir(tmp)) == before, sorted(set(os.listdir(tmp)) - before)
    assert "describing the model" not in err and "computing" not in err, err


@pytest.mark.parametrize("maker", list(NPZ_KINDS), ids=lambda m: m.__name__)
@pytest.mark.parametrize("command", list(NPZ_COMMANDS))
def test_a_bad_npz_is_exit_2_in_every_command(tmp_path, command, maker):
    tmp_path = tmp_path.resolve()  # the path as messages print it (a config's folder is resolved)
    name, keys, args_for = NPZ_COMMANDS[command]
    bad = tmp_path / name
    maker(bad, keys)
    assert_refused(tmp_path, args_for(tmp_path, bad), bad, NPZ_KINDS[maker])


# --- bad TOML files -------------------------------------------------------------------------------

TOML_KINDS = {
    "not UTF-8": (b'name = "caf\xe9"\n', "not UTF-8 text .*byte 0xe9 at offset 11"),
    "invalid TOML": (b"[[losses]\nloss = 1\n", "not valid TOML"),
    "folder": (None, "is a folder"),
    "missing": (False, "does not exist"),
}


def _grads(tmp: Path) -> Path:
    np.savez(tmp / "g.npz", **{"a/w": np.ones(3), "b/w": np.ones(3)})
    return tmp / "g.npz"


TOML_COMMANDS = {
    "run CONFIG": lambda tmp, bad: ["run", bad],
    "check CONFIG": lambda tmp, bad: ["check", bad],
    "compare-losses --config": lambda tmp, bad: ["compare-losses", "--config", bad],
    "translate --config": lambda tmp, bad: ["translate", "--config", bad],
    "diagnose --info": lambda tmp, bad: ["diagnose", _grads(tmp), "--info", bad],
}


@pytest.mark.parametrize("kind", list(TOML_KINDS))
@pytest.mark.parametrize("command", list(TOML_COMMANDS))
def test_a_bad_toml_is_exit_2_in_every_command(tmp_path, command, kind):
    content, message = TOML_KINDS[kind]
    bad = tmp_path / "config.toml"
    if content is None:
        bad.mkdir()
    elif content is not False:
        bad.write_bytes(content)
    args = TOML_COMMANDS[command](tmp_path, bad)
    assert_refused(tmp_path, args, bad, message)


# --- a report folder's report.json, a table file --------------------------------------------------

JSON_KINDS = {
    "invalid JSON": (b'{"experiment": ', "not valid JSON"),
    "not UTF-8": (b'{"name": "\xff"}', "not UTF-8"),
    "empty": (b"", "not valid JSON"),
    "a list": (b"[1, 2]", "not a gradparity report"),
    "a folder": (None, "is a folder"),
    "a bad dtype": (b'{"experiment": {"dtype": "float8"}}', "dtype .float8. is not one of float64"),
}


@pytest.mark.parametrize("kind", list(JSON_KINDS))
def test_a_report_folder_with_a_bad_report_json_is_exit_2(tmp_path, kind):
    content, message = JSON_KINDS[kind]
    np.savez(tmp_path / "gradients.npz", **{"torch/sum/w": np.ones(3), "torch/mean/w": np.ones(3)})
    bad = tmp_path / "report.json"
    if content is None:
        bad.mkdir()
    else:
        bad.write_bytes(content)
    assert_refused(tmp_path, ["diagnose", tmp_path], bad, message)


@pytest.mark.parametrize("content,message", [
    (b"a,b,max_abs\nsum,mean,0.5\xff\n", "not UTF-8 text .*byte 0xff at offset 24"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xa1\xb2\xc3", "not UTF-8"),
])
def test_a_table_file_that_is_not_text_is_exit_2(tmp_path, content, message):
    bad = tmp_path / "table.csv"
    bad.write_bytes(content)
    assert_refused(tmp_path, ["diagnose", bad], bad, message)
