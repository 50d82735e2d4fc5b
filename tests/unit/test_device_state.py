"""Device state seam: every device saves its state as plain data and a fresh one loads it back.

Each test drives a device into a non-trivial state, saves it (through JSON, to show the state is
plain data), loads it into a fresh instance, and then checks that both answer the same sequence of
guest accesses the same way. Malformed states raise DeviceStateError naming device and field.
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.rigs.pci import BAR_ADDRESS, Rig
from tests.unit.rigs.virtio_block import IMAGE, submit
from tests.unit.rigs.virtio_mmio import MmioDriver
from tests.unit.rigs.virtqueue import RAM_SIZE, Arena, Ring
from vmscope.devices.acpi_pm import AcpiPm
from vmscope.devices.base import Device, RecordingInterruptLine, RecordingMachineControl
from vmscope.devices.cmos import Cmos
from vmscope.devices.debug_exit import DebugExit
from vmscope.devices.i8042 import I8042
from vmscope.devices.port80 import Port80
from vmscope.devices.serial import Uart16550
from vmscope.errors import DeviceStateError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.pci.bus import PciBus
from vmscope.pci.msix import RecordingMsiSink
from vmscope.virtio.block import VIRTIO_BLK_T_IN, VirtioBlock
from vmscope.virtio.console import VirtioConsole
from vmscope.virtio.mmio import REG_INTERRUPT_STATUS, REG_QUEUE_SEL, REG_STATUS, VirtioMmioTransport
from vmscope.virtio.net import VirtioNet
from vmscope.virtio.net_backends import NetBackend
from vmscope.virtio.rng import VirtioRng


def through_json(state: dict[str, object]) -> dict[str, object]:
    loaded = json.loads(json.dumps(state))
    assert isinstance(loaded, dict)
    return loaded


def same_answers(first: Device, second: Device, accesses: list[tuple[int, int]]) -> list[bytes]:
    """Read ``(offset, size)`` from both devices in turn; the answers must agree."""
    answers = []
    for offset, size in accesses:
        expected = first.read(offset, size)
        assert second.read(offset, size) == expected, f"offset {offset:#x}"
        answers.append(expected)
    return answers


def clock() -> Callable[[], int]:
    return lambda: 5_000_000_000


# -- legacy devices ------------------------------------------------------------------------------


def test_uart_state_round_trip() -> None:
    line_a, line_b = RecordingInterruptLine(), RecordingInterruptLine()
    uart, fresh = Uart16550(line_a), Uart16550(line_b)
    uart.write(3, b"\x83")  # DLAB
    uart.write(0, b"\x01")
    uart.write(3, b"\x03")
    uart.write(2, b"\xc7")  # FIFO on, trigger 14
    uart.write(4, b"\x0b")  # DTR RTS OUT2
    uart.write(1, b"\x01")  # rx interrupt
    uart.write(7, b"\x5a")
    uart.receive(b"hello")
    state = through_json(uart.save_state())
    fresh.load_state(state)
    assert line_b.level == line_a.level is True
    assert fresh.save_state() == state
    same_answers(uart, fresh, [(2, 1), (5, 1), (0, 1), (0, 1), (7, 1), (4, 1), (3, 1), (6, 1)])
    for device in (uart, fresh):
        device.write(3, b"\x83")
    same_answers(uart, fresh, [(0, 1), (1, 1)])


def test_uart_state_with_a_bad_field_names_device_and_field() -> None:
    uart = Uart16550(RecordingInterruptLine())
    state = uart.save_state()
    with pytest.raises(DeviceStateError, match=r"serial0: state field 'rx'"):
        uart.load_state({**state, "rx": "00" * 17})
    with pytest.raises(DeviceStateError, match=r"'ier': missing"):
        uart.load_state({key: value for key, value in state.items() if key != "ier"})
    with pytest.raises(DeviceStateError, match=r"'thr_pending'"):
        uart.load_state({**state, "thr_pending": 1})


def test_cmos_state_round_trip() -> None:
    cmos, fresh = Cmos(256 << 20, clock_ns=clock()), Cmos(64 << 20, clock_ns=clock())
    cmos.write(0, b"\x40")
    cmos.write(1, b"\x99")
    cmos.write(0, b"\x8b")  # register B, NMI off
    cmos.write(1, b"\x06")  # binary, 24 hour
    fresh.load_state(through_json(cmos.save_state()))
    assert fresh.nmi_disabled and fresh.index == 0x0B
    for index in (0x40, 0x15, 0x17, 0x34, 0x00, 0x04, 0x0B):
        for device in (cmos, fresh):
            device.write(0, bytes([index]))
        same_answers(cmos, fresh, [(1, 1)])
    with pytest.raises(DeviceStateError, match="cmos: state field 'ram': 4 bytes, expected 128"):
        fresh.load_state({**cmos.save_state(), "ram": "00" * 4})


def test_i8042_state_round_trip() -> None:
    irq_a, irq_b = RecordingInterruptLine(), RecordingInterruptLine()
    ctl = I8042(RecordingMachineControl(), keyboard_irq=irq_a)
    fresh = I8042(RecordingMachineControl(), keyboard_irq=irq_b)
    ctl.write(4, b"\x60")
    ctl.write(0, b"\x45")  # config: keyboard interrupt, system flag, translate
    ctl.write(4, b"\xaa")  # self test -> 0x55 queued
    ctl.write(4, b"\xd2")
    ctl.write(0, b"\x12")  # keyboard output 0x12 queued
    ctl.write(4, b"\xd1")  # waits for its parameter byte
    fresh.load_state(through_json(ctl.save_state()))
    assert irq_b.level == irq_a.level is True
    same_answers(ctl, fresh, [(4, 1), (0, 1), (4, 1), (0, 1), (4, 1), (0, 1)])
    for device in (ctl, fresh):
        device.write(0, b"\x03")  # the pending 0xd1's parameter: output port
        device.write(4, b"\xd0")
    same_answers(ctl, fresh, [(0, 1)])
    with pytest.raises(DeviceStateError, match="'pending_command'"):
        fresh.load_state({**ctl.save_state(), "pending_command": 0xAA})


def test_acpi_pm_state_round_trip_keeps_the_timer_running_from_where_it_was() -> None:
    now = [1_000_000_000]
    pm = AcpiPm(RecordingMachineControl(), clock_ns=lambda: now[0])
    pm.write(2, b"\x21\x01")
    now[0] += 10_000_000
    state = through_json(pm.save_state())
    later = [50_000_000_000]
    fresh = AcpiPm(RecordingMachineControl(), clock_ns=lambda: later[0])
    fresh.load_state(state)
    same_answers(pm, fresh, [(2, 2), (4, 2), (0, 2), (8, 4)])
    with pytest.raises(DeviceStateError, match="acpi-pm: state field 'enable'"):
        fresh.load_state({**state, "enable": 0x10000})


def test_port80_state_round_trip() -> None:
    port, fresh = Port80(), Port80()
    port.write(0, b"\x42")
    fresh.load_state(through_json(port.save_state()))
    same_answers(port, fresh, [(0, 1), (0, 2)])
    fresh.load_state({"last_value": None})
    assert fresh.read(0, 1) == b"\xff"


def test_stateless_devices_accept_only_the_empty_state() -> None:
    device = DebugExit(RecordingMachineControl())
    assert device.save_state() == {}
    device.load_state({})
    with pytest.raises(DeviceStateError, match="debug-exit: state field 'x': this device has no state"):
        device.load_state({"x": 1})


# -- virtio over mmio ----------------------------------------------------------------------------


@pytest.fixture
def memories() -> Iterator[tuple[GuestMemory, GuestMemory]]:
    first, second = GuestMemory.for_size(RAM_SIZE), GuestMemory.for_size(RAM_SIZE)
    yield first, second
    first.close()
    second.close()


def copy_ram(source: GuestMemory, target: GuestMemory) -> None:
    target.write(0, source.read(0, RAM_SIZE))


def clone_ring(ring: Ring, memory: GuestMemory) -> Ring:
    clone = copy.copy(ring)
    clone.memory = memory
    clone.arena = copy.copy(ring.arena)
    clone.arena.memory = memory
    return clone


def mmio_registers(transport: VirtioMmioTransport, queues: int) -> list[int]:
    values = []
    for index in range(queues):
        transport.write(REG_QUEUE_SEL, struct.pack("<I", index))
        values += [int.from_bytes(transport.read(offset, 4), "little") for offset in range(0, 0x100, 4)]
    values += [int.from_bytes(transport.read(0x100 + offset, 4), "little") for offset in range(0, 0x40, 4)]
    return values


def test_virtio_block_over_mmio_state_round_trip(
    memories: tuple[GuestMemory, GuestMemory], tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(IMAGE)
    memory_a, memory_b = memories
    disk = VirtioBlock(memory_a, image)
    transport = VirtioMmioTransport(disk)
    driver = MmioDriver(transport, memory_a, Arena(memory_a))
    (ring,) = driver.init()
    first = submit(ring, VIRTIO_BLK_T_IN, 1, in_length=512)
    driver.notify(0)
    assert ring.take_used() == [(first.head, 513)]

    state = through_json(transport.save_state())
    copy_ram(memory_a, memory_b)
    restored = VirtioMmioTransport(VirtioBlock(memory_b, image))
    restored.load_state(state)
    assert restored.save_state() == state
    assert mmio_registers(restored, 1) == mmio_registers(transport, 1)

    ring_b = clone_ring(ring, memory_b)
    requests = [submit(r, VIRTIO_BLK_T_IN, 3, in_length=1024) for r in (ring, ring_b)]
    driver.notify(0)
    restored.write(0x50, struct.pack("<I", 0))
    assert ring.take_used() == ring_b.take_used() == [(requests[0].head, 1025)]
    assert (
        memory_b.read(requests[1].data_in, 1024)
        == memory_a.read(requests[0].data_in, 1024)
        == IMAGE[1536:2560]
    )
    transport.close()
    restored.close()


def test_virtio_block_state_must_meet_the_same_disk(
    memories: tuple[GuestMemory, GuestMemory], tmp_path: Path
) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(IMAGE[:4096])
    large = tmp_path / "large.img"
    large.write_bytes(IMAGE)
    state = VirtioMmioTransport(VirtioBlock(memories[0], large)).save_state()
    other = VirtioMmioTransport(VirtioBlock(memories[1], small))
    with pytest.raises(DeviceStateError, match=r"state field 'device\.capacity'"):
        other.load_state(state)


def test_virtio_queue_state_outside_ram_is_refused(memories: tuple[GuestMemory, GuestMemory]) -> None:
    transport = VirtioMmioTransport(VirtioRng(memories[0]))
    driver = MmioDriver(transport, memories[0], Arena(memories[0]))
    driver.init()
    state = transport.save_state()
    virtio = state["virtio"]
    assert isinstance(virtio, dict)
    queue = virtio["queues"][0]
    queue["used_addr"] = RAM_SIZE + 0x1000
    fresh = VirtioMmioTransport(VirtioRng(memories[1]))
    with pytest.raises(DeviceStateError, match=r"virtio-rng0: state field 'queues\[0\].ready'"):
        fresh.load_state(state)


def test_virtio_rng_state_round_trip_serves_the_next_request(
    memories: tuple[GuestMemory, GuestMemory],
) -> None:
    memory_a, memory_b = memories
    transport = VirtioMmioTransport(VirtioRng(memory_a))
    driver = MmioDriver(transport, memory_a, Arena(memory_a))
    (ring,) = driver.init()
    buffer = driver.arena.alloc(32)
    ring.add_chain([(buffer, 32, True)])
    driver.notify(0)
    ring.take_used()
    copy_ram(memory_a, memory_b)
    restored = VirtioMmioTransport(VirtioRng(memory_b))
    restored.load_state(through_json(transport.save_state()))
    ring_b = clone_ring(ring, memory_b)
    for r in (ring, ring_b):
        r.add_chain([(buffer, 16, True)])
    driver.notify(0)
    restored.write(0x50, struct.pack("<I", 0))
    assert ring.take_used() == ring_b.take_used() == [(1, 16)]
    assert restored.read(REG_INTERRUPT_STATUS, 4) == transport.read(REG_INTERRUPT_STATUS, 4)
    assert restored.read(REG_STATUS, 4) == transport.read(REG_STATUS, 4)


class QuietNet(NetBackend):
    """A backend with nothing to receive that keeps what it was asked to send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> bool:
        self.sent.append(frame)
        return True

    def receive(self) -> bytes | None:
        return None

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


