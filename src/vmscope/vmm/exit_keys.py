"""Exit keys: one int per (exit reason, access, port or address), and their names.

The exit loop files every exit under an int key so that its statistics dict hashes cheaply:
``reason << 56 | access << 52 | address`` (address is the port for IO, the guest-physical
address for MMIO, 0 otherwise). Everything that shows exits to a person (profiler, control
socket, hooks, reports) decodes keys here, so the encoding lives in one place.
"""

from __future__ import annotations

from typing import NamedTuple

from vmscope.kvm import constants as c

ACCESS_NONE, ACCESS_IN, ACCESS_OUT, ACCESS_READ, ACCESS_WRITE = 0, 1, 2, 3, 4
# Writes KVM queued in its coalesced ring (vmm.coalescing) instead of exiting: the same reason
# and port/address as the exit they replace, a distinct access, so a report shows how many
# writes never left the guest and exit counts stay the number of real KVM_RUN returns.
ACCESS_OUT_COALESCED, ACCESS_WRITE_COALESCED = 5, 6
ACCESS_NAMES = ("", "in", "out", "read", "write", "out coalesced", "write coalesced")

REASON_SHIFT = 56
ACCESS_SHIFT = 52
ADDRESS_MASK = (1 << ACCESS_SHIFT) - 1

IO_OUT_KEY = (c.ExitReason.IO << REASON_SHIFT) | (ACCESS_OUT << ACCESS_SHIFT)
IO_IN_KEY = (c.ExitReason.IO << REASON_SHIFT) | (ACCESS_IN << ACCESS_SHIFT)
MMIO_WRITE_KEY = (c.ExitReason.MMIO << REASON_SHIFT) | (ACCESS_WRITE << ACCESS_SHIFT)
MMIO_READ_KEY = (c.ExitReason.MMIO << REASON_SHIFT) | (ACCESS_READ << ACCESS_SHIFT)
IO_OUT_COALESCED_KEY = (c.ExitReason.IO << REASON_SHIFT) | (ACCESS_OUT_COALESCED << ACCESS_SHIFT)
MMIO_WRITE_COALESCED_KEY = (c.ExitReason.MMIO << REASON_SHIFT) | (ACCESS_WRITE_COALESCED << ACCESS_SHIFT)

_ADDRESSED_REASONS = (c.ExitReason.IO, c.ExitReason.MMIO)


class DecodedExitKey(NamedTuple):
    #: "IO", "MMIO", "HLT", ... (EXIT_<n> for reasons this build does not name)
    reason: str
    #: port (IO), guest-physical address (MMIO), or -1
    address: int
    #: "in", "out", "read", "write" or ""
    access: str


def encode_exit_key(reason: int, access: int = ACCESS_NONE, address: int = 0) -> int:
    return (reason << REASON_SHIFT) | (access << ACCESS_SHIFT) | (address & ADDRESS_MASK)


def rare_exit_key(reason: int) -> int:
    """The key of an exit that has no port or address (HLT, SHUTDOWN, INTERNAL_ERROR, ...)."""
    return reason << REASON_SHIFT


def key_reason(key: int) -> int:
    return key >> REASON_SHIFT


def is_coalesced_key(key: int) -> bool:
    """Whether the key files writes KVM queued in its coalesced ring rather than exits."""
    return (key >> ACCESS_SHIFT) & 0xF in (ACCESS_OUT_COALESCED, ACCESS_WRITE_COALESCED)


def key_address(key: int) -> int | None:
    """The port or address of an IO/MMIO key, None for other reasons."""
    if key >> REASON_SHIFT in _ADDRESSED_REASONS:
        return key & ADDRESS_MASK
    return None


def reason_name(reason: int) -> str:
    try:
        return c.ExitReason(reason).name
    except ValueError:
        return f"EXIT_{reason}"


def decode_exit_key(key: int) -> DecodedExitKey:
    """(reason name, port or address or -1, access) for an int exit key."""
    reason = key >> REASON_SHIFT
    access_code = (key >> ACCESS_SHIFT) & 0xF
    access = ACCESS_NAMES[access_code] if access_code < len(ACCESS_NAMES) else ""
    if reason not in _ADDRESSED_REASONS:
        return DecodedExitKey(reason_name(reason), -1, access)
    return DecodedExitKey(reason_name(reason), key & ADDRESS_MASK, access)


def exit_detail(reason: str, address: int, access: str) -> str:
    """The detail text of an exit: "port 0x3f8 out", "0xd0000000 read" or ""."""
    if reason == "IO":
        return f"port {address:#x} {access}"
    if reason == "MMIO":
        return f"{address:#x} {access}"
    return ""


def describe_exit_key(key: int) -> str:
    """ "IO port 0x3f8 out", "MMIO 0xd0000000 read", "HLT": one line for a person."""
    decoded = decode_exit_key(key)
    return f"{decoded.reason} {exit_detail(*decoded)}".rstrip()
