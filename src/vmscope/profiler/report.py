"""Profile analysis (top functions, exits by cause, perf-kvm-stat events) and terminal reports.

The analysis functions return plain dataclasses that the text report, the HTML exporter and
``vmscope diff`` share. Percentages are 0..100 floats.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vmscope.errors import ConfigError
from vmscope.histogram import LatencyHistogram
from vmscope.profiler.model import IO_PART_NAMES, ORIGIN_EXIT, ORIGIN_TIMER, Profile, Sample, Span, exit_label
from vmscope.profiler.symbols import Symbolizer, address_space

EVENT_CLASSES = ("vmexit", "ioport", "mmio")
SORT_KEYS = ("samples", "time")
ORIGIN_CHOICES = ("timer", "exit", "all")
#: exit reasons whose ``detail`` is the ioport / mmio event name
_EVENT_REASON = {"ioport": "IO", "mmio": "MMIO"}
#: how many frames of guest code name an exit cause
CAUSE_DEPTH = 3


# --------------------------------------------------------------------------------------------------
# naming frames


class FrameNamer:
    """Function names for guest addresses, cached (stacks repeat the same addresses a lot)."""

    def __init__(self, symbolizer: Symbolizer) -> None:
        self.symbolizer = symbolizer
        self._names: dict[int, str] = {}
        self._modules: dict[int, str] = {}

    def name(self, address: int) -> str:
        name = self._names.get(address)
        if name is None:
            name = self._names[address] = self.symbolizer.function_name(address)
        return name

    def module(self, address: int) -> str:
        module = self._modules.get(address)
        if module is None:
            symbol = self.symbolizer.lookup(address)
            if symbol is not None:
                module = symbol.module
            else:
                located = self.symbolizer.module_of(address)
                module = located[0] if located else ""
            self._modules[address] = module
        return module

    def stack(self, sample: Sample) -> list[str]:
        """Function names of ``sample``'s frames, leaf first."""
        return [self.name(address) for address in sample.frames]


def exit_frame_name(sample: Sample) -> str | None:
    """The synthetic leaf frame that marks an exit sample in flame graphs: ``[exit IO port 0x3f8 out]``."""
    key = sample.exit_key
    if sample.origin != ORIGIN_EXIT or key is None:
        return None
    return f"[exit {exit_label(*key)}]"


def select_samples(profile: Profile, vcpu: int | None = None, origin: str = "timer") -> list[Sample]:
    """Samples of one origin ("timer", "exit" or "all"), optionally of one vCPU."""
    if origin not in ORIGIN_CHOICES:
        raise ConfigError(f"sample origin {origin!r} is not one of {', '.join(ORIGIN_CHOICES)}")
    return [
        sample
        for sample in profile.samples
        if (vcpu is None or sample.vcpu == vcpu) and (origin == "all" or sample.origin == origin)
    ]


def aggregate_stacks(
    samples: Iterable[Sample],
    namer: FrameNamer,
    prefix: str = "none",
    annotate_exits: bool = True,
    weights: dict[int, float] | None = None,
) -> dict[tuple[str, ...], float]:
    """Root-first stacks of function names -> summed weight (1 per sample unless ``weights`` maps
    ``id(sample)`` to a weight). ``prefix`` "vcpu" or "cpl" adds a root frame ("vcpu0", "kernel")."""
    if prefix not in ("none", "vcpu", "cpl"):
        raise ConfigError(f"stack prefix {prefix!r} is not one of none, vcpu, cpl")
    totals: dict[tuple[str, ...], float] = defaultdict(float)
    for sample in samples:
        names = namer.stack(sample)
        names.reverse()
        if prefix == "vcpu":
            names.insert(0, f"vcpu{sample.vcpu}")
        elif prefix == "cpl":
            names.insert(0, address_space(sample.ip, sample.cpl))
        if annotate_exits:
            exit_name = exit_frame_name(sample)
            if exit_name is not None:
                names.append(exit_name)
        totals[tuple(names)] += 1.0 if weights is None else weights.get(id(sample), 0.0)
    return dict(totals)


