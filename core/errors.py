"""Errors that gradparity reports to a person instead of a traceback."""


class GradparityError(Exception):
    """Base class of every error gradparity raises on purpose."""


class ConfigError(GradparityError):
    """The experiment or its input data is invalid; nothing was run.

    Carries every problem found (not just the first), so a user can fix a
    config in one pass. The CLI prints them and exits with code 2.
    """

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self):
        if len(self.problems) == 1:
            return f"invalid experiment: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid experiment ({len(self.problems)} problems):\n{lines}"
