"""Linux perf counters on one host thread, through ``perf_event_open`` (ctypes, no dependency).

The perfctr-xen idea on KVM: a vCPU thread's CPU time is guest time plus the VMM's exit handling,
and the PMU can tell them apart: ``exclude_host`` counts only while the thread runs guest code,
``exclude_guest`` only while it runs the host (kernel KVM code and vmscope's Python). Software
events (task-clock, context switches, migrations, page faults) always exist; hardware events need a
PMU, which software-virtualization hosts (kvm_pvm) and many nested clouds do not have.

Each counter is one fd opened for one thread id (``pid=tid, cpu=-1``) and read with
TOTAL_TIME_ENABLED/RUNNING so multiplexed hardware counters are scaled. A counter keeps its final
value after its thread ends, so reading at the end of a run works for threads that are gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmscope.errors import ConfigError, CounterUnavailableError

PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1

_FLAG_EXCLUDE_KERNEL = 1 << 5
_FLAG_EXCLUDE_HV = 1 << 6
_FLAG_EXCLUDE_HOST = 1 << 19
_FLAG_EXCLUDE_GUEST = 1 << 20
_READ_FORMAT_TIMES = 0x1 | 0x2  # TOTAL_TIME_ENABLED | TOTAL_TIME_RUNNING
_READING = struct.Struct("=QQQ")
_SYSCALL_NUMBERS = {"x86_64": 298, "aarch64": 241}

#: which part of a thread's execution a hardware counter counts
GUEST, HOST = "guest", "host"


@dataclass(frozen=True, slots=True)
class CounterEvent:
    """One counter: ``name`` as shown ("task-clock", "cycles:guest"), perf type/config, and for
    hardware events which side (GUEST or HOST) it counts, "" for software events."""

    name: str
    type: int
    config: int
    side: str = ""

    @property
    def hardware(self) -> bool:
        return self.type == PERF_TYPE_HARDWARE


SOFTWARE_EVENTS = {
    "task-clock": 1,  # PERF_COUNT_SW_TASK_CLOCK, ns
    "page-faults": 2,
    "context-switches": 3,
    "cpu-migrations": 4,
}
HARDWARE_EVENTS = {
    "cycles": 0,
    "instructions": 1,
    "llc-misses": 3,  # PERF_COUNT_HW_CACHE_MISSES: last-level cache misses on x86
    "branch-misses": 5,
}
DEFAULT_EVENT_NAMES = (*SOFTWARE_EVENTS, *HARDWARE_EVENTS)


def parse_events(text: str) -> list[CounterEvent]:
    """``--events`` value: comma-separated names; a hardware name without ``:guest``/``:host``
    means both sides. "default" is every event, "software"/"hardware" each group; "" or "none"
    is no counters at all."""
    events: list[CounterEvent] = []
    for item in (part.strip() for part in text.split(",")):
        if not item or item == "none":
            continue
        if item in ("default", "all"):
            names: tuple[str, ...] = DEFAULT_EVENT_NAMES
        elif item == "software":
            names = tuple(SOFTWARE_EVENTS)
        elif item == "hardware":
            names = tuple(HARDWARE_EVENTS)
        else:
            names = (item,)
        for name in names:
            events.extend(_expand(name))
    unique: dict[str, CounterEvent] = {event.name: event for event in events}
    return list(unique.values())


def _expand(name: str) -> list[CounterEvent]:
    base, _, side = name.partition(":")
    if base in SOFTWARE_EVENTS and not side:
        return [CounterEvent(base, PERF_TYPE_SOFTWARE, SOFTWARE_EVENTS[base])]
    if base in HARDWARE_EVENTS and side in ("", GUEST, HOST):
        sides = (side,) if side else (GUEST, HOST)
        return [CounterEvent(f"{base}:{s}", PERF_TYPE_HARDWARE, HARDWARE_EVENTS[base], s) for s in sides]
    known = ", ".join([*SOFTWARE_EVENTS, *(f"{h}[:guest|:host]" for h in HARDWARE_EVENTS)])
    raise ConfigError(
        f"--events: unknown counter {name!r} (known: {known}, default, software, hardware, none)"
    )


class _PerfEventAttr(ctypes.Structure):
    # the first fields of struct perf_event_attr (PERF_ATTR_SIZE_VER1, 72 bytes); the bit
    # fields from "disabled" to "exclude_guest" share one u64
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
    ]


#: (attr, tid, flags) -> fd or -errno; replaceable so tests can play a host without a PMU
OpenFunction = Callable[[CounterEvent, int, int], int]

_libc: ctypes.CDLL | None = None


def syscall_open(event: CounterEvent, tid: int, flags: int) -> int:
    global _libc
    number = _SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        return -errno.ENOSYS
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    attr = _PerfEventAttr()
    attr.type = event.type
    attr.size = ctypes.sizeof(_PerfEventAttr)
    attr.config = event.config
    attr.read_format = _READ_FORMAT_TIMES
    attr.flags = flags
    fd = int(_libc.syscall(number, ctypes.byref(attr), tid, -1, -1, 0x8))  # PERF_FLAG_FD_CLOEXEC
    return fd if fd >= 0 else -ctypes.get_errno()


def paranoid_level() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip())
    except (OSError, ValueError):
        return None


def explain_errno(event: CounterEvent, code: int) -> str:
    """Why ``perf_event_open`` refused ``event``, in words a user can act on."""
    name = errno.errorcode.get(code, str(code))
    if code in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENODEV) and event.hardware:
        return f"no hardware PMU on this host (perf_event_open: {name})"
    if code in (errno.EACCES, errno.EPERM):
        level = paranoid_level()
        setting = f"kernel.perf_event_paranoid is {level}" if level is not None else "perf_event_paranoid"
        return f"not permitted ({setting}; lower it or run with CAP_PERFMON) (perf_event_open: {name})"
    if code == errno.ENOSYS:
        return "perf_event_open is not available here (seccomp, container or architecture) (ENOSYS)"
    if code == errno.EINVAL and event.side:
        excluded = HOST if event.side == GUEST else GUEST
        return f"the PMU cannot count {event.side} time apart (exclude_{excluded}) (EINVAL)"
    if code == errno.ESRCH:
        return "the thread ended before its counter was opened (ESRCH)"
    if code in (errno.EMFILE, errno.ENFILE):
        return f"out of file descriptors (perf_event_open: {name})"
    return f"perf_event_open failed: {os.strerror(code)} ({name})"


@dataclass(slots=True)
class CounterReading:
    """A counter's value, scaled when the PMU multiplexed it, and how long it was enabled/running."""

    value: int
    enabled_ns: int
    running_ns: int


