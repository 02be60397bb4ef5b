"""numpy reference for the built-in CNN and Sequence models: forward and backward by hand, in float64.

The mathematics is ``gradparity.experiment.models`` (``CNN``, ``Sequence``), written out literally:
convolutions as im2col matrix products (their backward pass a col2im scatter-add), max pooling routing
its gradient to the first maximum of each window, LayerNorm, causal multi-head attention and the
embeddings with their textbook derivatives. Every public function takes the model in its dict form
(``to_dict()``) and computes with the resolved layer settings of the reference,
``LayerOptions.resolved(None)`` (the explicit values), unless ``settings`` names others (a resolved
dict, e.g. a framework's defaults, to compute in float64 what that framework's port computes).

The loss is the SUM of softmax cross-entropy over all loss terms (N for the CNN, N*T tokens for the
sequence model); a target ``IGNORE_INDEX`` contributes nothing, as in ``mlp.cross_entropy``.
"""
from __future__ import annotations

import math

import numpy as np

from gradparity.experiment.models import CNN, Sequence, model_from_dict, same_padding
from gradparity.reference.mlp import _ACTIVATIONS, cross_entropy

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715
# math.erf is correctly rounded to within an ulp or so; the arrays here are small enough to loop over.
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu_exact(z):
    return 0.5 * z * (1.0 + _erf(z / _SQRT_2))


def _gelu_exact_grad(z, a):
    # d/dz z Phi(z) = Phi(z) + z phi(z)
    return 0.5 * (1.0 + _erf(z / _SQRT_2)) + z * _INV_SQRT_2PI * np.exp(-0.5 * z * z)


def _gelu_tanh(z):
    return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z ** 3)))


def _gelu_tanh_grad(z, a):
    t = np.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z ** 3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * z * z)


_GELU = {"exact": (_gelu_exact, _gelu_exact_grad), "tanh": (_gelu_tanh, _gelu_tanh_grad)}


def _activation(name: str, gelu_form: str):
    """(f(z), f'(z, a)) of activation ``name``; "gelu" in ``gelu_form`` ("exact" or "tanh")."""
    if name == "gelu":
        return _GELU[gelu_form]
    return _ACTIVATIONS[name]


def _resolve(model: dict, settings: dict | None):
    """The model object and the layer settings it computes with (the reference's unless ``settings``)."""
    m = model_from_dict(model)
    if not isinstance(m, (CNN, Sequence)):
        raise ValueError(f"the numpy model reference covers cnn and sequence, not {model.get('kind')!r}")
    return m, (m.options.resolved(None) if settings is None else settings)


def _float64(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}


# --- CNN ----------------------------------------------------------------------------------------------------

def _conv_padding(size: int, kernel: int, stride: int, settings: dict) -> tuple[int, int]:
    if settings["padding"] == "valid":
        return 0, 0
    return same_padding(size, kernel, stride, settings["same_padding"])


def _im2col(x, kernel: int, stride: int, settings: dict):
    """Windows of ``x`` (N, H, W, C) as (N, Ho, Wo, k, k, C), after zero padding; also the padding
    ((top, bottom), (left, right)) for the backward pass."""
    n, h, w, c = x.shape
    pads = (_conv_padding(h, kernel, stride, settings), _conv_padding(w, kernel, stride, settings))
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = (xp.shape[1] - kernel) // stride + 1
    wo = (xp.shape[2] - kernel) // stride + 1
    cols = np.empty((n, ho, wo, kernel, kernel, c))
    for i in range(kernel):
        for j in range(kernel):
            cols[:, :, :, i, j, :] = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
    return cols, pads


def _col2im(dcols, shape, stride: int, pads):
    """The adjoint of ``_im2col``: window gradients (N, Ho, Wo, k, k, C) scatter-added into an (N, H, W, C)
    gradient (overlapping windows add up; padding rows are dropped)."""
    n, ho, wo, kernel, _, c = dcols.shape
    (top, bottom), (left, right) = pads
    dxp = np.zeros((n, shape[1] + top + bottom, shape[2] + left + right, c))
    for i in range(kernel):
        for j in range(kernel):
            dxp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] += dcols[:, :, :, i, j, :]
    return dxp[:, top:top + shape[1], left:left + shape[2]]


