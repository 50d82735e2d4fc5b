"""A raw disk image (regular file or block device) as the host side of virtio-blk.

Opening with the size a guest may address, deallocating or zero-filling ranges, and dropping
the bytes a short ``preadv``/``pwritev`` already moved from an iovec list. Plain functions on a
file descriptor; the device model decides when to call them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from vmscope.errors import ConfigError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = bytes(1 << 20)


def open_raw_image(path: str, *, read_only: bool) -> tuple[int, int]:
    """(descriptor, size in bytes) of the image at ``path``; ConfigError naming the path."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as error:
        mode = "reading" if read_only else "reading and writing"
        raise ConfigError(f"disk {path}: cannot open for {mode}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            return fd, info.st_size
        if stat.S_ISBLK(info.st_mode):
            return fd, os.lseek(fd, 0, os.SEEK_END)
        raise ConfigError(f"disk {path}: not a regular file or block device")
    except BaseException:
        os.close(fd)
        raise


_libc: ctypes.CDLL | None = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a file range (reads then return zeros); False where unsupported."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(error, os.strerror(error))


def advance_views(views: list[memoryview], done: int) -> list[memoryview]:
    """Drop ``done`` bytes from the front of an iovec list (after a short transfer)."""
    rest = []
    for view in views:
        if done >= len(view):
            done -= len(view)
            view.release()
            continue
        if done:
            rest.append(view[done:])
            view.release()
        else:
            rest.append(view)
        done = 0
    return rest


def write_zeros(fd: int, offset: int, length: int) -> None:
    while length:
        chunk = min(length, len(_ZERO_CHUNK))
        written = os.pwrite(fd, memoryview(_ZERO_CHUNK)[:chunk], offset)
        if written <= 0:
            raise OSError(errno.EIO, "short write while zeroing")
        offset += written
        length -= written
