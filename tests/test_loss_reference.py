"""The float64 loss reference against central finite differences, and the safe reader of loss texts."""

import numpy as np
import pytest

from gradparity.reference.losses import divisor, reduce_loss
from gradparity.errors import ConfigError
from gradparity.losses.batches import generate_batches
from gradparity.losses.catalogue import LossSemantics
from gradparity.losses.text import parse_loss_text

from loss_grid import grid_id, semantics_grid


def finite_difference(sem, z, t, s, h=1e-6):
    g = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[i] += h
        zm[i] -= h
        g[i] = (reduce_loss(sem, zp, t, s)[0] - reduce_loss(sem, zm, t, s)[0]) / (2 * h)
    return g


@pytest.mark.parametrize("sem", semantics_grid(), ids=grid_id)
def test_gradient_matches_finite_differences(sem):
    for b in generate_batches(sem, seed=3, shapes=((4, 5), (2, 3, 5))):
        s = b.sample_weight if sem.sample_weight else None
        loss, grad, d = reduce_loss(sem, b.logits, b.targets, s)
        assert np.isfinite(loss) and d > 0
        np.testing.assert_allclose(grad, finite_difference(sem, b.logits, b.targets, s), rtol=1e-6, atol=1e-8)


def test_per_element_values_against_textbook_formulas():
    z = np.array([[2.0, -1.0, 0.5]])
    p = np.exp(z) / np.exp(z).sum()
    ce = LossSemantics("cross_entropy", "count")
    assert reduce_loss(ce, z, np.array([0]))[0] == pytest.approx(-np.log(p[0, 0]), rel=1e-14)
    smooth = LossSemantics("cross_entropy", "count", label_smoothing=0.3)
    expected = -(0.7 * np.log(p[0, 0]) + 0.1 * np.log(p).sum())
    assert reduce_loss(smooth, z, np.array([0]))[0] == pytest.approx(expected, rel=1e-14)
    bce = LossSemantics("binary_cross_entropy", "count", pos_weight=(2.0, 1.0, 1.0))
    t = np.array([[1.0, 0.0, 1.0]])
    sig = 1 / (1 + np.exp(-z))
    ell = -(np.array([2.0, 1.0, 1.0]) * t * np.log(sig) + (1 - t) * np.log(1 - sig))
    assert reduce_loss(bce, z, t)[0] == pytest.approx(ell.mean(), rel=1e-13)
    huber = LossSemantics("huber", "one", delta=1.0)
    assert reduce_loss(huber, z, np.zeros_like(z))[0] == pytest.approx(1.5 + 0.5 + 0.125, rel=1e-14)


def test_divisor_rules_on_a_padded_token_batch():
    """N=2, T=3, two padded tokens, weights (N,) = [1, 3]: each rule's value by hand."""
    y = np.array([[0, 1, -100], [2, -100, 1]])
    shape = (2, 3, 4)
    w = np.array([1.0, 3.0])
    cw = (1.0, 2.0, 4.0, 8.0)
    rule = lambda r, **kw: divisor(LossSemantics("cross_entropy", r, ignore_index=-100, **kw), y, shape, w)
    assert rule("one") == 1.0
    assert rule("count") == 6.0
    assert rule("valid") == 4.0
    assert rule("class_weight_sum", class_weight=cw) == 1.0 + 2.0 + 4.0 + 2.0
    assert rule("sample_weight_sum") == 1.0 * 2 + 3.0 * 2
    assert rule("keras_sample_weight_sum") == 8.0  # the mask broadcasts the weights to (N, T)
    unmasked = divisor(LossSemantics("cross_entropy", "keras_sample_weight_sum"), np.abs(y) % 4, shape, w)
    assert unmasked == 4.0  # (N,) weights on an (N, T) loss: summed over N only


@pytest.mark.parametrize("text", [
    "__import__('os').system('echo hacked')",
    "torch.nn.CrossEntropyLoss(weight=open('/etc/passwd').read())",
    "torch.nn.CrossEntropyLoss(**options)",
    "lambda: 0",
    "torch.nn.CrossEntropyLoss(weight=w)",
    "MyLoss()",
    "",
    "torch.nn.CrossEntropyLoss(",
])
def test_loss_texts_are_read_never_executed(text):
    with pytest.raises(ConfigError):
        parse_loss_text(text)


