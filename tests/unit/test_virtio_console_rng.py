"""virtio-console on a serial backend, and virtio-rng."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.unit.rigs.virtio_mmio import MmioDriver
from tests.unit.rigs.virtqueue import Arena, Ring
from vmscope.devices.char_backends import InputSink, SerialBackend
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.console import RECEIVE_QUEUE, TRANSMIT_QUEUE, VirtioConsole
from vmscope.virtio.device import VIRTIO_F_EVENT_IDX
from vmscope.virtio.iothread import VirtioIoThread
from vmscope.virtio.mmio import VirtioMmioTransport
from vmscope.virtio.rng import MAX_BYTES_PER_REQUEST, VirtioRng

NO_EVENT_IDX = ~(1 << VIRTIO_F_EVENT_IDX)


class LoopbackBackend(SerialBackend):
    """Records guest output; hands the test's input to the device like a reader thread would."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.sink: InputSink | None = None
        self.closed = False

    def write(self, data: bytes) -> None:
        self.output += data

    def start(self, deliver: InputSink) -> None:
        self.sink = deliver

    def close(self) -> None:
        self.closed = True

    def type_in(self, data: bytes) -> tuple[threading.Thread, list[bool]]:
        """Deliver ``data`` from another thread (it blocks until the guest took it all)."""
        assert self.sink is not None
        result: list[bool] = []
        sink = self.sink
        thread = threading.Thread(target=lambda: result.append(sink(data)), name="test-input")
        thread.start()
        return thread, result


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def console(memory: GuestMemory) -> Iterator[tuple[VirtioConsole, LoopbackBackend, MmioDriver, list[Ring]]]:
    backend = LoopbackBackend()
    device = VirtioConsole(memory, backend)
    driver = MmioDriver(VirtioMmioTransport(device), memory, Arena(memory))
    rings = driver.init(NO_EVENT_IDX)
    yield device, backend, driver, rings
    device.close()


# -- console -------------------------------------------------------------------------------------


def test_console_output_reaches_the_backend(
    console: tuple[VirtioConsole, LoopbackBackend, MmioDriver, list[Ring]],
) -> None:
    device, backend, driver, rings = console
    arena, ring = driver.arena, rings[TRANSMIT_QUEUE]
    head = ring.add_chain([(arena.put(b"hello, "), 7, False), (arena.put(b"world\n"), 6, False)])
    driver.notify(TRANSMIT_QUEUE)
    assert bytes(backend.output) == b"hello, world\n"
    assert ring.take_used() == [(head, 0)]
    assert device.bytes_out == 13


def test_console_input_fills_receive_buffers_with_flow_control(
    console: tuple[VirtioConsole, LoopbackBackend, MmioDriver, list[Ring]],
) -> None:
    device, backend, driver, rings = console
    arena, ring, memory = driver.arena, rings[RECEIVE_QUEUE], driver.memory
    thread, result = backend.type_in(b"abcdefghij")
    assert wait_for(lambda: device.pending_input == 10)
    buffers = [arena.alloc(4) for _ in range(2)]
    heads = [ring.add_chain([(buffer, 4, True)]) for buffer in buffers]
    driver.notify(RECEIVE_QUEUE)
    assert ring.take_used() == [(heads[0], 4), (heads[1], 4)]
    assert [memory.read(buffer, 4) for buffer in buffers] == [b"abcd", b"efgh"]
    assert thread.is_alive() and device.pending_input == 2  # the sender waits for the rest
    last = arena.alloc(8)
    head = ring.add_chain([(last, 8, True)])
    driver.notify(RECEIVE_QUEUE)
    thread.join(5)
    assert result == [True]
    assert ring.take_used() == [(head, 2)] and memory.read(last, 2) == b"ij"


def test_console_input_is_served_by_the_io_thread(
    console: tuple[VirtioConsole, LoopbackBackend, MmioDriver, list[Ring]],
) -> None:
    device, backend, driver, rings = console
    io = VirtioIoThread(device, queue_eventfds=False)
    io.start()
    try:
        assert io.thread.running
        buffer = driver.arena.alloc(16)
        head = rings[RECEIVE_QUEUE].add_chain([(buffer, 16, True)])
        driver.notify(RECEIVE_QUEUE)
        thread, result = backend.type_in(b"ls\n")
        thread.join(5)
        assert result == [True]
        assert rings[RECEIVE_QUEUE].take_used() == [(head, 3)]
        assert driver.memory.read(buffer, 3) == b"ls\n"
    finally:
        io.close()


def test_console_close_releases_a_blocked_sender(
    console: tuple[VirtioConsole, LoopbackBackend, MmioDriver, list[Ring]],
) -> None:
    device, backend, _, _ = console
    thread, result = backend.type_in(b"nobody reads this")
    assert wait_for(lambda: device.pending_input > 0)
    device.close()
    thread.join(5)
    assert result == [False] and backend.closed


def test_console_emergency_write(
    console: tuple[VirtioConsole, LoopbackBackend, MmioDriver, list[Ring]],
) -> None:
    _, backend, driver, _ = console
    driver.transport.write(0x100 + 8, b"!\0\0\0")
    assert bytes(backend.output) == b"!"


def test_console_transmit_with_writable_buffer_needs_reset(
    console: tuple[VirtioConsole, LoopbackBackend, MmioDriver, list[Ring]],
) -> None:
    device, backend, driver, rings = console
    rings[TRANSMIT_QUEUE].add_chain([(driver.arena.alloc(4), 4, True)])
    driver.notify(TRANSMIT_QUEUE)
    assert device.needs_reset and backend.output == b""


# -- rng -----------------------------------------------------------------------------------------


@pytest.fixture
def rng(memory: GuestMemory) -> tuple[VirtioRng, MmioDriver, Ring]:
    device = VirtioRng(memory)
    driver = MmioDriver(VirtioMmioTransport(device), memory, Arena(memory))
    (ring,) = driver.init(NO_EVENT_IDX)
    return device, driver, ring


def test_rng_fills_every_writable_byte(rng: tuple[VirtioRng, MmioDriver, Ring]) -> None:
    device, driver, ring = rng
    memory, arena = driver.memory, driver.arena
    first, second = arena.alloc(100), arena.alloc(28)
    memory.fill(first, 100, 0)
    memory.fill(second, 28, 0)
    head = ring.add_chain([(first, 100, True), (second, 28, True)])
    driver.notify(0)
    assert ring.take_used() == [(head, 128)]
    data = memory.read(first, 100) + memory.read(second, 28)
    assert data.count(0) < 16  # 128 random bytes: a handful of zeros at most
    other = arena.alloc(128)
    ring.add_chain([(other, 128, True)])
    driver.notify(0)
    assert memory.read(other, 128) != data
    assert device.bytes_served == 256


def test_rng_caps_a_request(rng: tuple[VirtioRng, MmioDriver, Ring]) -> None:
    _, driver, ring = rng
    size = 2 * MAX_BYTES_PER_REQUEST
    head = ring.add_chain([(driver.arena.alloc(size), size, True)])
    driver.notify(0)
    assert ring.take_used() == [(head, MAX_BYTES_PER_REQUEST)]


def test_rng_refuses_device_readable_buffers(rng: tuple[VirtioRng, MmioDriver, Ring]) -> None:
    device, driver, ring = rng
    ring.add_chain([(driver.arena.alloc(16), 16, False)])
    driver.notify(0)
    assert device.needs_reset and "device-readable" in (device.last_error or "")
    assert ring.take_used() == []
