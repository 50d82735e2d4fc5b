"""A loadable module's own ORC tables, read from its ``struct module`` in guest memory.

With CONFIG_UNWINDER_ORC, x86's ``struct mod_arch_specific`` (``module.arch``) holds ``num_orcs``,
``orc_unwind_ip`` and ``orc_unwind``: the module's copies of the two sections, in vmlinux's formats
(s32 entries relative to their own address; 6-byte entries). The kernel sorts them when it loads
the module (``unwind_module_init``), keeping each s32 relative to its new place, so they are read
as they lie. Their addresses are run-time ones: no KASLR slide applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmscope.errors import KernelTableError
from vmscope.profiler.kernel.btf import Btf
from vmscope.profiler.unwinders.base import BytesReader, WordReader
from vmscope.profiler.unwinders.orc import OrcTable
from vmscope.symbols import KERNEL_ADDRESS_START

_TABLE = "module ORC"
#: bounds the two reads of one module's table to 10 MiB (4 + 6 bytes an entry); a sane count is far below
MAX_MODULE_ORCS = 1 << 20
_ORC_ENTRY_SIZE = 6


@dataclass(frozen=True, slots=True)
class ModuleOrcLayout:
    """Offsets in ``struct module`` of ``arch.num_orcs``, ``arch.orc_unwind_ip``, ``arch.orc_unwind``."""

    count: int
    ips: int
    entries: int

    @classmethod
    def from_btf(cls, btf: Btf) -> ModuleOrcLayout | None:
        """None for a kernel without the members (not built with the ORC unwinder)."""
        try:
            return cls(
                btf.field("module", "arch.num_orcs").offset,
                btf.field("module", "arch.orc_unwind_ip").offset,
                btf.field("module", "arch.orc_unwind").offset,
            )
        except KernelTableError:
            return None


def read_module_orc(read: WordReader, read_bytes: BytesReader, layout: ModuleOrcLayout, module: int,
                    text: tuple[int, int], format_version: int | None = None) -> OrcTable:  # fmt: skip
    """The ORC table of the ``struct module`` at ``module`` whose text is ``text`` (start, end);
    ``format_version``: the kernel image's. Raises :class:`KernelTableError` when the table is
    absent, too large, unreadable or not about that text."""
    count_word = read(module + layout.count)
    ips, entries = read(module + layout.ips), read(module + layout.entries)
    if count_word is None or ips is None or entries is None:
        raise KernelTableError(_TABLE, f"struct module at {module:#x} is unreadable")
    count = count_word & 0xFFFF_FFFF  # an unsigned int
    if count == 0:
        raise KernelTableError(_TABLE, "the module has no ORC entries")
    if count > MAX_MODULE_ORCS:
        raise KernelTableError(_TABLE, f"num_orcs {count} is over {MAX_MODULE_ORCS}")
    if ips < KERNEL_ADDRESS_START or entries < KERNEL_ADDRESS_START:
        raise KernelTableError(_TABLE, f"tables at {ips:#x}/{entries:#x} are not kernel addresses")
    ip_section, unwind_section = read_bytes(ips, 4 * count), read_bytes(entries, _ORC_ENTRY_SIZE * count)
    if ip_section is None or unwind_section is None:
        raise KernelTableError(_TABLE, f"{count} entries at {ips:#x}/{entries:#x} are not all mapped")
    table = OrcTable.from_sections(ip_section, ips, unwind_section, format_version)
    start, end = text
    if table.start >= end or table.end < start:  # another module's table, or garbage that sorts
        raise KernelTableError(_TABLE, f"entries {table.start:#x}..{table.end:#x} miss the text {start:#x}")
    return table
