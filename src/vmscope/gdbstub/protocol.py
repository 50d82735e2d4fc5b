"""GDB remote serial protocol: packet framing, checksums, binary escaping and hex helpers.

A packet is ``$payload#cc`` where ``cc`` is the modulo-256 sum of the payload bytes in two
lower-case hex digits. Binary data (the ``X`` packet, ``qXfer`` replies) escapes ``#``,
``$``, ``}`` and ``*`` as ``}`` followed by the byte XOR 0x20. The stub never sends
run-length encoded replies, and escapes ``*`` wherever it sends binary data so that gdb
cannot mistake it for a run-length marker.

Everything here is pure and side-effect free: the server (:mod:`vmscope.gdbstub.stub`)
feeds socket bytes to a :class:`PacketParser` and writes what :func:`frame_packet` builds.
Input comes from the network and is untrusted: malformed numbers raise
:class:`ProtocolError`, oversized packets are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from vmscope.errors import VmscopeError

#: what the stub announces as PacketSize (the largest packet it accepts, in bytes)
MAX_PACKET_SIZE = 0x4000
#: a client packet longer than this is discarded whole (and nacked in ack mode)
PARSER_LIMIT = 4 * MAX_PACKET_SIZE

INTERRUPT = 0x03
ESCAPE = ord("}")
_MUST_ESCAPE = frozenset(b"#$}*")


class ProtocolError(VmscopeError):
    """A client sent a packet whose contents do not parse."""


def checksum(payload: bytes) -> int:
    """The modulo-256 sum of ``payload``: what follows ``#`` in a packet."""
    return sum(payload) & 0xFF


def frame_packet(payload: bytes) -> bytes:
    """``$payload#cc``; ``payload`` must already be escaped where it carries binary data."""
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def escape_binary(data: bytes) -> bytes:
    """Escape ``#``, ``$``, ``}`` and ``*`` for a binary payload."""
    if not any(byte in _MUST_ESCAPE for byte in data):
        return bytes(data)
    out = bytearray()
    for byte in data:
        if byte in _MUST_ESCAPE:
            out += bytes((ESCAPE, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape_binary(data: bytes) -> bytes:
    """Undo :func:`escape_binary`; a trailing lone ``}`` is a ProtocolError."""
    if ESCAPE not in data:
        return bytes(data)
    out = bytearray()
    index = 0
    while index < len(data):
        byte = data[index]
        if byte == ESCAPE:
            if index + 1 >= len(data):
                raise ProtocolError("binary data ends in an escape character")
            out.append(data[index + 1] ^ 0x20)
            index += 2
        else:
            out.append(byte)
            index += 1
    return bytes(out)


def encode_hex(data: bytes) -> bytes:
    return data.hex().encode("ascii")


def decode_hex(text: bytes | str) -> bytes:
    """Hex digits to bytes; odd length or a non-hex digit is a ProtocolError."""
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise ProtocolError(f"not a hex byte string: {raw[:40]!r}") from None


def parse_hex_int(text: bytes | str, *, limit: int = (1 << 64) - 1) -> int:
    """A non-negative hex number no larger than ``limit`` (gdb sends no 0x prefix or sign)."""
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    if not raw or len(raw) > 32 or any(ch not in "0123456789abcdefABCDEF" for ch in raw):
        raise ProtocolError(f"not a hex number: {raw[:40]!r}")
    value = int(raw, 16)
    if value > limit:
        raise ProtocolError(f"number {raw} is out of range (at most {limit:#x})")
    return value


def parse_address_length(text: bytes) -> tuple[int, int]:
    """``ADDR,LENGTH`` (both hex) as used by m, M, X and qXfer."""
    address, sep, length = text.partition(b",")
    if not sep:
        raise ProtocolError(f"expected ADDR,LENGTH, got {text[:40]!r}")
    return parse_hex_int(address), parse_hex_int(length, limit=0xFFFF_FFFF)


def parse_thread_id(text: bytes) -> int:
    """A thread id: -1 (all), 0 (any) or a positive hex number; a ``pPID.TID`` form gives TID."""
    if text.startswith(b"p") and b"." in text:
        text = text.split(b".", 1)[1]
    if text == b"-1":
        return -1
    return parse_hex_int(text, limit=0x7FFF_FFFF)


class EventKind(Enum):
    PACKET = "packet"  # a well-formed packet: ``payload`` holds its (still escaped) contents
    BAD_PACKET = "bad_packet"  # checksum mismatch or oversized: nack it in ack mode
    ACK = "ack"
    NACK = "nack"
    INTERRUPT = "interrupt"  # 0x03 outside a packet: gdb's Ctrl-C


@dataclass(frozen=True)
class ParserEvent:
    kind: EventKind
    payload: bytes = b""


class PacketParser:
    """Incremental parser for the client-to-stub byte stream.

    Bytes outside a packet other than ``+``, ``-`` and 0x03 are noise and are skipped (gdb
    may send a stray ``+`` or newline); inside a packet every byte up to ``#`` is payload.
    """

    def __init__(self, limit: int = PARSER_LIMIT) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._in_packet = False
        self._oversized = False

    def feed(self, data: bytes) -> list[ParserEvent]:
        events: list[ParserEvent] = []
        self._buffer += data
        while self._buffer:
            if not self._in_packet:
                byte = self._buffer[0]
                del self._buffer[0]
                if byte == ord("$"):
                    self._in_packet = True
                    self._oversized = False
                elif byte == ord("+"):
                    events.append(ParserEvent(EventKind.ACK))
                elif byte == ord("-"):
                    events.append(ParserEvent(EventKind.NACK))
                elif byte == INTERRUPT:
                    events.append(ParserEvent(EventKind.INTERRUPT))
                continue
            end = self._buffer.find(b"#")
            if end < 0:
                if len(self._buffer) > self._limit:
                    # keep only what might still hold the end of the packet
                    self._oversized = True
                    del self._buffer[:-1]
                break
            if len(self._buffer) < end + 3:
                break  # the two checksum digits have not arrived yet
            payload = bytes(self._buffer[:end])
            digits = bytes(self._buffer[end + 1 : end + 3])
            del self._buffer[: end + 3]
            self._in_packet = False
            if self._oversized or len(payload) > self._limit:
                events.append(ParserEvent(EventKind.BAD_PACKET))
                continue
            try:
                expected = int(digits, 16)
            except ValueError:
                expected = -1
            if expected != checksum(payload):
                events.append(ParserEvent(EventKind.BAD_PACKET, payload))
            else:
                events.append(ParserEvent(EventKind.PACKET, payload))
        return events


def stop_reply(signal: int, thread: int | None = None, extra: str = "") -> bytes:
    """``T``-packet: signal, optional ``thread:`` and extra ``key:value;`` pairs."""
    text = f"T{signal & 0xFF:02x}"
    if thread is not None:
        text += f"thread:{thread:02x};"
    return (text + extra).encode("ascii")


def exit_reply(exit_status: int) -> bytes:
    """``W`` packet: the process exited with ``exit_status`` (only its low 8 bits travel)."""
    return f"W{exit_status & 0xFF:02x}".encode("ascii")


def killed_reply(signal: int) -> bytes:
    """``X`` packet: the process ended with ``signal``."""
    return f"X{signal & 0xFF:02x}".encode("ascii")


def qxfer_reply(document: bytes, offset: int, length: int) -> bytes:
    """One chunk of a qXfer object: ``m`` + data when more follows, ``l`` + data at the end."""
    chunk = document[offset : offset + length]
    more = offset + length < len(document)
    return (b"m" if more else b"l") + escape_binary(chunk)
