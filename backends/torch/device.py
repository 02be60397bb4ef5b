"""PyTorch: the device and the float32 precision settings every torch worker shares (the model session, the
trainer, the loss and optimizer sessions, and Keras on its torch backend).

Imported only inside a worker process.
"""
from __future__ import annotations

import os
import warnings

import torch

from gradparity.backends.protocol import DeviceUnavailable

#: Nodes of the fp32-precision tree (torch >= 2.9). Setting a parent also sets its children.
_PRECISION_NODES = {
    "generic": lambda b: b,
    "cuda.matmul": lambda b: b.cuda.matmul,
    "cudnn": lambda b: b.cudnn,  # the "cuda / all" node
    "cudnn.conv": lambda b: b.cudnn.conv,
    "cudnn.rnn": lambda b: b.cudnn.rnn,
    "mkldnn": lambda b: b.mkldnn,
    "mkldnn.matmul": lambda b: b.mkldnn.matmul,
    "mkldnn.conv": lambda b: b.mkldnn.conv,
    "mkldnn.rnn": lambda b: b.mkldnn.rnn,
}


def _has_fp32_precision_api() -> bool:
    return hasattr(torch.backends, "fp32_precision")


def pin_highest_precision() -> None:
    """Forbid TF32/bf16 internals for float32 everywhere torch has a switch.

    Both API families are set, legacy first and to the same values: torch
    cross-checks them (``allowTF32CuBLAS``/``allowTF32CuDNN`` raise
    "mix of the legacy and new APIs" when they disagree), and setting only
    the new one leaves the legacy cuDNN flag at True, which makes reading it
    an error. Legacy first because ``cudnn.allow_tf32 = False`` resets the
    new cuDNN nodes to "none".
    """
    with warnings.catch_warnings():
        # Some releases since 2.9 warn that these switches will go (2.13 does not).
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    if _has_fp32_precision_api():
        for get_node in _PRECISION_NODES.values():
            get_node(torch.backends).fp32_precision = "ieee"


def _read_legacy(getter):
    """A legacy precision flag, or why torch refused to read it (it raises on mixed API use)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getter()
    except RuntimeError as exc:
        return f"unreadable: {str(exc).split(',')[0]}"


def read_precision(requested: str) -> dict:
    """The precision settings as torch reports them now, both API families where they exist."""
    out: dict = {"requested": requested}
    if _has_fp32_precision_api():
        for name, get_node in _PRECISION_NODES.items():
            out[f"fp32_precision.{name}"] = get_node(torch.backends).fp32_precision
    out["float32_matmul_precision"] = _read_legacy(torch.get_float32_matmul_precision)
    out["cuda.matmul.allow_tf32"] = _read_legacy(lambda: torch.backends.cuda.matmul.allow_tf32)
    out["cudnn.allow_tf32"] = _read_legacy(lambda: torch.backends.cudnn.allow_tf32)
    # Set by NVIDIA's containers: the first makes torch start with TF32 matmuls (pinning
    # overrides it), the second is read by cuBLAS/cuDNN themselves ("0" forbids TF32).
    for name in ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE"):
        out[f"env.{name}"] = os.environ.get(name)
    return out


def cublas_may_use_tf32() -> bool:
    """Whether float32 cuBLAS matmuls may run in TF32 under the current settings."""
    if _has_fp32_precision_api():
        # Resolve as ATen does: the op's node, then "cuda / all", then "generic".
        b = torch.backends
        for value in (b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision, b.fp32_precision):
            if value != "none":
                return value == "tf32"
        return False
    return bool(torch.backends.cuda.matmul.allow_tf32)


def pick_device(requested: str) -> tuple[torch.device, str | None]:
    """Return (device, note on a fallback or None); raise DeviceUnavailable for 'gpu' without one."""
    if requested == "cpu":
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda:0"), None
    why = ("this torch build has no CUDA support" if torch.version.cuda is None
           else "torch sees no CUDA GPU")
    if requested == "gpu":
        raise DeviceUnavailable(f"device 'gpu' was requested but {why} (torch {torch.__version__}).")
    return torch.device("cpu"), f"no GPU visible to torch ({why}); ran on the CPU"
