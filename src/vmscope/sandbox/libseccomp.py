"""A thin ctypes layer over libseccomp.so.2: build a filter of allowed system calls and load it.

Only what vmscope uses: a default action, allow rules (optionally on one argument compared under
a mask, for ioctl request numbers), and loading the filter into the calling thread. libseccomp
compiles the rules to BPF; nothing here assembles BPF by hand.
"""

from __future__ import annotations

import ctypes
import functools

from vmscope.errors import ConfigError

# actions (seccomp.h)
ACT_KILL_PROCESS = 0x8000_0000
ACT_TRAP = 0x0003_0000
ACT_LOG = 0x7FFC_0000
ACT_ALLOW = 0x7FFF_0000


def act_errno(number: int) -> int:
    return 0x0005_0000 | (number & 0xFFFF)


# struct scmp_arg_cmp operators
CMP_EQ = 4
CMP_MASKED_EQ = 7

# filter attributes
_FLTATR_CTL_NNP = 3  # set no_new_privs when loading (needed without CAP_SYS_ADMIN)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.cache
def _library() -> ctypes.CDLL:
    # The soname directly: ctypes.util.find_library would run ldconfig in a subprocess (start-up time)
    try:
        library = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        raise ConfigError(
            "--seccomp: libseccomp.so.2 is not installed (apt-get install libseccomp2), or use --seccomp off"
        ) from None
    library.seccomp_init.argtypes = [ctypes.c_uint32]
    library.seccomp_init.restype = ctypes.c_void_p
    library.seccomp_release.argtypes = [ctypes.c_void_p]
    library.seccomp_release.restype = None
    library.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]  # fmt: skip
    library.seccomp_rule_add_array.restype = ctypes.c_int
    library.seccomp_load.argtypes = [ctypes.c_void_p]
    library.seccomp_load.restype = ctypes.c_int
    library.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    library.seccomp_attr_set.restype = ctypes.c_int
    library.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    library.seccomp_syscall_resolve_name.restype = ctypes.c_int
    library.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
    library.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p  # malloc'd char *
    return library


def available() -> bool:
    try:
        _library()
    except ConfigError:
        return False
    return True


def syscall_number(name: str) -> int | None:
    """The native number of system call ``name``; None where this architecture has no such call."""
    number = _library().seccomp_syscall_resolve_name(name.encode())
    return number if number >= 0 else None


def syscall_name(number: int) -> str:
    pointer = _library().seccomp_syscall_resolve_num_arch(0, number)  # 0: the native architecture
    if not pointer:
        return f"syscall {number}"
    name = ctypes.string_at(pointer).decode()
    _libc().free(ctypes.c_void_p(pointer))
    return name


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


class Filter:
    """One seccomp filter under construction; :meth:`load` applies it to the calling thread."""

    def __init__(self, default_action: int) -> None:
        self._context = _library().seccomp_init(default_action)
        if not self._context:
            raise OSError("seccomp_init failed")
        # no_new_privs is what lets an unprivileged process load a filter; harmless as root
        _library().seccomp_attr_set(self._context, _FLTATR_CTL_NNP, 1)

    def allow(
        self, number: int, argument: int | None = None, value: int = 0, mask: int | None = None
    ) -> None:
        """Allow system call ``number``; with ``argument``, only when that argument equals ``value``
        (after ``mask``, when given)."""
        if argument is None:
            status = _library().seccomp_rule_add_array(self._context, ACT_ALLOW, number, 0, None)
        else:
            if mask is None:
                comparison = _ArgCmp(argument, CMP_EQ, value, 0)
            else:  # libseccomp: datum_a is the mask, datum_b the value
                comparison = _ArgCmp(argument, CMP_MASKED_EQ, mask, value)
            status = _library().seccomp_rule_add_array(
                self._context, ACT_ALLOW, number, 1, ctypes.byref(comparison)
            )
        if status < 0:
            raise OSError(-status, f"seccomp_rule_add({number}) failed")

    def refuse(self, number: int, errno_value: int) -> None:
        """Make system call ``number`` fail with ``errno_value`` instead of trapping."""
        status = _library().seccomp_rule_add_array(self._context, act_errno(errno_value), number, 0, None)
        if status < 0:
            raise OSError(-status, f"seccomp_rule_add({number}) failed")

    def load(self) -> None:
        status = _library().seccomp_load(self._context)
        if status < 0:
            raise OSError(-status, "seccomp_load failed")

    def close(self) -> None:
        if self._context:
            _library().seccomp_release(self._context)
            self._context = None
