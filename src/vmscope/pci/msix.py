"""MSI-X (PCI Local Bus 3.0 section 6.8.2): capability, vector table and pending-bit array, and delivery.

:class:`MsixCapability` adds the capability to a :class:`PciDevice` and serves the table and
PBA inside one of its memory BARs. Each table entry holds a message address, message data
and a vector-control word whose bit 0 masks the vector (set at reset). The driver enables
MSI-X (and may mask the whole function) through the capability's Message Control word.

Firing a vector (:meth:`MsixCapability.fire`, from an I/O thread or a vCPU):

* MSI-X disabled: nothing (the caller falls back to INTx);
* function or vector masked: the vector's PBA bit is set, and the message is sent when the
  driver unmasks it (the bit is then cleared);
* otherwise the message goes to the :class:`MsiSink`.

An address outside the x86 interrupt range (0xFEEx_xxxx) is never sent: the guest chose it,
and it could name anything. The sink hears of a message when it is first used and whenever
it changed since, so a driver rewriting entries costs nothing until the vector fires.

Sinks. :class:`IrqfdMsiSink` gives every vector a GSI (>= 24) with a KVM routing entry of
type MSI and an irqfd on it: firing a vector is one eventfd write, and KVM injects the
interrupt without any exit. :class:`GsiRouting` keeps the VM's whole routing table, since
KVM_SET_GSI_ROUTING replaces it: KVM's default identity routes for GSIs 0-23 (IO-APIC pins,
and the PICs for 0-15) stay in it. :class:`DirectMsiSink` uses KVM_SIGNAL_MSI instead (one
ioctl per interrupt, no routes), for machines without I/O threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Protocol

from vmscope.devices.state import StateReader
from vmscope.errors import ConfigError
from vmscope.kvm import structs as s
from vmscope.pci.device import CAP_ID_MSIX, PciDevice

log = logging.getLogger("vmscope.pci.msix")

MSIX_ENTRY_SIZE = 16
MSIX_MAX_VECTORS = 2048
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
VECTOR_CONTROL_MASKED = 1 << 0
#: x86 MSI messages are writes to 0xFEEx_xxxx (the local APICs)
MSI_ADDRESS_BASE = 0xFEE0_0000
MSI_ADDRESS_MASK = 0xFFF0_0000

# KVM routing (linux/kvm.h)
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
IO_APIC_PINS = 24
#: the first GSI handed out for MSI routes (0-23 are the IO-APIC's pins)
FIRST_MSI_GSI = IO_APIC_PINS
#: KVM_MAX_IRQ_ROUTES on x86
MAX_GSI_ROUTES = 4096


class MsiSink(Protocol):
    """Where an unmasked MSI-X message goes."""

    def program(self, vector: int, address: int, data: int) -> None:
        """Vector ``vector`` will be sent as (``address``, ``data``) from now on."""

    def signal(self, vector: int) -> None:
        """Send vector ``vector``'s message (as last programmed)."""


class RecordingMsiSink:
    """Remembers messages instead of sending them; for tests."""

    def __init__(self) -> None:
        self.programmed: dict[int, tuple[int, int]] = {}
        self.sent: list[tuple[int, int, int]] = []  # (vector, address, data)

    def program(self, vector: int, address: int, data: int) -> None:
        self.programmed[vector] = (address, data)

    def signal(self, vector: int) -> None:
        address, data = self.programmed[vector]
        self.sent.append((vector, address, data))


