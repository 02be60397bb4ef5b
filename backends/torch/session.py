"""PyTorch: the one model session (tasks "gradients" and "model_check"; contract in ``protocol``).

Every model runs here: a built-in one (payload "builtin": the MLP, the CNN, the sequence model, built by
``models.build``) or a user's own ``nn.Module`` (payload "factory"). The module is moved to the job's dtype and
device and put in the payload's mode (training: batch normalization on the batch's statistics); parameters
travel in the canonical layout (``nn.Linear.weight`` is (out, in), canonical kernels (in, out); conv weights
(O, I, *k) become (*k, I, O); normalization weights are "scale"), and image data and activations
channels-last: torch's (N, C, H, W) is transposed on the way in and out.

A user's model may take named inputs (payload "inputs": ``model(**{arg: tensor})``, ``call_inputs``) and return
a tuple, dict or Hugging Face ``ModelOutput`` (the loss reads ``select_output``'s tensor); Hugging Face's
``Conv1D`` is a Dense layer whose ``weight`` is already (in, out). A tensor reachable under several names (tied
weights: GPT-2's ``lm_head.weight is transformer.wte.weight``) is one parameter, named by its first name in
``named_modules`` order, the others its aliases; buffers outside the state dict (``persistent=False``: GPT-2's
causal mask and ``masked_bias``) and non-floating buffers are not state. With no ``job.params`` (weights "own")
nothing is loaded: the model keeps its factory's weights.

Cases: "describe" and "forward" (a user's model: its layers, and the localization arrays), and every method of
``SESSION_METHODS`` in torch's own idiom, on the batch or, as "METHOD@PART", on a part:

- ``mean`` / ``sum``: the loss with torch's reduction (``F.cross_entropy(reduction=...)``: the mean over every
  loss term, N·T for token targets), one ``backward()``;
- ``none_loop``: ``reduction="none"``, each example's summed terms ``backward(retain_graph=True)`` in turn
  (``.grad`` accumulates the sum);
- ``none_vectorized``: ``torch.func.vmap(grad_and_value(...))`` of one example's summed loss, summed over N;
- ``one_by_one``: each example alone, its mean loss, ``backward()`` (``.grad`` accumulates).

The discrepancy switches, natively: 'unzeroed_gradients' (the loops read the never-zeroed ``.grad`` after every
example), 'class_weights' (``F.cross_entropy(weight=w)``, torch's own weighted reductions), 'padding' (targets
``IGNORE_INDEX``, cross-entropy's default ``ignore_index``; one_by_one feeds the valid examples only),
'autocast' (the case under ``torch.autocast``), 'dropout' (the MLP's explicit masks) and batch normalization in
training mode (the MLP with ``model["batchnorm"]``).

Imported only inside a worker process, so importing torch at the top is intended.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from gradparity.backends.protocol import (MODEL_CASES, SESSION_METHODS, CaseInputs, RawResult, WorkerJob, assignment,
                                         call_inputs, check_switches, first_forward, gelu_accuracy, layer_options,
                                         load_factory, select_output)
from gradparity.backends.torch.device import cublas_may_use_tf32, pick_device, pin_highest_precision, read_precision
from gradparity.backends.torch.optimizers import TORCH_DTYPES

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
#: Modules whose activations are channels-first (N, C, ...): transposed to channels-last when captured.
_CHANNELS_FIRST = (*_CONV, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.MaxPool1d, nn.MaxPool2d,
                   nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Dropout2d, nn.Dropout3d)
#: Modules computed by cuDNN on a GPU, whose TF32 switch is on by default (unlike cuBLAS's).
_CUDNN = (*_CONV, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.RNNBase)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's Dense layer), whose
    ``weight`` is stored (nx, nf) = (in, out): the canonical kernel already. Recognized by name, so that
    transformers need not be imported; the shape check guards against another class of that name."""
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers"
            and torch.is_tensor(weight) and tuple(weight.shape) == (getattr(module, "nx", None),
                                                                     getattr(module, "nf", None)))


def _role(module: nn.Module, pname: str) -> str:
    """The canonical role of ``module``'s own parameter or buffer ``pname``."""
    if pname == "bias":
        return "bias"
    if isinstance(module, (nn.Linear, *_CONV)) and pname == "weight":
        return "kernel"
    if pname == "weight" and _hf_conv1d(module):
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
    """Torch layout -> canonical layout (Linear/conv kernels transposed, everything else as is; Hugging Face's
    Conv1D weight is (in, out) already)."""
    if _role(module, pname) != "kernel" or _hf_conv1d(module):
        return value
    if isinstance(module, nn.Linear):
        return np.ascontiguousarray(value.T)
    return np.ascontiguousarray(np.transpose(value, (*range(2, value.ndim), 1, 0)))  # (O,I,*k) -> (*k,I,O)


