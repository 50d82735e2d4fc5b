"""The transport-independent part of a virtio device (virtio 1.2 chapters 2 and 3).

A :class:`VirtioDevice` owns feature negotiation, the device status state machine, the
virtqueues, the interrupt status bits and the device-specific configuration space. A
transport (virtio-mmio now, PCI later) maps its registers onto these methods; a device
type (block, net, console, rng) implements :meth:`VirtioDevice.process_queue` and
:meth:`VirtioDevice.config_space`.

Threads. ``queue_notify`` runs on the device's I/O thread (ioeventfd mode) or on a vCPU
thread (``--iothreads=off``); register accesses always come from vCPU threads. One
re-entrant lock per device serialises queue processing, status changes, queue set-up and
reset, so a reset waits for the batch in flight and the I/O thread is quiescent when it
returns. Interrupt status has its own small lock so a vCPU reading or acknowledging
InterruptStatus never waits for a slow backend.

Errors. Whatever the guest put in a queue, nothing raises out of this class to the VMM: a
malformed queue (:class:`VirtqueueError`, :class:`GuestMemoryError`) or a bug in a device
model sets DEVICE_NEEDS_RESET (status bit 0x40), is logged with the device name and the
reason, raises a configuration-change interrupt when DRIVER_OK is set (as the spec
requires), and stops the device processing queues until the driver resets it. Other
devices are unaffected.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from vmscope.devices.base import InterruptLine
from vmscope.devices.state import StateReader
from vmscope.errors import GuestMemoryError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.queue import Virtqueue, VirtqueueError

log = logging.getLogger("vmscope.virtio")

# -- feature bits shared by every device type (virtio 1.2 section 6) ------------------------------
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

#: offered by every vmscope virtio device
COMMON_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)

# -- device status bits (section 2.1) ---------------------------------------------------------------
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# -- interrupt status bits (virtio-mmio InterruptStatus, PCI ISR) ---------------------------------
INTERRUPT_USED_BUFFER = 0x1
INTERRUPT_CONFIG_CHANGE = 0x2

# -- device ids (section 5) -------------------------------------------------------------------------
DEVICE_ID_NET = 1
DEVICE_ID_BLOCK = 2
DEVICE_ID_CONSOLE = 3
DEVICE_ID_ENTROPY = 4

#: (file descriptor, callback) pairs a device wants polled on its I/O thread
HostSource = tuple[int, Callable[[], None]]


# -- interrupt delivery ------------------------------------------------------------------------------


def run_teardown_steps(name: str, steps: Iterable[Callable[[], None]]) -> None:
    """Run teardown steps in order; one failing step is logged and must not leak the rest."""
    for step in steps:
        try:
            step()
        except Exception:
            log.exception("%s: a teardown step failed", name)


class InterruptSignal(ABC):
    """How a device tells the guest that InterruptStatus has a bit set."""

    @abstractmethod
    def trigger(self) -> None:
        """A bit was set in InterruptStatus: make the guest take an interrupt."""

    def acknowledged(self, still_pending: bool) -> None:
        """The driver wrote InterruptACK; ``still_pending`` says whether bits remain set."""


class NullInterruptSignal(InterruptSignal):
    """No interrupt wired (a device before attachment, or a polled test)."""

    def trigger(self) -> None:
        pass


class EventfdSignal(InterruptSignal):
    """Writes 1 to an eventfd: an irqfd registered with KVM_IRQFD raises the GSI in the kernel.

    Without a resample fd KVM pulses the line (an edge); with one it holds it until the
    guest's EOI, and :meth:`VirtioDevice.resample_interrupt` re-triggers while bits stay
    set (level semantics). The descriptor is borrowed, never closed here.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.triggers = 0

    def trigger(self) -> None:
        self.triggers += 1
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:  # counter saturated: the interrupt is pending anyway
            pass
        except OSError as error:
            log.warning("interrupt eventfd %d write failed: %s", self.fd, error)


class LinePulseSignal(InterruptSignal):
    """Raise and lower an :class:`InterruptLine` at once: one edge per trigger."""

    def __init__(self, line: InterruptLine) -> None:
        self.line = line

    def trigger(self) -> None:
        self.line.set_level(True)
        self.line.set_level(False)


