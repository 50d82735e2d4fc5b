"""Put a virtio device on a machine behind a virtio-mmio window, with or without an I/O thread.

Address and interrupt plan (x86):

* Windows: :data:`VIRTIO_MMIO_BASE` (0xFEB0_0000) + n * :data:`VIRTIO_MMIO_STRIDE`
  (0x1000), 0x200 bytes used of each page. 0xFEB0_0000-0xFEBF_FFFF lies in the 32-bit MMIO
  hole below the IO-APIC (0xFEC0_0000), clear of the LAPIC (0xFEE0_0000), KVM's TSS and
  identity map (0xFFFB_C000-0xFFFB_FFFF) and 0xD000_0000 (the demo guest's unclaimed
  address). QEMU's microvm uses the same range for virtio-mmio.
* GSIs: :data:`VIRTIO_MMIO_GSIS` = 5, 6, 7, 10, 11, 13: ISA IRQs that both the MP table
  and the ACPI MADT already describe, skipping 0/2 (PIT), 1 and 12 (i8042), 3 and 4
  (COM2, COM1), 8 (RTC), 9 (ACPI SCI) and 14/15 (IDE). GSIs 16-23 work only where the
  firmware tables describe the pin (the ACPI DSDT path does through _CRS; the MP table
  here lists ISA IRQs only), so :func:`virtio_mmio_slot` stops at six devices.

Interrupt trigger. A device found through ``virtio_mmio.device=`` on the command line gets
an ISA IRQ, which Linux programs edge-triggered (``trigger="edge"``, the default): the
device signals a plain irqfd and KVM pulses the pin. A device described in the ACPI DSDT
(level-triggered, active-high, as :func:`vmscope.arch.x86.acpi.virtio_mmio_aml` says)
needs ``trigger="level"``: the irqfd is registered with KVM_IRQFD_FLAG_RESAMPLE, KVM holds
the line until the guest's EOI, then de-asserts it and signals the resample eventfd, on
which the I/O thread re-asserts it if InterruptStatus is still non-zero. A pulse on a
level-triggered pin could be lost while the previous interrupt is in service.

``iothreads=False`` is the comparison mode: QueueNotify is an ordinary MMIO exit served
on the vCPU thread, and the interrupt is KVM_IRQ_LINE through ``machine.interrupt_line``,
held high while InterruptStatus is non-zero (right for either trigger mode). Devices
with host-side input (net, console) still get a thread that polls only that input.

Only ``Machine`` / ``Vm`` methods are used here; every ioctl stays in :mod:`vmscope.kvm`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from vmscope.devices.base import Device, InterruptLine
from vmscope.errors import ConfigError
from vmscope.firmware import FirmwareContribution
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.attachment import VirtioAttachment
from vmscope.virtio.device import (
    EventfdSignal,
    LineLevelSignal,
    NullInterruptSignal,
    VirtioDevice,
)
from vmscope.virtio.iothread import VirtioIoThread
from vmscope.virtio.mmio import REG_QUEUE_NOTIFY, WINDOW_SIZE, VirtioMmioTransport

log = logging.getLogger("vmscope.virtio.attach")

VIRTIO_MMIO_BASE = 0xFEB0_0000
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_MMIO_GSIS = (5, 6, 7, 10, 11, 13)
#: GSIs a virtio device must not take, and who has them
RESERVED_GSIS = {
    0: "the PIT (ISA IRQ 0)",
    1: "the i8042 keyboard",
    2: "the PIT (IO-APIC pin 2) / PIC cascade",
    3: "COM2",
    4: "COM1",
    8: "the RTC",
    9: "the ACPI SCI",
    12: "the i8042 mouse",
    14: "the primary IDE channel",
    15: "the secondary IDE channel",
}
IO_APIC_PINS = 24

Trigger = Literal["edge", "level"]


class VmLike(Protocol):
    """The :class:`vmscope.kvm.Vm` methods an attachment uses."""

    def register_ioeventfd(
        self,
        event_fd: int,
        address: int,
        length: int,
        *,
        pio: bool,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None: ...

    def register_irqfd(self, event_fd: int, gsi: int, resample_fd: int | None = None) -> None: ...

    def unregister_irqfd(self, event_fd: int, gsi: int) -> None: ...


class MachineLike(Protocol):
    """The :class:`vmscope.vmm.machine.Machine` members an attachment uses."""

    @property
    def memory(self) -> GuestMemory: ...

    @property
    def vm(self) -> VmLike: ...

    def interrupt_line(self, gsi: int) -> InterruptLine: ...

    def add_mmio_device(self, base: int, length: int, device: Device) -> None: ...


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """(MMIO base, GSI) of the ``index``-th default virtio-mmio slot."""
    if not 0 <= index < len(VIRTIO_MMIO_GSIS):
        raise ConfigError(
            f"virtio-mmio slot {index}: only {len(VIRTIO_MMIO_GSIS)} default slots "
            f"(GSIs {', '.join(map(str, VIRTIO_MMIO_GSIS))}); pass base and gsi explicitly"
        )
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_STRIDE, VIRTIO_MMIO_GSIS[index]


@dataclass
class VirtioMmioAttachment(VirtioAttachment):
    """A virtio device wired to a machine; closing the transport (or this) tears it down."""

    device: VirtioDevice
    transport: VirtioMmioTransport
    base: int
    gsi: int
    iothreads: bool
    trigger: Trigger
    io: VirtioIoThread
    size: int = WINDOW_SIZE
    irq_fd: int | None = None
    resample_fd: int | None = None
    _cleanups: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def cmdline_entry(self) -> str:
        """``virtio_mmio.device=<size>@<base>:<irq>`` (Linux needs CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES)."""
        return f"virtio_mmio.device={self.size:#x}@{self.base:#x}:{self.gsi}"

    def acpi_entry(self) -> tuple[int, int, int]:
        """(base, size, gsi) for :func:`vmscope.arch.x86.acpi.virtio_mmio_aml` (use trigger="level")."""
        return (self.base, self.size, self.gsi)

    def firmware_contribution(self) -> FirmwareContribution:
        """The device in the DSDT and on a kernel's command line (a :class:`FirmwareContributor`)."""
        return FirmwareContribution(virtio_mmio=(self.acpi_entry(),), cmdline=(self.cmdline_entry(),))

    def _quiesce(self) -> None:
        self.device.set_interrupt_signal(NullInterruptSignal())


