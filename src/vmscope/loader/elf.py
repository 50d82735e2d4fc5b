"""Plain x86 ELF executables: PT_LOAD segments copied to their physical addresses.

The file is untrusted: every header field is checked against the file size and guest RAM
before anything is written, and each problem becomes an :class:`ImageFormatError` that
names the numbers involved. The parsing and placement helpers here are shared with the PVH
loader (:mod:`vmscope.loader.pvh`), which boots the same kind of file differently.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.arch.x86.layout import (
    CMDLINE_ADDRESS,
    CMDLINE_MAX_SIZE,
    GDT_ADDRESS,
    HIGH_MEMORY_START,
    PD_ADDRESS,
    PML4_ADDRESS,
)
from vmscope.arch.x86.modes import (
    GDT_SIZE,
    PAGE_DIRECTORY_COUNT,
    PAGE_SIZE,
    long_mode_state,
    protected_mode_state,
)
from vmscope.errors import ImageFormatError
from vmscope.loader.base import LoadedGuest, LoadedSegment
from vmscope.memory.guest_memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
#: guest-physical range the VMM fills with boot structures (GDT, PVH info, page tables, cmdline)
BOOT_STRUCTURES_START = GDT_ADDRESS
BOOT_STRUCTURES_END = CMDLINE_ADDRESS + CMDLINE_MAX_SIZE
#: the identity map of long-mode entry and 32-bit entry both end at 4 GiB
ENTRY_LIMIT = 1 << 32

_MACHINE_FOR_CLASS = {32: "EM_386", 64: "EM_X86_64"}
_MACHINE_NUMBER_FOR_CLASS = {32: 3, 64: 62}
_PHDR_SIZE_FOR_CLASS = {32: 32, 64: 56}
_NOTE_HEADER = struct.Struct("<III")
PF_X, PF_W, PF_R = 1, 2, 4


class ElfSegment:
    """One PT_LOAD program header (only those with a non-zero memory size are kept).

    A plain class, not a NamedTuple: the ``index`` field would shadow ``tuple.index``.
    """

    __slots__ = ("filesz", "flags", "index", "memsz", "offset", "paddr", "vaddr")

    def __init__(
        self, index: int, offset: int, paddr: int, vaddr: int, filesz: int, memsz: int, flags: int
    ) -> None:
        self.index = index
        self.offset = offset
        self.paddr = paddr
        self.vaddr = vaddr
        self.filesz = filesz
        self.memsz = memsz
        self.flags = flags

    @property
    def end(self) -> int:
        return self.paddr + self.memsz

    @property
    def permissions(self) -> str:
        return "".join(
            letter if self.flags & bit else "-" for letter, bit in (("R", PF_R), ("W", PF_W), ("X", PF_X))
        )

    def describe(self) -> str:
        return f"segment {self.index} ({self.paddr:#x}-{self.end:#x})"


class ElfNote(NamedTuple):
    """A note from a PT_NOTE program header; ``name`` without its terminating NUL."""

    name: bytes
    type: int
    desc: bytes


class ElfImage(NamedTuple):
    """The validated structure of an ELF file: what to load and the notes it carries."""

    path: Path
    elf_class: int  # 32 or 64
    entry: int  # e_entry as written in the file
    segments: tuple[ElfSegment, ...]
    notes: tuple[ElfNote, ...]

    def fail(self, problem: str) -> ImageFormatError:
        return ImageFormatError(str(self.path), problem)


def open_image(path: Path) -> io.BufferedReader:
    """Open a guest image for reading; an OS error becomes an ImageFormatError with its text."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ImageFormatError(str(path), f"cannot open: {exc.strerror or exc}") from None


def has_elf_magic(path: Path) -> bool:
    with open_image(path) as stream:
        return stream.read(len(ELF_MAGIC)) == ELF_MAGIC


