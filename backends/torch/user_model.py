"""PyTorch backend for a user's own ``nn.Module`` (task 'model_check'; contract in ``protocol``).

Imported only inside a worker process. The factory's module is moved to the
job's dtype and device; parameters travel in the canonical layout
(``nn.Linear.weight`` is (out, in), canonical kernels (in, out); conv weights
(O, I, *k) become (*k, I, O); normalization weights are "scale"), and image
data and activations channels-last: torch's (N, C, H, W) is transposed on the
way in and out.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradparity.backends.protocol import (RawResult, WorkerJob, assignment, gelu_accuracy, layer_options, load_factory,
                                         ModelTraining, train_result)
from gradparity.backends.torch.session import cublas_may_use_tf32, pick_device, pin_highest_precision, read_precision

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
#: Modules whose activations are channels-first (N, C, ...): transposed to channels-last when captured.
_CHANNELS_FIRST = (*_CONV, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.MaxPool1d, nn.MaxPool2d,
                   nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Dropout2d, nn.Dropout3d)


def _role(module: nn.Module, pname: str) -> str:
    """The canonical role of ``module``'s own parameter or buffer ``pname``."""
    if pname == "bias":
        return "bias"
    if isinstance(module, (nn.Linear, *_CONV)) and pname == "weight":
        return "kernel"
    if isinstance(module, nn.Embedding) and pname == "weight":
        return "embedding"
    if isinstance(module, _NORMS) and pname == "weight":
        return "scale"
    if pname == "running_mean":
        return "mean"
    if pname == "running_var":
        return "var"
    return "other"


def to_canonical(module: nn.Module, pname: str, value: np.ndarray) -> np.ndarray:
    """Torch layout -> canonical layout (Linear/conv kernels transposed, everything else as is)."""
    if _role(module, pname) != "kernel":
        return value
    if isinstance(module, nn.Linear):
        return np.ascontiguousarray(value.T)
    return np.ascontiguousarray(np.transpose(value, (*range(2, value.ndim), 1, 0)))  # (O,I,*k) -> (*k,I,O)


def from_canonical(module: nn.Module, pname: str, value: np.ndarray) -> np.ndarray:
    """Canonical layout -> torch layout (the inverse of ``to_canonical``)."""
    if _role(module, pname) != "kernel":
        return value
    if isinstance(module, nn.Linear):
        return np.ascontiguousarray(value.T)
    k = value.ndim - 2
    return np.ascontiguousarray(np.transpose(value, (k + 1, k, *range(k))))  # (*k,I,O) -> (O,I,*k)


