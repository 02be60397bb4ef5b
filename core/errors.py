"""Errors that gradparity reports to a person instead of a traceback."""


class GradparityError(Exception):
    """Base class of every error gradparity raises on purpose."""


class ConfigError(GradparityError):
    """The experiment or its input data is invalid; nothing was run.

    Carries every problem found (not just the first), so a user can fix a
    config in one pass. The CLI prints them and exits with code 2.
    """

    #: What was invalid, for the message: a command that reads something else (a loss text) sets it.
    subject = "experiment"

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self):
        if len(self.problems) == 1:
            return f"invalid {self.subject}: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid {self.subject} ({len(self.problems)} problems):\n{lines}"


class OutputError(ConfigError):
    """The output folder cannot hold this run's report; found before any work (exit code 2)."""

    def __str__(self):
        return f"cannot use the output folder: {self.problems[0]}"


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped the run.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    swallows it. ``outcome`` carries what the interrupted backend had
    finished; ``outcomes`` every job's outcome when the runner
    (``gradparity.run.runner.run_jobs``) was stopped; ``report`` the partial
    report the command built (and wrote) before re-raising. The process
    should exit with ``exit_code`` (128 + signal).
    """

    def __init__(self, signum: int, outcome=None, report=None):
        super().__init__(signum)
        self.signum = int(signum)
        self.outcome = outcome
        self.outcomes = None
        self.report = report

    @property
    def signal_name(self) -> str:
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