def _pool_windows(a):
    """The 2x2 stride-2 windows of ``a`` (N, H, W, C) as (N, H//2, W//2, C, 4), row-major within a window
    (a last odd row / column is dropped)."""
    n, h, w, c = a.shape
    hq, wq = h // 2, w // 2
    win = a[:, :2 * hq, :2 * wq].reshape(n, hq, 2, wq, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return win.reshape(n, hq, wq, c, 4)


def _cnn_forward(params, x, cnn: CNN, settings: dict) -> tuple[np.ndarray, dict]:
    """Logits (N, classes) and what the backward pass needs."""
    act, _ = _activation(cnn.activation, settings["gelu"])
    cache = {"cols": [], "pads": [], "shapes": [], "pre": [], "acts": []}
    h = x
    for i, stride in enumerate(cnn.strides):
        cols, pads = _im2col(h, cnn.kernel_size, stride, settings)
        kernel = params[f"conv.{i}.kernel"]
        z = cols.reshape(*cols.shape[:3], -1) @ kernel.reshape(-1, kernel.shape[-1]) + params[f"conv.{i}.bias"]
        cache["cols"].append(cols)
        cache["pads"].append(pads)
        cache["shapes"].append(h.shape)
        cache["pre"].append(z)
        h = act(z)
        cache["acts"].append(h)
    win = _pool_windows(h)
    arg = win.argmax(axis=-1)  # the first maximum, as the frameworks route it
    pooled = np.take_along_axis(win, arg[..., None], axis=-1)[..., 0]
    flat = pooled.reshape(len(x), -1)  # channels-last (H', W', C') order
    cache.update(arg=arg, pooled_shape=pooled.shape, flat=flat)
    return flat @ params["dense.kernel"] + params["dense.bias"], cache


def _cnn_backward(params, cache: dict, dlogits, cnn: CNN, settings: dict) -> dict[str, np.ndarray]:
    """Gradients of sum(dlogits * logits) w.r.t. every parameter, summed over the batch."""
    _, dact = _activation(cnn.activation, settings["gelu"])
    grads = {"dense.kernel": cache["flat"].T @ dlogits, "dense.bias": dlogits.sum(axis=0)}
    dpooled = (dlogits @ params["dense.kernel"].T).reshape(cache["pooled_shape"])
    n, hq, wq, c = dpooled.shape
    dwin = np.zeros((n, hq, wq, c, 4))
    np.put_along_axis(dwin, cache["arg"][..., None], dpooled[..., None], axis=-1)
    dh = np.zeros_like(cache["acts"][-1])
    dh[:, :2 * hq, :2 * wq] = dwin.reshape(n, hq, wq, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(n, 2 * hq,
                                                                                                    2 * wq, c)
    for i in reversed(range(len(cnn.strides))):
        dz = dh * dact(cache["pre"][i], cache["acts"][i])
        cols = cache["cols"][i]
        kernel = params[f"conv.{i}.kernel"]
        dz2 = dz.reshape(-1, dz.shape[-1])
        grads[f"conv.{i}.kernel"] = (cols.reshape(dz2.shape[0], -1).T @ dz2).reshape(kernel.shape)
        grads[f"conv.{i}.bias"] = dz2.sum(axis=0)
        if i:
            dcols = (dz @ kernel.reshape(-1, kernel.shape[-1]).T).reshape(cols.shape)
            dh = _col2im(dcols, cache["shapes"][i], cnn.strides[i], cache["pads"][i])
    return grads


# --- Sequence (one pre-LayerNorm transformer block) ---------------------------------------------------------

def _layernorm(x, scale, bias, eps: float):
    """LayerNorm over the last axis (biased variance); also (xhat, 1/sqrt(var + eps)) for the backward pass."""
    centred = x - x.mean(axis=-1, keepdims=True)
    inv_std = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
    xhat = centred * inv_std
    return xhat * scale + bias, (xhat, inv_std)


def _layernorm_backward(dy, scale, saved, grads: dict, prefix: str):
    """d/dx of LayerNorm given d/dy; adds ``prefix``.scale / .bias gradients (summed over all rows) to grads."""
    xhat, inv_std = saved
    rows = dy.reshape(-1, dy.shape[-1])
    grads[f"{prefix}.scale"] = (rows * xhat.reshape(rows.shape)).sum(axis=0)
    grads[f"{prefix}.bias"] = rows.sum(axis=0)
    dxhat = dy * scale
    e = dy.shape[-1]
    return inv_std / e * (e * dxhat - dxhat.sum(axis=-1, keepdims=True)
                          - xhat * (dxhat * xhat).sum(axis=-1, keepdims=True))


def _dense_backward(a, dz, kernel, grads: dict, prefix: str, need_input: bool = True, terms: dict | None = None):
    """Gradients of z = a @ kernel + bias over any leading axes; returns d/da (or None). With ``terms``, records
    ``terms[prefix + '.bias']``: per example (first axis), the sum of |dz| over the other leading axes, the
    magnitude of the terms the bias gradient adds up."""
    if terms is not None:
        terms[f"{prefix}.bias"] = np.abs(dz).reshape(dz.shape[0], -1, dz.shape[-1]).sum(axis=1)
    a2, dz2 = a.reshape(-1, a.shape[-1]), dz.reshape(-1, dz.shape[-1])
    grads[f"{prefix}.kernel"] = a2.T @ dz2
    grads[f"{prefix}.bias"] = dz2.sum(axis=0)
    return dz @ kernel.T if need_input else None


def _split_heads(z, heads: int):
    n, t, e = z.shape
    return z.reshape(n, t, heads, e // heads).transpose(0, 2, 1, 3)  # (N, heads, T, D): contiguous columns


def _merge_heads(z):
    n, heads, t, d = z.shape
    return z.transpose(0, 2, 1, 3).reshape(n, t, heads * d)


def _seq_forward(params, x, seq: Sequence, settings: dict) -> tuple[np.ndarray, dict]:
    """Logits (N, T, vocab) and what the backward pass needs."""
    eps = settings["layernorm_epsilon"]
    gelu, _ = _GELU[settings["gelu"]]
    p = params
    t = x.shape[1]
    c = {"x": x}
    h0 = p["embed.embedding"][x] + p["pos.embedding"][:t]
    c["a1"], c["ln1"] = _layernorm(h0, p["block.ln1.scale"], p["block.ln1.bias"], eps)
    qkv = [_split_heads(c["a1"] @ p[f"block.attn.{k}.kernel"] + p[f"block.attn.{k}.bias"], seq.heads)
           for k in ("query", "key", "value")]
    c["q"], c["k"], c["v"] = qkv
    d = c["q"].shape[-1]
    scores = c["q"] @ c["k"].transpose(0, 1, 3, 2) / math.sqrt(d)
    causal = np.tril(np.ones((t, t), dtype=bool))
    scores = np.where(causal, scores, -np.inf)  # the diagonal is never masked: every row has a finite max
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    c["probs"] = e / e.sum(axis=-1, keepdims=True)
    c["heads_out"] = _merge_heads(c["probs"] @ c["v"])
    h1 = h0 + c["heads_out"] @ p["block.attn.out.kernel"] + p["block.attn.out.bias"]
    c["a2"], c["ln2"] = _layernorm(h1, p["block.ln2.scale"], p["block.ln2.bias"], eps)
    c["m0"] = c["a2"] @ p["block.mlp.0.kernel"] + p["block.mlp.0.bias"]
    c["g"] = gelu(c["m0"])
    h2 = h1 + c["g"] @ p["block.mlp.1.kernel"] + p["block.mlp.1.bias"]
    c["a3"], c["lnf"] = _layernorm(h2, p["ln_f.scale"], p["ln_f.bias"], eps)
    return c["a3"] @ p["head.kernel"] + p["head.bias"], c


def _seq_backward(params, c: dict, dlogits, seq: Sequence, settings: dict,
                  terms: dict | None = None) -> dict[str, np.ndarray]:
    """Gradients of sum(dlogits * logits) w.r.t. every parameter, summed over the batch and positions
    (``terms``: see ``_dense_backward``)."""
    _, dgelu = _GELU[settings["gelu"]]
    p, g = params, {}
    da3 = _dense_backward(c["a3"], dlogits, p["head.kernel"], g, "head", terms=terms)
    dh2 = _layernorm_backward(da3, p["ln_f.scale"], c["lnf"], g, "ln_f")
    # h2 = h1 + mlp(ln2(h1)): the residual passes dh2 straight through.
    dg = _dense_backward(c["g"], dh2, p["block.mlp.1.kernel"], g, "block.mlp.1", terms=terms)
    dm0 = dg * dgelu(c["m0"], c["g"])
    da2 = _dense_backward(c["a2"], dm0, p["block.mlp.0.kernel"], g, "block.mlp.0", terms=terms)
    dh1 = dh2 + _layernorm_backward(da2, p["block.ln2.scale"], c["ln2"], g, "block.ln2")
    # h1 = h0 + attn(ln1(h0))
    dheads = _split_heads(_dense_backward(c["heads_out"], dh1, p["block.attn.out.kernel"], g, "block.attn.out",
                                          terms=terms), seq.heads)
    probs, q, k, v = c["probs"], c["q"], c["k"], c["v"]
    dprobs = dheads @ v.transpose(0, 1, 3, 2)
    dv = probs.transpose(0, 1, 3, 2) @ dheads
    # Softmax backward; masked entries have probability 0 exactly, so their score gradient is 0.
    dscores = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)) / math.sqrt(q.shape[-1])
    dq = dscores @ k
    dk = dscores.transpose(0, 1, 3, 2) @ q
    da1 = sum(_dense_backward(c["a1"], _merge_heads(dz), p[f"block.attn.{name}.kernel"], g, f"block.attn.{name}",
                              terms=terms) for name, dz in (("query", dq), ("key", dk), ("value", dv)))
    dh0 = dh1 + _layernorm_backward(da1, p["block.ln1.scale"], c["ln1"], g, "block.ln1")
    x, t = c["x"], c["x"].shape[1]
    g["embed.embedding"] = np.zeros_like(p["embed.embedding"])
    np.add.at(g["embed.embedding"], x, dh0)  # repeated tokens add up
    g["pos.embedding"] = np.zeros_like(p["pos.embedding"])
    g["pos.embedding"][:t] = dh0.sum(axis=0)
    return g


# --- Public interface ---------------------------------------------------------------------------------------

def _forward(params, x, model: dict, settings: dict | None):
    m, s = _resolve(model, settings)
    params = _float64(params)
    if isinstance(m, CNN):
        out, cache = _cnn_forward(params, np.asarray(x, dtype=np.float64), m, s)
    else:
        out, cache = _seq_forward(params, np.asarray(x, dtype=np.int64), m, s)
    return m, s, params, out, cache


def logits(params, x, model: dict, *, settings: dict | None = None) -> np.ndarray:
    """The forward pass in float64: (N, classes) for a CNN on images ``x`` (N, H, W, C), (N, T, vocab) for
    the sequence model on token ids ``x`` (N, T)."""
    return _forward(params, x, model, settings)[3]


def loss_and_grads(params, x, y, model: dict, *, settings: dict | None = None,
                   weights: np.ndarray | None = None) -> tuple[float, dict]:
    """(sum of the softmax cross-entropy over all loss terms, its gradient w.r.t. every parameter), the
    gradient by a hand-written backward pass over the whole batch; names and shapes as ``param_shapes()``.
    ``weights`` (y's shape) multiplies each term (a class-weighted loss: w[y])."""
    m, s, params, out, cache = _forward(params, x, model, settings)
    y = np.asarray(y, dtype=np.int64)
    losses, dlogits = cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        losses, dlogits = losses * w, dlogits * w[:, None]
    dlogits = dlogits.reshape(out.shape)
    grads = (_cnn_backward if isinstance(m, CNN) else _seq_backward)(params, cache, dlogits, m, s)
    return float(losses.sum()), {name: grads[name] for name in m.param_shapes()}


def per_example(params, x, y, model: dict, *, settings: dict | None = None,
                weights: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """(losses (N,), gradients name -> (N, *shape)): example i's loss (summed over its tokens for the
    sequence model) and its gradient. The examples are independent, so each is a batch of one.
    ``weights`` as in ``loss_and_grads``."""
    rows = [loss_and_grads(params, x[i:i + 1], y[i:i + 1], model, settings=settings,
                           weights=None if weights is None else weights[i:i + 1]) for i in range(len(x))]
    losses = np.array([loss for loss, _ in rows])
    return losses, {name: np.stack([g[name] for _, g in rows]) for name in rows[0][1]}


def term_scale(params, x, y, model: dict, *, settings: dict | None = None) -> dict[str, float]:
    """Per tensor, the largest entry of mean_i |g_i|, g_i example i's gradient: the scale of the terms that
    the batch gradient adds up (as ``mlp.term_scale``), which bounds its rounding error.

    For the sequence model's dense biases, the terms are per token, and where they cancel within an example
    the example's gradient understates them: the attention key's bias has a gradient of exactly 0 (a
    constant added to a row of scores leaves its softmax unchanged), so every framework returns pure
    rounding of tokens' terms. Its scale (and every dense bias's) is then at least the largest entry of
    mean_i sum_t |dz_it|.
    """
    _, grads = per_example(params, x, y, model, settings=settings)
    out = {k: float(np.max(np.mean(np.abs(g), axis=0))) if g.size else 0.0 for k, g in grads.items()}
    m, s, p64, logits_, cache = _forward(params, x, model, settings)
    if isinstance(m, Sequence):
        _, dlogits = cross_entropy(logits_.reshape(-1, logits_.shape[-1]), np.asarray(y, dtype=np.int64).reshape(-1))
        terms: dict = {}
        _seq_backward(p64, cache, dlogits.reshape(logits_.shape), m, s, terms=terms)
        for name, t in terms.items():
            out[name] = max(out[name], float(np.max(np.mean(t, axis=0))))
    return out


def trajectory(params: dict[str, np.ndarray], batches: list, model: dict, config, lrs: list[float], reduction: str,
               framework: str, float32_hyperparameters: bool = False) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """(parameters after each step, loss at each step before its update) of training the built-in CNN or
    sequence ``model`` on ``batches`` (x, y) with ``framework``'s optimizer rule for ``config`` (an
    ``OptimizerConfig``), float64 throughout: the counterpart of ``train.py`` for these models.
    ``reduction`` "mean" divides the summed cross-entropy by its number of terms (N, or N·T for tokens)."""
    from gradparity.experiment.optimizers import update_rule

    p = _float64(params)
    rules = {k: update_rule(framework, config, float32_hyperparameters) for k in p}
    states: dict[str, dict] = {k: {} for k in p}
    out, losses = [], []
    for t, ((x, y), lr) in enumerate(zip(batches, lrs), start=1):
        total, grads = loss_and_grads(p, x, y, model)
        scale = 1.0 / np.asarray(y).size if reduction == "mean" else 1.0
        losses.append(total * scale)
        p = {k: rules[k](p[k], grads[k] * scale, states[k], float(lr), t) for k in p}
        out.append(dict(p))
    return out, losses
