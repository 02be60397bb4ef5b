"""The numpy reference against central finite differences (float64), method by method.

Finite differences know nothing of backpropagation, so this checks the
hand derivation independently. Central differences with h = 1e-6 have
truncation error O(h^2) and rounding error O(eps / h); 1e-7 relative to the
largest gradient entry is far above both and far below any real bug.
"""
import numpy as np
import pytest

from gradparity.backends.numpy.session import NumpySession
from gradparity.backends.protocol import WorkerJob
from gradparity.experiment.causes import SEPARATE_FORWARD, Causes, dropout_masks
from gradparity.experiment.inputs import init_params
from gradparity.experiment.methods import METHODS
from gradparity.experiment.models import ACTIVATIONS, MLP
from gradparity.reference.mlp import cross_entropy, forward

FD_RTOL = 1e-7


def make_job(sizes, activation, n, seed=0, batchnorm=False, dropout=0.0):
    rng = np.random.default_rng(seed)
    model = MLP(tuple(sizes), activation, batchnorm)
    params = init_params(model, seed, "float64")
    batch = {"x": rng.standard_normal((n, sizes[0])), "y": rng.integers(0, sizes[-1], n)}
    batch.update(dropout_masks(Causes(dropout=dropout), model.hidden, n, rng, "float64"))
    return WorkerJob("numpy", "numpy", None, "", None, ("numpy",), tuple(METHODS), "float64", "cpu",
                     "highest", model.to_dict(), {"name": "cross_entropy"}, params, batch,
                     switches={"dropout": dropout} if dropout else {})


def mean_loss(params, job, x=None, y=None, masks="batch"):
    """The mean loss of the batch (or of ``x``, ``y``) in one forward pass, by the forward pass alone."""
    x = job.batch["x"] if x is None else x
    y = job.batch["y"] if y is None else y
    f = forward(params, x, job.model, job.dropout_masks(masks) if isinstance(masks, str) else masks)
    losses, _ = cross_entropy(f.logits, y)
    return losses.mean()


def finite_difference_grad(job, h=1e-6, loss=mean_loss):
    grads = {}
    for name, p in job.params.items():
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            plus = {k: v.copy() for k, v in job.params.items()}
            minus = {k: v.copy() for k, v in job.params.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            g[idx] = (loss(plus, job) - loss(minus, job)) / (2 * h)
        grads[name] = g
    return grads


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("sizes,n", [((5, 4, 3), 7), ((3, 4, 4, 2), 1), ((4, 3), 5)])
def test_every_method_matches_finite_differences(activation, sizes, n):
    job = make_job(sizes, activation, n)
    expected = finite_difference_grad(job)
    session = NumpySession(job)
    for method in METHODS.values():
        raw = session.compute(method.name)
        factor = method.normalization_factor(n)
        assert raw.loss * factor == pytest.approx(mean_loss(job.params, job), rel=1e-13)
        for name, g in expected.items():
            scale = np.max(np.abs(g))
            err = np.max(np.abs(raw.grads[name] * factor - g))
            assert err <= FD_RTOL * scale, f"{method.name} {name}: {err} > {FD_RTOL} * {scale}"


def test_sum_is_n_times_mean():
    job = make_job((6, 5, 4), "relu", 9)
    session = NumpySession(job)
    s, m = session.compute("sum"), session.compute("mean")
    assert s.loss == pytest.approx(9 * m.loss, rel=1e-14)
    for name in s.grads:
        np.testing.assert_allclose(s.grads[name], 9 * m.grads[name], rtol=1e-13, atol=1e-15)


def separate_forward_mean_loss(params, job):
    """The mean over examples of each example's loss in its own forward pass (its own mask row)."""
    x, y, n = job.batch["x"], job.batch["y"], job.n_examples
    masks = job.dropout_masks("single")
    return np.mean([mean_loss(params, job, x[i:i + 1], y[i:i + 1],
                              None if masks is None else [m[i:i + 1] for m in masks]) for i in range(n)])


@pytest.mark.parametrize("batchnorm,dropout", [(True, 0.0), (False, 0.4), (True, 0.3)])
@pytest.mark.parametrize("activation", ("tanh", "relu"))
def test_training_mode_matches_finite_differences(batchnorm, dropout, activation):
    """Batch normalization (batch statistics) and dropout (fixed masks) differentiated by hand, checked
    against finite differences of the forward pass alone: the batch-forward methods against the batch's
    loss, the separate-forward ones against the mean of each example's own forward pass."""
    job = make_job((5, 4, 3, 3), activation, 6, seed=3, batchnorm=batchnorm, dropout=dropout)
    batch_fd = finite_difference_grad(job)
    single_fd = finite_difference_grad(job, loss=separate_forward_mean_loss)
    session = NumpySession(job)
    for method in METHODS.values():
        raw = session.compute(method.name)
        expected = single_fd if method.name in SEPARATE_FORWARD else batch_fd
        # Relative to the largest entry of any tensor: a Dense bias before a normalization has a zero
        # gradient (the normalization removes the mean), which finite differences give as ~1e-10 noise.
        scale = max(np.max(np.abs(g)) for g in expected.values())
        for name, g in expected.items():
            err = np.max(np.abs(raw.grads[name] * method.normalization_factor(6) - g))
            assert err <= FD_RTOL * scale, f"{method.name} {name}: {err} > {FD_RTOL} * {scale}"
    if batchnorm:
        # An example alone normalizes to the shift: nothing before the first normalization gets a gradient.
        raw = session.compute("one_by_one")
        assert np.max(np.abs(raw.grads["layers.0.kernel"])) <= 1e-12
        assert np.max(np.abs(batch_fd["layers.0.kernel"])) > 1e-3
