"""Terminal reports of a profile, drawn with rich from :mod:`vmscope.profiler.analysis`.

The analysis names are re-exported here for code that imported them from this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vmscope.errors import ConfigError
from vmscope.profiler.analysis import (
    CAUSE_DEPTH,
    EventStat,
    ExitCause,
    ExitTotal,
    FrameNamer,
    FunctionStat,
    VcpuTime,
    aggregate_stacks,
    describe_profile,
    exit_causes,
    exit_frame_name,
    exit_sample_weights,
    exit_totals,
    format_count,
    format_ns,
    format_pct,
    format_us,
    io_latency_rows,
    kvm_stat_events,
    select_samples,
    top_functions,
    vcpu_times,
)
from vmscope.profiler.emulated_table import TITLE as EMULATED_TITLE
from vmscope.profiler.emulated_table import emulated_table
from vmscope.profiler.model import IO_PART_NAMES, ORIGIN_TIMER, Profile
from vmscope.profiler.options import EVENT_CLASSES, ORIGIN_CHOICES, SORT_KEYS
from vmscope.profiler.tasks_view import comm_symbol_rows

#: the analysis names stay importable from here (they lived in this module before the split)
__all__ = [
    "CAUSE_DEPTH",
    "EVENT_CLASSES",
    "ORIGIN_CHOICES",
    "SORT_KEYS",
    "EventStat",
    "ExitCause",
    "ExitTotal",
    "FrameNamer",
    "FunctionStat",
    "ReportOptions",
    "VcpuTime",
    "aggregate_stacks",
    "describe_profile",
    "exit_causes",
    "exit_frame_name",
    "exit_sample_weights",
    "exit_totals",
    "format_count",
    "format_ns",
    "format_pct",
    "format_us",
    "io_latency_rows",
    "kvm_stat_events",
    "make_console",
    "make_table",
    "render_emulated",
    "render_exit_causes",
    "render_io_latency",
    "render_kvm_stat",
    "render_kvm_stats",
    "render_report",
    "render_top_functions",
    "render_unclaimed",
    "render_vcpu_times",
    "report_text",
    "select_samples",
    "top_functions",
    "vcpu_times",
]


def make_console(stream: IO[str] | None = None, width: int | None = None) -> Console:
    """A console for reports: colours on a terminal, plain text (wide, so names are not cut) elsewhere."""
    console = Console(file=stream, width=width)
    if width is None and not console.is_terminal:
        console = Console(file=stream, width=200, no_color=True)
    return console


def make_table(title: str, terminal: bool) -> Table:
    """Boxed for terminals, ASCII for files and pipes."""
    return Table(
        title=title,
        title_justify="left",
        title_style="bold" if terminal else "",
        box=box.SIMPLE_HEAD if terminal else box.ASCII2,
    )


# --------------------------------------------------------------------------------------------------
# the text report


@dataclass(slots=True)
class ReportOptions:
    event: str = "vmexit"
    vcpu: int | None = None
    sort: str = "samples"
    origin: str = "timer"
    limit: int = 25


def render_report(profile: Profile, console: Console, options: ReportOptions | None = None) -> None:
    """The full terminal report: time split, top functions, exits by cause, the kvm-stat table,
    the instructions vmscope emulated, unclaimed accesses and KVM stats."""
    options = options or ReportOptions()
    if options.vcpu is not None and options.vcpu not in profile.vcpus:
        raise ConfigError(f"--vcpu {options.vcpu}: the profile has vCPUs {_ranges(profile.vcpus)}")
    terminal = console.is_terminal
    namer = FrameNamer(profile.symbolizer())
    for line in describe_profile(profile):
        console.print(Text(line))
    console.print()
    render_vcpu_times(profile, console, options.vcpu, terminal)
    render_top_functions(profile, console, namer, options, terminal)
    if options.sort == "comm,sym":
        render_comm_symbols(profile, console, namer, options, terminal)
    render_exit_causes(profile, console, namer, options, terminal)
    render_kvm_stat(profile, console, options, terminal)
    render_emulated(profile, console, options.vcpu, terminal, options.limit)
    render_io_latency(profile, console, terminal)
    render_unclaimed(profile, console, terminal)
    render_kvm_stats(profile, console, options.vcpu, terminal)


def _ranges(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


def render_vcpu_times(profile: Profile, console: Console, vcpu: int | None, terminal: bool) -> None:
    rows = vcpu_times(profile, vcpu)
    duration = profile.metadata.duration_ns
    table = make_table("Where the time went, per vCPU", terminal)
    for column in (
        "vCPU",
        "Guest",
        "Guest%",
        "Exit handling",
        "Exit%",
        "Exits",
        "Guest run p50",
        "p99",
        "max",
    ):
        table.add_column(column, justify="left" if column == "vCPU" else "right")
    for row in rows:
        between = row.guest_between_exits
        table.add_row(
            f"vcpu{row.vcpu}",
            format_ns(row.guest_ns),
            format_pct(100.0 * row.guest_ns / duration) if duration else "-",
            format_ns(row.exit_handling_ns),
            format_pct(100.0 * row.exit_handling_ns / duration) if duration else "-",
            str(row.exits),
            format_ns(between.percentile(50)) if between.count else "-",
            format_ns(between.percentile(99)) if between.count else "-",
            format_ns(between.max) if between.count else "-",
        )
    console.print(table)
    console.print()


def render_top_functions(
    profile: Profile, console: Console, namer: FrameNamer, options: ReportOptions, terminal: bool
) -> None:
    samples = select_samples(profile, options.vcpu, options.origin)
    origin = "" if options.origin == "all" else f"{options.origin} "
    title = f"Top functions ({len(samples)} {origin}samples)"
    if not samples:
        hint = ""
        if options.origin == ORIGIN_TIMER and profile.samples:
            hint = " (the profile has exit samples only: try --origin exit or all)"
        console.print(Text(f"{title}: none{hint}"))
        console.print()
        return
    table = make_table(title, terminal)
    table.add_column("Self%", justify="right")
    table.add_column("Self", justify="right")
    table.add_column("Total%", justify="right")
    table.add_column("Total", justify="right")
    table.add_column("Function", overflow="fold")
    table.add_column("Module", overflow="fold")
    table.add_column("Space")
    for stat in top_functions(samples, namer)[: options.limit]:
        table.add_row(
            format_pct(stat.self_pct),
            str(stat.self_samples),
            format_pct(stat.total_pct),
            str(stat.total_samples),
            stat.name,
            stat.module or "-",
            stat.space,
        )
    console.print(table)
    console.print()


def render_comm_symbols(
    profile: Profile, console: Console, namer: FrameNamer, options: ReportOptions, terminal: bool
) -> None:
    samples = select_samples(profile, options.vcpu, options.origin)
    table = make_table(f"Functions by process ({len(samples)} samples, perf --sort comm,sym)", terminal)
    table.add_column("Overhead", justify="right")
    table.add_column("Samples", justify="right")
    table.add_column("Command")
    table.add_column("Symbol", overflow="fold")
    for row in comm_symbol_rows(samples, namer.name)[: options.limit]:
        table.add_row(format_pct(row.pct), str(row.samples), row.comm, row.symbol)
    console.print(table)
    console.print()


def render_exit_causes(
    profile: Profile, console: Console, namer: FrameNamer, options: ReportOptions, terminal: bool
) -> None:
    causes = exit_causes(profile, namer, options.vcpu)
    exit_sample_count = sum(c.samples for c in causes)
    title = f"Exits by cause ({exit_sample_count} exit samples)"
    if not causes:
        console.print(Text(f"{title}: none"))
        console.print()
        return
    table = make_table(title, terminal)
    table.add_column("Exit", overflow="fold")
    table.add_column("Guest code (leaf <- callers)", overflow="fold")
    table.add_column("Samples", justify="right")
    table.add_column("Exits (est.)", justify="right")
    table.add_column("Exits%", justify="right")
    table.add_column("Handling", justify="right")
    table.add_column("Time%", justify="right")
    for cause in causes[: options.limit]:
        table.add_row(
            cause.event,
            " <- ".join(cause.code),
            str(cause.samples),
            format_count(cause.exits),
            format_pct(cause.exits_pct),
            format_ns(cause.handling_ns),
            format_pct(cause.time_pct),
        )
    console.print(table)
    console.print()


def render_kvm_stat(profile: Profile, console: Console, options: ReportOptions, terminal: bool) -> None:
    rows = kvm_stat_events(profile, options.event, options.vcpu, options.sort)
    scope = "all vCPUs" if options.vcpu is None else f"vcpu{options.vcpu}"
    title = f"Analyze events for {scope} (event {options.event}, sorted by {options.sort})"
    if not rows:
        console.print(Text(f"{title}: no {options.event} events"))
        console.print()
        return
    table = make_table(title, terminal)
    table.add_column(
        f"{options.event.upper()} event" if options.event != "vmexit" else "VM-EXIT", overflow="fold"
    )
    for column in ("Samples", "Samples%", "Time%", "Min Time", "Max Time", "Avg time"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.event,
            str(row.samples),
            format_pct(row.samples_pct),
            format_pct(row.time_pct),
            format_us(row.min_ns),
            format_us(row.max_ns),
            f"{format_us(row.mean_ns)} ( +-{row.mean_error_pct:6.2f}% )",
        )
    console.print(table)
    total_samples = sum(r.samples for r in rows)
    total_time = sum(r.total_ns for r in rows)
    console.print(Text(f"Total Samples:{total_samples}, Total events handled time:{format_us(total_time)}."))
    console.print()


def render_emulated(
    profile: Profile, console: Console, vcpu: int | None, terminal: bool, limit: int | None = None
) -> None:
    """Instructions KVM could not emulate that vmscope completed; nothing when there were none."""
    headers, rows, summary = emulated_table(profile, vcpu, limit)
    if not rows:
        return
    table = make_table(EMULATED_TITLE, terminal)
    for index, header in enumerate(headers):
        table.add_column(header, justify="right" if index >= 3 else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(Text(summary))
    console.print()


def render_io_latency(profile: Profile, console: Console, terminal: bool) -> None:
    """Per-request virtio latency split into its virtualization parts (mean ns and share)."""
    rows = io_latency_rows(profile)
    if not rows:
        return
    table = make_table("I/O request latency, split into its parts (mean per request)", terminal)
    for column in ("Device", "Request", "Count", "Total", *IO_PART_NAMES):
        table.add_column(column, justify="left" if column in ("Device", "Request") else "right")
    for device, request, count, total, parts in rows:
        shares = [f"{format_us(part)} ({format_pct(100 * part / total if total else 0)})" for part in parts]
        table.add_row(device, request, str(count), format_us(total), *shares)
    console.print(table)
    console.print()


def render_unclaimed(profile: Profile, console: Console, terminal: bool) -> None:
    if not profile.unclaimed:
        return
    table = make_table("Accesses no device claimed", terminal)
    table.add_column("Access")
    table.add_column("Count", justify="right")
    for access in sorted(profile.unclaimed, key=lambda u: (-u.count, u.space, u.address)):
        table.add_row(access.label, str(access.count))
    console.print(table)
    console.print()


def render_kvm_stats(profile: Profile, console: Console, vcpu: int | None, terminal: bool) -> None:
    owners = [o for o in profile.kvm_stats if o == "vm" or vcpu is None or o == f"vcpu{vcpu}"]
    names = sorted(
        {n for o in owners for n, v in profile.kvm_stats[o].items() if not isinstance(v, list) and v}
    )
    if not names:
        return
    table = make_table("KVM statistics (non-zero)", terminal)
    table.add_column("Statistic")
    for owner in owners:
        table.add_column(owner, justify="right")
    for name in names:
        cells = []
        for owner in owners:
            value = profile.kvm_stats[owner].get(name)
            cells.append("" if value is None or isinstance(value, list) else f"{value:g}")
        table.add_row(name, *cells)
    console.print(table)
    console.print()


def report_text(profile: Profile, options: ReportOptions | None = None, width: int = 200) -> str:
    """The report as plain text (what ``vmscope report`` prints when stdout is not a terminal)."""
    import io

    stream = io.StringIO()
    console = Console(file=stream, width=width, no_color=True, force_terminal=False)
    render_report(profile, console, options)
    return stream.getvalue()
