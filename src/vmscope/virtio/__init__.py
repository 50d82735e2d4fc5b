"""Virtio devices (virtio 1.2): split virtqueues, the virtio-mmio v2 transport, per-device I/O threads.

::

    from vmscope.virtio import VirtioBlock, attach_virtio_mmio, virtio_mmio_slot, virtio_mmio_cmdline

    disk = VirtioBlock(machine.memory, "disk.img", name="virtio-blk0")
    base, gsi = virtio_mmio_slot(0)
    attachment = attach_virtio_mmio(machine, disk, base=base, gsi=gsi)          # I/O thread
    cmdline += " " + virtio_mmio_cmdline([attachment])

Modules: :mod:`.queue` (virtqueues), :mod:`.device` (status, features, interrupts),
:mod:`.mmio` (transport), :mod:`.iothread`, :mod:`.attach`, and the device types
:mod:`.block`, :mod:`.net` (+ :mod:`.net_backends`), :mod:`.console`, :mod:`.rng`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from vmscope.virtio.attach import (
        VIRTIO_MMIO_BASE,
        VIRTIO_MMIO_GSIS,
        VIRTIO_MMIO_STRIDE,
        VirtioMmioAttachment,
        attach_virtio_mmio,
        virtio_mmio_cmdline,
        virtio_mmio_slot,
    )
    from vmscope.virtio.block import RequestTrace, VirtioBlock
    from vmscope.virtio.console import VirtioConsole
    from vmscope.virtio.device import (
        EventfdSignal,
        InterruptSignal,
        LineLevelSignal,
        LinePulseSignal,
        NullInterruptSignal,
        VirtioDevice,
    )
    from vmscope.virtio.iothread import IoThread, VirtioIoThread
    from vmscope.virtio.mmio import VirtioMmioTransport
    from vmscope.virtio.net import VirtioNet
    from vmscope.virtio.net_backends import NetBackend, TapBackend, UdpBackend, open_net_backend
    from vmscope.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
    from vmscope.virtio.rng import VirtioRng

__all__ = [
    "VIRTIO_MMIO_BASE",
    "VIRTIO_MMIO_GSIS",
    "VIRTIO_MMIO_STRIDE",
    "DescriptorChain",
    "EventfdSignal",
    "InterruptSignal",
    "IoThread",
    "LineLevelSignal",
    "LinePulseSignal",
    "NetBackend",
    "NullInterruptSignal",
    "RequestTrace",
    "TapBackend",
    "UdpBackend",
    "VirtioBlock",
    "VirtioConsole",
    "VirtioDevice",
    "VirtioIoThread",
    "VirtioMmioAttachment",
    "VirtioMmioTransport",
    "VirtioNet",
    "VirtioRng",
    "Virtqueue",
    "VirtqueueError",
    "attach_virtio_mmio",
    "open_net_backend",
    "virtio_mmio_cmdline",
    "virtio_mmio_slot",
]

EXPORTS = {
    "VIRTIO_MMIO_BASE": ".attach",
    "VIRTIO_MMIO_GSIS": ".attach",
    "VIRTIO_MMIO_STRIDE": ".attach",
    "VirtioMmioAttachment": ".attach",
    "attach_virtio_mmio": ".attach",
    "virtio_mmio_cmdline": ".attach",
    "virtio_mmio_slot": ".attach",
    "RequestTrace": ".block",
    "VirtioBlock": ".block",
    "VirtioConsole": ".console",
    "EventfdSignal": ".device",
    "InterruptSignal": ".device",
    "LineLevelSignal": ".device",
    "LinePulseSignal": ".device",
    "NullInterruptSignal": ".device",
    "VirtioDevice": ".device",
    "IoThread": ".iothread",
    "VirtioIoThread": ".iothread",
    "VirtioMmioTransport": ".mmio",
    "VirtioNet": ".net",
    "NetBackend": ".net_backends",
    "TapBackend": ".net_backends",
    "UdpBackend": ".net_backends",
    "open_net_backend": ".net_backends",
    "DescriptorChain": ".queue",
    "Virtqueue": ".queue",
    "VirtqueueError": ".queue",
    "VirtioRng": ".rng",
}
__getattr__ = lazy_exports(__name__, EXPORTS)
