"""What a reduction experiment measured, as one value: the type ``gradparity run`` builds and the report
renders (``gradparity.report.render``), so neither imports the other's module."""
from __future__ import annotations

from dataclasses import dataclass

from gradparity.compare.normalize import Result
from gradparity.compare.pairs import Comparison
from gradparity.compare.tolerance import Tolerance
from gradparity.compare.verdict import Verdict
from gradparity.experiment.inputs import CanonicalInputs
from gradparity.experiment.spec import Experiment
from gradparity.run.execute import BackendOutcome


@dataclass
class Report:
    """Everything one run measured; ``gradparity.report.render`` renders and writes it.

    ``interrupted`` names the signal that stopped the run early (None when
    it ran to the end); the results then cover only what finished.
    """

    experiment: Experiment
    inputs: CanonicalInputs
    outcomes: list[BackendOutcome]
    results: list[Result]
    tolerance: Tolerance
    comparisons: list[Comparison]
    verdict: Verdict
    started_utc: str
    finished_utc: str
    run_id: str = ""
    interrupted: str | None = None
    #: ``--data-parallel R``: the engines' section (``commands.data_parallel.DataParallelReport``), or None.
    data_parallel: object = None
