"""`gradparity translate` for optimizers: reading the text, the translation's semantics, and the measured runs.

Parity tests take numpy in and compare numpy out: every rendering runs unchanged in its framework's worker on
fixed gradients, and its parameters are compared with the source's native run at every step.
"""
from __future__ import annotations

import inspect
import itertools
import json

import numpy as np
import pytest

from gradparity.cli import main
from gradparity.commands.translate_optimizer import (naive_config, plan, translate_optimizer, translated_config)
from gradparity.errors import ConfigError
from gradparity.experiment.optimizer_text import parse_optimizer_text
from gradparity.experiment.optimizers import FRAMEWORKS, Semantics, semantic_rule, semantics_of


# --------------------------------------------------------------------------------------------- reading the text

@pytest.mark.frameworks("torch", "jax")  # imports torch and optax into this process
def test_defaults_are_each_frameworks_own():
    """What a text leaves out is the framework's default, read here from the installed framework's signature
    (not from gradparity): torch AdamW weight decay and eps, optax adamw's weight decay."""
    import optax
    import torch

    sig = inspect.signature(torch.optim.AdamW).parameters
    _, config, explicit = parse_optimizer_text("torch.optim.AdamW(model.parameters())")
    assert (config.weight_decay, config.eps, config.lr) == (sig["weight_decay"].default, sig["eps"].default,
                                                            sig["lr"].default)
    assert explicit == set()
    sig = inspect.signature(optax.adamw).parameters
    _, config, explicit = parse_optimizer_text("optax.adamw(3e-4)")
    assert config.weight_decay == sig["weight_decay"].default and config.eps == sig["eps"].default
    assert explicit == {"lr"}


def test_each_framework_reads_to_the_semantics_its_source_has():
    """The same update written three ways reads to one Semantics; the forms that differ are told apart."""
    adam = [semantics_of(*parse_optimizer_text(t)[:2]) for t in
            ("torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.99), eps=1e-6)",
             "optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-6)")]
    assert adam[0] == adam[1] and adam[0].epsilon == "corrected"
    keras = semantics_of(*parse_optimizer_text("keras.optimizers.Adam(0.01, beta_2=0.99, epsilon=1e-6)")[:2])
    assert keras.epsilon == "hat" and keras.eps == 1e-6 and keras.beta2 == 0.99
    l2 = [semantics_of(*parse_optimizer_text(t)[:2]) for t in
          ("torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)",
           "optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))")]
    assert l2[0] == l2[1] and l2[0].decay == "l2"
    decoupled = semantics_of(*parse_optimizer_text("keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-3)")[:2])
    assert decoupled.decay == "decoupled" and decoupled.velocity
    # torch's Adam with decoupled_weight_decay=True is AdamW.
    assert semantics_of(*parse_optimizer_text(
        "torch.optim.Adam(params, weight_decay=0.1, decoupled_weight_decay=True)")[:2]).decay == "decoupled"


@pytest.mark.parametrize("text, fragment", [
    ("torch.optim.Adam(params, lr=1e-3, amsgrad=True)", "amsgrad"),
    ("keras.optimizers.SGD(learning_rate=0.1, clipnorm=1.0)", "clipnorm"),
    ("torch.optim.SGD(params, lr=0.1, nesterov=True)", "Nesterov"),
    ("optax.adam(b1=0.9)", "learning_rate"),
    ("torch.optim.SGD(params, lr=-0.1)", "non-negative"),
    ("torch.optim.SGD(params, lr=rate)", "literal"),
    ("torch.optim.Adam(params, betas=0.9)", "pair"),
    ("keras.optimizers.Adam(learnin_rate=0.1)", "learnin_rate"),
    ("optax.chain(optax.clip(1.0), optax.sgd(0.1))", "chain"),
])
def test_what_is_not_translated_is_a_config_error_before_any_work(text, fragment):
    with pytest.raises(ConfigError) as err:
        plan(text, FRAMEWORKS, "tensorflow")
    assert fragment in str(err.value)


