"""Size bounds for every file vmscope reads, so that no input can exhaust the host's memory.

A path given by a user may name ``/dev/zero``, a FIFO that never ends, or a file far larger than
anything of its kind: each reader states the largest file it accepts and gets a one-line error
naming the file instead of reading without bound. Errors are built by the caller's ``fail``
(e.g. ``lambda problem: ImageFormatError(path, problem)``) so each keeps its own error type.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from vmscope.errors import VmscopeError

MiB = 1 << 20
GiB = 1 << 30

#: a vmscope profile file (compressed) and its decompressed JSON
MAX_PROFILE_BYTES = 512 * MiB
MAX_PROFILE_JSON_BYTES = 2 * GiB
#: System.map / kallsyms text (a large kernel's is ~10 MiB) and ELF symbol files (vmlinux with DWARF)
MAX_SYMBOL_TEXT_BYTES = 256 * MiB
MAX_SYMBOL_ELF_BYTES = 4 * GiB
#: a guest kernel or image; initrds and modules are also bounded by guest RAM where they are placed
MAX_IMAGE_BYTES = 4 * GiB
#: a file copied into an initramfs (busybox, extra files)
MAX_INITRAMFS_FILE_BYTES = 1 * GiB

Fail = Callable[[str], VmscopeError]


def _size_text(size: int) -> str:
    return f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"


def check_regular_file(path: str, limit: int, fail: Fail, what: str = "file") -> int:
    """The size of ``path``, which must be a regular file of at most ``limit`` bytes."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise fail(f"cannot read: {error.strerror or error}") from None
    if stat.S_ISDIR(info.st_mode):
        raise fail(f"is a directory, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise fail(f"is not a regular file (a device or pipe cannot be a {what})")
    if info.st_size > limit:
        raise fail(
            f"{_size_text(info.st_size)} is larger than any {what} vmscope reads (limit {_size_text(limit)})"
        )
    return info.st_size


def read_bounded(path: str, limit: int, fail: Fail, what: str = "file") -> bytes:
    """All of ``path``, refusing more than ``limit`` bytes.

    Files whose size ``stat`` does not tell (/proc files, FIFOs) are read up to the limit;
    devices (/dev/zero) and directories are refused before reading.
    """
    try:
        info = os.stat(path)
    except OSError as error:
        raise fail(f"cannot read: {error.strerror or error}") from None
    if stat.S_ISDIR(info.st_mode):
        raise fail(f"is a directory, not a {what}")
    if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        raise fail(f"is a device, not a {what}")
    if info.st_size > limit:
        raise fail(
            f"{_size_text(info.st_size)} is larger than any {what} vmscope reads (limit {_size_text(limit)})"
        )
    try:
        with open(path, "rb") as stream:
            data = stream.read(limit + 1)
    except OSError as error:
        raise fail(f"cannot read: {error.strerror or error}") from None
    if len(data) > limit:
        raise fail(f"more than {_size_text(limit)}, larger than any {what} vmscope reads")
    return data
