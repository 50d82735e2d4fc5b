"""The modern virtio-pci transport, driven like Linux's virtio_pci_modern, and its machine attachment.

``PciVirtioDriver`` finds the device on the bus through 0xCF8/0xCFC, walks the capability
list to the virtio structures, enables Memory Space and then talks to BAR 0 through an MMIO
bus with the PCI window mapped, as a guest's loads and stores would. The device models are
the same :class:`VirtioDevice` objects the virtio-mmio tests drive.
"""

from __future__ import annotations

import os
import select
import struct
import time
from pathlib import Path

import pytest

from tests.unit.rigs.pci import BAR_ADDRESS, MSI_ADDRESS, FakePciMachine, PciVirtioDriver, PortDriver, Rig
from tests.unit.rigs.virtio_block import IMAGE, submit
from tests.unit.rigs.virtio_mmio import RecordingDevice
from tests.unit.rigs.virtqueue import RAM_SIZE, Arena
from vmscope.devices.base import RecordingInterruptLine
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.pci.bus import PCI_MMIO_WINDOW_BASE
from vmscope.pci.device import (
    COMMAND_INTX_DISABLE,
    COMMAND_MEMORY,
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_STATUS,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    STATUS_INTERRUPT,
)
from vmscope.pci.msix import FIRST_MSI_GSI
from vmscope.virtio.block import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VirtioBlock
from vmscope.virtio.device import (
    INTERRUPT_CONFIG_CHANGE,
    INTERRUPT_USED_BUFFER,
    STATUS_ACKNOWLEDGE,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
)
from vmscope.virtio.pci import (
    BAR_SIZE,
    CAP_COMMON_CFG,
    CAP_DEVICE_CFG,
    CAP_ISR_CFG,
    CAP_NOTIFY_CFG,
    CAP_PCI_CFG,
    COMMON_CONFIG_GENERATION,
    COMMON_DEVICE_FEATURE,
    COMMON_DEVICE_STATUS,
    COMMON_DRIVER_FEATURE,
    COMMON_DRIVER_FEATURE_SELECT,
    COMMON_MSIX_CONFIG,
    COMMON_NUM_QUEUES,
    COMMON_QUEUE_DESC,
    COMMON_QUEUE_DEVICE,
    COMMON_QUEUE_ENABLE,
    COMMON_QUEUE_MSIX_VECTOR,
    COMMON_QUEUE_NOTIFY_OFF,
    COMMON_QUEUE_SELECT,
    COMMON_QUEUE_SIZE,
    VIRTIO_MSI_NO_VECTOR,
)
from vmscope.virtio.pci_attach import (
    WiredOrLine,
    attach_virtio_pci,
    pci_dsdt_aml,
    pci_platform,
)
from vmscope.virtio.rng import VirtioRng


@pytest.fixture
def device(memory: GuestMemory) -> RecordingDevice:
    return RecordingDevice(memory)


@pytest.fixture
def rig(device: RecordingDevice, memory: GuestMemory) -> Rig:
    return Rig(device, memory)


@pytest.fixture
def driver(rig: Rig) -> PciVirtioDriver:
    rig.driver.enable()
    return rig.driver


# -- identity and layout ------------------------------------------------------------------------------