def test_the_cli_says_exit_2_for_an_optimizer_it_cannot_read(capsys):
    assert main(["translate", "torch.optim.Adam(params, lr=1e-3, amsgrad=True)"]) == 2
    assert "amsgrad" in capsys.readouterr().err


@pytest.mark.parametrize("text, quoted", [
    ("keras.optimizers.SGD(learning_rate=keras.optimizers.schedules.CosineDecay(0.1, 1000), momentum=0.9)",
     "learning_rate=keras.optimizers.schedules.CosineDecay(0.1, 1000) is a call, not a number"),
    ("optax.sgd(optax.cosine_decay_schedule(0.1, 1000), momentum=0.9)",
     "learning_rate=optax.cosine_decay_schedule(0.1, 1000) is a call, not a number"),
    ("torch.optim.SGD(params, lr=lr0 * 2)", "lr=lr0 * 2 is not a literal value"),
])
def test_a_schedule_or_an_expression_is_quoted_as_written(capsys, text, quoted):
    """What the text wrote is quoted back (not gradparity's internal structure), with what to write instead."""
    assert main(["translate", text]) == 2
    err = capsys.readouterr().err
    assert quoted in err and "OptimizerCall" not in err and "Traceback" not in err


@pytest.mark.parametrize("text, kind", [
    ("torch.optim.SGD(lr=0.1, momentum=0.9", "the optimizer text"),           # as pasted, one ')' short
    ("keras.optimizers.SGD(learning_rate=0.05,, momentum=0.8)", "the optimizer text"),
    ("optax.adam(1e-3", "the optimizer text"),
    ("torch.nn.CrossEntropyLoss(", "the loss text"),
])
def test_a_text_that_does_not_parse_is_named_for_what_it_calls(capsys, text, kind):
    """A syntax error is reported as the optimizer text's or the loss text's, by the callable it names."""
    assert main(["translate", text]) == 2
    err = capsys.readouterr().err
    assert f"{kind} is not a Python expression" in err and "Traceback" not in err


# --------------------------------------------------------------------------- the translation, in numpy first

_SOURCES = [Semantics("sgd", 0.1), Semantics("sgd", 0.1, momentum=0.9),
            Semantics("sgd", 0.1, momentum=0.9, nesterov=True, decay="l2", weight_decay=1e-2),
            Semantics("sgd", 0.1, momentum=0.9, velocity=True, decay="decoupled", weight_decay=1e-2),
            Semantics("sgd", 0.1, momentum=0.9, velocity=True, nesterov=True),
            Semantics("sgd", 0.1, momentum=0.9, dampening=0.3),
            *[Semantics("adam", 1e-2, beta1=0.9, beta2=0.999, eps=1e-7, epsilon=e, decay=d,
                        weight_decay=1e-2 if d != "none" else 0.0)
              for e, d in itertools.product(("corrected", "hat"), ("none", "l2", "decoupled"))],
            Semantics("adam", 1e-2, beta1=0.9, beta2=0.999, eps=1e-8, epsilon="corrected", eps_root=1e-12)]


def _steps(s: Semantics, lrs, scale=1.0):
    rng = np.random.default_rng(3)
    p, state, out = rng.standard_normal(5), {}, []
    rule = semantic_rule(s)
    for t, lr in enumerate(lrs, start=1):
        p = rule(p, rng.standard_normal(5) * scale, state, lr, t)
        out.append(p)
    return np.array(out)


@pytest.mark.parametrize("source", _SOURCES, ids=lambda s: s.describe()[:60])
@pytest.mark.parametrize("target", FRAMEWORKS)
def test_every_translation_has_the_sources_update_or_says_why_not(source, target):
    """The translated config's update equals the source's to rounding (float64 numpy, 1e-14 relative) at a
    constant lr and under a changing one that reaches 0 (schedule-exact: Keras' velocity, torch's buffer and
    its dampening included); the only 'none' case is eps_root outside optax; the rendering exists."""
    from gradparity.commands.translate_optimizer import renderer

    config, reason = translated_config(target, source)
    if config is None:
        assert source.eps_root and target != "jax", reason
        return
    got = semantics_of(target, config)
    changing = [source.lr * f for f in (1, 1, 0.5, 0, 0, 0.8, 0.2, 1, 0.3, 0.3, 1, 0.1, 0, 0.6, 0.6)]
    for lrs, scale in (([source.lr] * 15, 1.0), ([source.lr] * 15, 1e-7), (changing, 1.0)):
        a, b = _steps(source, lrs, scale), _steps(got, lrs, scale)
        assert np.max(np.abs(a - b)) <= 1e-14 * np.max(np.abs(a)), lrs
    assert "def make_optimizer" in renderer(target).render(config).code


