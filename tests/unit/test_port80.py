"""The POST code port: timestamped records, bounded, reads return the last value."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from vmscope.devices.port80 import Port80
from vmscope.errors import ConfigError


def test_writes_are_recorded_with_their_time_in_order() -> None:
    ticks = itertools.count(1000, 7)
    port = Port80(clock_ns=lambda: next(ticks))
    for code in (0x01, 0x10, 0xAA):
        port.write(0, bytes([code]))
    assert port.records == [(1000, 0x01), (1007, 0x10), (1014, 0xAA)]
    assert port.dropped == 0


def test_default_clock_is_monotonic_nanoseconds() -> None:
    port = Port80()
    before = time.monotonic_ns()
    port.write(0, b"\x42")
    after = time.monotonic_ns()
    ((stamp, value),) = port.records
    assert before <= stamp <= after and value == 0x42


def test_keeps_the_first_records_and_counts_the_rest() -> None:
    port = Port80(capacity=3, clock_ns=lambda: 0)
    for code in range(10):
        port.write(0, bytes([code]))
    assert [value for _, value in port.records] == [0, 1, 2]
    assert port.dropped == 7
    assert port.read(0, 1) == b"\x09"  # reads still follow the latest write


def test_reads_return_the_last_value_written() -> None:
    port = Port80()
    assert port.read(0, 1) == b"\xff"  # nothing written yet: an undriven bus
    assert port.last_value is None
    port.write(0, b"\x5a")
    assert port.read(0, 1) == b"\x5a"
    assert port.read(0, 2) == b"\x5a\x00"
    port.write(0, b"\x34\x12")
    assert port.records[-1][1] == 0x1234
    assert port.read(0, 2) == b"\x34\x12"
    assert port.read(0, 1) == b"\x34"


def test_reset_forgets_the_latch_but_keeps_the_record() -> None:
    port = Port80()
    port.write(0, b"\x07")
    port.reset()
    assert port.read(0, 1) == b"\xff"
    assert [value for _, value in port.records] == [7]


def test_concurrent_writers_lose_nothing_up_to_capacity() -> None:
    port = Port80(capacity=5000)

    def writer() -> None:
        for _ in range(2000):
            port.write(0, b"\x01")

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(port.records) == 5000 and port.dropped == 3000


def test_negative_capacity_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="capacity"):
        Port80(capacity=-1)
