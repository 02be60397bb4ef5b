"""Tasks "train" and "model_train": training runs, and the one encoding of their trajectories ("T/NAME",
"loss/T"), written by ``train_result`` and read by ``step_params`` / ``step_losses``."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from gradparity.backends.protocol.jobs import IGNORE_INDEX, RawResult, WorkerJob


def train_batches(job: WorkerJob, prefix: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
    """The (x, y) of a training run's steps 1..K, from ``job.batch[PREFIX + "batches/T/x"|"…/y"]`` (a run's
    ``"batches"`` key names its PREFIX when a job holds several batch sequences, e.g. one per batch size)."""
    out, t = [], 1
    while f"{prefix}batches/{t}/x" in job.batch:
        out.append((job.batch[f"{prefix}batches/{t}/x"], job.batch[f"{prefix}batches/{t}/y"]))
        t += 1
    if not out:
        raise ValueError(f"a train job needs batches '{prefix}batches/1/x', '{prefix}batches/1/y', ...")
    return out


#: A training run's reductions of the per-example losses l_i of a batch of N (weights w_i: see ``train_weights``):
#: unweighted runs "mean" (sum_i l_i / N) and "sum"; weighted runs "sum" (sum_i w_i l_i), "weighted_mean"
#: (sum_i w_i l_i / sum_i w_i: torch ``CrossEntropyLoss(weight=...)``, Keras "mean_with_sample_weight") and
#: "sum_over_batch_size" (sum_i w_i l_i / N: Keras' default with ``sample_weight``).
TRAIN_REDUCTIONS = {False: ("mean", "sum"), True: ("sum", "weighted_mean", "sum_over_batch_size")}


def train_weights(job: WorkerJob, case: str, steps: int) -> list[np.ndarray] | None:
    """The per-example weights of a run's steps 1..K (``job.batch[PREFIX + "batches/T/w"]``, one weight per row
    of batch T), or None for an unweighted run (no ``"weights": true``). Raises ValueError for a reduction the
    run cannot have (``TRAIN_REDUCTIONS``) or weights missing or not matching their batch."""
    run = job.payload["runs"][case]
    weighted, prefix = bool(run.get("weights")), run.get("batches", "")
    if run["reduction"] not in TRAIN_REDUCTIONS[weighted]:
        raise ValueError(f"a{' weighted' if weighted else 'n unweighted'} training run reduces by one of "
                         f"{', '.join(TRAIN_REDUCTIONS[weighted])}, not {run['reduction']!r}")
    if not weighted:
        return None
    out = []
    for t in range(1, steps + 1):
        w, y = job.batch.get(f"{prefix}batches/{t}/w"), job.batch[f"{prefix}batches/{t}/y"]
        if w is None or w.shape != y.shape[:1]:
            raise ValueError(f"weighted run {case!r}: '{prefix}batches/{t}/w' must hold one weight per example "
                             f"of batch {t} ({y.shape[:1]}), got {None if w is None else w.shape}")
        out.append(w)
    return out


def train_run(job: WorkerJob, case: str, steps: int) -> tuple[dict, list[float], str, set[int]]:
    """(optimizer config, per-step lrs, reduction, steps whose parameters to return) of a training run: its
    ``"record"`` list, or every step. Raises ValueError for lrs that do not fit the ``steps`` batches or an
    accumulating optimizer (a training run steps on every batch)."""
    run = job.payload["runs"][case]
    config, lrs, reduction = run["optimizer"], [float(lr) for lr in run["lrs"]], run["reduction"]
    if len(lrs) != steps:
        raise ValueError(f"{steps} batches but {len(lrs)} learning rates")
    if int(config.get("accumulation", 1)) != 1:
        raise ValueError("training runs step the optimizer on every batch (accumulation 1)")
    record = run.get("record")
    return config, lrs, reduction, set(range(1, steps + 1)) if record is None else {int(t) for t in record}


def train_result(job: WorkerJob, arrays: dict[str, np.ndarray], losses: list[float], info: dict,
                 accuracy: dict[int, float] | None = None) -> RawResult:
    """A training run's result: ``arrays`` (the parameters, "T/NAME") with every step's loss as "loss/T" in the
    job's dtype, the held-out accuracy after recorded step T as "accuracy/T" (float64; a job with held-out
    examples), and the last step's loss as the result's loss."""
    arrays = dict(arrays)
    arrays.update({f"loss/{t}": np.array(v, dtype=job.dtype) for t, v in enumerate(losses, start=1)})
    arrays.update({f"accuracy/{t}": np.array(v, dtype=np.float64) for t, v in (accuracy or {}).items()})
    return RawResult(losses[-1], arrays, info)


def step_accuracy(arrays: dict[str, np.ndarray], steps) -> list[float]:
    """Decode the held-out accuracy after each step of ``steps`` ("accuracy/T", written by ``train_result``)."""
    return [float(arrays[f"accuracy/{t}"]) for t in steps]


def label_accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """The fraction of targets whose logit is the largest (argmax over the last axis), ignoring targets equal to
    IGNORE_INDEX (-100): the accuracy of class labels or of every token. NaN when every target is ignored."""
    logits, y = np.asarray(logits), np.asarray(y)
    if logits.shape[:-1] != y.shape:
        raise ValueError(f"held-out logits {logits.shape} do not fit targets {y.shape}: the accuracy reads one "
                         "row of class scores per target")
    kept = y != IGNORE_INDEX
    hits = (np.argmax(logits, axis=-1) == y) & kept
    return float(hits.sum() / kept.sum()) if kept.any() else float("nan")


def step_params(arrays: dict[str, np.ndarray], steps, names) -> list[dict[str, np.ndarray]]:
    """Decode a trajectory (a training run's or an optimizer case's arrays, "T/NAME"): for each step T of
    ``steps``, the parameters ``names`` after it, as float64. The one reader of the encoding that
    ``train_result`` and ``OptimizerSession`` write."""
    return [{k: np.asarray(arrays[f"{t}/{k}"], dtype=np.float64) for k in names} for t in steps]


def step_losses(arrays: dict[str, np.ndarray], count: int) -> list[float]:
    """Decode a training run's per-step losses ("loss/T", T = 1..count)."""
    return [float(arrays[f"loss/{t}"]) for t in range(1, count + 1)]


