"""Hugging Face GPT-2 in PyTorch, Flax and TensorFlow, from one random configuration, as a user ports it.

``make_checkpoint.py`` saves one PyTorch checkpoint (random weights from a fixed seed, no download); each
factory below loads it with transformers' own loaders, the Flax and TensorFlow ones converting it with
``from_pt=True``. So the weights every framework runs are the ones transformers' converter produced, which
``gradparity check --weights own`` verifies by value before comparing gradients.

Environment: ``HF_GPT2_CHECKPOINT`` picks another checkpoint folder (``make_checkpoint.py --size small``
writes GPT-2 small's 124M-parameter configuration); ``HF_GPT2_DTYPE=float64`` builds the Flax model computing
in float64 (Flax modules compute in their ``dtype`` whatever the parameters hold).
"""
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def checkpoint() -> str:
    """The checkpoint folder ``make_checkpoint.py`` wrote."""
    folder = Path(os.environ.get("HF_GPT2_CHECKPOINT", HERE / "checkpoint"))
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no checkpoint in {folder}: run python make_checkpoint.py first")
    return str(folder)


def torch_model():
    os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow too, for nothing
    os.environ.setdefault("USE_FLAX", "0")
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(checkpoint())


def flax_model():
    os.environ.setdefault("USE_TF", "0")  # from_pt reads the checkpoint with torch; TensorFlow is not needed
    import jax.numpy as jnp
    from transformers import FlaxGPT2LMHeadModel

    dtype = jnp.float64 if os.environ.get("HF_GPT2_DTYPE") == "float64" else jnp.float32
    return FlaxGPT2LMHeadModel.from_pretrained(checkpoint(), from_pt=True, dtype=dtype)


def tf_model():
    os.environ.setdefault("USE_FLAX", "0")
    from transformers import TFGPT2LMHeadModel

    return TFGPT2LMHeadModel.from_pretrained(checkpoint(), from_pt=True)
