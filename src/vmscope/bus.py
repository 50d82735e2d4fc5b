"""Port-I/O and MMIO buses: map guest address ranges to devices.

A bus owns no policy about KVM exits; the vCPU loop hands it (address, data) and it finds
the device. Accesses that no device claims read as all-ones and are ignored on write, as
on real hardware, and are counted per address because a guest probing absent hardware is
a profiling signal. A device that raises or returns the wrong number of bytes is logged
and counted; the guest sees all-ones and the VM keeps running.
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from vmscope.devices.base import Device
from vmscope.errors import BusConflictError

log = logging.getLogger("vmscope.bus")


class Mapping(NamedTuple):
    """One device window on a bus."""

    base: int
    length: int
    device: Device

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Address ranges to devices, with a per-address lookup cache for the exit hot path."""

    def __init__(self, name: str, address_limit: int) -> None:
        self.name = name
        self.address_limit = address_limit
        self._mappings: list[Mapping] = []
        self._bases: list[int] = []
        # address -> (device, base); filled on first access so repeat exits cost one dict lookup
        self._cache: dict[int, tuple[Device, int] | None] = {}
        #: (address, access size) -> count of accesses no device claimed
        self.unclaimed_reads: Counter[tuple[int, int]] = Counter()
        self._unclaimed_writes: Counter[tuple[int, int]] = Counter()
        #: address -> the data of unclaimed writes made through a bound handler, not yet counted:
        #: the handler is this list's C-level append, which is all such a write costs the exit loop
        self._pending_unclaimed_writes: dict[int, list[bytes]] = {}
        self.device_errors: Counter[str] = Counter()
        #: called after a device failure is logged; the machine uses it to stop in strict mode
        self.on_device_error: Callable[[Device, Exception], None] | None = None
        #: address -> write(data), bound by :meth:`bind_write`; cleared in place when the map
        #: changes, so an exit loop holding this dict never calls a stale device
        self.write_handlers: dict[int, Callable[[bytes], None]] = {}
        # a handler bound while another thread changes the map must not be stored stale
        self._map_lock = threading.Lock()
        #: called (outside the bus's lock) after a window was added or removed
        self.map_listeners: list[Callable[[], None]] = []

    # -- registration ---------------------------------------------------------------------

    def register(self, base: int, length: int, device: Device) -> None:
        """Map ``device`` at [base, base+length); overlapping another window is an error."""
        if length <= 0 or base < 0 or base + length > self.address_limit:
            raise BusConflictError(
                f"{self.name} window {base:#x}+{length:#x} for {device.name} is outside the bus"
            )
        with self._map_lock:
            self._insert(base, length, device)
        self._notify_map_changed()

    def _insert(self, base: int, length: int, device: Device) -> None:
        index = bisect.bisect_right(self._bases, base)
        for neighbour in self._mappings[max(0, index - 1) : index + 1]:
            if base < neighbour.end and neighbour.base < base + length:
                raise BusConflictError(
                    f"{self.name} window {base:#x}-{base + length - 1:#x} for {device.name} overlaps "
                    f"{neighbour.device.name} at {neighbour.base:#x}-{neighbour.end - 1:#x}"
                )
        self._mappings.insert(index, Mapping(base, length, device))
        self._bases.insert(index, base)
        self._forget_bindings()

    def unregister(self, device: Device) -> None:
        with self._map_lock:
            keep = [m for m in self._mappings if m.device is not device]
            self._mappings = keep
            self._bases = [m.base for m in keep]
            self._forget_bindings()
        self._notify_map_changed()

    def _notify_map_changed(self) -> None:
        for listener in list(self.map_listeners):
            listener()

    def _forget_bindings(self) -> None:
        self._cache.clear()
        self.write_handlers.clear()

    @property
    def mappings(self) -> tuple[Mapping, ...]:
        return tuple(self._mappings)

    def lookup(self, address: int) -> tuple[Device, int] | None:
        """(device, window base) for ``address``, or None when nothing is mapped there."""
        try:
            return self._cache[address]
        except KeyError:
            pass
        index = bisect.bisect_right(self._bases, address) - 1
        found: tuple[Device, int] | None = None
        if index >= 0:
            mapping = self._mappings[index]
            if address < mapping.end:
                found = (mapping.device, mapping.base)
        if len(self._cache) < 65536:  # a guest scanning addresses must not grow it without bound
            self._cache[address] = found
        return found

    # -- access ---------------------------------------------------------------------------

    def read(self, address: int, size: int) -> bytes:
        target = self._cache.get(address) if address in self._cache else self.lookup(address)
        if target is None:
            self.unclaimed_reads[address, size] += 1
            return b"\xff" * size
        device, base = target
        try:
            data = device.read(address - base, size)
        except Exception as error:  # a device bug must not take the VM down
            self._device_failed(device, "read", address, error)
            return b"\xff" * size
        if len(data) != size:
            self._device_failed(
                device, "read", address, ValueError(f"returned {len(data)} bytes, not {size}")
            )
            return (bytes(data) + b"\xff" * size)[:size]
        return data

    def write(self, address: int, data: bytes) -> None:
        target = self._cache.get(address) if address in self._cache else self.lookup(address)
        if target is None:
            self._unclaimed_writes[address, len(data)] += 1
            return
        device, base = target
        try:
            device.write(address - base, data)
        except Exception as error:  # a device bug must not take the VM down
            self._device_failed(device, "write", address, error)

    def bind_write(self, address: int) -> Callable[[bytes], None]:
        """``write(data)`` for ``address``, resolved once: the device's own write with the
        offset bound (the exit loop catches its exceptions and reports them through
        :meth:`write_failed`), or, where no device claims it, an append to the address's pending
        unclaimed writes (counted by :meth:`settle_unclaimed_writes`). Kept in
        :attr:`write_handlers`."""
        with self._map_lock:
            target = self.lookup(address)
            handler: Callable[[bytes], None]
            if target is None:
                handler = self._pending_unclaimed_writes.setdefault(address, []).append
            else:
                device, base = target
                handler = functools.partial(device.write, address - base)
            if len(self.write_handlers) < 65536:  # bounded like the lookup cache
                self.write_handlers[address] = handler
        return handler

    @property
    def unclaimed_writes(self) -> Counter[tuple[int, int]]:
        """(address, access size) -> count of writes no device claimed, every one so far."""
        self.settle_unclaimed_writes()
        return self._unclaimed_writes

    def settle_unclaimed_writes(self) -> None:
        """Count the pending unclaimed writes of bound handlers (any thread; the exit loops call
        it when they fold their logs, which bounds the pending lists)."""
        counts = self._unclaimed_writes
        with self._map_lock:
            for address, pending in self._pending_unclaimed_writes.items():
                # copy and delete are each one C call, and appends only add at the end
                taken = len(pending)
                if taken:
                    sizes = Counter(map(len, pending[:taken]))
                    del pending[:taken]
                    for size, count in sizes.items():
                        counts[address, size] += count

    def write_failed(self, address: int, error: Exception) -> None:
        """A bound write handler raised: log and count it like :meth:`write` does."""
        target = self.lookup(address)
        if target is None:  # the counter itself cannot fail; this is a VMM bug
            raise error
        self._device_failed(target[0], "write", address, error)

    def _device_failed(self, device: Device, access: str, address: int, error: Exception) -> None:
        self.device_errors[device.name] += 1
        log.error("device %s: %s at %s %#x failed: %s", device.name, access, self.name, address, error)
        if self.on_device_error is not None:
            self.on_device_error(device, error)


class PioBus(Bus):
    """The 64 KiB x86 I/O port space."""

    def __init__(self) -> None:
        super().__init__("port", 0x1_0000)


class MmioBus(Bus):
    """Guest-physical MMIO space (any address not backed by RAM)."""

    def __init__(self) -> None:
        super().__init__("mmio", 1 << 52)