class LineLevelSignal(InterruptSignal):
    """Hold an :class:`InterruptLine` high while InterruptStatus is non-zero (KVM_IRQ_LINE).

    Correct for a level-triggered IO-APIC pin, and for an edge-triggered one too: the
    line rises whenever status goes from zero to non-zero, and Linux's handler acks the
    status it read before it walks the used rings.
    """

    def __init__(self, line: InterruptLine) -> None:
        self.line = line

    def trigger(self) -> None:
        self.line.set_level(True)

    def acknowledged(self, still_pending: bool) -> None:
        self.line.set_level(still_pending)


@dataclass
class VirtioStats:
    """Counters a profiler or ``vmscope stat`` can show per device."""

    notifications: int = 0
    ignored_notifications: int = 0
    interrupts: int = 0
    config_interrupts: int = 0
    errors: int = 0
    resets: int = 0


def feature_names(bits: int) -> str:
    """'28, 29, 32' for a feature mask, for log messages."""
    return ", ".join(str(bit) for bit in range(128) if bits >> bit & 1) or "none"


class VirtioDevice(ABC):
    """Base of every virtio device model; see the module docstring."""

    #: virtio device id (section 5), set by each device type
    device_id: ClassVar[int] = 0
    #: whether an I/O thread should poll this device's available rings briefly after serving a
    #: notification (worth it where every notification is served at once, as on virtio-blk)
    poll_queues: ClassVar[bool] = False

    def __init__(
        self, memory: GuestMemory, queue_sizes: Sequence[int], *, name: str, features: int = 0
    ) -> None:
        self.memory = memory
        self.name = name
        self.queues = [Virtqueue(memory, index, size) for index, size in enumerate(queue_sizes)]
        self._device_features = COMMON_FEATURES | features
        self._driver_features = 0
        self._driver_features_beyond_64 = False
        self._status = 0
        self._interrupt_status = 0
        self._config_generation = 0
        self._signal: InterruptSignal = NullInterruptSignal()
        self._lock = threading.RLock()
        self._interrupt_lock = threading.Lock()
        self._closed = False
        self.stats = VirtioStats()
        #: the reason of the last NEEDS_RESET, for reports and tests
        self.last_error: str | None = None

    # -- device-type hooks --------------------------------------------------------------------

    @abstractmethod
    def process_queue(self, queue: Virtqueue, notified_ns: int) -> None:
        """Serve the available chains of ``queue`` (called with the device lock held).

        ``notified_ns`` is the ``time.perf_counter_ns()`` at which the notification was
        seen. Malformed chains raise :class:`VirtqueueError`.
        """

    @abstractmethod
    def config_space(self) -> bytes:
        """The current device-specific configuration space, little-endian."""

    def config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote the configuration space (default: every field is read-only)."""
        log.debug("%s: ignored write of %d bytes at config offset %#x", self.name, len(data), offset)

    def validate_features(self, features: int) -> str | None:
        """Why the driver's feature set is unacceptable to this device type, or None."""
        return None

    def features_accepted(self, features: int) -> None:
        """FEATURES_OK was accepted with ``features`` (device-specific set-up)."""

    def driver_ok(self) -> None:
        """The driver set DRIVER_OK (called with the device lock held)."""

    def device_reset(self) -> None:
        """Device-specific part of a reset (called with the device lock held)."""

    def host_sources(self) -> list[HostSource]:
        """Host descriptors (a tap fd, a wake-up eventfd) the I/O thread polls for this device."""
        return []

    def save_device_state(self) -> dict[str, object]:
        """Device-type state beyond the common part, as plain data (default: none)."""
        return {}

    def load_device_state(self, reader: StateReader) -> None:
        """Load what :meth:`save_device_state` produced (called with the device lock held)."""
        reader.expect_empty()

    # -- features -------------------------------------------------------------------------------

    @property
    def device_features(self) -> int:
        return self._device_features

    @property
    def driver_features(self) -> int:
        return self._driver_features

    def negotiated(self, bit: int) -> bool:
        """True when feature ``bit`` was offered and accepted (meaningful after FEATURES_OK)."""
        return bool(self._status & STATUS_FEATURES_OK and self._driver_features >> bit & 1)

    def device_features_word(self, word: int) -> int:
        """Bits 32*word .. 32*word+31 of the offered features (DeviceFeatures with DeviceFeaturesSel)."""
        if not 0 <= word < 4:
            return 0
        return (self._device_features >> (32 * word)) & 0xFFFF_FFFF

    def write_driver_features_word(self, word: int, value: int) -> None:
        """DriverFeatures with DriverFeaturesSel = ``word``; ignored once FEATURES_OK is set."""
        value &= 0xFFFF_FFFF
        with self._lock:
            if self._status & STATUS_FEATURES_OK:
                log.warning("%s: driver wrote features word %d after FEATURES_OK; ignored", self.name, word)
                return
            if not 0 <= word < 2:
                if value:
                    self._driver_features_beyond_64 = True
                return
            shift = 32 * word
            self._driver_features = (self._driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _features_problem(self, status: int) -> str | None:
        if status & (STATUS_ACKNOWLEDGE | STATUS_DRIVER) != STATUS_ACKNOWLEDGE | STATUS_DRIVER:
            return "FEATURES_OK set before ACKNOWLEDGE and DRIVER"
        unoffered = self._driver_features & ~self._device_features
        if unoffered or self._driver_features_beyond_64:
            bits = feature_names(unoffered) if unoffered else "above 63"
            return f"the driver accepted features the device did not offer (bits {bits})"
        if not self._driver_features >> VIRTIO_F_VERSION_1 & 1:
            return "the driver did not accept VIRTIO_F_VERSION_1 (this transport is modern-only)"
        return self.validate_features(self._driver_features)

    # -- status -----------------------------------------------------------------------------------

    @property
    def status(self) -> int:
        return self._status

    @property
    def operational(self) -> bool:
        """DRIVER_OK is set and neither NEEDS_RESET nor FAILED is."""
        status = self._status
        return bool(status & STATUS_DRIVER_OK) and not status & (STATUS_NEEDS_RESET | STATUS_FAILED)

    @property
    def needs_reset(self) -> bool:
        return bool(self._status & STATUS_NEEDS_RESET)

    def write_status(self, value: int) -> None:
        """The driver wrote the device status: 0 resets, otherwise bits are added in order.

        FEATURES_OK is refused (left clear, so the driver sees it did not stick) when the
        driver accepted unoffered features or not VERSION_1; DRIVER_OK is refused before
        FEATURES_OK. Clearing bits without a reset is ignored, and NEEDS_RESET belongs to
        the device.
        """
        value &= 0xFF
        with self._lock:
            if value == 0:
                self._reset_locked()
                return
            old = self._status
            requested = value & ~STATUS_NEEDS_RESET
            dropped = old & ~requested & ~STATUS_NEEDS_RESET
            if dropped:
                log.warning("%s: driver cleared status bits %#x without a reset; ignored", self.name, dropped)
            new = requested & ~old
            status = old | (new & (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED))
            if new & STATUS_FEATURES_OK:
                problem = self._features_problem(status)
                if problem is not None:
                    log.warning("%s: FEATURES_OK refused: %s", self.name, problem)
                else:
                    status |= STATUS_FEATURES_OK
            if new & STATUS_DRIVER_OK:
                if status & STATUS_FEATURES_OK:
                    status |= STATUS_DRIVER_OK
                else:
                    log.warning("%s: DRIVER_OK refused: FEATURES_OK is not set", self.name)
            self._status = status
            if status & ~old & STATUS_FEATURES_OK:
                indirect = bool(self._driver_features >> VIRTIO_F_INDIRECT_DESC & 1)
                event_idx = bool(self._driver_features >> VIRTIO_F_EVENT_IDX & 1)
                for queue in self.queues:
                    queue.indirect_enabled = indirect
                    queue.event_idx_enabled = event_idx
                self._guarded("feature set-up", self.features_accepted, self._driver_features)
            if status & ~old & STATUS_FAILED:
                log.info("%s: the driver gave up on the device (FAILED)", self.name)
            if status & ~old & STATUS_DRIVER_OK:
                self._guarded("driver start", self.driver_ok)

    def reset(self) -> None:
        """Return to the power-on state: status 0, queues and interrupt status cleared."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._status = 0
        self._driver_features = 0
        self._driver_features_beyond_64 = False
        for queue in self.queues:
            queue.reset()
            queue.indirect_enabled = queue.event_idx_enabled = False
        with self._interrupt_lock:
            self._interrupt_status = 0
            self._signal.acknowledged(False)
        self.stats.resets += 1
        self.last_error = None
        self._guarded("reset", self.device_reset)

    def enter_needs_reset(self, reason: str) -> None:
        """Stop serving queues until the driver resets the device, and tell the driver so."""
        with self._lock:
            self.stats.errors += 1
            self.last_error = reason
            log.error("%s: %s; the device needs a reset", self.name, reason)
            if self._status & STATUS_NEEDS_RESET:
                return
            self._status |= STATUS_NEEDS_RESET
            if self._status & STATUS_DRIVER_OK:
                self.raise_interrupt(INTERRUPT_CONFIG_CHANGE)

    def _guarded(self, what: str, function: Callable[..., object], *args: object) -> None:
        """Run device code so that nothing the guest did can raise out of the device."""
        try:
            function(*args)
        except (VirtqueueError, GuestMemoryError) as error:
            self.enter_needs_reset(f"{what}: {error}" if what else str(error))
        except Exception as error:  # a device-model bug must not take the VMM down
            log.exception("%s: %s failed", self.name, what or "queue processing")
            self.enter_needs_reset(f"{what or 'queue processing'}: internal error: {error!r}")

    # -- state ----------------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """Status, negotiated features, interrupt status, queues and device-type state as plain data."""
        with self._lock:
            return {
                "device_id": self.device_id,
                "status": self._status,
                "driver_features": self._driver_features,
                "driver_features_beyond_64": self._driver_features_beyond_64,
                "interrupt_status": self._interrupt_status,
                "config_generation": self._config_generation,
                "queues": [queue.save_state() for queue in self.queues],
                "device": self.save_device_state(),
            }

    def load_state(self, state: Mapping[str, object]) -> None:
        """Return to a saved state (DeviceStateError for a bad field); signals the guest nothing."""
        reader = StateReader(self.name, state)
        reader.expect("device_id", self.device_id)
        status = reader.integer("status", 0, 0xFF)
        driver_features = reader.integer("driver_features", 0, (1 << 64) - 1)
        beyond_64 = reader.flag("driver_features_beyond_64")
        interrupt_status = reader.integer(
            "interrupt_status", 0, INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
        )
        generation = reader.integer("config_generation", 0, 0xFFFF_FFFF)
        queues = reader.sections("queues", count=len(self.queues))
        with self._lock:
            for queue, queue_state in zip(self.queues, queues, strict=True):
                queue.load_state(queue_state)
            self._status, self._driver_features = status, driver_features
            self._driver_features_beyond_64 = beyond_64
            self._config_generation = generation
            with self._interrupt_lock:
                self._interrupt_status = interrupt_status
            self.last_error = None
            self.load_device_state(reader.section("device"))

    # -- queues (transport side) -------------------------------------------------------------

    @property
    def num_queues(self) -> int:
        return len(self.queues)

    def queue_max_size(self, index: int) -> int:
        """QueueNumMax: 0 for a queue the device does not have."""
        return self.queues[index].max_size if 0 <= index < len(self.queues) else 0

    def configure_queue(
        self,
        index: int,
        *,
        size: int | None = None,
        desc: int | None = None,
        driver: int | None = None,
        device: int | None = None,
    ) -> None:
        """Set a queue's size or area addresses; ignored for a missing or already-ready queue."""
        with self._lock:
            if not 0 <= index < len(self.queues):
                log.debug("%s: set-up of missing queue %d ignored", self.name, index)
                return
            queue = self.queues[index]
            if queue.ready:
                log.warning("%s: queue %d changed while ready; ignored", self.name, index)
                return
            if size is not None:
                queue.size = size
            if desc is not None:
                queue.desc_addr = desc
            if driver is not None:
                queue.avail_addr = driver
            if device is not None:
                queue.used_addr = device

    def set_queue_ready(self, index: int, ready: bool) -> None:
        """QueueReady: 1 validates the layout and enables the queue (NEEDS_RESET if invalid)."""
        with self._lock:
            if not 0 <= index < len(self.queues):
                return
            queue = self.queues[index]
            if not ready:
                queue.ready = False
                return
            if queue.ready:
                return
            try:
                queue.activate()
            except VirtqueueError as error:
                self.enter_needs_reset(str(error))

    def queue_ready(self, index: int) -> bool:
        return 0 <= index < len(self.queues) and self.queues[index].ready

    def queue_notify(self, index: int, notified_ns: int | None = None) -> None:
        """The driver made buffers available in queue ``index`` (from an I/O thread or a vCPU)."""
        stamp = notified_ns if notified_ns is not None else time.perf_counter_ns()
        self.stats.notifications += 1
        with self._lock:
            if self._closed or not self.operational or not self.queue_ready(index):
                self.stats.ignored_notifications += 1
                return
            queue = self.queues[index]
            try:
                # errors from the queue name it already ("queue N: ..."); add nothing here
                self._guarded("", self.process_queue, queue, stamp)
            finally:
                self._flush_used_notifications()

    def queue_avail_index(self, index: int) -> int | None:
        """The driver's current available index of queue ``index`` (unvalidated), or None when
        the queue is not being served; for an I/O thread that polls for new chains."""
        with self._lock:
            if self._closed or not self.operational or not self.queue_ready(index):
                return None
            return self.queues[index].peek_avail_idx()

    def run_host_event(self, what: str, callback: Callable[[], None]) -> None:
        """Run a host-side event handler (rx frame, console input) under the device lock."""
        with self._lock:
            if self._closed:
                return
            try:
                self._guarded(what, callback)
            finally:
                self._flush_used_notifications()

    def signal_used(self, queue: Virtqueue) -> int | None:
        """Send a used-buffer notification if the driver wants one; its perf_counter_ns time or None."""
        if queue.needs_notification():
            return self.raise_interrupt(INTERRUPT_USED_BUFFER)
        return None

    def _flush_used_notifications(self) -> None:
        for queue in self.queues:
            if queue.unsignalled:
                try:
                    self.signal_used(queue)
                except VirtqueueError as error:
                    self.enter_needs_reset(str(error))

    # -- interrupts ----------------------------------------------------------------------------

    def set_interrupt_signal(self, signal: InterruptSignal) -> None:
        with self._interrupt_lock:
            self._signal = signal

    @property
    def interrupt_signal(self) -> InterruptSignal:
        return self._signal

    @property
    def interrupt_status(self) -> int:
        return self._interrupt_status

    def raise_interrupt(self, bits: int) -> int:
        """Set ``bits`` in InterruptStatus and signal the guest; returns the perf_counter_ns time."""
        with self._interrupt_lock:
            self._interrupt_status |= bits
            self._signal.trigger()
            stamp = time.perf_counter_ns()
        self.stats.interrupts += 1
        if bits & INTERRUPT_CONFIG_CHANGE:
            self.stats.config_interrupts += 1
        return stamp

    def acknowledge_interrupt(self, bits: int) -> None:
        """InterruptACK: clear ``bits``; a level-triggered line drops once nothing is pending."""
        with self._interrupt_lock:
            self._interrupt_status &= ~bits
            self._signal.acknowledged(self._interrupt_status != 0)

    def resample_interrupt(self) -> None:
        """The guest EOI'd a resampling irqfd: re-assert it while a status bit is still set."""
        with self._interrupt_lock:
            if self._interrupt_status:
                self._signal.trigger()

    # -- configuration space ------------------------------------------------------------------

    @property
    def config_generation(self) -> int:
        return self._config_generation

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of configuration space at ``offset``; zeros past its end."""
        data = self.config_space()[offset : offset + size] if offset >= 0 else b""
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._guarded("config write", self.config_write, offset, data)

    def config_changed(self) -> None:
        """The device changed its configuration: bump the generation and tell a running driver."""
        with self._lock:
            self._config_generation = (self._config_generation + 1) & 0xFFFF_FFFF
            if self._status & STATUS_DRIVER_OK:
                self.raise_interrupt(INTERRUPT_CONFIG_CHANGE)

    # -- lifetime ---------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release host resources; later notifications are ignored."""
        with self._lock:
            self._closed = True
            for queue in self.queues:  # drop the queues' views so guest RAM can be unmapped
                queue.release()