class ModelTraining:
    """Tasks "train" and "model_train": the part every framework's one trainer (``backends/FRAMEWORK/train.py``)
    shares, for a built-in model (payload "builtin": the MLP, the CNN, the sequence model) or a user's factory.

    ``open_model(job)`` builds the framework's model session (``session.py``) on batch 1 of the job (its
    ``batch['x'|'y']``: what ``environment()`` reports on). The batches and per-example weights of every run
    are converted once, by the subclass's ``convert(x, y)`` and ``convert_weights(w)``, so a timed
    ``compute`` is the training loop alone. ``settings(case)`` gives a run's batches, optimizer config, per-step
    lrs, reduction and recorded steps; ``weights(case)`` its converted weights per step, or None.

    Reductions (``TRAIN_REDUCTIONS``), over the L loss terms l_ij of a batch of N examples (j over an example's
    T tokens, or the one term of a class label), with per-example weights w_i broadcast over their terms:
    "mean" sum l / (N T), "sum" sum l; weighted: "sum" sum w l, "weighted_mean" sum w l / (T sum w),
    "sum_over_batch_size" sum w l / (N T).
    """

    def __init__(self, job: WorkerJob, open_model):
        if any(job.switches.values()):
            raise ValueError(f"{job.framework} training runs take no discrepancy switches (got {job.switches})")
        runs = job.payload["runs"]
        first = train_batches(job, next(iter(runs.values())).get("batches", ""))
        self.job = job
        self.model = open_model(replace(job, batch={"x": first[0][0], "y": first[0][1]}))
        self._batches: dict[str, list] = {}
        self._weights: dict[str, list] = {}
        self._run_weights = {}
        self.held = None
        if "held/x" in job.batch:
            self.held = (self.convert(job.batch["held/x"], job.batch["held/y"])[0], np.asarray(job.batch["held/y"]))
        for case, run in runs.items():
            self.batches(run)
            steps = len(self._batches[run.get("batches", "")])
            self._run_weights[case] = self._convert_run_weights(case, run, steps)

    def convert(self, x: np.ndarray, y: np.ndarray):
        """(x, y) of one batch as the framework's tensors on the device."""
        raise NotImplementedError

    def convert_weights(self, w: np.ndarray):
        """One batch's per-example weights (N,) as a tensor on the device, in the job's dtype."""
        raise NotImplementedError

    def predict(self, x, state=None) -> np.ndarray:
        """The tensor the loss reads for the converted inputs ``x`` (inference: no gradient), as numpy."""
        raise NotImplementedError

    def held_out_accuracy(self, state=None) -> float | None:
        """The accuracy on the job's held-out examples of the model in ``state`` (``label_accuracy``), or None
        for a job without them."""
        if self.held is None:
            return None
        x, y = self.held
        return label_accuracy(self.predict(x, state), y)

    def batches(self, run: dict) -> list:
        prefix = run.get("batches", "")
        if prefix not in self._batches:
            self._batches[prefix] = [self.convert(x, y) for x, y in train_batches(self.job, prefix)]
        return self._batches[prefix]

    def _convert_run_weights(self, case: str, run: dict, steps: int) -> list | None:
        weights = train_weights(self.job, case, steps)  # checks the reduction against the run's weighting
        if weights is None:
            return None
        prefix = run.get("batches", "")
        if prefix not in self._weights:
            self._weights[prefix] = [self.convert_weights(np.asarray(w)) for w in weights]
        return self._weights[prefix]

    def weights(self, case: str) -> list | None:
        """Run ``case``'s per-example weights per step, converted (None: an unweighted run)."""
        return self._run_weights[case]

    def environment(self) -> dict:
        return self.model.environment()

    def settings(self, case: str) -> tuple[list, dict, list[float], str, set[int]]:
        """(batches, config, lrs, reduction, recorded steps) of run ``case``."""
        batches = self.batches(self.job.payload["runs"][case])
        config, lrs, reduction, record = train_run(self.job, case, len(batches))
        return batches, config, lrs, reduction, record
