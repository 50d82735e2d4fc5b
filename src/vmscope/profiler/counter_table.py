"""The host perf counters per vCPU and I/O thread as plain table rows (text report and HTML).

One row per thread. task-clock becomes milliseconds and a share of the thread's wall time (how
busy the thread was); hardware counters come in guest/host pairs, and where both exist the table
adds the guest share, the perfctr-xen split between guest work and the VMM's exit handling.
"""

from __future__ import annotations

from vmscope.host.perf_events import GUEST, HARDWARE_EVENTS, HOST, SOFTWARE_EVENTS
from vmscope.profiler.analysis import format_pct
from vmscope.profiler.model import Profile, ThreadCounters

_ORDER = [*SOFTWARE_EVENTS, *(f"{h}:{s}" for h in HARDWARE_EVENTS for s in (GUEST, HOST))]


def counter_columns(profile: Profile) -> list[str]:
    """Event names present in any thread, in catalogue order (unknown names last)."""
    present = {name for item in profile.counters for name in item.values}
    known = [name for name in _ORDER if name in present]
    return known + sorted(present - set(known))


def counter_table(profile: Profile) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the per-thread counter table (empty rows when nothing was counted)."""
    columns = counter_columns(profile)
    headers = ["Thread"]
    for name in columns:
        headers.append("task-clock ms" if name == "task-clock" else name)
        if name == "task-clock":
            headers.append("busy%")
    pairs = [h for h in HARDWARE_EVENTS if f"{h}:{GUEST}" in columns and f"{h}:{HOST}" in columns]
    headers.extend(f"{h} guest%" for h in pairs)
    rows = [_row(item, columns, pairs) for item in profile.counters]
    return headers, rows


def _row(item: ThreadCounters, columns: list[str], pairs: list[str]) -> list[str]:
    row = [item.thread]
    for name in columns:
        value = item.values.get(name)
        if name == "task-clock":
            row.append("-" if value is None else f"{value / 1e6:.1f}")
            row.append("-" if value is None or not item.wall_ns else format_pct(100.0 * value / item.wall_ns))
        else:
            row.append("-" if value is None else f"{value:,}")
    for base in pairs:
        guest, host = item.values.get(f"{base}:{GUEST}", 0), item.values.get(f"{base}:{HOST}", 0)
        row.append(format_pct(100.0 * guest / (guest + host)) if guest + host else "-")
    return row
