"""Builders of synthetic kernel tables (kallsyms, ORC, BTF) for the unit tests, written from the formats
the kernel's build emits, so the parsers can be checked against known content."""

from __future__ import annotations

import struct
from collections.abc import Sequence

KERNEL_BASE = 0xFFFF_FFFF_8100_0000


def _align(data: bytearray, alignment: int = 8) -> int:
    while len(data) % alignment:
        data.append(0)
    return len(data)


def _tokens(names: Sequence[str]) -> list[str]:
    """Printable chars stand for themselves; the other 161 slots hold the commonest bigrams."""
    counts: dict[str, int] = {}
    for name in names:
        for i in range(len(name) - 1):
            pair = name[i : i + 2]
            counts[pair] = counts.get(pair, 0) + 1
    bigrams = sorted(counts, key=lambda pair: -counts[pair])
    fillers = iter(bigrams + [f"{chr(97 + i // 26)}{chr(97 + i % 26)}q" for i in range(256)])
    return [chr(i) if 0x20 < i < 0x7F else next(fillers) for i in range(256)]


def _compress(text: str, tokens: list[str]) -> bytes:
    pairs = {token: i for i, token in enumerate(tokens) if len(token) == 2}
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i : i + 2] in pairs:
            out.append(pairs[text[i : i + 2]])
            i += 2
        else:
            out.append(ord(text[i]))
            i += 1
    return bytes(out)


def build_kallsyms(
    symbols: Sequence[tuple[str, str, int]],
    *,
    order: str = "old",
    relative: bool = True,
    seqs: bool = False,
    marker_size: int = 8,
    relative_base: int = KERNEL_BASE,
    prefix: bytes = b"\xaa" * 64,
) -> bytes:
    """kallsyms tables for ``(name, type letter, address)`` (sorted by address) in scripts/kallsyms.c's
    ``order``: "old" (up to 6.3) or "new" (6.4+); per-cpu symbols below ``relative_base`` are stored
    as absolute (non-negative) offsets, like CONFIG_KALLSYMS_ABSOLUTE_PERCPU."""
    typed = [kind + name for name, kind, _ in symbols]
    tokens = _tokens(typed)
    data = bytearray(prefix)

    def addresses() -> None:
        _align(data)
        if relative:
            for _, _, address in symbols:
                value = address if address < relative_base else relative_base - 1 - address
                data.extend(struct.pack("<i", value))
            _align(data)
            data.extend(struct.pack("<Q", relative_base))
        else:
            for _, _, address in symbols:
                data.extend(struct.pack("<Q", address))

    if order == "old":
        addresses()
    _align(data)
    data.extend(struct.pack("<I", len(symbols)))
    names_start = _align(data)
    markers = []
    for i, text in enumerate(typed):
        if i % 256 == 0:
            markers.append(len(data) - names_start)
        encoded = _compress(text, tokens)
        if len(encoded) > 0x7F:
            data.extend(bytes([0x80 | (len(encoded) & 0x7F), len(encoded) >> 7]))
        else:
            data.append(len(encoded))
        data.extend(encoded)
    _align(data)
    for marker in markers:
        data.extend(struct.pack("<Q" if marker_size == 8 else "<I", marker))
    if seqs and order == "old":
        _align(data)
        for i in sorted(range(len(typed)), key=lambda i: typed[i][1:]):
            data.extend(i.to_bytes(3, "big"))
    _align(data)
    offsets = []
    for token in tokens:
        offsets.append(len(data))
        data.extend(token.encode() + b"\0")
    first = offsets[0]
    _align(data)
    data.extend(struct.pack("<256H", *(o - first for o in offsets)))
    if order == "new":
        addresses()
        if seqs:
            _align(data)
            for i in sorted(range(len(typed)), key=lambda i: typed[i][1:]):
                data.extend(i.to_bytes(3, "big"))
    _align(data)
    data.extend(b"\x55" * 64)
    return bytes(data)


def sample_symbols(count: int = 700) -> list[tuple[str, str, int]]:
    """Per-cpu data, then code and data symbols at increasing addresses."""
    symbols = [("fixed_percpu_data", "A", 0), ("current_task", "D", 0x1FB80)]
    address = KERNEL_BASE
    for i in range(count):
        symbols.append((f"func_{i}_do_work", "T" if i % 3 else "t", address))
        address += 0x40 + (i % 7) * 16
    symbols.append(("start_kernel", "T", address))
    symbols.append(("entry_SYSCALL_64", "T", address + 0x200))
    symbols.append(("a" * 150 + "_very_long", "T", address + 0x400))
    symbols.append(("init_task", "D", address + 0x10000))
    return symbols


def orc_entry(
    sp_reg: int, sp_offset: int, kind: int, bp_reg: int = 0, bp_offset: int = 0, end: bool = False
) -> bytes:
    """One format-1 (4.14 to 6.2) ORC entry: type 0 CALL, 1 REGS, 2 REGS_PARTIAL; ``end`` bit 10."""
    bits = sp_reg | bp_reg << 4 | kind << 8 | (0x400 if end else 0)
    return struct.pack("<hhH", sp_offset, bp_offset, bits)


def build_orc(section_address: int, entries: Sequence[tuple[int, bytes]]) -> tuple[bytes, bytes]:
    """``.orc_unwind_ip`` (self-relative s32) and ``.orc_unwind`` for (ip, entry) pairs sorted by ip."""
    ips = b"".join(struct.pack("<i", ip - (section_address + 4 * i)) for i, (ip, _) in enumerate(entries))
    return ips, b"".join(entry for _, entry in entries)
