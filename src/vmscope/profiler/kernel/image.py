"""A kernel image as the profiler needs it: the decompressed vmlinux bytes and its section headers.

A vmlinux ELF is read as is; a bzImage's payload is decompressed (gzip and xz in Python, LZ4 with
the ``lz4`` tool, which Debian's cloud kernels need).
"""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmscope.errors import ImageFormatError

_LZ4_LEGACY = b"\x02\x21\x4c\x18"


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
        data = _bzimage_payload(str(path), data)
    return _parse_elf(str(path), data)


def _bzimage_payload(path: str, data: bytes) -> bytes:
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise ImageFormatError(path, "neither an ELF vmlinux nor a bzImage")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    try:
        if payload[:2] == b"\x1f\x8b":
            return gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
        if payload[:6] == b"\xfd7zXZ\x00":
            return lzma.LZMADecompressor().decompress(payload)
    except (OSError, lzma.LZMAError, EOFError) as error:
        raise ImageFormatError(path, f"cannot decompress the kernel payload: {error}") from None
    if payload[:4] == _LZ4_LEGACY:
        return _lz4_tool(path, payload)
    raise ImageFormatError(path, f"unsupported kernel payload compression (magic {payload[:4].hex()})")


def _lz4_tool(path: str, payload: bytes) -> bytes:
    tool = shutil.which("lz4")
    if tool is None:
        raise ImageFormatError(path, "LZ4-compressed kernel and no lz4 tool (apt-get install lz4)")
    with tempfile.TemporaryDirectory() as scratch:
        packed, unpacked = Path(scratch, "payload.lz4"), Path(scratch, "vmlinux")
        packed.write_bytes(payload)
        # lz4 exits 1 on the size word the kernel appends after the stream; the output is whole
        subprocess.run(
            [tool, "-d", "-f", str(packed), str(unpacked)], capture_output=True, timeout=300, check=False
        )
        if not unpacked.exists():
            raise ImageFormatError(path, "lz4 could not decompress the kernel payload")
        return unpacked.read_bytes()


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
