"""The kernel's own symbol table (kallsyms), recovered from an image that has no ELF symbols.

scripts/kallsyms.c emits, each table 8-byte aligned, in one of two orders:

* up to 6.3: ``offsets|addresses, relative_base, num_syms, names, markers, [seqs_of_names],
  token_table, token_index`` (``seqs_of_names``, 3 bytes a symbol, since 6.2 and in stable
  backports such as Debian's 6.1);
* 6.4 on: ``num_syms, names, markers, token_table, token_index, offsets|addresses,
  relative_base, seqs_of_names``.

The scan anchors on the token table (256 NUL-terminated strings in which the digits stand for
themselves) followed by its token index (256 u16 offsets that must match the strings), walks
back to the markers and names, and tries each layout for the addresses; a candidate is accepted
only if every name decodes and the addresses come out sorted.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from vmscope.errors import KernelTableError

_TABLE = "kallsyms"
_DIGIT_TOKENS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
_MAX_SYMBOLS = 2_000_000
_MAX_SEQS_SCAN = 3 * _MAX_SYMBOLS
TEXT_TYPES = frozenset("TtWw")


@dataclass(frozen=True, slots=True)
class KallsymsLayout:
    """Where the tables were found (image offsets) and how addresses are encoded."""

    token_table: int
    token_index: int
    markers: int
    marker_size: int
    names: int
    addresses: int
    relative_base: int | None
    absolute_percpu: bool
    seqs_of_names: bool


@dataclass(slots=True)
class Kallsyms:
    """Decoded symbols at link-time addresses, sorted by address; ``types`` are nm letters."""

    names: list[str]
    addresses: list[int]
    types: list[str]
    layout: KallsymsLayout
    _by_name: dict[str, int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def address_of(self, name: str) -> int | None:
        """Link-time address of the first symbol called ``name``."""
        if not self._by_name:
            for index in range(len(self.names) - 1, -1, -1):
                self._by_name[self.names[index]] = index
        found = self._by_name.get(name)
        return None if found is None else self.addresses[found]

    def text_symbols(self) -> Iterator[tuple[str, int]]:
        """(name, address) of code symbols."""
        for name, address, kind in zip(self.names, self.addresses, self.types, strict=True):
            if kind in TEXT_TYPES:
                yield name, address


def parse_kallsyms(data: bytes) -> Kallsyms:
    """Find and decode kallsyms in a decompressed kernel image (vmlinux file or raw image)."""
    problems: list[str] = []
    start = data.find(_DIGIT_TOKENS)
    if start < 0:
        raise KernelTableError(_TABLE, "no token table in the image (kernel built without CONFIG_KALLSYMS?)")
    while start >= 0:
        try:
            return _parse_at_digits(data, start)
        except KernelTableError as error:
            problems.append(f"{start:#x}: {error.problem}")
        start = data.find(_DIGIT_TOKENS, start + 1)
    raise KernelTableError(_TABLE, "no valid table in the image; last candidate " + problems[-1])


def _fail(problem: str) -> KernelTableError:
    return KernelTableError(_TABLE, problem)


def _align8(value: int) -> int:
    return (value + 7) & ~7


def _tokens_at(data: bytes, digits: int) -> tuple[int, list[bytes], int]:
    """The token table around the digit tokens: (start, 256 tokens, end)."""
    start = digits
    for _ in range(ord("0")):  # walk back over tokens 47..0
        if start < 2 or data[start - 1] != 0:
            raise _fail("token table is malformed before the digits")
        start = data.rfind(b"\0", 0, start - 1) + 1
    if start % 8 and data[start - 1 : start] != b"\0":
        raise _fail("token table does not start on a NUL boundary")
    tokens: list[bytes] = []
    position = start
    for _ in range(256):
        end = data.find(b"\0", position)
        if end < 0 or end == position or end - position > 64:
            raise _fail("token table has an empty, overlong or unterminated token")
        tokens.append(data[position:end])
        position = end + 1
    for token in tokens:
        if any(c < 0x20 or c > 0x7E for c in token):
            raise _fail("token table holds non-printable tokens")
    return start, tokens, position


def _parse_at_digits(data: bytes, digits: int) -> Kallsyms:
    token_table, tokens, tokens_end = _tokens_at(data, digits)
    token_index = _align8(tokens_end)
    if token_index + 512 > len(data):
        raise _fail("image ends inside the token index")
    offsets = struct.unpack_from("<256H", data, token_index)
    expected = 0
    for i, token in enumerate(tokens):
        if offsets[i] != expected:
            raise _fail("token index does not match the token table")
        expected += len(token) + 1
    text = [t.decode("ascii") for t in tokens]
    for markers, marker_size, blocks, count_hint, seqs in _marker_candidates(data, token_table):
        try:
            names_start, count = _names_start(data, markers, marker_size, blocks, count_hint)
            names, types, names_end = _decode_names(data, names_start, count, text)
        except KernelTableError:
            continue
        if names_end > markers:
            continue
        layout_base = (token_table, token_index, markers, marker_size, names_start, seqs)
        return _with_addresses(data, layout_base, names, types, token_index + 512, seqs)
    raise _fail("no markers/names table before the token table")


def _marker_candidates(data: bytes, token_table: int) -> Iterator[tuple[int, int, int, int | None, bool]]:
    """(markers offset, word size, marker count, symbol count if known, seqs_of_names present)."""
    for size in (8, 4):
        for markers, blocks in _markers_ending_at(data, token_table, size):
            yield markers, size, blocks, None, False
    # seqs_of_names (3 bytes a symbol) between markers and token table: its end is within 8 bytes
    # of the token table, so each aligned start E fixes the symbol count to within three values
    end = token_table
    position = token_table - 8
    floor = max(0, token_table - _MAX_SEQS_SCAN)
    while position >= floor:
        for count in range(max(1, (end - 8 - position) // 3), (end - position) // 3 + 1):
            if position + 3 * count > end or position + 3 * count <= end - 8:
                continue
            blocks = (count + 255) // 256
            for size in (8, 4):
                markers = position - _align8(blocks * size)
                if markers >= 0 and _valid_markers(data, markers, size, blocks):
                    yield markers, size, blocks, count, True
        position -= 8


def _markers_ending_at(data: bytes, end: int, size: int) -> Iterator[tuple[int, int]]:
    """Strictly increasing marker arrays that start with 0 and end at ``end`` (less alignment
    padding): (offset, length)."""
    fmt = "<Q" if size == 8 else "<I"
    for padding in range(0, 8, size):
        position = end - padding - size
        previous: int | None = None
        last = position
        while position >= 0:
            value = struct.unpack_from(fmt, data, position)[0]
            if previous is not None and (value >= previous or previous - value > 256 * 260):
                break
            if value == 0:
                yield position, (last - position) // size + 1
                break
            previous = value
            position -= size


def _valid_markers(data: bytes, markers: int, size: int, blocks: int) -> bool:
    fmt = "<Q" if size == 8 else "<I"
    if markers + blocks * size > len(data) or struct.unpack_from(fmt, data, markers)[0] != 0:
        return False
    previous = 0
    for i in range(1, blocks):
        value = struct.unpack_from(fmt, data, markers + i * size)[0]
        if value <= previous or value - previous > 256 * 260 or value - previous < 256 * 2:
            return False
        previous = value
    return True


def _marker_values(data: bytes, markers: int, size: int, end: int) -> list[int]:
    fmt = "<Q" if size == 8 else "<I"
    values: list[int] = []
    position = markers
    while position < end:
        value = struct.unpack_from(fmt, data, position)[0]
        if values and value <= values[-1]:
            break
        values.append(value)
        position += size
    return values


def _names_start(
    data: bytes, markers: int, size: int, blocks: int, count_hint: int | None
) -> tuple[int, int]:
    """The names table's offset and the symbol count (``num_syms``, the u32 8 bytes before it)."""
    values = _marker_values(data, markers, size, markers + blocks * size)
    if len(values) != blocks:
        raise _fail("markers are not increasing")
    last = values[-1]
    candidate = (markers - last) & ~7
    floor = max(8, candidate - 256 * 260)
    while candidate >= floor:
        count, high = struct.unpack_from("<II", data, candidate - 8)
        matches = high == 0 and (count + 255) // 256 == blocks and count_hint in (None, count)
        if matches and _skip_names(data, candidate + last, count - 256 * (blocks - 1), markers):
            return candidate, count
        candidate -= 8
    raise _fail("no num_syms before the names table")


