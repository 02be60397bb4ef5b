"""The numpy reference against central finite differences (float64), method by method.

Finite differences know nothing of backpropagation, so this checks the
hand derivation independently. Central differences with h = 1e-6 have
truncation error O(h^2) and rounding error O(eps / h); 1e-7 relative to the
largest gradient entry is far above both and far below any real bug.
"""
import numpy as np
import pytest

from gradparity.backends.numpy.session import NumpySession, cross_entropy, forward
from gradparity.backends.protocol import WorkerJob
from gradparity.experiment.inputs import init_params
from gradparity.experiment.methods import METHODS
from gradparity.experiment.models import ACTIVATIONS, MLP

FD_RTOL = 1e-7


def make_job(sizes, activation, n, seed=0):
    rng = np.random.default_rng(seed)
    model = MLP(tuple(sizes), activation)
    params = init_params(model, seed, "float64")
    batch = {"x": rng.standard_normal((n, sizes[0])), "y": rng.integers(0, sizes[-1], n)}
    return WorkerJob("numpy", "numpy", None, "", None, ("numpy",), tuple(METHODS), "float64", "cpu",
                     "highest", model.to_dict(), {"name": "cross_entropy"}, params, batch)


def mean_loss(params, job):
    zs, _ = forward(params, job.batch["x"], len(job.model["sizes"]) - 1, job.model["activation"])
    losses, _ = cross_entropy(zs[-1], job.batch["y"])
    return losses.mean()


def finite_difference_grad(job, h=1e-6):
    grads = {}
    for name, p in job.params.items():
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            plus = {k: v.copy() for k, v in job.params.items()}
            minus = {k: v.copy() for k, v in job.params.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            g[idx] = (mean_loss(plus, job) - mean_loss(minus, job)) / (2 * h)
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
