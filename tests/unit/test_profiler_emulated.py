"""The "Emulated by vmscope" table: profile model and file, text/HTML rendering, timeline counters."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.rigs.profiles import COMPUTE, MAIN, UNKNOWN, build_profile
from vmscope.errors import VmscopeError
from vmscope.profiler import profile_file
from vmscope.profiler.emulated_table import emulated_rows, emulated_table
from vmscope.profiler.export.chrome_trace import chrome_trace_document
from vmscope.profiler.export.html import export_html
from vmscope.profiler.model import EMULATED_EVENT, CounterSeries, EmulatedInstruction, Profile
from vmscope.profiler.recorder import append_count_point
from vmscope.profiler.report import ReportOptions, report_text

CLAC_RIP, POPCNT_RIP = MAIN + 0x14, COMPUTE + 0x2C


def with_emulated() -> Profile:
    """build_profile() (2 vCPUs, 60 us) with clac completed on both vCPUs and popcnt on vCPU 1."""
    profile = build_profile()
    profile.emulated = [
        EmulatedInstruction(0, "clac", CLAC_RIP, 300, 3_000),
        EmulatedInstruction(1, "clac", CLAC_RIP, 100, 1_000),
        EmulatedInstruction(1, "popcnt", POPCNT_RIP, 7, 1_400),
        EmulatedInstruction(0, "int3", UNKNOWN, 1, 600),
    ]
    profile.emulated_series = [CounterSeries("vcpu0", EMULATED_EVENT, [0, 10_000, 20_000], [0, 250, 301])]
    return profile


def test_emulated_instructions_survive_the_profile_file(tmp_path: Path) -> None:
    profile = with_emulated()
    path = tmp_path / "e.vmprof"
    profile.compact_symbols()
    profile_file.save(profile, path)
    loaded = profile_file.load(path)
    assert loaded.emulated == profile.emulated
    assert loaded.emulated_series == profile.emulated_series
    # the symbol of an emulated rip survives compaction although no sample points there
    assert emulated_rows(loaded)[0].symbol == "main+0x14"


def test_a_profile_written_before_the_table_existed_loads_without_it() -> None:
    data = build_profile().to_dict()
    del data["emulated"]
    loaded = Profile.from_dict(data)
    assert loaded.emulated == [] and loaded.emulated_series == []
    assert "Emulated by vmscope" not in report_text(loaded)


def test_a_malformed_emulated_part_is_refused_with_its_name() -> None:
    data = with_emulated().to_dict()
    data["emulated"]["instructions"][0]["count"] = -1
    with pytest.raises(VmscopeError, match="profile emulated: count -1 is negative"):
        Profile.from_dict(data)


def test_rows_merge_vcpus_per_mnemonic_and_rip_and_name_the_function() -> None:
    rows = emulated_rows(with_emulated())
    assert [(r.mnemonic, r.rip, r.symbol, r.count, r.total_ns) for r in rows] == [
        ("clac", CLAC_RIP, "main+0x14", 400, 4_000),
        ("popcnt", POPCNT_RIP, "compute+0x2c", 7, 1_400),
        ("int3", UNKNOWN, None, 1, 600),
    ]
    assert rows[1].mean_ns == 200
    only_vcpu1 = emulated_rows(with_emulated(), vcpu=1)
    assert [(r.mnemonic, r.count) for r in only_vcpu1] == [("clac", 100), ("popcnt", 7)]


def test_summary_gives_the_share_of_the_vcpus_run_time() -> None:
    _, _, summary = emulated_table(with_emulated())
    # 6 us of 2 vCPUs x 60 us
    assert summary == (
        "408 instructions KVM could not emulate completed by vmscope in 6.00us, 5.00% of the vCPUs' run time"
    )
    _, _, one = emulated_table(with_emulated(), vcpu=1)
    assert one.startswith("107 instructions") and one.endswith("4.00% of the vCPUs' run time")


def test_text_report_shows_the_table_with_count_total_and_mean() -> None:
    text = report_text(with_emulated())
    assert "Emulated by vmscope" in text
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ")}  # fmt: skip
    assert cells["clac"] == [f"{CLAC_RIP:#x}", "main+0x14", "400", "4.00us", "10ns"]
    assert cells["int3"] == [f"{UNKNOWN:#x}", "-", "1", "600ns", "600ns"]
    limited = report_text(with_emulated(), ReportOptions(limit=1))
    assert "popcnt" not in limited and "408 instructions" in limited


def test_html_report_has_the_table() -> None:
    page = export_html(with_emulated())
    assert "<h3>Emulated by vmscope</h3>" in page
    assert "<td>popcnt</td><td>0x112c</td><td>compute+0x2c</td><td class=num>7</td>" in page
    assert "408 instructions KVM could not emulate" in page
    assert "Emulated by vmscope" not in export_html(build_profile())


def test_chrome_trace_has_a_counter_track_of_emulated_instructions() -> None:
    events = chrome_trace_document(with_emulated())["traceEvents"]
    counters = [e for e in events if e["ph"] == "C" and e["name"] == f"vcpu0 {EMULATED_EVENT}"]
    assert [(e["ts"], e["args"]["per interval"]) for e in counters] == [(0, 0), (10, 250), (20, 51)]


def test_polled_counts_keep_only_the_points_a_timeline_needs() -> None:
    series = CounterSeries("vcpu0", EMULATED_EVENT)
    polls = [0, 0, 0, 5, 9, 9, 9, 9, 12, 12]
    for index, value in enumerate(polls):
        append_count_point(series, index * 10, value, limit=100)
    assert list(zip(series.times_ns, series.values, strict=True)) == [
        (0, 0), (30, 5), (40, 9), (50, 9), (80, 12), (90, 12)
    ]  # fmt: skip
    # each kept point's increase is the count of its own poll interval (or of the quiet ones before)
    capped = CounterSeries("vcpu0", EMULATED_EVENT)
    for index, value in enumerate(polls):
        append_count_point(capped, index * 10, value, limit=3)
    assert capped.values == [0, 5, 9]
