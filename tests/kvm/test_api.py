"""The public Python API on real KVM: custom devices, registers and memory of a paused VM."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import vmscope
from tests.kvm.guests import debug_exit_long, debug_exit_real
from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


class Recorder(vmscope.Device):
    name = "recorder"

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return (0x1234_5678 + offset).to_bytes(4, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def test_a_custom_device_sees_the_guests_accesses_with_the_right_values(tmp_path: Path) -> None:
    # long mode: mov dx,0x702; in eax,dx; mov dx,0x701; out dx,eax; mov al,0x5a; out dx,al; exit
    code = b"\x66\xba\x02\x07\xed" + b"\x66\xba\x01\x07\xef" + b"\xb0\x5a\xee" + debug_exit_long(4)
    image = tmp_path / "dev.bin"
    image.write_bytes(code)
    device = Recorder()
    with vmscope.Machine(mem="16M") as vm:
        vmscope.install_platform_devices(vm, serial="none")
        vm.add_pio_device(0x700, 4, device)
        vm.load(image, kind="flat", flat_address=0x100000, flat_mode=CpuMode.LONG)
        assert vm.run(timeout=30).exit_status == 9
    assert device.reads == [(2, 4)]
    # the value read (0x12345678 + 2) goes back out as a 32-bit write, then a byte
    assert device.writes == [(1, (0x1234_567A).to_bytes(4, "little")), (1, b"\x5a")]


def test_registers_set_before_start_reach_the_guest(tmp_path: Path) -> None:
    image = tmp_path / "reg.bin"
    image.write_bytes(b"\x66\xba\x01\x07\xef" + debug_exit_long(0))  # out 0x701, eax
    device = Recorder()
    with vmscope.Machine(mem="16M") as vm:
        vmscope.install_platform_devices(vm, serial="none")
        vm.add_pio_device(0x700, 4, device)
        vm.load(image, kind="flat", flat_address=0x100000, flat_mode=CpuMode.LONG)
        vm.set_registers(0, rax=0xCAFE_F00D)
        assert vm.get_registers(0)["rax"] == 0xCAFE_F00D
        with pytest.raises(ConfigError, match="unknown register"):
            vm.set_registers(0, xyz=1)
        vm.run(timeout=30)
    assert device.writes == [(1, (0xCAFE_F00D).to_bytes(4, "little"))]
    with pytest.raises(ConfigError, match="machine is closed"):
        vm.get_registers(0)


def test_pause_read_registers_and_memory_then_resume(tmp_path: Path) -> None:
    image = tmp_path / "spin.bin"
    spin = b"\xeb\xfe"  # jmp $ at 0x100000
    image.write_bytes(spin)
    with vmscope.Machine(mem="16M") as vm:
        vmscope.install_platform_devices(vm, serial="none")
        vm.load(image, kind="flat", flat_address=0x100000, flat_mode=CpuMode.LONG)
        vm.start()
        time.sleep(0.1)
        with pytest.raises(ConfigError, match="pause"):
            vm.get_registers(0)
        vm.pause()
        registers = vm.get_registers(0)
        assert registers["rip"] == 0x100000
        assert vm.read_virtual(registers["rip"], 2) == spin
        assert vm.read_physical(0x100000, 2) == spin
        # patch the loop into a debug-exit through guest memory, then let it run
        vm.write_virtual(0x100000, debug_exit_long(6))
        vm.resume()
        result = vm.wait(timeout=30)
    assert result is not None and result.exit_status == 13


def test_strict_devices_stop_the_vm_on_a_device_error(tmp_path: Path) -> None:
    class Failing(vmscope.Device):
        name = "failing"

        def read(self, offset: int, size: int) -> bytes:
            raise RuntimeError("broken register")

        def write(self, offset: int, data: bytes) -> None:
            pass

    image = tmp_path / "in.bin"
    image.write_bytes(b"\xba\x00\x07\xec" + debug_exit_real(1))  # in al, 0x700
    for strict, status in ((False, 3), (True, 1)):
        with vmscope.Machine(mem="16M", strict_devices=strict) as vm:
            vmscope.install_platform_devices(vm, serial="none")
            vm.add_pio_device(0x700, 1, Failing())
            vm.load(image, kind="flat", flat_address=0x7C00, flat_mode=CpuMode.REAL)
            result = vm.run(timeout=30)
        assert result.exit_status == status
        if strict:
            assert "device failing failed: broken register" in result.reason


def test_a_vmm_bug_as_a_vcpu_thread_starts_stops_the_vm_with_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails on a vCPU thread ends the run with status 1 and a reason, never a hang."""
    import vmscope.vmm.runner as runner_module

    def broken(name: str | None = None) -> bool:
        raise RuntimeError("thread set-up failed")

    monkeypatch.setattr(runner_module, "name_host_thread", broken)
    image = tmp_path / "exit.bin"
    image.write_bytes(debug_exit_real(1))
    with vmscope.Machine(mem="16M") as vm:
        vmscope.install_platform_devices(vm, serial="none")
        vm.load(image, kind="flat", flat_address=0x7C00, flat_mode=CpuMode.REAL)
        started = time.monotonic()
        result = vm.run(timeout=30)
    assert time.monotonic() - started < 10
    assert result.exit_status == 1
    assert "internal error on vCPU 0: thread set-up failed" in result.reason


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("logging_device.py", "guest exited with status 0"),
        ("exit_hooks.py", "serial_putc"),
        ("pause_and_inspect.py", "paused at rip="),
        ("fault_injecting_device.py", "4 device error(s)"),
    ],
)
def test_examples_run(script: str, expected: str) -> None:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, str(ROOT / "examples" / script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


class StartCounter(vmscope.Device):
    name = "start-counter"

    def __init__(self, machine: vmscope.Machine) -> None:
        self.machine = machine
        self.starts: list[bool] = []  # whether any vCPU thread had started by then

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        pass

    def start(self) -> None:
        self.starts.append(any(runner.thread is not None for runner in self.machine.runners))


def test_devices_start_once_when_the_machine_starts_and_at_once_when_added_later(tmp_path: Path) -> None:
    """Devices begin asynchronous work (a UART's host input) only once every state is final:
    a restored machine has loaded devices, interrupt controllers and vCPUs before it starts."""
    image = tmp_path / "halt.bin"
    image.write_bytes(b"\xf4\xeb\xfd")  # hlt; jmp back
    with vmscope.Machine(mem="16M") as vm:
        early = StartCounter(vm)
        vm.add_pio_device(0x700, 2, early)
        vm.add_mmio_device(0xD000_0000, 0x1000, early)  # a second window of the same device
        vm.load(image, kind="flat", flat_address=0x100000, flat_mode=CpuMode.LONG)
        assert early.starts == []
        vm.start()
        assert early.starts == [False]  # once, before the first vCPU thread
        late = StartCounter(vm)
        vm.add_pio_device(0x710, 1, late)
        assert late.starts == [True]
        vm.stop()
    assert early.starts == [False]
