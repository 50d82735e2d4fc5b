"""The single place vmscope issues ioctls: errno becomes a typed, readable error."""

from __future__ import annotations

import errno as errno_module
import fcntl
import os
from typing import Any

from vmscope.errors import KvmError


def ioctl(fd: int, request: int, arg: Any = 0, what: str = "ioctl") -> int:
    """Issue ``request`` on ``fd``; a failure raises KvmError naming the operation and errno."""
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return fcntl.ioctl(fd, request, arg, True)
    except OSError as error:
        code = error.errno or 0
        raise KvmError(
            f"{what} failed: {errno_module.errorcode.get(code, str(code))} ({os.strerror(code)})", errno=code
        ) from None
