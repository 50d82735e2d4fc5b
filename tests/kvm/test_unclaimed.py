"""Accesses no device claimed, counted once by the buses and read through one walk
(``Machine.unclaimed_counts``) by the log, the profile and the control socket."""

from __future__ import annotations

from pathlib import Path

from tests.kvm.guests import debug_exit_real
from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.profiler.model import Profile
from vmscope.profiler.recorder import fill_exit_statistics
from vmscope.vmm.machine import Machine, UnclaimedCount
from vmscope.vmm.platform import install_platform_devices

WRITES = 5
# mov cx, WRITES; mov dx, 0x510; loop: out dx, al; dec cx; jnz loop; in al, dx
PROGRAM = b"\xb9" + WRITES.to_bytes(2, "little") + b"\xba\x10\x05" + b"\xee\x49\x75\xfc" + b"\xec"


def test_unclaimed_accesses_are_walked_once_for_every_reader(tmp_path: Path) -> None:
    image = tmp_path / "unclaimed.bin"
    image.write_bytes(PROGRAM + debug_exit_real(1))
    with Machine(mem="16M") as machine:
        install_platform_devices(machine, serial="none")
        machine.load(image, kind="flat", flat_address=0x7C00, flat_mode=CpuMode.REAL)
        assert machine.run(timeout=60).exit_status == 3
        counts = machine.unclaimed_counts()
        assert UnclaimedCount("pio", 0x510, 1, True, WRITES) in counts
        assert UnclaimedCount("pio", 0x510, 1, False, 1) in counts
        assert machine.unclaimed_accesses(limit=1) == [("port", 0x510, 1, "write", WRITES)]
        profile = Profile()
        fill_exit_statistics(profile, machine)
    labels = {access.label: access.count for access in profile.unclaimed}
    assert labels["port 0x510 write size 1"] == WRITES and labels["port 0x510 read size 1"] == 1
