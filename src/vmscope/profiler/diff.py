"""``vmscope diff A B``: which functions and which exits changed their share between two profiles.

Shares are compared, not absolute numbers, so runs of different length compare fairly. Deltas are
percentage points (B minus A), rows sorted by the largest absolute delta.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from rich.console import Console
from rich.text import Text

from vmscope.profiler.analysis import (
    FrameNamer,
    describe_profile,
    exit_causes,
    exit_totals,
    format_pct,
    select_samples,
    top_functions,
)
from vmscope.profiler.model import Profile, exit_label
from vmscope.profiler.report import make_table


@dataclass(slots=True)
class ShareChange:
    """One item's share in A and B (0..100) and the change in percentage points."""

    name: str
    a_pct: float
    b_pct: float
    #: a second share (total% for functions, time% for exits)
    a_other_pct: float = 0.0
    b_other_pct: float = 0.0

    @property
    def delta_pp(self) -> float:
        return self.b_pct - self.a_pct

    @property
    def other_delta_pp(self) -> float:
        return self.b_other_pct - self.a_other_pct

    @property
    def magnitude(self) -> float:
        return max(abs(self.delta_pp), abs(self.other_delta_pp))


def _merge(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> list[ShareChange]:
    changes = []
    for name in a.keys() | b.keys():
        a_pct, a_other = a.get(name, (0.0, 0.0))
        b_pct, b_other = b.get(name, (0.0, 0.0))
        changes.append(ShareChange(name, a_pct, b_pct, a_other, b_other))
    changes.sort(key=lambda c: (-abs(c.delta_pp), -abs(c.other_delta_pp), c.name))
    return changes


def function_changes(
    a: Profile, b: Profile, origin: str = "timer", vcpu: int | None = None
) -> list[ShareChange]:
    """Self share (``*_pct``) and total share (``*_other_pct``) per function, sorted by |Δ self|."""

    def shares(profile: Profile) -> dict[str, tuple[float, float]]:
        samples = select_samples(profile, vcpu, origin)
        namer = FrameNamer(profile.symbolizer())
        return {s.name: (s.self_pct, s.total_pct) for s in top_functions(samples, namer)}

    return _merge(shares(a), shares(b))


def exit_changes(a: Profile, b: Profile, vcpu: int | None = None) -> list[ShareChange]:
    """Share of exits (``*_pct``) and of exit handling time (``*_other_pct``) per reason+detail."""

    def shares(profile: Profile) -> dict[str, tuple[float, float]]:
        totals = exit_totals(profile, vcpu)
        count = sum(t.count for t in totals.values()) or 1
        time = sum(t.total_ns for t in totals.values()) or 1
        return {
            exit_label(t.reason, t.detail): (100.0 * t.count / count, 100.0 * t.total_ns / time)
            for t in totals.values()
        }

    changes = _merge(shares(a), shares(b))
    changes.sort(key=lambda c: (-c.magnitude, c.name))
    return changes


def exit_cause_changes(a: Profile, b: Profile, vcpu: int | None = None) -> list[ShareChange]:
    """Share of exits and of handling time per exit and guest function that caused it."""

    def shares(profile: Profile) -> dict[str, tuple[float, float]]:
        merged: dict[str, tuple[float, float]] = {}
        for cause in exit_causes(profile, FrameNamer(profile.symbolizer()), vcpu):
            name = f"{cause.event} <- {cause.code[0]}"
            exits, time = merged.get(name, (0.0, 0.0))
            merged[name] = (exits + cause.exits_pct, time + cause.time_pct)
        return merged

    changes = _merge(shares(a), shares(b))
    changes.sort(key=lambda c: (-c.magnitude, c.name))
    return changes


def _signed(value: float) -> str:
    return f"{value:+.2f}pp"


def render_diff(
    a: Profile,
    b: Profile,
    console: Console,
    a_name: str = "A",
    b_name: str = "B",
    limit: int = 20,
    origin: str = "timer",
    vcpu: int | None = None,
) -> None:
    terminal = console.is_terminal
    console.print(Text(f"A = {a_name}: {describe_profile(a)[0]}"))
    console.print(Text(f"B = {b_name}: {describe_profile(b)[0]}"))
    console.print()
    sections: list[tuple[str, list[ShareChange], tuple[str, str]]] = [
        ("Functions (self share of samples)", function_changes(a, b, origin, vcpu), ("Self", "Total")),
        ("Exits (share of exits and of handling time)", exit_changes(a, b, vcpu), ("Exits", "Time")),
        ("Exit causes (exit <- guest function)", exit_cause_changes(a, b, vcpu), ("Exits", "Time")),
    ]
    for title, changes, (first, second) in sections:
        changed = [c for c in changes if c.magnitude >= 0.005]
        if not changed:
            console.print(Text(f"{title}: no change"))
            console.print()
            continue
        table = make_table(f"{title}, sorted by |delta|", terminal)
        table.add_column("Name", overflow="fold")
        for column in (f"A {first}%", f"B {first}%", "Delta", f"A {second}%", f"B {second}%", "Delta"):
            table.add_column(column, justify="right")
        for change in changed[:limit]:
            table.add_row(
                change.name,
                format_pct(change.a_pct),
                format_pct(change.b_pct),
                _signed(change.delta_pp),
                format_pct(change.a_other_pct),
                format_pct(change.b_other_pct),
                _signed(change.other_delta_pp),
            )
        console.print(table)
        if len(changed) > limit:
            console.print(Text(f"... {len(changed) - limit} more"))
        console.print()


def diff_text(a: Profile, b: Profile, a_name: str = "A", b_name: str = "B", limit: int = 20) -> str:
    stream = io.StringIO()
    console = Console(file=stream, width=200, no_color=True, force_terminal=False)
    render_diff(a, b, console, a_name, b_name, limit)
    return stream.getvalue()
