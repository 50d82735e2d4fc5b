"""virtio-pci on real KVM: a guest finds a virtio-rng on PCI bus 0 and reads random bytes from it.

The guest (guest_src/virtio_pci.c) scans bus 0 through ports 0xCF8/0xCFC, sizes BAR 0, walks
the capability list, sets up one queue through the common configuration and waits for the
used ring: with an MSI-X vector to its LAPIC, with INTx through the IO-APIC (reading the ISR),
or by polling. It prints the bytes it got and where its buffer is; the test compares them with
guest memory and checks which path each step took (ioeventfd or exit, irqfd or KVM_SIGNAL_MSI).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmscope.guest.build import build_runtime_guest
from vmscope.pci.msix import FIRST_MSI_GSI
from vmscope.virtio.pci_attach import VirtioPciAttachment, attach_virtio_pci, pci_platform
from vmscope.virtio.rng import VirtioRng
from vmscope.vmm.machine import Machine, RunResult
from vmscope.vmm.platform import install_platform_devices

GUEST_SRC = Path(__file__).parent / "guest_src" / "virtio_pci.c"
STATUS_OK = 33
RNG_BYTES = 16
FOUND = re.compile(
    r"virtio-pci: found 1af4:1044 at 00:(\w\w)\.0 bar0=0x(\w+) size=0x(\w+) mult=(\d+) caps=(\d+)"
)
DONE = re.compile(
    r"virtio-pci: irq=(\w+) interrupts=(\d+) isr=0x(\w+) used_len=(\d+) buffer=0x(\w+) bytes=([0-9a-f]+)"
)


@pytest.fixture(scope="module")
def guest() -> Path:
    return build_runtime_guest("virtio-pci", [GUEST_SRC])


@dataclass
class Run:
    result: RunResult
    serial: str
    attachment: VirtioPciAttachment
    rng: VirtioRng
    buffer: bytes  # guest memory at the buffer address the guest printed
    msi_gsis: list[int]
    msi_routes: dict[int, tuple[int, int]]  # KVM MSI routes (gsi -> address, data) when the run ended


def run_guest(guest: Path, tmp_path: Path, *, irq: str, iothreads: bool) -> Run:
    serial_log = tmp_path / "serial.log"
    with Machine(mem="64M") as machine:
        install_platform_devices(machine, serial=f"file:{serial_log}")
        rng = VirtioRng(machine.memory)
        attachment = attach_virtio_pci(machine, rng, iothreads=iothreads)
        machine.load(guest, cmdline=f"irq={irq}")
        result = machine.run(timeout=120)
        text = serial_log.read_text(errors="replace")
        done = DONE.search(text)
        buffer = machine.read_physical(int(done.group(5), 16), RNG_BYTES) if done else b""
        platform = pci_platform(machine, create=False)
        routes = platform.routing.msi_routes() if platform and platform.routing else {}
        run = Run(result, text, attachment, rng, buffer, attachment.msi_gsis, routes)
    return run


def check_common(run: Run) -> re.Match[str]:
    result, text, attachment, rng, buffer = run.result, run.serial, run.attachment, run.rng, run.buffer
    assert result.exit_status == STATUS_OK, (result.reason, text)
    found = FOUND.search(text)
    assert found, text
    assert int(found.group(1), 16) == attachment.slot
    assert int(found.group(2), 16) == attachment.bar_address
    assert int(found.group(3), 16) == attachment.bar_size
    assert int(found.group(4)) == 4
    assert int(found.group(5)) == 5  # common, notify, ISR, PCI_CFG, MSI-X (virtio-rng has no device config)
    done = DONE.search(text)
    assert done, text
    assert int(done.group(4)) == RNG_BYTES
    printed = bytes.fromhex(done.group(6))
    assert printed == buffer, "the guest printed something other than what the device wrote"
    assert rng.bytes_served == RNG_BYTES and printed != bytes(RNG_BYTES)
    return done


@pytest.mark.guest_support(
    "PVH ELF (bundled runtime)", devices="virtio-rng over virtio-pci, MSI-X through irqfd"
)
def test_msix_through_irqfd_and_notify_through_ioeventfd(guest: Path, tmp_path: Path) -> None:
    run = run_guest(guest, tmp_path, irq="msix", iothreads=True)
    done = check_common(run)
    assert done.group(1) == "msix" and int(done.group(2)) == 1
    transport = run.attachment.transport
    assert transport.notify_exits == 0, "the notification exited instead of hitting the ioeventfd"
    assert transport.interrupt.msix_fired == 1 and transport.interrupt.intx_triggers == 0
    assert transport.msix.sent == 1
    # vector 1 (queue 0) went out through its own GSI's KVM MSI route to LAPIC vector 0x41
    queue_gsi = run.msi_gsis[1]
    assert queue_gsi >= FIRST_MSI_GSI
    assert run.msi_routes == {queue_gsi: (0xFEE0_0000, 0x41)}


def test_msix_without_io_threads_uses_exits_and_signal_msi(guest: Path, tmp_path: Path) -> None:
    run = run_guest(guest, tmp_path, irq="msix", iothreads=False)
    done = check_common(run)
    assert done.group(1) == "msix" and int(done.group(2)) == 1
    assert run.attachment.transport.notify_exits == 1  # served on the vCPU that exited
    assert run.msi_gsis == [] and run.msi_routes == {}  # KVM_SIGNAL_MSI: no routes
    assert run.attachment.transport.msix.sent == 1


def test_intx_through_the_ioapic_with_isr_read_to_clear(guest: Path, tmp_path: Path) -> None:
    run = run_guest(guest, tmp_path, irq="intx", iothreads=True)
    done = check_common(run)
    assert done.group(1) == "intx" and int(done.group(2)) >= 1
    assert int(done.group(3), 16) == 1  # the handler's ISR read saw the used-buffer bit
    transport = run.attachment.transport
    assert transport.interrupt.intx_triggers >= 1 and transport.isr_reads >= 1
    assert transport.interrupt.msix_fired == 0 and run.rng.interrupt_status == 0


def test_polling_needs_no_interrupt(guest: Path, tmp_path: Path) -> None:
    run = run_guest(guest, tmp_path, irq="poll", iothreads=True)
    done = check_common(run)
    assert done.group(1) == "poll" and int(done.group(2)) == 0
    # MSI-X stayed off, so the device raised INTx; the guest never unmasked its IO-APIC pin
    transport = run.attachment.transport
    assert transport.msix.sent == 0 and transport.interrupt.intx_triggers == 1


def test_a_machine_with_pci_devices_describes_the_host_bridge_in_its_dsdt(guest: Path) -> None:
    from vmscope.arch.x86.acpi import parse_acpi_tables
    from vmscope.virtio.pci_attach import pci_dsdt_aml

    with Machine(mem="64M") as machine:
        install_platform_devices(machine, serial="none")
        assert pci_dsdt_aml(machine) == b""  # no PCI device, no host bridge
        attach_virtio_pci(machine, VirtioRng(machine.memory))
        bridge = pci_dsdt_aml(machine)
        machine.load(guest)
        dsdt = parse_acpi_tables(machine.memory).tables["DSDT"].data
    assert bridge and bridge in dsdt
