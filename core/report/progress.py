"""Progress bars on the terminal (rich) for commands whose workers run many configurations (``train --sweep``).

Only where stderr is a terminal: piped output, logs and CI keep the plain one-line messages.
"""
from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def worker_progress(label: str, total: int, enabled: bool = True):
    """Yield ``update(done, total)`` for ``run_backend(on_progress=...)``: a bar on stderr while one worker runs
    (removed when it ends), or a no-op when not ``enabled`` or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done, total: bar.update(task, completed=done, total=total)