def test_a_velocity_and_a_buffer_part_only_when_the_lr_changes():
    """Keras' lr-inside-the-velocity form equals torch's buffer form at a constant lr and not after a change:
    the reason translate measures a schedule."""
    keras = Semantics("sgd", 0.1, momentum=0.9, velocity=True)
    torch = Semantics("sgd", 0.1, momentum=0.9)
    constant, halved = [0.1] * 10, [0.1] * 5 + [0.05] * 5
    assert np.allclose(_steps(keras, constant), _steps(torch, constant), rtol=0, atol=1e-14)
    gap = np.abs(_steps(keras, halved) - _steps(torch, halved))
    assert gap[:5].max() <= 1e-14 and gap[5:].max() > 1e-3


def test_the_naive_port_takes_the_targets_defaults():
    """torch.optim.Adam(params, lr=1e-3) written as keras.optimizers.Adam(learning_rate=1e-3) gets Keras' 1e-7
    epsilon, on the uncorrected sqrt(v); AdamW's weight decay becomes the target's default."""
    framework, config, explicit = parse_optimizer_text("torch.optim.Adam(params, lr=1e-3)")
    naive = semantics_of("keras", naive_config(framework, config, explicit, "keras"))
    assert (naive.eps, naive.epsilon) == (1e-7, "hat")
    framework, config, explicit = parse_optimizer_text("torch.optim.AdamW(params, lr=1e-3)")
    assert naive_config(framework, config, explicit, "jax").weight_decay == 1e-4
    framework, config, explicit = parse_optimizer_text("torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)")
    assert naive_config(framework, config, explicit, "jax").weight_decay == 0.05


# ----------------------------------------------------------------------------- measured, in every framework

def _seq(report, framework, role):
    return next(c for c in report.candidates if c.framework == framework and c.role == role)


@pytest.mark.frameworks("torch", "keras-tensorflow", "jax")
def test_torch_adam_is_reproduced_in_keras_and_optax_and_the_naive_keras_port_is_not():
    report = translate_optimizer("torch.optim.Adam(params, lr=1e-2)", steps=12)
    assert report.exit_code == 0, report.summary
    for fw in ("keras", "jax"):
        tr = _seq(report, fw, "translation")
        assert tr.verdict() == "reproduces", (fw, {k: r.per_step for k, r in tr.sequences.items()})
    assert not _seq(report, "keras", "translation").rendering.native
    assert _seq(report, "jax", "translation").rendering.native
    naive = _seq(report, "keras", "naive")
    tiny = naive.sequences["tiny"]
    # Keras' default epsilon (1e-7, on sqrt(v)) on 1e-7 gradients: apart from the first step, by what the two
    # numpy rules predict (to 1e-6 relative: the rules are float64, the runs float64 too).
    assert tiny.first_apart == 1 and tiny.per_step[-1] > 1e-3
    assert abs(tiny.per_step[-1] - tiny.predicted[-1]) <= 1e-6 * tiny.predicted[-1]


