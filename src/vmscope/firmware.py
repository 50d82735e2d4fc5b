"""What devices and attachments tell the guest's firmware description, through one explicit list.

A device or attachment that the guest must be told about beyond its registers implements
:class:`FirmwareContributor`: it returns a :class:`FirmwareContribution` (virtio-mmio windows for
the DSDT, more DSDT objects, kernel command-line words, FADT boot-architecture flags). The machine
keeps the contributors in a :class:`FirmwareContributions` list, in the order they were added, and
builds ACPI tables and the command line from :meth:`FirmwareContributions.collect` when it loads a
guest. Nothing probes ports or looks for attributes to find out what the machine has.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol, runtime_checkable

#: FADT IA-PC boot architecture flags a device can ask for
BootFlag = Literal["cmos_rtc", "i8042"]


class FirmwareContribution(NamedTuple):
    """One contributor's part of the firmware description."""

    #: (base, size, gsi) of virtio-mmio windows, described as DSDT devices VR00, VR01, ... in order
    virtio_mmio: tuple[tuple[int, int, int], ...] = ()
    #: more device objects for the DSDT, after the virtio-mmio devices (e.g. the PCI host bridge)
    dsdt_aml: bytes = b""
    #: words for a Linux kernel's command line (e.g. ``virtio_mmio.device=...``)
    cmdline: tuple[str, ...] = ()
    #: FADT boot-architecture flags (legacy devices the guest may rely on)
    boot_flags: frozenset[BootFlag] = frozenset()


@runtime_checkable
class FirmwareContributor(Protocol):
    """Anything that adds to the guest's firmware description."""

    def firmware_contribution(self) -> FirmwareContribution: ...


class FirmwareContributions:
    """The machine's contributors, in the order they were added (each one once)."""

    def __init__(self) -> None:
        self._contributors: list[FirmwareContributor] = []

    def add(self, contributor: FirmwareContributor) -> None:
        if not any(existing is contributor for existing in self._contributors):
            self._contributors.append(contributor)

    def __len__(self) -> int:
        return len(self._contributors)

    def collect(self) -> FirmwareContribution:
        """Every contribution merged, in order (asked afresh: contributors may change until boot)."""
        virtio_mmio: list[tuple[int, int, int]] = []
        dsdt_aml: list[bytes] = []
        cmdline: list[str] = []
        boot_flags: set[BootFlag] = set()
        for contributor in self._contributors:
            part = contributor.firmware_contribution()
            virtio_mmio.extend(part.virtio_mmio)
            dsdt_aml.append(part.dsdt_aml)
            cmdline.extend(part.cmdline)
            boot_flags |= part.boot_flags
        return FirmwareContribution(
            virtio_mmio=tuple(virtio_mmio),
            dsdt_aml=b"".join(dsdt_aml),
            cmdline=tuple(cmdline),
            boot_flags=frozenset(boot_flags),
        )
