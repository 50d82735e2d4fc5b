"""Profile data model: recording API, serialization round trip, symbol compaction.

``build_profile`` (tests/unit/rigs/profiles.py) is the synthetic profile the test_profiler_* modules
share: every number in it is chosen there, so the tests derive expected report values from it.
"""

from __future__ import annotations

import threading

import pytest

from tests.unit.rigs.profiles import build_profile
from vmscope.errors import VmscopeError
from vmscope.profiler.model import ExitStat, Profile, Sample


def test_exit_stat_is_created_once_per_key_and_counts() -> None:
    profile = Profile()
    first = profile.exit_stat(0, "IO", "port 0x3f8 out", "serial0")
    assert profile.exit_stat(0, "IO", "port 0x3f8 out", "serial0") is first
    assert profile.exit_stat(1, "IO", "port 0x3f8 out", "serial0") is not first
    assert profile.exit_stat(0, "IO", "port 0x3f8 out", None) is not first
    first.record(100)
    first.record(300)
    assert (first.count, first.total_ns, first.event) == (2, 400, "IO port 0x3f8 out")
    assert len(profile.exit_stats) == 3


def test_exit_stat_from_many_threads_is_consistent() -> None:
    profile = Profile()

    def work(vcpu: int) -> None:
        for index in range(2_000):
            profile.exit_stat(vcpu, "IO", f"port {index % 7:#x} out").record(10)

    threads = [threading.Thread(target=work, args=(vcpu,)) for vcpu in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(profile.exit_stats) == 4 * 7
    assert sum(stat.count for stat in profile.exit_stats) == 4 * 2_000


def test_exit_stats_appended_directly_are_found_by_exit_stat() -> None:
    profile = Profile()
    stat = ExitStat(2, "HLT")
    profile.exit_stats.append(stat)
    assert profile.exit_stat(2, "HLT") is stat


def test_sample_frames_always_start_with_ip() -> None:
    assert Sample(0, 0, 0x10, 0, 0, (0x10, 0x20)).frames == (0x10, 0x20)
    assert Sample(0, 0, 0x10, 0, 0, (0x20,)).frames == (0x10, 0x20)
    assert Sample(0, 0, 0x10, 0, 0, ()).frames == (0x10,)


def test_unclaimed_accesses_are_counted_per_address() -> None:
    profile = build_profile()
    counts = {access.label: access.count for access in profile.unclaimed}
    assert counts == {"port 0x61 read size 1": 2, "mmio 0xfed00000 write size 4": 1}
    profile.record_unclaimed("pio", 0x92, 0, True, count=5)
    assert profile.unclaimed[-1].label == "port 0x92 write" and profile.unclaimed[-1].count == 5
    with pytest.raises(VmscopeError, match="space"):
        profile.record_unclaimed("dma", 0, 1, False)


def test_round_trip_through_dict_keeps_everything() -> None:
    profile = build_profile()
    copy = Profile.from_dict(profile.to_dict())
    assert copy.metadata == profile.metadata
    assert [(s.key, s.histogram) for s in copy.exit_stats] == [
        (s.key, s.histogram) for s in profile.exit_stats
    ]
    assert copy.guest_time == profile.guest_time
    assert copy.samples == profile.samples
    assert copy.spans == profile.spans
    assert copy.unclaimed == profile.unclaimed
    assert copy.kvm_stats == profile.kvm_stats
    assert [t.to_dict() for t in copy.symbol_tables] == [t.to_dict() for t in profile.symbol_tables]
    assert copy.vcpus == [0, 1]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("samples"), "profile samples"),
        (lambda d: d["samples"]["origin"].__setitem__(0, "bogus"), "origin"),
        (lambda d: d["samples"]["stack"].__setitem__(0, 999), "profile samples"),
        (lambda d: d["exit_stats"][0]["histogram"].__setitem__("count", -1), "profile exit_stats"),
        (lambda d: d["metadata"].__setitem__("cpus", "two"), "cpus"),
        (lambda d: d["spans"]["start_ns"].pop(), "span columns"),
        (lambda d: d["symbol_tables"][0]["starts"].__setitem__(0, "x"), "symbol table"),
    ],
)
def test_malformed_dicts_raise_vmscope_errors(mutate: object, message: str) -> None:
    data = build_profile().to_dict()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(VmscopeError, match=message):
        Profile.from_dict(data)


def test_compact_symbols_keeps_only_hit_symbols_and_same_lookups() -> None:
    profile = build_profile()
    addresses = {address for sample in profile.samples for address in sample.frames}
    before = {address: profile.symbolizer().function_name(address) for address in addresses}
    profile.compact_symbols()
    kept = {entry.name for table in profile.symbol_tables for entry in table.symbols}
    assert kept == {"main", "compute", "serial_putc", "idle", "do_syscall_64"}
    after = {address: profile.symbolizer().function_name(address) for address in addresses}
    assert after == before
