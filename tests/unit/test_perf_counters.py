"""Host perf counters per thread: event parsing, the error path of counters that cannot be opened
(played with a fake perf_event_open), and real software counters on real threads."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from vmscope.errors import ConfigError, CounterUnavailableError
from vmscope.host.perf_events import (
    CounterEvent,
    ThreadCounter,
    parse_events,
    syscall_open,
)
from vmscope.host_thread import name_host_thread
from vmscope.profiler.counter_table import counter_table
from vmscope.profiler.counters import CounterSession
from vmscope.profiler.export.chrome_trace import chrome_trace_document
from vmscope.profiler.model import CounterSeries, Profile, ThreadCounters

needs_perf = pytest.mark.skipif(
    not Path("/proc/sys/kernel/perf_event_paranoid").exists(), reason="needs Linux perf events"
)

EXCLUDE_KERNEL, EXCLUDE_HOST, EXCLUDE_GUEST = 1 << 5, 1 << 19, 1 << 20


def test_a_hardware_name_means_guest_and_host_and_groups_expand() -> None:
    names = [e.name for e in parse_events("task-clock,cycles,instructions:host")]
    assert names == ["task-clock", "cycles:guest", "cycles:host", "instructions:host"]
    assert {e.name for e in parse_events("software")} == {
        "task-clock", "page-faults", "context-switches", "cpu-migrations"
    }  # fmt: skip
    assert len(parse_events("default")) == 4 + 2 * 4
    assert parse_events("none") == [] and parse_events("") == []


@pytest.mark.parametrize("text", ["cycle", "task-clock:guest", "cycles:both"])
def test_unknown_counters_are_a_usage_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--events"):
        parse_events(text)


def fake_open(refuse: dict[int, int], calls: list[tuple[str, int]] | None = None):  # type: ignore[no-untyped-def]
    """perf_event_open that fails hardware events with ``refuse[type]`` errno, else opens the real one."""

    def open_function(event: CounterEvent, tid: int, flags: int) -> int:
        if calls is not None:
            calls.append((event.name, flags))
        if event.type in refuse:
            return -refuse[event.type]
        return syscall_open(event, tid, flags)

    return open_function


@pytest.mark.parametrize("code", [errno.ENOENT, errno.EOPNOTSUPP])
def test_a_host_without_pmu_gives_a_typed_error_saying_so(code: int) -> None:
    event = parse_events("cycles:guest")[0]
    with pytest.raises(CounterUnavailableError) as caught:
        ThreadCounter(event, threading.get_native_id(), fake_open({0: code}))
    assert caught.value.event == "cycles:guest" and caught.value.errno == code
    assert "no hardware PMU" in str(caught.value) and errno.errorcode[code] in str(caught.value)


def test_guest_and_host_counters_set_the_exclude_bits() -> None:
    calls: list[tuple[str, int]] = []
    for event in parse_events("cycles"):
        with pytest.raises(CounterUnavailableError):
            ThreadCounter(event, 1, fake_open({0: errno.ENOENT}, calls))
    flags = dict(calls)
    assert flags["cycles:guest"] & EXCLUDE_HOST and not flags["cycles:guest"] & EXCLUDE_GUEST
    assert flags["cycles:host"] & EXCLUDE_GUEST and not flags["cycles:host"] & EXCLUDE_HOST


def test_paranoid_refusal_retries_for_user_space_only_and_says_so() -> None:
    calls: list[int] = []

    def open_function(event: CounterEvent, tid: int, flags: int) -> int:
        calls.append(flags)
        return syscall_open(event, tid, flags) if flags & EXCLUDE_KERNEL else -errno.EACCES

    counter = ThreadCounter(parse_events("task-clock")[0], threading.get_native_id(), open_function)
    try:
        assert counter.user_only and len(calls) == 2
    finally:
        counter.close()


def run_named_thread(name: str, busy_s: float, session: CounterSession) -> float:
    """Start ``session``, run a thread called ``name`` busy for ``busy_s``; the thread's wall seconds."""
    wall: list[float] = []

    def body() -> None:
        start = time.perf_counter()
        name_host_thread(name)
        x = 0
        while time.perf_counter() - start < busy_s:
            x += 1
        time.sleep(0.02)
        wall.append(time.perf_counter() - start)

    session.start()
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    time.sleep(0.05)  # the counters must keep their values after the thread ended
    session.stop()
    return wall[0]


