"""PyTorch: the worker half of the losses (task "loss_functions"): run rendered loss functions natively and
return d loss / d logits. The parent half (read a ``torch.nn`` loss text, render any loss as torch code) is
``loss_text``. Imported only inside a worker process; torch is imported when the session opens.
"""
from __future__ import annotations


class TorchLossSession:
    """Runs rendered loss functions on the job's batches; d loss / d logits by autograd, from scratch."""

    def __init__(self, job):
        import torch

        from gradparity.backends.torch import device as gradient_session

        if job.task != "loss_functions":
            raise ValueError(f"the torch loss session runs 'loss_functions' jobs, got task {job.task!r}")
        self.torch = torch
        self.helpers = gradient_session
        self.job = job
        self.device, self.device_note = gradient_session.pick_device(job.device)
        if job.precision == "highest":
            gradient_session.pin_highest_precision()
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[job.dtype]
        self._functions: dict[str, object] = {}

    def environment(self) -> dict:
        torch = self.torch
        on_gpu = self.device.type == "cuda"
        device = f"{self.device} ({torch.cuda.get_device_name(self.device.index or 0)})" if on_gpu else "cpu"
        return {
            "framework": "torch",
            "versions": {"torch": torch.__version__},
            "device": device,
            "device_kind": "gpu" if on_gpu else "cpu",
            "device_note": self.device_note,
            "dtype": str(self.dtype).removeprefix("torch."),
            "precision": self.helpers.read_precision(self.job.precision),
            # Loss functions run element-wise ops and reductions, no matmul or convolution: TF32 cannot apply.
            "tf32": False,
        }

    def _function(self, source: str):
        from gradparity.backends.protocol import compile_loss_function

        if source not in self._functions:  # compiled once per source, reused by every batch and timing call
            self._functions[source] = compile_loss_function(source)
        return self._functions[source]

    def compute(self, case: str):
        """Run case 'FUNCTION@BATCH' on a fresh leaf tensor; its loss and d loss / d logits."""
        from gradparity.backends.protocol import RawResult, loss_case

        torch = self.torch
        source, logits, targets, sample_weight = loss_case(self.job, case)
        loss_fn = self._function(source)
        z = torch.tensor(logits, dtype=self.dtype, device=self.device, requires_grad=True)
        if targets.dtype.kind in "iu":
            t = torch.as_tensor(targets, dtype=torch.int64, device=self.device)
        else:
            t = torch.as_tensor(targets, dtype=self.dtype, device=self.device)
        s = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=self.dtype, device=self.device)
        loss = loss_fn(z, t, s)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise ValueError(f"loss_fn must return a 0-d tensor, got {type(loss).__name__} "
                             f"{tuple(getattr(loss, 'shape', ()))}")
        if loss.requires_grad:
            loss.backward()
        grad = z.grad if z.grad is not None else torch.zeros_like(z)  # a loss that ignores the logits
        return RawResult(float(loss.item()), {"logits": grad.detach().cpu().numpy()})


def open_session(job) -> TorchLossSession:
    """Import torch, pick the device (CPU unless the job asks), pin precision; may raise DeviceUnavailable."""
    return TorchLossSession(job)
