"""seccomp sandbox: after set-up each vmscope thread kind runs under its own system-call allow-list.

``configure(mode)`` chooses for the process: ``"on"`` (a forbidden call stops vmscope with a message
naming the call and the thread, exit status 159 = 128 + SIGSYS), ``"log"`` (allowed, but the kernel
logs it: ``dmesg | grep 'type=1326'``; for finding gaps in the lists) or ``"off"``. Each thread then
calls :func:`enter` with its kind (see :mod:`vmscope.sandbox.policy`) once its set-up is done; a
seccomp filter binds the calling thread and the threads it creates afterwards, and cannot be removed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
import threading
from typing import Literal

from vmscope.errors import ConfigError
from vmscope.sandbox import libseccomp
from vmscope.sandbox.policy import KVMIO, POLICIES

log = logging.getLogger("vmscope.sandbox")

SeccompMode = Literal["on", "log", "off"]
MODES: tuple[SeccompMode, ...] = ("on", "log", "off")
#: 128 + SIGSYS, as a shell reports a process killed by it
FORBIDDEN_CALL_STATUS = 128 + 31

_mode: SeccompMode = "off"
_lock = threading.Lock()
_sigsys_handler: object = None  # keeps the ctypes callback alive
_syscall_names: dict[int, str] = {}
_CLONE_THREAD = 0x0001_0000
_PR_GET_NAME = 16
#: open flags that write or create: O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND | O_TMPFILE's bit
_OPEN_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | 0o20000000


def configure(mode: str) -> None:
    """Set the process's sandbox mode; ``on`` also installs the handler that reports a forbidden call."""
    global _mode
    if mode not in MODES:
        raise ConfigError(f"--seccomp {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "off" and not libseccomp.available():
        raise ConfigError(
            "--seccomp: libseccomp.so.2 is not installed (apt-get install libseccomp2), or use --seccomp off"
        )
    with _lock:
        _mode = mode
        if mode != "off":
            # A module imported lazily on a vCPU or I/O thread (a crash report's, say) would have
            # its bytecode cache written there, and those threads may not open files for writing:
            # the filter would stop the VMM. Cache files are an optimisation; skip them.
            sys.dont_write_bytecode = True
        if mode == "on" and _sigsys_handler is None:
            _install_sigsys_handler()


def mode() -> SeccompMode:
    return _mode


def enter(kind: str) -> bool:
    """Bind the calling thread to the allow-list of ``kind``; False when the sandbox is off."""
    if _mode == "off":
        return False
    policy = POLICIES[kind]
    default = libseccomp.ACT_TRAP if _mode == "on" else libseccomp.ACT_LOG
    rules = libseccomp.Filter(default)
    try:
        for name in policy.syscalls:
            number = libseccomp.syscall_number(name)
            if number is not None:
                rules.allow(number)
        ioctl = libseccomp.syscall_number("ioctl")
        assert ioctl is not None
        if policy.kvm_ioctls:
            rules.allow(ioctl, argument=1, value=KVMIO << 8, mask=0xFF00)
        for request in policy.extra_ioctls:
            rules.allow(ioctl, argument=1, value=request)
        if policy.read_only_open:
            openat = libseccomp.syscall_number("openat")
            assert openat is not None
            rules.allow(openat, argument=2, value=0, mask=_OPEN_WRITE_FLAGS)
        if policy.threads:
            clone = libseccomp.syscall_number("clone")
            clone3 = libseccomp.syscall_number("clone3")
            assert clone is not None and clone3 is not None
            rules.allow(clone, argument=0, value=_CLONE_THREAD, mask=_CLONE_THREAD)
            # clone3 passes its flags in memory a filter cannot read: refuse it, glibc falls back to clone
            rules.refuse(clone3, errno.ENOSYS)
        rules.load()
    except OSError as error:
        raise ConfigError(f"--seccomp: cannot load the {kind} thread's filter: {error}") from None
    finally:
        rules.close()
    log.debug("seccomp (%s) filter loaded for the %s thread %s", _mode, kind, threading.current_thread().name)
    return True


def enter_or_log(kind: str) -> None:
    """:func:`enter` for helper threads: a filter that cannot be loaded is logged, the thread goes on."""
    try:
        enter(kind)
    except ConfigError as error:
        log.error("%s: %s", threading.current_thread().name, error)


class _SigInfo(ctypes.Structure):
    # siginfo_t for SIGSYS on x86-64: signo, errno, code, padding, then _sigsys {call_addr, syscall, arch}
    _fields_ = [
        ("signo", ctypes.c_int),
        ("errno", ctypes.c_int),
        ("code", ctypes.c_int),
        ("_pad", ctypes.c_int),
        ("call_addr", ctypes.c_void_p),
        ("syscall", ctypes.c_int),
        ("arch", ctypes.c_uint),
    ]


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(_SigInfo), ctypes.c_void_p)


class _SigAction(ctypes.Structure):
    _fields_ = [
        ("handler", _HANDLER),
        ("mask", ctypes.c_uint64 * 16),
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    ]


_SA_SIGINFO = 4
_SIGSYS = 31


def _on_forbidden_call(signal_number: int, info: ctypes._Pointer[_SigInfo], context: int | None) -> None:
    """Runs in the thread that made the call; only write(2), prctl(2) and exit_group(2) from here."""
    number = info.contents.syscall
    name = _syscall_names.get(number, f"system call {number}")
    thread = ctypes.create_string_buffer(16)
    _libc.prctl(_PR_GET_NAME, thread, 0, 0, 0)
    message = (
        f"vmscope: seccomp: thread {thread.value.decode(errors='replace')!r} made the forbidden system call "
        f"{name} ({number}); stopping (rerun with --seccomp log to see every such call, or --seccomp off)\n"
    )
    os.write(2, message.encode())
    os._exit(FORBIDDEN_CALL_STATUS)


_libc = ctypes.CDLL(None, use_errno=True)


def _install_sigsys_handler() -> None:
    global _sigsys_handler
    for number in range(512):
        _syscall_names[number] = libseccomp.syscall_name(number)
    handler = _HANDLER(_on_forbidden_call)
    action = _SigAction()
    action.handler = handler
    action.flags = _SA_SIGINFO
    if _libc.sigaction(_SIGSYS, ctypes.byref(action), None) != 0:
        raise ConfigError(
            f"--seccomp on: cannot install the SIGSYS handler: {os.strerror(ctypes.get_errno())}"
        )
    _sigsys_handler = handler