@pytest.mark.frameworks("torch", "keras-tensorflow", "jax")
def test_keras_momentum_with_decay_is_reproduced_in_torch_and_optax_under_a_schedule_too():
    """Keras SGD (velocity form, decoupled decay): torch's VelocitySGD and optax's chain (the decay a schedule
    -wd * lr(count) after the trace) reproduce it at every step of all three sequences, the lr halving included;
    the naive ports (L2 through the momentum) are apart from step 1, by what the numpy rules predict."""
    report = translate_optimizer("keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True, "
                                 "weight_decay=0.01)", steps=12)
    assert report.exit_code == 0 and "constant learning rate only" not in report.summary, report.summary
    for fw in ("torch", "jax"):
        tr = _seq(report, fw, "translation")
        assert tr.verdict() == "reproduces", (fw, {k: r.per_step for k, r in tr.sequences.items()})
        naive = _seq(report, fw, "naive").sequences["unit"]
        assert naive.first_apart == 1   # L2 decay goes through the momentum
        # By what the rules with exact hyperparameters predict, to 1e-5 relative: Keras on TensorFlow uses its
        # momentum and decay rounded to float32 (relative 3e-8 each) even in float64, over 12 steps.
        assert abs(naive.per_step[-1] - naive.predicted[-1]) <= 1e-5 * naive.predicted[-1]