class ThreadCounter:
    """One open counter on one thread."""

    def __init__(self, event: CounterEvent, tid: int, open_function: OpenFunction = syscall_open) -> None:
        self.event = event
        self.tid = tid
        #: True when perf_event_paranoid allowed only user-space counting
        self.user_only = False
        flags = 0
        if event.side == GUEST:
            flags |= _FLAG_EXCLUDE_HOST
        elif event.side == HOST:
            flags |= _FLAG_EXCLUDE_GUEST
        result = open_function(event, tid, flags)
        if result in (-errno.EACCES, -errno.EPERM):
            # perf_event_paranoid >= 2 still allows counting a thread's user-space part
            retry = open_function(event, tid, flags | _FLAG_EXCLUDE_KERNEL | _FLAG_EXCLUDE_HV)
            if retry >= 0:
                result, self.user_only = retry, True
        if result < 0:
            raise CounterUnavailableError(event.name, explain_errno(event, -result), -result)
        self._fd: int | None = result
        self.last = CounterReading(0, 0, 0)

    def read(self) -> CounterReading:
        """The current (or, once closed, the last) reading."""
        if self._fd is None:
            return self.last
        try:
            raw, enabled, running = _READING.unpack(os.read(self._fd, _READING.size))
        except OSError:
            return self.last
        value = raw if running in (0, enabled) else int(raw * enabled / running)
        self.last = CounterReading(value, enabled, running)
        return self.last

    def close(self) -> None:
        if self._fd is not None:
            self.read()
            os.close(self._fd)
            self._fd = None