def from_canonical(module: nn.Module, pname: str, value: np.ndarray) -> np.ndarray:
    """Canonical layout -> torch layout (the inverse of ``to_canonical``)."""
    if _role(module, pname) != "kernel" or _hf_conv1d(module):
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
    """(name, tensor, trainable) of the module's own parameters and floating buffers of its state dict (not its
    children's). A buffer registered ``persistent=False`` (a constant mask, ``masked_bias``) is not state."""
    out = [(n, p, True) for n, p in module.named_parameters(recurse=False)]
    constant = getattr(module, "_non_persistent_buffers_set", ())
    out += [(n, b, False) for n, b in module.named_buffers(recurse=False)
            if b is not None and b.is_floating_point() and n not in constant]
    return out


def _own_tensors(modules: dict[str, nn.Module], root: nn.Module):
    """({module name: its own (name, tensor, trainable) not seen under an earlier name}, {first native name:
    [alias names]}): a tensor reachable under several names (tied weights) belongs to the first module that
    holds it, in ``named_modules`` order (the order ``named_parameters`` keeps it by)."""
    owned: dict[str, list] = {}
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for mn, m in modules.items():
        mine = []
        for pn, t, tr in _owned(m):
            native = f"{mn}.{pn}" if m is not root else pn
            if id(t) in first:
                aliases.setdefault(first[id(t)], []).append(native)
            else:
                first[id(t)] = native
                mine.append((pn, t, tr))
        owned[mn] = mine
    return owned, aliases


def _to_tensors(x, y, device, dtype, loss_name):
    """``ModelSession.convert``'s conversion."""
    yt = torch.from_numpy(np.asarray(y)).to(device)
    yt = yt.to(dtype) if loss_name == "mse" else yt.to(torch.int64)
    if isinstance(x, dict):
        named = {}
        for arg, a in x.items():
            t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
            named[arg] = t.to(dtype) if t.is_floating_point() else (t.to(torch.int64) if a.dtype.kind in "iu" else t)
        return named, yt
    x = np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x  # canonical (N, H, W, C); torch convs (N, C, H, W)
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return xt.to(dtype) if xt.is_floating_point() else xt, yt


