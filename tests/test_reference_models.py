"""The float64 numpy reference of the built-in CNN and Sequence models (core/reference/models.py).

The backward pass is checked against central finite differences of a loss computed from ``logits`` with
the test's own cross-entropy, along a few random unit directions per tensor and along the gradient
itself: |FD - <g, d>| <= FD_RTOL * ||g||. Finite differences know nothing of backpropagation; with
h = 1e-6 their truncation (O(h^2)) and rounding (O(eps * loss / h)) errors are ~1e-9 of ||g||, so
1e-6 is far above both and far below any real bug. The forward pass is checked against naive
implementations written here loop by loop (padding computed from its definition, not by
``same_padding``), and the causal mask and the padding forms by their effect on the logits.
"""
import math

import numpy as np
import pytest

from gradparity.backends.protocol import IGNORE_INDEX
from gradparity.experiment.models import CNN, LayerOptions, Sequence
from gradparity.reference.models import logits, loss_and_grads, per_example, term_scale

FD_RTOL = 1e-6
FD_H = 1e-6
#: Per-example gradients add up to the batch gradient up to the rounding of a different summation order.
SUM_RTOL = 1e-12
DIRECTIONS = 3
#: Gradients that are zero in exact arithmetic: softmax ignores a constant added to a row of scores, and the
#: key bias adds q . b_k to every score of query q's row. Their FD error is relative to the whole gradient.
ZERO_GRADIENTS = {"block.attn.key.bias"}


def make_params(model, seed=0):
    """Seeded parameters with nothing trivial: kernels N(0, 1/fan_in), biases 0.2 N(0, 1), LayerNorm scales
    1 + 0.2 N(0, 1), embeddings N(0, 1)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in model.param_shapes().items():
        z = rng.standard_normal(shape)
        if name.endswith(".kernel"):
            params[name] = z / math.sqrt(math.prod(shape[:-1]))
        elif name.endswith(".scale"):
            params[name] = 1.0 + 0.2 * z
        elif name.endswith(".bias"):
            params[name] = 0.2 * z
        else:
            params[name] = z
    return params


def cnn_data(model, n=5, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *model.image)), rng.integers(0, model.num_classes, n)


def seq_data(model, n=4, t=None, seed=1):
    rng = np.random.default_rng(seed)
    shape = (n, model.seq_len if t is None else t)
    return rng.integers(0, model.vocab, shape), rng.integers(0, model.vocab, shape)


def summed_cross_entropy(z, y):
    """Sum over all terms of -log softmax(z)[y], written independently of the reference."""
    z = z.reshape(-1, z.shape[-1])
    y = np.asarray(y).reshape(-1)
    zmax = z.max(axis=1)
    lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
    return float(np.sum(lse - z[np.arange(len(y)), y]))


def gradient_norm(grads) -> float:
    return math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))


def fd_errors(params, x, y, model, seed=2):
    """Per tensor, the worst |FD - <g, d>| / ||g|| over DIRECTIONS random unit directions and g / ||g||
    (for ZERO_GRADIENTS: / the norm of the whole gradient)."""
    md = model.to_dict()
    _, grads = loss_and_grads(params, x, y, md)
    total = gradient_norm(grads)

    def loss(p):
        return summed_cross_entropy(logits(p, x, md), y)

    rng = np.random.default_rng(seed)
    errors = {}
    for name, g in grads.items():
        norm = total if name in ZERO_GRADIENTS else float(np.linalg.norm(g))
        dirs = [rng.standard_normal(g.shape) for _ in range(DIRECTIONS)]
        dirs += [] if name in ZERO_GRADIENTS else [g]
        worst = 0.0
        for d in dirs:
            d = d / np.linalg.norm(d)
            plus = dict(params, **{name: params[name] + FD_H * d})
            minus = dict(params, **{name: params[name] - FD_H * d})
            fd = (loss(plus) - loss(minus)) / (2 * FD_H)
            worst = max(worst, abs(fd - float(np.sum(g * d))) / norm)
        errors[name] = worst
    return errors


def assert_same_gradients(actual, expected):
    """Equal up to SUM_RTOL of each tensor's largest entry (ZERO_GRADIENTS: of the whole gradient's norm)."""
    total = gradient_norm(expected)
    for name, g in expected.items():
        scale = total if name in ZERO_GRADIENTS else np.abs(g).max()
        np.testing.assert_allclose(actual[name], g, rtol=SUM_RTOL, atol=SUM_RTOL * scale, err_msg=name)


def check_model(model, x, y, params):
    """Names and shapes, loss, finite differences, and per-example gradients adding up to the batch's."""
    md = model.to_dict()
    loss, grads = loss_and_grads(params, x, y, md)
    shapes = model.param_shapes()
    assert list(grads) == list(shapes)
    assert {k: g.shape for k, g in grads.items()} == shapes
    assert all(g.dtype == np.float64 for g in grads.values())
    assert loss == pytest.approx(summed_cross_entropy(logits(params, x, md), y), rel=1e-13)

    errors = fd_errors(params, x, y, model)
    assert max(errors.values()) < FD_RTOL, errors
    for name in ZERO_GRADIENTS & set(grads):
        assert np.linalg.norm(grads[name]) < 1e-12 * gradient_norm(grads)

    losses, per_ex = per_example(params, x, y, md)
    assert losses.shape == (len(x),)
    assert losses.sum() == pytest.approx(loss, rel=SUM_RTOL)
    assert all(per_ex[name].shape == (len(x), *shape) for name, shape in shapes.items())
    assert_same_gradients({k: v.sum(axis=0) for k, v in per_ex.items()}, grads)
    scale = term_scale(params, x, y, md)
    per_example_scale = {k: float(np.abs(v).mean(axis=0).max()) for k, v in per_ex.items()}
    token_terms = {k for k in shapes if model.kind == "sequence" and k.endswith(".bias") and ".ln" not in k
                   and not k.startswith("ln_f")}
    for k, v in per_example_scale.items():
        if k in token_terms:  # per-token terms: at least the per-example gradients' size
            assert scale[k] >= v * (1 - 1e-12), k
        else:
            assert scale[k] == pytest.approx(v), k
    if model.kind == "sequence":  # its gradient is 0, its terms are not: rounding has a scale
        assert scale["block.attn.key.bias"] > 1e-3 * max(scale.values())


