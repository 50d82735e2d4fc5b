"""The profiler on real KVM: time attribution, exit attribution, stacks, the record CLI."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from vmscope.guest.build import build_runtime_guest
from vmscope.profiler import profile_file
from vmscope.profiler.model import Profile
from vmscope.profiler.recorder import ProfileRecorder
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

GUEST_SRC = Path(__file__).parent / "guest_src" / "profile_ratio.c"
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def ratio_guest() -> Path:
    return build_runtime_guest("profile-ratio", [GUEST_SRC])


def record(guest: Path, cmdline: str, frequency_hz: float) -> tuple[Profile, int]:
    with Machine(mem="64M") as machine:
        install_platform_devices(machine, serial="none")
        machine.load(guest, cmdline=cmdline)
        recorder = ProfileRecorder(machine, frequency_hz=frequency_hz)
        recorder.start()
        result = machine.run(timeout=120)
        profile = recorder.finish()
    return profile, result.exit_status


@pytest.fixture(scope="module")
def ratio_profile(ratio_guest: Path) -> Profile:
    profile, status = record(ratio_guest, "rounds=150 unit=1000000", 499)
    assert status == 33
    return profile


def leaf_functions(profile: Profile, origin: str) -> Counter[str]:
    symbolizer = profile.symbolizer()
    names: Counter[str] = Counter()
    for sample in profile.samples:
        if sample.origin == origin:
            symbol = symbolizer.lookup(sample.ip)
            names[symbol.name if symbol else hex(sample.ip)] += 1
    return names


def test_time_samples_split_3_to_1_between_the_named_functions(ratio_profile: Profile) -> None:
    leaves = leaf_functions(ratio_profile, "timer")
    # spin() does the work; which wrapper called it decides the share
    symbolizer = ratio_profile.symbolizer()
    by_caller: Counter[str] = Counter()
    for sample in ratio_profile.samples:
        if sample.origin != "timer":
            continue
        names = [s.name for s in map(symbolizer.lookup, sample.frames) if s is not None]
        for name in ("spin_heavy", "spin_light"):
            if name in names:
                by_caller[name] += 1
    heavy, light = by_caller["spin_heavy"], by_caller["spin_light"]
    assert heavy + light >= 100, (leaves, by_caller)
    share = 100 * heavy / (heavy + light)
    assert abs(share - 75) <= 5, f"spin_heavy got {share:.1f}% of {heavy + light} samples, expected 75 +- 5"


def test_time_samples_show_the_right_callers(ratio_profile: Profile) -> None:
    symbolizer = ratio_profile.symbolizer()
    chains: Counter[tuple[str, ...]] = Counter()
    for sample in ratio_profile.samples:
        if sample.origin == "timer":
            names = tuple(s.name if s else "?" for s in map(symbolizer.lookup, sample.frames))
            chains[names[:4]] += 1
    top = [chain for chain, _ in chains.most_common(2)]
    assert ("spin", "spin_heavy", "split_work", "user_main") in top
    assert any(chain[:3] == ("spin", "spin_light", "split_work") for chain in chains)


def test_exit_counts_are_exact_and_attributed_to_the_functions_that_caused_them(
    ratio_profile: Profile,
) -> None:
    # every sample has real registers, the very first exit included (syncing starts there)
    assert all(sample.ip != 0 for sample in ratio_profile.samples)
    counts = {(s.reason, s.detail): s.count for s in ratio_profile.exit_stats}
    assert counts[("IO", "port 0x510 out")] == 123
    assert counts[("MMIO", "0xd0000000 write")] == 45
    symbolizer = ratio_profile.symbolizer()
    attributed: Counter[tuple[str, str]] = Counter()
    for sample in ratio_profile.samples:
        if sample.origin == "exit" and sample.exit_detail in ("port 0x510 out", "0xd0000000 write"):
            symbol = symbolizer.lookup(sample.ip)
            attributed[(sample.exit_detail, symbol.name if symbol else hex(sample.ip))] += 1
    assert attributed[("port 0x510 out", "port_writer")] == 123
    assert attributed[("0xd0000000 write", "mmio_writer")] == 45


def test_record_cli_writes_a_profile_that_report_reads(tmp_path: Path, ratio_guest: Path) -> None:
    out = tmp_path / "ratio.vmprof"
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-m", "vmscope", "record", "-o", str(out), "-F", "199", "--",
         "--elf", str(ratio_guest), "--cmdline", "rounds=4 unit=1000000", "--serial", "none"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert run.returncode == 33, run.stderr
    profile = profile_file.load(out)
    assert profile.metadata.guest_kind == "PVH ELF"
    report = subprocess.run(
        [sys.executable, "-m", "vmscope", "report", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert report.returncode == 0, report.stderr
    assert "port_writer" in report.stdout and "IO port 0x510 out" in report.stdout


def test_post_codes_become_boot_markers_on_the_timeline(tmp_path: Path) -> None:
    from vmscope.arch.x86.cpu_state import CpuMode

    image = tmp_path / "post.bin"
    # mov al, 0x11; out 0x80, al; mov al, 0x22; out 0x80, al; then debug-exit 0
    image.write_bytes(bytes.fromhex("b011e680b022e680") + bytes.fromhex("baf400b000eef4"))
    with Machine(mem="16M") as machine:
        install_platform_devices(machine, serial="none")
        machine.load(image, kind="flat", flat_address=0x7C00, flat_mode=CpuMode.REAL)
        recorder = ProfileRecorder(machine)
        recorder.start()
        machine.run(timeout=30)
        profile = recorder.finish()
    markers = [span for span in profile.spans if span.track == "port80"]
    assert [span.name for span in markers] == ["POST 0x11", "POST 0x22"]
    assert 0 <= markers[0].start_ns <= markers[1].start_ns <= profile.metadata.duration_ns
