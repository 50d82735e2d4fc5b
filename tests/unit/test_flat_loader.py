"""Flat binaries: placement, CS:IP derivation in real mode, and the refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmscope.arch.x86.cpu_state import CR0_PE, CR0_PG, CpuMode
from vmscope.arch.x86.layout import PML4_ADDRESS
from vmscope.errors import ConfigError, ImageFormatError
from vmscope.loader import load_guest
from vmscope.loader.flat import load_flat, real_mode_cs_ip
from vmscope.memory.guest_memory import GuestMemory

IMAGE = bytes([0xFA, 0xF4]) + bytes(range(256)) * 4  # cli; hlt; then data


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    guest = GuestMemory.for_size(16 << 20)
    yield guest
    guest.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "guest.bin"
    path.write_bytes(IMAGE)
    return path


def test_real_mode_boot_sector_convention(memory: GuestMemory, image: Path) -> None:
    loaded = load_flat(memory, image, 0x7C00, CpuMode.REAL)
    state = loaded.entry
    assert state.mode is CpuMode.REAL
    assert (state.cs.selector, state.rip) == (0, 0x7C00)
    assert memory.read(0x7C00, len(IMAGE)) == IMAGE
    assert loaded.kind == "flat (real mode)" and loaded.symbol_file is None
    assert [(s.address, s.size) for s in loaded.segments] == [(0x7C00, len(IMAGE))]  # nothing else written


def test_real_mode_above_64k_uses_the_load_paragraph(memory: GuestMemory, image: Path) -> None:
    loaded = load_flat(memory, image, 0x12345, CpuMode.REAL, entry=0x12345 + 0x100)
    state = loaded.entry
    assert state.cs.selector == 0x1234 and state.cs.base == 0x12340
    assert state.cs.base + state.rip == 0x12445
    assert state.cs.base <= 0x12345  # the load address is reachable through CS


@pytest.mark.parametrize(
    ("load", "entry"),
    [(0x7C00, 0x7C00), (0x500, 0x600), (0x10000, 0x10000), (0x9000F, 0x9F00F), (0xFF0, 0x10FEF)],
)
def test_cs_ip_arithmetic(load: int, entry: int) -> None:
    cs, ip = real_mode_cs_ip(load, entry)
    assert (cs << 4) + ip == entry
    assert 0 <= ip <= 0xFFFF and 0 <= cs <= 0xFFFF
    assert cs << 4 <= load


@pytest.mark.parametrize(("load", "entry"), [(0x20000, 0x30000), (0xFF0, 0x10FF0)])
def test_real_mode_entry_out_of_reach(load: int, entry: int) -> None:
    with pytest.raises(ConfigError, match="out of reach"):
        real_mode_cs_ip(load, entry)


def test_real_mode_image_past_1_mib(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(0x2000))
    with pytest.raises(ImageFormatError, match="1 MiB"):
        load_flat(memory, path, 0xFF000, CpuMode.REAL)


@pytest.mark.parametrize("mode", [CpuMode.PROTECTED, CpuMode.LONG])
def test_protected_and_long_mode(memory: GuestMemory, image: Path, mode: CpuMode) -> None:
    loaded = load_flat(memory, image, 0x200000, mode, entry=0x200001)
    state = loaded.entry
    assert state.mode is mode
    assert state.rip == 0x200001
    assert state.cr0 & CR0_PE
    assert bool(state.cr0 & CR0_PG) == (mode is CpuMode.LONG)
    assert memory.read(0x200000, len(IMAGE)) == IMAGE
    if mode is CpuMode.LONG:
        assert state.cr3 == PML4_ADDRESS


@pytest.mark.parametrize("mode", [CpuMode.PROTECTED, CpuMode.LONG])
def test_protected_image_over_boot_structures(memory: GuestMemory, image: Path, mode: CpuMode) -> None:
    with pytest.raises(ImageFormatError, match="boot structures"):
        load_flat(memory, image, 0x8000, mode)


def test_image_outside_ram(memory: GuestMemory, image: Path) -> None:
    with pytest.raises(ImageFormatError, match="do not fit in guest RAM"):
        load_flat(memory, image, (16 << 20) - 0x100, CpuMode.LONG)


def test_empty_image(memory: GuestMemory, tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(ImageFormatError, match="empty"):
        load_flat(memory, path, 0x7C00, CpuMode.REAL)


def test_entry_outside_image(memory: GuestMemory, image: Path) -> None:
    with pytest.raises(ConfigError, match="outside the flat image"):
        load_flat(memory, image, 0x200000, CpuMode.PROTECTED, entry=0x200000 + len(IMAGE))


def test_missing_file(memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(ImageFormatError, match="No such file"):
        load_flat(memory, tmp_path / "absent.bin", 0x7C00, CpuMode.REAL)


def test_load_guest_flat(memory: GuestMemory, image: Path) -> None:
    loaded = load_guest(memory, image, kind="flat", flat_address=0x300000, flat_mode=CpuMode.LONG)
    assert loaded.kind == "flat (long mode)" and loaded.entry.rip == 0x300000
    auto = load_guest(memory, image, flat_address=0x7C00, flat_mode=CpuMode.REAL)
    assert auto.kind == "flat (real mode)"


def test_load_guest_flat_needs_address_and_mode(memory: GuestMemory, image: Path) -> None:
    with pytest.raises(ConfigError, match="load address"):
        load_guest(memory, image, kind="flat", flat_mode=CpuMode.REAL)
    with pytest.raises(ConfigError, match="flat binary"):
        load_guest(memory, image, kind="flat", flat_address=0x7C00, flat_mode=CpuMode.REAL, cmdline="x")
