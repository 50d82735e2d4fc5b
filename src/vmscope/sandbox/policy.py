"""Which system calls each kind of vmscope thread may make once the machine runs.

Firecracker-style: one allow-list per thread kind. Python itself needs memory management, futexes,
signals and clocks in every thread (the ``COMMON`` set). Anything not listed traps (``on``) or is
logged by the kernel (``log``): execve, fork, ptrace, mount, new sockets, opening files from a vCPU
or I/O thread, ...
"""

from __future__ import annotations

from typing import NamedTuple

#: ioctl type byte of every KVM request (_IO(KVMIO, nr) etc.): vCPU, I/O and main threads may
#: issue KVM requests only, on descriptors they already hold
KVMIO = 0xAE
#: terminal queries Python and rich make on stdio (TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO)
TERMINAL_IOCTLS = (0x5401, 0x5413, 0x541B, 0x5421)

COMMON = (
    # memory
    "brk", "mmap", "munmap", "mprotect", "mremap", "madvise",
    # threads, locks, signals
    "futex", "set_robust_list", "rseq", "sched_yield", "gettid", "getpid", "tgkill",
    "rt_sigreturn", "rt_sigprocmask", "rt_sigaction", "sigaltstack", "restart_syscall",
    "exit", "exit_group", "prctl",
    # a thread started by a filtered thread (an I/O thread restarted after a snapshot, started by
    # the control thread) loads its own, narrower filter: filters only ever add restrictions
    "seccomp",
    # time
    "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday", "getrusage", "times",
    # I/O on descriptors already open
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
    "pwritev2", "lseek", "close", "fstat", "newfstatat", "fcntl", "dup", "getrandom",
    "poll", "ppoll", "select", "pselect6", "epoll_wait", "epoll_pwait", "epoll_ctl",
    # Python's selectors module creates an epoll instance when it is imported (a lazy import of
    # subprocess, e.g. through capstone, on a vCPU thread); an epoll fd reaches nothing by itself
    "epoll_create1",
    "recvfrom", "sendto", "recvmsg", "sendmsg",
)  # fmt: skip

#: Python imports lazily (capstone for a crash report, a symbol file on first use): vCPU and I/O
#: threads may open files read-only (openat with O_RDONLY, no O_CREAT/O_TRUNC); never create or
#: write one
READ_FILES = (
    "getcwd", "readlink", "readlinkat", "statx", "getdents64", "fstatfs", "statfs", "stat", "lstat",
    "access", "faccessat", "faccessat2", "getuid", "geteuid", "getgid", "getegid", "getppid", "uname",
    "sysinfo", "sched_getaffinity",
)  # fmt: skip

#: disk and network backends: flushes, discards, sockets already bound
DEVICE_IO = ("fsync", "fdatasync", "fallocate", "getsockopt", "setsockopt", "shutdown")

#: the control socket's thread accepts clients on its listening socket
CONTROL = ("accept", "accept4", "getsockname", "getpeername", "shutdown", "getsockopt", "setsockopt")

#: the main thread waits, stops the machine, and writes results (profiles, reports) afterwards
MAIN = (
    "openat", "open", "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir", "mkdirat",
    "chmod", "fchmod", "fchmodat", "fsync", "fdatasync", "getdents64", "readlink", "readlinkat",
    "access", "faccessat", "faccessat2", "getcwd", "statfs", "fstatfs", "stat", "lstat", "statx",
    "umask", "getuid", "geteuid", "getgid", "getegid", "sysinfo", "uname", "eventfd2", "pipe2",
    "ftruncate", "sched_getaffinity",
)  # fmt: skip


class ThreadPolicy(NamedTuple):
    kind: str
    syscalls: tuple[str, ...]
    #: ioctl request numbers allowed besides KVM's (matched exactly)
    extra_ioctls: tuple[int, ...] = ()
    kvm_ioctls: bool = True
    #: may start threads (clone with CLONE_THREAD only: never a new process)
    threads: bool = False
    #: may open files only for reading (the file syscalls of MAIN allow any open)
    read_only_open: bool = False


POLICIES = {
    "vcpu": ThreadPolicy("vcpu", COMMON + DEVICE_IO + READ_FILES, TERMINAL_IOCTLS, read_only_open=True),
    "io": ThreadPolicy("io", COMMON + DEVICE_IO + READ_FILES, TERMINAL_IOCTLS, read_only_open=True),
    # profile-start imports the recorder and starts a sampler thread; profile-dump writes a file
    "control": ThreadPolicy("control", COMMON + DEVICE_IO + CONTROL + MAIN, TERMINAL_IOCTLS, threads=True),
    "main": ThreadPolicy("main", COMMON + DEVICE_IO + CONTROL + MAIN, TERMINAL_IOCTLS, threads=True),
}
