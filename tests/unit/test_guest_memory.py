"""GuestMemory: layout around the MMIO hole and bounds checks on every access."""

from __future__ import annotations

import pytest

from vmscope.errors import ConfigError, GuestMemoryError
from vmscope.memory.guest_memory import HIGH_RAM_START, MMIO_HOLE_START, GuestMemory, parse_size


def test_sizes_parse_with_binary_suffixes() -> None:
    assert parse_size("256M") == 256 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("4096") == 4096
    assert parse_size("0x1000") == 4096
    for bad in ("", "10Q", "-1M", "0"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_ram_above_the_hole_continues_at_4_gib() -> None:
    memory = GuestMemory.for_size(MMIO_HOLE_START + (64 << 20))
    assert list(memory.ranges()) == [(0, MMIO_HOLE_START), (HIGH_RAM_START, 64 << 20)]
    memory.write_u32(HIGH_RAM_START + 16, 0xDEADBEEF)
    assert memory.read_u32(HIGH_RAM_START + 16) == 0xDEADBEEF
    with pytest.raises(GuestMemoryError):
        memory.read(MMIO_HOLE_START, 4)  # the hole is not RAM
    memory.close()


@pytest.mark.parametrize(
    ("address", "length"),
    [(-1, 1), ((1 << 20) - 3, 4), (1 << 20, 1), (0xFFFF_FFFF_FFFF_FFFF, 8), (0, (1 << 20) + 1)],
)
def test_accesses_outside_ram_are_refused(address: int, length: int) -> None:
    memory = GuestMemory.for_size(1 << 20)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        memory.read(address, length)
    with pytest.raises(GuestMemoryError):
        memory.write(address, b"\0" * length)


def test_typed_accessors_and_views_round_trip() -> None:
    memory = GuestMemory.for_size(1 << 20)
    memory.write_u64(0x1000, 0x0102_0304_0506_0708)
    assert memory.read(0x1000, 8) == bytes.fromhex("0807060504030201")
    assert (memory.read_u8(0x1000), memory.read_u16(0x1000), memory.read_u32(0x1004)) == (
        8,
        0x0708,
        0x01020304,
    )
    view = memory.view(0x2000, 4)
    view[:] = b"wxyz"
    assert memory.read(0x2000, 4) == b"wxyz"
    memory.write(0x3000, b"hello\0world")
    assert memory.read_cstring(0x3000) == b"hello"
    memory.fill(0x3000, 5, 0x41)
    assert memory.read(0x3000, 6) == b"AAAAA\0"
