"""Put a virtio device on a machine's PCI bus (modern virtio-pci), with or without an I/O thread.

The machine's PCI platform (:func:`pci_platform`) is made on first use and kept in the
machine's ``pci_platform`` slot, and it adds the host bridge to the machine's firmware
contributions (the DSDT's PCI0): one :class:`PciBus` at ports 0xCF8-0xCFF
(8 ports), its MMIO window (0xE000_0000 + 256 MiB, see :mod:`vmscope.pci.bus`) on the MMIO
bus, the machine's :class:`GsiRouting` table and the shared INTx lines.

Per device (:func:`attach_virtio_pci`):

* slot: the lowest free one from 1 (00:00.0 is the host bridge); BAR 0: the next free,
  naturally aligned 32 KiB of the window, pre-assigned so guests without firmware find it
  programmed (Linux keeps BARs that lie inside the host bridge's _CRS window);
* MSI-X: one vector per queue plus one for configuration changes. With I/O threads every
  vector gets its own GSI from 24 up, a KVM routing entry of type MSI (written when the vector
  first fires with a message, and when the message changed) and an irqfd, so the I/O thread
  raises it with one eventfd write and the vCPU never exits. Without them, KVM_SIGNAL_MSI;
* INTx (for drivers that do not enable MSI-X): pin A on GSI 16 + slot mod 8, level-triggered
  (the ACPI _PRT says so, :func:`vmscope.pci.bus.pci_host_bridge_aml`). With I/O threads an
  irqfd with a resample eventfd; without, KVM_IRQ_LINE held while the ISR is non-zero, through
  a wired-OR so slots sharing a GSI do not lower each other's line;
* notifications: with I/O threads one ioeventfd per queue on its own notification address,
  length 0 (any write width; KVM's fast MMIO path) or, where KVM refuses that, 2 bytes with
  datamatch = the queue index (the value Linux writes). They follow the BAR: registered while
  it decodes, moved with it, removed while Memory Space is off.

Only ``Machine`` / ``Vm`` methods are used; every ioctl stays in :mod:`vmscope.kvm`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from vmscope.devices.base import Device, InterruptLine
from vmscope.errors import ConfigError, KvmError
from vmscope.firmware import FirmwareContribution, FirmwareContributions
from vmscope.kvm import structs as s
from vmscope.pci.bus import CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, PciBus, intx_gsi, pci_host_bridge_aml
from vmscope.pci.device import COMMAND_INTX_DISABLE, PCI_INTERRUPT_LINE
from vmscope.pci.msix import DirectMsiSink, GsiRouting, IrqfdMsiSink, MsiSink
from vmscope.virtio.attach import MachineLike, VmLike
from vmscope.virtio.attachment import VirtioAttachment
from vmscope.virtio.device import (
    EventfdSignal,
    InterruptSignal,
    LineLevelSignal,
    VirtioDevice,
)
from vmscope.virtio.iothread import VirtioIoThread, drain_eventfd
from vmscope.virtio.pci import BAR_SIZE, VirtioPciTransport

log = logging.getLogger("vmscope.virtio.pci_attach")


class PciVmLike(VmLike, Protocol):
    """The :class:`vmscope.kvm.Vm` methods a PCI attachment uses beyond virtio-mmio's."""

    def set_gsi_routing(self, entries: list[s.kvm_irq_routing_entry]) -> None: ...

    def signal_msi(self, address: int, data: int) -> int: ...


class PciMachineLike(MachineLike, Protocol):
    """The :class:`vmscope.vmm.machine.Machine` members a PCI attachment uses."""

    @property
    def vm(self) -> PciVmLike: ...

    def add_pio_device(self, base: int, length: int, device: Device) -> None: ...

    #: the machine's PCI platform, None until the first PCI attachment makes it
    pci_platform: PciPlatform | None
    #: where the platform adds the host bridge's DSDT description
    firmware: FirmwareContributions


class WiredOrLine:
    """Several level-triggered sources on one :class:`InterruptLine`: high while any source is."""

    def __init__(self, line: InterruptLine) -> None:
        self._line = line
        self._levels: dict[int, bool] = {}
        self._lock = threading.Lock()

    def source(self) -> InterruptLine:
        with self._lock:
            key = len(self._levels)
            self._levels[key] = False
        return _LineSource(self, key)

    def _set(self, key: int, asserted: bool) -> None:
        with self._lock:
            self._levels[key] = asserted
            self._line.set_level(any(self._levels.values()))