def _check_placement(base: int, gsi: int) -> None:
    if gsi in RESERVED_GSIS:
        raise ConfigError(f"virtio-mmio GSI {gsi} is taken by {RESERVED_GSIS[gsi]}")
    if not 0 < gsi < IO_APIC_PINS:
        raise ConfigError(f"virtio-mmio GSI {gsi} is out of range: the IO-APIC has pins 1-{IO_APIC_PINS - 1}")
    if base % WINDOW_SIZE or base < 0 or base + WINDOW_SIZE > 1 << 32:
        raise ConfigError(f"virtio-mmio base {base:#x} must be {WINDOW_SIZE:#x}-aligned and below 4 GiB")


def attach_virtio_mmio(
    machine: MachineLike,
    device: VirtioDevice,
    *,
    base: int,
    gsi: int,
    iothreads: bool = True,
    trigger: Trigger = "edge",
) -> VirtioMmioAttachment:
    """Map ``device`` at ``base`` with interrupt ``gsi`` and start its I/O thread (see module docstring)."""
    _check_placement(base, gsi)
    if trigger not in ("edge", "level"):
        raise ConfigError(f"virtio-mmio trigger {trigger!r}: expected 'edge' or 'level'")
    if device.memory is not machine.memory:
        raise ConfigError(f"{device.name} was built on another machine's guest memory")
    transport = VirtioMmioTransport(device)
    io = VirtioIoThread(device, queue_eventfds=iothreads)
    attachment = VirtioMmioAttachment(device, transport, base, gsi, iothreads, trigger, io)
    try:
        # the window first: an overlap is a user error best found before KVM is touched
        machine.add_mmio_device(base, WINDOW_SIZE, transport)
    except BaseException:
        io.close()
        raise
    try:
        if iothreads:
            _wire_eventfds(machine.vm, attachment)
        else:
            device.set_interrupt_signal(LineLevelSignal(machine.interrupt_line(gsi)))
    except BaseException:
        # the transport stays mapped (a machine cannot unmap), but inert: the device is closed
        attachment._teardown()
        device.close()
        raise
    transport.add_close_callback(attachment._teardown)
    io.start()
    log.debug(
        "%s at %#x gsi %d (%s, %s)",
        device.name,
        base,
        gsi,
        "I/O thread" if iothreads else "vCPU notify",
        trigger,
    )
    return attachment


def _wire_eventfds(vm: VmLike, attachment: VirtioMmioAttachment) -> None:
    """ioeventfd per queue on QueueNotify (datamatch = index, 4 bytes, MMIO) and the irqfd."""
    io, device, gsi = attachment.io, attachment.device, attachment.gsi
    notify_address = attachment.base + REG_QUEUE_NOTIFY
    for index, fd in enumerate(io.queue_fds):
        vm.register_ioeventfd(fd, notify_address, 4, pio=False, datamatch=index)
        attachment.add_cleanup(
            functools.partial(
                vm.register_ioeventfd, fd, notify_address, 4, pio=False, datamatch=index, deassign=True
            )
        )
    # a notification that still exits (e.g. an index with no ioeventfd) goes to the I/O thread too
    attachment.transport.notify_handler = io.kick

    irq_fd = attachment.irq_fd = attachment.owned_eventfd()
    resample_fd = None
    if attachment.trigger == "level":
        resample_fd = attachment.resample_fd = attachment.owned_eventfd()
    vm.register_irqfd(irq_fd, gsi, resample_fd)
    attachment.add_cleanup(functools.partial(vm.unregister_irqfd, irq_fd, gsi))
    device.set_interrupt_signal(EventfdSignal(irq_fd))
    if resample_fd is not None:
        io.watch_resample(resample_fd)


def virtio_mmio_cmdline(attachments: Sequence[VirtioMmioAttachment]) -> str:
    """The kernel command-line entries for ``attachments``, space-separated, in order."""
    return " ".join(attachment.cmdline_entry() for attachment in attachments)
