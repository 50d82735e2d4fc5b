"""Per-thread settings of the host OS for vmscope's own threads (Linux ``prctl``).

Python names its threads only for itself: ``top -H``, ``ps -L``, ``perf`` and gdb see every
thread as "python". :func:`name_host_thread` gives the calling thread its vmscope name in the
kernel too ("vcpu0", "io:virtio-blk0"), as QEMU names "CPU 0/KVM" and its I/O threads, so the
host's tools can tell a vCPU from an I/O thread. Both calls are best effort: off Linux, or
where ``prctl`` fails, nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger("vmscope.host_thread")

_PR_SET_NAME = 15
_PR_SET_TIMERSLACK = 29
#: the kernel keeps 15 bytes of a thread name (TASK_COMM_LEN - 1)
HOST_NAME_BYTES = 15

_libc: ctypes.CDLL | None = None


def _prctl(option: int, argument: int | bytes) -> bool:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        value = ctypes.c_char_p(argument) if isinstance(argument, bytes) else ctypes.c_ulong(argument)
        return int(_libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError) as error:
        log.debug("prctl(%d) unavailable: %s", option, error)
        return False


def name_host_thread(name: str | None = None) -> bool:
    """Set the calling thread's kernel name (default: its Python name), cut to 15 bytes."""
    text = threading.current_thread().name if name is None else name
    return _prctl(_PR_SET_NAME, text.encode("ascii", "replace")[:HOST_NAME_BYTES])


def set_timer_slack(nanoseconds: int) -> bool:
    """prctl(PR_SET_TIMERSLACK) for the calling thread: how late its timed sleeps may end."""
    return _prctl(_PR_SET_TIMERSLACK, nanoseconds)
