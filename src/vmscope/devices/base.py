"""What a device model is, and the two small interfaces it uses to reach the machine.

A device knows nothing of KVM or of where it is mapped: it answers reads and writes at
offsets inside its own window, raises interrupts through an :class:`InterruptLine`, and
asks the machine to stop through a :class:`MachineControl`. That is enough to unit-test
every device on plain Python objects.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol

from vmscope.devices.state import StateReader

log = logging.getLogger("vmscope.devices")


class InterruptLine(Protocol):
    """A level-triggered interrupt input (a GSI, an IOAPIC pin) that a device drives."""

    def set_level(self, asserted: bool) -> None:
        """Assert (True) or deassert (False) the line."""


class MachineControl(Protocol):
    """The few machine-wide actions a device may request."""

    def request_stop(self, reason: str, exit_status: int) -> None:
        """Stop every vCPU and end the run with ``exit_status``; ``reason`` is shown to the user."""


class NullInterruptLine:
    """An unconnected line: asserting it does nothing (devices work before interrupts are wired)."""

    def set_level(self, asserted: bool) -> None:
        pass


class RecordingInterruptLine:
    """A line that remembers its level and every change; for tests and debugging."""

    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []

    def set_level(self, asserted: bool) -> None:
        if asserted != self.level:
            self.changes.append(asserted)
        self.level = asserted


class RecordingMachineControl:
    """Remembers stop requests instead of stopping anything; for tests."""

    def __init__(self) -> None:
        self.stops: list[tuple[str, int]] = []

    def request_stop(self, reason: str, exit_status: int) -> None:
        self.stops.append((reason, exit_status))


class Device(ABC):
    """A register-level device model on a port-I/O or MMIO bus.

    ``read`` returns exactly ``size`` bytes (little-endian register contents) and ``write``
    receives the bytes the guest wrote. Offsets are relative to the start of the window
    the device was registered at.
    """

    #: short name shown in statistics and logs (e.g. "serial0", "debug-exit")
    name: str = "device"
    #: its writes only record what was written: no interrupt, no reply, nothing the guest
    #: could see before its next read of the device. The VMM may then let KVM queue them in
    #: its coalesced ring and deliver them in order, later, in batches (vmm.coalescing)
    writes_are_side_effect_free: bool = False

    @abstractmethod
    def read(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes read by the guest at ``offset``."""

    @abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Accept the bytes the guest wrote at ``offset``."""

    def reset(self) -> None:
        """Return to the power-on state (default: nothing to do)."""

    def start(self) -> None:
        """The machine is about to run its guest (or already runs, for a device added late):
        begin asynchronous host-side work, such as reading host input (default: none).

        Not earlier: a restored machine loads every device's state, then its interrupt
        controllers and vCPUs, and input taken in between would be lost or would raise an
        interrupt that the controllers' saved state then overwrites."""

    def close(self) -> None:
        """Release host resources such as files, sockets and threads (default: none)."""

    def save_state(self) -> dict[str, object]:
        """The guest-visible state as plain JSON-able data (bytes as hex strings); default: none.

        Host resources (files, sockets, threads) and statistics are not state: a snapshot
        restores what the guest can observe through the device's registers.
        """
        return {}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Return to a state :meth:`save_state` produced (DeviceStateError for a bad field).

        The default, for devices without state, accepts only the empty state.
        """
        reader = StateReader(self.name, state)
        reader.expect_empty()


def int_to_bytes(value: int, size: int) -> bytes:
    """Little-endian register value truncated to ``size`` bytes."""
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
