"""PCI: bus 0 behind a host bridge (configuration mechanism #1), PCI functions, MSI-X.

::

    from vmscope.virtio import VirtioRng
    from vmscope.virtio.pci_attach import attach_virtio_pci, pci_dsdt_aml

    attachment = attach_virtio_pci(machine, VirtioRng(machine.memory))   # bus made on first use
    dsdt_extra = pci_dsdt_aml(machine)                                   # PNP0A03 host bridge AML

Modules: :mod:`.device` (configuration space, BARs, capabilities), :mod:`.bus` (0xCF8/0xCFC,
the MMIO window, the ACPI host bridge), :mod:`.msix` (MSI-X table/PBA, GSI routing, irqfd delivery).
The virtio transport on top is :mod:`vmscope.virtio.pci` (+ :mod:`vmscope.virtio.pci_attach`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from vmscope.pci.bus import (
        CONFIG_ADDRESS_PORT,
        CONFIG_PORTS_LENGTH,
        PCI_MMIO_WINDOW_BASE,
        PCI_MMIO_WINDOW_SIZE,
        PciBus,
        PciHostBridge,
        PciMmioWindow,
        intx_gsi,
        pci_host_bridge_aml,
    )
    from vmscope.pci.device import BarKind, DecodedBar, PciBar, PciDevice
    from vmscope.pci.msix import (
        DirectMsiSink,
        GsiRouting,
        IrqfdMsiSink,
        MsiSink,
        MsixCapability,
        RecordingMsiSink,
    )

__all__ = [
    "CONFIG_ADDRESS_PORT",
    "CONFIG_PORTS_LENGTH",
    "PCI_MMIO_WINDOW_BASE",
    "PCI_MMIO_WINDOW_SIZE",
    "BarKind",
    "DecodedBar",
    "DirectMsiSink",
    "GsiRouting",
    "IrqfdMsiSink",
    "MsiSink",
    "MsixCapability",
    "PciBar",
    "PciBus",
    "PciDevice",
    "PciHostBridge",
    "PciMmioWindow",
    "RecordingMsiSink",
    "intx_gsi",
    "pci_host_bridge_aml",
]

EXPORTS = {
    "CONFIG_ADDRESS_PORT": ".bus",
    "CONFIG_PORTS_LENGTH": ".bus",
    "PCI_MMIO_WINDOW_BASE": ".bus",
    "PCI_MMIO_WINDOW_SIZE": ".bus",
    "PciBus": ".bus",
    "PciHostBridge": ".bus",
    "PciMmioWindow": ".bus",
    "intx_gsi": ".bus",
    "pci_host_bridge_aml": ".bus",
    "BarKind": ".device",
    "DecodedBar": ".device",
    "PciBar": ".device",
    "PciDevice": ".device",
    "DirectMsiSink": ".msix",
    "GsiRouting": ".msix",
    "IrqfdMsiSink": ".msix",
    "MsiSink": ".msix",
    "MsixCapability": ".msix",
    "RecordingMsiSink": ".msix",
}
__getattr__ = lazy_exports(__name__, EXPORTS)