# --- CNN ----------------------------------------------------------------------------------------------------

def cnn(image=(8, 8, 1), strides=(1, 2), activation="relu", padding="same", gelu="exact", channels=(8, 16),
        kernel_size=3):
    return CNN(image, channels, strides, kernel_size, activation, 10,
               LayerOptions(gelu=gelu, padding=padding))


CNN_CASES = {
    "same-relu": cnn(),
    "valid-relu": cnn(padding="valid"),
    "same-gelu-exact": cnn(activation="gelu"),
    "valid-gelu-tanh": cnn(activation="gelu", gelu="tanh", padding="valid"),
    "same-gelu-tanh-stride21": cnn(activation="gelu", gelu="tanh", strides=(2, 1)),
    "odd-same-relu": cnn(image=(7, 7, 2)),
    "odd-valid-gelu-exact": cnn(image=(7, 7, 2), activation="gelu", padding="valid"),
    "odd-same-tanh-pool-drops-row": cnn(image=(7, 7, 2), strides=(1, 1), activation="tanh"),
    "sigmoid-k2": cnn(activation="sigmoid", kernel_size=2, padding="valid"),
    "identity": cnn(activation="identity"),
}


@pytest.mark.parametrize("case", CNN_CASES)
def test_cnn_gradients_match_finite_differences(case):
    model = CNN_CASES[case]
    x, y = cnn_data(model)
    check_model(model, x, y, make_params(model))


def naive_activation(z, name, gelu):
    """Elementwise, from the definitions."""
    def one(v):
        if name == "relu":
            return max(v, 0.0)
        if name == "tanh":
            return math.tanh(v)
        if name == "sigmoid":
            return 1.0 / (1.0 + math.exp(-v))
        if name == "identity":
            return v
        if gelu == "exact":
            return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))
        return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    return np.array([one(v) for v in z.ravel()]).reshape(z.shape)


