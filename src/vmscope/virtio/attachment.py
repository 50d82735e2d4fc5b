"""What every way of wiring a virtio device to a machine shares (virtio-mmio, virtio-pci).

An attachment owns the device's I/O thread and a list of clean-up steps (eventfds to close, KVM
registrations to undo) recorded as it wires the device up. Tearing it down stops the I/O thread
first, lets the transport quiesce its own wiring, undoes the steps in reverse order, one failing
step never leaking the rest, and closes the I/O thread. Closing the transport (what closing the
machine does) runs that teardown; :meth:`VirtioAttachment.close` closes the transport.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Protocol

from vmscope.virtio.device import VirtioDevice, run_teardown_steps
from vmscope.virtio.iothread import VirtioIoThread, new_eventfd


class _Transport(Protocol):
    def close(self) -> None: ...


def close_fd(fd: int) -> None:
    """Close a descriptor the attachment made; already closed is fine."""
    with contextlib.suppress(OSError):
        os.close(fd)


class VirtioAttachment:
    """Base of :class:`~vmscope.virtio.attach.VirtioMmioAttachment` and
    :class:`~vmscope.virtio.pci_attach.VirtioPciAttachment` (dataclasses that declare these fields)."""

    device: VirtioDevice
    transport: _Transport
    io: VirtioIoThread
    _cleanups: list[Callable[[], None]]

    @property
    def io_thread_name(self) -> str:
        return self.io.thread.name

    def add_cleanup(self, step: Callable[[], None]) -> None:
        """Undo ``step`` at teardown (steps run in reverse order of adding)."""
        self._cleanups.append(step)

    def owned_eventfd(self) -> int:
        """A new eventfd that the teardown closes."""
        fd = new_eventfd()
        self.add_cleanup(functools.partial(close_fd, fd))
        return fd

    def _quiesce(self) -> None:
        """Transport-specific teardown after the I/O thread stopped, before the clean-up steps."""

    def _teardown(self) -> None:
        """Stop the I/O thread, then undo the KVM registrations and close the eventfds."""
        self.io.stop()
        self._quiesce()
        cleanups, self._cleanups = self._cleanups, []
        run_teardown_steps(self.device.name, reversed(cleanups))  # undo in reverse order
        self.io.close()

    def close(self) -> None:
        """Tear down and close the device, through the transport (as closing the machine does)."""
        self.transport.close()
