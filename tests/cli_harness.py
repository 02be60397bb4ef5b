"""What the property suites share to run ``gradparity.cli.main`` in this process as a real process would: the
real streams' encodings, and a cap on memory."""
from __future__ import annotations

import contextlib
import io
import resource
from pathlib import Path


def _vm_size_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextlib.contextmanager
def memory_guard(headroom: int = 6 * 2 ** 30):
    """Cap this process's address space while the CLI runs, so that a size check that lets a
    huge problem through gives a MemoryError (exit 4, a failed test) instead of swapping or an
    out-of-memory kill of the whole test run. Every valid case here needs a few MiB."""
    vm = _vm_size_bytes()
    if vm is None or not hasattr(resource, "RLIMIT_AS"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def text_stream(errors: str):
    """Like the real sys.stdout (UTF-8, strict) / sys.stderr (UTF-8, backslashreplace)."""
    buf = io.BytesIO()
    return buf, io.TextIOWrapper(buf, encoding="utf-8", errors=errors, write_through=True)


def call_main(main, argv: list[str]) -> tuple[int | None, object, str, str, BaseException | None]:
    """``main(argv)`` as a process would run it: (exit code, argparse's SystemExit code or None, stdout,
    stderr, the exception that escaped ``main`` or None). SystemExit is an exit code; the streams are encoded
    as the real ones are; memory is capped (``memory_guard``)."""
    out_buf, out = text_stream("strict")
    err_buf, err = text_stream("backslashreplace")
    code, system_exit, escaped = None, None, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), memory_guard():
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse: 2 for a usage error, 0 for --help
                system_exit = exc.code
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # escaped main(): a real run would end in a traceback
        escaped = exc
    finally:
        out.flush()
        err.flush()
    return (code, system_exit, out_buf.getvalue().decode("utf-8", "replace"),
            err_buf.getvalue().decode("utf-8", "replace"), escaped)


def run_cli(*args, cwd=None):
    """``gradparity ARGS`` run by ``main`` in this process (in ``cwd``), as ``subprocess.run(..., text=True,
    capture_output=True)`` would report it: its workers come from the test session's shared pool instead of
    starting afresh. An exception escaping ``main`` is raised (a real process would print a traceback)."""
    import os
    import subprocess

    from gradparity.cli import main

    before = os.getcwd()
    os.chdir(cwd or before)
    try:
        code, _, out, err, escaped = call_main(main, [str(a) for a in args])
    finally:
        os.chdir(before)
    if escaped is not None:
        raise escaped
    return subprocess.CompletedProcess(["gradparity", *map(str, args)], code, out, err)
