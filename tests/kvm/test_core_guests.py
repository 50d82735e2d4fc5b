"""The VMM core on real KVM: flat guests in each mode, serial output, exit status, crashes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.kvm.guests import UD2, debug_exit_long, debug_exit_real, out_byte, serial_print_real
from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.devices.base import Device
from vmscope.errors import GuestMemoryError
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmscope", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.guest_support(
    "flat binary, real mode", devices="COM1 serial, debug-exit", detail="`vmscope run --flat`"
)
def test_real_mode_flat_guest_prints_and_exits_with_debug_exit_status(tmp_path: Path) -> None:
    image = tmp_path / "hello.bin"
    image.write_bytes(serial_print_real(b"hello from real mode\n") + debug_exit_real(0x21))
    log = tmp_path / "serial.log"
    result = run_cli(
        "run", "--flat", str(image), "--mode", "real", "--load-address", "0x7c00", "--serial", f"file:{log}"
    )
    assert result.returncode == (0x21 << 1) | 1, result.stderr
    assert log.read_bytes() == b"hello from real mode\n"


@pytest.mark.guest_support("flat binary, long mode", devices="debug-exit", detail="Python API")
def test_long_mode_flat_guest_runs_through_the_api(tmp_path: Path) -> None:
    image = tmp_path / "long.bin"
    image.write_bytes(out_byte(0x3F8, ord("L")) + debug_exit_long(3))
    log = tmp_path / "serial.log"
    with Machine(mem="32M") as machine:
        install_platform_devices(machine, serial=f"file:{log}")
        machine.load(image, kind="flat", flat_address=0x100000, flat_mode=CpuMode.LONG)
        result = machine.run(timeout=30)
    assert (result.exit_status, result.crash) == (7, None)
    assert log.read_bytes() == b"L"


def test_triple_fault_gives_crash_report_and_status_1(tmp_path: Path) -> None:
    image = tmp_path / "crash.bin"
    image.write_bytes(b"\x90\x90" + UD2)  # #UD with an empty IDT -> #DF -> triple fault
    result = run_cli("run", "--flat", str(image), "--mode", "long", "--load-address", "0x100000")
    assert result.returncode == 1, result.stderr
    assert "guest crashed on vCPU 0: triple fault" in result.stderr
    assert "rip " in result.stderr and "cr0=" in result.stderr


def test_crash_report_imports_work_in_the_sandbox_from_a_tree_without_bytecode(tmp_path: Path) -> None:
    """A fresh checkout has no __pycache__, and without PYTHONDONTWRITEBYTECODE Python writes one
    as it imports. The crash report's modules are imported on the vCPU thread, whose seccomp
    filter refuses opening files for writing: the report must still come out."""
    import shutil

    tree = tmp_path / "src"
    shutil.copytree(SRC, tree, ignore=shutil.ignore_patterns("__pycache__"))
    image = tmp_path / "crash.bin"
    image.write_bytes(b"\x90\x90" + UD2)
    result = subprocess.run(
        [sys.executable, "-m", "vmscope", "run", "--flat", str(image), "--mode", "long",
         "--load-address", "0x100000"],
        capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "guest crashed on vCPU 0: triple fault" in result.stderr


def test_guest_that_never_exits_is_stopped_by_timeout(tmp_path: Path) -> None:
    image = tmp_path / "spin.bin"
    image.write_bytes(b"\xeb\xfe")  # jmp $
    with Machine(mem="16M") as machine:
        machine.load(image, kind="flat", flat_address=0x7C00, flat_mode=CpuMode.REAL)
        result = machine.run(timeout=0.5)
    assert result.exit_status == 124
    assert "time limit" in result.reason


class _HostileDevice(Device):
    """A device whose register write makes it read guest memory far outside RAM."""

    name = "hostile"

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.refused: list[GuestMemoryError] = []

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        try:
            self.machine.memory.read(0xFFFF_FFFF_0000, 4096)
        except GuestMemoryError as error:
            self.refused.append(error)
            raise  # let the bus see a failing device, too


def test_out_of_range_guest_physical_access_by_a_device_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "poke.bin"
    image.write_bytes(b"\xba\x00\x05\xb0\x01\xee" + debug_exit_real(9))  # out 0x500, then exit
    with Machine(mem="16M") as machine:
        install_platform_devices(machine, serial="none")
        hostile = _HostileDevice(machine)
        machine.add_pio_device(0x500, 1, hostile)
        machine.load(image, kind="flat", flat_address=0x7C00, flat_mode=CpuMode.REAL)
        result = machine.run(timeout=30)
        assert result.exit_status == 19  # the guest went on to its debug-exit
        assert len(hostile.refused) == 1
        assert "outside guest RAM" in str(hostile.refused[0])
        assert machine.pio_bus.device_errors["hostile"] == 1


def test_exit_accounting_counts_each_port_exactly(tmp_path: Path) -> None:
    # mov cx, 500; loop: out 0x510, al; dec cx; jnz loop; then debug-exit
    loop = b"\xb9\xf4\x01" + b"\xba\x10\x05\xee\x49\x75\xfa"
    image = tmp_path / "loop.bin"
    image.write_bytes(loop + debug_exit_real(1))
    with Machine(mem="16M") as machine:
        install_platform_devices(machine, serial="none")
        machine.load(image, kind="flat", flat_address=0x7C00, flat_mode=CpuMode.REAL)
        machine.run(timeout=30)
        stats = machine.runners[0].stats
        counts = {key: histogram.count for key, histogram in stats.handling.items()}
    from vmscope.vmm.exit_keys import decode_exit_key

    decoded = {decode_exit_key(key): n for key, n in counts.items()}
    # writes KVM queued in its coalesced ring are counted under their own access
    assert decoded[("IO", 0x510, "out")] + decoded.get(("IO", 0x510, "out coalesced"), 0) == 500
    assert decoded[("IO", 0xF4, "out")] == 1
    assert machine.pio_bus.unclaimed_writes[0x510, 1] == 500


def test_stop_from_another_thread_ends_a_spinning_guest(tmp_path: Path) -> None:
    image = tmp_path / "spin.bin"
    image.write_bytes(b"\xeb\xfe")
    with Machine(mem="16M", cpus=2) as machine:
        machine.load(image, kind="flat", flat_address=0x7C00, flat_mode=CpuMode.REAL)
        machine.start()
        threading.Timer(0.3, machine.stop).start()
        result = machine.wait(timeout=20)
    assert result is not None
    assert result.exit_status == 0 and result.reason == "stopped by the host"


@pytest.mark.parametrize("mem", ["1M", "64M"])
def test_memory_sizes(tmp_path: Path, mem: str) -> None:
    image = tmp_path / "x.bin"
    image.write_bytes(debug_exit_real(2))
    with Machine(mem=mem) as machine:
        install_platform_devices(machine, serial="none")
        machine.load(image, kind="flat", flat_address=0x7C00, flat_mode=CpuMode.REAL)
        assert machine.run(timeout=30).exit_status == 5


@pytest.mark.parametrize(("signal_number", "status"), [(2, 130), (15, 143)])
def test_ctrl_c_and_sigterm_stop_the_vm_cleanly(tmp_path: Path, signal_number: int, status: int) -> None:
    image = tmp_path / "spin.bin"
    image.write_bytes(b"\xeb\xfe")  # jmp $
    command = ["run", "--flat", str(image), "--mode", "real", "--load-address", "0x7c00"]
    process = subprocess.Popen(
        [sys.executable, "-m", "vmscope", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    time.sleep(1.0)  # let it boot into the loop
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    assert ("Ctrl-C" if signal_number == 2 else "SIGTERM") in stderr
