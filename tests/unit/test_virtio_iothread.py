"""I/O threads and machine attachment, with a fake VM standing in for KVM's ioeventfd/irqfd.

KVM's part is simple enough to play by hand: an ioeventfd write is "the guest wrote
QueueNotify", a readable irqfd is "the guest got an interrupt", and writing the resample
eventfd is "the guest EOI'd".
"""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path

import pytest

from tests.unit.rigs.machines import FakeMachine
from tests.unit.rigs.virtio_block import IMAGE, Request, submit
from tests.unit.rigs.virtio_mmio import MmioDriver
from tests.unit.rigs.virtqueue import RAM_SIZE, Arena
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio import iothread
from vmscope.virtio.attach import (
    VIRTIO_MMIO_BASE,
    VirtioMmioAttachment,
    attach_virtio_mmio,
    virtio_mmio_cmdline,
    virtio_mmio_slot,
)
from vmscope.virtio.block import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, RequestTrace, VirtioBlock
from vmscope.virtio.device import VIRTIO_F_EVENT_IDX, EventfdSignal
from vmscope.virtio.iothread import IoThread, VirtioIoThread, drain_eventfd, new_eventfd
from vmscope.virtio.mmio import REG_QUEUE_NOTIFY, WINDOW_SIZE, VirtioMmioTransport
from vmscope.virtio.rng import VirtioRng

NO_EVENT_IDX = ~(1 << VIRTIO_F_EVENT_IDX)


def readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(IMAGE)
    return path


@pytest.fixture
def machine(memory: GuestMemory) -> FakeMachine:
    return FakeMachine(memory)


