"""Decoding the exit half of the kvm_run page: the one place that knows its byte layout.

The hot path reads IO and MMIO exits straight from the mmap'd page with precompiled
``struct.Struct`` objects (one ``unpack_from`` per exit, no ctypes attribute walks). Their
formats and offsets are derived here from the ctypes mirrors in :mod:`vmscope.kvm.structs`,
which tests/unit/test_kvm_abi.py checks against linux/kvm.h, so there is no second copy of
the layout to drift. Rare exits are decoded into a :class:`RareExit` value that pure code
can decide on without touching KVM.
"""

from __future__ import annotations

import ctypes
import struct
from typing import NamedTuple

from vmscope.kvm import constants as c
from vmscope.kvm import structs as s

_CTYPE_FORMATS: dict[type, str] = {
    ctypes.c_uint8: "B",
    ctypes.c_uint16: "H",
    ctypes.c_uint32: "I",
    ctypes.c_uint64: "Q",
}


def _struct_for(ctype: type[ctypes.Structure], fields: tuple[str, ...]) -> struct.Struct:
    """A little-endian Struct reading ``fields`` of ``ctype`` at their ctypes offsets.

    Gaps between fields become pad bytes, byte arrays become ``Ns``; the Struct starts at the
    structure's first byte, so ``unpack_from(page, union_offset)`` reads it in place.
    """
    layout = {name: typ for name, typ in ctype._fields_}  # type: ignore[misc]
    parts = ["<"]
    position = 0
    for name in fields:
        descriptor = getattr(ctype, name)
        if descriptor.offset < position:
            raise ValueError(f"{ctype.__name__}.{name}: fields must be given in layout order")
        if descriptor.offset > position:
            parts.append(f"{descriptor.offset - position}x")
        field_type = layout[name]
        if issubclass(field_type, ctypes.Array):
            parts.append(f"{descriptor.size}s")
        else:
            parts.append(_CTYPE_FORMATS[field_type])
        position = descriptor.offset + descriptor.size
    return struct.Struct("".join(parts))


#: byte offset of kvm_run.exit_reason (a u32; its low byte is the reason for every reason < 256)
EXIT_REASON_OFFSET: int = s.kvm_run.exit_reason.offset
#: byte offset of the exit union inside kvm_run
EXIT_UNION_OFFSET: int = s.kvm_run.exit.offset
#: kvm_run.io: direction, size, port, count, data_offset
IO_EXIT = _struct_for(s._exit_io, ("direction", "size", "port", "count", "data_offset"))
#: kvm_run.mmio: phys_addr, data[8], len, is_write
MMIO_EXIT = _struct_for(s._exit_mmio, ("phys_addr", "data", "len", "is_write"))
#: offset, inside kvm_run, of the mmio data bytes a read exit must fill in
MMIO_DATA_OFFSET: int = EXIT_UNION_OFFSET + s._exit_mmio.data.offset


class RareExit(NamedTuple):
    """Every exit other than IO and MMIO, as plain data (built by :func:`decode_rare_exit`)."""

    reason: int
    #: SYSTEM_EVENT: its type; INTERNAL_ERROR: suberror; FAIL_ENTRY: hardware reason; else 0
    code: int = 0
    #: DEBUG: the guest pc of the debug exception; else 0
    pc: int = 0
    #: INTERNAL_ERROR emulation failures: the instruction bytes KVM reported (may be empty)
    instruction: bytes = b""

    @property
    def reason_name(self) -> str:
        try:
            return c.ExitReason(self.reason).name
        except ValueError:
            return str(self.reason)


def emulation_failure_bytes(run: s.kvm_run) -> bytes:
    """The failing instruction's bytes after an emulation-failure exit, when KVM supplied them
    (hosts with KVM_CAP_EXIT_ON_EMULATION_FAILURE enabled); else empty."""
    failure = run.exit.emulation_failure
    if failure.suberror != c.INTERNAL_ERROR_EMULATION or failure.ndata < 3:
        return b""
    if not failure.flags & c.INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        return b""
    return bytes(failure.insn_bytes)[: min(int(failure.insn_size), 15)]


def decode_rare_exit(run: s.kvm_run) -> RareExit:
    """Copy what the VMM needs of a non-IO/MMIO exit out of the shared page."""
    reason = int(run.exit_reason)
    exit_union = run.exit
    if reason == c.ExitReason.SYSTEM_EVENT:
        return RareExit(reason, code=int(exit_union.system_event.type))
    if reason == c.ExitReason.INTERNAL_ERROR:
        return RareExit(
            reason, code=int(exit_union.internal.suberror), instruction=emulation_failure_bytes(run)
        )
    if reason == c.ExitReason.FAIL_ENTRY:
        return RareExit(reason, code=int(exit_union.fail_entry.hardware_entry_failure_reason))
    if reason == c.ExitReason.DEBUG:
        return RareExit(reason, pc=int(exit_union.debug.pc))
    return RareExit(reason)
