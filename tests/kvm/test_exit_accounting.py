"""Exit accounting on real KVM: a guest making a known number of exits of each kind gets
exactly those counts, and every histogram holds one value per exit (issue 15's raw exit log
must not change what the profiler reports)."""

from __future__ import annotations

from pathlib import Path

from tests.kvm.guests import debug_exit_real
from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.vmm.exit_keys import IO_IN_KEY, IO_OUT_KEY
from vmscope.vmm.exit_stats import FOLD_EVERY
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

LOAD = 0x7C00
OUTS = FOLD_EVERY + 1000  # past one fold of the loop's own log
# mov cx, OUTS; loop: out 0x510, al; in al, 0x80; dec cx; jnz loop; mov cx, 7; loop2: out 0x80, al ...
PROGRAM = (
    b"\xb9" + OUTS.to_bytes(2, "little") + b"\xba\x10\x05" + b"\xee\xe4\x80\x49\x75\xfa"
    + b"\xb9\x07\x00" + b"\xe6\x80\x49\x75\xfb"
)  # fmt: skip


def test_every_exit_is_counted_once_with_its_latency(tmp_path: Path) -> None:
    image = tmp_path / "exits.bin"
    image.write_bytes(PROGRAM + debug_exit_real(1))
    with Machine(mem="16M") as machine:
        install_platform_devices(machine, serial="none")
        machine.load(image, kind="flat", flat_address=LOAD, flat_mode=CpuMode.REAL)
        assert machine.run(timeout=120).exit_status == 3
        stats = machine.runners[0].stats
        assert stats.count(IO_OUT_KEY | 0x510) == OUTS
        assert stats.count(IO_IN_KEY | 0x80) == OUTS
        assert stats.count(IO_OUT_KEY | 0x80) == 7
        assert stats.count(IO_OUT_KEY | 0xF4) == 1
        for histogram in stats.handling.values():
            assert sum(count for _, _, count in histogram.buckets()) == histogram.count
        assert stats.total_exits() == 2 * OUTS + 7 + 1
        assert stats.returns_without_kick == stats.total_exits()
        assert not stats.log  # reading folded everything
        assert machine.pio_bus.unclaimed_writes[0x510, 1] == OUTS
