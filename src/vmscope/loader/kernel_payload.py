"""The kernel inside a bzImage: its compressed payload, decompressed on the host.

A bzImage is a small decompressor plus the real kernel (an ELF ``vmlinux``) compressed with one
of gzip, bzip2, LZMA, XZ, LZ4 (the legacy frame format of ``lz4 -l``) or zstd; the setup header
says where the payload lies (``payload_offset``/``payload_length``, boot protocol 2.08+). The
kernel build appends the decompressed size as a little-endian u32 after the stream, which the
decoders below ignore as trailing data.

Who needs it: the profiler (the vmlinux holds kallsyms, ORC and BTF), and the bzImage loader on
hosts where the decompressor itself would run for minutes as emulated CPL0 code.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

from vmscope.errors import ImageFormatError

#: a vmlinux is tens of MiB; refuse to inflate a hostile payload without bound
MAX_VMLINUX_SIZE = 1 << 30
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20  # uncompressed size of every block but the last
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def payload_range(data: bytes) -> tuple[int, int]:
    """(file offset, length) of a bzImage's compressed payload; raises ValueError if there is none."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS setup header)")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < 0x0208:
        raise ValueError(f"boot protocol {version >> 8}.{version & 0xFF:02d} does not describe its payload")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(data):
        raise ValueError(f"payload at {start:#x}+{length:#x} lies outside the {len(data)}-byte file")
    return start, length


def compression_name(payload: bytes) -> str:
    if payload[:2] == b"\x1f\x8b":
        return "gzip"
    if payload[:3] == b"BZh":
        return "bzip2"
    if payload[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if payload[:4] == struct.pack("<I", _LZ4_LEGACY_MAGIC):
        return "lz4"
    if payload[:4] == _ZSTD_MAGIC:
        return "zstd"
    if payload[:3] == b"\x5d\x00\x00":
        return "lzma"
    if payload[:4] == b"\x89LZO":
        return "lzo"
    return f"unknown (magic {payload[:4].hex()})"


def decompress_payload(payload: bytes) -> bytes:
    """The bytes a kernel payload decompresses to; raises ValueError with the reason."""
    kind = compression_name(payload)
    try:
        if kind == "gzip":
            return _stream(kind, zlib.decompressobj(16 + zlib.MAX_WBITS), payload)
        if kind == "bzip2":
            return _stream(kind, bz2.BZ2Decompressor(), payload)
        if kind == "xz":
            return _stream(kind, lzma.LZMADecompressor(lzma.FORMAT_XZ), payload)
        if kind == "lzma":
            return _stream(kind, lzma.LZMADecompressor(lzma.FORMAT_ALONE), payload)
        if kind == "lz4":
            return _lz4_legacy(payload)
        if kind == "zstd":
            import zstandard

            return _stream(kind, zstandard.ZstdDecompressor().decompressobj(), payload)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as error:
        raise ValueError(f"{kind} payload is corrupt: {error}") from None
    except Exception as error:  # lz4 and zstandard raise their own error types
        if type(error).__module__.split(".")[0] in ("lz4", "zstandard", "_lz4", "zstd"):
            raise ValueError(f"{kind} payload is corrupt: {error}") from None
        raise
    raise ValueError(f"unsupported payload compression: {kind}")


def _stream(kind: str, decompressor: Any, payload: bytes) -> bytes:
    """Decompress one stream (zlib, bz2, lzma or zstandard object); the bytes after its end
    (the kernel's size word) are left alone."""
    if kind == "zstd":  # zstandard's decompressobj takes no output bound
        data: bytes = decompressor.decompress(payload)
    else:
        data = decompressor.decompress(payload, MAX_VMLINUX_SIZE + 1)
    if not decompressor.eof:
        if len(data) > MAX_VMLINUX_SIZE:
            raise ValueError(f"payload decompresses to more than {MAX_VMLINUX_SIZE >> 20} MiB")
        raise ValueError(f"{kind} payload is truncated: the stream does not end")
    return _bounded(data)


def _bounded(data: bytes) -> bytes:
    if len(data) > MAX_VMLINUX_SIZE:
        raise ValueError(f"payload decompresses to more than {MAX_VMLINUX_SIZE >> 20} MiB")
    return data


def _lz4_legacy(payload: bytes) -> bytes:
    """lz4 -l: a magic word, then blocks of (u32 compressed size, data) until the input ends."""
    import lz4.block

    blocks: list[bytes] = []
    total = 0
    position = 4
    while position + 4 <= len(payload):
        (size,) = struct.unpack_from("<I", payload, position)
        if size == _LZ4_LEGACY_MAGIC:  # a concatenated second frame
            position += 4
            continue
        if position + 4 + size > len(payload):
            # the kernel's trailing decompressed-size word, or a truncated stream
            if len(payload) - position == 4 and blocks:
                break
            raise ValueError(f"lz4 block of {size} bytes at {position:#x} runs past the payload")
        block = lz4.block.decompress(
            payload[position + 4 : position + 4 + size], uncompressed_size=_LZ4_LEGACY_BLOCK
        )
        blocks.append(block)
        total += len(block)
        if total > MAX_VMLINUX_SIZE:
            raise ValueError(f"payload decompresses to more than {MAX_VMLINUX_SIZE >> 20} MiB")
        position += 4 + size
    if not blocks:
        raise ValueError("lz4 payload holds no block")
    return b"".join(blocks)


def bzimage_vmlinux(path: Path, data: bytes | None = None) -> bytes:
    """The decompressed vmlinux ELF of the bzImage at ``path``."""
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ImageFormatError(str(path), f"cannot read: {error.strerror or error}") from None
    try:
        start, length = payload_range(data)
        vmlinux = decompress_payload(data[start : start + length])
    except ValueError as error:
        raise ImageFormatError(str(path), f"kernel payload: {error}") from None
    if vmlinux[:4] != b"\x7fELF":
        raise ImageFormatError(str(path), "the kernel payload does not decompress to an ELF vmlinux")
    return vmlinux
