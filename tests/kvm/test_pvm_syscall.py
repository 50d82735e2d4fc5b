"""User-mode SYSCALL into a kernel whose entry page is supervisor-only, and SYSRET back, on real
KVM (guest_src/pvm_syscall.c). A kvm_pvm host delivers the user `syscall` to LSTAR still at
CPL3; vmscope turns the resulting #PF into the SYSCALL it should have been. On a VT-x/AMD-V host
the CPU does it right and nothing needs repairing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmscope.guest.build import build_runtime_guest
from vmscope.kvm.system import detect_backend
from vmscope.vmm.machine import Machine, RunResult
from vmscope.vmm.platform import install_platform_devices

GUEST_SRC = Path(__file__).parent / "guest_src" / "pvm_syscall.c"
STATUS_PASS = 1  # guest_main returned 0: debug-exit (0 << 1) | 1
SOFTWARE_HOST = detect_backend() == "kvm_pvm"


@pytest.fixture(scope="module")
def syscall_guest() -> Path:
    return build_runtime_guest("pvm_syscall", [GUEST_SRC])


def run_guest(guest: Path, tmp_path: Path, *, fallback: bool, rounds: int) -> tuple[RunResult, int, str]:
    serial = tmp_path / f"serial-{fallback}.log"
    with Machine(mem="64M", emulate_fallback=fallback) as machine:
        install_platform_devices(machine, serial=f"file:{serial}")
        machine.load(guest, cmdline=f"rounds={rounds}")
        result = machine.run(timeout=60)
        repaired = sum(row[3] for row in machine.fallback_counts() if row[1] == "syscall (repaired)")
    return result, repaired, serial.read_text()


def test_user_syscalls_enter_the_kernel_at_cpl0_and_sysret_returns(
    syscall_guest: Path, tmp_path: Path
) -> None:
    result, repaired, serial = run_guest(syscall_guest, tmp_path, fallback=True, rounds=5)
    assert "pvm_syscall: verdict PASS" in serial, (serial, result.reason)
    assert "entries 5, ok 5 of 5" in serial
    assert result.exit_status == STATUS_PASS, result.reason
    assert repaired == (5 if SOFTWARE_HOST else 0)


@pytest.mark.skipif(not SOFTWARE_HOST, reason="a VT-x/AMD-V host runs SYSCALL correctly: nothing to repair")
def test_without_the_fallback_the_syscall_faults_on_the_kernel_entry(
    syscall_guest: Path, tmp_path: Path
) -> None:
    result, repaired, serial = run_guest(syscall_guest, tmp_path, fallback=False, rounds=1)
    assert result.exit_status == 1 and result.crash is not None, result.reason
    assert result.crash.instruction == "clac"  # the #PF entry, reached from CPL3 with cr2 = LSTAR
    assert "verdict" not in serial and repaired == 0
