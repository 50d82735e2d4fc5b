"""Per-vCPU kernel state the recorder keeps between samples: the kernel's GS base (for the current
task) and the cost of finding it.

At a kernel-mode sample the GS base comes free with the sync registers. At a user-mode sample the
kernel's GS base is parked in MSR_KERNEL_GS_BASE, which takes a vCPU ioctl (~9 us on
software-virtualization hosts) to read; it only changes while per-CPU areas are set up in early
boot, so the value seen at the last kernel-mode sample stands in, and the MSR is read only while
nothing is cached (and then at most once per ``msr_retry`` samples while it holds no kernel address).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vmscope.profiler.kernel.tasks import KERNEL_HALF, TaskNamer
from vmscope.profiler.model import TaskInfo
from vmscope.profiler.unwinders.base import WordReader

MSR_KERNEL_GS_BASE = 0xC000_0102


class VcpuKernelState:
    def __init__(
        self, namer: TaskNamer, read_kernel_gs_msr: Callable[[], int | None], msr_retry: int = 64
    ) -> None:
        self.namer = namer
        self._read_msr = read_kernel_gs_msr
        self.msr_retry = msr_retry
        self.kernel_gs_base: int | None = None
        self.msr_reads = 0
        self.lookups = 0
        self.named = 0
        self.lookup_ns = 0
        self._msr_misses = 0

    def per_cpu_base(self, cpl: int, gs_base: int) -> int | None:
        if cpl == 0 and gs_base >= KERNEL_HALF:
            self.kernel_gs_base = gs_base
            return gs_base
        if self.kernel_gs_base is not None:
            return self.kernel_gs_base
        # user mode (or kernel entry before swapgs) with nothing cached: ask the MSR, sparingly
        self._msr_misses += 1
        if (self._msr_misses - 1) % self.msr_retry:
            return None
        self.msr_reads += 1
        value = self._read_msr()
        if value is not None and value >= KERNEL_HALF:
            self.kernel_gs_base = value
            return value
        return None

    def current_task(self, cpl: int, gs_base: int, read: WordReader,
                     kernel_read: WordReader | None = None) -> TaskInfo | None:  # fmt: skip
        """The running task; ``kernel_read`` is tried when ``read`` (the sample's page tables) cannot
        reach kernel data, as with user page tables under page-table isolation."""
        started = time.perf_counter_ns()
        self.lookups += 1
        task: TaskInfo | None = None
        base = self.per_cpu_base(cpl, gs_base)
        if base is not None:
            task = self.namer.current(read, base)
            if task is None and kernel_read is not None:
                task = self.namer.current(kernel_read, base)
        if task is not None:
            self.named += 1
        self.lookup_ns += time.perf_counter_ns() - started
        return task
