"""Byte-built ELF images: a header, program headers and each segment's bytes, no section headers."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

PT_LOAD, PT_NOTE, PT_PHDR = 1, 4, 6
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183
ET_EXEC, ET_REL = 2, 1


@dataclass
class Seg:
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None
    type: int = PT_LOAD
    flags: int = 5
    align: int = 4


def build_elf(
    segments: Sequence[Seg],
    entry: int,
    elf_class: int = 64,
    machine: int | None = None,
    e_type: int = ET_EXEC,
) -> bytes:
    """A minimal little-endian ELF: header, program headers, then each segment's bytes."""
    if machine is None:
        machine = EM_X86_64 if elf_class == 64 else EM_386
    ehsize, phentsize = (64, 56) if elf_class == 64 else (52, 32)
    data_offset = ehsize + phentsize * len(segments)
    offsets = []
    blob = b""
    for seg in segments:
        offsets.append(data_offset + len(blob))
        blob += seg.data + bytes(-len(seg.data) % 8)
    ident = b"\x7fELF" + bytes([2 if elf_class == 64 else 1, 1, 1]) + bytes(9)
    header_format = "<HHIQQQIHHHHHH" if elf_class == 64 else "<HHIIIIIHHHHHH"
    shentsize = 64 if elf_class == 64 else 40
    # e_phoff is right after the header; no section headers (e_shoff 0, e_shnum 0).
    fields = (e_type, machine, 1, entry, ehsize, 0, 0, ehsize, phentsize, len(segments), shentsize, 0, 0)
    header = ident + struct.pack(header_format, *fields)
    phdrs = b""
    for seg, offset in zip(segments, offsets, strict=True):
        vaddr = seg.paddr if seg.vaddr is None else seg.vaddr
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        if elf_class == 64:
            phdrs += struct.pack(
                "<IIQQQQQQ", seg.type, seg.flags, offset, vaddr, seg.paddr, len(seg.data), memsz, seg.align
            )
        else:
            phdrs += struct.pack(
                "<IIIIIIII", seg.type, offset, vaddr, seg.paddr, len(seg.data), memsz, seg.flags, seg.align
            )
    return header + phdrs + blob
