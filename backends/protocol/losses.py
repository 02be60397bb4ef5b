"""Task "loss_functions": a case 'FUNCTION@BATCH' runs a rendered loss function on a named batch."""
from __future__ import annotations

import numpy as np

from gradparity.backends.protocol.jobs import WorkerJob, compile_generated


def loss_case_batch(case: str) -> str:
    """The batch name of a loss-function case 'FUNCTION@BATCH'."""
    return case.rsplit("@", 1)[1]


def loss_case(job: WorkerJob, case: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
    """(function source, logits, targets, sample_weight or None) of a case 'FUNCTION@BATCH'."""
    function, batch = case.rsplit("@", 1)
    return (job.payload["functions"][function], job.batch[f"{batch}/logits"], job.batch[f"{batch}/targets"],
            job.batch.get(f"{batch}/sample_weight"))


def compile_loss_function(source: str):
    """The ``loss_fn`` a rendered loss source defines (``compile_generated``)."""
    return compile_generated(source)["loss_fn"]