class _LineSource:
    def __init__(self, shared: WiredOrLine, key: int) -> None:
        self._shared = shared
        self._key = key

    def set_level(self, asserted: bool) -> None:
        self._shared._set(self._key, asserted)


@dataclass
class PciPlatform:
    """A machine's PCI bus, its GSI routing table and its shared INTx lines."""

    bus: PciBus
    routing: GsiRouting | None = None
    lines: dict[int, WiredOrLine] = field(default_factory=dict)

    def firmware_contribution(self) -> FirmwareContribution:
        """The host bridge (PCI0) with its windows and _PRT, for the DSDT."""
        return FirmwareContribution(
            dsdt_aml=pci_host_bridge_aml(window_base=self.bus.window_base, window_size=self.bus.window_size)
        )


def pci_platform(machine: PciMachineLike, *, create: bool = True) -> PciPlatform | None:
    """The machine's PCI platform; made (bus mapped at 0xCF8 and on the MMIO window) on first use."""
    platform = machine.pci_platform
    if platform is None and create:
        bus = PciBus()
        machine.add_pio_device(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, bus)
        machine.add_mmio_device(bus.window_base, bus.window_size, bus.mmio_window)
        platform = machine.pci_platform = PciPlatform(bus)
        machine.firmware.add(platform)
    return platform


def pci_dsdt_aml(machine: PciMachineLike) -> bytes:
    """The DSDT's PCI host bridge for ``machine`` (b"" when it has no PCI bus): pass it to build_dsdt."""
    platform = pci_platform(machine, create=False)
    return b"" if platform is None else platform.firmware_contribution().dsdt_aml


def _gsi_routing(machine: PciMachineLike, platform: PciPlatform) -> GsiRouting:
    if platform.routing is None:
        platform.routing = GsiRouting(machine.vm)
    return platform.routing


@dataclass
class VirtioPciAttachment(VirtioAttachment):
    """A virtio device on the machine's PCI bus; closing the transport (or this) tears it down."""

    device: VirtioDevice
    transport: VirtioPciTransport
    bus: PciBus
    slot: int
    bar_address: int
    intx_gsi: int
    iothreads: bool
    io: VirtioIoThread
    msi_sink: MsiSink
    vm: PciVmLike
    irq_fd: int | None = None
    resample_fd: int | None = None
    #: (eventfd, address, length, datamatch) of the notification ioeventfds registered now
    notify_ioeventfds: list[tuple[int, int, int, int | None]] = field(default_factory=list)
    _cleanups: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _notify_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def bar_size(self) -> int:
        return BAR_SIZE

    @property
    def msi_gsis(self) -> list[int]:
        """The GSIs of the MSI-X vectors (irqfd delivery only)."""
        return list(self.msi_sink.gsis) if isinstance(self.msi_sink, IrqfdMsiSink) else []

    def move_notifications(self, base: int | None) -> None:
        """The notification area moved to ``base`` (None: it stopped decoding): move the ioeventfds."""
        with self._notify_lock:
            self._deassign_notifications()
            if base is None:
                return
            for index, fd in enumerate(self.io.queue_fds):
                address = base + 4 * index
                # any write width first; where KVM refuses it, the 2-byte queue index Linux writes
                for length, datamatch in ((0, None), (2, index)):
                    try:
                        self.vm.register_ioeventfd(fd, address, length, pio=False, datamatch=datamatch)
                    except KvmError as error:
                        # e.g. the guest overlapped two BARs: this queue's notifications then exit
                        # to the transport, which hands them to the I/O thread all the same
                        log.debug("%s: ioeventfd at %#x refused: %s", self.device.name, address, error)
                        continue
                    self.notify_ioeventfds.append((fd, address, length, datamatch))
                    break
                else:
                    log.warning(
                        "%s: queue %d notifications at %#x will exit", self.device.name, index, address
                    )

    def _deassign_notifications(self) -> None:
        registered, self.notify_ioeventfds = self.notify_ioeventfds, []
        for fd, address, length, datamatch in registered:
            try:
                self.vm.register_ioeventfd(fd, address, length, pio=False, datamatch=datamatch, deassign=True)
            except Exception as error:  # keep going: the VM fd may be closing
                log.warning("%s: removing the ioeventfd at %#x failed: %s", self.device.name, address, error)

    def _intx_resampled(self) -> None:
        """KVM lowered the INTx line at the guest's EOI: raise it again while the ISR is non-zero."""
        if self.resample_fd is None or not drain_eventfd(self.resample_fd):
            return
        transport = self.transport
        if transport.msix.enabled or transport.command & COMMAND_INTX_DISABLE:
            return
        if self.device.interrupt_status:
            transport.intx.trigger()

    def _quiesce(self) -> None:
        with self._notify_lock:
            self._deassign_notifications()


