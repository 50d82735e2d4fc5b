"""The guest's tasks in a profile: per-process function counts (``perf report --sort comm,sym``) and
which task ran on each vCPU over time, both from the samples' ``task`` fields."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmscope.profiler.model import Profile, Sample, Span, TaskInfo

#: how samples without a known task are grouped
UNKNOWN_TASK = "[unknown]"
TASK_TRACK_PREFIX = "task:"


@dataclass(frozen=True, slots=True)
class CommSymbolRow:
    comm: str
    symbol: str
    samples: int
    #: share of all samples, 0..100
    pct: float


def comm_symbol_rows(samples: Sequence[Sample], name_of: Callable[[int], str]) -> list[CommSymbolRow]:
    """Leaf-function counts per command name, processes with more samples first (like perf)."""
    counts: Counter[tuple[str, str]] = Counter()
    per_comm: Counter[str] = Counter()
    for sample in samples:
        comm = sample.task.comm if sample.task is not None else UNKNOWN_TASK
        counts[(comm, name_of(sample.ip))] += 1
        per_comm[comm] += 1
    total = len(samples) or 1
    rows = [
        CommSymbolRow(comm, symbol, count, 100.0 * count / total) for (comm, symbol), count in counts.items()
    ]
    rows.sort(key=lambda row: (-per_comm[row.comm], row.comm, -row.samples, row.symbol))
    return rows


def task_spans(profile: Profile) -> list[Span]:
    """One span per stretch of consecutive samples of one task on a vCPU, on track ``task:vcpuN``:
    from the stretch's first sample to the next stretch's first (the last ends at its last sample)."""
    spans: list[Span] = []
    by_vcpu: dict[int, list[Sample]] = {}
    for sample in profile.samples:
        if sample.task is not None:
            by_vcpu.setdefault(sample.vcpu, []).append(sample)
    for vcpu, samples in sorted(by_vcpu.items()):
        samples.sort(key=lambda sample: sample.time_ns)
        track = f"{TASK_TRACK_PREFIX}vcpu{vcpu}"
        current: TaskInfo | None = None
        start = last = 0
        for sample in samples:
            if sample.task != current:
                if current is not None:
                    spans.append(_task_span(track, current, start, sample.time_ns))
                current, start = sample.task, sample.time_ns
            last = sample.time_ns
        if current is not None:
            spans.append(_task_span(track, current, start, last))
    return spans


def _task_span(track: str, task: TaskInfo, start: int, end: int) -> Span:
    return Span(
        track, f"task:{task.label}", start, end, {"comm": task.comm, "pid": task.pid, "tgid": task.tgid}
    )
