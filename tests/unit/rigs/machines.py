"""Fakes of the machine and VM an attachment wires a virtio-mmio device to.

ioeventfds and irqfds are served in Python, so attachments run without KVM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vmscope.bus import MmioBus
from vmscope.devices.base import Device, RecordingInterruptLine
from vmscope.memory.guest_memory import GuestMemory


@dataclass
class FakeVm:
    ioeventfds: dict[tuple[int, int], int] = field(default_factory=dict)  # (address, datamatch) -> fd
    irqfds: dict[int, tuple[int, int | None]] = field(default_factory=dict)  # gsi -> (fd, resample fd)
    calls: list[tuple[object, ...]] = field(default_factory=list)

    def register_ioeventfd(
        self,
        event_fd: int,
        address: int,
        length: int,
        *,
        pio: bool,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        self.calls.append(("ioeventfd", event_fd, address, length, pio, datamatch, deassign))
        assert datamatch is not None
        if deassign:
            assert self.ioeventfds.pop((address, datamatch)) == event_fd
        else:
            assert (address, datamatch) not in self.ioeventfds
            self.ioeventfds[(address, datamatch)] = event_fd

    def register_irqfd(self, event_fd: int, gsi: int, resample_fd: int | None = None) -> None:
        self.calls.append(("irqfd", event_fd, gsi, resample_fd))
        self.irqfds[gsi] = (event_fd, resample_fd)

    def unregister_irqfd(self, event_fd: int, gsi: int) -> None:
        self.calls.append(("irqfd-deassign", event_fd, gsi))
        assert self.irqfds.pop(gsi)[0] == event_fd

    def guest_notify(self, address: int, value: int) -> bool:
        """What KVM does with a 4-byte guest write: signal a matching ioeventfd (True) or exit."""
        fd = self.ioeventfds.get((address, value))
        if fd is None:
            return False
        os.eventfd_write(fd, 1)
        return True


class FakeMachine:
    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.vm = FakeVm()
        self.mmio_bus = MmioBus()
        self.lines: dict[int, RecordingInterruptLine] = {}

    def interrupt_line(self, gsi: int) -> RecordingInterruptLine:
        return self.lines.setdefault(gsi, RecordingInterruptLine())

    def add_mmio_device(self, base: int, length: int, device: Device) -> None:
        self.mmio_bus.register(base, length, device)
