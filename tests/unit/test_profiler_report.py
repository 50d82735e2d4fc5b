"""Terminal reports and the ``vmscope report`` subcommand, on the synthetic profile of test_profiler_model."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from tests.unit.rigs.profiles import EXIT_SAMPLES, EXITS, TIMER_SAMPLES, build_profile
from vmscope.cli import diff as diff_cli
from vmscope.cli import report as report_cli
from vmscope.errors import ConfigError, VmscopeError
from vmscope.profiler.profile_file import save
from vmscope.profiler.report import (
    FrameNamer,
    ReportOptions,
    exit_causes,
    kvm_stat_events,
    report_text,
    top_functions,
)

TIMER_COUNT = sum(repeat for *_, repeat in TIMER_SAMPLES)


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%"


def row_of(text: str, first_cell: str) -> list[str]:
    """The cells of the ASCII table row whose first cell is ``first_cell``."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def rows_with(text: str, cell: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cell in cells:
            rows.append(cells)
    return rows


def test_top_functions_self_and_total() -> None:
    profile = build_profile()
    namer = FrameNamer(profile.symbolizer())
    samples = [s for s in profile.samples if s.origin == "timer"]
    stats = {s.name: s for s in top_functions(samples, namer)}
    assert stats["compute"].self_samples == 6 and stats["compute"].total_samples == 6
    # main is never a leaf but is on every vcpu0 stack except the unnamed-in-image one
    assert stats["main"].self_samples == 0 and stats["main"].total_samples == 6 + 2 + 1
    assert stats["main"].total_pct == pytest.approx(100 * 9 / TIMER_COUNT)
    # unknown addresses are kept: module+offset inside the image, hex outside every module
    assert stats["guest.elf+0xf00"].self_samples == 1 and stats["guest.elf+0xf00"].module == "guest.elf"
    assert stats["0x5000"].self_samples == 1 and stats["0x5000"].module == ""
    assert stats["do_syscall_64"].module == "kernel" and stats["do_syscall_64"].space == "kernel"
    assert sum(s.self_samples for s in stats.values()) == TIMER_COUNT


def test_exit_causes_spread_recorded_exits_over_sampled_code() -> None:
    profile = build_profile()
    causes = {(c.event, c.code): c for c in exit_causes(profile, FrameNamer(profile.symbolizer()))}
    io_count, io_ns = 100, 2_000  # EXITS[0]
    io_samples = sum(r for v, reason, detail, _, r in EXIT_SAMPLES if detail == "port 0x3f8 out")
    serial = causes[("IO port 0x3f8 out", ("serial_putc", "main"))]
    assert serial.samples == 4
    assert serial.exits == pytest.approx(io_count * 4 / io_samples)
    assert serial.handling_ns == pytest.approx(io_count * io_ns * 4 / io_samples)
    compute = causes[("IO port 0x3f8 out", ("compute", "main"))]
    assert compute.exits == pytest.approx(io_count * 1 / io_samples)
    halt = causes[("HLT", ("idle",))]
    assert (halt.samples, halt.exits, halt.handling_ns) == (2, 10, 500_000)
    all_exits = sum(count for *_, count, _ in EXITS)
    assert halt.exits_pct == pytest.approx(100 * 10 / all_exits)
    # the most expensive cause comes first
    assert exit_causes(profile, FrameNamer(profile.symbolizer()))[0].event == "HLT"


def test_kvm_stat_events_classes_and_sorting() -> None:
    profile = build_profile()
    by_samples = kvm_stat_events(profile, "vmexit", sort="samples")
    assert [r.event for r in by_samples] == ["IO", "HLT", "MMIO"]  # 120, 10, 5 exits
    io = by_samples[0]
    assert (io.samples, io.min_ns, io.max_ns, io.total_ns) == (120, 1_000, 2_000, 100 * 2_000 + 20 * 1_000)
    assert io.samples_pct == pytest.approx(100 * 120 / 135)
    by_time = kvm_stat_events(profile, "vmexit", sort="time")
    assert [r.event for r in by_time] == ["HLT", "IO", "MMIO"]  # 500us, 220us, 50us
    ioport = kvm_stat_events(profile, "ioport")
    assert [r.event for r in ioport] == ["port 0x3f8 out", "port 0x80 out"]
    assert [r.event for r in kvm_stat_events(profile, "mmio")] == ["mmio 0xd0000000 read"]
    assert [r.event for r in kvm_stat_events(profile, "vmexit", vcpu=1)] == ["IO", "HLT"]
    with pytest.raises(ConfigError, match="event class"):
        kvm_stat_events(profile, "cpuid")


def test_text_report_names_functions_percentages_and_exits() -> None:
    text = report_text(build_profile())
    assert "\x1b[" not in text  # plain text, no terminal escapes
    compute = row_of(text, pct(6, TIMER_COUNT))
    assert "compute" in compute and "guest.elf" in compute
    assert rows_with(text, "idle")[0][:2] == [pct(3, TIMER_COUNT), "3"]
    main = rows_with(text, "main")[0]
    assert main[:4] == ["0.00%", "0", pct(9, TIMER_COUNT), "9"]
    assert rows_with(text, "0x5000") and rows_with(text, "guest.elf+0xf00")
    serial_cause = row_of(text, "IO port 0x3f8 out")
    assert serial_cause[1] == "serial_putc <- main" and serial_cause[2:4] == ["4", "80"]
    # perf-kvm-stat style table
    io = row_of(text, "IO")
    assert io[1:4] == ["120", pct(120, 135), pct(220_000, 770_000)]
    assert io[4:6] == ["1.00us", "2.00us"]
    assert re.fullmatch(r"1\.83us \( \+- +\d+\.\d\d% \)", io[6])
    assert "Total Samples:135, Total events handled time:770.00us." in text
    assert row_of(text, "port 0x61 read size 1")[1] == "2"


