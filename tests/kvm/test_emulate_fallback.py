"""vmscope's fallback emulator on real KVM: the guest (guest_src/emulate.c) executes at CPL0 the
instructions the host's KVM cannot emulate and checks their results itself.

Only instructions KVM fails on reach the fallback; on a VT-x/AMD-V host the CPU runs them all
natively, the guest passes without vmscope completing anything, and the tests that need
emulation failures skip with that reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmscope.guest.build import build_runtime_guest
from vmscope.kvm.system import detect_backend
from vmscope.vmm.machine import Machine, RunResult
from vmscope.vmm.platform import install_platform_devices

GUEST_SRC = Path(__file__).parent / "guest_src" / "emulate.c"
STATUS_PASS = 33
SOFTWARE_HOST = detect_backend() == "kvm_pvm"
needs_failures = pytest.mark.skipif(
    not SOFTWARE_HOST, reason="this host's KVM runs these instructions without emulation failures"
)


@pytest.fixture(scope="module")
def emulate_guest() -> Path:
    return build_runtime_guest("emulate", [GUEST_SRC])


def run_guest(
    guest: Path, tmp_path: Path, *, fallback: bool, cmdline: str = ""
) -> tuple[RunResult, list[tuple[int, str, int, int, int]], str]:
    serial = tmp_path / f"serial-{fallback}.log"
    with Machine(mem="64M", emulate_fallback=fallback) as machine:
        install_platform_devices(machine, serial=f"file:{serial}")
        machine.load(guest, cmdline=cmdline)
        result = machine.run(timeout=60)
        counts = machine.fallback_counts()
    return result, counts, serial.read_text()


def test_guest_checks_pass_with_the_fallback_on(emulate_guest: Path, tmp_path: Path) -> None:
    result, counts, serial = run_guest(emulate_guest, tmp_path, fallback=True)
    assert result.exit_status == STATUS_PASS, (result.reason, serial, result.crash and result.crash.format())
    assert "emulate: verdict PASS" in serial
    assert result.emulated_instructions == sum(row[3] for row in counts)
    if SOFTWARE_HOST:
        mnemonics = {row[1] for row in counts}
        expected = {
            "int3",
            "popcnt",
            "clac",
            "stac",
            "wait",
            "ldmxcsr",
            "movd",
            "lock cmpxchg16b",
            "xgetbv",
            "xsave",
            "xrstor",
            "xsavec",
        }  # fmt: skip  (KVM emulates xsetbv itself)
        assert expected <= mnemonics, f"not completed by vmscope: {expected - mnemonics}"
        assert all(row[0] == 0 and row[3] >= 1 and row[4] > 0 for row in counts)


@needs_failures
def test_fallback_off_keeps_kvms_crash_report(emulate_guest: Path, tmp_path: Path) -> None:
    result, counts, _ = run_guest(emulate_guest, tmp_path, fallback=False)
    assert result.exit_status == 1 and result.crash is not None, result.reason
    assert result.crash.instruction == "int3"  # the guest's first check
    assert result.crash.hint is not None and "--emulate-fallback off" in result.crash.hint
    assert counts == [] and result.emulated_instructions == 0


@needs_failures
def test_each_loop_iteration_is_one_completion_at_one_rip(emulate_guest: Path, tmp_path: Path) -> None:
    loops = 300
    cmdline = f"only=fwait clac={loops}"
    result, counts, serial = run_guest(emulate_guest, tmp_path, fallback=True, cmdline=cmdline)
    assert result.exit_status == STATUS_PASS, (result.reason, serial)
    clac_rows = [row for row in counts if row[1] == "clac"]
    assert [row[3] for row in clac_rows] == [loops], clac_rows


@needs_failures
def test_run_summary_line_reports_the_completed_instructions(emulate_guest: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    completed = subprocess.run(
        [sys.executable, "-m", "vmscope", "run", "--elf", str(emulate_guest), "--serial", "none",
         "--mem", "64M", "--cmdline", "only=clac_stac"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert completed.returncode == STATUS_PASS, completed.stderr
    assert "vmscope completed 2 instructions KVM could not emulate" in completed.stderr