@needs_perf
def test_software_counters_of_a_vcpu_thread_are_real_and_hardware_ones_become_one_note() -> None:
    session = CounterSession(parse_events("default"), open_function=fake_open({0: errno.ENOENT}))
    wall = run_named_thread("vcpu7", 0.15, session)
    profile = Profile()
    session.fill(profile)
    (counted,) = profile.counters
    assert counted.thread == "vcpu7"
    task_clock = counted.values["task-clock"]
    # busy for 150 ms of its life; the CPU is shared, so only bounds: > 0, and never above wall time
    assert 0 < task_clock <= wall * 1e9 and task_clock <= counted.wall_ns
    assert counted.values["context-switches"] >= 1  # the sleep at least
    assert not any(":" in name for name in counted.values)
    (note,) = profile.counter_notes
    assert "cycles:guest, cycles:host" in note and "branch-misses:host" in note
    assert "on vcpu7" in note and "no hardware PMU" in note and "ENOENT" in note


@needs_perf
def test_only_vcpu_and_io_threads_are_counted() -> None:
    session = CounterSession(parse_events("task-clock"))
    run_named_thread("vmscope-sampler", 0.01, session)
    run_named_thread("io:virtio-rng0", 0.01, session)
    assert [c.thread for c in session.thread_counters()] == ["io:virtio-rng0"]


@needs_perf
def test_the_real_hardware_path_either_counts_or_explains_in_one_line() -> None:
    session = CounterSession(parse_events("instructions"))
    run_named_thread("vcpu0", 0.05, session)
    profile = Profile()
    session.fill(profile)
    values = profile.counters[0].values
    if values:  # a host with a PMU: user code ran, so the host side counted instructions
        assert values["instructions:host"] > 0 and not profile.counter_notes
    else:
        (note,) = profile.counter_notes
        assert note.startswith("counters not available: instructions:guest, instructions:host on vcpu0: ")


@needs_perf
def test_polling_records_rising_series_for_the_timeline() -> None:
    session = CounterSession(parse_events("task-clock"), poll_interval_s=0.02)
    run_named_thread("vcpu0", 0.2, session)
    profile = Profile()
    session.fill(profile)
    (series,) = profile.counter_series
    assert series.thread == "vcpu0" and series.event == "task-clock" and len(series.values) >= 3
    assert series.values == sorted(series.values)
    assert series.values[-1] == profile.counters[0].values["task-clock"]


def counted_profile() -> Profile:
    profile = Profile()
    vcpu_values = {"task-clock": 50_000_000, "cycles:guest": 300, "cycles:host": 100}
    profile.counters = [
        ThreadCounters("vcpu0", 101, vcpu_values, 100_000_000),
        ThreadCounters("io:virtio-blk0", 102, {"task-clock": 1_000_000, "context-switches": 7}, 100_000_000),
    ]
    profile.counter_series = [
        CounterSeries("vcpu0", "task-clock", [10_000_000, 20_000_000], [5_000_000, 5_000_000])
    ]
    profile.counter_notes = ["counters not available: llc-misses:guest on vcpu0: because"]
    return profile


def test_the_table_shows_busy_share_and_the_guest_share_of_cycles() -> None:
    headers, rows = counter_table(counted_profile())
    assert headers[:3] == ["Thread", "task-clock ms", "busy%"] and headers[-1] == "cycles guest%"
    vcpu = dict(zip(headers, rows[0], strict=True))
    assert vcpu["busy%"] == "50.00%" and vcpu["cycles guest%"] == "75.00%" and vcpu["context-switches"] == "-"
    io = dict(zip(headers, rows[1], strict=True))
    assert io["task-clock ms"] == "1.0" and io["context-switches"] == "7" and io["cycles guest%"] == "-"


def test_counters_survive_the_profile_file_and_old_profiles_still_load() -> None:
    profile = counted_profile()
    again = Profile.from_dict(profile.to_dict())
    assert again.counters == profile.counters and again.counter_series == profile.counter_series
    assert again.counter_notes == profile.counter_notes
    old = Profile().to_dict()
    del old["counters"]  # as written before counters existed
    assert Profile.from_dict(old).counters == []


def test_the_chrome_trace_has_a_busy_counter_track_per_thread_series() -> None:
    events = [e for e in chrome_trace_document(counted_profile())["traceEvents"] if e["ph"] == "C"]
    assert [(e["name"], e["ts"], e["args"]) for e in events] == [
        ("vcpu0 task-clock", 10_000.0, {"busy%": 50.0}),
        ("vcpu0 task-clock", 20_000.0, {"busy%": 0.0}),
    ]