def naive_cnn(params, x, model, same_form="end"):
    """The CNN loop by loop over output positions; padding from its definition."""
    k = model.kernel_size
    h = x
    for i, s in enumerate(model.strides):
        size = h.shape[1:3]
        pads = []
        for n in size:
            if model.options.padding == "valid":
                pads.append((0, 0))
            elif same_form == "symmetric":
                pads.append((k // 2, k // 2))
            else:  # TF SAME: output ceil(n / s); the odd extra zero at the end
                total = max((math.ceil(n / s) - 1) * s + k - n, 0)
                pads.append((total // 2, total - total // 2))
        xp = np.pad(h, ((0, 0), pads[0], pads[1], (0, 0)))
        ho, wo = (xp.shape[1] - k) // s + 1, (xp.shape[2] - k) // s + 1
        w, b = params[f"conv.{i}.kernel"], params[f"conv.{i}.bias"]
        z = np.zeros((len(x), ho, wo, w.shape[-1]))
        for r in range(ho):
            for c in range(wo):
                window = xp[:, r * s:r * s + k, c * s:c * s + k, :]
                z[:, r, c, :] = np.einsum("nijc,ijco->no", window, w) + b
        h = naive_activation(z, model.activation, model.options.gelu)
    hq, wq = h.shape[1] // 2, h.shape[2] // 2
    pooled = np.zeros((len(x), hq, wq, h.shape[3]))
    for r in range(hq):
        for c in range(wq):
            pooled[:, r, c, :] = h[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2, :].max(axis=(1, 2))
    return pooled.reshape(len(x), -1) @ params["dense.kernel"] + params["dense.bias"]


@pytest.mark.parametrize("case", ["same-relu", "valid-gelu-tanh", "same-gelu-exact", "same-gelu-tanh-stride21",
                                  "odd-same-relu", "odd-valid-gelu-exact", "odd-same-tanh-pool-drops-row"])
def test_cnn_logits_match_naive_loops(case):
    model = CNN_CASES[case]
    x, _ = cnn_data(model)
    params = make_params(model)
    np.testing.assert_allclose(logits(params, x, model.to_dict()), naive_cnn(params, x, model), rtol=1e-12,
                               atol=1e-12)


def test_same_padding_forms_differ_only_where_the_total_is_odd():
    """Stride 2 on 8x8 with k = 3 pads 1 row in total: "end" puts it at the bottom, "symmetric" pads 1 on
    both sides (another output grid). Stride 1 pads 2: both forms pad 1 and 1."""
    for strides, differ in (((1, 2), True), ((2, 1), True), ((1, 1), False)):
        model = cnn(strides=strides)
        x, y = cnn_data(model)
        params = make_params(model)
        md = model.to_dict()
        end = logits(params, x, md)
        symmetric_settings = dict(model.options.resolved(None), same_padding="symmetric")
        symmetric = logits(params, x, md, settings=symmetric_settings)
        np.testing.assert_allclose(symmetric, naive_cnn(params, x, model, "symmetric"), rtol=1e-12, atol=1e-12)
        if differ:
            assert np.abs(end - symmetric).max() > 1e-3 * np.abs(end).max()
            # The torch-default form is differentiated as carefully as the reference's.
            _, grads = loss_and_grads(params, x, y, md, settings=symmetric_settings)
            _, per_ex = per_example(params, x, y, md, settings=symmetric_settings)
            assert_same_gradients({k: v.sum(axis=0) for k, v in per_ex.items()}, grads)
        else:
            np.testing.assert_array_equal(end, symmetric)


def test_reference_ignores_framework_defaults_unless_asked():
    """defaults="framework" changes what each framework computes, never the reference's own settings."""
    explicit = cnn(strides=(1, 2), activation="gelu")
    framework = CNN(explicit.image, explicit.channels, explicit.strides, 3, "gelu", 10,
                    LayerOptions(defaults="framework"))
    x, _ = cnn_data(explicit)
    params = make_params(explicit)
    ref = logits(params, x, explicit.to_dict())
    np.testing.assert_array_equal(logits(params, x, framework.to_dict()), ref)
    jax_like = logits(params, x, framework.to_dict(), settings=framework.options.resolved("jax"))
    assert np.abs(jax_like - ref).max() > 1e-6  # tanh GELU


# --- Sequence -----------------------------------------------------------------------------------------------

def seq(gelu="exact", eps=1e-5, heads=2, **kw):
    sizes = dict(vocab=16, seq_len=8, width=16, mlp_width=32) | kw
    return Sequence(sizes["vocab"], sizes["seq_len"], sizes["width"], heads, sizes["mlp_width"],
                    LayerOptions(gelu=gelu, layernorm_epsilon=eps))


SEQ_CASES = {
    "defaults": seq(),
    "gelu-tanh": seq(gelu="tanh"),
    "eps-1e-3": seq(eps=1e-3),
    "gelu-tanh-eps-1e-3": seq(gelu="tanh", eps=1e-3),
    "four-heads": seq(heads=4),
    "one-head-small": seq(heads=1, vocab=5, width=6, mlp_width=7, seq_len=4),
}


@pytest.mark.parametrize("case", SEQ_CASES)
def test_sequence_gradients_match_finite_differences(case):
    model = SEQ_CASES[case]
    x, y = seq_data(model)
    check_model(model, x, y, make_params(model))


def test_sequence_shorter_than_seq_len_and_ignored_targets():
    """T < seq_len uses the first T positions (the others get zero gradient); an IGNORE_INDEX target adds
    nothing to the loss."""
    model = seq()
    x, y = seq_data(model, t=5)
    params = make_params(model)
    check_model(model, x, y, params)
    _, grads = loss_and_grads(params, x, y, model.to_dict())
    assert not grads["pos.embedding"][5:].any() and grads["pos.embedding"][:5].any()
    unused = np.setdiff1d(np.arange(model.vocab), x)
    assert not grads["embed.embedding"][unused].any()

    y_pad = y.copy()
    y_pad[:, -2:] = IGNORE_INDEX
    loss_pad, grads_pad = loss_and_grads(params, x, y_pad, model.to_dict())
    z = logits(params, x, model.to_dict())
    assert loss_pad == pytest.approx(summed_cross_entropy(z[:, :-2], y[:, :-2]), rel=1e-13)
    # By causality the ignored last tokens reach nothing else: the same as cutting them off.
    _, grads_cut = loss_and_grads(params, x[:, :-2], y[:, :-2], model.to_dict())
    assert_same_gradients(grads_pad, grads_cut)


def naive_layernorm(v, scale, bias, eps):
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    return np.array([(a - mean) / math.sqrt(var + eps) for a in v]) * scale + bias


def naive_sequence(params, x, model):
    """The transformer position by position and head by head."""
    p, eps, heads = params, model.options.layernorm_epsilon, model.heads
    n, t = x.shape
    d = model.width // heads
    out = np.zeros((n, t, model.vocab))
    for i in range(n):
        h = np.array([p["embed.embedding"][x[i, s]] + p["pos.embedding"][s] for s in range(t)])
        a = np.array([naive_layernorm(h[s], p["block.ln1.scale"], p["block.ln1.bias"], eps) for s in range(t)])
        q, k, v = (a @ p[f"block.attn.{m}.kernel"] + p[f"block.attn.{m}.bias"] for m in ("query", "key", "value"))
        att = np.zeros((t, model.width))
        for hd in range(heads):
            cols = slice(hd * d, (hd + 1) * d)
            for s in range(t):
                scores = [float(q[s, cols] @ k[u, cols]) / math.sqrt(d) for u in range(s + 1)]
                weights = np.exp(np.array(scores) - max(scores))
                weights /= weights.sum()
                att[s, cols] = sum(w * v[u, cols] for u, w in enumerate(weights))
        h = h + att @ p["block.attn.out.kernel"] + p["block.attn.out.bias"]
        a = np.array([naive_layernorm(h[s], p["block.ln2.scale"], p["block.ln2.bias"], eps) for s in range(t)])
        m = naive_activation(a @ p["block.mlp.0.kernel"] + p["block.mlp.0.bias"], "gelu", model.options.gelu)
        h = h + m @ p["block.mlp.1.kernel"] + p["block.mlp.1.bias"]
        a = np.array([naive_layernorm(h[s], p["ln_f.scale"], p["ln_f.bias"], eps) for s in range(t)])
        out[i] = a @ p["head.kernel"] + p["head.bias"]
    return out


@pytest.mark.parametrize("case", ["defaults", "gelu-tanh-eps-1e-3", "four-heads"])
def test_sequence_logits_match_naive_loops(case):
    model = SEQ_CASES[case]
    x, _ = seq_data(model)
    params = make_params(model)
    z = logits(params, x, model.to_dict())
    assert z.shape == (len(x), model.seq_len, model.vocab)
    np.testing.assert_allclose(z, naive_sequence(params, x, model), rtol=1e-12, atol=1e-12)


def test_causal_mask():
    """Changing tokens after position t leaves the logits at positions <= t alone, and changes later ones."""
    model = seq()
    x, _ = seq_data(model)
    params = make_params(model)
    md = model.to_dict()
    base = logits(params, x, md)
    for t in range(model.seq_len - 1):
        changed = x.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + np.arange(model.seq_len - t - 1)) % model.vocab
        z = logits(params, changed, md)
        np.testing.assert_allclose(z[:, :t + 1], base[:, :t + 1], rtol=1e-14, atol=0)
        assert np.abs(z[:, t + 1] - base[:, t + 1]).min() > 0
