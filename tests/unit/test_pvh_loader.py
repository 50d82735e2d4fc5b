"""PVH boot: note detection, start info / module list / memory map bytes, module placement."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmscope.arch.x86.cpu_state import CR0_PE, CR0_PG, CpuMode
from vmscope.arch.x86.e820 import E820Entry, E820Type
from vmscope.arch.x86.layout import (
    CMDLINE_ADDRESS,
    CMDLINE_MAX_SIZE,
    PVH_MEMMAP_ADDRESS,
    PVH_MODLIST_ADDRESS,
    PVH_START_INFO_ADDRESS,
)
from vmscope.arch.x86.modes import CODE32_SELECTOR
from vmscope.errors import ConfigError, ImageFormatError
from vmscope.loader import load_guest
from vmscope.loader.pvh import is_pvh_elf, load_pvh, merge_memory_map
from vmscope.memory.guest_memory import GuestMemory

KERNEL_BASE = 0x100000
PVH_ENTRY = 0x100040
ELF_ENTRY = 0x100000

# -- images -------------------------------------------------------------------------------

ASM_SOURCE = """
    .section .note.Xen, "a"
    .balign 4
    .long 4             /* namesz: "Xen" and its NUL */
    .long 4             /* descsz */
    .long 18            /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .balign 4

    .text
    .code64
    .globl _start
_start:
    hlt
    .org 0x40
    .code32
    .globl pvh_start
pvh_start:
    hlt
    .bss
    .skip 0x5000
