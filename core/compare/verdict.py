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

from gradparity.compare.normalize import Result
from gradparity.compare.pairs import Comparison, connected_components, pair_index
from gradparity.compare.tolerance import UNIT_ROUNDOFF, Tolerance
from gradparity.errors import Interrupted

from gradparity.exit_codes import EXIT_AGREE, EXIT_DISAGREE, EXIT_INCOMPLETE, EXIT_INVALID  # noqa: F401 (re-exported)

LINEARITY = (
    "The gradient is linear in the per-example losses (grad of sum_i l_i = sum_i grad l_i, "
    "whatever the loss, cross-entropy included), so summing per-example gradients, "
    "differentiating the summed loss and differentiating the mean loss give one gradient up to "
    "the 1/N factor and floating-point rounding."
)


@dataclass(frozen=True)
class Verdict:
    status: str        # "agree" | "disagree" | "incomplete" | "interrupted"
    exit_code: int
    summary: str
    explanation: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"status": self.status, "exit_code": self.exit_code,
                "summary": self.summary, "explanation": list(self.explanation)}


def _clusters(labels: list[str], comparisons: list[Comparison]) -> list[list[str]]:
    """Connected components of the 'agrees with' graph, largest first (ties: first listed)."""
    groups = connected_components(labels, ((c.a, c.b) for c in comparisons if c.agree))
    return sorted(groups, key=lambda g: (-len(g), labels.index(g[0])))


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


def _describe_cluster(group: list[str], consensus: list[str], results: dict[str, Result],
                      against: str = "the consensus") -> str:
    backends = {results[x].backend for x in group}
    methods = {results[x].method for x in group}
    all_methods_of = {b for b in backends
                      if {x for x in results if results[x].backend == b and results[x].ok} <= set(group)}
    cons_backends = {results[x].backend for x in consensus}
    if all_methods_of == backends and not (backends & cons_backends) and len(methods) > 1:
        names = ", ".join(sorted(backends))
        return (f"every method of {names} agrees with the others of {names} but not with {against}: "
                f"the backends differ in the problem they compute (parameters, layout, activation, "
                f"data or precision), not in the reduction")
    cons_methods = {results[x].method for x in consensus}
    if len(methods) == 1 and len(backends) > 1 and not (methods & cons_methods):
        return f"method {next(iter(methods))} disagrees with {against} in every backend that ran it"
    return f"disagrees with {against}"


UNTESTED_CAUSES = (
    "Not tested by this run: every method here saw the same batch and the same parameters, with fresh "
    "gradients. Causes that change what a method sees (a short last batch averaged per batch, gradients "
    "not zeroed between methods or steps, dropout or batch-norm in training mode, reduced precision) were "
    "not exercised; if your own methods differ by more than rounding, they are the hypotheses to check: the "
    "[causes] switches reproduce them here, and `gradparity diagnose` ranks them against your own numbers."
)


