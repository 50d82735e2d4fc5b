"""``vmscope diff A B --format html``: the diff's tables as one self-contained page."""

from __future__ import annotations

import html

from vmscope.profiler.diff import (
    ShareChange,
    exit_cause_changes,
    exit_changes,
    format_time_delta,
    function_changes,
    function_time_changes,
)
from vmscope.profiler.model import Profile
from vmscope.profiler.report import describe_profile, format_pct

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: left; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.up { color: #b00020; } td.down { color: #05762b; }
tr.total td { font-weight: bold; border-top: 2px solid #888; }
p.meta { color: #555; margin: 0.2em 0; }
"""


def _cell(text: str, numeric: bool, extra: str = "") -> str:
    classes = " ".join(c for c in ("num" if numeric else "", extra) if c)
    return f"<td{f' class={classes!r}' if classes else ''}>{html.escape(text)}</td>"


def _direction(text: str) -> str:
    """Colour class of a delta cell: slower/more is "up", faster/less "down", zero neither."""
    digits = text.rstrip("%p").lstrip("+-")
    if not any(d in "123456789" for d in digits):
        return ""
    return "up" if text.startswith("+") else "down" if text.startswith("-") else ""


def _table(title: str, headers: list[str], rows: list[list[str]], total: list[str] | None = None) -> str:
    if not rows:
        return f"<h2>{html.escape(title)}</h2><p class=meta>no change</p>"
    head = "".join(f"<th{' class=num' if i else ''}>{html.escape(h)}</th>" for i, h in enumerate(headers))
    lines = []
    for row in rows + ([total] if total else []):
        cells = "".join(
            _cell(text, index > 0, _direction(text) if "Delta" in headers[index] else "")
            for index, text in enumerate(row)
        )
        lines.append(f"<tr{' class=total' if row is total else ''}>{cells}</tr>")
    body = "".join(lines)
    return f"<h2>{html.escape(title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _share_rows(changes: list[ShareChange], limit: int) -> list[list[str]]:
    return [
        [
            c.name,
            format_pct(c.a_pct),
            format_pct(c.b_pct),
            f"{c.delta_pp:+.2f}pp",
            format_pct(c.a_other_pct),
            format_pct(c.b_other_pct),
            f"{c.other_delta_pp:+.2f}pp",
        ]
        for c in changes
        if c.magnitude >= 0.005
    ][:limit]


def export_diff_html(
    a: Profile,
    b: Profile,
    a_name: str = "A",
    b_name: str = "B",
    limit: int = 20,
    origin: str = "timer",
    vcpu: int | None = None,
) -> str:
    times, total = function_time_changes(a, b, origin, vcpu)
    sections = [
        _table(
            "Functions: estimated self time (self share x vCPU time)",
            ["Function", "A ms", "B ms", "Delta ms", "Delta %"],
            [[c.name, *format_time_delta(c)] for c in times[:limit]],
            ["total (run time)", *format_time_delta(total)],
        ),
        _table(
            "Functions: share of samples",
            ["Function", "A self%", "B self%", "Delta", "A total%", "B total%", "Delta"],
            _share_rows(function_changes(a, b, origin, vcpu), limit),
        ),
        _table(
            "Exits: share of exits and of handling time",
            ["Exit", "A exits%", "B exits%", "Delta", "A time%", "B time%", "Delta"],
            _share_rows(exit_changes(a, b, vcpu), limit),
        ),
        _table(
            "Exit causes (exit <- guest function)",
            ["Cause", "A exits%", "B exits%", "Delta", "A time%", "B time%", "Delta"],
            _share_rows(exit_cause_changes(a, b, vcpu), limit),
        ),
    ]
    meta = "".join(
        f"<p class=meta>{html.escape(label)} = {html.escape(name)}: {html.escape(describe_profile(p)[0])}</p>"
        for label, name, p in (("A", a_name, a), ("B", b_name, b))
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>vmscope diff: {html.escape(a_name)} vs {html.escape(b_name)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>vmscope diff</h1>
{meta}
<p class=meta>Deltas are B minus A; times are estimates: a function's share of samples times the
run's vCPU time.</p>
{"".join(sections)}
</body>
</html>
"""