def test_text_report_options_filter_and_sort() -> None:
    text = report_text(build_profile(), ReportOptions(event="ioport", vcpu=1, sort="time"))
    assert row_of(text, "port 0x80 out")[1:4] == ["20", "100.00%", "100.00%"]
    assert not rows_with(text, "port 0x3f8 out")  # vcpu0's port
    assert not rows_with(text, "compute")  # vcpu0's function
    assert rows_with(text, "idle")[0][0] == pct(3, 4)
    by_time = report_text(build_profile(), ReportOptions(sort="time"))
    events = by_time.split("Analyze events", 1)[1]
    first_cells = [line.strip().strip("|").split("|")[0].strip() for line in events.splitlines()]
    assert [c for c in first_cells if c in ("IO", "HLT", "MMIO")] == ["HLT", "IO", "MMIO"]
    with pytest.raises(ConfigError, match="--vcpu 7"):
        report_text(build_profile(), ReportOptions(vcpu=7))


def test_text_report_with_exit_samples_only_says_so() -> None:
    profile = build_profile()
    profile.samples = [s for s in profile.samples if s.origin == "exit"]
    text = report_text(profile)
    assert "Top functions (0 timer samples): none (the profile has exit samples only" in text
    exit_text = report_text(profile, ReportOptions(origin="exit"))
    assert rows_with(exit_text, "serial_putc")[0][:2] == [pct(4, 7), "4"]


# --- the subcommand ------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vmscope")
    subparsers = parser.add_subparsers()
    report_cli.register(subparsers)
    diff_cli.register(subparsers)
    return parser.parse_args(argv)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "run.vmprof"
    save(build_profile(), path)
    return path


def test_report_command_text_to_stdout(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["report", str(saved)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert rows_with(out, "compute")[0][0] == pct(6, TIMER_COUNT)
    assert "vmscope profile of /images/guest.elf (elf): 2 vCPUs, kvm_intel" in out


def test_report_command_formats_to_files(saved: Path, tmp_path: Path) -> None:
    for format_name in ("text", "folded", "speedscope", "pprof", "chrome-trace", "html"):
        output = tmp_path / f"out.{format_name}"
        args = parse(["report", str(saved), "--format", format_name, "-o", str(output)])
        assert args.func(args) == 0
        assert output.stat().st_size > 0
    assert "main;compute 6" in (tmp_path / "out.folded").read_text().splitlines()
    assert json.loads((tmp_path / "out.speedscope").read_text())["profiles"][0]["type"] == "sampled"
    assert (tmp_path / "out.pprof").read_bytes()[:2] == b"\x1f\x8b"
    assert "traceEvents" in json.loads((tmp_path / "out.chrome-trace").read_text())
    assert (tmp_path / "out.html").read_text().startswith("<!DOCTYPE html>")
    assert "compute" in (tmp_path / "out.text").read_text()


def test_report_command_folded_prefix_to_stdout(
    saved: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    args = parse(["report", str(saved), "--format", "folded", "--prefix", "cpl", "--vcpu", "1"])
    assert args.func(args) == 0
    assert capsysbinary.readouterr().out.decode().splitlines() == ["kernel;do_syscall_64 1", "kernel;idle 3"]


def test_report_command_bad_inputs(saved: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "shot.png"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    for argv, words in [
        (["report", str(tmp_path / "missing.vmprof")], "cannot read"),
        (["report", str(foreign)], "PNG"),
        (["report", str(saved), "--vcpu", "9"], "--vcpu 9"),
        (["report", str(saved), "--limit", "0"], "--limit"),
        (["report", str(saved), "--symbols", str(foreign)], "System.map"),
        (["report", str(saved), "-o", str(tmp_path / "no" / "such" / "dir.txt")], "cannot write"),
    ]:
        args = parse(argv)
        with pytest.raises(VmscopeError, match=re.escape(words)):
            args.func(args)


def test_report_command_symbols_option_names_unknown_addresses(saved: Path, tmp_path: Path) -> None:
    symbols = tmp_path / "extra.map"
    symbols.write_text("0000000000005000 T late_loaded_function\n")
    output = tmp_path / "out.folded"
    args = parse(["report", str(saved), "--format", "folded", "--symbols", str(symbols), "-o", str(output)])
    assert args.func(args) == 0
    assert "main;late_loaded_function 1" in output.read_text().splitlines()


def test_main_cli_prints_one_line_error_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmscope.cli.main import main

    bad = tmp_path / "bad.vmprof"
    bad.write_bytes(b"VMSCOPE-PROFILE\n9\n")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vmscope: {bad}: ") and err.count("\n") == 1


def test_io_requests_are_split_into_their_virtualization_parts() -> None:
    from vmscope.profiler.model import IO_PART_NAMES, Profile, Span
    from vmscope.profiler.report import io_latency_rows

    profile = Profile()
    for start in (0, 10_000):
        parts = dict(zip(IO_PART_NAMES, (1_000, 500, 6_000, 500, 2_000), strict=True))
        profile.spans.append(Span("io:virtio-blk0", "request:write", start, start + 10_000, parts))
    profile.spans.append(Span("vcpu0", "guest", 0, 5))  # not an I/O request
    rows = io_latency_rows(profile)
    assert rows == [("virtio-blk0", "write", 2, 10_000.0, [1_000.0, 500.0, 6_000.0, 500.0, 2_000.0])]
    text = report_text(profile)
    assert "I/O request latency" in text and "virtio-blk0" in text and "(60.00%)" in text
