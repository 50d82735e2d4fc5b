"""Re-export of `vmscope.histogram`, where the histogram now lives so that lower layers may import it."""

from __future__ import annotations

from vmscope.histogram import (
    BUCKET_COUNT,
    MAX_TRACKED_NS,
    SUB_BUCKET_BITS,
    SUB_BUCKETS,
    LatencyHistogram,
    bucket_bounds,
    bucket_index,
)

__all__ = [
    "BUCKET_COUNT",
    "MAX_TRACKED_NS",
    "SUB_BUCKETS",
    "SUB_BUCKET_BITS",
    "LatencyHistogram",
    "bucket_bounds",
    "bucket_index",
]
