"""The single place vmscope issues ioctls: errno becomes a typed, readable error."""

from __future__ import annotations

import ctypes
import errno as errno_module
import fcntl
import os
from typing import Any

from vmscope.errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1


def _failure(what: str, code: int) -> KvmError:
    name = errno_module.errorcode.get(code, str(code))
    return KvmError(f"{what} failed: {name} ({os.strerror(code)})", errno=code)


def ioctl(fd: int, request: int, arg: Any = 0, what: str = "ioctl") -> int:
    """Issue ``request`` on ``fd``; a failure raises KvmError naming the operation and errno."""
    if isinstance(arg, int) and not _INT_MIN <= arg <= _INT_MAX:
        # fcntl.ioctl passes integers as a C int; KVM takes some arguments as unsigned long
        result = _libc.ioctl(fd, request, arg)
        if result < 0:
            raise _failure(what, ctypes.get_errno())
        return int(result)
    try:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as error:
        raise _failure(what, error.errno or 0) from None
