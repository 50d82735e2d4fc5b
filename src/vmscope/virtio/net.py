"""virtio-net (virtio 1.2 section 5.1): one receive and one transmit queue over a host backend.

Features offered: VIRTIO_NET_F_MAC (the MAC is in the configuration space) and
VIRTIO_NET_F_STATUS (link always up), plus the common ones. No checksum or segmentation
offloads and no mergeable receive buffers, so every frame travels whole with a 12-byte
``virtio_net_hdr`` (the VERSION_1 layout, ``num_buffers`` included) in front of it, all
fields zero except ``num_buffers`` = 1 on receive.

Transmit: the driver's chains on queue 1 are header + frame, device-readable only; each
frame goes to :meth:`NetBackend.send` and the chain is returned with length 0.

Receive: the backend's descriptor is polled by the device's I/O thread; each frame fills
one chain of queue 0. A frame that arrives while the driver has posted no receive
buffer, or before DRIVER_OK, is dropped and counted (:attr:`VirtioNet.counters`); one
larger than the posted buffer is dropped too and the buffer stays available.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from vmscope.devices.state import StateReader
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.device import DEVICE_ID_NET, HostSource, VirtioDevice
from vmscope.virtio.net_backends import MAX_FRAME, NetBackend
from vmscope.virtio.queue import Virtqueue, VirtqueueError, gather, scatter

log = logging.getLogger("vmscope.virtio.net")

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_GSO_NONE = 0

#: struct virtio_net_hdr (VERSION_1 layout): flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers
NET_HEADER = struct.Struct("<BBHHHHH")
RX_QUEUE = 0
TX_QUEUE = 1
DEFAULT_QUEUE_SIZE = 256
# frames taken from the backend per wake-up, so one busy link cannot starve the loop
_RX_BURST = 64
_CONFIG = struct.Struct("<6sHH")


@dataclass
class NetCounters:
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    #: frames that arrived when the driver had posted no receive buffer
    rx_dropped_no_buffer: int = 0
    #: frames that arrived before DRIVER_OK or while the device needed a reset
    rx_dropped_not_ready: int = 0
    #: frames larger than the receive buffer the driver posted
    rx_dropped_too_large: int = 0


def parse_mac(text: str | bytes | None) -> bytes:
    """'52:54:00:12:34:56' (or 6 raw bytes) to bytes; None gives a random locally administered unicast MAC."""
    if text is None:
        random = bytearray(os.urandom(6))
        random[0] = (random[0] & 0xFC) | 0x02  # unicast, locally administered
        return bytes(random)
    if isinstance(text, bytes):
        if len(text) != 6:
            raise ConfigError(f"MAC address must be 6 bytes, got {len(text)}")
        return text
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(part) != 2 for part in parts):
            raise ValueError
        raw = bytes(int(part, 16) for part in parts)
    except ValueError:
        raise ConfigError(f"MAC address {text!r}: expected six hex pairs like 52:54:00:12:34:56") from None
    if raw[0] & 1:
        raise ConfigError(f"MAC address {text}: is a multicast address")
    return raw


def format_mac(raw: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in raw)


class VirtioNet(VirtioDevice):
    """A virtio network card on a :class:`NetBackend` (see the module docstring)."""

    device_id = DEVICE_ID_NET

    def __init__(
        self,
        memory: GuestMemory,
        backend: NetBackend,
        *,
        mac: str | bytes | None = None,
        name: str = "virtio-net0",
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        features = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
        super().__init__(memory, (queue_size, queue_size), name=name, features=features)
        self.backend = backend
        self.mac = parse_mac(mac)
        self.counters = NetCounters()

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1)

    def host_sources(self) -> list[HostSource]:
        return [(self.backend.fileno(), self.receive_from_backend)]

    def save_device_state(self) -> dict[str, object]:
        return {"mac": self.mac.hex()}

    def load_device_state(self, reader: StateReader) -> None:
        self.mac = reader.hex_bytes("mac", len(self.mac))

    def process_queue(self, queue: Virtqueue, notified_ns: int) -> None:
        if queue.index == TX_QUEUE:
            self._transmit(queue)
        # a notification on the receive queue only says new buffers were posted: frames
        # that arrived without one were already dropped, so there is nothing to do

    def _transmit(self, queue: Virtqueue) -> None:
        counters = self.counters
        while (chain := queue.pop()) is not None:
            if chain.writable:
                raise VirtqueueError(f"tx chain {chain.head} has device-writable buffers")
            length = chain.readable_length
            if length < NET_HEADER.size:
                raise VirtqueueError(f"tx chain {chain.head}: {length} bytes, less than the 12-byte header")
            frame_length = length - NET_HEADER.size
            if frame_length > MAX_FRAME:
                counters.tx_dropped += 1
            else:
                frame = gather(self.memory, chain.readable, NET_HEADER.size)
                if self.backend.send(frame):
                    counters.tx_frames += 1
                    counters.tx_bytes += len(frame)
                else:
                    counters.tx_dropped += 1
            queue.push_used(chain.head, 0)

    def receive_from_backend(self) -> None:
        """Move waiting frames from the backend into receive buffers (I/O thread, device lock held)."""
        for _ in range(_RX_BURST):
            frame = self.backend.receive()
            if frame is None:
                return
            self.deliver_frame(frame)

    def deliver_frame(self, frame: bytes) -> bool:
        """Put one frame in the next receive buffer; False (counted) when it was dropped."""
        counters = self.counters
        queue = self.queues[RX_QUEUE]
        if not self.operational or not queue.ready:
            counters.rx_dropped_not_ready += 1
            return False
        chain = queue.pop()
        if chain is None:
            counters.rx_dropped_no_buffer += 1
            return False
        if chain.readable:
            raise VirtqueueError(f"rx chain {chain.head} has device-readable buffers")
        needed = NET_HEADER.size + len(frame)
        if chain.writable_length < needed:
            queue.unpop()
            counters.rx_dropped_too_large += 1
            return False
        header = NET_HEADER.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 1)
        scatter(self.memory, chain.writable, header + frame)
        queue.push_used(chain.head, needed)
        counters.rx_frames += 1
        counters.rx_bytes += len(frame)
        return True

    def close(self) -> None:
        with self._lock:
            super().close()
            self.backend.close()