def test_virtio_net_state_carries_the_mac(memories: tuple[GuestMemory, GuestMemory]) -> None:
    net = VirtioNet(memories[0], QuietNet(), mac="52:54:00:12:34:56")
    fresh = VirtioNet(memories[1], QuietNet())
    fresh.load_state(through_json(net.save_state()))
    assert fresh.read_config(0, 6) == bytes.fromhex("525400123456")
    with pytest.raises(DeviceStateError, match=r"state field 'device\.mac'"):
        fresh.load_state({**net.save_state(), "device": {"mac": "00"}})


class SilentSerial:
    def write(self, data: bytes) -> None:
        pass

    def start(self, deliver: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_virtio_console_state_carries_undelivered_input(memories: tuple[GuestMemory, GuestMemory]) -> None:
    console = VirtioConsole(memories[0], SilentSerial())  # type: ignore[arg-type]
    with console._input:
        console._pending += b"typed ahead"
    fresh = VirtioConsole(memories[1], SilentSerial())  # type: ignore[arg-type]
    fresh.load_state(through_json(console.save_state()))
    assert fresh.pending_input == len(b"typed ahead")
    console.close()
    fresh.close()


# -- virtio over PCI, and the PCI bus -------------------------------------------------------------------


def test_virtio_pci_state_round_trip_with_msix(memories: tuple[GuestMemory, GuestMemory]) -> None:
    memory_a, memory_b = memories
    rig = Rig(VirtioRng(memory_a), memory_a)
    rig.driver.enable()
    rig.driver.enable_msix(2)
    (ring,) = rig.driver.init(vectors=True)
    buffer = rig.driver.arena.alloc(8)
    ring.add_chain([(buffer, 8, True)])
    rig.driver.notify(0)
    assert ring.take_used() == [(0, 8)]
    assert rig.sink.sent[-1][2] == 0x41

    state = through_json(rig.pci.save_state())
    copy_ram(memory_a, memory_b)
    sink = RecordingMsiSink()
    restored = Rig(VirtioRng(memory_b), memory_b, sink=sink)
    restored.pci.load_state(state)
    assert restored.pci.save_state() == state
    for slot_offset in range(0, 0x100, 4):
        assert restored.port_driver.read(restored.slot, slot_offset) == rig.port_driver.read(
            rig.slot, slot_offset
        )
    for offset in range(0, 0x40, 4):
        address = BAR_ADDRESS + offset
        assert restored.mmio.read(address, 4) == rig.mmio.read(address, 4)

    ring_b = clone_ring(ring, memory_b)
    sent_before = len(rig.sink.sent)
    for r in (ring, ring_b):
        r.add_chain([(buffer, 8, True)])
        r.set_used_event(r.avail_idx - 1)
    rig.driver.notify(0)
    restored.driver.notify(0)
    assert ring.take_used() == ring_b.take_used() == [(1, 8)]
    assert sink.sent == rig.sink.sent[sent_before:] == [(1, 0xFEE0_0000, 0x41)]


def test_pci_bus_state_must_have_the_same_functions(memories: tuple[GuestMemory, GuestMemory]) -> None:
    rig = Rig(VirtioRng(memories[0]), memories[0])
    with pytest.raises(DeviceStateError, match="pci-conf1: state field 'functions'"):
        PciBus().load_state(rig.pci.save_state())
    state = rig.pci.save_state()
    functions = state["functions"]
    assert isinstance(functions, dict)
    functions["1"] = {**functions["1"], "config": "00" * 256}
    with pytest.raises(DeviceStateError, match="'config': identity bytes"):
        Rig(VirtioRng(memories[1]), memories[1]).pci.load_state(state)