def read_elf_image(path: Path) -> ElfImage:
    """Parse and validate an x86 ELF executable's headers, PT_LOAD segments and PT_NOTE notes."""
    path = Path(path)
    with open_image(path) as stream:
        file_size = os.fstat(stream.fileno()).st_size
        magic = stream.read(len(ELF_MAGIC))
        if magic != ELF_MAGIC:
            raise ImageFormatError(
                str(path), f"not an ELF file: starts with {magic!r}, expected {ELF_MAGIC!r}"
            )
        stream.seek(0)
        try:
            return _parse(path, stream, file_size)
        except (struct.error, ValueError) as exc:
            raise ImageFormatError(str(path), f"malformed ELF: {exc}") from None


# The headers are read with struct, not pyelftools: loading needs only these fields, and
# importing pyelftools costs more than the whole rest of a short run's start-up (issue 15).
_ELF_HEADER = {
    64: struct.Struct("<16xHHIQQQIHHHHHH"),  # e_type .. e_shstrndx after e_ident
    32: struct.Struct("<16xHHIIIIIHHHHHH"),
}
#: (p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align) in each class's order
_PHDR = {64: struct.Struct("<IIQQQQQQ"), 32: struct.Struct("<IIIIIIII")}
_ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
_PT_LOAD, _PT_NOTE = 1, 4


def _program_header(elf_class: int, raw: bytes) -> dict[str, int]:
    if elf_class == 64:
        p_type, flags, offset, vaddr, paddr, filesz, memsz, align = _PHDR[64].unpack(raw)
    else:
        p_type, offset, vaddr, paddr, filesz, memsz, flags, align = _PHDR[32].unpack(raw)
    return {
        "p_type": p_type, "p_flags": flags, "p_offset": offset, "p_vaddr": vaddr,
        "p_paddr": paddr, "p_filesz": filesz, "p_memsz": memsz, "p_align": align,
    }  # fmt: skip


def _parse(path: Path, stream: io.BufferedReader, file_size: int) -> ElfImage:
    def fail(problem: str) -> ImageFormatError:
        return ImageFormatError(str(path), problem)

    ident = stream.read(16)
    elf_class = {1: 32, 2: 64}.get(ident[4]) if len(ident) > 4 else None
    if elf_class is None:
        detail = f"class byte {ident[4]}" if len(ident) > 4 else f"only {file_size} bytes"
        raise fail(f"not a 32- or 64-bit ELF ({detail})")
    if len(ident) > 5 and ident[5] != 1:
        raise fail(f"not a little-endian ELF (data byte {ident[5]}): x86 images are little-endian")
    header_size = 64 if elf_class == 64 else 52
    if file_size < header_size:
        raise fail(
            f"truncated: {file_size} bytes is shorter than the {header_size}-byte ELF{elf_class} header"
        )
    stream.seek(0)
    (
        e_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_rest
    ) = _ELF_HEADER[elf_class].unpack(stream.read(header_size))
    if machine != _MACHINE_NUMBER_FOR_CLASS[elf_class]:
        raise fail(
            f"wrong machine {machine} for an ELF{elf_class} image: vmscope runs x86 guests "
            f"({_MACHINE_FOR_CLASS[elf_class]})"
        )
    if e_type != 2:
        type_name = _ET_NAMES.get(e_type, f"{e_type:#x}")
        raise fail(f"ELF type {type_name} is not loadable: expected an executable (ET_EXEC)")
    if phnum == 0:
        raise fail("no program headers: nothing to load (is this an object file?)")
    if phentsize != _PHDR_SIZE_FOR_CLASS[elf_class]:
        expected = _PHDR_SIZE_FOR_CLASS[elf_class]
        raise fail(f"program header size {phentsize} is wrong: ELF{elf_class} uses {expected}")
    if phnum == 0xFFFF:
        raise fail("extended program header numbering (e_phnum 0xffff) is not supported")
    phdr_end = phoff + phnum * phentsize
    if phdr_end > file_size:
        raise fail(
            f"truncated: {phnum} program headers at offset {phoff:#x} end at {phdr_end:#x}, "
            f"past the end of the file ({file_size:#x} bytes)"
        )

    segments: list[ElfSegment] = []
    notes: list[ElfNote] = []
    stream.seek(phoff)
    table = stream.read(phnum * phentsize)
    for index in range(phnum):
        program_header = _program_header(elf_class, table[index * phentsize : (index + 1) * phentsize])
        p_type = program_header["p_type"]
        if p_type not in (_PT_LOAD, _PT_NOTE):
            continue
        offset, filesz = program_header["p_offset"], program_header["p_filesz"]
        memsz = program_header["p_memsz"]
        if offset + filesz > file_size:
            raise fail(
                f"truncated: segment {index} data at offset {offset:#x} + {filesz:#x} bytes ends at "
                f"{offset + filesz:#x}, past the end of the file ({file_size:#x} bytes)"
            )
        if p_type == _PT_NOTE:
            stream.seek(offset)
            notes.extend(_parse_notes(fail, index, stream.read(filesz), program_header["p_align"]))
            continue
        if filesz > memsz:
            raise fail(f"segment {index} has file size {filesz:#x} larger than its memory size {memsz:#x}")
        if memsz:
            segments.append(
                ElfSegment(
                    index=index,
                    offset=offset,
                    paddr=program_header["p_paddr"],
                    vaddr=program_header["p_vaddr"],
                    filesz=filesz,
                    memsz=memsz,
                    flags=program_header["p_flags"],
                )
            )
    if not segments:
        raise fail("no PT_LOAD program header with a non-zero size: nothing to load")
    return ElfImage(path, elf_class, entry, tuple(segments), tuple(notes))