# --------------------------------------------------------------------------------------------------
# top functions


@dataclass(slots=True)
class FunctionStat:
    name: str
    module: str
    space: str  # "kernel" | "user"
    self_samples: int
    total_samples: int
    self_pct: float
    total_pct: float


def top_functions(samples: Sequence[Sample], namer: FrameNamer) -> list[FunctionStat]:
    """Self (leaf) and total (anywhere on the stack, once per sample) counts per function."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    modules: dict[str, str] = {}
    spaces: dict[str, str] = {}
    for sample in samples:
        frames = sample.frames
        names = [namer.name(address) for address in frames]
        self_counts[names[0]] += 1
        total_counts.update(set(names))
        for name, address in zip(names, frames, strict=True):
            if name not in modules:
                modules[name] = namer.module(address)
                spaces[name] = address_space(address, sample.cpl)
    count = len(samples)
    stats = [
        FunctionStat(
            name=name,
            module=modules[name],
            space=spaces[name],
            self_samples=self_counts[name],
            total_samples=total,
            self_pct=100.0 * self_counts[name] / count,
            total_pct=100.0 * total / count,
        )
        for name, total in total_counts.items()
    ]
    stats.sort(key=lambda s: (-s.self_samples, -s.total_samples, s.name))
    return stats


# --------------------------------------------------------------------------------------------------
# exits


@dataclass(slots=True)
class ExitTotal:
    reason: str
    detail: str
    count: int
    total_ns: int


def exit_totals(profile: Profile, vcpu: int | None = None) -> dict[tuple[str, str], ExitTotal]:
    """Exit count and handling time per (reason, detail), summed over devices (and vCPUs)."""
    totals: dict[tuple[str, str], ExitTotal] = {}
    for stat in profile.exit_stats:
        if vcpu is not None and stat.vcpu != vcpu:
            continue
        key = (stat.reason, stat.detail)
        total = totals.get(key)
        if total is None:
            total = totals[key] = ExitTotal(stat.reason, stat.detail, 0, 0)
        total.count += stat.count
        total.total_ns += stat.total_ns
    return totals


@dataclass(slots=True)
class ExitCause:
    """Exits of one kind attributed to one piece of guest code (leaf first, up to CAUSE_DEPTH frames)."""

    reason: str
    detail: str
    code: tuple[str, ...]
    samples: int
    #: estimated exits and handling time: the key's totals times this cause's share of its samples
    exits: float
    handling_ns: float
    exits_pct: float
    time_pct: float

    @property
    def event(self) -> str:
        return exit_label(self.reason, self.detail)


def exit_sample_weights(
    profile: Profile, samples: Sequence[Sample], vcpu: int | None = None
) -> dict[int, tuple[float, float]]:
    """Per exit sample (by ``id``): its estimated share ``(exits, handling ns)`` of its exit key.

    Each (reason, detail)'s recorded count and handling time are spread evenly over that key's exit
    samples; keys without recorded stats count one exit and no time per sample.
    """
    totals = exit_totals(profile, vcpu)
    per_key: Counter[tuple[str, str]] = Counter()
    for sample in samples:
        if sample.origin == ORIGIN_EXIT and sample.exit_key is not None:
            per_key[sample.exit_key] += 1
    weights: dict[int, tuple[float, float]] = {}
    for sample in samples:
        key = sample.exit_key
        if sample.origin != ORIGIN_EXIT or key is None:
            continue
        total = totals.get(key)
        if total is None or total.count == 0:
            weights[id(sample)] = (1.0, 0.0)
        else:
            weights[id(sample)] = (total.count / per_key[key], total.total_ns / per_key[key])
    return weights


def exit_causes(profile: Profile, namer: FrameNamer, vcpu: int | None = None) -> list[ExitCause]:
    """Which guest code causes which exits, from exit-origin samples, by estimated handling time."""
    samples = [s for s in select_samples(profile, vcpu, "exit") if s.exit_key is not None]
    weights = exit_sample_weights(profile, samples, vcpu)
    grouped: dict[tuple[str, str, tuple[str, ...]], list[float]] = {}
    for sample in samples:
        key = sample.exit_key
        assert key is not None
        code = tuple(namer.name(address) for address in sample.frames[:CAUSE_DEPTH])
        entry = grouped.setdefault((key[0], key[1], code), [0.0, 0.0, 0.0])
        exits, handling = weights[id(sample)]
        entry[0] += 1
        entry[1] += exits
        entry[2] += handling
    totals = exit_totals(profile, vcpu)
    all_exits: float = sum(t.count for t in totals.values())
    if not all_exits:
        all_exits = sum(e[1] for e in grouped.values()) or 1.0
    all_time: float = sum(t.total_ns for t in totals.values()) or 1.0
    causes = [
        ExitCause(
            reason=reason,
            detail=detail,
            code=code,
            samples=int(entry[0]),
            exits=entry[1],
            handling_ns=entry[2],
            exits_pct=100.0 * entry[1] / all_exits,
            time_pct=100.0 * entry[2] / all_time,
        )
        for (reason, detail, code), entry in grouped.items()
    ]
    causes.sort(key=lambda c: (-c.handling_ns, -c.exits, c.event, c.code))
    return causes


@dataclass(slots=True)
class EventStat:
    """One row of the perf-kvm-stat-style table."""

    event: str
    samples: int
    samples_pct: float
    time_pct: float
    total_ns: int
    min_ns: int
    max_ns: int
    mean_ns: float
    #: relative standard error of the mean in percent (perf's "±%")
    mean_error_pct: float
    histogram: LatencyHistogram


def kvm_stat_events(
    profile: Profile, event: str = "vmexit", vcpu: int | None = None, sort: str = "samples"
) -> list[EventStat]:
    """Exits grouped like ``perf kvm stat report --event=<event>``: by reason for "vmexit", by port
    (the IO exits' detail) for "ioport", by address (the MMIO exits' detail) for "mmio"."""
    if event not in EVENT_CLASSES:
        raise ConfigError(f"event class {event!r} is not one of {', '.join(EVENT_CLASSES)}")
    if sort not in SORT_KEYS:
        raise ConfigError(f"sort key {sort!r} is not one of {', '.join(SORT_KEYS)}")
    merged: dict[str, LatencyHistogram] = {}
    for stat in profile.exit_stats:
        if vcpu is not None and stat.vcpu != vcpu:
            continue
        if event == "vmexit":
            name = stat.reason
        elif stat.reason == _EVENT_REASON[event]:
            name = stat.detail or stat.reason
        else:
            continue
        histogram = merged.get(name)
        if histogram is None:
            histogram = merged[name] = LatencyHistogram()
        histogram.merge(stat.histogram)
    all_count = sum(h.count for h in merged.values()) or 1
    all_time = sum(h.sum for h in merged.values()) or 1
    rows = []
    for name, histogram in merged.items():
        if histogram.count == 0:
            continue
        mean = histogram.mean
        error = 0.0
        if histogram.count > 1 and mean > 0:
            sample_stddev = histogram.stddev * math.sqrt(histogram.count / (histogram.count - 1))
            error = 100.0 * sample_stddev / math.sqrt(histogram.count) / mean
        rows.append(
            EventStat(
                event=name,
                samples=histogram.count,
                samples_pct=100.0 * histogram.count / all_count,
                time_pct=100.0 * histogram.sum / all_time,
                total_ns=histogram.sum,
                min_ns=histogram.min,
                max_ns=histogram.max,
                mean_ns=mean,
                mean_error_pct=error,
                histogram=histogram,
            )
        )
    if sort == "samples":
        rows.sort(key=lambda r: (-r.samples, -r.total_ns, r.event))
    else:
        rows.sort(key=lambda r: (-r.total_ns, -r.samples, r.event))
    return rows


@dataclass(slots=True)
class VcpuTime:
    """Where one vCPU's wall time went."""

    vcpu: int
    guest_ns: int
    exit_handling_ns: int
    exits: int
    guest_between_exits: LatencyHistogram


