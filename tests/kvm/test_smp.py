"""SMP on real KVM: a guest starts its APs with INIT-SIPI-SIPI through the in-kernel LAPIC.

The guest (guest_src/smp.c) broadcasts INIT and two STARTUP IPIs; each AP runs a real-mode
trampoline that writes its initial APIC id to port 0x511 and parks. The exit hook sees which
vCPU wrote which id, so the test checks the startup from the VMM's side, not the guest's word.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import vmscope
from vmscope.guest.build import build_runtime_guest
from vmscope.vmm.hooks import ExitEvent
from vmscope.vmm.machine import Machine, RunResult
from vmscope.vmm.platform import install_platform_devices

GUEST_SRC = Path(__file__).parent / "guest_src" / "smp.c"
SRC = str(Path(vmscope.__file__).resolve().parents[1])  # the vmscope these tests import
AP_REPORT_PORT = 0x511
STATUS_OK = 33  # debug_exit(0x10)
STATUS_AP_TIMEOUT = 37  # debug_exit(0x12): fewer APs than expected arrived


@pytest.fixture(scope="module")
def smp_guest() -> Path:
    return build_runtime_guest("smp", [GUEST_SRC])


def run_smp(
    guest: Path, tmp_path: Path, cpus: int, cmdline: str = ""
) -> tuple[RunResult, list[ExitEvent], str]:
    serial_log = tmp_path / "serial.log"
    reports: list[ExitEvent] = []
    with Machine(mem="64M", cpus=cpus) as machine:
        install_platform_devices(machine, serial=f"file:{serial_log}")
        machine.add_exit_hook(
            reports.append,
            reasons=["IO"],
            addresses=range(AP_REPORT_PORT, AP_REPORT_PORT + 1),
            registers=False,
        )
        machine.load(guest, cmdline=cmdline)
        result = machine.run(timeout=30)
    return result, reports, serial_log.read_text()


@pytest.mark.guest_support("PVH ELF (bundled runtime)", devices="3 vCPUs (INIT/SIPI), LAPIC, ACPI MADT")
def test_three_cpus_each_ap_reports_its_own_apic_id_once(smp_guest: Path, tmp_path: Path) -> None:
    # no cpus= on the command line: the guest takes the CPU count from CPUID leaf 1
    result, reports, serial = run_smp(smp_guest, tmp_path, cpus=3)
    assert result.exit_status == STATUS_OK, (result.reason, serial)
    assert all(event.access == "out" and len(event.data) == 1 for event in reports)
    # vCPU n has APIC id n; each AP wrote once, the BSP (vCPU 0) never
    assert sorted((event.vcpu, event.data[0]) for event in reports) == [(1, 1), (2, 2)]
    assert "bsp apic id 0, 2 of 2 AP(s) reported" in serial
    assert "apic id mask 0000000000000006" in serial
    assert "smp: OK" in serial


def test_one_cpu_completes_without_aps(smp_guest: Path, tmp_path: Path) -> None:
    result, reports, serial = run_smp(smp_guest, tmp_path, cpus=1)
    assert result.exit_status == STATUS_OK, (result.reason, serial)
    assert reports == []
    assert "0 of 0 AP(s) reported" in serial


def test_missing_aps_end_with_the_timeout_status(smp_guest: Path, tmp_path: Path) -> None:
    # the guest is told to expect 2 CPUs on a 1-CPU machine: its wait must end, with its own status
    result, reports, serial = run_smp(smp_guest, tmp_path, cpus=1, cmdline="cpus=2 ap_timeout_ms=200")
    assert result.exit_status == STATUS_AP_TIMEOUT, (result.reason, serial)
    assert reports == []
    assert "0 of 1 AP(s) reported" in serial


def test_vmscope_run_cli_starts_two_cpus(smp_guest: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "vmscope", "run", "--elf", str(smp_guest), "--cpus", "2",
         "--cmdline", "cpus=2"],
        capture_output=True, text=True, timeout=60, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert run.returncode == STATUS_OK, run.stderr
    assert "bsp apic id 0, 1 of 1 AP(s) reported" in run.stdout
    assert "apic id mask 0000000000000002" in run.stdout


def test_profiling_an_smp_guest_attributes_each_vcpus_exits_to_it(smp_guest: Path) -> None:
    from vmscope.profiler.recorder import ProfileRecorder
    from vmscope.vmm.machine import Machine
    from vmscope.vmm.platform import install_platform_devices

    with Machine(mem="64M", cpus=3) as machine:
        install_platform_devices(machine, serial="none")
        machine.load(smp_guest)
        recorder = ProfileRecorder(machine, frequency_hz=199)
        recorder.start()
        result = machine.run(timeout=60)
        profile = recorder.finish()
    assert result.exit_status == 33, result.reason
    reports = {s.vcpu: s.count for s in profile.exit_stats if s.detail == f"port {AP_REPORT_PORT:#x} out"}
    assert reports == {1: 1, 2: 1}  # each AP's report is counted on its own vCPU, once
    exit_samples = {(s.vcpu, s.exit_detail) for s in profile.samples if s.origin == "exit"}
    assert {(1, f"port {AP_REPORT_PORT:#x} out"), (2, f"port {AP_REPORT_PORT:#x} out")} <= exit_samples
    # the APs' report runs in the real-mode trampoline below 1 MiB: its samples point there
    ap_ips = [s.ip for s in profile.samples if s.vcpu in (1, 2) and s.origin == "exit"]
    assert ap_ips and all(ip < 0x10_0000 for ip in ap_ips)
    assert profile.metadata.cpus == 3 and profile.vcpus == [0, 1, 2]