def test_identity_of_a_modern_virtio_function(rig: Rig) -> None:
    ports, slot = rig.port_driver, rig.slot
    assert slot == 1
    assert ports.read(slot, 0x00) == (0x1040 + RecordingDevice.device_id) << 16 | 0x1AF4
    assert ports.read(slot, 0x08) & 0xFF == 1  # revision 1: modern
    assert ports.read(slot, PCI_SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert ports.read(slot, PCI_SUBSYSTEM_ID, 2) >= 0x40
    assert ports.read(slot, PCI_INTERRUPT_PIN, 1) == 1  # INTA
    rng = Rig(VirtioRng(rig.driver.memory), rig.driver.memory)
    assert rng.port_driver.read(rng.slot, 0x02, 2) == 0x1044


def test_bar0_is_a_preassigned_64_bit_memory_bar(rig: Rig) -> None:
    ports, slot = rig.port_driver, rig.slot
    original, sized = ports.size_bar(slot, 0)
    assert original == BAR_ADDRESS | 0b100
    assert sized == (~(BAR_SIZE - 1) & 0xFFFF_FFFF) | 0b100  # 64-bit, not prefetchable
    assert ports.size_bar(slot, 1) == (0, 0xFFFF_FFFF)


def test_capability_walk_finds_every_virtio_structure(rig: Rig) -> None:
    driver = rig.driver
    assert set(driver.caps) == {CAP_COMMON_CFG, CAP_NOTIFY_CFG, CAP_ISR_CFG, CAP_DEVICE_CFG, CAP_PCI_CFG}
    assert driver.msix_cap
    assert driver.caps[CAP_COMMON_CFG].length >= 0x38
    assert driver.caps[CAP_NOTIFY_CFG].multiplier == 4
    assert driver.caps[CAP_NOTIFY_CFG].length >= 4 * (2 - 1) + 2  # what Linux checks for queue 1
    assert driver.caps[CAP_DEVICE_CFG].length == 8
    for cap in driver.caps.values():
        if cap.cfg_type != CAP_PCI_CFG:
            assert cap.offset + cap.length <= BAR_SIZE and cap.offset % 4 == 0
    rng = Rig(VirtioRng(driver.memory), driver.memory)
    assert CAP_DEVICE_CFG not in rng.driver.caps  # no device-specific configuration: no capability


def test_bar_is_dead_until_memory_space_is_enabled(rig: Rig) -> None:
    address = BAR_ADDRESS + COMMON_NUM_QUEUES
    assert rig.mmio.read(address, 2) == b"\xff\xff"
    rig.driver.enable()
    assert rig.mmio.read(address, 2) == struct.pack("<H", 2)


# -- common configuration ---------------------------------------------------------------------------------


def test_feature_negotiation_through_the_common_configuration(
    driver: PciVirtioDriver, device: RecordingDevice
) -> None:
    offered = driver.device_features()
    assert offered == device.device_features and offered >> VIRTIO_F_VERSION_1 & 1 and offered & 1 << 3
    assert driver.negotiate() & STATUS_FEATURES_OK
    assert device.driver_features == offered
    driver.common_write(COMMON_DRIVER_FEATURE_SELECT, 1, 4)
    assert driver.common_read(COMMON_DRIVER_FEATURE, 4) == offered >> 32
    # without VERSION_1 the device refuses FEATURES_OK, as over virtio-mmio
    assert not driver.negotiate(accept=~(1 << VIRTIO_F_VERSION_1)) & STATUS_FEATURES_OK


def test_queue_registers_drive_the_device_queues(driver: PciVirtioDriver, device: RecordingDevice) -> None:
    driver.negotiate()
    assert driver.common_read(COMMON_NUM_QUEUES, 2) == 2
    driver.common_write(COMMON_QUEUE_SELECT, 1, 2)
    assert driver.common_read(COMMON_QUEUE_SIZE, 2) == 4  # the maximum until the driver writes it
    assert driver.common_read(COMMON_QUEUE_NOTIFY_OFF, 2) == 1
    ring = driver.setup_queue(0, size=4)
    queue = device.queues[0]
    assert (queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr) == (
        4,
        ring.desc,
        ring.avail,
        ring.used,
    )
    assert queue.ready and driver.common_read(COMMON_QUEUE_ENABLE, 2) == 1
    driver.common_write(COMMON_QUEUE_SELECT, 0, 2)
    assert driver.common_read(COMMON_QUEUE_DESC, 4) == ring.desc & 0xFFFF_FFFF
    assert driver.common_read(COMMON_QUEUE_DEVICE, 8) == ring.used  # a 64-bit read works too
    driver.common_write(COMMON_QUEUE_SIZE, 2, 2)  # changing a ready queue is ignored
    assert queue.size == 4
    driver.common_write(COMMON_QUEUE_ENABLE, 0, 2)  # writing 0 is not allowed: ignored
    assert queue.ready
    driver.common_write(COMMON_QUEUE_SELECT, 7, 2)  # a queue the device does not have
    assert driver.common_read(COMMON_QUEUE_SIZE, 2) == 0
    assert driver.common_read(COMMON_QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    driver.common_write(COMMON_QUEUE_ENABLE, 1, 2)
    driver.common_write(COMMON_QUEUE_SIZE, 8, 2)


def test_bad_queue_size_needs_reset_like_mmio(driver: PciVirtioDriver, device: RecordingDevice) -> None:
    driver.negotiate()
    driver.common_write(COMMON_QUEUE_SELECT, 0, 2)
    driver.common_write(COMMON_QUEUE_SIZE, 3, 2)
    driver.common_write(COMMON_QUEUE_ENABLE, 1, 2)
    assert device.needs_reset and driver.status() & 0x40


def test_read_only_fields_ignore_writes(driver: PciVirtioDriver) -> None:
    driver.common_write(COMMON_NUM_QUEUES, 9, 2)
    driver.common_write(COMMON_DEVICE_FEATURE, 0, 4)
    driver.common_write(COMMON_CONFIG_GENERATION, 5, 1)
    assert driver.common_read(COMMON_NUM_QUEUES, 2) == 2
    assert driver.common_read(COMMON_DEVICE_FEATURE, 4) != 0


def test_reset_clears_device_selectors_and_vectors(driver: PciVirtioDriver, device: RecordingDevice) -> None:
    driver.init(vectors=True)
    driver.common_write(COMMON_MSIX_CONFIG, 0, 2)
    driver.common_write(COMMON_QUEUE_SELECT, 1, 2)
    driver.common_write(COMMON_DEVICE_STATUS, 0, 1)
    assert driver.status() == 0 and not device.queues[0].ready
    assert driver.common_read(COMMON_QUEUE_SELECT, 2) == 0
    assert driver.common_read(COMMON_MSIX_CONFIG, 2) == VIRTIO_MSI_NO_VECTOR
    assert driver.common_read(COMMON_QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR


def test_config_generation_and_device_configuration(driver: PciVirtioDriver, device: RecordingDevice) -> None:
    config = driver.address(CAP_DEVICE_CFG)
    assert driver.mmio.read(config, 4) == b"\x11\x22\x33\x44"
    assert driver.mmio.read(config + 4, 4) == b"\x55\x66\x77\x88"
    driver.mmio.write(config + 2, b"\xaa")
    assert device.config[2] == 0xAA
    generation = driver.common_read(COMMON_CONFIG_GENERATION, 1)
    device.config_changed()
    assert driver.common_read(COMMON_CONFIG_GENERATION, 1) == (generation + 1) & 0xFF


# -- notifications and INTx -----------------------------------------------------------------------------


def test_notify_write_serves_the_queue_and_isr_read_clears_intx(
    rig: Rig, driver: PciVirtioDriver, device: RecordingDevice
) -> None:
    rings = driver.init()
    head = rings[1].add_chain([(driver.arena.alloc(16), 16, True)])
    driver.notify(1)
    assert device.served == [(1, head)] and rings[1].take_used() == [(head, 0)]
    assert rig.transport.notify_exits == 1
    assert rig.line.level  # INTx held high while the ISR is non-zero
    assert rig.port_driver.read(rig.slot, PCI_STATUS, 2) & STATUS_INTERRUPT
    assert driver.isr() == INTERRUPT_USED_BUFFER
    assert not rig.line.level and driver.isr() == 0  # read-to-clear
    assert not rig.port_driver.read(rig.slot, PCI_STATUS, 2) & STATUS_INTERRUPT
    device.config_changed()
    assert rig.line.level and driver.isr() == INTERRUPT_CONFIG_CHANGE


def test_intx_disable_holds_the_line_low(rig: Rig, driver: PciVirtioDriver, device: RecordingDevice) -> None:
    rings = driver.init()
    rig.port_driver.write(rig.slot, PCI_COMMAND, COMMAND_MEMORY | COMMAND_INTX_DISABLE, 2)
    rings[0].add_chain([(driver.arena.alloc(8), 8, True)])
    driver.notify(0)
    assert device.served and not rig.line.level
    assert rig.port_driver.read(rig.slot, PCI_STATUS, 2) & STATUS_INTERRUPT  # pending, just not signalled
    rig.port_driver.write(rig.slot, PCI_COMMAND, COMMAND_MEMORY, 2)  # enabled again: the line rises
    assert rig.line.level


def test_notifications_for_missing_queues_are_ignored(
    driver: PciVirtioDriver, device: RecordingDevice
) -> None:
    driver.init()
    driver.mmio.write(driver.address(CAP_NOTIFY_CFG, 4 * 7), b"\x07\x00")  # beyond the notify area
    driver.mmio.write(driver.address(CAP_NOTIFY_CFG, 4), b"\x01\x00")
    assert device.stats.ignored_notifications == 0 and device.stats.notifications == 1


# -- MSI-X ---------------------------------------------------------------------------------------------------


def test_msix_vectors_follow_queue_and_config_vectors(
    rig: Rig, driver: PciVirtioDriver, device: RecordingDevice
) -> None:
    driver.enable_msix(3)
    rings = driver.init(vectors=True)  # queue 0 -> vector 1, queue 1 -> vector 2
    driver.common_write(COMMON_MSIX_CONFIG, 0, 2)
    assert driver.common_read(COMMON_MSIX_CONFIG, 2) == 0
    rings[1].add_chain([(driver.arena.alloc(8), 8, True)])
    driver.notify(1)
    rings[0].add_chain([(driver.arena.alloc(8), 8, True)])
    driver.notify(0)
    device.config_changed()
    assert rig.sink.sent == [(2, MSI_ADDRESS, 0x42), (1, MSI_ADDRESS, 0x41), (0, MSI_ADDRESS, 0x40)]
    assert not rig.line.changes  # no INTx while MSI-X is on
    assert rig.transport.interrupt.msix_fired == 3


def test_vector_out_of_range_reads_back_no_vector(driver: PciVirtioDriver, device: RecordingDevice) -> None:
    driver.enable_msix(3)
    driver.common_write(COMMON_MSIX_CONFIG, 3, 2)  # the function has 3 vectors: 0-2
    assert driver.common_read(COMMON_MSIX_CONFIG, 2) == VIRTIO_MSI_NO_VECTOR
    driver.common_write(COMMON_QUEUE_SELECT, 0, 2)
    driver.common_write(COMMON_QUEUE_MSIX_VECTOR, 0x800, 2)
    assert driver.common_read(COMMON_QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR


def test_no_vector_means_no_interrupt(rig: Rig, driver: PciVirtioDriver, device: RecordingDevice) -> None:
    driver.enable_msix(3)
    rings = driver.init(vectors=False)
    rings[0].add_chain([(driver.arena.alloc(8), 8, True)])
    driver.notify(0)
    assert device.served and rig.sink.sent == [] and not rig.line.changes
    assert rig.transport.interrupt.suppressed == 1


def test_enabling_msix_drops_an_asserted_intx(
    rig: Rig, driver: PciVirtioDriver, device: RecordingDevice
) -> None:
    rings = driver.init()
    rings[0].add_chain([(driver.arena.alloc(8), 8, True)])
    driver.notify(0)
    assert rig.line.level
    driver.enable_msix(3)
    assert not rig.line.level


def test_msix_table_lives_in_bar0(driver: PciVirtioDriver, rig: Rig) -> None:
    table_bir = rig.port_driver.read(rig.slot, driver.msix_cap + 4)
    pba_bir = rig.port_driver.read(rig.slot, driver.msix_cap + 8)
    assert table_bir & 7 == 0 and pba_bir & 7 == 0
    assert rig.port_driver.read(rig.slot, driver.msix_cap + 2, 2) & 0x7FF == 2  # 3 vectors
    assert rig.mmio.read(driver.bar0() + (table_bir & ~7) + 12, 4) == b"\x01\x00\x00\x00"  # masked at reset


def test_block_device_over_pci_reads_the_image_and_signals_its_vector(
    memory: GuestMemory, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(IMAGE)
    disk = VirtioBlock(memory, image)
    rig = Rig(disk, memory)
    driver = rig.driver
    driver.enable()
    assert rig.port_driver.read(rig.slot, 0x08) >> 8 == 0x010000  # mass storage
    capacity = driver.mmio.read(driver.address(CAP_DEVICE_CFG), 8)
    assert struct.unpack("<Q", capacity)[0] == len(IMAGE) // 512
    driver.enable_msix(2)
    (ring,) = driver.init(vectors=True)
    request = submit(ring, VIRTIO_BLK_T_IN, 2, in_length=1024, in_pieces=3)
    driver.notify(0)
    assert request.status == VIRTIO_BLK_S_OK and request.data() == IMAGE[1024:2048]
    assert rig.sink.sent == [(1, MSI_ADDRESS, 0x41)]
    disk.close()


# -- VIRTIO_PCI_CAP_PCI_CFG ---------------------------------------------------------------------------


def test_pci_cfg_window_reaches_the_bar_through_configuration_space(
    rig: Rig, device: RecordingDevice
) -> None:
    ports, slot = rig.port_driver, rig.slot
    cap = rig.driver.caps[CAP_PCI_CFG].position
    # the window works with Memory Space off: that is what it is for
    ports.write(slot, cap + 4, 0, 1)  # bar 0
    ports.write(slot, cap + 8, COMMON_NUM_QUEUES)  # offset
    ports.write(slot, cap + 12, 2)  # length
    assert ports.read(slot, cap + 16, 2) == 2
    ports.write(slot, cap + 8, COMMON_DEVICE_STATUS)
    ports.write(slot, cap + 12, 1)
    ports.write(slot, cap + 16, STATUS_ACKNOWLEDGE, 1)
    assert device.status == STATUS_ACKNOWLEDGE
    ports.write(slot, cap + 8, 3)  # a 2-byte access at an odd offset is not valid: nothing happens
    ports.write(slot, cap + 12, 2)
    ports.write(slot, cap + 16, 0, 2)
    assert device.status == STATUS_ACKNOWLEDGE


# -- notification area tracking -----------------------------------------------------------------------------


def test_notify_listeners_follow_the_bar(rig: Rig) -> None:
    seen: list[int | None] = []
    rig.transport.notify_listeners.append(seen.append)
    ports, slot = rig.port_driver, rig.slot
    ports.write(slot, PCI_COMMAND, COMMAND_MEMORY, 2)
    ports.size_bar(slot, 0)  # Linux sizes with decoding off; here it is on: the area leaves and comes back
    ports.write(slot, PCI_BASE_ADDRESS_0, BAR_ADDRESS + 0x8000)
    ports.write(slot, PCI_COMMAND, 0, 2)
    notify = 0x3000
    assert seen == [
        BAR_ADDRESS + notify,
        None,
        BAR_ADDRESS + notify,
        BAR_ADDRESS + 0x8000 + notify,
        None,
    ]
    assert rig.transport.notify_address(1) is None


# -- attachment ---------------------------------------------------------------------------------------


def readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


@pytest.fixture
def machine(memory: GuestMemory) -> FakePciMachine:
    return FakePciMachine(memory)


def attached_driver(machine: FakePciMachine, slot: int) -> PciVirtioDriver:
    driver = PciVirtioDriver(
        PortDriver(machine.pio_bus), machine.mmio_bus, slot, machine.memory, Arena(machine.memory)
    )
    driver.enable()
    return driver


def test_platform_is_made_once_per_machine(machine: FakePciMachine, memory: GuestMemory) -> None:
    assert pci_platform(machine, create=False) is None and pci_dsdt_aml(machine) == b""
    first = attach_virtio_pci(machine, VirtioRng(memory, name="rng-a"))
    second = attach_virtio_pci(machine, VirtioRng(memory, name="rng-b"), iothreads=False)
    try:
        platform = machine.pci_platform
        assert platform is not None
        assert first.bus is second.bus is platform.bus
        assert machine.firmware.collect().dsdt_aml == pci_dsdt_aml(machine)
        assert machine.pio_bus.lookup(0xCFC) == (platform.bus, 0xCF8)
        assert machine.mmio_bus.lookup(PCI_MMIO_WINDOW_BASE) == (
            platform.bus.mmio_window,
            PCI_MMIO_WINDOW_BASE,
        )
        assert (first.slot, second.slot) == (1, 2)
        assert (first.intx_gsi, second.intx_gsi) == (17, 18)
        assert PortDriver(machine.pio_bus).read(second.slot, PCI_INTERRUPT_LINE, 1) == 18
        assert (
            first.bar_address == PCI_MMIO_WINDOW_BASE
            and second.bar_address == PCI_MMIO_WINDOW_BASE + BAR_SIZE
        )
        assert first.msi_gsis == [FIRST_MSI_GSI, FIRST_MSI_GSI + 1] and second.msi_gsis == []
        assert b"PCI0" in pci_dsdt_aml(machine)
    finally:
        platform.bus.close()


def test_iothread_attachment_end_to_end(machine: FakePciMachine, memory: GuestMemory) -> None:
    rng = VirtioRng(memory)
    attachment = attach_virtio_pci(machine, rng)
    vm = machine.vm
    try:
        assert attachment.io_thread_name == "io:virtio-rng0"
        assert vm.ioeventfds == {}  # Memory Space is off: no notification address yet
        gsi, resample = vm.intx_irqfds[attachment.irq_fd or -1]
        assert gsi == 17 and resample == attachment.resample_fd
        driver = attached_driver(machine, attachment.slot)
        notify = attachment.bar_address + 0x3000
        assert vm.ioeventfds == {(notify, None): (attachment.io.queue_fds[0], 0)}
        driver.enable_msix(2)
        (ring,) = driver.init(vectors=True)
        buffer = driver.arena.alloc(32)
        head = ring.add_chain([(buffer, 32, True)])
        machine.guest_mmio_write(notify, struct.pack("<H", 0))  # handled by "KVM": no exit
        assert attachment.transport.notify_exits == 0
        msi_fd = attachment.msi_sink.fds[1]  # type: ignore[attr-defined]
        assert readable(msi_fd), "the I/O thread did not raise the queue's MSI-X vector"
        assert os.eventfd_read(msi_fd) == 1
        assert ring.take_used() == [(head, 32)] and rng.bytes_served == 32
        routes = [row for row in vm.tables[-1] if row[0] == attachment.msi_gsis[1]]
        assert routes == [(attachment.msi_gsis[1], 2, (MSI_ADDRESS, 0, 0x41))]
        # the BAR moves: so do the ioeventfds; Memory Space off: they go
        driver.ports.write(attachment.slot, PCI_BASE_ADDRESS_0, attachment.bar_address + 0x100000)
        assert list(vm.ioeventfds) == [(notify + 0x100000, None)]
        driver.ports.write(attachment.slot, PCI_COMMAND, 0, 2)
        assert vm.ioeventfds == {}
    finally:
        attachment.bus.close()
    assert vm.ioeventfds == {} and vm.irqfds == {} and vm.intx_irqfds == {}
    assert not attachment.io.thread.running and rng.closed


def test_intx_with_resample_through_the_io_thread(machine: FakePciMachine, memory: GuestMemory) -> None:
    rng = VirtioRng(memory)
    attachment = attach_virtio_pci(machine, rng)
    try:
        driver = attached_driver(machine, attachment.slot)
        (ring,) = driver.init()
        ring.add_chain([(driver.arena.alloc(8), 8, True)])
        machine.guest_mmio_write(attachment.bar_address + 0x3000, b"\x00\x00")
        irq_fd, resample_fd = attachment.irq_fd or -1, attachment.resample_fd or -1
        assert readable(irq_fd) and os.eventfd_read(irq_fd) == 1
        # the guest EOIs without reading the ISR: KVM signals resample, the line must rise again
        os.eventfd_write(resample_fd, 1)
        assert readable(irq_fd) and os.eventfd_read(irq_fd) == 1
        assert driver.isr() == INTERRUPT_USED_BUFFER
        os.eventfd_write(resample_fd, 1)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline and not readable(irq_fd, 0.05):
            pass
        assert not readable(irq_fd, 0)  # ISR cleared: no re-assertion
    finally:
        attachment.bus.close()


def test_any_length_ioeventfd_refused_falls_back_to_datamatch(
    machine: FakePciMachine, memory: GuestMemory
) -> None:
    machine.vm.refuse_any_length = True
    attachment = attach_virtio_pci(machine, RecordingDevice(memory))
    try:
        attached_driver(machine, attachment.slot)
        notify = attachment.bar_address + 0x3000
        assert set(machine.vm.ioeventfds) == {(notify, 0), (notify + 4, 1)}
        assert machine.vm.ioeventfds[(notify + 4, 1)] == (attachment.io.queue_fds[1], 2)
    finally:
        attachment.bus.close()
    assert machine.vm.ioeventfds == {}


def test_refused_ioeventfds_leave_notifications_on_the_exit_path(
    machine: FakePciMachine, memory: GuestMemory
) -> None:
    machine.vm.refuse_all = True
    rng = VirtioRng(memory)
    attachment = attach_virtio_pci(machine, rng)
    try:
        driver = attached_driver(machine, attachment.slot)
        assert machine.vm.ioeventfds == {} and attachment.notify_ioeventfds == []
        driver.enable_msix(2)
        (ring,) = driver.init(vectors=True)
        head = ring.add_chain([(driver.arena.alloc(8), 8, True)])
        machine.guest_mmio_write(attachment.bar_address + 0x3000, b"\x00\x00")  # exits: nothing matched
        assert attachment.transport.notify_exits == 1
        assert readable(attachment.msi_sink.fds[1])  # type: ignore[attr-defined]
        assert ring.take_used() == [(head, 8)]
    finally:
        attachment.bus.close()


def test_vcpu_attachment_uses_signal_msi_and_a_shared_line(
    machine: FakePciMachine, memory: GuestMemory
) -> None:
    devices = [RecordingDevice(memory) for _ in range(9)]
    attachments = [attach_virtio_pci(machine, device, iothreads=False) for device in devices]
    try:
        first, ninth = attachments[0], attachments[8]
        assert (first.slot, ninth.slot) == (1, 9) and first.intx_gsi == ninth.intx_gsi == 17
        line = machine.lines[17]
        one, nine = attached_driver(machine, first.slot), attached_driver(machine, ninth.slot)
        ring_one = one.init()[0]
        ring_nine = nine.init()[0]
        for ring, driver in ((ring_one, one), (ring_nine, nine)):
            ring.add_chain([(driver.arena.alloc(8), 8, True)])
            driver.notify(0)  # no ioeventfd: served on this (the "vCPU") thread
        assert devices[0].served and devices[8].served and line.level
        assert one.isr() == INTERRUPT_USED_BUFFER
        assert line.level  # slot 9 still holds the shared line
        assert nine.isr() == INTERRUPT_USED_BUFFER
        assert not line.level
        one.enable_msix(3)
        ring_one.add_chain([(one.arena.alloc(8), 8, True)])
        one.common_write(COMMON_QUEUE_SELECT, 0, 2)
        one.notify(0)
        assert machine.vm.msis == []  # queue 0 has no vector (set up before MSI-X)
        devices[0].config_changed()
        assert machine.vm.msis == []
        one.common_write(COMMON_MSIX_CONFIG, 2, 2)
        devices[0].config_changed()
        assert machine.vm.msis == [(MSI_ADDRESS, 0x42)]
    finally:
        attachments[0].bus.close()


def test_wired_or_line() -> None:
    line = RecordingInterruptLine()
    shared = WiredOrLine(line)
    a, b = shared.source(), shared.source()
    a.set_level(True)
    b.set_level(True)
    a.set_level(False)
    assert line.level
    b.set_level(False)
    assert line.changes == [True, False]


def test_device_on_another_machine_is_refused(machine: FakePciMachine) -> None:
    other = GuestMemory.for_size(RAM_SIZE)
    try:
        with pytest.raises(ConfigError, match="another machine"):
            attach_virtio_pci(machine, VirtioRng(other))
    finally:
        other.close()