"""

LINKER_SCRIPT = """
ENTRY(_start)
PHDRS {{ text PT_LOAD; {note_phdr} }}
SECTIONS {{
    . = 0x100000;
    .text : {{ *(.text*) }} :text
    .note.Xen : {{ *(.note.Xen) }} :text {note_assign}
    .bss : {{ *(.bss*) }} :text
}}
"""


def build_kernel(tmp_path: Path, note_in_phdr: bool = True) -> Path:
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("binutils (as, ld) are not installed")
    name = "pvh" if note_in_phdr else "section_only"
    script = LINKER_SCRIPT.format(
        note_phdr="note PT_NOTE;" if note_in_phdr else "", note_assign=":note" if note_in_phdr else ""
    )
    (tmp_path / f"{name}.s").write_text(ASM_SOURCE)
    (tmp_path / f"{name}.ld").write_text(script)
    obj = tmp_path / f"{name}.o"
    out = tmp_path / f"{name}.elf"
    subprocess.run(
        ["as", "--64", "-o", str(obj), str(tmp_path / f"{name}.s")], check=True, capture_output=True
    )
    link = ["ld", "-m", "elf_x86_64", "-static", "-T", str(tmp_path / f"{name}.ld"), "-o", str(out), str(obj)]
    subprocess.run(link, check=True, capture_output=True)
    return out


def byte_elf(tmp_path: Path, note_desc: bytes, code_size: int = 0x100) -> Path:
    """An ELF64 with one PT_LOAD at KERNEL_BASE and one PT_NOTE holding a Xen note with ``note_desc``."""
    note = struct.pack("<III", 4, len(note_desc), 18) + b"Xen\0" + note_desc + bytes(-len(note_desc) % 4)
    code = bytes([0xF4]) * code_size
    phoff, phnum = 64, 2
    code_offset = phoff + 56 * phnum
    note_offset = code_offset + len(code)
    header = b"\x7fELF\x02\x01\x01" + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, ELF_ENTRY, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, code_offset, KERNEL_BASE, KERNEL_BASE, len(code), len(code), 0x1000)
    note_phdr = struct.pack("<IIQQQQQQ", 4, 4, note_offset, 0, 0, len(note), len(note), 4)
    path = tmp_path / f"byte{len(note_desc)}.elf"
    path.write_bytes(header + load + note_phdr + code + note)
    return path


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    guest = GuestMemory.for_size(16 << 20)
    yield guest
    guest.close()


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    return build_kernel(tmp_path)


def read_start_info(memory: GuestMemory) -> tuple[int, ...]:
    return struct.unpack("<IIIIQQQQII", memory.read(PVH_START_INFO_ADDRESS, 56))


def read_memmap(memory: GuestMemory, count: int) -> list[tuple[int, int, int, int]]:
    raw = memory.read(PVH_MEMMAP_ADDRESS, 24 * count)
    return [struct.unpack_from("<QQII", raw, 24 * i) for i in range(count)]


# -- detection ----------------------------------------------------------------------------


def test_note_in_pt_note_is_pvh(kernel: Path) -> None:
    assert is_pvh_elf(kernel)


def test_note_only_in_a_section_is_not_pvh(tmp_path: Path, memory: GuestMemory) -> None:
    kernel = build_kernel(tmp_path, note_in_phdr=False)
    assert not is_pvh_elf(kernel)
    with pytest.raises(ImageFormatError, match="no PVH entry note"):
        load_pvh(memory, kernel)
    assert load_guest(memory, kernel).kind == "ELF64"  # auto falls back to plain ELF


def test_non_elf_is_not_pvh(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"MZ" + bytes(100))
    assert not is_pvh_elf(blob)


def test_load_guest_prefers_pvh(kernel: Path, memory: GuestMemory) -> None:
    loaded = load_guest(memory, kernel, cmdline="console=ttyS0")
    assert loaded.kind == "PVH ELF"
    assert loaded.entry.rip == PVH_ENTRY


# -- entry state and structures -----------------------------------------------------------


def test_entry_state(kernel: Path, memory: GuestMemory) -> None:
    loaded = load_pvh(memory, kernel)
    state = loaded.entry
    assert state.mode is CpuMode.PROTECTED
    assert state.rip == PVH_ENTRY  # from the note, not e_entry
    assert state.gprs["rbx"] == PVH_START_INFO_ADDRESS
    assert state.cr0 & CR0_PE and not state.cr0 & CR0_PG
    assert state.cs.selector == CODE32_SELECTOR and state.cs.db == 1
    assert state.tr.base == 0 and state.tr.limit == 0x67  # what the PVH ABI specifies
    assert loaded.symbol_file == kernel
    assert memory.read(PVH_ENTRY, 1) == b"\xf4"


def test_start_info_and_memmap_bytes(kernel: Path, memory: GuestMemory) -> None:
    load_pvh(memory, kernel, cmdline="console=ttyS0 quiet")
    expected = struct.pack(
        "<IIIIQQQQII", 0x336EC578, 1, 0, 0, 0, CMDLINE_ADDRESS, 0, PVH_MEMMAP_ADDRESS, 3, 0
    )
    assert memory.read(PVH_START_INFO_ADDRESS, 56) == expected
    assert read_memmap(memory, 3) == [
        (0, 0x9FC00, 1, 0),
        (0x9FC00, 0x100000 - 0x9FC00, 2, 0),
        (0x100000, (16 << 20) - 0x100000, 1, 0),
    ]
    assert memory.read(CMDLINE_ADDRESS, 20) == b"console=ttyS0 quiet\0"


def test_rsdp_and_extra_e820_entries(kernel: Path, memory: GuestMemory) -> None:
    acpi = E820Entry(0xE0000, 0x10000, E820Type.ACPI)
    high_acpi = E820Entry(0xFF0000, 0x10000, E820Type.ACPI)
    load_pvh(memory, kernel, rsdp_address=0xE0000, extra_e820=[high_acpi, acpi])
    info = read_start_info(memory)
    assert info[6] == 0xE0000  # rsdp_paddr
    assert info[8] == 6
    assert read_memmap(memory, 6) == [
        (0, 0x9FC00, 1, 0),
        (0x9FC00, 0xE0000 - 0x9FC00, 2, 0),
        (0xE0000, 0x10000, 3, 0),
        (0xF0000, 0x10000, 2, 0),
        (0x100000, 0xFF0000 - 0x100000, 1, 0),
        (0xFF0000, 0x10000, 3, 0),
    ]


def test_modules_are_loaded_high_and_listed(tmp_path: Path, kernel: Path, memory: GuestMemory) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd!" * 1000)  # 7000 bytes: not a page multiple
    extra = tmp_path / "extra.bin"
    extra.write_bytes(b"\x5a" * 0x2345)
    reserved = E820Entry(0xFF0000, 0x10000, E820Type.ACPI)
    loaded = load_pvh(memory, kernel, modules=[initrd, extra], extra_e820=[reserved])
    info = read_start_info(memory)
    assert info[3] == 2 and info[4] == PVH_MODLIST_ADDRESS
    entries = [struct.unpack_from("<QQQQ", memory.read(PVH_MODLIST_ADDRESS + 32 * i, 32)) for i in range(2)]
    kernel_end = max(s.address + s.size for s in loaded.segments if s.description.startswith("ELF segment"))
    for (address, size, cmdline, reserved_field), path in zip(entries, [initrd, extra], strict=True):
        assert size == path.stat().st_size
        assert cmdline == 0 and reserved_field == 0
        assert address % 0x1000 == 0
        assert kernel_end <= address and address + size <= reserved.address
        assert memory.read(address, size) == path.read_bytes()
    (first, first_size, _, _), (second, second_size, _, _) = entries
    assert (
        first + first_size <= reserved.address and first + 0x1000 + first_size > reserved.address
    )  # as high as fits
    assert second + second_size <= first  # below the first, no overlap


def test_module_limit_is_respected(tmp_path: Path, kernel: Path, memory: GuestMemory) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"x" * 0x1800)
    load_pvh(memory, kernel, modules=[initrd], module_limit=0x800000)
    address, size, _, _ = struct.unpack("<QQQQ", memory.read(PVH_MODLIST_ADDRESS, 32))
    assert address == 0x800000 - 0x2000 and size == 0x1800


def test_modules_stay_below_the_mmio_hole_with_high_ram(tmp_path: Path) -> None:
    kernel = build_kernel(tmp_path)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"big guest" * 100)
    memory = GuestMemory.for_size(4 << 30)  # 3 GiB below the hole, 1 GiB above 4 GiB
    try:
        load_pvh(memory, kernel, modules=[initrd])
        address, size, _, _ = struct.unpack("<QQQQ", memory.read(PVH_MODLIST_ADDRESS, 32))
        assert address + size <= 0xC000_0000 and address + 0x1000 > 0xC000_0000 - size
        info = read_start_info(memory)
        assert read_memmap(memory, info[8])[-1] == (1 << 32, 1 << 30, 1, 0)
    finally:
        memory.close()


def test_module_that_does_not_fit(tmp_path: Path, kernel: Path, memory: GuestMemory) -> None:
    huge = tmp_path / "huge.img"
    huge.write_bytes(bytes(15 << 20))
    with pytest.raises(ConfigError, match="no room for module 0"):
        load_pvh(memory, kernel, modules=[huge])


def test_missing_module(tmp_path: Path, kernel: Path, memory: GuestMemory) -> None:
    with pytest.raises(ImageFormatError, match="No such file") as caught:
        load_pvh(memory, kernel, modules=[tmp_path / "absent.img"])
    assert caught.value.path == str(tmp_path / "absent.img")


def test_cmdline_too_long(kernel: Path, memory: GuestMemory) -> None:
    with pytest.raises(ConfigError, match=f"{CMDLINE_MAX_SIZE} bytes; the limit is {CMDLINE_MAX_SIZE - 1}"):
        load_pvh(memory, kernel, cmdline="a" * CMDLINE_MAX_SIZE)


def test_longest_cmdline_fits(kernel: Path, memory: GuestMemory) -> None:
    load_pvh(memory, kernel, cmdline="b" * (CMDLINE_MAX_SIZE - 1))
    assert memory.read_u8(CMDLINE_ADDRESS + CMDLINE_MAX_SIZE - 1) == 0


def test_rsdp_outside_ram(kernel: Path, memory: GuestMemory) -> None:
    with pytest.raises(ConfigError, match="RSDP"):
        load_pvh(memory, kernel, rsdp_address=0x2000_0000)


# -- byte-built notes ---------------------------------------------------------------------


def test_eight_byte_note_descriptor(tmp_path: Path, memory: GuestMemory) -> None:
    path = byte_elf(tmp_path, struct.pack("<Q", KERNEL_BASE + 0x10))  # Linux uses a quad on x86-64
    assert is_pvh_elf(path)
    assert load_pvh(memory, path).entry.rip == KERNEL_BASE + 0x10


def test_odd_note_descriptor_size(tmp_path: Path, memory: GuestMemory) -> None:
    path = byte_elf(tmp_path, b"\x00\x00\x10")
    with pytest.raises(ImageFormatError, match="3-byte descriptor"):
        load_pvh(memory, path)


def test_pvh_entry_outside_segments(tmp_path: Path, memory: GuestMemory) -> None:
    path = byte_elf(tmp_path, struct.pack("<I", 0x200000))
    with pytest.raises(ImageFormatError, match="PVH entry point 0x200000 is not inside any loaded segment"):
        load_pvh(memory, path)


# -- memory map merging -------------------------------------------------------------------


def test_overlapping_extra_entries_are_rejected() -> None:
    base = [E820Entry(0, 0x100000, E820Type.RAM)]
    extra = [E820Entry(0x1000, 0x2000, E820Type.ACPI), E820Entry(0x2000, 0x1000, E820Type.NVS)]
    with pytest.raises(ConfigError, match="overlap"):
        merge_memory_map(base, extra)


def test_extra_entry_spanning_two_ram_entries() -> None:
    base = [E820Entry(0, 0x1000, E820Type.RAM), E820Entry(0x1000, 0x1000, E820Type.RESERVED)]
    merged = merge_memory_map(base, [E820Entry(0x800, 0x1000, E820Type.NVS)])
    assert merged == [
        E820Entry(0, 0x800, E820Type.RAM),
        E820Entry(0x800, 0x1000, E820Type.NVS),
        E820Entry(0x1800, 0x800, E820Type.RESERVED),
    ]
