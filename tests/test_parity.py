"""Each framework backend against the numpy reference: numpy in, numpy out, through the real worker.

Tolerance, per parameter tensor: max|g - ref| <= RTOL[dtype] * max|ref| (and the
same for the loss), for the dtype the backend reports it computed in. The float64 bound is ~10^4 x the unit roundoff (rounding in a
network this small stays near 10^-15); the float32 bound is ~170 x float32's unit
roundoff. A wrong layout, a missing activation derivative or a 1/N slip is off
by 10^-2 or more and fails both.
"""
import numpy as np
import pytest

from gradparity.backends import BACKENDS
from gradparity.backends import make_job as build_job
from gradparity.backends.numpy.session import NumpySession
from gradparity.backends.protocol import builtin_payload
from gradparity.experiment.inputs import init_params
from gradparity.experiment.methods import METHODS
from gradparity.experiment.models import MLP
from gradparity.run.execute import run_backend

RTOL = {"float64": 1e-12, "float32": 1e-5}
FRAMEWORK_BACKENDS = ("torch", "jax", "keras-tensorflow", "keras-jax", "keras-torch")
#: One case per backend, each declaring its framework.
BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.frameworks(b)) for b in FRAMEWORK_BACKENDS]
CASES = [  # (dtype, activation, sizes, N, device): two hidden layers, odd batches, every activation once
    ("float64", "tanh", (12, 9, 7, 5), 11, "cpu"),
    ("float64", "sigmoid", (6, 4, 3), 1, "cpu"),
    ("float32", "relu", (12, 9, 7, 5), 11, "cpu"),
    ("float32", "identity", (6, 4, 3), 5, "auto"),
]
ENV_KEYS = {"framework", "versions", "device", "device_kind", "device_note", "dtype", "precision", "tf32"}


def make_job(backend, dtype, activation, sizes, n, device="cpu", methods=tuple(METHODS)):
    info = BACKENDS[backend]
    rng = np.random.default_rng(42)
    model = MLP(sizes, activation)
    batch = {"x": rng.standard_normal((n, sizes[0])).astype(dtype),
             "y": rng.integers(0, sizes[-1], n).astype(np.int64)}
    return info, build_job(info, "gradients", methods, dtype=dtype, device=device, model=model.to_dict(),
                           loss={"name": "cross_entropy"}, params=init_params(model, 3, dtype), batch=batch,
                           payload=builtin_payload(model.to_dict(), mode="inference"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}")
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_backend_matches_numpy_reference(backend, case):
    dtype, activation, sizes, n, device = case
    info, job = make_job(backend, dtype, activation, sizes, n, device=device)
    outcome = run_backend(job, info, timeout_s=300)
    assert outcome.status == "ok", outcome.error
    env = outcome.environment
    assert ENV_KEYS <= set(env), ENV_KEYS - set(env)
    effective = env["dtype"]
    if effective != dtype:
        # Keras 3.15 demotes some float64 ops to float32 on jax/torch (keras-team/keras#23704);
        # the backend must say so and is then held to the dtype it really computed in.
        assert info.framework == "keras" and dtype == "float64", (effective, dtype)
        assert effective in env["precision"]["keras_op_dtypes"].values()
    if env["device_kind"] == "cpu":
        assert env["tf32"] is False
        if device == "auto":
            assert env["device_note"], "an 'auto' fallback to the CPU must say so"
    reference = NumpySession(job)  # float64 on the same dtype-rounded inputs
    for name in METHODS:
        row = outcome.methods[name]
        assert row.status == "ok", f"{backend}/{name}: {row.error}"
        ref = reference.compute(name)
        assert row.loss == pytest.approx(ref.loss, rel=RTOL[effective]), name
        for p, g in ref.grads.items():
            got = row.grads[p]
            assert got.dtype == np.dtype(dtype), f"{name} {p} returned {got.dtype}"
            err = float(np.max(np.abs(got.astype(np.float64) - g)))
            assert err <= RTOL[effective] * float(np.max(np.abs(g))), f"{backend}/{name} {p}: {err}"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_gpu_request_without_a_gpu_is_a_clear_error_row(backend):
    info, job = make_job(backend, "float32", "relu", (4, 3, 2), 2, device="gpu", methods=("mean",))
    outcome = run_backend(job, info, timeout_s=300)
    if outcome.status == "ok":
        assert outcome.environment["device_kind"] == "gpu"
        pytest.skip("this machine has a GPU")
    assert outcome.status == "error" and "Traceback" not in outcome.error, outcome.error
    assert outcome.methods["mean"].status == "error"
