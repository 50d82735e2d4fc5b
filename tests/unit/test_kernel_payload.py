"""bzImage payloads: every compression a kernel build can choose, decompressed on the host."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from pathlib import Path

import lz4.block
import pytest
import zstandard

from vmscope.errors import ImageFormatError
from vmscope.loader.kernel_payload import (
    bzimage_vmlinux,
    compression_name,
    decompress_payload,
    payload_range,
)

VMLINUX = b"\x7fELF" + bytes(range(256)) * 300 + b"tail"


def lz4_legacy(data: bytes, block: int = 8 << 20) -> bytes:
    """lz4 -l framing, as the kernel build writes it (plus its trailing size word)."""
    out = [struct.pack("<I", 0x184C2102)]
    for start in range(0, len(data), block):
        packed = lz4.block.compress(data[start : start + block], store_size=False)
        out.append(struct.pack("<I", len(packed)) + packed)
    return b"".join(out)


def with_size_word(payload: bytes, data: bytes) -> bytes:
    return payload + struct.pack("<I", len(data))


COMPRESSORS = {
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
    "lz4": lz4_legacy,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_each_compression_round_trips_with_the_trailing_size_word(kind: str) -> None:
    payload = with_size_word(COMPRESSORS[kind](VMLINUX), VMLINUX)
    assert compression_name(payload) == kind
    assert decompress_payload(payload) == VMLINUX


def test_lz4_payload_of_several_blocks() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB in 64 KiB blocks
    assert decompress_payload(with_size_word(lz4_legacy(data, 64 << 10), data)) == data


@pytest.mark.parametrize("kind", ["gzip", "xz", "lz4", "zstd"])
def test_corrupt_or_truncated_payloads_give_a_reason(kind: str) -> None:
    packed = COMPRESSORS[kind](VMLINUX)
    truncated = packed[: len(packed) // 2]
    with pytest.raises(ValueError, match=kind):
        decompress_payload(truncated[:8] + bytes(64) + truncated[8:] if kind != "lz4" else truncated)


def test_unknown_and_lzo_compressions_are_named() -> None:
    with pytest.raises(ValueError, match="lzo"):
        decompress_payload(b"\x89LZO\x00\x0d\x0a\x1a")
    with pytest.raises(ValueError, match="magic 00010203"):
        decompress_payload(bytes([0, 1, 2, 3, 4, 5]))


def fake_bzimage(payload: bytes, version: int = 0x020F, setup_sects: int = 4) -> bytes:
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<II", image, 0x248, 16, len(payload))
    return bytes(image) + bytes(16) + payload


def test_payload_range_and_vmlinux_from_a_bzimage(tmp_path: Path) -> None:
    payload = with_size_word(gzip.compress(VMLINUX), VMLINUX)
    image = fake_bzimage(payload)
    start, length = payload_range(image)
    assert image[start : start + length] == payload
    path = tmp_path / "bzImage"
    path.write_bytes(image)
    assert bzimage_vmlinux(path) == VMLINUX


def test_bad_bzimages_name_the_file_and_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(fake_bzimage(b"", version=0x0206))
    with pytest.raises(ImageFormatError, match=r"bzImage.*boot protocol 2\.06"):
        bzimage_vmlinux(path)
    path.write_bytes(fake_bzimage(gzip.compress(b"not an elf")))
    with pytest.raises(ImageFormatError, match="does not decompress to an ELF"):
        bzimage_vmlinux(path)
    image = bytearray(fake_bzimage(gzip.compress(VMLINUX)))
    struct.pack_into("<II", image, 0x248, 16, len(image))  # payload runs past the end of the file
    path.write_bytes(bytes(image))
    with pytest.raises(ImageFormatError, match="outside the"):
        bzimage_vmlinux(path)