def _channels_last(module: nn.Module, t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    if isinstance(module, _CHANNELS_FIRST) and a.ndim >= 3:
        a = np.moveaxis(a, 1, -1)
    return np.ascontiguousarray(a)


def _owned(module: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, trainable) of the module's own parameters and floating buffers (not its children's)."""
    out = [(n, p, True) for n, p in module.named_parameters(recurse=False)]
    out += [(n, b, False) for n, b in module.named_buffers(recurse=False)
            if b is not None and b.is_floating_point()]
    return out


class UserTorchModel:
    """The user's module on the job's device and dtype; answers every model_check case."""

    def __init__(self, job: WorkerJob):
        self.job = job
        self.device, self.device_note = pick_device(job.device)
        if job.precision == "highest":
            pin_highest_precision()
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[job.dtype]
        factory = load_factory(job)
        model = factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the torch factory {job.payload['factory']} returned {type(model).__name__}, "
                            "not a torch.nn.Module")
        self.model = model.to(self.device, self.dtype)
        self.model.train(job.payload.get("mode") == "training")
        x = job.batch["x"]
        if x.ndim == 4:  # canonical images are (N, H, W, C); torch convolutions take (N, C, H, W)
            x = np.transpose(x, (0, 3, 1, 2))
        self.x = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if self.x.is_floating_point():
            self.x = self.x.to(self.dtype)
        y = torch.from_numpy(job.batch["y"]).to(self.device)
        self.y = y.to(self.dtype) if job.payload["loss"] == "mse" else y.to(torch.int64)
        # Named as in calls and layers: the root module (which may own parameters) by its class name.
        self.modules = {name or type(m).__name__: m for name, m in self.model.named_modules()}
        self.owners = {f"{mn}.{pn}" if m is not self.model else pn: (m, pn, t, tr)
                       for mn, m in self.modules.items() for pn, t, tr in _owned(m)}
        self.assign = assignment(job)
        if self.assign is not None:
            self._load(self.assign)

    def _load(self, assign: dict[str, str]) -> None:
        """Overwrite the module's values with the canonical arrays core mapped onto them."""
        with torch.no_grad():
            for native, key in assign.items():
                module, pname, tensor, _ = self.owners[native]
                value = from_canonical(module, pname, self.job.params[key])
                if tuple(value.shape) != tuple(tensor.shape):
                    raise ValueError(f"{native}: mapped value has shape {value.shape}, the module's is "
                                     f"{tuple(tensor.shape)}")
                tensor.copy_(torch.from_numpy(value))

    def environment(self) -> dict:
        on_gpu = self.device.type == "cuda"
        capability = torch.cuda.get_device_capability(self.device.index or 0) if on_gpu else (0, 0)
        return {
            "framework": "torch",
            "versions": {"torch": torch.__version__},
            "device": f"{self.device} ({torch.cuda.get_device_name(self.device.index or 0)})" if on_gpu else "cpu",
            "device_kind": "gpu" if on_gpu else "cpu",
            "device_note": self.device_note,
            "dtype": self.job.dtype,
            "precision": read_precision(self.job.precision),
            # A user's model may run convolutions, whose cuDNN TF32 flag is on by default; pinning turns it off.
            "tf32": on_gpu and capability >= (8, 0) and self.dtype == torch.float32
            and (self.job.precision != "highest" or cublas_may_use_tf32()),
            "mode": self.job.payload.get("mode", "inference"),
            "layer_options": layer_options(self.job),
            "gelu_accuracy": gelu_accuracy(self.job, lambda x, approx: F.gelu(
                torch.from_numpy(x).to(self.device), approximate="tanh" if approx else "none").cpu().numpy()),
        }

    # -- the loss, natively ------------------------------------------------------------------------

    def _loss(self, out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
        """The configured loss with torch's own reduction ('mean', 'sum' or 'none' per element)."""
        if self.job.payload["loss"] == "mse":
            return F.mse_loss(out, y, reduction=reduction)
        c = out.shape[-1]
        losses = F.cross_entropy(out.reshape(-1, c), y.reshape(-1), reduction=reduction)
        return losses.reshape(y.shape) if reduction == "none" else losses

    def _grads(self) -> dict[str, np.ndarray]:
        """Canonical gradients of the mapped trainable parameters, keyed as core keyed their values."""
        out = {}
        for native, key in self.assign.items():
            module, pname, tensor, trainable = self.owners[native]
            if trainable:
                g = torch.zeros_like(tensor) if tensor.grad is None else tensor.grad
                out[key] = to_canonical(module, pname, g.detach().cpu().numpy())
        return out

    # -- the cases ----------------------------------------------------------------------------------

    def compute(self, case: str) -> RawResult:
        """Run one case from scratch (gradients zeroed first)."""
        self.model.zero_grad(set_to_none=True)
        if case == "describe":
            return self._describe()
        if case == "forward":
            return self._forward()
        x, y = self.x, self.y
        if case in ("mean", "sum"):
            loss = self._loss(self.model(x), y, case)
            loss.backward()
            return RawResult(loss.item(), self._grads())
        if case == "none_loop":
            losses = self._loss(self.model(x), y, "none")
            per_example = losses.reshape(len(y), -1).sum(dim=1)
            for i in range(len(y)):
                per_example[i].backward(retain_graph=True)  # .grad accumulates the sum
            return RawResult(per_example.detach().sum().item(), self._grads())
        if case == "one_by_one":
            total = 0.0
            for i in range(len(y)):
                loss = self._loss(self.model(x[i:i + 1]), y[i:i + 1], "mean")
                loss.backward()
                total += loss.item()
            return RawResult(total, self._grads())
        raise ValueError(f"unknown case {case!r}")

    def _trace(self, capture: bool):
        """Forward the batch with hooks on every module; returns (logits, calls, records)."""
        calls: list[tuple[str, str]] = []
        records: dict[str, dict] = {}
        names = {id(m): n for n, m in self.modules.items()}
        handles = []

        def hook(module, args, output):
            name = names[id(module)]
            leaf = not any(True for _ in module.children())
            if leaf or _owned(module):
                calls.append((name, type(module).__name__))
            if _owned(module) and name not in records:
                rec = {"input": args[0] if args and torch.is_tensor(args[0]) else None,
                       "output": output if torch.is_tensor(output) else None}
                if capture and rec["output"] is not None and rec["output"].requires_grad:
                    rec["output"].retain_grad()
                records[name] = rec

        for m in self.modules.values():
            if m is not self.model or _owned(m):
                handles.append(m.register_forward_hook(hook))
        try:
            out = self.model(self.x)
        finally:
            for h in handles:
                h.remove()
        return out, calls, records

    def _describe(self) -> RawResult:
        with torch.no_grad():
            out, calls, records = self._trace(capture=False)
        order = list(records) + [n for n, m in self.modules.items() if _owned(m) and n not in records]
        layers, values = [], {}
        for name in order:
            module = self.modules[name]
            params = []
            for pname, tensor, trainable in _owned(module):
                native = f"{name}.{pname}" if module is not self.model else pname
                canonical = to_canonical(module, pname, tensor.detach().cpu().numpy())
                values[native] = canonical
                params.append({"name": native, "role": _role(module, pname), "shape": list(canonical.shape),
                               "trainable": trainable})
            layers.append({"name": name, "type": type(module).__name__,
                           "called": name in records, "fused_activation": False, "params": params})
        info = {"layers": layers, "calls": [list(c) for c in calls], "output_shape": list(out.shape)}
        return RawResult(float("nan"), values, info)  # no loss: core checks the targets against the output first

    def _forward(self) -> RawResult:
        out, _, records = self._trace(capture=True)
        loss = self._loss(out, self.y, "mean")
        loss.backward()
        arrays = {"logits": out.detach().cpu().numpy()}
        for k, name in enumerate(records):
            module, rec = self.modules[name], records[name]
            if rec["input"] is not None:
                arrays[f"input/{k}"] = _channels_last(module, rec["input"])
            if rec["output"] is not None:
                arrays[f"output/{k}"] = _channels_last(module, rec["output"])
                if rec["output"].grad is not None:
                    arrays[f"grad_output/{k}"] = _channels_last(module, rec["output"].grad)
        return RawResult(loss.item(), arrays, {"layers": list(records)})


class TorchModelTraining(ModelTraining):
    """Task "model_train" for a built-in model or a user's (its factory, its mapping): the module of
    ``UserTorchModel`` trained with torch's own optimizer, as ``train.py`` trains the MLP.

    The session is opened on batch 1 (what ``environment()`` reports on); every batch is converted once.
    Each ``compute(case)`` loads the canonical start again and builds a fresh optimizer over the mapped
    trainable parameters, then for t = 1..K: ``zero_grad()``, the loss's native reduction (``mean`` over every
    loss term, N·T for token targets, or ``sum``), ``backward()``, the lr of step t, ``step()``. It returns the
    canonical parameters after the recorded steps ("T/KEY") and every step's loss ("loss/T").
    """

    def __init__(self, job: WorkerJob):
        super().__init__(job, UserTorchModel)

    def convert(self, x, y):
        """(x, y) as tensors on the device: images channels-first, targets int64 (the job's dtype for mse)."""
        m = self.model
        x = np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(m.device)
        yt = torch.from_numpy(np.asarray(y)).to(m.device)
        return (xt.to(m.dtype) if xt.is_floating_point() else xt,
                yt.to(m.dtype) if self.job.payload["loss"] == "mse" else yt.to(torch.int64))

    def compute(self, case: str) -> RawResult:
        from gradparity.backends.torch.optimizers import build_optimizer, environment_note

        m = self.model
        batches, config, lrs, reduction, record = self.settings(case)
        m._load(m.assign)  # from scratch: the canonical start again
        trainable = [(key, *m.owners[native][:3]) for native, key in m.assign.items() if m.owners[native][3]]
        optimizer = build_optimizer(config, [tensor for *_, tensor in trainable])
        (group,) = optimizer.param_groups
        losses, snapshots = [], []
        for t, ((x, y), lr) in enumerate(zip(batches, lrs), start=1):
            optimizer.zero_grad()
            loss = m._loss(m.model(x), y, reduction)
            loss.backward()
            group["lr"] = float(lr)
            optimizer.step()
            losses.append(loss.detach())
            if t in record:
                snapshots.append((t, [(key, module, pname, tensor.detach().clone())
                                      for key, module, pname, tensor in trainable]))
        arrays = {f"{t}/{key}": np.array(to_canonical(module, pname, value.cpu().numpy()), copy=True)
                  for t, snap in snapshots for key, module, pname, value in snap}
        return train_result(self.job, arrays, [float(v) for v in torch.stack(losses).cpu().numpy()],
                            {"optimizer": environment_note(config),
                                              "loop": "optimizer.zero_grad(); loss = F.cross_entropy(model(x_t)"
                                                      ".reshape(-1, C), y_t.reshape(-1), reduction=REDUCTION); "
                                                      "loss.backward(); optimizer.step()"})


def open_session(job: WorkerJob) -> UserTorchModel | TorchModelTraining:
    """Import the user's factory (or build the built-in model), on the job's device and dtype, load mapped
    weights; task "model_train" trains it (``TorchModelTraining``)."""
    return TorchModelTraining(job) if job.task == "model_train" else UserTorchModel(job)
