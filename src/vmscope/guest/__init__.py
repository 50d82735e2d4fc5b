"""Bundled guests, built from source with the system toolchain (see :mod:`vmscope.guest.build`).

``runtime/`` is a small freestanding PVH runtime (entry in 32-bit protected mode, switch to long
mode, GDT/IDT/TSS, serial console, printf, options, ``run_in_user_mode``); a guest links its own
``guest_main(cmdline)`` with it through :func:`build_runtime_guest`.

``demo/`` is the demo guest (:func:`demo_guest`). It prints ``vmscope demo guest``, the hypervisor
signature of CPUID leaf 0x40000000, the command line and the PVH memory map, then runs
``run_workload`` at CPL3, which calls ``compute_primes``, ``checksum_buffer`` (-> ``crc32``) and
``matrix_multiply`` ``iterations`` times (command line ``iterations=N``, default 5;
``primes=LIMIT``, default 100000; ``quiet``). Per iteration it does 3 ``outb`` phase markers and 3
``outl`` results to :data:`DEMO_SCRATCH_PORT`, and 3 32-bit MMIO writes to
:data:`DEMO_MMIO_ADDRESS` + 4 * phase; at the end one 32-bit MMIO read of
:data:`DEMO_MMIO_ADDRESS`. vmscope leaves that window unclaimed: the read returns all-ones and
the accesses are counted. The demo's success exit status is :data:`DEMO_EXIT_STATUS_SUCCESS`
(33, from ``debug_exit(0x10)``); a failed self-check gives :data:`DEMO_EXIT_STATUS_SELF_CHECK_FAILED`.

Exit statuses follow isa-debug-exit: ``debug_exit(value)`` -> VMM exit status ``(value << 1) | 1``.
"""

from __future__ import annotations

from vmscope.guest.build import build_guest, build_runtime_guest, demo_guest

#: port the demo (and benchmarks) write to; nothing claims it in vmscope
DEMO_SCRATCH_PORT = 0x510
#: guest-physical MMIO window the demo touches; unclaimed in vmscope (reads as all-ones)
DEMO_MMIO_ADDRESS = 0xD000_0000
#: exit status of a successful demo run (debug_exit(0x10))
DEMO_EXIT_STATUS_SUCCESS = 33
#: exit status when one of the demo's self-checks failed (debug_exit(0x11))
DEMO_EXIT_STATUS_SELF_CHECK_FAILED = 35
#: exit status when a runtime guest took an unexpected CPU exception (debug_exit(0x7e))
RUNTIME_EXIT_STATUS_EXCEPTION = 253
#: exit status when the runtime found no valid PVH start info (debug_exit(0x7d))
RUNTIME_EXIT_STATUS_BAD_START_INFO = 251
#: names of the demo's workload functions (non-inlined, with frame pointers)
DEMO_WORKLOAD_FUNCTIONS = ("run_workload", "compute_primes", "checksum_buffer", "crc32", "matrix_multiply")

__all__ = [
    "DEMO_EXIT_STATUS_SELF_CHECK_FAILED",
    "DEMO_EXIT_STATUS_SUCCESS",
    "DEMO_MMIO_ADDRESS",
    "DEMO_SCRATCH_PORT",
    "DEMO_WORKLOAD_FUNCTIONS",
    "RUNTIME_EXIT_STATUS_BAD_START_INFO",
    "RUNTIME_EXIT_STATUS_EXCEPTION",
    "build_guest",
    "build_runtime_guest",
    "demo_guest",
]
