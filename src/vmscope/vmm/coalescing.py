"""Writes that need no exit: KVM queues them in its coalesced ring and we deliver them later.

A write to a port or address that no device claims is ignored (and counted), and a write to a
device whose writes are side-effect free (``Device.writes_are_side_effect_free``: the POST
port 0x80) only records a value. Neither needs the guest stopped, so the first time such a
write exits, a coalesced zone is registered for it (kvm.coalesced): from then on KVM appends
those writes to its ring page and resumes the guest at once (about 1.5 us at CPL0 on a
kvm_pvm host instead of a 10+ us exit).

Delivery keeps what the guest and the profiler see unchanged except for the time:
- the ring is drained, oldest first, on every KVM_RUN return (exit or kick) before that exit is
  handled, whenever exit statistics are read, and when the last vCPU stops, so a device sees
  its writes in guest order and before any later read of it;
- each write goes through the bus like an exit would (unclaimed-write counters, the device's
  ``write``) and is counted under the exit key of its own access ("out coalesced" / "write
  coalesced", exit_keys) with the time its delivery took; the time a device stamps is the
  delivery time, at most one exit after the guest wrote;
- the ring is VM-wide and its entries name no vCPU: a write is filed under the vCPU whose
  exit delivered it (vCPU 0 when a reader or the stop did), exact with one vCPU;
- an address an exit hook asks for is never coalesced (hooks see every exit they ask for, the
  profiler's included), and a zone is dropped, after delivering what it queued, when a hook
  comes to want it or the bus map changes under it (a PCI BAR moved there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from vmscope.bus import Bus
from vmscope.errors import KvmError
from vmscope.kvm import Vm
from vmscope.kvm.coalesced import CoalescedRing
from vmscope.vmm.exit_keys import (
    ADDRESS_MASK,
    IO_OUT_COALESCED_KEY,
    IO_OUT_KEY,
    MMIO_WRITE_COALESCED_KEY,
    MMIO_WRITE_KEY,
)
from vmscope.vmm.exit_stats import VcpuExitStats

log = logging.getLogger("vmscope.coalescing")

#: zones registered at most (KVM allows 100 per VM); past it writes just exit
MAX_ZONES = 64
#: the widest write a zone is made for (a kvm_coalesced_mmio entry holds 8 bytes)
MAX_WRITE = 8

#: (pio, base, size)
Zone = tuple[bool, int, int]


class CoalescedWrites:
    """The machine's coalesced zones and the delivery of what KVM queued in them."""

    def __init__(
        self,
        vm: Vm,
        ring: CoalescedRing,
        pio_bus: Bus,
        mmio_bus: Bus,
        wanted_by_hooks: Callable[[int], bool],
        *,
        pio: bool,
        mmio: bool,
    ) -> None:
        self._vm = vm
        self.ring = ring
        self._buses = {True: pio_bus, False: mmio_bus}
        self._enabled = {True: pio, False: mmio}
        self._wanted_by_hooks = wanted_by_hooks
        self._zones: list[Zone] = []
        # one consumer index: deliveries from vCPU threads and readers take turns
        self._lock = threading.RLock()
        #: where deliveries not made on a vCPU's own exit are filed (vCPU 0's stats)
        self.default_stats: VcpuExitStats | None = None
        pio_bus.map_listeners.append(self._map_changed)
        mmio_bus.map_listeners.append(self._map_changed)

    @property
    def zones(self) -> tuple[Zone, ...]:
        return tuple(self._zones)

    # -- zones ----------------------------------------------------------------------------

    def offer(self, pio: bool, address: int, size: int) -> None:
        """A write to ``address`` exited for the first time: coalesce later ones if it can.

        Called on the vCPU thread when the exit loop binds the address's write handler."""
        if not self._enabled[pio] or not 0 < size <= MAX_WRITE or len(self._zones) >= MAX_ZONES:
            return
        zone = self._zone_for(pio, address, size)
        if zone is None:
            return
        with self._lock:
            if any(_overlap(zone, other) for other in self._zones) or len(self._zones) >= MAX_ZONES:
                return
            try:
                self._vm.register_coalesced_zone(zone[1], zone[2], pio=pio)
            except KvmError as error:  # e.g. the host's zone limit: those writes keep exiting
                log.debug("no coalesced zone at %#x: %s", address, error)
                self._enabled[pio] = False
                return
            self._zones.append(zone)

    def _zone_for(self, pio: bool, address: int, size: int) -> Zone | None:
        """The range to coalesce for a write of ``size`` at ``address``, or None."""
        bus = self._buses[pio]
        target = bus.lookup(address)
        if target is None:
            # just the bytes written, each unclaimed, so no device's window is covered
            if any(bus.lookup(address + i) is not None for i in range(1, size)):
                return None
            zone: Zone = (pio, address, size)
        else:
            device, base = target
            if not device.writes_are_side_effect_free:
                return None
            mapping = next(m for m in bus.mappings if m.base == base)
            zone = (pio, base, mapping.length)
        if self._hooked(zone):
            return None
        return zone

    def _hooked(self, zone: Zone) -> bool:
        pio, base, size = zone
        key = IO_OUT_KEY if pio else MMIO_WRITE_KEY
        return any(self._wanted_by_hooks(key | ((base + i) & ADDRESS_MASK)) for i in range(min(size, 16)))

    def revalidate(self) -> None:
        """Drop zones that hooks now want or that the bus map no longer allows (after
        delivering what they queued)."""
        with self._lock:
            if not self._zones:
                return
            self.deliver(None)
            keep: list[Zone] = []
            for zone in self._zones:
                pio, base, size = zone
                if self._zone_for(pio, base, size) == zone:  # still unclaimed or the same device
                    keep.append(zone)
                    continue
                try:
                    self._vm.unregister_coalesced_zone(base, size, pio=pio)
                except KvmError as error:
                    log.warning("could not drop the coalesced zone at %#x: %s", base, error)
            self._zones = keep

    def _map_changed(self) -> None:
        self.revalidate()

    # -- delivery -------------------------------------------------------------------------

    def deliver(self, stats: VcpuExitStats | None) -> None:
        """Hand every queued write to its bus in order and count it in ``stats`` (or the
        default stats)."""
        with self._lock:
            writes = self.ring.take()
            if not writes:
                return
            target = stats if stats is not None else self.default_stats
            record = target.coalesced.append if target is not None else None
            clock = time.perf_counter_ns
            buses = self._buses
            for pio, address, data in writes:
                bus = buses[pio]
                write = bus.write_handlers.get(address) or bus.bind_write(address)
                started = clock()
                try:
                    write(data)
                except Exception as error:  # a device bug must not take the VM down
                    bus.write_failed(address, error)
                if record is not None:
                    key = IO_OUT_COALESCED_KEY if pio else MMIO_WRITE_COALESCED_KEY
                    record((key | (address & ADDRESS_MASK), clock() - started))

    def close(self) -> None:
        self.deliver(None)
        self.ring.close()


def _overlap(a: Zone, b: Zone) -> bool:
    return a[0] == b[0] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]