def _entry_length(data: bytes, position: int) -> tuple[int, int]:
    """(length, header bytes) of one names entry: a one- or two-byte ULEB128 length (6.1+)."""
    length = data[position]
    if length & 0x80:
        return (length & 0x7F) | (data[position + 1] << 7), 2
    return length, 1


def _skip_names(data: bytes, position: int, count: int, limit: int) -> bool:
    """True if ``count`` entries from ``position`` end within 8 bytes before ``limit``."""
    try:
        for _ in range(count):
            length, header = _entry_length(data, position)
            if length == 0:
                return False
            position += header + length
            if position > limit:
                return False
    except IndexError:
        return False
    return limit - 8 < position <= limit


def _decode_names(data: bytes, start: int, count: int, tokens: list[str]) -> tuple[list[str], list[str], int]:
    names: list[str] = []
    types: list[str] = []
    position = start
    if count <= 0 or count > _MAX_SYMBOLS:
        raise _fail(f"symbol count {count} out of range")
    try:
        for _ in range(count):
            length, header = _entry_length(data, position)
            position += header
            if length == 0:
                raise _fail("empty names entry")
            text = "".join([tokens[b] for b in data[position : position + length]])
            position += length
            if len(text) < 2:
                raise _fail("names entry too short")
            types.append(text[0])
            names.append(text[1:])
    except IndexError:
        raise _fail("names table runs past the image") from None
    return names, types, position


