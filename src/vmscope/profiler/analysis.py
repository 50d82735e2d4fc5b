"""Profile analysis: top functions, exits by cause, perf-kvm-stat events, I/O latency, vCPU time.

Plain dataclasses and numbers, shared by the terminal report (:mod:`vmscope.profiler.report`),
the exporters and ``vmscope diff``; nothing here draws, so exporters do not import rich.
Percentages are 0..100 floats.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmscope.errors import ConfigError
from vmscope.histogram import LatencyHistogram
from vmscope.profiler.model import IO_PART_NAMES, ORIGIN_EXIT, Profile, Sample, Span, exit_label
from vmscope.profiler.options import EVENT_CLASSES, ORIGIN_CHOICES, SORT_KEYS
from vmscope.profiler.stack_quality import stack_quality_line
from vmscope.symbols import Symbolizer, address_space

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
        if sample.task is not None:  # the process is the root frame when the kernel told us
            names.insert(0, sample.task.label)
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
    if sort != "time":  # "comm,sym" orders the function table; exits stay by samples
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
    quality = stack_quality_line(profile)
    if quality:
        lines.append(quality)
    return lines


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