@pytest.mark.frameworks("torch", "jax")  # the optax source, its naive port to torch
def test_no_translation_is_exit_1_with_the_reason_and_json(capsys):
    code = main(["translate", "optax.adam(1e-2, eps_root=1e-8)", "--to", "torch", "--steps", "6", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["schema"] == "gradparity.translate.optimizer/1"
    tr = next(c for c in doc["candidates"] if c["role"] == "translation")
    assert tr["verdict"] == "none" and "eps_root" in tr["reason"]
    naive = next(c for c in doc["candidates"] if c["role"] == "naive")
    assert naive["vs_source"]["unit"]["first_apart"] == 1   # eps_root sits inside sqrt(v_hat) from the first step


@pytest.mark.frameworks("torch", "keras-tensorflow", "jax")
def test_keras_adam_epsilon_hat_is_reproduced_by_a_torch_hook_and_an_optax_schedule():
    """Keras Adam adds epsilon to sqrt(v): torch's eps set per step (before_step) and optax's eps as a schedule
    of the count (inject_hyperparams) reproduce it at every step, tiny gradients included."""
    report = translate_optimizer("keras.optimizers.Adam(learning_rate=1e-2)", steps=10)
    assert report.exit_code == 0, report.summary
    for fw in ("torch", "jax"):
        tr = _seq(report, fw, "translation")
        assert tr.verdict() == "reproduces" and not tr.rendering.native, fw
        assert max(tr.sequences["tiny"].per_step) <= 1e-6   # the naive port is ~1e-3 apart there
        assert _seq(report, fw, "naive").sequences["tiny"].per_step[-1] > 1e-4


@pytest.mark.frameworks("torch")
def test_keras_momentum_sgd_in_torch_holds_at_lr_zero_and_leaves_frozen_parameters_alone():
    """Keras' SGD(momentum, weight_decay) translated to torch, run as a user runs the printed code: on a cosine-like
    schedule that reaches lr 0 (where Keras still moves the weights by momentum * v) it follows Keras' rule,
    computed here in float64 numpy; a parameter that gets no gradient (frozen) is not decayed."""
    import torch

    from gradparity.backends.protocol import compile_generated
    from gradparity.backends.torch.optimizer_text import render

    text = "keras.optimizers.SGD(learning_rate=0.05, momentum=0.8, weight_decay=4e-3)"
    source, config, _ = parse_optimizer_text(text)
    semantics = semantics_of(source, config)
    target, _ = translated_config("torch", semantics)
    namespace = compile_generated(render(target).code)
    rng = np.random.default_rng(0)
    p0, frozen0 = rng.standard_normal(5), rng.standard_normal(3)
    grads = [rng.standard_normal(5) for _ in range(6)]
    lrs = [0.05, 0.03, 0.0, 0.0, 0.02, 0.05]

    p, frozen = torch.tensor(p0, requires_grad=True), torch.tensor(frozen0, requires_grad=True)
    optimizer = namespace["make_optimizer"]([p, frozen], lr=lrs[0])
    step = semantic_rule(semantics)
    want, state = p0.copy(), {}
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        optimizer.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(g)  # frozen.grad stays None
        optimizer.step()
        want = step(want, g, state, lr, t)
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12, atol=1e-15, err_msg=f"step {t}, lr {lr}")
    assert np.array_equal(frozen.detach().numpy(), frozen0)


def test_the_keras_adam_override_says_it_reads_private_slots():
    """torch's AdamW puts epsilon on the bias-corrected sqrt(v): the Keras rendering overrides update_step, which
    reads Keras' private slot lists; the rendering says so, and names the version it was checked with."""
    from gradparity.backends.keras.optimizer_text import render
    from gradparity.commands.translate_optimizer import semantics_of, translated_config

    _, config, _ = parse_optimizer_text("torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)")
    keras_config, _ = translated_config("keras", semantics_of("torch", config))
    rendering = render(keras_config)
    assert "self._momentums" in rendering.code
    assert any("private slots" in n and "keras 3.15.1" in n for n in rendering.notes), rendering.notes


# ------------------------------------- the printed code against the user's optimizer, in plain framework code
#
# The user's optimizer runs as written (torch.optim.SGD, keras.optimizers.SGD, optax.sgd), the printed code as
# pasted (exec of the rendering, make_optimizer(...)), both fed the same float32 gradients under the same changing
# learning rate (set in torch's param group as torch's schedulers do, a Keras LearningRateSchedule, an optax
# schedule), reaching lr 0 as cosine decay and warm restarts do. Tolerance after step t, relative to the largest
# parameter: 16 * u * t with u = 2**-24 (float32's unit roundoff: a few roundings per step of O(|p|) values,
# accumulating at most linearly), as `gradparity translate` uses.

_LRS = [0.1, 0.1, 0.05, 0.0, 0.0, 0.08, 0.02, 0.1]
_U32 = 2.0 ** -24


def _start_and_gradients():
    rng = np.random.default_rng(5)
    start = {"kernel": rng.standard_normal((4, 3)).astype(np.float32),
             "bias": rng.standard_normal(3).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in _LRS]
    return start, grads


def _printed(text: str, framework: str) -> str:
    """The code `gradparity translate TEXT` prints for ``framework``."""
    _, _, _, candidates = plan(text, (framework,), "tensorflow")
    rendering = next(c for c in candidates if c.role == "translation").rendering
    assert rendering is not None, f"{text}: no {framework} translation"
    return rendering.code


def _pasted(code: str):
    namespace: dict = {}
    exec(compile(code, "<printed>", "exec"), namespace)  # noqa: S102 - the code a user pastes
    return namespace["make_optimizer"]


def _apart(a, b) -> list[float]:
    """Per step: max |a - b| / max |a| over the parameters."""
    return [max(float(np.max(np.abs(x[k] - y[k]))) for k in x) / max(float(np.max(np.abs(x[k]))) for k in x)
            for x, y in zip(a, b)]


def _within_float32(a, b) -> bool:
    return all(d <= 16 * _U32 * t for t, d in enumerate(_apart(a, b), start=1))


def _torch_run(make):
    import torch

    start, grads = _start_and_gradients()
    params = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    optimizer = make(list(params.values()))
    out = []
    for g, lr in zip(grads, _LRS):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for k, p in params.items():
            p.grad = torch.tensor(g[k])
        optimizer.step()
        out.append({k: p.detach().numpy().copy() for k, p in params.items()})
    return out


def _optax_run(optimizer):
    import jax.numpy as jnp
    import optax

    start, grads = _start_and_gradients()
    params = {k: jnp.asarray(v) for k, v in start.items()}
    state, out = optimizer.init(params), []
    for g in grads:
        updates, state = optimizer.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        out.append({k: np.asarray(v) for k, v in params.items()})
    return out


def _optax_schedule():
    import jax.numpy as jnp

    table = jnp.asarray(_LRS, dtype=jnp.float32)
    return lambda count: table[count]


_KERAS_RUNNER = '''
import json, os, sys
os.environ.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
import numpy as np
import keras


class Table(keras.optimizers.schedules.LearningRateSchedule):
    """lrs[step]: Keras calls a schedule with optimizer.iterations, 0 at the first update."""

    def __init__(self, lrs):
        self.lrs = keras.ops.convert_to_tensor(np.asarray(lrs, dtype="float32"))

    def __call__(self, step):
        return keras.ops.take(self.lrs, keras.ops.cast(step, "int32"))


job = json.load(open(sys.argv[1]))
out = {}
for name, code in job["codes"].items():
    namespace = {}
    exec(code, namespace)
    optimizer = namespace["make_optimizer"](Table(job["lrs"]))
    variables = [keras.Variable(np.asarray(job["start"][k], dtype="float32")) for k in ("kernel", "bias")]
    steps = []
    for g in job["grads"]:
        optimizer.apply([keras.ops.convert_to_tensor(np.asarray(g[k], dtype="float32")) for k in ("kernel", "bias")],
                        variables)
        steps.append({k: keras.ops.convert_to_numpy(v.value).tolist() for k, v in zip(("kernel", "bias"), variables)})
    out[name] = steps
print(json.dumps(out))
'''


def _keras_runs(codes: dict[str, str], tmp_path) -> dict[str, list]:
    """Each code's ``make_optimizer(schedule)`` run in Keras 3 on TensorFlow, in a fresh Python (this process
    imports no Keras), on the same start, gradients and lrs, float32."""
    import subprocess
    import sys

    start, grads = _start_and_gradients()
    job = tmp_path / "keras_job.json"
    job.write_text(json.dumps({"codes": codes, "lrs": _LRS, "start": {k: v.tolist() for k, v in start.items()},
                               "grads": [{k: v.tolist() for k, v in g.items()} for g in grads]}))
    done = subprocess.run([sys.executable, "-c", _KERAS_RUNNER, str(job)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: [{k: np.asarray(v, dtype=np.float32) for k, v in step.items()} for step in steps]
            for name, steps in runs.items()}


#: The users' optimizers, as written, and the same in Keras for the keras runs.
_DAMPENED = "torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3)"
_TORCH_NESTEROV = "torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)"
_OPTAX_MOMENTUM = "optax.sgd(0.1, momentum=0.8)"
_KERAS_DECAY = "keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)"


@pytest.fixture(scope="module")
def keras_runs(tmp_path_factory):
    """The printed Keras code for three torch/optax optimizers, the user's Keras SGD with weight decay, and the
    native Keras SGD a port writes for torch's momentum (to show the schedule matters): one Keras process."""
    native = "import keras\n\n\ndef make_optimizer(learning_rate):\n    return {}\n"
    printed = {"dampened": _DAMPENED, "torch_nesterov": _TORCH_NESTEROV, "optax_momentum": _OPTAX_MOMENTUM}
    codes = {"keras_decay": native.format(_KERAS_DECAY.replace("=0.1,", "=learning_rate,")),
             "naive_nesterov": native.format("keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9, "
                                             "nesterov=True)")}
    missing = {}
    for name, text in printed.items():
        try:
            codes[name] = _printed(text, "keras")
        except AssertionError as exc:   # each test that needs it fails with this, the others still run
            missing[name] = str(exc)
    runs = _keras_runs(codes, tmp_path_factory.mktemp("keras"))
    return {**runs, **{name: pytest.fail.Exception(why) for name, why in missing.items()}}


def _run(runs: dict, name: str):
    """The Keras run ``name``; fails the test where gradparity printed no Keras code for it."""
    if isinstance(runs[name], BaseException):
        raise runs[name]
    return runs[name]


@pytest.mark.frameworks("torch", "jax", "keras-tensorflow")
def test_torch_sgd_with_dampening_is_reproduced_by_the_printed_optax_and_keras_code(keras_runs):
    """torch.optim.SGD(momentum=0.9, dampening=0.1, weight_decay=1e-3) (b = g at the first step, then
    b = 0.9*b + 0.9*g): the printed optax chain and Keras BufferSGD follow it at every step within float32
    rounding under a changing lr that reaches 0; the optax port without dampening does not (its first apart step
    is the second, where dampening first acts)."""
    import optax
    import torch

    user = _torch_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3))
    printed_optax = _optax_run(_pasted(_printed(_DAMPENED, "jax"))(_optax_schedule()))
    assert _within_float32(user, printed_optax), _apart(user, printed_optax)
    keras = _run(keras_runs, "dampened")
    assert _within_float32(user, keras), _apart(user, keras)
    undamped = _apart(user, _optax_run(optax.chain(optax.add_decayed_weights(1e-3),
                                                   optax.sgd(_optax_schedule(), momentum=0.9))))
    assert undamped[0] <= 16 * _U32 and min(undamped[1:]) > 100 * 16 * _U32 * len(_LRS)


