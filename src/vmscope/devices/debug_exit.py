"""QEMU's isa-debug-exit: a port whose write ends the run with a guest-chosen exit status.

Writing value ``v`` (1, 2 or 4 bytes, little-endian) stops the machine with exit status
``(v << 1) | 1``, exactly as QEMU computes it, so test guests written for
``-device isa-debug-exit`` run unchanged. The status is always odd, which keeps a guest's
deliberate exit apart from the VMM's own 0 (clean halt) and 2 (error); as with QEMU's
``exit()``, a shell sees only its low 8 bits. Every write requests a stop; the machine
keeps the first request. Reads return all-ones (the port has nothing to read).
"""

from __future__ import annotations

from vmscope.devices.base import Device, MachineControl

#: where QEMU's isa-debug-exit sits by default (``iobase=0xf4``)
DEFAULT_DEBUG_EXIT_PORT = 0xF4
#: QEMU's default ``iosize``; whoever maps the device may choose a wider window
DEFAULT_DEBUG_EXIT_SIZE = 1


def debug_exit_status(value: int) -> int:
    """The exit status a guest requests by writing ``value``."""
    return (value << 1) | 1


class DebugExit(Device):
    """The isa-debug-exit port; stops the machine through ``machine``."""

    def __init__(self, machine: MachineControl, name: str = "debug-exit") -> None:
        self.name = name
        self._machine = machine

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = int.from_bytes(data, "little")
        status = debug_exit_status(value)
        reason = f"guest wrote {value:#x} to the debug-exit port (exit status {status})"
        self._machine.request_stop(reason, status)
