"""Exit accounting on real KVM: a guest making a known number of exits of each kind gets
exactly those counts, and every histogram holds one value per exit (issue 15's raw exit log
must not change what the profiler reports). With coalescing on, writes KVM queued in its
coalesced ring instead of exiting are counted under their own keys ("out coalesced"), so the
real exits plus the coalesced writes per port are exactly the writes the guest made, and the
POST port device still sees every code, in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kvm.guests import debug_exit_real
from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.devices.port80 import Port80
from vmscope.vmm.exit_keys import IO_IN_KEY, IO_OUT_COALESCED_KEY, IO_OUT_KEY, is_coalesced_key
from vmscope.vmm.exit_stats import FOLD_EVERY
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

LOAD = 0x7C00
OUTS = FOLD_EVERY + 1000  # past one fold of the loop's own log
POST_CODES = 1000  # past the ring's 170 entries: a full ring turns writes into exits again
UNCLAIMED = 700
PROGRAM = (
    # mov cx, OUTS; mov dx, 0x510; loop: out dx, al; in al, 0x80; dec cx; jnz loop
    b"\xb9" + OUTS.to_bytes(2, "little") + b"\xba\x10\x05" + b"\xee\xe4\x80\x49\x75\xfa"
    # mov cx, POST_CODES; loop: mov al, cl; out 0x80, al; dec cx; jnz loop
    + b"\xb9" + POST_CODES.to_bytes(2, "little") + b"\x88\xc8\xe6\x80\x49\x75\xf9"
    # mov cx, UNCLAIMED; mov dx, 0x511; loop: out dx, al; dec cx; jnz loop
    + b"\xb9" + UNCLAIMED.to_bytes(2, "little") + b"\xba\x11\x05" + b"\xee\x49\x75\xfc"
)  # fmt: skip


def _writes(counts: dict[int, int], port: int) -> int:
    return counts.get(IO_OUT_KEY | port, 0) + counts.get(IO_OUT_COALESCED_KEY | port, 0)


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "exits-only"])
def test_every_exit_is_counted_once_with_its_latency(tmp_path: Path, coalesce: bool) -> None:
    image = tmp_path / "exits.bin"
    image.write_bytes(PROGRAM + debug_exit_real(1))
    with Machine(mem="16M", coalesce_writes=coalesce) as machine:
        install_platform_devices(machine, serial="none")
        machine.load(image, kind="flat", flat_address=LOAD, flat_mode=CpuMode.REAL)
        assert machine.run(timeout=120).exit_status == 3
        stats = machine.runners[0].stats
        counts = {key: histogram.count for key, histogram in stats.handling.items()}
        assert _writes(counts, 0x510) == OUTS
        assert _writes(counts, 0x80) == POST_CODES
        assert _writes(counts, 0x511) == UNCLAIMED
        assert counts[IO_IN_KEY | 0x80] == OUTS  # reads always exit
        assert counts[IO_OUT_KEY | 0xF4] == 1
        for histogram in stats.handling.values():
            assert sum(count for _, _, count in histogram.buckets()) == histogram.count
        assert stats.total_exits() == 2 * OUTS + POST_CODES + UNCLAIMED + 1
        real_exits = sum(count for key, count in counts.items() if not is_coalesced_key(key))
        assert stats.returns_without_kick == real_exits
        assert stats.coalesced_writes() == stats.total_exits() - real_exits
        assert not stats.log and not stats.coalesced  # reading folded everything
        assert machine.pio_bus.unclaimed_writes[0x510, 1] == OUTS
        assert machine.pio_bus.unclaimed_writes[0x511, 1] == UNCLAIMED
        port80 = next(m.device for m in machine.devices() if isinstance(m.device, Port80))
        assert [value for _, value in port80.records] == [(POST_CODES - i) & 0xFF for i in range(POST_CODES)]
        stamps = [stamp for stamp, _ in port80.records]
        assert stamps == sorted(stamps)
        if not coalesce:
            assert machine.coalescing is None and stats.coalesced_writes() == 0
        elif machine.coalescing is not None:  # the host has coalesced PIO
            # every port-0x510 write after the first was queued (a read of port 0x80 exits
            # after each, so the ring never fills), and the ring filled up on the others
            assert counts[IO_OUT_KEY | 0x510] == 1
            assert counts[IO_OUT_COALESCED_KEY | 0x510] == OUTS - 1
            assert counts[IO_OUT_COALESCED_KEY | 0x80] > 0
            assert counts[IO_OUT_COALESCED_KEY | 0x511] > 0


def test_folding_time_is_charged_neither_to_the_guest_nor_to_an_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop folds its log every FOLD_EVERY exits on the vCPU thread; that time is the VMM's
    bookkeeping, so it must not appear as guest time or as the handling time of the exit that
    triggered it. A fold made slow on purpose (20 ms, 100 times) would show up in both sums."""
    import time

    from vmscope.vmm import runner
    from vmscope.vmm.exit_stats import VcpuExitStats

    folds = 100
    pause_s = 0.02
    monkeypatch.setattr(runner, "FOLD_EVERY", 16)
    original_fold = VcpuExitStats.fold

    def slow_fold(self: VcpuExitStats) -> None:
        time.sleep(pause_s)
        original_fold(self)

    monkeypatch.setattr(VcpuExitStats, "fold", slow_fold)
    writes = 16 * folds
    # mov cx, writes; mov dx, 0x510; loop: out dx, al; dec cx; jnz loop
    program = b"\xb9" + writes.to_bytes(2, "little") + b"\xba\x10\x05" + b"\xee\x49\x75\xfc"
    image = tmp_path / "writes.bin"
    image.write_bytes(program + debug_exit_real(1))
    with Machine(mem="16M", coalesce_writes=False) as machine:
        install_platform_devices(machine, serial="none")
        machine.load(image, kind="flat", flat_address=LOAD, flat_mode=CpuMode.REAL)
        assert machine.run(timeout=120).exit_status == 3
        stats = machine.runners[0].stats
        handling_ns = sum(histogram.sum for histogram in stats.handling.values())
        guest_ns = stats.guest.sum
        assert stats.count(IO_OUT_KEY | 0x510) == writes
    slept_ns = folds * pause_s * 1e9
    # the run's own exits take microseconds each: far below the 2 s spent in slowed folds
    assert guest_ns < slept_ns / 4, (guest_ns, slept_ns)
    assert handling_ns < slept_ns / 4, (handling_ns, slept_ns)
