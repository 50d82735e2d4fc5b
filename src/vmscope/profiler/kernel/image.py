"""A kernel image as the profiler needs it: the decompressed vmlinux bytes and its section headers.

A vmlinux ELF is read as is; a bzImage's payload is decompressed by loader.kernel_payload.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

from vmscope.errors import ImageFormatError
from vmscope.loader.kernel_payload import bzimage_vmlinux


@dataclass(frozen=True, slots=True)
class Section:
    address: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Segment:
    address: int
    offset: int
    file_size: int


@dataclass(slots=True)
class KernelImage:
    """The vmlinux bytes with its section and loadable-segment headers (link-time addresses)."""

    path: str
    data: bytes
    sections: dict[str, Section]
    segments: list[Segment]

    def section_bytes(self, name: str) -> bytes | None:
        section = self.sections.get(name)
        if section is None:
            return None
        return self.data[section.offset : section.offset + section.size]

    def bytes_at(self, address: int, length: int) -> bytes | None:
        """File contents at a link-time virtual address, if a loadable segment holds them."""
        for segment in self.segments:
            if segment.address <= address and address + length <= segment.address + segment.file_size:
                start = segment.offset + address - segment.address
                return self.data[start : start + length]
        return None


def load_kernel_image(path: str | Path) -> KernelImage:
    """Read a vmlinux ELF or a bzImage (decompressing its payload)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageFormatError(str(path), f"cannot read: {error.strerror or error}") from None
    if data[:4] != b"\x7fELF":
        if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
            raise ImageFormatError(str(path), "neither an ELF vmlinux nor a bzImage")
        data = bzimage_vmlinux(path, data)
    return _parse_elf(str(path), data)


def _parse_elf(path: str, data: bytes) -> KernelImage:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        sections = {
            section.name: Section(int(section["sh_addr"]), int(section["sh_offset"]), int(section["sh_size"]))
            for section in elf.iter_sections()
            if section["sh_type"] != "SHT_NOBITS"
        }
        segments = [
            Segment(int(segment["p_vaddr"]), int(segment["p_offset"]), int(segment["p_filesz"]))
            for segment in elf.iter_segments()
            if segment["p_type"] == "PT_LOAD"
        ]
    except (ELFError, ValueError, KeyError, struct.error) as error:
        raise ImageFormatError(path, f"malformed vmlinux ELF: {error}") from None
    return KernelImage(path, data, sections, segments)
