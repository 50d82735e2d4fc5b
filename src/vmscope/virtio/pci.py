"""The modern virtio-pci transport (virtio 1.2 section 4.1) as a PCI function.

Identity: vendor 0x1AF4, device 0x1040 + virtio device id (non-transitional), revision 1,
subsystem vendor 0x1AF4 and subsystem id 0x1100 (>= 0x40, as the spec asks of modern
devices, and what QEMU shows), a class code by device type (net 0x020000, block 0x010000,
console 0x078000, anything else 0xFF0000) and interrupt pin INTA.

One 64-bit, non-prefetchable memory BAR (BAR 0/1, 32 KiB; non-prefetchable because the ISR
is read-to-clear) holds every structure, each in its own 4 KiB page::

    0x0000  common configuration (0x3C bytes)       VIRTIO_PCI_CAP_COMMON_CFG
    0x1000  ISR status (4 bytes, byte 0 used)        VIRTIO_PCI_CAP_ISR_CFG
    0x2000  device-specific configuration            VIRTIO_PCI_CAP_DEVICE_CFG (only if non-empty)
    0x3000  notifications: queue n at 0x3000 + 4n    VIRTIO_PCI_CAP_NOTIFY_CFG, notify_off_multiplier 4
    0x4000  MSI-X table (queues + 1 vectors)
    0x5000  MSI-X pending-bit array

A VIRTIO_PCI_CAP_PCI_CFG capability gives the same BAR through configuration space.

Registers map onto the same :class:`VirtioDevice` methods as the virtio-mmio transport. The
common configuration is served field by field: a write merges its bytes into the field it
covers (so two 32-bit halves of a 64-bit queue address work, as Linux writes them), and a
write to a read-only field is ignored. ``queue_notify_off`` is the queue index.

Notifications. :attr:`VirtioPciTransport.notify_listeners` hear the guest-physical address
of the notification area whenever the BAR starts or stops decoding (Memory Space enable, BAR
moved): the attachment keeps one ioeventfd per queue on it, so a notification costs no exit.
A notification that reaches this class anyway goes to :attr:`VirtioPciTransport.notify_handler`.

Interrupts. With MSI-X enabled, a used-buffer notification of queue n fires
``queue_msix_vector`` of queue n and a configuration change fires ``msix_config``
(VIRTIO_MSI_NO_VECTOR: none). :class:`VirtioDevice` tells its :class:`InterruptSignal` only
"an interrupt", not which queue, so the transport wraps the device's ``signal_used`` (the one
place used-buffer interrupts come from) to note the queue on the calling thread; a trigger
outside it is a configuration change. Without MSI-X, the INTx signal the attachment gave
fires (INTx Disable in the command register suppresses it) and reading the ISR returns and
clears the status bits, which lowers a level-triggered line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from vmscope.devices.state import StateReader
from vmscope.errors import ConfigError
from vmscope.pci.device import (
    CAP_ID_VENDOR,
    COMMAND_INTX_DISABLE,
    PCI_COMMAND,
    PCI_STATUS,
    STATUS_INTERRUPT,
    BarKind,
    DecodedBar,
    PciDevice,
)
from vmscope.pci.msix import MsiSink, MsixCapability, RecordingMsiSink
from vmscope.virtio.device import (
    DEVICE_ID_BLOCK,
    DEVICE_ID_CONSOLE,
    DEVICE_ID_NET,
    InterruptSignal,
    NullInterruptSignal,
    VirtioDevice,
    run_teardown_steps,
)
from vmscope.virtio.queue import Virtqueue

log = logging.getLogger("vmscope.virtio.pci")

VENDOR_ID = 0x1AF4
DEVICE_ID_BASE = 0x1040
REVISION = 1
SUBSYSTEM_VENDOR_ID = 0x1AF4
SUBSYSTEM_ID = 0x1100
CLASS_CODES = {DEVICE_ID_NET: 0x02_00_00, DEVICE_ID_BLOCK: 0x01_00_00, DEVICE_ID_CONSOLE: 0x07_80_00}
CLASS_OTHER = 0xFF_00_00

# virtio_pci_cap.cfg_type
CAP_COMMON_CFG = 1
CAP_NOTIFY_CFG = 2
CAP_ISR_CFG = 3
CAP_DEVICE_CFG = 4
CAP_PCI_CFG = 5
#: bytes of struct virtio_pci_cap (id and next pointer included)
VIRTIO_CAP_LENGTH = 16

BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON_CFG_OFFSET = 0x0000
COMMON_CFG_LENGTH = 0x3C
ISR_OFFSET = 0x1000
ISR_LENGTH = 4
DEVICE_CFG_OFFSET = 0x2000
DEVICE_CFG_MAX_LENGTH = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
#: one MSI-X vector per queue plus one for configuration changes, in one 4 KiB table page
MAX_QUEUES = 0x1000 // 16 - 1

VIRTIO_MSI_NO_VECTOR = 0xFFFF

# common configuration fields (struct virtio_pci_common_cfg, virtio 1.2 section 4.1.4.3)
COMMON_DEVICE_FEATURE_SELECT = 0x00
COMMON_DEVICE_FEATURE = 0x04
COMMON_DRIVER_FEATURE_SELECT = 0x08
COMMON_DRIVER_FEATURE = 0x0C
COMMON_MSIX_CONFIG = 0x10
COMMON_NUM_QUEUES = 0x12
COMMON_DEVICE_STATUS = 0x14
COMMON_CONFIG_GENERATION = 0x15
COMMON_QUEUE_SELECT = 0x16
COMMON_QUEUE_SIZE = 0x18
COMMON_QUEUE_MSIX_VECTOR = 0x1A
COMMON_QUEUE_ENABLE = 0x1C
COMMON_QUEUE_NOTIFY_OFF = 0x1E
COMMON_QUEUE_DESC = 0x20
COMMON_QUEUE_DRIVER = 0x28
COMMON_QUEUE_DEVICE = 0x30
COMMON_QUEUE_NOTIF_CONFIG_DATA = 0x38
COMMON_QUEUE_RESET = 0x3A

#: offset -> width of every common configuration field
COMMON_FIELDS = {
    COMMON_DEVICE_FEATURE_SELECT: 4,
    COMMON_DEVICE_FEATURE: 4,
    COMMON_DRIVER_FEATURE_SELECT: 4,
    COMMON_DRIVER_FEATURE: 4,
    COMMON_MSIX_CONFIG: 2,
    COMMON_NUM_QUEUES: 2,
    COMMON_DEVICE_STATUS: 1,
    COMMON_CONFIG_GENERATION: 1,
    COMMON_QUEUE_SELECT: 2,
    COMMON_QUEUE_SIZE: 2,
    COMMON_QUEUE_MSIX_VECTOR: 2,
    COMMON_QUEUE_ENABLE: 2,
    COMMON_QUEUE_NOTIFY_OFF: 2,
    COMMON_QUEUE_DESC: 8,
    COMMON_QUEUE_DRIVER: 8,
    COMMON_QUEUE_DEVICE: 8,
    COMMON_QUEUE_NOTIF_CONFIG_DATA: 2,
    COMMON_QUEUE_RESET: 2,
}
_QUEUE_ADDRESS_FIELDS = {
    COMMON_QUEUE_DESC: "desc",
    COMMON_QUEUE_DRIVER: "driver",
    COMMON_QUEUE_DEVICE: "device",
}


def class_code_for(device_id: int) -> int:
    return CLASS_CODES.get(device_id, CLASS_OTHER)


class VirtioPciInterrupt(InterruptSignal):
    """Routes a device's interrupts to its MSI-X vectors or its INTx line (module docstring)."""

    def __init__(self, transport: VirtioPciTransport) -> None:
        self.transport = transport
        self._local = threading.local()
        self._device: VirtioDevice | None = None
        #: MSI-X vectors fired, INTx triggers, and interrupts that had nowhere to go
        self.msix_fired = 0
        self.intx_triggers = 0
        self.suppressed = 0

    def install(self, device: VirtioDevice) -> None:
        """Wrap ``device.signal_used`` so a trigger knows which queue it is for."""
        original = device.signal_used
        local = self._local

        def signal_used(queue: Virtqueue) -> int | None:
            previous = getattr(local, "queue", None)
            local.queue = queue.index
            try:
                return original(queue)
            finally:
                local.queue = previous

        setattr(device, "signal_used", signal_used)  # noqa: B010 - an instance attribute shadows the method
        self._device = device

    def uninstall(self) -> None:
        if self._device is not None:
            self._device.__dict__.pop("signal_used", None)
            self._device = None

    def trigger(self) -> None:
        transport = self.transport
        if transport.msix.enabled:
            queue: int | None = getattr(self._local, "queue", None)
            vector = transport.config_msix_vector if queue is None else transport.queue_msix_vector(queue)
            if vector == VIRTIO_MSI_NO_VECTOR or not transport.msix.fire(vector):
                self.suppressed += 1
                return
            self.msix_fired += 1
            return
        if transport.command & COMMAND_INTX_DISABLE:
            self.suppressed += 1
            return
        self.intx_triggers += 1
        transport.intx.trigger()

    def acknowledged(self, still_pending: bool) -> None:
        if not self.transport.msix.enabled:
            self.transport.intx.acknowledged(still_pending)


