"""Assertions for users' own test suites: ``assert_same_gradients`` and ``assert_same_outputs``.

    from gradparity.testing import assert_same_gradients

    def test_flax_port_matches_torch():
        assert_same_gradients(torch="mynets:TorchNet", jax="mynets:FlaxNet", batch=(x, y))

Each framework's model is built from its factory ('module:function') in its
own worker process, with one framework's weights mapped onto the others
(see ``gradparity.compare_models``). A failure raises AssertionError whose
message is the check's report: the verdict, the pairs beyond tolerance and
the first layer where the models part.
"""
from __future__ import annotations

from gradparity.commands.check import ModelReport, compare_models, render_text


def assert_same_gradients(torch: str | None = None, jax: str | None = None, keras: str | None = None, *,
                          batch, **kwargs) -> ModelReport:
    """Fail unless every framework's loss and gradients agree within the dtype's tolerance, for every method.

    Keyword arguments are ``compare_models``'s (loss, weights_from, mapping, methods, dtype, mode, ...).
    Returns the report when they agree.
    """
    report = compare_models(torch=torch, jax=jax, keras=keras, batch=batch, **kwargs)
    if report.verdict.status != "agree":
        raise AssertionError("gradients differ between frameworks\n" + render_text(report))
    return report


def assert_same_outputs(torch: str | None = None, jax: str | None = None, keras: str | None = None, *,
                        batch, **kwargs) -> ModelReport:
    """Fail unless every framework's model output (the logits) agrees with the source framework's.

    Gradients are not asserted (use ``assert_same_gradients``); the layer-by-layer capture still names
    the first layer that differs in the failure message.
    """
    kwargs.setdefault("methods", ("mean",))
    kwargs.setdefault("localize", "always")  # the outputs are compared in the layer-by-layer capture
    report = compare_models(torch=torch, jax=jax, keras=keras, batch=batch, **kwargs)
    failed = [o for o in report.outcomes if o.status != "ok" or any(
        m.status != "ok" for m in o.methods.values())]
    if failed:
        raise AssertionError("a model could not be run\n" + render_text(report))
    differing = [loc for loc in report.localizations
                 if any(c.point == "logits" and not c.agree for c in loc.checkpoints)]
    missing = len(report.localizations) < len(report.maps)
    if differing or missing:
        raise AssertionError("model outputs differ between frameworks\n" + render_text(report))
    return report
