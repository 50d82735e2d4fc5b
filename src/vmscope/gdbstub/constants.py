"""Numbers the GDB stub's parts share: gdb signal numbers, debug-register bits, replies, limits."""

from __future__ import annotations

import errno

from vmscope.gdbstub import protocol as p

# gdb's signal numbers (GDB_SIGNAL_*), which the stop replies carry
SIGINT, SIGTRAP, SIGKILL, SIGSEGV = 2, 5, 9, 11
#: exit status of a VM ended by gdb's kill, following the machine's 128 + signal convention
KILLED_EXIT_STATUS = 128 + SIGKILL

HW_SLOTS = 4
DR6_SINGLE_STEP = 1 << 14
DR7_RESERVED_ONE = 1 << 10
#: the most bytes one m/M/X transfers (a hex reply doubles them; PacketSize bounds it)
MAX_MEMORY_TRANSFER = (p.MAX_PACKET_SIZE - 32) // 2

EFAULT_REPLY = b"E%02x" % errno.EFAULT
EINVAL_REPLY = b"E%02x" % errno.EINVAL
ENOSPC_REPLY = b"E%02x" % errno.ENOSPC
ESRCH_REPLY = b"E%02x" % errno.ESRCH
EIO_REPLY = b"E%02x" % errno.EIO
OK = b"OK"

#: how long a stop waits for every vCPU to leave KVM_RUN before it goes on regardless
PARK_TIMEOUT_S = 10.0
