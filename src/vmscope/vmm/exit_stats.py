"""Always-on exit accounting: what the exit loop records, kept as cheap as Python allows.

The loop keeps, per vCPU, one accumulator per exit key: a list
``[count, total_ns, min_ns, max_ns, bucket_0 ... bucket_63]`` where bucket i counts
latencies whose bit length is i (power-of-two buckets). Updating it is a few list
operations; turning it into report histograms happens once, at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

COUNT, TOTAL, MIN, MAX, BUCKETS = 0, 1, 2, 3, 4
BUCKET_COUNT = 64

#: exit key: (reason name, address or port or -1, access "in"/"out"/"read"/"write"/"")
ExitKey = tuple[str, int, str]


def new_accumulator() -> list[int]:
    return [0, 0, 1 << 62, 0] + [0] * BUCKET_COUNT


def record(accumulator: list[int], nanoseconds: int) -> None:
    """Add one latency sample (the exit loop inlines this; other callers use it)."""
    accumulator[0] += 1
    accumulator[1] += nanoseconds
    if nanoseconds < accumulator[2]:
        accumulator[2] = nanoseconds
    if nanoseconds > accumulator[3]:
        accumulator[3] = nanoseconds
    accumulator[4 + nanoseconds.bit_length()] += 1


@dataclass
class LatencySummary:
    """A finished accumulator: exact count/total/min/max and power-of-two buckets."""

    count: int
    total_ns: int
    min_ns: int
    max_ns: int
    buckets: list[int]

    @classmethod
    def from_accumulator(cls, accumulator: list[int]) -> LatencySummary:
        count = accumulator[COUNT]
        return cls(
            count=count,
            total_ns=accumulator[TOTAL],
            min_ns=accumulator[MIN] if count else 0,
            max_ns=accumulator[MAX],
            buckets=list(accumulator[BUCKETS:]),
        )

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0

    def percentile(self, fraction: float) -> int:
        """Upper bound of the bucket holding the given fraction (0-1) of samples, clamped to max."""
        if not self.count:
            return 0
        rank = fraction * self.count
        seen = 0
        for bits, n in enumerate(self.buckets):
            seen += n
            if seen >= rank and n:
                return min((1 << bits) - 1, self.max_ns) if bits else 0
        return self.max_ns


class VcpuExitStats:
    """The exit loop's counters for one vCPU."""

    def __init__(self, vcpu_id: int) -> None:
        self.vcpu_id = vcpu_id
        #: exit key -> accumulator of time spent handling the exit in the VMM
        self.handling: dict[ExitKey, list[int]] = {}
        #: time in the guest between consecutive exits (KVM_RUN entry to return)
        self.guest = new_accumulator()
        #: KVM_RUN returns caused by a signal kick (pause, stop, sampling)
        self.kicks = 0

    def items(self) -> Iterator[tuple[ExitKey, LatencySummary]]:
        for key, accumulator in self.handling.items():
            yield key, LatencySummary.from_accumulator(accumulator)

    def total_exits(self) -> int:
        return sum(acc[COUNT] for acc in self.handling.values())