def attach_virtio_pci(
    machine: PciMachineLike, device: VirtioDevice, *, iothreads: bool = True, slot: int | None = None
) -> VirtioPciAttachment:
    """Put ``device`` on the machine's PCI bus, wire its interrupts and start its I/O thread."""
    if device.memory is not machine.memory:
        raise ConfigError(f"{device.name} was built on another machine's guest memory")
    platform = pci_platform(machine)
    assert platform is not None
    bus, vm = platform.bus, machine.vm
    cleanups: list[Callable[[], None]] = []
    io = VirtioIoThread(device, queue_eventfds=iothreads)
    try:
        msi_sink: MsiSink
        if iothreads:
            irqfd_sink = IrqfdMsiSink(vm, _gsi_routing(machine, platform), device.num_queues + 1)
            cleanups.append(irqfd_sink.close)
            msi_sink = irqfd_sink
        else:
            msi_sink = DirectMsiSink(vm)
        bar_address = bus.allocate_bar_address(BAR_SIZE)
        transport = VirtioPciTransport(device, bar_address=bar_address, msi_sink=msi_sink)
        chosen = bus.add(transport, slot=slot)
    except BaseException:
        for cleanup in reversed(cleanups):
            cleanup()
        io.close()
        raise
    gsi = intx_gsi(chosen)
    transport.set_u8(PCI_INTERRUPT_LINE, gsi)  # what firmware would have written; ACPI's _PRT agrees
    attachment = VirtioPciAttachment(
        device, transport, bus, chosen, bar_address, gsi, iothreads, io, msi_sink, vm, _cleanups=cleanups
    )
    try:
        if iothreads:
            _wire_eventfds(attachment)
        else:
            shared = platform.lines.get(gsi)
            if shared is None:
                shared = platform.lines[gsi] = WiredOrLine(machine.interrupt_line(gsi))
            transport.intx = LineLevelSignal(shared.source())
    except BaseException:
        # the function stays on the bus (a bus cannot unplug), but inert: the device is closed
        attachment._teardown()
        device.close()
        raise
    transport.add_close_callback(attachment._teardown)
    io.start()
    log.debug(
        "%s at 00:%02x.0, BAR 0 %#x, INTx GSI %d, MSI GSIs %s (%s)",
        device.name,
        chosen,
        bar_address,
        gsi,
        attachment.msi_gsis or "direct",
        "I/O thread" if iothreads else "vCPU notify",
    )
    return attachment


def _wire_eventfds(attachment: VirtioPciAttachment) -> None:
    """Notification ioeventfds that follow the BAR, and the level-triggered INTx irqfd."""
    vm, transport, io = attachment.vm, attachment.transport, attachment.io
    transport.notify_listeners.append(attachment.move_notifications)
    # a notification that still exits (e.g. through the PCI_CFG window) goes to the I/O thread too
    transport.notify_handler = io.kick
    attachment.move_notifications(transport.notify_base)

    irq_fd = attachment.irq_fd = attachment.owned_eventfd()
    resample_fd = attachment.resample_fd = attachment.owned_eventfd()
    vm.register_irqfd(irq_fd, attachment.intx_gsi, resample_fd)
    attachment.add_cleanup(functools.partial(vm.unregister_irqfd, irq_fd, attachment.intx_gsi))
    intx: InterruptSignal = EventfdSignal(irq_fd)
    transport.intx = intx
    io.thread.add_reader(resample_fd, attachment._intx_resampled)
