"""The output folder: checked and locked before any work, written as one set at the end.

- **Checked first.** ``OutputDir.claim`` runs before any backend starts: a path
  that is a file, lies under a file, cannot be created or cannot be written
  into is an OutputError (a ConfigError: exit code 2), not a traceback after the whole run.
- **One run at a time.** The folder itself is locked (``flock`` on its file
  descriptor) for the whole run; a second run into the same folder stops at
  once with a clear message. The kernel releases the lock when the process
  ends, however it ends, so no stale lock is ever left behind.
- **Written as a set.** Every file of a report is written into a hidden staging
  folder inside the output folder, then renamed into place, ``report.json``
  last, after the files of the report it replaces (any command's, as its
  report.json lists them) are removed; each carries the run id (report.json and report.md in their text,
  the npz files in their zip comment) and report.json lists the SHA-256 of
  the others, so a reader can check that the files belong together.
- **Modes follow the umask**, like any file a user's program creates.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

from gradparity.errors import OutputError

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the staged set is still renamed into place
    fcntl = None


def new_run_id() -> str:
    """A short random id naming one run; every file of its report carries it."""
    return uuid.uuid4().hex[:12]


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_path(path: Path, names: tuple[str, ...]) -> None:
    """Reject, before anything is created, an output path that can never hold this run's files.

    ``names`` are the files the run will write: one that exists as a folder
    (or anything but a file) would make the final rename fail after all the work.
    """
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"--out {str(path)!r} is an existing file, not a folder; choose a folder")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise OutputError(f"--out {str(path)!r} cannot be created: {str(parent)!r} is a file, "
                                      "not a folder")
                break
        for name in names:
            target = path / name
            if target.exists() and not target.is_file():
                raise OutputError(f"{str(target)!r} exists and is not a file, so the report cannot be "
                                  "written there; remove it or choose another --out")
    except OSError as exc:  # e.g. a name too long for the file system
        raise OutputError(f"--out {str(path)!r} is not usable: {exc.strerror or exc}") from None


class OutputDir:
    """A claimed output folder: exists, is writable, and is locked by this process until ``release``."""

    def __init__(self, path: Path, fd: int | None, run_id: str):
        self.path = path
        self.run_id = run_id
        self._fd = fd

    @classmethod
    def claim(cls, path: str | Path, run_id: str, names: tuple[str, ...] = ()) -> "OutputDir":
        """Create (if needed), check and lock ``path`` for writing ``names``; raise OutputError if it cannot be this run's."""
        path = Path(path).expanduser()
        _check_path(path, names)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {str(path)!r}: {exc.strerror or exc}") from None
        fd = None
        if fcntl is not None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError as exc:
                raise OutputError(f"cannot open output folder {str(path)!r}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"another gradparity run is writing to {str(path)!r} right now; wait for it "
                                  "to finish or choose another --out") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise
                # A file system without locks (some network mounts): the staged rename still
                # keeps each run's files together; only the early "busy" message is lost.
        out = cls(path, fd, run_id)
        try:
            probe_fd, probe = tempfile.mkstemp(prefix=".gradparity-probe-", dir=path)
            os.close(probe_fd)
            os.unlink(probe)
        except OSError as exc:
            out.release()
            raise OutputError(f"cannot write into output folder {str(path)!r}: {exc.strerror or exc}") from None
        return out

    def release(self) -> None:
        """Unlock the folder (closing the descriptor releases the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @contextlib.contextmanager
    def staging(self) -> Iterator["Stage"]:
        """Write files into a staging folder; on success rename them into place in the order written.

        On any exception (or signal) the staging folder is removed and the
        files already in the output folder are left as they were.
        """
        stage_dir = self.path / f".gradparity-{self.run_id}.partial"
        stage_dir.mkdir()
        stage = Stage(stage_dir, file_mode())
        try:
            yield stage
            for name in self.earlier_report_files():
                if name not in stage.order:
                    (self.path / name).unlink(missing_ok=True)
            for name in stage.order:
                os.replace(stage_dir / name, self.path / name)
        finally:
            shutil.rmtree(stage_dir, ignore_errors=True)

    def earlier_report_files(self) -> list[str]:
        """The files of the gradparity report already in this folder (any command's), as its report.json lists
        them: a new report replaces the whole set, so that no reader (``gradparity diagnose``, a person) mixes
        one run's files with another's. Files gradparity did not write are never touched."""
        import json

        try:
            doc = json.loads((self.path / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        files = doc.get("files") if isinstance(doc, dict) else None
        if not isinstance(files, dict):
            return []
        return [name for name in files
                if isinstance(name, str) and name == Path(name).name and not name.startswith(".")
                and (self.path / name).is_file()]


class Stage:
    """Files being written for one report; ``write`` returns each file's SHA-256."""

    def __init__(self, folder: Path, mode: int):
        self.folder = folder
        self.mode = mode
        self.order: list[str] = []

    def write(self, name: str, writer: Callable[[Path], None]) -> str:
        path = self.folder / name
        writer(path)
        os.chmod(path, self.mode)
        self.order.append(name)
        return sha256(path)
