"""The contract between the worker and a backend module (numpy only), one module per task.

A backend module exposes one function::

    open_session(job: WorkerJob) -> Session

that imports its framework, picks the device, pins precision and builds the
model from the canonical parameters. The session then answers
``environment()`` once and ``compute(method)`` for each requested method.

``compute`` returns the method's *native* result: the loss scalar its
reduction produced and its gradients, unnormalized (for ``sum`` that is the
sum over examples), as float numpy arrays in canonical names and layout.
Core rescales them; a backend never normalizes and never sees another
backend's results.

``jobs`` holds what every task shares (``WorkerJob``, ``RawResult``, ``Session``, the file names); ``losses``,
``models``, ``optimizers`` and ``train`` each hold one task's payload, cases and array encodings, for both the
worker that writes them and the parent that reads them. Everything is importable from this package.
"""
from __future__ import annotations

from gradparity.backends.protocol.jobs import (CaseInputs, DeviceUnavailable, IGNORE_INDEX, INPUTS_FILE, JAX_FULL_F32_PRECISIONS, JOB_FILE, RESULT_FILE, RawResult, SEPARATE_FORWARD, Session, TIMING_LOCK_ENV, WorkerJob, compile_generated, jax_precision_is_full_f32, package_versions)
from gradparity.backends.protocol.losses import (compile_loss_function, loss_case, loss_case_batch)
from gradparity.backends.protocol.models import (BatchDoesNotFit, GELU_PROBE, MODEL_CASES, MODEL_LOSSES, MODEL_METHODS, OutputNotFound, PARAM_ROLES, SESSION_METHODS, assignment, builtin_payload, call_inputs, check_switches, gelu_accuracy, gelu_probe, layer_options, first_forward, load_factory, loss_elements, select_output)
from gradparity.backends.protocol.optimizers import (OptimizerSession, cpu_environment, step_gradients)
from gradparity.backends.protocol.train import (ModelTraining, TRAIN_REDUCTIONS, label_accuracy, step_accuracy, step_losses, step_params, train_batches, train_result, train_run, train_weights)

__all__ = ['BatchDoesNotFit', 'CaseInputs', 'DeviceUnavailable', 'GELU_PROBE', 'IGNORE_INDEX', 'INPUTS_FILE', 'JAX_FULL_F32_PRECISIONS', 'JOB_FILE', 'MODEL_CASES', 'MODEL_LOSSES', 'MODEL_METHODS', 'ModelTraining', 'OptimizerSession', 'OutputNotFound', 'PARAM_ROLES', 'RESULT_FILE', 'RawResult', 'SEPARATE_FORWARD', 'SESSION_METHODS', 'Session', 'TIMING_LOCK_ENV', 'TRAIN_REDUCTIONS', 'WorkerJob', 'assignment', 'builtin_payload', 'call_inputs', 'check_switches', 'compile_generated', 'compile_loss_function', 'cpu_environment', 'first_forward', 'gelu_accuracy', 'gelu_probe', 'jax_precision_is_full_f32', 'layer_options', 'load_factory', 'loss_case', 'loss_case_batch', 'loss_elements', 'package_versions', 'label_accuracy', 'select_output', 'step_accuracy', 'step_gradients', 'step_losses', 'step_params', 'train_batches', 'train_result', 'train_run', 'train_weights']
