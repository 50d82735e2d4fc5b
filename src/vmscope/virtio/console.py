"""virtio-console (virtio 1.2 section 5.3), a single port without VIRTIO_CONSOLE_F_MULTIPORT.

Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) guest output to
the host. The host side is any :class:`~vmscope.devices.char_backends.SerialBackend`
(stdio, file, unix socket, none), the same backends the 16550 UART uses.

Output: each transmit chain's device-readable bytes go to ``backend.write`` on the I/O
thread. Input: the backend's reader thread hands bytes to :meth:`VirtioConsole.deliver_input`,
which queues them, wakes the I/O thread through an eventfd and blocks until the guest has
taken them all (flow control: host input is never dropped, however fast it arrives).
The I/O thread copies pending input into receive buffers whenever there is input or the
driver posts buffers.

VIRTIO_CONSOLE_F_EMERG_WRITE is offered: a driver may write a character to ``emerg_wr``
(configuration offset 8) before the queues are up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading

from vmscope.devices.char_backends import SerialBackend
from vmscope.devices.state import StateReader
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.device import DEVICE_ID_CONSOLE, HostSource, VirtioDevice
from vmscope.virtio.iothread import drain_eventfd, new_eventfd
from vmscope.virtio.queue import Virtqueue, VirtqueueError, gather, scatter

log = logging.getLogger("vmscope.virtio.console")

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
DEFAULT_QUEUE_SIZE = 128
EMERG_WR_OFFSET = 8
# struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr
_CONFIG = struct.Struct("<HHII")


#: the most host input a saved state may carry for the guest (a reader thread hands over less)
MAX_SAVED_INPUT = 1 << 20


class VirtioConsole(VirtioDevice):
    """A single-port virtio console on a serial backend (see the module docstring)."""

    device_id = DEVICE_ID_CONSOLE

    def __init__(
        self,
        memory: GuestMemory,
        backend: SerialBackend,
        *,
        name: str = "virtio-console0",
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        super().__init__(
            memory, (queue_size, queue_size), name=name, features=1 << VIRTIO_CONSOLE_F_EMERG_WRITE
        )
        self.backend = backend
        self._pending = bytearray()
        self._input = threading.Condition()
        self._input_closed = False
        self._wake_fd: int | None = new_eventfd()
        self.bytes_out = 0
        self.bytes_in = 0
        backend.start(self.deliver_input)

    # -- virtio hooks ---------------------------------------------------------------------------

    def config_space(self) -> bytes:
        return _CONFIG.pack(0, 0, 1, 0)

    def config_write(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR_OFFSET and self.negotiated(VIRTIO_CONSOLE_F_EMERG_WRITE):
            self.backend.write(data[:1])
            self.bytes_out += 1
        else:
            super().config_write(offset, data)

    def host_sources(self) -> list[HostSource]:
        return [] if self._wake_fd is None else [(self._wake_fd, self._input_ready)]

    def process_queue(self, queue: Virtqueue, notified_ns: int) -> None:
        if queue.index == TRANSMIT_QUEUE:
            self._transmit(queue)
        else:
            self._fill_receive_buffers()

    def driver_ok(self) -> None:
        self._fill_receive_buffers()

    # -- output ----------------------------------------------------------------------------------

    def _transmit(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            if chain.writable:
                raise VirtqueueError(f"transmit chain {chain.head} has device-writable buffers")
            data = gather(self.memory, chain.readable)
            if data:
                self.backend.write(data)
                self.bytes_out += len(data)
            queue.push_used(chain.head, 0)

    # -- input -----------------------------------------------------------------------------------

    def deliver_input(self, data: bytes) -> bool:
        """InputSink for the backend's reader thread: blocks until the guest took ``data``.

        Returns False once the device is closed, which ends the reader.
        """
        with self._input:
            if self._input_closed:
                return False
            self._pending += data
        wake_fd = self._wake_fd
        if wake_fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(wake_fd, 1)
        with self._input:
            while self._pending and not self._input_closed:
                self._input.wait()
            return not self._input_closed

    def save_device_state(self) -> dict[str, object]:
        with self._input:
            return {"pending_input": self._pending.hex()}

    def load_device_state(self, reader: StateReader) -> None:
        pending = reader.hex_bytes("pending_input", max_length=MAX_SAVED_INPUT)
        with self._input:
            self._pending[:] = pending
        self._fill_receive_buffers()

    @property
    def pending_input(self) -> int:
        """Bytes of host input waiting for guest receive buffers."""
        return len(self._pending)

    def _input_ready(self) -> None:
        if self._wake_fd is not None:
            drain_eventfd(self._wake_fd)
        self._fill_receive_buffers()

    def _fill_receive_buffers(self) -> None:
        """Copy pending input into posted receive buffers (device lock held)."""
        queue = self.queues[RECEIVE_QUEUE]
        if not self.operational or not queue.ready:
            return
        with self._input:
            while self._pending:
                chain = queue.pop()
                if chain is None:
                    break
                if chain.readable:
                    raise VirtqueueError(f"receive chain {chain.head} has device-readable buffers")
                taken = scatter(self.memory, chain.writable, bytes(self._pending[: chain.writable_length]))
                del self._pending[:taken]
                self.bytes_in += taken
                queue.push_used(chain.head, taken)
            if not self._pending:
                self._input.notify_all()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        with self._input:
            self._input_closed = True
            self._input.notify_all()
        with self._lock:
            super().close()
        self.backend.close()
        fd, self._wake_fd = self._wake_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