class VirtioPciTransport(PciDevice):
    """A :class:`VirtioDevice` behind the modern virtio-pci register layout (module docstring)."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        bar_address: int = 0,
        msi_sink: MsiSink | None = None,
        intx: InterruptSignal | None = None,
    ) -> None:
        config_length = len(device.config_space())
        if device.num_queues > MAX_QUEUES:
            raise ConfigError(
                f"{device.name}: {device.num_queues} queues; virtio-pci here serves {MAX_QUEUES}"
            )
        if config_length > DEVICE_CFG_MAX_LENGTH:
            raise ConfigError(f"{device.name}: {config_length}-byte configuration space is too large")
        super().__init__(
            vendor_id=VENDOR_ID,
            device_id=DEVICE_ID_BASE + device.device_id,
            class_code=class_code_for(device.device_id),
            revision=REVISION,
            subsystem_vendor_id=SUBSYSTEM_VENDOR_ID,
            subsystem_id=SUBSYSTEM_ID,
            interrupt_pin=1,
            name=device.name,
        )
        self.device = device
        self.device_config_length = config_length
        self.notify_length = NOTIFY_OFF_MULTIPLIER * device.num_queues
        self._device_features_select = 0
        self._driver_features_select = 0
        self._queue_select = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * device.num_queues
        #: called with a queue index for a notification that reached userspace
        self.notify_handler: Callable[[int], None] = self._notify_inline
        #: called with the notification area's guest-physical address, or None when it stops decoding
        self.notify_listeners: list[Callable[[int | None], None]] = []
        self._notify_base: int | None = None
        self._close_callbacks: list[Callable[[], None]] = []
        #: notifications that exited to userspace, ISR reads, and accesses that fit no register
        self.notify_exits = 0
        self.isr_reads = 0
        self.bad_accesses = 0

        self.add_bar(BAR_INDEX, BAR_SIZE, BarKind.MEMORY64, address=bar_address)
        self._add_virtio_cap(CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_LENGTH)
        self._add_virtio_cap(
            CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            self.notify_length,
            extra=NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little"),
        )
        self._add_virtio_cap(CAP_ISR_CFG, ISR_OFFSET, ISR_LENGTH)
        if config_length:
            self._add_virtio_cap(CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, config_length)
        # bar, offset, length and the data window are the driver's to write
        pci_cfg_writable = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        self.pci_cfg_offset = self._add_virtio_cap(
            CAP_PCI_CFG, 0, 0, bar=0, extra=bytes(4), writable=pci_cfg_writable
        )
        self.msix = MsixCapability(
            self,
            device.num_queues + 1,
            bar=BAR_INDEX,
            table_offset=MSIX_TABLE_OFFSET,
            pba_offset=MSIX_PBA_OFFSET,
            sink=msi_sink if msi_sink is not None else RecordingMsiSink(),
        )
        self.msix.add_mode_listener(self._interrupt_mode_changed)
        self.intx: InterruptSignal = intx if intx is not None else NullInterruptSignal()
        self.interrupt = VirtioPciInterrupt(self)
        self.interrupt.install(device)
        device.set_interrupt_signal(self.interrupt)

    def _add_virtio_cap(
        self,
        cfg_type: int,
        offset: int,
        length: int,
        *,
        bar: int = BAR_INDEX,
        extra: bytes = b"",
        writable: bytes = b"",
    ) -> int:
        cap_length = VIRTIO_CAP_LENGTH + len(extra)
        body = bytes([cap_length, cfg_type, bar, 0, 0, 0])
        body += offset.to_bytes(4, "little") + length.to_bytes(4, "little") + extra
        return self.add_capability(CAP_ID_VENDOR, body, writable=writable)

    # -- queues / vectors --------------------------------------------------------------------------

    def queue_msix_vector(self, index: int) -> int:
        return self._queue_vectors[index] if 0 <= index < len(self._queue_vectors) else VIRTIO_MSI_NO_VECTOR

    def _valid_vector(self, vector: int) -> int:
        """The vector the driver asked for, or NO_VECTOR when this function has no such vector."""
        return vector if vector < self.msix.count else VIRTIO_MSI_NO_VECTOR

    @property
    def notify_base(self) -> int | None:
        """Guest-physical address of the notification area while the BAR decodes."""
        return self._notify_base

    def notify_address(self, index: int) -> int | None:
        base = self._notify_base
        return None if base is None else base + NOTIFY_OFF_MULTIPLIER * index

    def _notify_inline(self, index: int) -> None:
        self.device.queue_notify(index, time.perf_counter_ns())

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in :meth:`close` before the device is closed (stop threads, deassign fds)."""
        self._close_callbacks.append(callback)

    # -- PCI hooks -----------------------------------------------------------------------------------

    def decode_changed(self, decoded: tuple[DecodedBar, ...]) -> None:
        base = next((d.address + NOTIFY_OFFSET for d in decoded if d.index == BAR_INDEX), None)
        if base == self._notify_base:
            return
        self._notify_base = base
        for listener in self.notify_listeners:
            listener(base)

    def before_config_read(self, offset: int, size: int) -> None:
        if offset < PCI_STATUS + 2 and offset + size > PCI_STATUS:
            status = self.u16(PCI_STATUS) & ~STATUS_INTERRUPT
            if not self.msix.enabled and self.device.interrupt_status:
                status |= STATUS_INTERRUPT
            self.set_u16(PCI_STATUS, status)
        data = self.pci_cfg_offset + VIRTIO_CAP_LENGTH
        if offset < data + 4 and offset + size > data:
            window = self._pci_cfg_window()
            if window is not None:
                bar_offset, length = window
                self.config[data : data + 4] = self.bar_read(BAR_INDEX, bar_offset, length).ljust(4, b"\0")

    def config_written(self, offset: int, size: int) -> None:
        if offset < PCI_COMMAND + 2 and offset + size > PCI_COMMAND:
            self._interrupt_mode_changed(self.msix.enabled)
        # a write into pci_cfg_data moves data; bar/offset/length only select the window
        data = self.pci_cfg_offset + VIRTIO_CAP_LENGTH
        if offset < data + 4 and offset + size > data:
            window = self._pci_cfg_window()
            if window is not None:
                bar_offset, length = window
                self.bar_write(BAR_INDEX, bar_offset, bytes(self.config[data : data + length]))

    def _pci_cfg_window(self) -> tuple[int, int] | None:
        """(BAR offset, length) the PCI_CFG capability selects, or None when that is not a valid access."""
        cap = self.pci_cfg_offset
        bar, bar_offset, length = self.u8(cap + 4), self.u32(cap + 8), self.u32(cap + 12)
        if (
            bar != BAR_INDEX
            or length not in (1, 2, 4)
            or bar_offset % length
            or bar_offset + length > BAR_SIZE
        ):
            return None
        return bar_offset, length

    def _interrupt_mode_changed(self, msix_enabled: bool) -> None:
        """MSI-X or INTx Disable changed: lower INTx when it no longer applies, raise it when it does."""
        if msix_enabled or self.command & COMMAND_INTX_DISABLE:
            self.intx.acknowledged(False)
        elif self.device.interrupt_status:
            self.intx.trigger()

    # -- BAR 0 ----------------------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        if index != BAR_INDEX or size <= 0:
            return bytes(max(size, 0))
        if COMMON_CFG_OFFSET <= offset < COMMON_CFG_OFFSET + COMMON_CFG_LENGTH:
            return self._common_read(offset - COMMON_CFG_OFFSET, size)
        if ISR_OFFSET <= offset < ISR_OFFSET + ISR_LENGTH:
            return self._isr_read(offset - ISR_OFFSET, size)
        if DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + self.device_config_length:
            return self.device.read_config(offset - DEVICE_CFG_OFFSET, size)
        if self.msix.in_table(offset) or self.msix.in_pba(offset):
            return self.msix.read(offset, size)
        return bytes(size)  # the notification area and unused space read as zero

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if index != BAR_INDEX or not data:
            return
        if COMMON_CFG_OFFSET <= offset < COMMON_CFG_OFFSET + COMMON_CFG_LENGTH:
            self._common_write(offset - COMMON_CFG_OFFSET, bytes(data))
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + self.notify_length:
            self.notify_exits += 1
            self.notify_handler((offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER)
        elif DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + self.device_config_length:
            self.device.write_config(offset - DEVICE_CFG_OFFSET, bytes(data))
        elif self.msix.in_table(offset):
            self.msix.write(offset, bytes(data))
        else:
            self.bad_accesses += 1
            log.debug("%s: ignored %d-byte write at BAR offset %#x", self.name, len(data), offset)

    def _isr_read(self, offset: int, size: int) -> bytes:
        if offset:
            return bytes(size)
        self.isr_reads += 1
        status = self.device.interrupt_status & 0x3
        if status:
            self.device.acknowledge_interrupt(status)
        return bytes([status]) + bytes(size - 1)

    # -- common configuration ---------------------------------------------------------------------------

    def _fields_touched(self, offset: int, size: int) -> list[tuple[int, int]]:
        return [
            (start, width)
            for start, width in COMMON_FIELDS.items()
            if start < offset + size and offset < start + width
        ]

    def _common_read(self, offset: int, size: int) -> bytes:
        image = bytearray(size)
        for start, width in self._fields_touched(offset, size):
            value = self._read_field(start).to_bytes(width, "little")
            for at in range(max(start, offset), min(start + width, offset + size)):
                image[at - offset] = value[at - start]
        return bytes(image)

    def _common_write(self, offset: int, data: bytes) -> None:
        for start, width in self._fields_touched(offset, len(data)):
            value = bytearray(self._read_field(start).to_bytes(width, "little"))
            for at in range(max(start, offset), min(start + width, offset + len(data))):
                value[at - start] = data[at - offset]
            self._write_field(start, int.from_bytes(value, "little"))

    def _selected_queue(self) -> Virtqueue | None:
        index = self._queue_select
        return self.device.queues[index] if 0 <= index < self.device.num_queues else None

    def _read_field(self, start: int) -> int:
        device = self.device
        queue = self._selected_queue()
        if start == COMMON_DEVICE_FEATURE_SELECT:
            return self._device_features_select
        if start == COMMON_DEVICE_FEATURE:
            return device.device_features_word(self._device_features_select)
        if start == COMMON_DRIVER_FEATURE_SELECT:
            return self._driver_features_select
        if start == COMMON_DRIVER_FEATURE:
            word = self._driver_features_select
            return (device.driver_features >> (32 * word)) & 0xFFFF_FFFF if word < 2 else 0
        if start == COMMON_MSIX_CONFIG:
            return self.config_msix_vector
        if start == COMMON_NUM_QUEUES:
            return device.num_queues
        if start == COMMON_DEVICE_STATUS:
            return device.status
        if start == COMMON_CONFIG_GENERATION:
            return device.config_generation & 0xFF
        if start == COMMON_QUEUE_SELECT:
            return self._queue_select
        if queue is None:
            return VIRTIO_MSI_NO_VECTOR if start == COMMON_QUEUE_MSIX_VECTOR else 0
        if start == COMMON_QUEUE_SIZE:
            return queue.size
        if start == COMMON_QUEUE_MSIX_VECTOR:
            return self._queue_vectors[queue.index]
        if start == COMMON_QUEUE_ENABLE:
            return int(queue.ready)
        if start == COMMON_QUEUE_NOTIFY_OFF:
            return queue.index
        if start == COMMON_QUEUE_DESC:
            return queue.desc_addr
        if start == COMMON_QUEUE_DRIVER:
            return queue.avail_addr
        if start == COMMON_QUEUE_DEVICE:
            return queue.used_addr
        return 0  # queue_notif_config_data and queue_reset: features not offered

    def _write_field(self, start: int, value: int) -> None:
        device = self.device
        if start == COMMON_DEVICE_FEATURE_SELECT:
            self._device_features_select = value
        elif start == COMMON_DRIVER_FEATURE_SELECT:
            self._driver_features_select = value
        elif start == COMMON_DRIVER_FEATURE:
            device.write_driver_features_word(self._driver_features_select, value)
        elif start == COMMON_MSIX_CONFIG:
            self.config_msix_vector = self._valid_vector(value)
        elif start == COMMON_DEVICE_STATUS:
            device.write_status(value)
            if value == 0:
                self._reset_transport_state()
        elif start == COMMON_QUEUE_SELECT:
            self._queue_select = value
        elif start == COMMON_QUEUE_SIZE:
            device.configure_queue(self._queue_select, size=value)
        elif start == COMMON_QUEUE_MSIX_VECTOR:
            if 0 <= self._queue_select < device.num_queues:
                self._queue_vectors[self._queue_select] = self._valid_vector(value)
        elif start == COMMON_QUEUE_ENABLE:
            if value & 1:
                device.set_queue_ready(self._queue_select, True)
            else:
                log.debug("%s: driver wrote 0 to queue_enable (not allowed); ignored", self.name)
        elif start in _QUEUE_ADDRESS_FIELDS:
            device.configure_queue(self._queue_select, **{_QUEUE_ADDRESS_FIELDS[start]: value})
        else:
            self.bad_accesses += 1
            log.debug("%s: ignored write of %#x to read-only common field %#x", self.name, value, start)

    def _reset_transport_state(self) -> None:
        self._device_features_select = self._driver_features_select = self._queue_select = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * self.device.num_queues

    # -- state ----------------------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        state = super().save_state()
        state.update(
            device_features_select=self._device_features_select,
            driver_features_select=self._driver_features_select,
            queue_select=self._queue_select,
            config_msix_vector=self.config_msix_vector,
            queue_msix_vectors=list(self._queue_vectors),
            msix=self.msix.save_state(),
            virtio=self.device.save_state(),
        )
        return state

    def load_state(self, state: Mapping[str, object]) -> None:
        """The virtio device first (its interrupt status decides INTx), then PCI config and MSI-X."""
        reader = StateReader(self.name, state)
        selectors = [
            reader.integer(field, 0, 0xFFFF_FFFF)
            for field in ("device_features_select", "driver_features_select", "queue_select")
        ]
        config_vector = reader.integer("config_msix_vector", 0, 0xFFFF)
        queue_vectors = reader.integers("queue_msix_vectors", maximum=0xFFFF, count=self.device.num_queues)
        for index, vector in enumerate([config_vector, *queue_vectors]):
            if vector != self._valid_vector(vector):
                field = "config_msix_vector" if index == 0 else f"queue_msix_vectors[{index - 1}]"
                raise reader.error(field, f"vector {vector} is not one of this function's MSI-X vectors")
        msix = reader.section("msix")
        self.device.load_state(reader.section("virtio").mapping())
        self.load_config_state(reader)
        self._device_features_select, self._driver_features_select, self._queue_select = selectors
        self.config_msix_vector, self._queue_vectors = config_vector, queue_vectors
        self.msix.load_state(msix)
        self._interrupt_mode_changed(self.msix.enabled)

    # -- lifetime ---------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Device reset plus the transport's selectors and vectors (MSI-X state is PCI state: kept)."""
        self.device.reset()
        self._reset_transport_state()

    def close(self) -> None:
        callbacks, self._close_callbacks = self._close_callbacks, []
        run_teardown_steps(self.name, callbacks)
        self.interrupt.uninstall()
        self.device.close()
