"""The log sink: per-cause rate limits with suppression counts, and a writer that never blocks callers."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from vmscope import log_sink
from vmscope.log_sink import MAX_CAUSES, LogSink, RateLimitFilter


def record(message: str, *args: object, name: str = "vmscope.virtio") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)


def test_each_cause_gets_its_burst_then_a_suppression_count() -> None:
    now = [0.0]
    limit = RateLimitFilter(burst=3, interval_s=5.0, clock=lambda: now[0])
    passed = [limit.filter(record("%s: bad status %#x", "virtio-blk0", n)) for n in range(10)]
    assert passed == [True] * 3 + [False] * 7
    # another device is another cause, with its own burst
    assert limit.filter(record("%s: bad status %#x", "virtio-net0", 1))
    assert limit.suppressed_total == 7
    now[0] = 5.0
    late = record("%s: bad status %#x", "virtio-blk0", 99)
    assert limit.filter(late)
    assert late.getMessage() == "virtio-blk0: bad status 0x63 [7 similar lines suppressed]"
    assert limit.pending_summaries() == []


def test_pending_summaries_report_what_the_window_held_back() -> None:
    limit = RateLimitFilter(burst=1, interval_s=60.0)
    for _ in range(4):
        limit.filter(record("%s: queue %d changed while ready", "virtio-blk0", 0))
    assert limit.pending_summaries() == [
        "3 more lines like '%s: queue %d changed while ready' suppressed (rate limit)"
    ]


def test_a_guest_cannot_grow_the_cause_table_without_bound() -> None:
    limit = RateLimitFilter(burst=1, interval_s=60.0)
    for n in range(MAX_CAUSES + 500):
        limit.filter(record("%s: odd", f"dev{n}"))
    assert limit.cause_count <= MAX_CAUSES + 1
    assert limit.suppressed_total == 499


def test_logging_never_blocks_when_nobody_reads_the_pipe() -> None:
    read_end, write_end = os.pipe()
    sink = LogSink(write_end, queue_lines=50, rate_limit=RateLimitFilter(burst=10**9))
    sink.setFormatter(logging.Formatter("%(message)s"))
    try:
        started = time.monotonic()
        for n in range(20_000):
            sink.handle(record("%s: line %d " + "x" * 100, "dev", n))
        assert time.monotonic() - started < 5  # 2+ MB into a 64 KiB pipe: only the writer waits
        assert sink.counts().dropped > 0
    finally:
        os.close(read_end)  # the writer's next write fails with EPIPE and it stops
        sink.close(timeout_s=1.0)
        os.close(write_end)


def test_closing_a_sink_whose_writer_never_started_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C can interrupt the writer's start() during start-up; logging's atexit shutdown then
    closes a sink whose thread never ran (it raised 'cannot join thread before it is started')."""

    class NeverStarted(threading.Thread):
        def start(self) -> None:
            pass

    monkeypatch.setattr(log_sink.threading, "Thread", NeverStarted)
    sink = LogSink(queue_lines=4)
    sink.close(timeout_s=0.1)
