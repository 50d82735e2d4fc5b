"""The virtio-mmio transport, version 2 (virtio 1.2 section 4.2), as a bus :class:`Device`.

Registers are 32 bits wide and 32-bit aligned; the driver must access them that way
(section 4.2.2.2), so other widths read as zero and are ignored on write. The
device-specific configuration space starts at 0x100 and may be read 1, 2, 4 or 8 bytes
at a time. The window is 0x200 bytes, enough for the largest configuration space here.

QueueNotify. With I/O threads, KVM turns a QueueNotify write that matches a queue index
into an eventfd signal and the vCPU never exits; a write that reaches this class anyway
(an index without an ioeventfd) is forwarded through :attr:`VirtioMmioTransport.notify_handler`,
which the attachment points at the I/O thread's eventfd so the data path stays off the
vCPU. Without I/O threads the handler calls ``queue_notify`` right here, on the vCPU.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Mapping

from vmscope.devices.base import Device
from vmscope.devices.state import StateReader
from vmscope.virtio.device import VirtioDevice, run_teardown_steps

log = logging.getLogger("vmscope.virtio.mmio")

MAGIC_VALUE = 0x7472_6976  # "virt"
VERSION = 2
#: VendorID: "VMSC" read as a little-endian u32, like QEMU's "QEMU"
VENDOR_ID = int.from_bytes(b"VMSC", "little")
WINDOW_SIZE = 0x200

REG_MAGIC_VALUE = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_SHM_BASE_LOW = 0x0B8
REG_SHM_BASE_HIGH = 0x0BC
REG_QUEUE_RESET = 0x0C0
REG_CONFIG_GENERATION = 0x0FC
CONFIG_SPACE_OFFSET = 0x100

_U32 = struct.Struct("<I")

# which queue field each address register half sets
_QUEUE_ADDRESS_REGISTERS = {
    REG_QUEUE_DESC_LOW: ("desc", False),
    REG_QUEUE_DESC_HIGH: ("desc", True),
    REG_QUEUE_DRIVER_LOW: ("driver", False),
    REG_QUEUE_DRIVER_HIGH: ("driver", True),
    REG_QUEUE_DEVICE_LOW: ("device", False),
    REG_QUEUE_DEVICE_HIGH: ("device", True),
}


class VirtioMmioTransport(Device):
    """Maps the virtio-mmio v2 register file onto a :class:`VirtioDevice`."""

    def __init__(self, device: VirtioDevice, *, vendor_id: int = VENDOR_ID) -> None:
        self.device = device
        self.name = device.name
        self.vendor_id = vendor_id
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._queue_sel = 0
        self._shm_sel = 0
        #: called with the queue index for a QueueNotify write that reached userspace
        self.notify_handler: Callable[[int], None] = self._notify_inline
        self._close_callbacks: list[Callable[[], None]] = []
        #: accesses that broke the width/alignment rules (a driver bug, counted not fatal)
        self.bad_accesses = 0

    def _notify_inline(self, index: int) -> None:
        self.device.queue_notify(index, time.perf_counter_ns())

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in :meth:`close` before the device is closed (stop threads, deassign fds)."""
        self._close_callbacks.append(callback)

    # -- Device interface --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG_SPACE_OFFSET:
            if size not in (1, 2, 4, 8):
                self.bad_accesses += 1
                return bytes(size)
            return self.device.read_config(offset - CONFIG_SPACE_OFFSET, size)
        if size != 4 or offset % 4:
            self.bad_accesses += 1
            return bytes(size)
        return _U32.pack(self._read_register(offset) & 0xFFFF_FFFF)

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG_SPACE_OFFSET:
            if len(data) not in (1, 2, 4, 8):
                self.bad_accesses += 1
                return
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            self.bad_accesses += 1
            log.debug("%s: ignored %d-byte write at register %#x", self.name, len(data), offset)
            return
        self._write_register(offset, _U32.unpack(data)[0])

    def reset(self) -> None:
        self.device.reset()
        self._reset_selectors()

    def close(self) -> None:
        callbacks, self._close_callbacks = self._close_callbacks, []
        run_teardown_steps(self.name, callbacks)
        self.device.close()

    def save_state(self) -> dict[str, object]:
        return {
            "device_features_sel": self._device_features_sel,
            "driver_features_sel": self._driver_features_sel,
            "queue_sel": self._queue_sel,
            "shm_sel": self._shm_sel,
            "virtio": self.device.save_state(),
        }

    def load_state(self, state: Mapping[str, object]) -> None:
        reader = StateReader(self.name, state)
        selectors = [
            reader.integer(field, 0, 0xFFFF_FFFF)
            for field in ("device_features_sel", "driver_features_sel", "queue_sel", "shm_sel")
        ]
        self.device.load_state(reader.section("virtio").mapping())
        self._device_features_sel, self._driver_features_sel, self._queue_sel, self._shm_sel = selectors

    # -- registers ------------------------------------------------------------------------------

    def _reset_selectors(self) -> None:
        self._device_features_sel = self._driver_features_sel = self._queue_sel = self._shm_sel = 0

    def _read_register(self, offset: int) -> int:
        device = self.device
        if offset == REG_MAGIC_VALUE:
            return MAGIC_VALUE
        if offset == REG_VERSION:
            return VERSION
        if offset == REG_DEVICE_ID:
            return device.device_id
        if offset == REG_VENDOR_ID:
            return self.vendor_id
        if offset == REG_DEVICE_FEATURES:
            return device.device_features_word(self._device_features_sel)
        if offset == REG_QUEUE_NUM_MAX:
            return device.queue_max_size(self._queue_sel)
        if offset == REG_QUEUE_READY:
            return int(device.queue_ready(self._queue_sel))
        if offset == REG_INTERRUPT_STATUS:
            return device.interrupt_status
        if offset == REG_STATUS:
            return device.status
        if offset in (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH, REG_SHM_BASE_LOW, REG_SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions: length reads as -1
        if offset == REG_CONFIG_GENERATION:
            return device.config_generation
        return 0  # write-only and reserved registers

    def _write_register(self, offset: int, value: int) -> None:
        device = self.device
        if offset == REG_QUEUE_NOTIFY:
            self.notify_handler(value & 0xFFFF)
        elif offset == REG_INTERRUPT_ACK:
            device.acknowledge_interrupt(value)
        elif offset == REG_STATUS:
            device.write_status(value)
            if value == 0:
                self._reset_selectors()
        elif offset == REG_DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            device.write_driver_features_word(self._driver_features_sel, value)
        elif offset == REG_QUEUE_SEL:
            self._queue_sel = value
        elif offset == REG_QUEUE_NUM:
            device.configure_queue(self._queue_sel, size=value)
        elif offset == REG_QUEUE_READY:
            device.set_queue_ready(self._queue_sel, bool(value & 1))
        elif offset in _QUEUE_ADDRESS_REGISTERS:
            self._write_queue_address(offset, value)
        elif offset == REG_SHM_SEL:
            self._shm_sel = value
        else:
            log.debug("%s: ignored write of %#x to register %#x", self.name, value, offset)

    def _write_queue_address(self, offset: int, value: int) -> None:
        index = self._queue_sel
        if not 0 <= index < self.device.num_queues:
            return
        field, high = _QUEUE_ADDRESS_REGISTERS[offset]
        queue = self.device.queues[index]
        current = {"desc": queue.desc_addr, "driver": queue.avail_addr, "device": queue.used_addr}[field]
        low_half, high_half = current & 0xFFFF_FFFF, current >> 32
        address = (value << 32 | low_half) if high else (high_half << 32 | value)
        self.device.configure_queue(index, **{field: address})
