"""Log-bucketed latency histogram for per-exit timings.

Layout (HDR-style, 16 linear sub-buckets per power of two, nanosecond resolution):

* values 0..31 ns each have their own bucket (exact);
* a value ``v >= 32`` with ``b = v.bit_length()`` goes to bucket ``((b - 5) << 4) + (v >> (b - 5))``:
  the top five bits of ``v`` pick one of 16 sub-buckets in its octave, so a bucket is at most 1/16 of
  its lower bound wide and a percentile (reported at the bucket midpoint) is within 1/32 of the truth;
* values from 2**46 ns (about 19.5 hours) on are counted in the last bucket; min/max/sum stay exact.

``record`` is called once per VM exit from the vCPU loop, so it does a handful of integer operations
and no allocation.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from itertools import repeat
from operator import add, lshift, mul, rshift, sub
from typing import Any

from vmscope.errors import VmscopeError

SUB_BUCKET_BITS = 4
SUB_BUCKETS = 1 << SUB_BUCKET_BITS
#: values at or above this many ns share the last bucket
MAX_TRACKED_NS = 1 << 46
BUCKET_COUNT = ((MAX_TRACKED_NS.bit_length() - 1 - 5) << SUB_BUCKET_BITS) + 2 * SUB_BUCKETS
_LAST_BUCKET = BUCKET_COUNT - 1


def bucket_index(ns: int) -> int:
    """The bucket that ``ns`` (clamped to 0..MAX_TRACKED_NS) is counted in."""
    if ns < 32:
        return max(ns, 0)
    shift = ns.bit_length() - 5
    return min((shift << 4) + (ns >> shift), _LAST_BUCKET)


def bucket_bounds(index: int) -> tuple[int, int]:
    """``(low, high)``: the half-open range of nanosecond values counted in bucket ``index``."""
    if not 0 <= index < BUCKET_COUNT:
        raise ValueError(f"bucket index {index} outside 0..{BUCKET_COUNT - 1}")
    if index < 32:
        return index, index + 1
    shift = (index >> 4) - 1
    low = ((index & 15) | 16) << shift
    return low, low + (1 << shift)


class LatencyHistogram:
    """Counts of nanosecond durations in log buckets, with exact count/sum/min/max and a stddev."""

    __slots__ = ("_counts", "count", "max", "min", "sum", "sum_sq")

    #: worst-case relative error of :meth:`percentile` (half a bucket over its lower bound)
    RELATIVE_ERROR = 1.0 / (2 * SUB_BUCKETS)

    def __init__(self) -> None:
        self._counts: list[int] = [0] * BUCKET_COUNT
        self.count = 0
        self.sum = 0
        self.sum_sq = 0
        #: exact extremes; meaningless while count == 0
        self.min = 0
        self.max = 0

    def record(self, ns: int) -> None:
        """Count one duration of ``ns`` nanoseconds (negative values count as 0)."""
        if ns < 32:
            if ns < 0:
                ns = 0
            index = ns
        else:
            shift = ns.bit_length() - 5
            index = (shift << 4) + (ns >> shift)
            if index > _LAST_BUCKET:
                index = _LAST_BUCKET
        self._counts[index] += 1
        if self.count:
            if ns < self.min:
                self.min = ns
            elif ns > self.max:
                self.max = ns
        else:
            self.min = self.max = ns
        self.count += 1
        self.sum += ns
        self.sum_sq += ns * ns

    def record_many(self, values: Sequence[int]) -> None:
        """Count every duration in ``values``: the same result as ``record`` called on each.

        Exit statistics are folded from raw per-exit timestamps in batches; this does the
        bucketing with C-level passes instead of one Python call per value. Every value at or
        above the batch's smallest, ``low``, lies in a bucket at least ``2**shift`` ns wide and
        aligned to it (``shift = low.bit_length() - 5``), so its bucket depends on ``value >>
        shift`` alone: counting those few distinct coarse values is one pass, and only they
        are bucketed one by one.
        """
        if not values:
            return
        low, high = min(values), max(values)
        if low < 0:
            values = list(map(max, values, repeat(0)))
            low, high = 0, max(high, 0)
        counts = self._counts
        shift = low.bit_length() - 5
        if shift >= SUB_BUCKET_BITS:  # buckets of 16 ns and wider: few distinct coarse values
            for coarse, bucket_count in Counter(map(rshift, values, repeat(shift))).items():
                counts[bucket_index(coarse << shift)] += bucket_count
        else:
            shifts = list(map(max, map(sub, map(int.bit_length, values), repeat(5)), repeat(0)))
            indexes = map(add, map(lshift, shifts, repeat(4)), map(rshift, values, shifts))
            for index, bucket_count in Counter(map(min, indexes, repeat(_LAST_BUCKET))).items():
                counts[index] += bucket_count
        if self.count:
            if low < self.min:
                self.min = low
            if high > self.max:
                self.max = high
        else:
            self.min, self.max = low, high
        self.count += len(values)
        self.sum += sum(values)
        self.sum_sq += sum(map(mul, values, values))

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @property
    def stddev(self) -> float:
        """Population standard deviation, from exact integer moments."""
        if self.count < 2:
            return 0.0
        variance_scaled = self.count * self.sum_sq - self.sum * self.sum
        return math.sqrt(max(variance_scaled, 0)) / self.count

    def percentile(self, p: float) -> int:
        """The ``p``-th percentile (0..100, nearest rank) to within :attr:`RELATIVE_ERROR`; 0 if empty."""
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile {p} outside 0..100")
        if self.count == 0:
            return 0
        rank = max(1, math.ceil(p / 100.0 * self.count))
        # the extremes are known exactly
        if rank == 1:
            return self.min
        if rank >= self.count:
            return self.max
        seen = 0
        for index, bucket_count in enumerate(self._counts):
            if not bucket_count:
                continue
            seen += bucket_count
            if seen >= rank:
                low, high = bucket_bounds(index)
                middle = (low + high - 1) // 2
                return min(max(middle, self.min), self.max)
        return self.max

    def buckets(self) -> list[tuple[int, int, int]]:
        """Non-empty buckets as ``(low_ns, high_ns, count)``, ascending."""
        return [(*bucket_bounds(i), c) for i, c in enumerate(self._counts) if c]

    def merge(self, other: LatencyHistogram) -> None:
        """Add every value counted in ``other`` to this histogram."""
        if other.count == 0:
            return
        counts = self._counts
        for index, bucket_count in enumerate(other._counts):
            if bucket_count:
                counts[index] += bucket_count
        if self.count:
            self.min = min(self.min, other.min)
            self.max = max(self.max, other.max)
        else:
            self.min, self.max = other.min, other.max
        self.count += other.count
        self.sum += other.sum
        self.sum_sq += other.sum_sq

    def copy(self) -> LatencyHistogram:
        clone = LatencyHistogram()
        clone.merge(self)
        return clone

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; buckets are sparse ``[index, count]`` pairs."""
        return {
            "sub_bucket_bits": SUB_BUCKET_BITS,
            "count": self.count,
            "sum": self.sum,
            "sum_sq": self.sum_sq,
            "min": self.min,
            "max": self.max,
            "buckets": [[i, c] for i, c in enumerate(self._counts) if c],
        }

    @classmethod
    def from_dict(cls, data: Any) -> LatencyHistogram:
        """Inverse of :meth:`to_dict`; raises :class:`VmscopeError` on inconsistent data."""
        if not isinstance(data, dict):
            raise VmscopeError("latency histogram: expected an object")
        if data.get("sub_bucket_bits") != SUB_BUCKET_BITS:
            raise VmscopeError(
                f"latency histogram: sub_bucket_bits {data.get('sub_bucket_bits')!r} is not {SUB_BUCKET_BITS}"
            )
        histogram = cls()
        try:
            for name in ("count", "sum", "sum_sq", "min", "max"):
                value = data[name]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise VmscopeError(f"latency histogram: {name} must be a non-negative integer")
                setattr(histogram, name, value)
            total = 0
            for index, bucket_count in data["buckets"]:
                if not (isinstance(index, int) and 0 <= index < BUCKET_COUNT):
                    raise VmscopeError(f"latency histogram: bucket index {index!r} out of range")
                if not (isinstance(bucket_count, int) and bucket_count > 0):
                    raise VmscopeError(f"latency histogram: bucket count {bucket_count!r} is not positive")
                histogram._counts[index] += bucket_count
                total += bucket_count
        except (KeyError, TypeError, ValueError) as error:
            raise VmscopeError(f"latency histogram: malformed ({error!r})") from None
        if total != histogram.count:
            raise VmscopeError(
                f"latency histogram: buckets hold {total} values but count is {histogram.count}"
            )
        return histogram

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LatencyHistogram(count={self.count}, min={self.min}, max={self.max}, mean={self.mean:.1f})"
