"""Served workers (gradparity.run.pool): reused job after job, yet isolated like fresh processes.

A served worker must give every job what a fresh process would: a job that crashes or hangs takes its worker
down (the next job gets a new one), and a user's module is imported afresh by the next job, never served from
the previous job's cache. The models are written as users write them, in plain framework code.
"""
from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import pytest

from conftest import TINY, fake
from gradparity.backends import BACKENDS
from gradparity.experiment.inputs import build_inputs
from gradparity.experiment.spec import load_experiment
from gradparity.commands.run import experiment_job
from gradparity.run.execute import run_backend
from gradparity.run.pool import shared_workers


def job_for(info, methods=("sum", "mean")):
    exp = dataclasses.replace(load_experiment(overrides=TINY), backends=(info.name,), methods=methods)
    return experiment_job(exp, build_inputs(exp), info, methods)


def test_a_served_worker_takes_job_after_job_and_a_crash_takes_it_down(fake_env):
    with shared_workers() as pool:
        info = BACKENDS["numpy"]
        first = run_backend(job_for(info), info, 60.0)
        second = run_backend(job_for(info), info, 60.0)
        assert first.status == second.status == "ok"
        assert first.environment["pid"] == second.environment["pid"], "the second job got a new process"
        assert pool.reused >= 1

        crash = fake("crash_after_first")
        died = run_backend(job_for(crash, ("sum", "mean", "one_by_one")), crash, 60.0, extra_env=fake_env)
        assert died.status == "crashed" and died.methods["sum"].status == "ok"
        again = run_backend(job_for(crash, ("sum",)), crash, 60.0, extra_env=fake_env)
        assert again.methods["sum"].status == "ok"
        assert again.environment["pid"] != died.environment["pid"], "a crashed worker was served again"


def test_a_hung_job_is_killed_and_its_worker_leaves_the_pool(fake_env):
    with shared_workers() as pool:
        hang = fake("hang")
        hung = run_backend(job_for(hang, ("sum",)), hang, 3.0, extra_env=fake_env)
        assert hung.status == "timeout"
        assert all(w.alive() for w in pool.idle), "a killed worker was put back"


TORCH_NET = textwrap.dedent("""
    import torch


    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(4, {outputs})
""")


@pytest.mark.frameworks("torch")
def test_a_users_module_is_imported_afresh_by_each_job(tmp_path):
    """Two folders each hold a module named nets.py with a different model; two checks in a row in one pool
    (so one served torch worker) must each describe their own."""
    from gradparity.commands.check import compare_models

    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    shapes = []
    with shared_workers() as pool:
        for outputs in (3, 5):
            folder = tmp_path / f"v{outputs}"
            folder.mkdir()
            (folder / "nets.py").write_text(TORCH_NET.format(outputs=outputs))
            report = compare_models(torch="nets:make", batch=(x, np.array([0, 1, 2, 0])), sys_path=[str(folder)],
                                    methods=["mean"])
            shapes.append(tuple(report.layouts["torch"].output_shape))
        assert pool.reused >= 1
    assert shapes == [(4, 3), (4, 5)]


def test_cpu_and_auto_jobs_share_a_worker_only_on_a_machine_without_gpus(monkeypatch, tmp_path):
    """Device "cpu" only hides GPUs (CUDA_VISIBLE_DEVICES, JAX_PLATFORMS): where there is none to hide, a "cpu"
    and an "auto" job get the same worker; with GPU device nodes, or another precision, they do not."""
    from gradparity.run import pool as pool_module

    pool = pool_module.WorkerPool(tmp_path)
    info = BACKENDS["jax"]
    cpu, auto = (info.environment_variables("float32", d, str(tmp_path)) for d in ("cpu", "auto"))
    assert cpu != auto  # the environments differ ...
    monkeypatch.setattr(pool_module, "no_gpu_hardware", lambda: True)
    assert pool.key("jax", cpu, "cpu", "highest") == pool.key("jax", auto, "auto", "highest")  # ... not the key
    assert pool.key("jax", auto, "auto", "highest") != pool.key("jax", auto, "auto", "default")
    assert pool.key("jax", auto, "auto", "highest") != pool.key("jax", auto, "gpu", "highest")
    float64 = info.environment_variables("float64", "cpu", str(tmp_path))  # JAX_ENABLE_X64: a setting at import
    assert pool.key("jax", cpu, "cpu", "highest") != pool.key("jax", float64, "cpu", "highest")
    monkeypatch.setattr(pool_module, "no_gpu_hardware", lambda: False)
    assert pool.key("jax", cpu, "cpu", "highest") != pool.key("jax", auto, "auto", "highest")