class MsixCapability:
    """MSI-X for one PCI function: ``vectors`` entries, table and PBA in memory BAR ``bar``."""

    def __init__(
        self,
        function: PciDevice,
        vectors: int,
        *,
        bar: int,
        table_offset: int,
        pba_offset: int,
        sink: MsiSink,
    ) -> None:
        if not 1 <= vectors <= MSIX_MAX_VECTORS:
            raise ConfigError(f"{function.name}: {vectors} MSI-X vectors (1 to {MSIX_MAX_VECTORS} allowed)")
        if table_offset % 8 or pba_offset % 8:
            raise ConfigError(f"{function.name}: MSI-X table and PBA offsets must be 8-byte aligned")
        self.function = function
        self.count = vectors
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.sink = sink
        self._table = bytearray(MSIX_ENTRY_SIZE * vectors)
        self._pending = [False] * vectors
        self._sent_messages: list[tuple[int, int] | None] = [None] * vectors
        self._enabled = False
        self._function_masked = False
        self._lock = threading.Lock()
        #: messages sent / left pending / dropped for a bad address or vector, for statistics and tests
        self.sent = 0
        self.deferred = 0
        self.dropped = 0
        self._mode_listeners: list[_ModeListener] = []
        for vector in range(vectors):
            self._table[MSIX_ENTRY_SIZE * vector + 12] = VECTOR_CONTROL_MASKED
        body = (
            (vectors - 1).to_bytes(2, "little")
            + (table_offset | bar).to_bytes(4, "little")
            + (pba_offset | bar).to_bytes(4, "little")
        )
        writable = bytes([0x00, (CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8])
        self.offset = function.add_capability(
            CAP_ID_MSIX, body, writable=writable, on_write=self._control_written
        )

    # -- sizes --------------------------------------------------------------------------------------

    @property
    def table_size(self) -> int:
        return MSIX_ENTRY_SIZE * self.count

    @property
    def pba_size(self) -> int:
        return 8 * ((self.count + 63) // 64)

    def in_table(self, offset: int) -> bool:
        return self.table_offset <= offset < self.table_offset + self.table_size

    def in_pba(self, offset: int) -> bool:
        return self.pba_offset <= offset < self.pba_offset + self.pba_size

    # -- state ----------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def function_masked(self) -> bool:
        return self._function_masked

    def add_mode_listener(self, listener: _ModeListener) -> None:
        """Call ``listener(enabled)`` after the driver enabled or disabled MSI-X."""
        self._mode_listeners.append(listener)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(message address, message data, masked) of ``vector``."""
        base = MSIX_ENTRY_SIZE * vector
        address = int.from_bytes(self._table[base : base + 8], "little")
        data = int.from_bytes(self._table[base + 8 : base + 12], "little")
        return address, data, bool(self._table[base + 12] & VECTOR_CONTROL_MASKED)

    def pending(self, vector: int) -> bool:
        return self._pending[vector]

    def _control_written(self) -> None:
        control = self.function.u16(self.offset + 2)
        with self._lock:
            was_enabled = self._enabled
            self._enabled = bool(control & CONTROL_ENABLE)
            self._function_masked = bool(control & CONTROL_FUNCTION_MASK)
            self._deliver_unmasked_pending()
        if self._enabled != was_enabled:
            log.debug("%s: MSI-X %s", self.function.name, "enabled" if self._enabled else "disabled")
            for listener in self._mode_listeners:
                listener(self._enabled)

    def reset(self) -> None:
        """The power-on state: disabled, every vector masked, nothing pending."""
        with self._lock:
            self._table[:] = bytes(len(self._table))
            for vector in range(self.count):
                self._table[MSIX_ENTRY_SIZE * vector + 12] = VECTOR_CONTROL_MASKED
            self._pending = [False] * self.count
            self._enabled = self._function_masked = False
        control = self.function.u16(self.offset + 2) & ~(CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
        self.function.set_u16(self.offset + 2, control)

    def save_state(self) -> dict[str, object]:
        """Table and pending bits; enable and function mask live in the function's config space."""
        with self._lock:
            return {
                "table": self._table.hex(),
                "pending": [vector for vector, pending in enumerate(self._pending) if pending],
            }

    def load_state(self, reader: StateReader) -> None:
        """Load after the function's config space: enable and mask are re-read from it."""
        table = reader.hex_bytes("table", len(self._table))
        pending = reader.integers("pending", maximum=self.count - 1, max_count=self.count)
        with self._lock:
            self._table[:] = table
            self._pending = [vector in pending for vector in range(self.count)]
            self._sent_messages = [None] * self.count
            self._enabled = False  # so that the listeners below hear the loaded mode
        self._control_written()

    # -- table and PBA (BAR accesses) -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """A BAR read at ``offset`` inside the table or the PBA (bytes past either read as 0)."""
        with self._lock:
            if self.in_table(offset):
                start = offset - self.table_offset
                data = bytes(self._table[start : start + size])
            elif self.in_pba(offset):
                bits = sum(1 << vector for vector, pending in enumerate(self._pending) if pending)
                image = bits.to_bytes(self.pba_size, "little")
                start = offset - self.pba_offset
                data = image[start : start + size]
            else:
                data = b""
        return data + bytes(size - len(data))

    def write(self, offset: int, data: bytes) -> None:
        """A BAR write inside the table (the PBA is read-only)."""
        if not self.in_table(offset):
            return
        start = offset - self.table_offset
        end = min(start + len(data), len(self._table))
        with self._lock:
            for at in range(start, end):
                value = data[at - start]
                field = at % MSIX_ENTRY_SIZE
                if field == 0:
                    value &= 0xFC  # message address bits 1:0 are reserved
                elif field == 12:
                    value &= VECTOR_CONTROL_MASKED
                elif field > 12:
                    value = 0  # vector control bits 31:1 are reserved
                self._table[at] = value
            self._deliver_unmasked_pending()

    # -- delivery -------------------------------------------------------------------------------------

    def fire(self, vector: int) -> bool:
        """Send ``vector`` now or mark it pending; False when MSI-X is off or the vector is invalid."""
        with self._lock:
            if not self._enabled:
                return False
            if not 0 <= vector < self.count:
                self.dropped += 1
                return False
            if self._function_masked or self.entry(vector)[2]:
                self._pending[vector] = True
                self.deferred += 1
                return True
            self._send(vector)
            return True

    def _deliver_unmasked_pending(self) -> None:
        if not self._enabled or self._function_masked:
            return
        for vector, pending in enumerate(self._pending):
            if pending and not self.entry(vector)[2]:
                self._pending[vector] = False
                self._send(vector)

    def _send(self, vector: int) -> None:
        address, data, _ = self.entry(vector)
        if address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE or address >> 32:
            self.dropped += 1
            log.warning(
                "%s: MSI-X vector %d has address %#x, not an interrupt address; dropped",
                self.function.name,
                vector,
                address,
            )
            return
        message = (address, data)
        if self._sent_messages[vector] != message:
            self.sink.program(vector, address, data)
            self._sent_messages[vector] = message
        self.sink.signal(vector)
        self.sent += 1


class _ModeListener(Protocol):
    def __call__(self, enabled: bool, /) -> None: ...


# -- KVM delivery ---------------------------------------------------------------------------------


class RoutingVm(Protocol):
    """The :class:`vmscope.kvm.Vm` methods MSI delivery uses."""

    def set_gsi_routing(self, entries: list[s.kvm_irq_routing_entry]) -> None: ...

    def register_irqfd(self, event_fd: int, gsi: int, resample_fd: int | None = None) -> None: ...

    def unregister_irqfd(self, event_fd: int, gsi: int) -> None: ...

    def signal_msi(self, address: int, data: int) -> int: ...


def default_irqchip_routes() -> list[tuple[int, int, int]]:
    """KVM's routes after KVM_CREATE_IRQCHIP as (gsi, irqchip, pin): IO-APIC 0-23, PICs for 0-15."""
    routes = []
    for gsi in range(IO_APIC_PINS):
        routes.append((gsi, KVM_IRQCHIP_IOAPIC, gsi))
        if gsi < 16:
            routes.append((gsi, KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE, gsi % 8))
    return routes


class GsiRouting:
    """The VM's GSI routing table: the default irqchip routes plus MSI routes on GSIs >= 24."""

    def __init__(self, vm: RoutingVm, *, limit: int = MAX_GSI_ROUTES) -> None:
        self.vm = vm
        self.limit = limit
        self._msi: dict[int, tuple[int, int]] = {}
        self._allocated: set[int] = set()
        self._next = FIRST_MSI_GSI
        self._lock = threading.Lock()
        #: KVM_SET_GSI_ROUTING calls made, for statistics and tests
        self.commits = 0

    def allocate(self) -> int:
        """A GSI for an MSI route (no route is installed until :meth:`set_msi`)."""
        with self._lock:
            if self._next >= self.limit:
                raise ConfigError(f"no GSI left for MSI routes: KVM allows {self.limit} routes")
            gsi = self._next
            self._next += 1
            self._allocated.add(gsi)
            return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to the MSI (``address``, ``data``) and install the table if that changed it."""
        with self._lock:
            if gsi not in self._allocated:
                raise ConfigError(f"GSI {gsi} was not allocated for MSI routing")
            if self._msi.get(gsi) == (address, data):
                return
            self._msi[gsi] = (address, data)
            self._commit_locked()

    def release(self, gsi: int) -> None:
        """Drop ``gsi``'s route (its number is not reused)."""
        with self._lock:
            self._allocated.discard(gsi)
            if self._msi.pop(gsi, None) is not None:
                self._commit_locked()

    def msi_routes(self) -> dict[int, tuple[int, int]]:
        with self._lock:
            return dict(self._msi)

    def entries(self) -> list[s.kvm_irq_routing_entry]:
        """The whole table as KVM structures, irqchip routes first."""
        with self._lock:
            return self._entries_locked()

    def _entries_locked(self) -> list[s.kvm_irq_routing_entry]:
        entries = []
        for gsi, chip, pin in default_irqchip_routes():
            entry = s.kvm_irq_routing_entry(gsi=gsi, type=KVM_IRQ_ROUTING_IRQCHIP)
            entry.u.irqchip.irqchip = chip
            entry.u.irqchip.pin = pin
            entries.append(entry)
        for gsi, (address, data) in sorted(self._msi.items()):
            entry = s.kvm_irq_routing_entry(gsi=gsi, type=KVM_IRQ_ROUTING_MSI)
            entry.u.msi.address_lo = address & 0xFFFF_FFFF
            entry.u.msi.address_hi = address >> 32
            entry.u.msi.data = data & 0xFFFF_FFFF
            entries.append(entry)
        return entries

    def _commit_locked(self) -> None:
        self.vm.set_gsi_routing(self._entries_locked())
        self.commits += 1


class IrqfdMsiSink:
    """One GSI + MSI route + irqfd per vector: a vector fires with one eventfd write, no exit."""

    def __init__(self, vm: RoutingVm, routing: GsiRouting, vectors: int) -> None:
        self.vm = vm
        self.routing = routing
        self.gsis: list[int] = []
        self.fds: list[int] = []
        try:
            for _ in range(vectors):
                gsi = routing.allocate()
                self.gsis.append(gsi)
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.fds.append(fd)
                vm.register_irqfd(fd, gsi)
        except BaseException:
            self.close()
            raise

    def program(self, vector: int, address: int, data: int) -> None:
        self.routing.set_msi(self.gsis[vector], address, data)

    def signal(self, vector: int) -> None:
        try:
            os.eventfd_write(self.fds[vector], 1)
        except BlockingIOError:  # counter saturated: the interrupt is on its way anyway
            pass

    def close(self) -> None:
        """Unregister the irqfds, drop the routes, close the eventfds."""
        for index, fd in enumerate(self.fds):
            if index < len(self.gsis):
                with contextlib.suppress(Exception):
                    self.vm.unregister_irqfd(fd, self.gsis[index])
            with contextlib.suppress(OSError):
                os.close(fd)
        for gsi in self.gsis:
            with contextlib.suppress(Exception):
                self.routing.release(gsi)
        self.fds, self.gsis = [], []


class DirectMsiSink:
    """KVM_SIGNAL_MSI per interrupt (no routes, no eventfds): for vCPU-thread delivery."""

    def __init__(self, vm: RoutingVm) -> None:
        self.vm = vm
        self._messages: dict[int, tuple[int, int]] = {}

    def program(self, vector: int, address: int, data: int) -> None:
        self._messages[vector] = (address, data)

    def signal(self, vector: int) -> None:
        address, data = self._messages[vector]
        try:
            self.vm.signal_msi(address, data)
        except Exception as error:  # a failed injection must not take the device down
            log.warning("KVM_SIGNAL_MSI(%#x, %#x) failed: %s", address, data, error)
