"""Exit hooks on real KVM: exact counts, filters, registers, and failing hooks."""

from __future__ import annotations

from pathlib import Path

from tests.kvm.guests import debug_exit_real
from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.vmm.hooks import ExitEvent
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

LOAD = 0x7C00
# mov cx, 300; loop: mov al, cl; out 0x510, al; dec cx; jnz loop
LOOP = b"\xb9\x2c\x01" + b"\xba\x10\x05\x88\xc8\xee\x49\x75\xf8"
OUT_OFFSET = 8  # offset of the `out` in LOOP


def run_loop_guest(tmp_path: Path, **hooks: object) -> tuple[Machine, list[ExitEvent], list[ExitEvent]]:
    image = tmp_path / "loop.bin"
    image.write_bytes(LOOP + debug_exit_real(1))
    machine = Machine(mem="16M")
    install_platform_devices(machine, serial="none")
    matched: list[ExitEvent] = []
    missed: list[ExitEvent] = []
    machine.add_exit_hook(matched.append, reasons=["IO"], addresses=range(0x510, 0x511))
    machine.add_exit_hook(missed.append, addresses=[(0x600, 0x700)])
    machine.add_exit_hook(missed.append, reasons=["MMIO"])
    machine.load(image, kind="flat", flat_address=LOAD, flat_mode=CpuMode.REAL)
    return machine, matched, missed


def test_a_hook_sees_exactly_the_exits_it_asked_for(tmp_path: Path) -> None:
    machine, matched, missed = run_loop_guest(tmp_path)
    with machine:
        assert machine.run(timeout=30).exit_status == 3
    assert len(matched) == 300
    assert missed == []
    assert [event.data for event in matched[:3]] == [b"\x2c", b"\x2b", b"\x2a"]  # al = cl, counting down
    first = matched[0]
    assert (first.reason, first.address, first.access, first.vcpu) == ("IO", 0x510, "out", 0)
    # rip is the instruction after the `out` (the exit completes it)
    assert first.rip == LOAD + OUT_OFFSET + 1
    assert first.handling_ns > 0


def test_a_failing_hook_is_counted_and_the_guest_runs_on(tmp_path: Path) -> None:
    machine, matched, _ = run_loop_guest(tmp_path)

    def broken(event: ExitEvent) -> None:
        raise ValueError("hook bug")

    with machine:
        hook = machine.add_exit_hook(broken, reasons=["IO"])
        result = machine.run(timeout=30)
        assert result.exit_status == 3
    assert hook.calls == 301 and hook.errors == 301  # 300 loop writes and the debug-exit write
    assert len(matched) == 300


def test_removing_a_hook_stops_its_calls(tmp_path: Path) -> None:
    machine, matched, _ = run_loop_guest(tmp_path)
    seen: list[ExitEvent] = []
    with machine:
        hook = machine.add_exit_hook(seen.append)
        machine.remove_exit_hook(hook)
        machine.run(timeout=30)
    assert seen == [] and len(matched) == 300