@pytest.mark.frameworks("torch", "jax", "keras-tensorflow")
def test_torch_and_optax_momentum_printed_for_keras_keep_their_buffer_under_a_changing_lr(keras_runs):
    """torch's and optax's momentum keep an lr-free buffer (b = mu*b + g; p -= lr*b), Keras' SGD a velocity
    (v = mu*v - lr*g; p += v): the printed Keras code follows torch's nesterov SGD and optax.sgd at every step
    under a changing lr (lr 0 included), within float32 rounding, where Keras' own SGD parts once the lr changes."""
    import optax
    import torch

    nesterov = _torch_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True))
    keras = _run(keras_runs, "torch_nesterov")
    assert _within_float32(nesterov, keras), _apart(nesterov, keras)
    momentum = _optax_run(optax.sgd(_optax_schedule(), momentum=0.8))
    keras = _run(keras_runs, "optax_momentum")
    assert _within_float32(momentum, keras), _apart(momentum, keras)
    naive = _apart(nesterov, _run(keras_runs, "naive_nesterov"))
    first_change = next(t for t in range(1, len(_LRS)) if _LRS[t] != _LRS[t - 1])   # 0-based: step t + 1
    assert max(naive[:first_change]) <= 16 * _U32 * first_change
    assert max(naive[first_change:]) > 1e3 * 16 * _U32 * len(_LRS)


