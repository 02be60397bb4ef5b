"""`import gradparity` (and everything the parent process uses) imports no framework."""
import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "jaxlib", "flax", "optax", "tf_keras")

PARENT_MODULES = (
    "gradparity", "gradparity.cli", "gradparity.run.pipeline", "gradparity.report.render", "gradparity.commands.doctor",
    "gradparity.experiment.spec", "gradparity.experiment.inputs", "gradparity.run.execute", "gradparity.compare.normalize",
    "gradparity.compare.pairs", "gradparity.compare.verdict", "gradparity.backends", "gradparity.backends.protocol",
    "gradparity.backends.worker", "gradparity.backends.numpy.session", "gradparity.report.outdir",
    "gradparity.losses.catalogue", "gradparity.losses.text", "gradparity.losses.batches", "gradparity.commands.translate",
    "gradparity.commands.compare_losses",
    "gradparity.backends.numpy.losses", "gradparity.backends.torch.losses", "gradparity.backends.keras.losses",
    "gradparity.backends.jax.losses", "gradparity.backends.tf_keras.losses",
)


def test_parent_process_imports_no_framework():
    code = (
        "import sys\n"
        f"for m in {PARENT_MODULES!r}: __import__(m)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"framework modules imported: {out.stdout.strip()}"