def _parse_notes(
    fail: Callable[[str], ImageFormatError], index: int, data: bytes, align: int
) -> list[ElfNote]:
    """Split a PT_NOTE segment into notes; name and descriptor are padded to the segment's alignment."""
    step = 8 if align == 8 else 4
    position = 0
    notes: list[ElfNote] = []
    while position + _NOTE_HEADER.size <= len(data):
        namesz, descsz, note_type = _NOTE_HEADER.unpack_from(data, position)
        name_start = position + _NOTE_HEADER.size
        desc_start = name_start + _round_up(namesz, step)
        desc_end = desc_start + descsz
        if desc_end > len(data):
            raise fail(
                f"note at offset {position:#x} of segment {index} (name size {namesz}, descriptor size "
                f"{descsz}) runs past the end of the segment ({len(data):#x} bytes)"
            )
        name = data[name_start : name_start + namesz].rstrip(b"\0")
        notes.append(ElfNote(name, note_type, data[desc_start:desc_end]))
        position = _round_up(desc_end, step)
    return notes


def _round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# -- placement ----------------------------------------------------------------------------


def describe_ram(memory: GuestMemory) -> str:
    return ", ".join(f"{base:#x}-{base + size:#x}" for base, size in memory.ranges())


def check_placement(memory: GuestMemory, image: ElfImage) -> None:
    """Each segment inside guest RAM, clear of the VMM's boot structures, and of every other segment."""
    for segment in image.segments:
        if not memory.contains(segment.paddr, segment.memsz):
            raise image.fail(
                f"{segment.describe()}, {segment.memsz:#x} bytes, lies outside guest RAM "
                f"({describe_ram(memory)}); give the guest more memory or link it lower"
            )
        if segment.paddr < BOOT_STRUCTURES_END and segment.end > BOOT_STRUCTURES_START:
            raise image.fail(
                f"{segment.describe()} overlaps the VMM's boot structures at "
                f"{BOOT_STRUCTURES_START:#x}-{BOOT_STRUCTURES_END:#x}; link the image at or above "
                f"{HIGH_MEMORY_START:#x}"
            )
    ordered = sorted(image.segments, key=lambda s: s.paddr)
    for previous, current in itertools.pairwise(ordered):
        if current.paddr < previous.end:
            raise image.fail(f"{previous.describe()} and {current.describe()} overlap in physical memory")