class ModelSession:
    """The job's model (built-in or a user's) on its device and dtype, the canonical weights loaded; answers
    every case (``compute``). Also the model of the trainer (``train.py``)."""

    def __init__(self, job: WorkerJob):
        self.job = job
        self.builtin = "builtin" in job.payload
        self.loss_name = job.payload.get("loss", "cross_entropy")
        check_switches(job)
        self.device, self.device_note = pick_device(job.device)
        if job.precision == "highest":
            pin_highest_precision()
        self.dtype = TORCH_DTYPES[job.dtype]
        factory = load_factory(job)
        model = factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the torch factory {job.payload.get('factory')} returned {type(model).__name__}, "
                            "not a torch.nn.Module")
        self.model = model.to(self.device, self.dtype)
        self.model.train(job.payload.get("mode") == "training")
        # Named as in calls and layers: the root module (which may own parameters) by its class name.
        self.modules = {name or type(m).__name__: m for name, m in self.model.named_modules()}
        # Tied weights: each tensor once, under its first name; the other names resolve to it.
        self.owned, self.aliases = _own_tensors(self.modules, self.model)
        self.owners = {f"{mn}.{pn}" if self.modules[mn] is not self.model else pn: (self.modules[mn], pn, t, tr)
                       for mn, own in self.owned.items() for pn, t, tr in own}
        self.alias_of = {alias: native for native, names in self.aliases.items() for alias in names}
        self.assign = assignment(job)
        if self.builtin:
            trainable = sorted(name for name, (*_, tr) in self.owners.items() if tr)
            if sorted(self.assign) != trainable:
                raise ValueError(f"model parameters {trainable} do not match the built-in model's "
                                 f"{sorted(self.assign)}")
        if self.assign is not None and job.params:  # no params (weights "own"): the factory's weights stay
            self._load(self.assign)

        self.output_path = job.payload.get("output")
        named = call_inputs(job)
        self.x, self.y = self.convert(job.batch["x"] if named is None else named, job.targets())
        # Not the bound self.convert: a reference cycle would keep the model alive after the session until the
        # garbage collector runs (a served worker loads the next job's model meanwhile).
        self._inputs = CaseInputs(job, (self.x, self.y), functools.partial(
            _to_tensors, device=self.device, dtype=self.dtype, loss_name=self.loss_name))
        # The switch 'dropout' (the MLP's hidden layers): core's masks, the batch's and each example's own.
        masks = [job.dropout_masks(forward) for forward in ("batch", "single")]
        self.batch_masks, self.single_masks = [
            None if m is None else [torch.from_numpy(a).to(self.device, self.dtype) for a in m] for m in masks]
        # The switch 'class_weights': F.cross_entropy(weight=w), torch's own weighted reductions.
        weights = job.class_weights
        self.class_weight = None if weights is None else torch.from_numpy(weights).to(self.device, self.dtype)

    def convert(self, x: np.ndarray | dict[str, np.ndarray], y: np.ndarray):
        """(x, y) as tensors on the device: images channels-first, floating inputs in the job's dtype, targets
        int64 (the job's dtype for mse). Named inputs (``x`` a dict, ``call_inputs``): each array as is (no
        transpose: the model names what it takes), integer ones int64, floating ones in the job's dtype."""
        return _to_tensors(x, y, self.device, self.dtype, self.loss_name)

    def owner(self, native: str) -> tuple[nn.Module, str, torch.Tensor, bool]:
        """(module, torch name, tensor, trainable) of a native name, a tied weight's alias included."""
        return self.owners[self.alias_of.get(native, native)]

    def _load(self, assign: dict[str, str]) -> None:
        """Overwrite the module's values with the canonical arrays core mapped onto them."""
        with torch.no_grad():
            for native, key in assign.items():
                module, pname, tensor, _ = self.owner(native)
                value = from_canonical(module, pname, self.job.params[key])
                if tuple(value.shape) != tuple(tensor.shape):
                    raise ValueError(f"{native}: mapped value has shape {value.shape}, the module's is "
                                     f"{tuple(tensor.shape)}")
                tensor.copy_(torch.from_numpy(value))

    def trainable(self) -> list[tuple[str, nn.Module, str, torch.Tensor]]:
        """(canonical key, module, torch name, parameter) of every mapped trainable parameter, in the module's
        parameter order (what ``model.parameters()`` hands an optimizer)."""
        keys = {id(self.owner(native)[2]): (key, *self.owner(native)[:2])
                for native, key in self.assign.items() if self.owner(native)[3]}
        return [(*keys[id(p)], p) for p in self.model.parameters() if id(p) in keys]

    def environment(self) -> dict:
        on_gpu = self.device.type == "cuda"
        capability = torch.cuda.get_device_capability(self.device.index or 0) if on_gpu else (0, 0)
        # A user's model may run convolutions (cuDNN, whose TF32 flag is on by default; pinning turns it off),
        # also through torch.nn.functional; a built-in model without one (the MLP, the sequence model) runs
        # cuBLAS matmuls only, so cuDNN's flag cannot apply to it.
        cudnn = not self.builtin or any(isinstance(m, _CUDNN) for m in self.model.modules())
        return {
            "framework": "torch",
            "versions": {"torch": torch.__version__},
            "device": f"{self.device} ({torch.cuda.get_device_name(self.device.index or 0)})" if on_gpu else "cpu",
            "device_kind": "gpu" if on_gpu else "cpu",
            "device_note": self.device_note,
            # Under autocast the matmuls run in the narrower format: the arithmetic that bounds rounding.
            "dtype": self.job.autocast or self.job.dtype,
            "autocast": self.job.autocast,
            "precision": read_precision(self.job.precision),
            "tf32": on_gpu and capability >= (8, 0) and self.dtype == torch.float32
            and (cublas_may_use_tf32() or (cudnn and self.job.precision != "highest")),
            "mode": self.job.payload.get("mode", "inference"),
            # The MLP has none of the settings that differ between frameworks.
            "layer_options": None if self.job.payload.get("builtin", {}).get("kind") == "mlp"
            else layer_options(self.job),
            "gelu_accuracy": gelu_accuracy(self.job, lambda x, approx: F.gelu(
                torch.from_numpy(x).to(self.device), approximate="tanh" if approx else "none").cpu().numpy()),
        }

    # -- the loss, natively ------------------------------------------------------------------------

    def loss(self, out: torch.Tensor, y: torch.Tensor, reduction: str, weight=None) -> torch.Tensor:
        """The configured loss with torch's own reduction ('mean', 'sum' or 'none' per element, shaped as the
        targets); ``weight``: cross-entropy's per-class weights."""
        if self.loss_name == "mse":
            return F.mse_loss(out, y, reduction=reduction)
        c = out.shape[-1]
        losses = F.cross_entropy(out.reshape(-1, c), y.reshape(-1), weight=weight, reduction=reduction)
        return losses.reshape(y.shape) if reduction == "none" else losses

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor], masks=None) -> torch.Tensor:
        """The model on ``x`` (named inputs: as keyword arguments); with dropout masks (the MLP's), its hidden
        activations multiplied by them. The tensor the loss reads (``select_output``)."""
        return self._output(self._call(x, masks))

    def _call(self, x, masks=None):
        """What the model returns on ``x`` (a tensor, or a tuple, dict, ``ModelOutput``)."""
        if isinstance(x, dict):
            return self.model(**x)
        return self.model(x) if masks is None else self.model(x, masks)

    def _output(self, out) -> torch.Tensor:
        return select_output(out, self.output_path, torch.is_tensor)

    def _grads(self, per_tensor: dict[int, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        """Canonical gradients of the mapped trainable parameters, keyed as core keyed their values: from
        ``.grad`` or from ``per_tensor`` (keyed by the parameter's ``id``). On the CPU a non-kernel array
        shares memory with its tensor."""
        out = {}
        for native, key in self.assign.items():
            module, pname, tensor, trainable = self.owner(native)
            if trainable:
                g = tensor.grad if per_tensor is None else per_tensor.get(id(tensor))
                g = torch.zeros_like(tensor) if g is None else g
                out[key] = to_canonical(module, pname, g.detach().cpu().numpy())
        return out

    def _read_unzeroed(self, read: dict | None) -> dict:
        """The switch 'unzeroed_gradients': add what .grad holds now (examples 0..i) to what was read."""
        now = self._grads()  # on the CPU, a bias's array shares memory with .grad, which backward updates
        return {k: v.copy() for k, v in now.items()} if read is None else {k: read[k] + now[k] for k in now}

    # -- the cases ----------------------------------------------------------------------------------

    def compute(self, case: str) -> RawResult:
        """Run one case ('describe', 'forward', 'METHOD' or 'METHOD@PART') from scratch (gradients cleared
        first); a method's native (unnormalized) loss and gradients. With the switch 'autocast' the whole case
        runs under ``torch.autocast``."""
        if self.job.autocast is None:
            return self._compute(case)
        with torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.job.autocast]):
            return self._compute(case)

    def _compute(self, case: str) -> RawResult:
        self.model.zero_grad(set_to_none=True)  # nothing accumulated by an earlier call may leak into this one
        if case in MODEL_CASES:
            return self._describe() if case == "describe" else self._forward()
        if self.assign is None:
            raise ValueError(f"case {case!r} needs the mapped weights (payload 'assign')")
        method, x, y = self._inputs(case)
        # Dropout masks exist for the batch only (core refuses dropout together with parts).
        on_batch = not case.partition("@")[2]
        batch_masks, single_masks = (self.batch_masks, self.single_masks) if on_batch else (None, None)
        w = self.class_weight
        if method in ("mean", "sum"):
            loss = self.loss(self.forward(x, batch_masks), y, method, w)
            loss.backward()
            return RawResult(loss.item(), self._grads())
        if method == "none_loop":
            losses = self.loss(self.forward(x, batch_masks), y, "none", w)
            per_example = losses.reshape(len(y), -1).sum(dim=1)
            read = None
            for i in range(len(y)):
                per_example[i].backward(retain_graph=True)  # .grad accumulates across examples
                if self.job.unzeroed:
                    # The seed's bug: .grad read after every example and never zeroed.
                    read = self._read_unzeroed(read)
            return RawResult(per_example.detach().sum().item(), read if self.job.unzeroed else self._grads())
        if method == "none_vectorized":
            return self._vectorized(x, y, single_masks)
        if method == "one_by_one":
            total = torch.zeros((), dtype=self.dtype, device=self.device)
            read = None
            for i in self.job.fed_alone(case):  # padding is not fed: its mean would be 0/0
                masks = None if single_masks is None else [m[i:i + 1] for m in single_masks]
                xi = {k: v[i:i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i:i + 1]
                loss = self.loss(self.forward(xi, masks), y[i:i + 1], "mean", w)
                loss.backward()
                total += loss.detach()  # on the device: no host sync per example
                if self.job.unzeroed:
                    read = self._read_unzeroed(read)
            return RawResult(total.item(), read if self.job.unzeroed else self._grads())
        raise ValueError(f"unknown case {case!r}; the torch model session computes "
                         f"{', '.join((*MODEL_CASES, *SESSION_METHODS))}")

    def _vectorized(self, x, y, single_masks) -> RawResult:
        """none_vectorized: per-example gradients of each example's summed loss by ``torch.func.vmap``, summed.
        Named inputs are passed as keyword arguments, each mapped along axis 0, except one whose examples are all
        the same (an attention mask of ones): every example's row of it is that one row, passed unmapped, so
        the model sees a plain tensor it may branch on (transformers skips the causal mask when
        ``attention_mask.all()``, a Python branch vmap refuses on a mapped tensor). Tied weights are one entry of
        ``named_parameters``, tied again by ``functional_call``: their gradient sums both uses."""
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        w = self.class_weight
        if isinstance(x, dict):
            shared = {k: v[:1] for k, v in x.items() if bool((v == v[:1]).all())}
            order = list(x)
            x = {k: v for k, v in x.items() if k not in shared}

        def example_loss(p, xi, yi, mi):
            # vmap strips the example axis; the model sees a batch of one (and its own mask row).
            if isinstance(xi, dict):
                kwargs = {k: shared[k] if k in shared else xi[k].unsqueeze(0) for k in order}
                return self.loss(self._output(functional_call(self.model, p, (), kwargs)), yi.unsqueeze(0), "sum", w)
            masks = None if mi is None else [m.unsqueeze(0) for m in mi]
            args = (xi.unsqueeze(0),) if masks is None else (xi.unsqueeze(0), masks)
            return self.loss(self._output(functional_call(self.model, p, args)), yi.unsqueeze(0), "sum", w)

        mask_dim = None if single_masks is None else 0  # vmap maps tensors only, not a None
        try:
            grads, losses = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0, mask_dim))(
                params, x, y, single_masks)
        except RuntimeError as exc:
            why = self._vmap_refusal(exc)
            if why is None:
                raise
            raise RuntimeError(why) from exc
        tensors = dict(self.model.named_parameters())
        summed = {id(tensors[k]): g.sum(dim=0) for k, g in grads.items()}
        return RawResult(losses.sum().item(), self._grads(summed))

    def _vmap_refusal(self, exc: RuntimeError) -> str | None:
        """Why torch.func.vmap refused the model: a Python branch on a tensor's value, or in training mode batch
        normalization or dropout; None when unknown."""
        if "data-dependent control flow" in str(exc):
            varying = [k for k, v in self.x.items() if not bool((v == v[:1]).all())] if isinstance(self.x, dict) \
                else ["x"]
            return ("torch.func.vmap cannot map this model's forward pass: it branches in Python on the value of a "
                    f"tensor computed from the inputs that differ between examples ({', '.join(varying)}), or calls "
                    ".item() on one (vmap maps every example at once, so such a value has no single answer); "
                    "per-example gradients of this model need one forward pass per example (none_loop, one_by_one)")
        if not self.model.training:
            return None
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return (f"torch refuses per-example gradients through {type(m).__name__} in training mode: under "
                        "torch.func the layer's in-place update of its running statistics is an error, and "
                        "without them (torch.func.replace_all_batch_norm_modules_) each vmapped example is a "
                        "batch of one, which training mode refuses as in one_by_one")
        for m in self.model.modules():
            if isinstance(m, _DROPOUT) and m.p > 0:
                return (f"torch refuses none_vectorized through {type(m).__name__} in training mode: "
                        "torch.func.vmap raises on a random operation (randomness='error', its default), and a "
                        "mask drawn per vmapped example would not be the batch's; run it in inference mode")
        return None

    def _block_names(self) -> list[str]:
        """The containers whose outputs localization compares too (``ModelLayout.blocks``): modules with
        submodules that own no tensor themselves and hold a parameterized layer (a residual block), the root
        excepted, in ``named_modules`` order (the index of "block_output/B")."""
        owners = [n for n in self.modules if self.owned[n]]
        return [n for n, m in self.modules.items() if m is not self.model and not self.owned[n]
                and any(True for _ in m.children()) and any(o.startswith(n + ".") for o in owners)]

    def _trace(self, capture: bool):
        """Forward the batch with hooks on every module; returns (what the model returned, calls, records,
        blocks): ``blocks`` maps each block (``_block_names``) called to its first call's output tensor (None
        without capture, or when it returned no tensor)."""
        calls: list[tuple[str, str]] = []
        records: dict[str, dict] = {}
        blocks: dict[str, torch.Tensor | None] = {}
        block_names = set(self._block_names())
        names = {id(m): n for n, m in self.modules.items()}
        handles = []

        def hook(module, args, output):
            name = names[id(module)]
            leaf = not any(True for _ in module.children())
            owns = bool(self.owned[name])
            if name in block_names and name not in blocks:
                # A block returning a tuple (Hugging Face's layers: hidden states first) is compared on its first.
                first = output[0] if isinstance(output, (tuple, list)) and output else output
                blocks[name] = first.detach() if capture and torch.is_tensor(first) else None
            if leaf or owns:
                calls.append((name, type(module).__name__))
            if owns and name not in records:
                # Without capture (describe) only the order is needed: no activation is kept alive.
                rec = {"input": args[0] if capture and args and torch.is_tensor(args[0]) else None,
                       "output": output if capture and torch.is_tensor(output) else None}
                if capture and rec["output"] is not None and rec["output"].requires_grad:
                    rec["output"].retain_grad()
                records[name] = rec

        for name, m in self.modules.items():
            if m is not self.model or self.owned[name]:
                handles.append(m.register_forward_hook(hook))
        try:
            out = self._call(self.x)
        finally:
            for h in handles:
                h.remove()
        return out, calls, records, blocks

    def _describe(self) -> RawResult:
        with torch.no_grad():
            out, calls, records, called_blocks = first_forward(self.job, lambda: self._trace(capture=False))
            out = self._output(out)  # outside first_forward: a wrong output path is no misfit of the batch
        order = list(records) + [n for n in self.modules if self.owned[n] and n not in records]
        layers, values = [], {}
        for name in order:
            module = self.modules[name]
            params = []
            for pname, tensor, trainable in self.owned[name]:
                native = f"{name}.{pname}" if module is not self.model else pname
                canonical = to_canonical(module, pname, tensor.detach().cpu().numpy())
                values[native] = canonical
                params.append({"name": native, "role": _role(module, pname), "shape": list(canonical.shape),
                               "trainable": trainable})
                if native in self.aliases:
                    params[-1]["aliases"] = list(self.aliases[native])
            layers.append({"name": name, "type": type(module).__name__,
                           "called": name in records, "fused_activation": False, "params": params})
        index = {name: k for k, name in enumerate(order)}
        blocks = [{"name": b, "type": type(self.modules[b]).__name__, "called": b in called_blocks,
                   "layers": [index[n] for n in order if n.startswith(b + ".")],
                   "members": list(dict.fromkeys(n for n, _ in calls if n.startswith(b + ".")))}
                  for b in self._block_names()]
        info = {"layers": layers, "calls": [list(c) for c in calls], "output_shape": list(out.shape),
                "blocks": blocks}
        return RawResult(float("nan"), values, info)  # no loss: core checks the targets against the output first

    def _block_channels_last(self, name: str, t: torch.Tensor) -> np.ndarray:
        """A block's output, channels-last when the block holds a channels-first module (a convolution's block
        returns (N, C, ...))."""
        a = t.cpu().numpy()
        inner = [m for n, m in self.modules.items() if n.startswith(name + ".")]
        if a.ndim >= 3 and any(isinstance(m, _CHANNELS_FIRST) for m in inner):
            a = np.moveaxis(a, 1, -1)
        return np.ascontiguousarray(a)

    def _forward(self) -> RawResult:
        out, _, records, blocks = self._trace(capture=True)
        out = self._output(out)
        loss = self.loss(out, self.y, "mean")
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
        for b, name in enumerate(self._block_names()):
            if blocks.get(name) is not None:
                arrays[f"block_output/{b}"] = self._block_channels_last(name, blocks[name])
        return RawResult(loss.item(), arrays, {"layers": list(records)})


def open_session(job: WorkerJob) -> ModelSession:
    """Pick the device, pin precision, build the model (the built-in one, or the user's factory's) on the job's
    dtype and device, load the canonical weights; may raise DeviceUnavailable."""
    if job.task not in ("gradients", "model_check"):
        raise ValueError(f"the torch model session runs 'gradients' and 'model_check' jobs, got task {job.task!r}")
    return ModelSession(job)