def wait_used(request: Request, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while request.ring.used_idx() != (request.ring.used_seen + count) & 0xFFFF:
        assert time.monotonic() < deadline, "the I/O thread did not complete the request"
        time.sleep(0.002)
    return request.ring.take_used()


def last_trace(attachment: VirtioMmioAttachment) -> RequestTrace:
    """The newest request trace (it is stored right after the interrupt, so wait for it)."""
    device = attachment.device
    assert isinstance(device, VirtioBlock)
    assert wait_until(lambda: len(device.traces()) > 0)
    return device.traces()[-1]


# -- the generic thread --------------------------------------------------------------------------


def test_io_thread_runs_callbacks_on_its_own_thread_and_stops_cleanly() -> None:
    thread = IoThread("io:test0")
    fd = new_eventfd()
    seen: list[str] = []
    done = threading.Event()

    def on_event() -> None:
        drain_eventfd(fd)
        seen.append(threading.current_thread().name)
        if len(seen) == 1:
            raise RuntimeError("a broken handler must not end the loop")
        done.set()

    thread.add_reader(fd, on_event)
    thread.start()
    try:
        os.eventfd_write(fd, 1)
        assert wait_until(lambda: thread.callback_errors == 1)
        os.eventfd_write(fd, 1)
        assert done.wait(5)
        assert seen == ["io:test0", "io:test0"]
    finally:
        assert thread.stop()
        assert not thread.running
        thread.close()
        os.close(fd)


def wait_until(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.002)
    return False


def test_queue_eventfd_is_served_on_the_io_thread_and_signals_the_irqfd(
    memory: GuestMemory, image: Path
) -> None:
    disk = VirtioBlock(memory, image)
    driver = MmioDriver(VirtioMmioTransport(disk), memory, Arena(memory))
    irq_fd = new_eventfd()
    disk.set_interrupt_signal(EventfdSignal(irq_fd))
    io = VirtioIoThread(disk)
    io.start()
    try:
        (ring,) = driver.init(NO_EVENT_IDX)
        request = submit(ring, VIRTIO_BLK_T_IN, 2, in_length=512)
        os.eventfd_write(io.queue_fds[0], 1)  # what KVM does for the guest's QueueNotify write
        assert readable(irq_fd)
        assert drain_eventfd(irq_fd) == 1
        assert wait_used(request) == [(request.head, 513)]
        assert request.status == VIRTIO_BLK_S_OK and request.data() == IMAGE[1024:1536]
        assert wait_until(lambda: len(disk.traces()) == 1)  # recorded just after the interrupt
        (trace,) = disk.traces()
        assert trace.thread == "io:virtio-blk0"
        assert trace.notify_ns <= trace.pickup_ns and trace.interrupt_ns is not None
    finally:
        io.close()
        disk.close()
        os.close(irq_fd)
    assert not io.thread.running


# -- attachment ----------------------------------------------------------------------------------


def attach_blk(
    machine: FakeMachine, image: Path, **options: object
) -> tuple[VirtioMmioAttachment, MmioDriver]:
    disk = VirtioBlock(machine.memory, image)
    attachment = attach_virtio_mmio(machine, disk, base=VIRTIO_MMIO_BASE, gsi=5, **options)  # type: ignore[arg-type]
    return attachment, MmioDriver(attachment.transport, machine.memory, Arena(machine.memory))


def test_attach_with_io_threads_registers_ioeventfds_and_irqfd(machine: FakeMachine, image: Path) -> None:
    attachment, driver = attach_blk(machine, image)
    vm = machine.vm
    try:
        notify = VIRTIO_MMIO_BASE + REG_QUEUE_NOTIFY
        assert vm.ioeventfds == {(notify, 0): attachment.io.queue_fds[0]}
        assert ("ioeventfd", attachment.io.queue_fds[0], notify, 4, False, 0, False) in vm.calls
        assert vm.irqfds == {5: (attachment.irq_fd, None)}  # edge: no resample
        assert machine.mmio_bus.lookup(VIRTIO_MMIO_BASE) == (attachment.transport, VIRTIO_MMIO_BASE)
        assert attachment.io.thread.running and attachment.io_thread_name == "io:virtio-blk0"

        (ring,) = driver.init(NO_EVENT_IDX)
        request = submit(ring, VIRTIO_BLK_T_IN, 0, in_length=512)
        assert vm.guest_notify(notify, 0)  # no exit: KVM signals the eventfd
        assert attachment.irq_fd is not None and readable(attachment.irq_fd)
        assert wait_used(request) == [(request.head, 513)]
        assert request.data() == IMAGE[:512]
        assert last_trace(attachment).thread == "io:virtio-blk0"
    finally:
        attachment.close()
    assert not attachment.io.thread.running
    assert vm.ioeventfds == {} and vm.irqfds == {}
    assert attachment.device.closed


def test_notify_that_exits_is_still_served_on_the_io_thread(machine: FakeMachine, image: Path) -> None:
    attachment, driver = attach_blk(machine, image)
    try:
        (ring,) = driver.init(NO_EVENT_IDX)
        request = submit(ring, VIRTIO_BLK_T_IN, 0, in_length=512)
        driver.notify(0)  # a QueueNotify that reached userspace (a vCPU exit)
        wait_used(request)
        assert last_trace(attachment).thread == "io:virtio-blk0"
        driver.notify(9)  # no such queue: ignored, nothing raised
    finally:
        attachment.close()


def test_level_trigger_uses_irqfd_resample(machine: FakeMachine, image: Path) -> None:
    attachment, driver = attach_blk(machine, image, trigger="level")
    irq_fd, resample_fd = attachment.irq_fd, attachment.resample_fd
    assert irq_fd is not None and resample_fd is not None
    assert machine.vm.irqfds == {5: (irq_fd, resample_fd)}
    try:
        (ring,) = driver.init(NO_EVENT_IDX)
        request = submit(ring, VIRTIO_BLK_T_IN, 0, in_length=512)
        driver.notify(0)
        wait_used(request)
        assert readable(irq_fd) and drain_eventfd(irq_fd) == 1
        # the guest EOIs before acknowledging: the status is still set, so the line is re-asserted
        os.eventfd_write(resample_fd, 1)
        assert readable(irq_fd) and drain_eventfd(irq_fd) == 1
        # after the acknowledgement a resample does nothing
        assert driver.ack() == 1
        os.eventfd_write(resample_fd, 1)
        assert wait_until(lambda: drain_eventfd(resample_fd) == 0 and not readable(resample_fd, 0))
        assert not readable(irq_fd, 0.1)
    finally:
        attachment.close()


def test_attach_without_io_threads_serves_on_the_vcpu_and_uses_irq_line(
    machine: FakeMachine, image: Path
) -> None:
    attachment, driver = attach_blk(machine, image, iothreads=False)
    try:
        assert machine.vm.calls == []  # no ioeventfd, no irqfd
        assert not attachment.io.thread.running  # a disk has no host-side input to poll
        line = machine.lines[5]
        (ring,) = driver.init(NO_EVENT_IDX)
        request = submit(ring, VIRTIO_BLK_T_IN, 0, in_length=512)
        driver.notify(0)
        assert ring.take_used() == [(request.head, 513)]  # done before the write returned
        assert last_trace(attachment).thread == threading.current_thread().name
        assert line.level
        driver.ack()
        assert not line.level
    finally:
        attachment.close()


def test_attachment_checks_placement(machine: FakeMachine, memory: GuestMemory, image: Path) -> None:
    rng = VirtioRng(memory)
    for gsi in (0, 4, 8, 9, 12, 24):
        with pytest.raises(ConfigError, match="GSI"):
            attach_virtio_mmio(machine, rng, base=VIRTIO_MMIO_BASE, gsi=gsi)
    with pytest.raises(ConfigError, match="aligned"):
        attach_virtio_mmio(machine, rng, base=VIRTIO_MMIO_BASE + 0x10, gsi=5)
    other = GuestMemory.for_size(RAM_SIZE)
    try:
        with pytest.raises(ConfigError, match="another machine"):
            attach_virtio_mmio(machine, VirtioRng(other), base=VIRTIO_MMIO_BASE, gsi=5)
    finally:
        other.close()
    assert machine.vm.calls == []


def test_failed_attach_undoes_its_registrations(machine: FakeMachine, memory: GuestMemory) -> None:
    first = attach_virtio_mmio(machine, VirtioRng(memory), base=VIRTIO_MMIO_BASE, gsi=5)
    with pytest.raises(ConfigError, match="overlaps"):
        attach_virtio_mmio(machine, VirtioRng(memory, name="virtio-rng1"), base=VIRTIO_MMIO_BASE, gsi=6)
    assert list(machine.vm.irqfds) == [5] and len(machine.vm.ioeventfds) == 1
    first.close()


def test_slots_and_kernel_command_line(machine: FakeMachine, memory: GuestMemory) -> None:
    attachments = []
    for index in range(2):
        base, gsi = virtio_mmio_slot(index)
        attachments.append(
            attach_virtio_mmio(machine, VirtioRng(memory, name=f"virtio-rng{index}"), base=base, gsi=gsi)
        )
    try:
        assert virtio_mmio_cmdline(attachments) == (
            "virtio_mmio.device=0x200@0xfeb00000:5 virtio_mmio.device=0x200@0xfeb01000:6"
        )
        assert attachments[1].acpi_entry() == (0xFEB0_1000, WINDOW_SIZE, 6)
        assert [a.io_thread_name for a in attachments] == ["io:virtio-rng0", "io:virtio-rng1"]
    finally:
        for attachment in attachments:
            attachment.close()
    assert [virtio_mmio_slot(i)[1] for i in range(6)] == [5, 6, 7, 10, 11, 13]
    with pytest.raises(ConfigError):
        virtio_mmio_slot(6)


# -- polling ---------------------------------------------------------------------------------------


def test_polling_serves_a_request_published_after_the_notification_was_served(
    memory: GuestMemory, image: Path
) -> None:
    posted: list[Request] = []

    class LateDriver(VirtioBlock):
        """The driver publishes its next request while the I/O thread polls, and notifies."""

        def queue_avail_index(self, index: int) -> int | None:
            if not posted:
                posted.append(submit(ring, VIRTIO_BLK_T_IN, 4, in_length=512))
                os.eventfd_write(io.queue_fds[0], 1)
            return super().queue_avail_index(index)

    disk = LateDriver(memory, image)
    driver = MmioDriver(VirtioMmioTransport(disk), memory, Arena(memory))
    io = VirtioIoThread(disk, poll_ns=1_000_000_000)  # not started: the test plays the thread
    try:
        (ring,) = driver.init(NO_EVENT_IDX)
        io._poll_queue(0, io.queue_fds[0], ring.avail_idx)  # everything published so far is served
        (request,) = posted
        assert request.ring.take_used() == [(request.head, 513)]
        assert request.status == VIRTIO_BLK_S_OK and request.data() == IMAGE[2048:2560]
        assert io.poll_hits == 1
        assert drain_eventfd(io.queue_fds[0]) == 0  # its notification was consumed, no extra wake-up
    finally:
        io.close()
        disk.close()


def test_polling_that_stops_early_loses_no_notification(
    memory: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    posted: list[Request] = []

    class RacingDriver(VirtioBlock):
        """The driver publishes and notifies just after the thread read the index (it sees the
        old one), so the thread drains that notification at its deadline."""

        def queue_avail_index(self, index: int) -> int | None:
            current = super().queue_avail_index(index)
            if not posted:
                posted.append(submit(ring, VIRTIO_BLK_T_IN, 6, in_length=512))
                os.eventfd_write(io.queue_fds[0], 1)
            return current

    yields = iter([True])
    monkeypatch.setattr(iothread, "_POLL_HOLD_NS", 0)  # look at the GIL hand-over every turn
    monkeypatch.setattr(iothread, "_yield_gil", lambda: next(yields, False))  # then: preempted
    disk = RacingDriver(memory, image)
    driver = MmioDriver(VirtioMmioTransport(disk), memory, Arena(memory))
    io = VirtioIoThread(disk, poll_ns=1)  # the deadline passes at once
    try:
        (ring,) = driver.init(NO_EVENT_IDX)
        io._poll_queue(0, io.queue_fds[0], ring.avail_idx)
        assert io.poll_backoffs == 1
        (request,) = posted
        assert request.ring.take_used() == [(request.head, 513)]  # served although polling stopped
        assert request.data() == IMAGE[3072:3584]
    finally:
        io.close()
        disk.close()


def test_polling_is_only_for_queue_eventfds_of_devices_that_ask_for_it(
    memory: GuestMemory, image: Path
) -> None:
    disk, rng = VirtioBlock(memory, image), VirtioRng(memory)
    threads = [
        VirtioIoThread(disk, poll_ns=30_000),
        VirtioIoThread(disk, poll_ns=0),
        VirtioIoThread(disk, queue_eventfds=False, poll_ns=30_000),
        VirtioIoThread(rng, poll_ns=30_000),
    ]
    try:
        assert [io.max_poll_ns for io in threads] == [30_000, 0, 0, 0]
    finally:
        for io in threads:
            io.close()
        disk.close()
        rng.close()
