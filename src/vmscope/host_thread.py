"""Per-thread settings of the host OS for vmscope's own threads (Linux ``prctl``).

Python names its threads only for itself: ``top -H``, ``ps -L``, ``perf`` and gdb see every
thread as "python". :func:`name_host_thread` gives the calling thread its vmscope name in the
kernel too ("vcpu0", "io:virtio-blk0"), as QEMU names "CPU 0/KVM" and its I/O threads, so the
host's tools can tell a vCPU from an I/O thread. Both calls are best effort: off Linux, or
where ``prctl`` fails, nothing changes.

Naming is also the moment a thread announces itself: :func:`watch_host_threads` callbacks run on
the new thread with its name and kernel thread id, so host-side tools (per-thread perf counters)
can attach to it from its first instruction on.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("vmscope.host_thread")

_PR_SET_NAME = 15
_PR_SET_TIMERSLACK = 29
#: the kernel keeps 15 bytes of a thread name (TASK_COMM_LEN - 1)
HOST_NAME_BYTES = 15

_libc: ctypes.CDLL | None = None

#: called as callback(name, native_thread_id) on each thread that names itself
ThreadWatcher = Callable[[str, int], None]
_watchers: list[ThreadWatcher] = []
#: native thread id -> (name, thread) of every thread that named itself, pruned as they end
_named: dict[int, tuple[str, threading.Thread]] = {}
_watchers_lock = threading.Lock()


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
    named = _prctl(_PR_SET_NAME, text.encode("ascii", "replace")[:HOST_NAME_BYTES])
    tid = threading.get_native_id()
    with _watchers_lock:
        watchers = list(_watchers)
        for ended in [t for t, (_, thread) in _named.items() if not thread.is_alive()]:
            del _named[ended]
        _named[tid] = (text, threading.current_thread())
    for watcher in watchers:
        try:
            watcher(text, tid)
        except Exception:  # a broken watcher must not keep a vCPU or I/O thread from starting
            log.exception("host thread watcher %r failed for %s", watcher, text)
    return named


def watch_host_threads(watcher: ThreadWatcher) -> Callable[[], None]:
    """Call ``watcher(name, native_thread_id)`` on every thread that names itself from now on, and
    at once (on the calling thread) for each named thread that is already running.

    Returns the function that stops watching.
    """
    with _watchers_lock:
        _watchers.append(watcher)
        running = [(name, tid) for tid, (name, thread) in _named.items() if thread.is_alive()]
    for name, tid in running:
        watcher(name, tid)

    def unwatch() -> None:
        with _watchers_lock:
            if watcher in _watchers:
                _watchers.remove(watcher)

    return unwatch


def set_timer_slack(nanoseconds: int) -> bool:
    """prctl(PR_SET_TIMERSLACK) for the calling thread: how late its timed sleeps may end."""
    return _prctl(_PR_SET_TIMERSLACK, nanoseconds)
