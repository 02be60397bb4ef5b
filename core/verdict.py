"""The verdict: one status, an exit code, and a few sentences a person can act on.

Agreement is clustered (results joined by agreeing pairs); the largest
cluster is the consensus and every other cluster is explained against it:
a whole backend apart (the frameworks see different problems), one method
apart in every backend, or a result that is a constant multiple of the
consensus (a normalization mistake).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from gradparity.compare import Comparison, Tolerance, pair_index
from gradparity.normalize import UNIT_ROUNDOFF, Result

EXIT_AGREE, EXIT_DISAGREE, EXIT_INVALID, EXIT_INCOMPLETE = 0, 1, 2, 3

LINEARITY = (
    "The gradient is linear in the per-example losses (grad of sum_i l_i = sum_i grad l_i, "
    "whatever the loss, cross-entropy included), so summing per-example gradients, "
    "differentiating the summed loss and differentiating the mean loss give one gradient up to "
    "the 1/N factor and floating-point rounding."
)


@dataclass(frozen=True)
class Verdict:
    status: str        # "agree" | "disagree" | "incomplete"
    exit_code: int
    summary: str
    explanation: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"status": self.status, "exit_code": self.exit_code,
                "summary": self.summary, "explanation": list(self.explanation)}


def _clusters(labels: list[str], comparisons: list[Comparison]) -> list[list[str]]:
    """Connected components of the 'agrees with' graph, largest first (ties: first listed)."""
    parent = {x: x for x in labels}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for c in comparisons:
        if c.agree:
            parent[find(c.a)] = find(c.b)
    groups: dict[str, list[str]] = {}
    for x in labels:
        groups.setdefault(find(x), []).append(x)
    return sorted(groups.values(), key=lambda g: (-len(g), labels.index(g[0])))


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def _factor_hint(scale: float, n: int) -> str:
    """Name a recognizable constant factor, or ''."""
    if not math.isfinite(scale) or scale <= 0:
        return ""
    for value, words in ((n, f"N = {n}: a 1/N normalization is missing"),
                         (1.0 / n, f"1/N with N = {n}: a 1/N normalization is applied twice")):
        if abs(scale - value) <= 1e-3 * value:
            return " (" + words + ")"
    return ""


def _describe_cluster(group: list[str], consensus: list[str], results: dict[str, Result]) -> str:
    backends = {results[x].backend for x in group}
    methods = {results[x].method for x in group}
    all_methods_of = {b for b in backends
                      if {x for x in results if results[x].backend == b and results[x].ok} <= set(group)}
    cons_backends = {results[x].backend for x in consensus}
    if all_methods_of == backends and not (backends & cons_backends) and len(methods) > 1:
        names = ", ".join(sorted(backends))
        return (f"every method of {names} agrees with the others of {names} but not with the consensus: "
                f"the backends differ in the problem they compute (parameters, layout, activation, "
                f"data or precision), not in the reduction")
    cons_methods = {results[x].method for x in consensus}
    if len(methods) == 1 and len(backends) > 1 and not (methods & cons_methods):
        return f"method {next(iter(methods))} disagrees with the consensus in every backend that ran it"
    return "disagrees with the consensus"


def decide(results: list[Result], comparisons: list[Comparison], tol: Tolerance,
           n_examples: int, requested_dtype: str | None = None) -> Verdict:
    """Turn results and comparisons into a Verdict (status, exit code, explanation).

    ``requested_dtype`` is the experiment's dtype: a backend that reports
    narrower arithmetic is named, since its pairs get the wider tolerance.
    """
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    by_label = {r.label: r for r in results}
    lines: list[str] = []
    if failed:
        backends_failed = sorted({r.backend for r in failed})
        lines.append(f"{len(failed)} of {len(results)} results could not be computed "
                     f"({', '.join(backends_failed)}); see their errors. Nothing is claimed about them.")
    nonfinite = [r.label for r in ok if not (math.isfinite(r.grad_norm) and math.isfinite(r.loss))]
    if nonfinite:
        lines.append(f"Non-finite loss or gradient (NaN/inf) in {', '.join(nonfinite)}.")

    narrowed = sorted({r.backend for r in ok if requested_dtype == "float64" and r.dtype == "float32"})
    if narrowed:
        lines.append(f"{', '.join(narrowed)} computed part of this float64 run in float32 (see "
                     "precision in its environment), so its pairs use float32's tolerance "
                     f"{_fmt(tol.rtol(UNIT_ROUNDOFF['float32']))}.")
    tf32 = sorted({r.backend for r in ok if r.unit_roundoff == UNIT_ROUNDOFF["tf32"]})
    if tf32:
        lines.append(f"TF32 was possible in {', '.join(tf32)} (precision = {'default'!r}): pairs with it "
                     f"use TF32's roundoff 2^-11, so differences below rtol {_fmt(tol.rtol(UNIT_ROUNDOFF['tf32']))} "
                     "cannot be told from rounding; rerun with precision = 'highest' to resolve them.")

    disagreeing = [c for c in comparisons if not c.agree]
    if len(ok) < 2:
        return Verdict("incomplete", EXIT_INCOMPLETE,
                       f"INCOMPLETE: only {len(ok)} result computed, nothing to compare", lines)

    if not disagreeing:
        worst = max(comparisons, key=lambda c: c.max_rel / c.tolerance)
        pct = 100.0 * worst.max_rel / worst.tolerance
        summary = (f"all {len(ok)} results agree; largest difference {_fmt(worst.max_rel)} "
                   f"({worst.a} vs {worst.b}), {pct:.2g}% of its tolerance {_fmt(worst.tolerance)}")
        lines.insert(0, f"All {len(comparisons)} pairs agree within tolerance. "
                        f"Worst pair: {worst.a} vs {worst.b}, max_rel {_fmt(worst.max_rel)} "
                        f"(in {worst.worst_param}) against rtol {_fmt(worst.tolerance)}.")
        if len({r.method for r in ok}) > 1:
            lines.insert(1, LINEARITY + " A difference like the 0.0316 in the seed question is not "
                            "caused by the loss: look for different inputs (a short last batch "
                            "averaged per batch, gradients not zeroed between methods).")
        if pct > 50:
            lines.append(f"The worst pair used {pct:.0f}% of its tolerance: close to the bound; "
                         "a float64 run would separate rounding from a real difference.")
        if failed:
            return Verdict("incomplete", EXIT_INCOMPLETE, "INCOMPLETE: " + summary, lines)
        return Verdict("agree", EXIT_AGREE, "AGREE: " + summary, lines)

    labels = [r.label for r in ok]
    groups = _clusters(labels, comparisons)
    consensus = groups[0]
    pairs = pair_index(comparisons)
    worst = max(disagreeing, key=lambda c: c.max_rel / c.tolerance)
    summary = (f"{len(disagreeing)} of {len(comparisons)} pairs disagree; worst {worst.a} vs {worst.b}: "
               f"max_rel {_fmt(worst.max_rel)} > rtol {_fmt(worst.tolerance)}")
    if len(groups) > 1 and len(consensus) > 1:
        lines.insert(0, f"{len(consensus)} results agree with each other (the consensus: "
                        f"{_short(consensus)}).")
        for group in groups[1:]:
            # Against the closest consensus member: the most charitable reading of the difference.
            c = min((pairs[(g, m)] for g in group for m in consensus), key=lambda c: c.max_rel)
            text = (f"{_short(group)}: {_describe_cluster(group, consensus, by_label)}. "
                    f"Closest pair {c.a} vs {c.b}: max_rel {_fmt(c.max_rel)} (in {c.worst_param}), "
                    f"max_abs {_fmt(c.max_abs)}, cosine {c.cosine:.6f}, loss differs by "
                    f"{_fmt(c.loss_rel)} relative; rtol {_fmt(c.tolerance)}.")
            if math.isfinite(c.scaled_max_rel) and c.scaled_max_rel <= c.tolerance:
                # Say it as "outlier = factor x consensus", whichever way round the pair was stored.
                outlier, member, scale = (c.a, c.b, c.scale) if c.a in group else (c.b, c.a, 1.0 / c.scale)
                text += (f" {outlier} is {scale:.6g} x {member} to within tolerance: a constant factor, "
                         f"i.e. a normalization difference{_factor_hint(scale, n_examples)}.")
            lines.append(text)
    else:
        lines.insert(0, f"No two results form a consensus. Worst pair {worst.a} vs {worst.b}: "
                        f"max_rel {_fmt(worst.max_rel)} (in {worst.worst_param}), rtol {_fmt(worst.tolerance)}.")
    return Verdict("disagree", EXIT_DISAGREE, "DISAGREE: " + summary, lines)


def _short(labels: list[str], limit: int = 6) -> str:
    if len(labels) <= limit:
        return ", ".join(labels)
    return ", ".join(labels[:limit]) + f" and {len(labels) - limit} more"