def _with_addresses(
    data: bytes,
    base: tuple[int, int, int, int, int, bool],
    names: list[str],
    types: list[str],
    token_index_end: int,
    seqs: bool,
) -> Kallsyms:
    token_table, token_index, markers, marker_size, names_start, _ = base
    count = len(names)
    after_index = _align8(token_index_end)
    # (addresses offset, relative_base offset or None) for the old and the 6.4+ order
    candidates: list[tuple[int, int | None]] = [
        (names_start - 16 - _align8(4 * count), names_start - 16),
        (after_index, after_index + _align8(4 * count)),
        (names_start - 8 - 8 * count, None),
        (after_index, None),
    ]
    for addresses_at, base_at in candidates:
        if addresses_at < 0:
            continue
        width = 4 if base_at is not None else 8
        if addresses_at + width * count > len(data) or (base_at is not None and base_at + 8 > len(data)):
            continue
        if base_at is None:
            values = list(struct.unpack_from(f"<{count}Q", data, addresses_at))
            modes: list[tuple[list[int], bool]] = [(values, False)]
        else:
            relative = struct.unpack_from("<Q", data, base_at)[0]
            if relative < 0xFFFF_8000_0000_0000:
                continue
            offsets = struct.unpack_from(f"<{count}i", data, addresses_at)
            percpu = [o if o >= 0 else relative - 1 - o for o in offsets]
            plain = [(relative + (o & 0xFFFF_FFFF)) & 0xFFFF_FFFF_FFFF_FFFF for o in offsets]
            modes = [(percpu, True), (plain, False)]
        for addresses, absolute_percpu in modes:
            if _plausible(addresses, types):
                layout = KallsymsLayout(
                    token_table, token_index, markers, marker_size, names_start, addresses_at,
                    base_at, absolute_percpu, seqs,
                )  # fmt: skip
                return Kallsyms(names, list(addresses), types, layout)
    raise _fail("no sorted address table next to the names")


def _plausible(addresses: list[int], types: list[str]) -> bool:
    """Sorted, and code symbols in the kernel's higher half."""
    if any(b < a for a, b in itertools.pairwise(addresses)):
        return False
    text = [a for a, t in zip(addresses, types, strict=True) if t in TEXT_TYPES]
    return bool(text) and all(a >= 0xFFFF_8000_0000_0000 for a in text)
