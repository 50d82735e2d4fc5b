"""Virtio devices from command-line specs, attached to a machine and described to the guest.

Over virtio-pci a device gets a slot on the machine's PCI bus, found by the guest through the
PCI host bridge in the ACPI DSDT (or by probing config space). Over virtio-mmio it gets the next
default slot (MMIO window and GSI), and the guest learns
about it both ways, so kernels built either way find it: a LNRO0005 device in the ACPI DSDT
and a ``virtio_mmio.device=`` entry on the kernel command line (Linux needs
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES for the latter; Debian's kernel uses ACPI). The DSDT
declares the interrupts level-triggered, so the irqfds use KVM's resample mode.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from vmscope.errors import ConfigError

# Device models are imported for the devices a guest has: `vmscope run` with none must not pay
# for them at start-up (issue 15).
if TYPE_CHECKING:
    from vmscope.virtio.attach import VirtioMmioAttachment
    from vmscope.virtio.device import VirtioDevice
    from vmscope.virtio.pci_attach import VirtioPciAttachment
    from vmscope.vmm.machine import Machine

TRANSPORTS = ("mmio", "pci")


class DiskSpec(NamedTuple):
    path: Path
    readonly: bool = False
    transport: str | None = None
    serial: str | None = None


def _check_disk_image(path: str) -> None:
    """Say what is wrong with a --disk path before a device is built on it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(
            f"--disk {path}: no such file (create a raw image, e.g. truncate -s 64M {path})"
        ) from None
    except OSError as error:
        raise ConfigError(f"--disk {path}: cannot check the image: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"--disk {path}: is a directory; give a raw image file (e.g. {path}/disk.img)")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        kind = "a character device" if stat.S_ISCHR(mode) else "not a regular file"
        raise ConfigError(f"--disk {path}: is {kind}; give a raw image file or a block device")


def parse_disk_spec(text: str) -> DiskSpec:
    """``PATH[,readonly][,transport=mmio|pci][,serial=ID]``."""
    path, *options = text.split(",")
    if not path:
        raise ConfigError(f"--disk {text!r}: expected PATH[,readonly][,transport=mmio|pci][,serial=ID]")
    readonly = False
    transport: str | None = None
    serial: str | None = None
    for option in options:
        key, _, value = option.partition("=")
        if key in ("readonly", "ro") and not value:
            readonly = True
        elif key == "transport" and value in TRANSPORTS:
            transport = value
        elif key == "serial" and value:
            serial = value
        else:
            expected = "readonly, transport=mmio|pci, serial=ID"
            raise ConfigError(f"--disk {text!r}: unknown option {option!r} (expected {expected})")
    _check_disk_image(path)
    return DiskSpec(Path(path), readonly, transport, serial)


def _attach(
    machine: Machine, device: VirtioDevice, transport: str | None, iothreads: bool
) -> VirtioMmioAttachment | VirtioPciAttachment:
    if transport == "pci":
        from vmscope.virtio.pci_attach import attach_virtio_pci

        pci_attachment = attach_virtio_pci(machine, device, iothreads=iothreads)
        machine.virtio_attachments.append(pci_attachment)
        return pci_attachment
    from vmscope.virtio.attach import attach_virtio_mmio, virtio_mmio_slot

    base, gsi = virtio_mmio_slot(len(machine.firmware.collect().virtio_mmio))
    attachment = attach_virtio_mmio(machine, device, base=base, gsi=gsi, iothreads=iothreads, trigger="level")
    machine.firmware.add(attachment)
    machine.virtio_attachments.append(attachment)
    return attachment


def install_virtio_devices(
    machine: Machine,
    *,
    disks: Sequence[str] = (),
    nets: Sequence[str] = (),
    console: str | None = None,
    rng: bool = False,
    iothreads: bool = True,
    default_transport: str = "mmio",
) -> list[VirtioMmioAttachment | VirtioPciAttachment]:
    """Create and attach the devices the CLI options ask for, in a stable order (disks first).

    ``default_transport`` applies where a spec names none: "mmio" suits PVH/ELF guests, "pci"
    Linux distribution kernels (no virtio_mmio command-line devices; PCI found through ACPI).
    """
    attached: list[VirtioMmioAttachment | VirtioPciAttachment] = []
    for index, text in enumerate(disks):
        from vmscope.virtio.block import VirtioBlock

        spec = parse_disk_spec(text)
        disk = VirtioBlock(
            machine.memory, spec.path, read_only=spec.readonly, serial=spec.serial, name=f"virtio-blk{index}"
        )
        attached.append(_attach(machine, disk, spec.transport or default_transport, iothreads))
    for index, text in enumerate(nets):
        from vmscope.virtio.net import VirtioNet
        from vmscope.virtio.net_backends import open_net_backend

        backend_spec, _, mac_option = text.partition(",mac=")
        backend = open_net_backend(backend_spec)
        net = VirtioNet(machine.memory, backend, mac=mac_option or None, name=f"virtio-net{index}")
        attached.append(_attach(machine, net, default_transport, iothreads))
    if console is not None:
        from vmscope.devices.char_backends import open_serial_backend
        from vmscope.virtio.console import VirtioConsole

        device = VirtioConsole(
            machine.memory, open_serial_backend(console, "console"), name="virtio-console0"
        )
        attached.append(_attach(machine, device, default_transport, iothreads))
    if rng:
        from vmscope.virtio.rng import VirtioRng

        attached.append(
            _attach(machine, VirtioRng(machine.memory, name="virtio-rng0"), default_transport, iothreads)
        )
    return attached