def test_named_arrays_come_from_the_data():
    expr = parse_loss_text("nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)", {"w": np.array([1.0, 2.0])})
    assert expr.framework == "torch" and expr.kwargs == {"weight": [1.0, 2.0], "label_smoothing": 0.1}
    expr = parse_loss_text("keras.losses.Huber(delta=2.0)(y, p, sample_weight=w)")
    assert expr.framework == "keras" and expr.call.sample_weight and expr.kwargs == {"delta": 2.0}


@pytest.mark.parametrize("sem,message", [
    (LossSemantics("mse", "class_weight_sum"), "class-index targets"),
    (LossSemantics("mse", "count", label_smoothing=0.1), "mse takes no label_smoothing"),
    (LossSemantics("mse", "count", class_weight=(1.0, 2.0)), "mse takes no class_weight"),
    (LossSemantics("cross_entropy_probs", "count", ignore_index=-100), "takes no ignore_index"),
    (LossSemantics("cross_entropy", "median"), "unknown divisor rule"),
    (LossSemantics("hinge", "count"), "no loss 'hinge'"),
    (LossSemantics("mse", "count", last_axis="max"), "unknown last_axis"),
])
def test_semantics_no_framework_computes_are_rejected(sem, message):
    with pytest.raises(ConfigError, match=message):
        sem.check()


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NAMES = st.sampled_from([
    "torch.nn.CrossEntropyLoss", "nn.BCEWithLogitsLoss", "torch.nn.MSELoss", "torch.nn.HuberLoss", "nn.L1Loss",
    "keras.losses.SparseCategoricalCrossentropy", "keras.losses.CategoricalCrossentropy",
    "keras.losses.BinaryCrossentropy", "keras.losses.Huber", "tf.keras.losses.MeanSquaredError",
    "optax.softmax_cross_entropy_with_integer_labels", "optax.huber_loss", "optax.l2_loss", "torch.nn.NLLLoss",
    "keras.losses.Reduction.SUM", "MyLoss", "jnp.mean"])
_KEYS = st.sampled_from(["weight", "pos_weight", "ignore_index", "label_smoothing", "reduction", "delta",
                         "from_logits", "ignore_class", "axis", "size_average", "sample_weight", "where", "x"])
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.floats(allow_nan=True),
                    st.sampled_from(["'mean'", "'sum'", "'none'", "'sum_over_batch_size'", "'mean_with_sample_weight'",
                                     "None", "w", "torch.tensor([1.0, 2.0])", "np.array([0.5, -1.0, 2.0])",
                                     "[1, 2, 3]", "'x' * 3", "__import__('os')", "tf.keras.losses.Reduction.AUTO"]))


@st.composite
def loss_texts(draw):
    name = draw(_NAMES)
    kwargs = draw(st.dictionaries(_KEYS, _VALUES, max_size=4))
    args = ", ".join(f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in kwargs.items())
    text = f"{name}({args})"
    if draw(st.booleans()):
        text += draw(st.sampled_from(["(y, logits)", "(y, logits, sample_weight=w)", "(logits, y)", "(a, b, c, d)"]))
    if draw(st.booleans()):
        text += draw(st.sampled_from([".mean()", ".sum()", ".max()", ".mean(axis=0)"]))
    return draw(st.one_of(st.just(text), st.text(max_size=40)))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=loss_texts(), targets=st.sampled_from([None, "class_index", "probabilities"]))
def test_any_loss_text_is_planned_or_rejected_clearly(text, targets):
    """translate's whole pre-worker stage on arbitrary texts: a plan, or a ConfigError; never anything else."""
    from gradparity.commands.translate import plan

    try:
        framework, sem, renderings, batches = plan(text, targets=targets)
    except ConfigError as exc:
        assert str(exc).strip()
        return
    sem.check()
    assert framework in ("torch", "keras", "jax") and len(renderings) == 3 and batches
    for _, r in renderings:
        compile(r.function, "<rendering>", "exec")
