"""gradparity: do gradients mean the same under different reductions, batch sizes and frameworks?

The pipeline, one direction, one subpackage per stage: ``experiment`` (spec,
canonical inputs) -> ``run`` (one worker process per backend) -> ``compare``
(normalize, pairs, verdict) -> ``report``; ``losses`` holds loss functions as
data and ``commands`` one module per command beyond ``run``. Importing
gradparity imports no deep-learning framework; each is imported only inside
its backend's worker.
"""
from gradparity.errors import ConfigError, GradparityError
from gradparity.experiment.spec import Experiment, load_experiment

from gradparity.version import __version__

__all__ = ["ConfigError", "Experiment", "GradparityError", "compare_models", "load_experiment",
           "run_experiment", "__version__"]


def run_experiment(experiment, out_dir=None, **kwargs):
    """Run an Experiment end to end; see ``gradparity.commands.run.run_experiment``."""
    from gradparity.commands.run import run_experiment as _run

    return _run(experiment, out_dir, **kwargs)


def compare_models(torch=None, jax=None, keras=None, **kwargs):
    """Check a user's own model across frameworks; see ``gradparity.commands.check.compare_models``."""
    from gradparity.commands.check import compare_models as _compare

    return _compare(torch=torch, jax=jax, keras=keras, **kwargs)
