"""Which task a vCPU was running: the kernel's per-CPU current task pointer, read from the host.

x86-64 Linux keeps the running ``task_struct *`` in a per-CPU variable: ``current_task`` up to 6.1
(and again from 6.15), ``pcpu_hot.current_task`` in between. A per-CPU variable's kallsyms address
is its offset in the per-CPU area (absolute per-CPU symbols); the area of the CPU that runs kernel
code is the GS base. BTF gives where ``comm``, ``pid`` and ``tgid`` sit in ``task_struct``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmscope.errors import KernelTableError
from vmscope.profiler.kernel.btf import Btf
from vmscope.profiler.kernel.kallsyms import Kallsyms
from vmscope.profiler.model import TaskInfo
from vmscope.profiler.unwinders.base import WordReader

_TABLE = "task_struct"
KERNEL_HALF = 0xFFFF_8000_0000_0000
#: pid_t values above PID_MAX_LIMIT (4M) cannot be real
_PID_LIMIT = 4 * 1024 * 1024
_MASK = 0xFFFF_FFFF_FFFF_FFFF



@dataclass(frozen=True, slots=True)
class TaskLayout:
    """Everything needed to name the current task: offsets from BTF and kallsyms."""

    #: offset of the current-task pointer within the per-CPU area
    current_task_offset: int
    comm: int
    comm_size: int
    pid: int
    tgid: int

    @classmethod
    def from_kernel(cls, kallsyms: Kallsyms, btf: Btf) -> TaskLayout:
        """Find the current-task pointer and task_struct's fields; KernelTableError if absent."""
        offset = _percpu_offset(kallsyms, "current_task")
        if offset is None:
            hot = _percpu_offset(kallsyms, "pcpu_hot")
            if hot is None:
                raise KernelTableError(_TABLE, "kallsyms has neither current_task nor pcpu_hot")
            offset = hot + btf.field("pcpu_hot", "current_task").offset
        comm = btf.field("task_struct", "comm")
        pid, tgid = btf.field("task_struct", "pid"), btf.field("task_struct", "tgid")
        comm_size = btf.size_of(comm.type_id)
        if not 0 < comm_size <= 64:
            raise KernelTableError(_TABLE, f"comm is {comm_size} bytes (expected 16)")
        for name, location in (("pid", pid), ("tgid", tgid)):
            if btf.size_of(location.type_id) != 4 or location.bitfield_size:
                raise KernelTableError(_TABLE, f"{name} is not a 4-byte integer")
        return cls(offset, comm.offset, comm_size, pid.offset, tgid.offset)


def _percpu_offset(kallsyms: Kallsyms, name: str) -> int | None:
    address = kallsyms.address_of(name)
    if address is None:
        return None
    if address >= KERNEL_HALF:  # per-CPU symbols linked at __per_cpu_start (no absolute per-CPU)
        start = kallsyms.address_of("__per_cpu_start") or 0
        return address - start if start and address >= start else None
    return address


class TaskNamer:
    """Reads the current task of a CPU from guest memory; interns the results (samples of one task
    share one :class:`TaskInfo`). Any unreadable or implausible value gives None."""

    def __init__(self, layout: TaskLayout) -> None:
        self.layout = layout
        self._known: dict[tuple[str, int, int], TaskInfo] = {}
        self.failures = 0

    def current(self, read: WordReader, percpu_base: int) -> TaskInfo | None:
        layout = self.layout
        task = read((percpu_base + layout.current_task_offset) & _MASK)
        if task is None or task < KERNEL_HALF or task & 7:
            self.failures += 1
            return None
        comm = self._comm(read, task)
        pid_word = read(task + layout.pid)
        tgid_word = pid_word if layout.tgid == layout.pid + 4 else read(task + layout.tgid)
        if comm is None or pid_word is None or tgid_word is None:
            self.failures += 1
            return None
        pid = pid_word & 0xFFFF_FFFF
        tgid = (tgid_word >> 32) if layout.tgid == layout.pid + 4 else tgid_word & 0xFFFF_FFFF
        if pid >= _PID_LIMIT or tgid >= _PID_LIMIT:
            self.failures += 1
            return None
        key = (comm, pid, tgid)
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = TaskInfo(comm, pid, tgid)
        return known

    def _comm(self, read: WordReader, task: int) -> str | None:
        raw = bytearray()
        for offset in range(0, self.layout.comm_size, 8):
            word = read(task + self.layout.comm + offset)
            if word is None:
                return None
            raw += word.to_bytes(8, "little")
        end = raw.find(0, 0, self.layout.comm_size)
        if end <= 0:  # empty or unterminated: not a task_struct
            return None
        text = bytes(raw[:end])
        if any(c < 0x20 or c == 0x7F for c in text):
            return None
        return text.decode("utf-8", "replace")


def kernel_gs_base(gs_base: int, cached: int | None) -> int | None:
    """The kernel's per-CPU base at a kernel-mode sample: the live GS base once it points into the
    kernel half (between ``swapgs`` instructions it still holds the user's, so the cache stands in)."""
    return gs_base if gs_base >= KERNEL_HALF else cached