@pytest.mark.frameworks("jax", "keras-tensorflow")
def test_keras_momentum_with_weight_decay_printed_for_optax_is_exact_under_a_changing_lr(keras_runs):
    """keras.optimizers.SGD(momentum=0.9, nesterov=True, weight_decay=0.01): p -= lr*wd*p at each step's lr,
    outside a velocity that holds past lrs. The printed optax chain follows it at every step under a changing lr,
    within float32 rounding; the chain with the decay before a single lr factor (torch's buffer form, decoupled)
    parts once the lr changes."""
    import optax

    user = _run(keras_runs, "keras_decay")
    printed = _optax_run(_pasted(_printed(_KERAS_DECAY, "jax"))(_optax_schedule()))
    assert _within_float32(user, printed), _apart(user, printed)
    buffer_form = _apart(user, _optax_run(optax.chain(optax.trace(decay=0.9, nesterov=True),
                                                      optax.add_decayed_weights(0.01),
                                                      optax.scale_by_learning_rate(_optax_schedule()))))
    assert max(buffer_form) > 1e3 * 16 * _U32 * len(_LRS)


def test_keras_sgd_weight_decay_is_called_decoupled_not_l2():
    """Keras applies every optimizer's weight_decay as p -= lr*wd*p before the update (BaseOptimizer.
    _apply_weight_decay), SGD without momentum included: the description says so (and that it is then the same
    update as L2), and a torch or optax port's L2 is not reported as a weight-decay difference."""
    from gradparity.commands.translate_optimizer import _why_naive

    framework, config, semantics, candidates = plan("keras.optimizers.SGD(learning_rate=0.05, weight_decay=4e-3)",
                                                    ("torch", "jax"), "tensorflow")
    said = semantics.describe()
    assert "decoupled weight decay 0.004 (p -= lr*wd*p before the update" in said and "L2 weight decay" not in said
    assert semantics.decay == "decoupled"
    for c in candidates[1:]:
        assert c.rendering is not None and not any(w.startswith("weight decay") for w in _why_naive(semantics,
                                                                                                    c.semantics))
    with_momentum = plan("keras.optimizers.SGD(learning_rate=0.05, momentum=0.8, weight_decay=4e-3)", ("torch",),
                         "tensorflow")[2]
    assert "decoupled weight decay 0.004 (p -= lr*wd*p before the update, outside the momentum)" in \
        with_momentum.describe()
