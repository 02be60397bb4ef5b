"""The process exit codes of every gradparity command, in one place.

====  ===========================================================================================
code  meaning
====  ===========================================================================================
0     agree / match / clean: every comparison is within its tolerance (``run``, ``check``,
      ``train``, ``optimizers``), every translation matches its source (``translate``), the loss
      configurations were all read as written (``compare-losses``), no cause of a discrepancy was
      found (``diagnose``)
1     disagree / mismatch / cause found: some pair exceeds its tolerance (or some results are
      NaN/inf beside finite ones), a translation differs from its source, a loss configuration
      was misread, ``diagnose`` names a known cause
2     invalid input, nothing was run: a bad flag or value (argparse usage errors included), config,
      data or output folder; no worker was started and no output folder was written
3     incomplete: no disagreement, but some results could not be computed (a framework missing, a
      worker that failed or timed out), or ``diagnose`` could not tell the cause
4     internal error: a bug in gradparity itself (the traceback is printed; please report it)
128+N stopped by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP), after writing a partial report of
      what had finished (``gradparity.errors.Interrupted.exit_code``); 141 (SIGPIPE) when the reader of
      the printed output left (``| head``): the rest of the output is dropped, silently
====  ===========================================================================================

The per-command names below are aliases of these five values, kept so each module reads in its own words.
"""
from __future__ import annotations

import signal as _signal

AGREE = 0
DISAGREE = 1
INVALID = 2
INCOMPLETE = 3
INTERNAL = 4
SIGNAL_BASE = 128

# The names the modules have used (``gradparity.compare.verdict``, ``gradparity.commands.*``, ``gradparity.cli``).
EXIT_AGREE = EXIT_MATCH = EXIT_CLEAN = EXIT_CONSISTENT = AGREE
EXIT_DISAGREE = EXIT_MISMATCH = EXIT_CAUSE = EXIT_MISREAD = DISAGREE
EXIT_INVALID = INVALID
EXIT_INCOMPLETE = EXIT_UNKNOWN = INCOMPLETE
EXIT_INTERNAL = INTERNAL

MEANING = {
    AGREE: "agree / match / clean",
    DISAGREE: "disagree / mismatch / cause found",
    INVALID: "invalid input (nothing was run)",
    INCOMPLETE: "incomplete (some results could not be computed)",
    INTERNAL: "internal error (a bug in gradparity)",
}


def from_signal(signum: int) -> int:
    """The exit code of a run stopped by signal ``signum``: 128 + N."""
    return SIGNAL_BASE + int(signum)


def describe(code: int) -> str:
    """One line for an exit code, signals included (130 -> 'stopped by SIGINT')."""
    if code in MEANING:
        return MEANING[code]
    if code > SIGNAL_BASE:
        try:
            return f"stopped by {_signal.Signals(code - SIGNAL_BASE).name}"
        except ValueError:
            return f"stopped by signal {code - SIGNAL_BASE}"
    return f"unknown exit code {code}"
