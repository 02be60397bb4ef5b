"""PyTorch backend: the MLP as an ``nn.Module``, each method in torch's own idiom.

Imported only inside a worker process (see ``gradparity.backends.worker``),
so importing torch at the top is intended. Parameters arrive canonical
(kernels ``(in, out)``); ``nn.Linear.weight`` is ``(out, in)``, so kernels
are transposed on the way in and their gradients on the way out.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from gradparity.backends.protocol import CaseInputs, DeviceUnavailable, RawResult, WorkerJob

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity}

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


class MLP(nn.Module):
    """``layers`` (nn.Linear), a BatchNorm1d (``norms``, when ``eps`` is given) before every hidden
    activation; ``forward(x, masks)`` multiplies hidden activation i by ``masks[i]`` (the switch
    'dropout' with core's masks: torch's own generator could not be compared with other frameworks').

    A fresh module is in training mode, so the normalizations use the batch's statistics.
    """

    def __init__(self, sizes, activation: str, eps: float | None, dtype, device):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=dtype, device=device)
                                    for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = None if eps is None else nn.ModuleList(
            nn.BatchNorm1d(width, eps=eps, dtype=dtype, device=device) for width in sizes[1:-1])
        self.activation = _ACTIVATIONS[activation]()

    def forward(self, x, masks=None):
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = self.activation(x)
                if masks is not None:
                    x = x * masks[i]
        return x


def torch_name(canonical: str) -> str:
    """The module's parameter name for a canonical one (kernels are Linear weights, scales BatchNorm weights)."""
    group, index, leaf = canonical.split(".")
    return f"{group}.{index}.{ {'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf) }"


def build_model(job: WorkerJob, dtype: torch.dtype, device: torch.device) -> MLP:
    """The job's MLP in ``dtype`` on ``device``, holding the canonical ``job.params`` (a fresh module each call,
    in training mode)."""
    model = MLP(job.model["sizes"], job.model["activation"], job.batchnorm_epsilon, dtype, device)
    torch_params = dict(model.named_parameters())
    if sorted(map(torch_name, job.params)) != sorted(torch_params):
        raise ValueError(f"model parameters {sorted(torch_params)} do not match the job's {sorted(job.params)}")
    with torch.no_grad():  # overwrite torch's random init with the canonical values
        for name, value in job.params.items():
            torch_params[torch_name(name)].copy_(torch.from_numpy(value.T if name.endswith(".kernel") else value))
    return model


def to_canonical(name: str, tensor: torch.Tensor) -> np.ndarray:
    """A parameter (or its gradient) of canonical ``name`` as numpy in the canonical layout (kernels
    transposed). On the CPU a non-kernel array shares memory with the tensor: copy it to keep it."""
    a = tensor.detach().cpu().numpy()
    return np.ascontiguousarray(a.T) if name.endswith(".kernel") else a


def mlp_environment(job: WorkerJob, model: MLP, device: torch.device, device_note: str | None) -> dict:
    """The environment of a job computed by the built-in ``model`` on ``device`` (``Session.environment``)."""
    dtype = model.layers[0].weight.dtype
    on_gpu = device.type == "cuda"
    if on_gpu:
        index = device.index or 0
        label = f"{device} ({torch.cuda.get_device_name(index)})"
        capability = torch.cuda.get_device_capability(index)
    else:
        label, capability = "cpu", (0, 0)
    return {
        "framework": "torch",
        "versions": {"torch": torch.__version__},
        "device": label,
        "device_kind": "gpu" if on_gpu else "cpu",
        "device_note": device_note,
        # Under autocast the matmuls run in the narrower format: the arithmetic that bounds rounding.
        "dtype": job.autocast or str(dtype).removeprefix("torch."),
        "autocast": job.autocast,
        "precision": read_precision(job.precision),
        # An MLP runs only cuBLAS matmuls, so cuDNN's (default-on) TF32 flag cannot apply here.
        "tf32": on_gpu and capability >= (8, 0) and dtype == torch.float32
        and cublas_may_use_tf32(),
    }


class TorchSession:
    """The model on its device with the canonical parameters loaded; computes every method."""

    def __init__(self, job: WorkerJob):
        if job.model.get("kind") != "mlp":
            raise ValueError(f"torch backend has no model kind {job.model.get('kind')!r}")
        if job.loss["name"] != "cross_entropy":
            raise ValueError(f"torch backend has no loss {job.loss['name']!r}")
        self.job = job
        self.device, self.device_note = pick_device(job.device)
        if job.precision == "highest":
            pin_highest_precision()
        dtype = {"float32": torch.float32, "float64": torch.float64}[job.dtype]

        self.model = build_model(job, dtype, self.device)
        masks = [job.dropout_masks(forward) for forward in ("batch", "single")]
        self.batch_masks, self.single_masks = [
            None if m is None else [torch.from_numpy(a).to(self.device, dtype) for a in m] for m in masks]
        self.x = torch.from_numpy(job.batch["x"]).to(self.device, dtype)
        # With the switch 'padding' some targets are IGNORE_INDEX (-100), CrossEntropyLoss's default ignore_index.
        self.y = torch.from_numpy(job.targets()).to(self.device, torch.int64)
        self._inputs = CaseInputs(job, (self.x, self.y), lambda x, y: (
            torch.from_numpy(x).to(self.device, dtype), torch.from_numpy(y).to(self.device, torch.int64)))
        # The switch 'class_weights': CrossEntropyLoss(weight=w), torch's own weighted reductions.
        weights = job.class_weights
        self.class_weight = None if weights is None else torch.from_numpy(weights).to(self.device, dtype)

    def environment(self) -> dict:
        return mlp_environment(self.job, self.model, self.device, self.device_note)

    def _grads(self, per_name: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        """Canonical numpy gradients, from ``.grad`` or from a dict keyed like named_parameters()."""
        params = dict(self.model.named_parameters())
        return {name: to_canonical(name, params[torch_name(name)].grad if per_name is None
                                   else per_name[torch_name(name)]) for name in self.job.params}

    def _read_unzeroed(self, read: dict | None) -> dict:
        """The switch 'unzeroed_gradients': add what .grad holds now (examples 0..i) to what was read."""
        now = self._grads()  # on the CPU, a bias's array shares memory with .grad, which backward updates
        return {k: v.copy() for k, v in now.items()} if read is None else {k: read[k] + now[k] for k in now}

    def compute(self, method: str) -> RawResult:
        """Run ``method`` ('METHOD' or 'METHOD@PART') from scratch; its native (unnormalized) loss and
        gradients. With the switch 'autocast' the whole method runs under ``torch.autocast``."""
        if self.job.autocast is None:
            return self._compute(method)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[self.job.autocast]
        with torch.autocast(self.device.type, dtype=dtype):
            return self._compute(method)

    def _compute(self, method: str) -> RawResult:
        for p in self.model.parameters():
            p.grad = None  # nothing accumulated by an earlier call may leak into this one
        case = method
        method, x, y = self._inputs(case)
        # Dropout masks exist for the batch only (core refuses dropout together with parts).
        batch_masks, single_masks = (self.batch_masks, self.single_masks) if x is self.x else (None, None)

        def model(inputs, masks=batch_masks):
            return self.model(inputs, masks)

        if method == "none_loop":
            losses = nn.CrossEntropyLoss(weight=self.class_weight, reduction="none")(model(x), y)
            read = None
            for i in range(len(y)):
                losses[i].backward(retain_graph=True)  # .grad accumulates across examples
                if self.job.unzeroed:
                    # The seed's bug: .grad read after every example and never zeroed.
                    read = self._read_unzeroed(read)
            return RawResult(losses.detach().sum().item(), read if self.job.unzeroed else self._grads())
        if method == "none_vectorized":
            params = {k: v.detach() for k, v in self.model.named_parameters()}
            loss_fn = nn.CrossEntropyLoss(weight=self.class_weight, reduction="sum")

            def example_loss(p, xi, yi, mi):
                # vmap strips the example axis; the model sees a batch of one (and its own mask row).
                masks = None if mi is None else [m.unsqueeze(0) for m in mi]
                return loss_fn(functional_call(self.model, p, (xi.unsqueeze(0), masks)), yi.unsqueeze(0))

            mask_dim = None if single_masks is None else 0  # vmap maps tensors only, not a None
            try:
                grads, losses = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0, mask_dim))(
                    params, x, y, single_masks)
            except RuntimeError as exc:
                if self.model.norms is None:
                    raise
                raise RuntimeError(
                    "torch refuses per-example gradients through BatchNorm1d in training mode: under "
                    "torch.func the layer's in-place update of its running statistics is an error, and "
                    "without them (torch.func.replace_all_batch_norm_modules_) each vmapped example is a "
                    "batch of one, which training mode refuses as in one_by_one") from exc
            summed = {k: g.sum(dim=0) for k, g in grads.items()}
            return RawResult(losses.sum().item(), self._grads(summed))
        if method in ("sum", "mean"):
            loss = nn.CrossEntropyLoss(weight=self.class_weight, reduction=method)(model(x), y)
            loss.backward()
            return RawResult(loss.item(), self._grads())
        if method == "one_by_one":
            loss_fn = nn.CrossEntropyLoss(weight=self.class_weight, reduction="mean")
            total = torch.zeros((), dtype=x.dtype, device=x.device)
            read = None
            for i in self.job.fed_alone(case):  # padding is not fed: its mean would be 0/0
                loss = loss_fn(model(x[i:i + 1], None if single_masks is None else
                                     [m[i:i + 1] for m in single_masks]), y[i:i + 1])
                loss.backward()
                total += loss.detach()  # on the device: no host sync per example
                if self.job.unzeroed:
                    read = self._read_unzeroed(read)
            return RawResult(total.item(), read if self.job.unzeroed else self._grads())
        raise ValueError(f"unknown method {method!r}")


def open_session(job: WorkerJob) -> TorchSession:
    """Pick the device, pin precision, build the model; may raise DeviceUnavailable."""
    return TorchSession(job)