def _context_lines(ok: list[Result], failed: list[Result], nonfinite: list[Result], results: list[Result],
                   tol: Tolerance, requested_dtype: str | None) -> list[str]:
    """What qualifies every claim: rows not computed, non-finite rows, narrowed dtypes, TF32."""
    lines = []
    if failed:
        backends_failed = sorted({r.backend for r in failed})
        lines.append(f"{len(failed)} of {len(results)} results could not be computed "
                     f"({', '.join(backends_failed)}); see their errors. Nothing is claimed about them.")
    if nonfinite:
        lines.append(f"{len(nonfinite)} result(s) are not finite and were not compared: "
                     + "; ".join(f"{r.label} ({r.dtype}): {r.error.removeprefix('non-finite result: ')}"
                                 for r in nonfinite[:3])
                     + (f"; and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else "")
                     + ". NaN/inf means overflow or an invalid operation in that backend's arithmetic "
                       "(a wider dtype, or smaller inputs, avoid overflow); it is never a reduction factor.")
    narrowed = sorted({r.backend for r in ok if requested_dtype == "float64" and r.dtype == "float32"})
    if narrowed:
        lines.append(f"{', '.join(narrowed)} computed part of this float64 run in float32 (see "
                     "precision in its environment), so its pairs use float32's tolerance "
                     f"{_fmt(tol.rtol(UNIT_ROUNDOFF['float32']))}.")
    tf32 = sorted({r.backend for r in ok if r.dtype == "float32" and r.unit_roundoff == UNIT_ROUNDOFF["tf32"]})
    if tf32:
        lines.append(f"TF32 was possible in {', '.join(tf32)} (precision = {'default'!r}): pairs with it "
                     f"use TF32's roundoff 2^-11, so differences below rtol {_fmt(tol.rtol(UNIT_ROUNDOFF['tf32']))} "
                     "cannot be told from rounding; rerun with precision = 'highest' to resolve them.")
    for narrow in ("bfloat16", "float16"):
        rows = sorted({r.backend for r in ok if r.dtype == narrow})
        if rows:
            lines.append(f"{', '.join(rows)} computed in {narrow} (autocast / mixed precision): pairs with them use "
                         f"{narrow}'s roundoff, rtol {_fmt(tol.rtol(UNIT_ROUNDOFF[narrow]))}, so differences "
                         "below it cannot be told from rounding; float32's rtol is "
                         f"{_fmt(tol.rtol(UNIT_ROUNDOFF['float32']))}.")
    return lines


def _agreement_summary(ok: list[Result], comparisons: list[Comparison]) -> tuple[str, str]:
    """(headline, first explanation line) for results that all agree.

    Two different things, each labelled: the largest difference (max_rel) and
    the pair that used the largest share of its own tolerance; pairs of
    different precision have different bounds, so they need not be the same pair.
    """
    largest = max(comparisons, key=lambda c: c.max_rel)
    closest = max(comparisons, key=lambda c: c.max_rel / c.tolerance)
    share = lambda c: f"{100.0 * c.max_rel / c.tolerance:.2g}%"
    head = (f"all {len(ok)} results agree; largest difference max_rel {_fmt(largest.max_rel)} "
            f"({largest.a} vs {largest.b}, {share(largest)} of its rtol {_fmt(largest.tolerance)})")
    if closest is not largest:
        head += (f"; closest to its bound: {closest.a} vs {closest.b}, max_rel {_fmt(closest.max_rel)} "
                 f"= {share(closest)} of its rtol {_fmt(closest.tolerance)}")
    line = (f"All {len(comparisons)} pairs agree within tolerance. Largest difference: {largest.a} vs "
            f"{largest.b}, max_rel {_fmt(largest.max_rel)} (in {largest.worst_param}) against rtol "
            f"{_fmt(largest.tolerance)}.")
    if closest is not largest:
        line += (f" Closest to its bound: {closest.a} vs {closest.b}, max_rel {_fmt(closest.max_rel)} "
                 f"(in {closest.worst_param}), {share(closest)} of its rtol {_fmt(closest.tolerance)}.")
    return head, line


def decide(results: list[Result], comparisons: list[Comparison], tol: Tolerance,
           n_examples: int, requested_dtype: str | None = None,
           interrupted: Interrupted | None = None, switches: tuple[str, ...] = (),
           reduction_experiment: bool = True, reference: str | None = None) -> Verdict:
    """Turn results and comparisons into a Verdict (status, exit code, explanation).

    ``requested_dtype`` is the experiment's dtype: a backend that reports
    narrower arithmetic is named, since its pairs get the wider tolerance.
    ``interrupted``: the signal that stopped the run; the verdict then covers
    only what finished, says so, and carries the signal's exit code.
    ``reduction_experiment``: the results come from ``run`` (the agreement text then names the causes that
    run did not exercise); False for other commands (``check``), where that text does not apply.
    ``reference``: a backend the others are checked against (``check``'s source framework): a disagreement is
    explained against its results, not against the largest group that agrees.
    Statuses, by precedence: interrupted; disagree (a pair over its bound, or
    finite results beside non-finite ones); incomplete; agree.
    """
    ok = [r for r in results if r.ok]
    nonfinite = [r for r in results if r.status == "nonfinite"]
    failed = [r for r in results if not r.ok and r.status != "nonfinite"]
    by_label = {r.label: r for r in results}
    lines = _context_lines(ok, failed, nonfinite, results, tol, requested_dtype)
    disagreeing = [c for c in comparisons if not c.agree]

    if interrupted is not None:
        done = f"{len(ok)} of {len(results)} results were computed before it stopped"
        if len(ok) >= 2 and not disagreeing:
            head, line = _agreement_summary(ok, comparisons)
            done += "; " + head.replace(f"all {len(ok)} results agree", "those agree")
            lines.insert(0, line)
        elif disagreeing:
            done += f"; {len(disagreeing)} of {len(comparisons)} pairs among them disagree"
        lines.insert(0, f"The run was interrupted by {interrupted.signal_name}: the rows marked "
                        "interrupted were never computed, and nothing is claimed about them.")
        return Verdict("interrupted", interrupted.exit_code,
                       f"INTERRUPTED by {interrupted.signal_name}: {done}", lines)

    if nonfinite and ok:
        return Verdict("disagree", EXIT_DISAGREE,
                       f"DISAGREE: {len(nonfinite)} result(s) are NaN/inf while {len(ok)} are finite "
                       f"(first: {nonfinite[0].label}, {nonfinite[0].error.removeprefix('non-finite result: ')})",
                       lines + _disagreement_lines(ok, comparisons, disagreeing, by_label, n_examples, reference)[1])

    if len(ok) < 2:
        return Verdict("incomplete", EXIT_INCOMPLETE,
                       f"INCOMPLETE: only {len(ok)} finite result computed, nothing to compare", lines)

    if not disagreeing:
        head, line = _agreement_summary(ok, comparisons)
        lines.insert(0, line)
        if len({r.method for r in ok}) > 1:
            lines.insert(1, LINEARITY + " This run measured it: the methods above agree to rounding.")
            if switches or reduction_experiment:
                lines.insert(2, UNTESTED_CAUSES if not switches else
                             f"This run turned discrepancy switches on ({', '.join(switches)}; see the header): "
                             "the results agree within the tolerance of the arithmetic each backend reported.")
        closest = max(comparisons, key=lambda c: c.max_rel / c.tolerance)
        pct = 100.0 * closest.max_rel / closest.tolerance
        if pct > 50:
            lines.append(f"The pair closest to its bound used {pct:.0f}% of its tolerance; "
                         "a float64 run would separate rounding from a real difference.")
        if failed or nonfinite:
            return Verdict("incomplete", EXIT_INCOMPLETE, "INCOMPLETE: " + head, lines)
        return Verdict("agree", EXIT_AGREE, "AGREE: " + head, lines)

    summary, explained = _disagreement_lines(ok, comparisons, disagreeing, by_label, n_examples, reference)
    return Verdict("disagree", EXIT_DISAGREE, "DISAGREE: " + summary, explained + lines)


def judged_groups(ok: list[Result], comparisons: list[Comparison],
                  reference: str | None = None) -> tuple[list[list[str]], list[str] | None]:
    """The groups of finite results that agree (connected through agreeing pairs), the one the others are
    judged against first: with a ``reference`` backend the group holding its first result, else the largest.
    Also that reference group (None without one). The verdict explains every other group as differing from the
    first; the report's plots colour the rows the same way."""
    groups = _clusters([r.label for r in ok], comparisons)
    backend = {r.label: r.backend for r in ok}
    ref = next((g for g in groups if any(backend[x] == reference for x in g)), None)
    if ref is not None:
        groups = [ref] + [g for g in groups if g is not ref]
    return groups, ref


def _disagreement_lines(ok, comparisons, disagreeing, by_label, n_examples,
                        reference: str | None = None) -> tuple[str, list[str]]:
    """(summary, explanation lines) for finite results of which some pairs disagree (or none: ('', [])); with a
    ``reference`` backend, the other groups are explained against the group holding its first result."""
    if not disagreeing:
        return "", []
    groups, ref = judged_groups(ok, comparisons, reference)
    consensus = groups[0]
    against = "the consensus" if ref is None else f"the reference ({reference})"
    pairs = pair_index(comparisons)
    worst = max(disagreeing, key=lambda c: c.max_rel / c.tolerance)
    summary = (f"{len(disagreeing)} of {len(comparisons)} pairs disagree; worst {worst.a} vs {worst.b}: "
               f"max_rel {_fmt(worst.max_rel)} > rtol {_fmt(worst.tolerance)}")
    lines = []
    if ref is not None and len(groups) > 1:
        lines.append(f"The reference is {reference}, the framework the others are checked against"
                     + (f": its {len(consensus)} results agree with each other ({_short(consensus)})."
                        if len(consensus) > 1 else f" ({consensus[0]})."))
    elif len(groups) > 1 and len(consensus) > 1:
        lines.append(f"{len(consensus)} results agree with each other (the consensus: {_short(consensus)}).")
    if len(groups) > 1 and (ref is not None or len(consensus) > 1):
        for group in groups[1:]:
            # Against the closest consensus member: the most charitable reading of the difference.
            c = min((pairs[(g, m)] for g in group for m in consensus), key=lambda c: c.max_rel)
            text = (f"{_short(group)}: {_describe_cluster(group, consensus, by_label, against)}. "
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
        lines.append(f"No two results form a consensus. Worst pair {worst.a} vs {worst.b}: "
                     f"max_rel {_fmt(worst.max_rel)} (in {worst.worst_param}), rtol {_fmt(worst.tolerance)}.")
    return summary, lines


def _short(labels: list[str], limit: int = 6) -> str:
    if len(labels) <= limit:
        return ", ".join(labels)
    return ", ".join(labels[:limit]) + f" and {len(labels) - limit} more"
