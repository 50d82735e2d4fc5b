"""Plain ELF loading: toolchain-built images, byte-built images, and every malformed case."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.unit.rigs.elf_images import EM_386, EM_AARCH64, EM_X86_64, PT_NOTE, PT_PHDR, Seg, build_elf
from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.arch.x86.layout import GDT_ADDRESS
from vmscope.arch.x86.modes import CODE32_SELECTOR, CODE64_SELECTOR
from vmscope.errors import ConfigError, ImageFormatError
from vmscope.loader import load_guest
from vmscope.loader.elf import load_elf
from vmscope.memory.guest_memory import GuestMemory


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    guest = GuestMemory.for_size(16 << 20)
    yield guest
    guest.close()


CODE = bytes(range(1, 65))
DATA = b"vmscope data segment\0" * 3


# -- toolchain-built images ---------------------------------------------------------------

ASM_SOURCE = """
    .text
    .globl _start
_start:
    hlt
    jmp _start
    .data
message:
    .ascii "hello from the data segment"
    .bss
zeroed:
    .skip 0x3000
"""

LINKER_SCRIPT = """
ENTRY(_start)
SECTIONS {
    . = 0x100000;
    .text : { *(.text*) }
    . = 0x180000;
    .data : { *(.data*) }
    .bss : { *(.bss*) }
}
"""


def build_with_toolchain(tmp_path: Path, bits: int) -> Path:
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("binutils (as, ld) are not installed")
    (tmp_path / "guest.s").write_text(ASM_SOURCE)
    (tmp_path / "guest.ld").write_text(LINKER_SCRIPT)
    as_flags = ["--64"] if bits == 64 else ["--32"]
    ld_flags = ["-m", "elf_x86_64"] if bits == 64 else ["-m", "elf_i386"]
    subprocess.run(
        ["as", *as_flags, "-o", str(tmp_path / "guest.o"), str(tmp_path / "guest.s")],
        check=True,
        capture_output=True,
    )
    output = tmp_path / f"guest{bits}.elf"
    subprocess.run(
        [
            "ld",
            *ld_flags,
            "-static",
            "-T",
            str(tmp_path / "guest.ld"),
            "-o",
            str(output),
            str(tmp_path / "guest.o"),
        ],
        check=True,
        capture_output=True,
    )
    return output


def elf_facts(path: Path) -> tuple[int, list[tuple[int, bytes, int]]]:
    """(address of _start, [(paddr, file bytes, memsz) per PT_LOAD]) read independently of vmscope."""
    with open(path, "rb") as stream:
        elf = ELFFile(stream)
        start = elf.get_section_by_name(".symtab").get_symbol_by_name("_start")[0]["st_value"]
        loads = [
            (seg["p_paddr"], seg.data(), seg["p_memsz"])
            for seg in elf.iter_segments()
            if seg["p_type"] == "PT_LOAD"
        ]
    return start, loads


@pytest.mark.parametrize(
    ("bits", "mode", "code_selector"),
    [(64, CpuMode.LONG, CODE64_SELECTOR), (32, CpuMode.PROTECTED, CODE32_SELECTOR)],
)
def test_toolchain_elf_loads_at_physical_addresses(
    tmp_path: Path, memory: GuestMemory, bits: int, mode: CpuMode, code_selector: int
) -> None:
    path = build_with_toolchain(tmp_path, bits)
    start, loads = elf_facts(path)
    memory.fill(0x100000, 0x100000, 0xAA)  # stale bytes the .bss must not keep
    loaded = load_elf(memory, path)
    assert loaded.kind == f"ELF{bits}"
    assert loaded.symbol_file == path
    assert loaded.entry.mode is mode
    assert loaded.entry.rip == start
    assert loaded.entry.cs.selector == code_selector
    assert memory.read(start, 1) == b"\xf4"  # hlt
    assert memory.read(0x180000, 27) == b"hello from the data segment"
    assert len(loads) >= 2
    for paddr, data, memsz in loads:
        assert memory.read(paddr, len(data)) == data
        assert memory.read(paddr + len(data), memsz - len(data)) == bytes(memsz - len(data))
        assert any(s.address == paddr and s.size == memsz for s in loaded.segments)
    assert any(s.address == GDT_ADDRESS for s in loaded.segments)


def test_object_file_is_rejected(tmp_path: Path, memory: GuestMemory) -> None:
    build_with_toolchain(tmp_path, 64)
    with pytest.raises(ImageFormatError, match="ET_REL"):
        load_elf(memory, tmp_path / "guest.o")


# -- byte-built images --------------------------------------------------------------------


def test_bss_is_zeroed_and_segments_copied(tmp_path: Path, memory: GuestMemory) -> None:
    path = write(
        tmp_path,
        "two.elf",
        build_elf(
            [Seg(0x100000, CODE), Seg(0x300000, DATA, memsz=len(DATA) + 0x2000, flags=6)], entry=0x100010
        ),
    )
    memory.fill(0x300000, 0x3000, 0x55)
    loaded = load_elf(memory, path)
    assert memory.read(0x100000, len(CODE)) == CODE
    assert memory.read(0x300000, len(DATA)) == DATA
    assert memory.read(0x300000 + len(DATA), 0x2000) == bytes(0x2000)
    assert memory.read_u8(0x300000 + len(DATA) + 0x2000) == 0x55  # nothing past memsz
    assert loaded.entry.rip == 0x100010
    descriptions = [s.description for s in loaded.segments]
    assert "ELF segment 0 (R-X)" in descriptions and "ELF segment 1 (RW-)" in descriptions


def test_virtual_entry_is_translated_to_physical(tmp_path: Path, memory: GuestMemory) -> None:
    higher_half = 0xFFFF_FFFF_8100_0000
    path = write(
        tmp_path, "high.elf", build_elf([Seg(0x100000, CODE, vaddr=higher_half)], entry=higher_half + 8)
    )
    assert load_elf(memory, path).entry.rip == 0x100008


def test_non_load_segments_and_empty_loads_are_ignored(tmp_path: Path, memory: GuestMemory) -> None:
    path = write(
        tmp_path,
        "mixed.elf",
        build_elf(
            [Seg(0, b"\x01" * 16, type=PT_PHDR), Seg(0x500, b"", memsz=0), Seg(0x100000, CODE)],
            entry=0x100000,
        ),
    )
    assert load_elf(memory, path).entry.rip == 0x100000


def test_elf32_enters_protected_mode(tmp_path: Path, memory: GuestMemory) -> None:
    path = write(tmp_path, "p.elf", build_elf([Seg(0x200000, CODE)], entry=0x200004, elf_class=32))
    loaded = load_elf(memory, path)
    assert loaded.kind == "ELF32"
    assert loaded.entry.mode is CpuMode.PROTECTED
    assert loaded.entry.rip == 0x200004


# -- malformed images ---------------------------------------------------------------------


def assert_rejected(memory: GuestMemory, path: Path, *fragments: str) -> ImageFormatError:
    with pytest.raises(ImageFormatError) as caught:
        load_elf(memory, path)
    assert caught.value.path == str(path)
    for fragment in fragments:
        assert fragment in caught.value.problem, caught.value.problem
    return caught.value


def test_bad_magic(tmp_path: Path, memory: GuestMemory) -> None:
    image = bytearray(build_elf([Seg(0x100000, CODE)], entry=0x100000))
    image[1:4] = b"ELG"
    assert_rejected(memory, write(tmp_path, "bad.elf", bytes(image)), "not an ELF file", "ELG")


@pytest.mark.parametrize(("elf_class", "machine"), [(64, EM_AARCH64), (64, EM_386), (32, EM_X86_64)])
def test_wrong_machine(tmp_path: Path, memory: GuestMemory, elf_class: int, machine: int) -> None:
    image = build_elf([Seg(0x100000, CODE)], entry=0x100000, elf_class=elf_class, machine=machine)
    assert_rejected(memory, write(tmp_path, "arm.elf", image), "wrong machine")


def test_truncated_header(tmp_path: Path, memory: GuestMemory) -> None:
    image = build_elf([Seg(0x100000, CODE)], entry=0x100000)
    assert_rejected(memory, write(tmp_path, "short.elf", image[:40]), "truncated", "40 bytes")


@pytest.mark.parametrize(("offset", "value", "fragment"), [(4, 7, "class byte 7"), (5, 2, "little-endian")])
def test_unsupported_ident(
    tmp_path: Path, memory: GuestMemory, offset: int, value: int, fragment: str
) -> None:
    image = bytearray(build_elf([Seg(0x100000, CODE)], entry=0x100000))
    image[offset] = value
    assert_rejected(memory, write(tmp_path, "ident.elf", bytes(image)), fragment)


def test_truncated_elf64_header(tmp_path: Path, memory: GuestMemory) -> None:
    image = build_elf([Seg(0x100000, CODE)], entry=0x100000)
    assert_rejected(
        memory, write(tmp_path, "short.elf", image[:60]), "truncated", "60 bytes", "64-byte ELF64 header"
    )


def test_truncated_toolchain_elf(tmp_path: Path, memory: GuestMemory) -> None:
    path = build_with_toolchain(tmp_path, 64)
    with open(path, "rb") as stream:
        text = next(seg for seg in ELFFile(stream).iter_segments() if seg["p_type"] == "PT_LOAD")
        cut = text["p_offset"] + text["p_filesz"] // 2
    truncated = write(tmp_path, "truncated.elf", path.read_bytes()[:cut])
    assert_rejected(memory, truncated, "truncated", "past the end of the file", hex(cut))


def test_truncated_program_headers(tmp_path: Path, memory: GuestMemory) -> None:
    image = build_elf([Seg(0x100000, CODE), Seg(0x200000, DATA)], entry=0x100000)
    cut = 64 + 56 + 20  # into the second program header
    assert_rejected(memory, write(tmp_path, "cut.elf", image[:cut]), "truncated", "program headers", hex(cut))


def test_truncated_segment_data(tmp_path: Path, memory: GuestMemory) -> None:
    image = build_elf([Seg(0x100000, CODE)], entry=0x100000)
    cut = len(image) - 10
    error = assert_rejected(
        memory, write(tmp_path, "cut.elf", image[:cut]), "truncated", "segment 0", hex(cut)
    )
    assert "past the end of the file" in error.problem


def test_segment_outside_ram(tmp_path: Path, memory: GuestMemory) -> None:
    image = build_elf([Seg(0xFFF000, CODE, memsz=0x2000)], entry=0xFFF000)
    assert_rejected(memory, write(tmp_path, "big.elf", image), "outside guest RAM", "0xfff000", "0x1000000")


def test_segment_far_outside_ram(tmp_path: Path, memory: GuestMemory) -> None:
    image = build_elf([Seg(0x4000_0000, CODE)], entry=0x4000_0000)
    assert_rejected(memory, write(tmp_path, "far.elf", image), "outside guest RAM")


@pytest.mark.parametrize("paddr", [0x400, 0x7000, 0x2F000, 0x20000])
def test_segment_over_boot_structures(tmp_path: Path, memory: GuestMemory, paddr: int) -> None:
    image = build_elf([Seg(paddr, CODE, memsz=0x200)], entry=paddr)
    assert_rejected(memory, write(tmp_path, "low.elf", image), "boot structures", "0x500-0x30000")


@pytest.mark.parametrize("paddr", [0x0, 0x30000, 0x9F000])
def test_low_segments_clear_of_boot_structures_load(tmp_path: Path, memory: GuestMemory, paddr: int) -> None:
    image = build_elf([Seg(paddr, CODE, memsz=0x100)], entry=paddr)
    assert load_elf(memory, write(tmp_path, "low.elf", image)).entry.rip == paddr
    assert memory.read(paddr, len(CODE)) == CODE


def test_overlapping_segments(tmp_path: Path, memory: GuestMemory) -> None:
    image = build_elf([Seg(0x100000, CODE, memsz=0x2000), Seg(0x101000, DATA)], entry=0x100000)
    assert_rejected(memory, write(tmp_path, "overlap.elf", image), "overlap", "0x100000-0x102000", "0x101000")
    assert memory.read(0x100000, len(CODE)) == bytes(len(CODE))  # nothing written on failure


def test_no_load_segment(tmp_path: Path, memory: GuestMemory) -> None:
    image = build_elf([Seg(0x100000, CODE, type=PT_PHDR)], entry=0x100000)
    assert_rejected(memory, write(tmp_path, "noload.elf", image), "no PT_LOAD")


def test_malformed_note_segment(tmp_path: Path, memory: GuestMemory) -> None:
    note = struct.pack("<III", 4, 0x1000, 18) + b"Xen\0" + b"\0" * 4  # descriptor size past the segment
    image = build_elf([Seg(0x100000, CODE), Seg(0, note, type=PT_NOTE)], entry=0x100000)
    assert_rejected(
        memory, write(tmp_path, "note.elf", image), "note at offset 0x0 of segment 1", "runs past"
    )


def test_no_program_headers(tmp_path: Path, memory: GuestMemory) -> None:
    assert_rejected(memory, write(tmp_path, "empty.elf", build_elf([], entry=0)), "no program headers")


def test_entry_outside_segments(tmp_path: Path, memory: GuestMemory) -> None:
    image = build_elf([Seg(0x100000, CODE)], entry=0x100000 + len(CODE))
    assert_rejected(memory, write(tmp_path, "entry.elf", image), "entry point 0x100040", "0x100000-0x100040")


def test_filesz_larger_than_memsz(tmp_path: Path, memory: GuestMemory) -> None:
    image = build_elf([Seg(0x100000, CODE, memsz=8)], entry=0x100000)
    assert_rejected(memory, write(tmp_path, "sizes.elf", image), "file size 0x40", "memory size 0x8")


def test_missing_file(tmp_path: Path, memory: GuestMemory) -> None:
    error = assert_rejected(memory, tmp_path / "absent.elf")
    assert "No such file" in error.problem


def test_load_guest_reports_missing_file(tmp_path: Path, memory: GuestMemory) -> None:
    with pytest.raises(ImageFormatError, match="No such file"):
        load_guest(memory, tmp_path / "absent.elf")


def test_load_guest_chooses_plain_elf(tmp_path: Path, memory: GuestMemory) -> None:
    path = write(tmp_path, "plain.elf", build_elf([Seg(0x100000, CODE)], entry=0x100000))
    loaded = load_guest(memory, path)
    assert loaded.kind == "ELF64"
    assert loaded.entry.rip == 0x100000


def test_load_guest_refuses_cmdline_for_plain_elf(tmp_path: Path, memory: GuestMemory) -> None:
    path = write(tmp_path, "plain.elf", build_elf([Seg(0x100000, CODE)], entry=0x100000))
    with pytest.raises(ConfigError, match="PVH"):
        load_guest(memory, path, cmdline="console=ttyS0")


def test_load_guest_rejects_non_elf_without_flat_address(tmp_path: Path, memory: GuestMemory) -> None:
    path = write(tmp_path, "blob.bin", b"\x90\x90\xf4")
    with pytest.raises(ImageFormatError, match="not an ELF file"):
        load_guest(memory, path)
