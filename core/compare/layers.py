"""What a built-in model's layer settings did to a run: measured notes for the verdict's explanation.

Two things part frameworks that compute the same CNN or sequence model: a layer setting left at the
framework's default (``model.defaults = "framework"``), and the accuracy of a framework's own GELU. Both are
measured here, from the run's own numbers: each backend's result against the float64 reference computed
with that backend's settings, and each framework's GELU as its worker measured it.
"""
from __future__ import annotations

from gradparity.compare.normalize import Result
from gradparity.compare.pairs import Comparison, relative_difference
from gradparity.compare.tolerance import Tolerance
from gradparity.run.execute import BackendOutcome


def _settings_text(settings: dict, requested: dict, kind: str, uses_gelu: bool) -> str:
    keys = (["gelu"] if uses_gelu else []) + (["layernorm_epsilon"] if kind == "sequence" else ["same_padding"])
    names = {"gelu": "GELU", "layernorm_epsilon": "LayerNorm epsilon", "same_padding": "odd 'same' padding"}
    return ", ".join(f"{names[k]} {settings[k]:g}" if isinstance(settings[k], float) else
                     f"{names[k]} {settings[k]}" for k in keys if settings[k] != requested[k])


def defaults_notes(inputs, results: list[Result], outcomes: list[BackendOutcome], tol: Tolerance) -> list[str]:
    """For each backend that computed with other layer settings than requested (its framework's defaults):
    how far its mean-loss gradient is from the reference, and from float64 numpy computed with its settings."""
    model = inputs.model
    if model.kind == "mlp":
        return []
    from gradparity.reference import models as reference

    requested = model.options.resolved(None)
    uses_gelu = model.kind == "sequence" or model.activation == "gelu"
    params = {k: v.astype("float64") for k, v in inputs.params.items()}
    x, y = inputs.batch["x"], inputs.batch["y"]
    m = inputs.n_examples * model.loss_terms()
    base = reference.loss_and_grads(params, x, y, model.to_dict())[1]
    notes = []
    for o in outcomes:
        settings = (o.environment or {}).get("layer_options")
        row = next((r for r in results if r.backend == o.backend and r.ok), None)
        if not settings or row is None:
            continue
        changed = _settings_text(settings, requested, model.kind, uses_gelu)
        if not changed:
            continue
        own = reference.loss_and_grads(params, x, y, model.to_dict(), settings=settings)[1]
        _, to_own, _ = relative_difference(row.grads, {k: g / m for k, g in own.items()}, tol.term_scale)
        _, to_requested, worst = relative_difference(row.grads, {k: g / m for k, g in base.items()}, tol.term_scale)
        notes.append(f"{o.backend} computed with its framework's defaults ({changed}; model.defaults = 'framework'): "
                     f"{row.label} is {to_requested:.3g} from the reference with the requested settings (worst in "
                     f"{worst}) and {to_own:.3g} from float64 numpy with its own settings, so "
                     + ("those defaults account for the difference" if to_own < to_requested / 100 else
                        "its defaults do not explain the whole difference"))
    return notes


def gelu_notes(outcomes: list[BackendOutcome], results: list[Result], comparisons: list[Comparison],
               tol: Tolerance) -> list[str]:
    """For a backend in a disagreeing pair whose own GELU, measured in its worker, is off by more than its
    rtol: say that this alone can part it from the others (TensorFlow's float64 GELU is off by ~5e-9)."""
    notes = []
    unit = {r.backend: r.unit_roundoff for r in results if r.unit_roundoff is not None}
    apart = {b for c in comparisons if not c.agree for b in (c.a.split("/")[0], c.b.split("/")[0])}
    for o in outcomes:
        acc = (o.environment or {}).get("gelu_accuracy")
        if not acc or o.backend not in apart or o.backend not in unit:
            continue
        rtol = tol.rtol(unit[o.backend])
        if acc["max_abs_error"] > rtol:
            notes.append(f"{o.backend}'s own GELU ({acc['form']}) is off by up to {acc['max_abs_error']:.3g} "
                         f"(measured in its worker: {acc['points']}), more than the rtol {rtol:.3g} of its "
                         "arithmetic: differences of that order come from the framework's GELU, not from the "
                         "model or the reduction")
    return notes
