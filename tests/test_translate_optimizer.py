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
    """The translated config's update equals the source's on a constant lr to rounding (float64 numpy), the
    only 'none' cases are dampening outside torch and eps_root outside optax, and the rendering exists."""
    from gradparity.commands.translate_optimizer import renderer

    config, reason = translated_config(target, source)
    if config is None:
        assert (source.dampening and target != "torch") or (source.eps_root and target != "jax"), reason
        return
    got = semantics_of(target, config)
    lrs = [source.lr] * 15
    for scale in (1.0, 1e-7):
        a, b = _steps(source, lrs, scale), _steps(got, lrs, scale)
        assert np.max(np.abs(a - b)) <= 1e-14 * np.max(np.abs(a))
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
def test_keras_momentum_with_decay_is_reproduced_in_torch_under_a_schedule_too():
    """Keras SGD (velocity form, decoupled decay): torch's hook form reproduces it at every step of all three
    sequences; optax's chain only while the lr is constant, and the report says so (exit 0)."""
    report = translate_optimizer("keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True, "
                                 "weight_decay=0.01)", steps=12)
    assert report.exit_code == 0, report.summary
    assert _seq(report, "torch", "translation").verdict() == "reproduces"
    jax = _seq(report, "jax", "translation")
    assert jax.verdict() == "constant_lr_only"
    schedule = jax.sequences["schedule"]
    # The lr halves after step 6: the forms part at step 7 (before it, Keras-on-TensorFlow's float32 rounding
    # of its momentum is all there is, ~1e-8), and the run ends where the numpy rules say, to 1e-6 relative.
    assert schedule.rules_apart == 12 // 2 + 1
    assert max(schedule.per_step[:6]) < 1e-6 < schedule.per_step[6]
    assert abs(schedule.per_step[-1] - schedule.predicted[-1]) <= 1e-6 * schedule.predicted[-1]
    naive = _seq(report, "torch", "naive")
    assert naive.sequences["unit"].first_apart == 1   # torch's L2 decay goes through the momentum


@pytest.mark.frameworks("torch", "jax")  # the torch source, its naive port to jax
def test_no_translation_is_exit_1_with_the_reason_and_json(capsys):
    code = main(["translate", "torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5)", "--to", "jax",
                 "--steps", "6", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["schema"] == "gradparity.translate.optimizer/1"
    tr = next(c for c in doc["candidates"] if c["role"] == "translation")
    assert tr["verdict"] == "none" and "dampening" in tr["reason"]
    naive = next(c for c in doc["candidates"] if c["role"] == "naive")
    assert naive["vs_source"]["unit"]["first_apart"] == 2   # dampening first acts on the second step


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
