"""Tiny hand-assembled guests for the core tests (bytes, so no assembler is needed)."""

from __future__ import annotations


def out_byte(port: int, value: int) -> bytes:
    """mov dx, port; mov al, value; out dx, al (valid in 16, 32 and 64-bit code)."""
    return b"\x66\xba" + port.to_bytes(2, "little") + b"\xb0" + bytes([value]) + b"\xee"


def serial_print_real(text: bytes) -> bytes:
    """Real-mode code writing ``text`` to COM1, one `out` per byte."""
    return b"".join(b"\xba\xf8\x03\xb0" + bytes([ch]) + b"\xee" for ch in text)


def debug_exit_real(value: int) -> bytes:
    """Real mode: mov dx, 0xf4; mov al, value; out dx, al; hlt."""
    return b"\xba\xf4\x00\xb0" + bytes([value]) + b"\xee\xf4"


def debug_exit_long(value: int) -> bytes:
    """64-bit mode: mov dx, 0xf4; mov al, value; out dx, al; hlt."""
    return out_byte(0xF4, value) + b"\xf4"


UD2 = b"\x0f\x0b"
