"""The data-parallel section of ``gradparity run``'s report (``commands.data_parallel.DataParallelReport``): its
table, the per-backend summary (which configurations give the single-device gradient, what the others need),
for the terminal and report.md."""
from __future__ import annotations

from gradparity.compare.parallel import expected_text
from gradparity.report.render import _table as table


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def table_rows(report) -> tuple[list[str], list[list[str]]]:
    """The section's table: one row per backend x engine configuration x global batch x reduction."""
    head = ["backend", "engine", "batch", "reduction", "shards", "factor", "expected", "max_rel vs 1 device",
            "rtol", "same as 1 device"]
    rows = []
    for r in report.rows:
        shards = "/".join(map(str, r.shards)) if r.shards else "-"
        if r.status != "ok":
            factor, agree = f"({r.status})", "-"
        else:
            factor = r.factor_text or "not constant"
            agree = "yes" if r.agree else "NO"
        expected = ("refused" if r.expected_refusal else expected_text(r.expected) if r.expected_constant
                    else "not constant")
        rows.append([r.backend, r.engine, f"{r.sharding} {r.batch}", r.method, shards, factor, expected,
                     _fmt(r.max_rel), _fmt(r.tolerance), agree])
    return head, rows


def summary_lines(report) -> list[str]:
    """Per backend: which configurations give the single-device gradient, and what the others need."""
    lines = []
    for backend in report.outcomes:
        rows = [r for r in report.rows if r.backend == backend]
        o = report.outcomes[backend]
        if o.status != "ok" and not any(r.status == "ok" for r in rows):
            lines.append(f"{backend}: did not run: {o.error or o.status}")
            continue
        same = [r for r in rows if r.agree]
        lines.append(f"{backend}: the single-device gradient from "
                     + (", ".join(f"{r.engine} with {r.method} ({r.sharding} shards)" for r in same) or "no "
                        "configuration"))
        told = set()
        for r in rows:
            if r.agree:
                continue
            if r.status == "refused":
                if (r.engine, r.sharding) not in told:   # one line per engine and batch, both reductions
                    told.add((r.engine, r.sharding))
                    lines.append(f"  {r.engine} refuses the {r.sharding} batch of {r.batch} on R = {r.replicas}: "
                                 f"{_short(r.error)}")
            elif r.status != "ok":
                lines.append(f"  {r.engine}, {r.method}, {r.sharding} batch of {r.batch}: {r.status}: "
                             f"{_short(r.error)}")
            else:
                lines.append(f"  {r.engine}, {r.method} ({r.reduction}), {r.sharding} batch of {r.batch}: {r.advice}")
        off = [r for r in rows if r.as_expected is False]
        for r in off:
            said = ("refused" if r.expected_refusal else expected_text(r.expected) if r.expected_constant
                    else "no constant factor")
            lines.append(f"  NOTE: {r.engine}, {r.method}, {r.sharding}: measured "
                         f"{r.status if r.status != 'ok' else r.factor_text or 'no constant factor'}, the "
                         f"documented convention gives {said}")
    return lines


def _short(text: str | None, limit: int = 240) -> str:
    """An engine's message on one line, cut at ``limit`` characters (report.json keeps all of it)."""
    one = " ".join((text or "").split())
    return one if len(one) <= limit else one[:limit - 3].rstrip() + "..."


def render_lines(report) -> list[str]:
    """The terminal section."""
    head, rows = table_rows(report)
    b = report.batches
    return ([f"Data-parallel engines, R = {report.spec.replicas} replicas on this machine (global batches: even "
             f"{b.even}, uneven {b.uneven}; factor = engine gradient / single-device gradient of the same batch "
             "and reduction):"] + (["INTERRUPTED: only what finished is reported"] if report.interrupted else [])
            + [table(head, rows), ""] + summary_lines(report))


def render_markdown(report) -> list[str]:
    head, rows = table_rows(report)
    b = report.batches
    md = ["", "## Data-parallel engines", "",
          f"R = {report.spec.replicas} replicas on this machine; global batches: even {b.even} examples, uneven "
          f"{b.uneven}. factor = the engine's gradient over the single-device gradient of the same global batch "
          "with the same reduction (when one constant); expected = what the framework's documented convention "
          "gives.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"- {line.strip()}" for line in summary_lines(report)]
    return md