def copy_into_guest(
    memory: GuestMemory, stream: io.BufferedReader, path: Path, address: int, size: int
) -> None:
    """Read ``size`` bytes from the current position of ``stream`` straight into guest RAM."""
    with memory.view(address, size) as target:
        copied = 0
        try:
            while copied < size:
                count = stream.readinto(target[copied:])
                if not count:
                    raise ImageFormatError(
                        str(path),
                        f"file ended after {copied:#x} of {size:#x} bytes while loading (did it shrink?)",
                    )
                copied += count
        except OSError as exc:
            raise ImageFormatError(str(path), f"cannot read: {exc.strerror or exc}") from None


def copy_segments(memory: GuestMemory, image: ElfImage) -> list[LoadedSegment]:
    """Copy each segment's file bytes to its physical address and zero the rest (.bss)."""
    loaded: list[LoadedSegment] = []
    with open_image(image.path) as stream:
        for segment in image.segments:
            stream.seek(segment.offset)
            copy_into_guest(memory, stream, image.path, segment.paddr, segment.filesz)
            memory.fill(segment.paddr + segment.filesz, segment.memsz - segment.filesz)
            description = f"ELF segment {segment.index} ({segment.permissions})"
            loaded.append(LoadedSegment(segment.paddr, segment.memsz, description))
    return loaded


def load_elf_segments(memory: GuestMemory, image: ElfImage) -> list[LoadedSegment]:
    """Validate the placement of ``image``'s PT_LOAD segments in ``memory``, then load them."""
    check_placement(memory, image)
    return copy_segments(memory, image)


def physical_entry(image: ElfImage, address: int, virtual: bool = True) -> int | None:
    """The physical address of ``address``: a virtual address inside a segment (when ``virtual``),
    else a physical one inside a segment; None when it is in no segment."""
    if virtual:
        for segment in image.segments:
            if segment.vaddr <= address < segment.vaddr + segment.memsz:
                return address - segment.vaddr + segment.paddr
    for segment in image.segments:
        if segment.paddr <= address < segment.end:
            return address
    return None


def describe_segments(segments: Sequence[ElfSegment]) -> str:
    return ", ".join(f"{s.paddr:#x}-{s.end:#x}" for s in segments)


def checked_entry(image: ElfImage, address: int, what: str = "entry point", virtual: bool = True) -> int:
    """``address`` as a physical entry inside a loaded segment and below 4 GiB, or an error.

    ``virtual``: ``address`` may be a virtual address (ELF e_entry); PVH note entries are physical.
    """
    entry = physical_entry(image, address, virtual)
    if entry is None:
        raise image.fail(
            f"{what} {address:#x} is not inside any loaded segment ({describe_segments(image.segments)})"
        )
    if entry >= ENTRY_LIMIT:
        raise image.fail(f"{what} {entry:#x} is above 4 GiB, beyond the identity map vmscope enters with")
    return entry


def mode_structures(mode: CpuMode) -> list[LoadedSegment]:
    """The boot structures the entry-state functions of :mod:`modes` write for ``mode``."""
    if mode is CpuMode.REAL:
        return []
    written = [LoadedSegment(GDT_ADDRESS, GDT_SIZE, "boot GDT")]
    if mode is CpuMode.LONG:
        tables_end = PD_ADDRESS + PAGE_DIRECTORY_COUNT * PAGE_SIZE
        written.append(LoadedSegment(PML4_ADDRESS, tables_end - PML4_ADDRESS, "identity page tables"))
    return written


def load_elf_image(memory: GuestMemory, image: ElfImage) -> LoadedGuest:
    """Load a parsed plain ELF: ELF64 enters in long mode, ELF32 in 32-bit protected mode."""
    entry = checked_entry(image, image.entry)
    segments = load_elf_segments(memory, image)
    enter = long_mode_state if image.elf_class == 64 else protected_mode_state
    state = enter(memory, entry)
    return LoadedGuest(
        entry=state,
        segments=segments + mode_structures(state.mode),
        symbol_file=image.path,
        kind=f"ELF{image.elf_class}",
    )


def load_elf(memory: GuestMemory, path: Path) -> LoadedGuest:
    """Load a plain x86 ELF32/ELF64 executable at its physical addresses."""
    return load_elf_image(memory, read_elf_image(Path(path)))
