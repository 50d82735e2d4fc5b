"""virtio-rng / entropy device (virtio 1.2 section 5.4): fills device-writable buffers from os.getrandom.

One request queue; each chain must be device-writable only. At most
:data:`MAX_BYTES_PER_REQUEST` bytes are filled per chain (the used length says how many),
which the spec allows and which keeps one request from pinning the I/O thread.
"""

from __future__ import annotations

import os

from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.device import DEVICE_ID_ENTROPY, VirtioDevice
from vmscope.virtio.queue import Virtqueue, VirtqueueError, scatter

DEFAULT_QUEUE_SIZE = 64
MAX_BYTES_PER_REQUEST = 64 << 10


class VirtioRng(VirtioDevice):
    """An entropy source for the guest (Linux's virtio_rng / hw_random)."""

    device_id = DEVICE_ID_ENTROPY

    def __init__(
        self, memory: GuestMemory, *, name: str = "virtio-rng0", queue_size: int = DEFAULT_QUEUE_SIZE
    ) -> None:
        super().__init__(memory, (queue_size,), name=name)
        self.bytes_served = 0

    def config_space(self) -> bytes:
        return b""

    def process_queue(self, queue: Virtqueue, notified_ns: int) -> None:
        while (chain := queue.pop()) is not None:
            if chain.readable:
                raise VirtqueueError(f"request {chain.head} has device-readable buffers")
            wanted = min(chain.writable_length, MAX_BYTES_PER_REQUEST)
            written = scatter(self.memory, chain.writable, os.getrandom(wanted)) if wanted else 0
            self.bytes_served += written
            queue.push_used(chain.head, written)
