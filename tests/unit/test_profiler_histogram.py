"""LatencyHistogram: bucket layout, percentiles within the bucket error, moments, merge, serialization."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from vmscope.errors import VmscopeError
from vmscope.histogram import (
    BUCKET_COUNT,
    MAX_TRACKED_NS,
    SUB_BUCKETS,
    LatencyHistogram,
    bucket_bounds,
    bucket_index,
)

PERCENTILES = [0, 0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9, 100]


def exit_like_latencies(seed: int, count: int) -> list[int]:
    """Log-uniform from 20 ns to 90 s (like exit handling times: mostly fast, a long tail)."""
    rng = random.Random(seed)
    return [int(math.exp(rng.uniform(math.log(20), math.log(90e9)))) for _ in range(count)]


def nearest_rank(sorted_values: list[int], p: float) -> int:
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def test_buckets_tile_the_range_and_are_narrow() -> None:
    previous_high = 0
    for index in range(BUCKET_COUNT):
        low, high = bucket_bounds(index)
        assert low == previous_high, f"gap before bucket {index}"
        assert bucket_index(low) == index and bucket_index(high - 1) == index
        # every bucket is at most 1/16 of its lower bound wide (exact below 32 ns)
        assert high - low <= max(1, low // SUB_BUCKETS)
        previous_high = high
    assert previous_high == MAX_TRACKED_NS


def test_record_edge_values() -> None:
    histogram = LatencyHistogram()
    for value in (0, -5, 31, 32, MAX_TRACKED_NS * 4):
        histogram.record(value)
    assert histogram.count == 5
    assert histogram.min == 0
    assert histogram.max == MAX_TRACKED_NS * 4
    assert histogram.buckets()[0] == (0, 1, 2)  # 0 and the clamped -5
    assert histogram.percentile(100) == MAX_TRACKED_NS * 4  # clamped to the exact max


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_within_bucket_error_of_sorted_data(seed: int) -> None:
    values = exit_like_latencies(seed, 20_000)
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    ordered = sorted(values)
    for p in PERCENTILES:
        exact = nearest_rank(ordered, p)
        estimate = histogram.percentile(p)
        assert abs(estimate - exact) <= exact * LatencyHistogram.RELATIVE_ERROR + 1, (p, exact, estimate)
    assert histogram.percentile(0) == ordered[0]
    assert histogram.percentile(100) == ordered[-1]


def test_percentiles_of_narrow_data_are_exact_below_32ns() -> None:
    histogram = LatencyHistogram()
    for value in [3] * 50 + [7] * 49 + [30]:
        histogram.record(value)
    assert (histogram.percentile(50), histogram.percentile(99), histogram.percentile(100)) == (3, 7, 30)


def test_moments_are_exact() -> None:
    values = exit_like_latencies(7, 5_000)
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    assert histogram.count == len(values)
    assert histogram.sum == sum(values)
    assert (histogram.min, histogram.max) == (min(values), max(values))
    assert histogram.mean == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert histogram.stddev == pytest.approx(statistics.pstdev(values), rel=1e-9)


def test_empty_histogram() -> None:
    histogram = LatencyHistogram()
    assert (histogram.count, histogram.mean, histogram.stddev, histogram.percentile(99)) == (0, 0.0, 0.0, 0)
    with pytest.raises(ValueError):
        histogram.percentile(101)


def test_merge_equals_recording_everything_in_one() -> None:
    values = exit_like_latencies(11, 10_000)
    whole, first, second = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for index, value in enumerate(values):
        whole.record(value)
        (first if index % 3 else second).record(value)
    first.merge(second)
    assert first == whole
    assert first.percentile(99) == whole.percentile(99)
    empty = LatencyHistogram()
    empty.merge(whole)
    assert empty == whole
    whole.merge(LatencyHistogram())
    assert whole == empty


def test_dict_round_trip_and_validation() -> None:
    histogram = LatencyHistogram()
    for value in exit_like_latencies(5, 1_000):
        histogram.record(value)
    data = histogram.to_dict()
    assert LatencyHistogram.from_dict(data) == histogram
    broken = dict(data, count=data["count"] + 1)
    with pytest.raises(VmscopeError, match="count"):
        LatencyHistogram.from_dict(broken)
    with pytest.raises(VmscopeError, match="bucket index"):
        LatencyHistogram.from_dict(dict(data, buckets=[[BUCKET_COUNT, 1]], count=1))
    with pytest.raises(VmscopeError, match="sub_bucket_bits"):
        LatencyHistogram.from_dict(dict(data, sub_bucket_bits=3))
    with pytest.raises(VmscopeError):
        LatencyHistogram.from_dict([1, 2, 3])


def test_profiler_histogram_module_still_exports_the_neutral_histogram() -> None:
    from vmscope.histogram import LatencyHistogram as neutral
    from vmscope.profiler import histogram as old_home

    assert old_home.LatencyHistogram is neutral
