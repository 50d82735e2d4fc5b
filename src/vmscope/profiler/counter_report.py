"""The host perf counter table in the terminal (``vmscope stat`` and ``report``); rows come from
:mod:`vmscope.profiler.counter_table`."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from vmscope.profiler.counter_table import counter_table
from vmscope.profiler.model import Profile
from vmscope.profiler.report import make_table


def render_counters(profile: Profile, console: Console, terminal: bool) -> None:
    """The counter table and the notes on counters that could not be opened; nothing if neither."""
    if profile.counters:
        headers, rows = counter_table(profile)
        table = make_table("Host counters per thread (perf_event_open)", terminal)
        for index, header in enumerate(headers):
            table.add_column(header, justify="left" if index == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in profile.counter_notes:
        console.print(Text(f"note: {note}"), soft_wrap=True)
    if profile.counters or profile.counter_notes:
        console.print()