def vcpu_times(profile: Profile, vcpu: int | None = None) -> list[VcpuTime]:
    rows = []
    for index in profile.vcpus:
        if vcpu is not None and index != vcpu:
            continue
        stats = [s for s in profile.exit_stats if s.vcpu == index]
        guest = profile.guest_time.get(index, LatencyHistogram())
        rows.append(
            VcpuTime(
                vcpu=index,
                guest_ns=guest.sum,
                exit_handling_ns=sum(s.total_ns for s in stats),
                exits=sum(s.count for s in stats),
                guest_between_exits=guest,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------------
# formatting


def format_ns(ns: float) -> str:
    """A duration with a unit that keeps 3-4 significant digits."""
    if ns < 1_000:
        return f"{ns:.0f}ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.2f}us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.2f}ms"
    return f"{ns / 1e9:.3f}s"


def format_us(ns: float) -> str:
    return f"{ns / 1e3:.2f}us"


def format_pct(value: float) -> str:
    return f"{value:.2f}%"


def format_count(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


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


def describe_profile(profile: Profile) -> list[str]:
    """Header lines: what was profiled, where, for how long."""
    meta = profile.metadata
    image = meta.guest_image or "(unknown guest)"
    kind = f" ({meta.guest_kind})" if meta.guest_kind else ""
    parts = [f"{meta.cpus} vCPU{'s' if meta.cpus != 1 else ''}"]
    if meta.kvm_backend:
        parts.append(meta.kvm_backend)
    parts.append(f"{format_ns(meta.duration_ns)} recorded")
    if meta.sample_frequency_hz:
        parts.append(f"sampling at {meta.sample_frequency_hz:g} Hz")
    lines = [f"vmscope profile of {image}{kind}: {', '.join(parts)}"]
    started = ""
    if meta.start_time_ns:
        moment = datetime.datetime.fromtimestamp(meta.start_time_ns / 1e9, tz=datetime.UTC)
        started = f" on {moment:%Y-%m-%d %H:%M:%S} UTC"
    command = f": {' '.join(meta.command_line)}" if meta.command_line else ""
    lines.append(f"recorded by vmscope {meta.vmscope_version}{started}{command}")
    return lines


def render_report(profile: Profile, console: Console, options: ReportOptions | None = None) -> None:
    """The full terminal report: time split, top functions, exits by cause, the kvm-stat table,
    unclaimed accesses and KVM stats."""
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
    render_exit_causes(profile, console, namer, options, terminal)
    render_kvm_stat(profile, console, options, terminal)
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


def io_latency_rows(profile: Profile) -> list[tuple[str, str, int, float, list[float]]]:
    """(device track, request type, count, mean total ns, mean ns of each IO_PART_NAMES part)."""
    groups: dict[tuple[str, str], list[Span]] = {}
    for span in profile.spans:
        if span.track.startswith("io:") and span.name.startswith("request:") and span.args:
            groups.setdefault((span.track, span.name), []).append(span)
    rows = []
    for (track, name), spans in sorted(groups.items()):
        count = len(spans)
        total = sum(span.end_ns - span.start_ns for span in spans) / count
        parts = [
            sum(float(span.args.get(part, 0) or 0) for span in spans if span.args) / count
            for part in IO_PART_NAMES
        ]
        rows.append((track.removeprefix("io:"), name.removeprefix("request:"), count, total, parts))
    return rows


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
