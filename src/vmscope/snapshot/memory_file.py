"""Guest RAM to a sparse file and back.

Saving compares RAM with zeros 2 MiB at a time (a bytes comparison is a memcmp), then page by
page inside chunks that are not all zero, and writes only runs of non-zero pages: a freshly
booted guest's RAM file takes the space of the pages it touched. Restoring maps the file
privately (:meth:`GuestMemory.from_private_file`), so pages are read when the guest touches them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vmscope.errors import SnapshotError
from vmscope.memory.guest_memory import GuestMemory

_CHUNK = 2 << 20
_PAGE = 4096
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(_PAGE)


def _data_runs(chunk: bytes) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the runs of non-zero pages in ``chunk``."""
    runs: list[tuple[int, int]] = []
    start = -1
    for offset in range(0, len(chunk), _PAGE):
        zero = chunk[offset : offset + _PAGE] == _ZERO_PAGE
        if not zero and start < 0:
            start = offset
        elif zero and start >= 0:
            runs.append((start, offset))
            start = -1
    if start >= 0:
        runs.append((start, len(chunk)))
    return runs


def write_memory_file(memory: GuestMemory, path: Path) -> dict[str, Any]:
    """Write every RAM region to ``path`` (regions one after another, zero pages as holes).

    Returns the ``memory`` section: total size, the bytes written, and the region layout.
    """
    written = 0
    file_offset = 0
    with open(path, "wb") as file:
        fd = file.fileno()
        for base, size in memory.ranges():
            for chunk_start in range(0, size, _CHUNK):
                length = min(_CHUNK, size - chunk_start)
                chunk = memory.read(base + chunk_start, length)
                if chunk == _ZERO_CHUNK[:length]:
                    continue
                for start, end in _data_runs(chunk):
                    os.pwrite(fd, chunk[start:end], file_offset + chunk_start + start)
                    written += end - start
            file_offset += size
        os.ftruncate(fd, file_offset)  # the tail may be a hole: the file still has RAM's size
    return {
        "file": path.name,
        "size": file_offset,
        "data_bytes": written,
        "regions": [[base, size] for base, size in memory.ranges()],
    }


def map_memory_file(path: Path, section: dict[str, Any]) -> GuestMemory:
    """Guest RAM mapped privately and lazily from a snapshot's memory file."""
    try:
        size = int(section["size"])
        regions = [(int(base), int(length)) for base, length in section["regions"]]
    except (KeyError, TypeError, ValueError):
        raise SnapshotError(f"{path}: the snapshot's memory section is malformed") from None
    try:
        actual = path.stat().st_size
    except OSError as error:
        raise SnapshotError(f"{path}: cannot read the snapshot's RAM file: {error.strerror}") from None
    if actual != size:
        raise SnapshotError(f"{path}: RAM file is {actual} bytes, the snapshot recorded {size} (truncated?)")
    memory = GuestMemory.from_private_file(path, size)
    if list(memory.ranges()) != regions:
        memory.close()
        raise SnapshotError(f"{path}: RAM layout {regions} differs from this vmscope's for {size} bytes")
    return memory
