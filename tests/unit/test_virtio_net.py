"""virtio-net: two devices wired back to back by the UDP backend on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.unit.rigs.virtio_mmio import MmioDriver
from tests.unit.rigs.virtqueue import Arena, Ring
from vmscope.devices.base import RecordingInterruptLine
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.device import VIRTIO_F_EVENT_IDX, LineLevelSignal
from vmscope.virtio.iothread import VirtioIoThread
from vmscope.virtio.mmio import VirtioMmioTransport
from vmscope.virtio.net import (
    NET_HEADER,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    VirtioNet,
    format_mac,
    parse_mac,
)
from vmscope.virtio.net_backends import TapBackend, UdpBackend, open_net_backend

FRAME = bytes.fromhex("ffffffffffff5254000000010806") + b"who-has 10.0.0.2?".ljust(46, b"\0")


def free_udp_port() -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


@dataclass
class Nic:
    device: VirtioNet
    driver: MmioDriver
    rx: Ring
    tx: Ring
    io: VirtioIoThread
    line: RecordingInterruptLine

    def send(self, frame: bytes) -> int:
        arena = self.driver.arena
        header = arena.put(NET_HEADER.pack(0, 0, 0, 0, 0, 0, 0))
        head = self.tx.add_chain([(header, NET_HEADER.size, False), (arena.put(frame), len(frame), False)])
        self.driver.notify(TX_QUEUE)
        return head

    def post_rx(self, size: int = 1526) -> tuple[int, int]:
        buffer = self.driver.arena.alloc(size)
        return self.rx.add_chain([(buffer, size, True)]), buffer


@pytest.fixture
def pair(memory: GuestMemory) -> Iterator[tuple[Nic, Nic]]:
    port_a, port_b = free_udp_port(), free_udp_port()
    nics = []
    arena = Arena(memory)
    for name, local, remote, mac in (
        ("net-a", port_a, port_b, "52:54:00:00:00:01"),
        ("net-b", port_b, port_a, None),
    ):
        device = VirtioNet(memory, UdpBackend(local, remote), mac=mac, name=name)
        line = RecordingInterruptLine()
        device.set_interrupt_signal(LineLevelSignal(line))
        driver = MmioDriver(VirtioMmioTransport(device), memory, arena)
        io = VirtioIoThread(device, queue_eventfds=False)
        io.start()
        nics.append((device, driver, io, line))
    built = []
    for device, driver, io, line in nics:
        rx, tx = driver.init(~(1 << VIRTIO_F_EVENT_IDX))
        built.append(Nic(device, driver, rx, tx, io, line))
    yield built[0], built[1]
    for nic in built:
        nic.io.close()
        nic.device.close()


def test_config_space_has_the_mac_and_link_status(pair: tuple[Nic, Nic]) -> None:
    a, b = pair
    offered = a.driver.device_features()
    assert offered >> VIRTIO_NET_F_MAC & 1 and offered >> VIRTIO_NET_F_STATUS & 1
    assert bytes(a.driver.config(i, 1) for i in range(6)) == bytes.fromhex("525400000001")
    assert a.driver.config(6, 2) == VIRTIO_NET_S_LINK_UP
    mac_b = bytes(b.driver.config(i, 1) for i in range(6))
    assert mac_b[0] & 0x03 == 0x02  # random, unicast, locally administered


def test_two_devices_exchange_a_frame_over_udp(pair: tuple[Nic, Nic]) -> None:
    a, b = pair
    rx_head, rx_buffer = b.post_rx()
    b.driver.notify(RX_QUEUE)
    tx_head = a.send(FRAME)

    assert a.tx.take_used() == [(tx_head, 0)]
    assert wait_for(lambda: b.rx.used_idx() == 1)
    assert b.rx.take_used() == [(rx_head, NET_HEADER.size + len(FRAME))]
    received = b.driver.memory.read(rx_buffer, NET_HEADER.size + len(FRAME))
    assert NET_HEADER.unpack(received[: NET_HEADER.size]) == (0, 0, 0, 0, 0, 0, 1)
    assert received[NET_HEADER.size :] == FRAME
    assert wait_for(lambda: b.line.level) and b.driver.ack() == 1
    assert (a.device.counters.tx_frames, b.device.counters.rx_frames) == (1, 1)

    # and back the other way
    rx_head, rx_buffer = a.post_rx()
    b.send(FRAME[::-1])
    assert wait_for(lambda: a.rx.used_idx() == 1)
    assert a.driver.memory.read(rx_buffer + NET_HEADER.size, len(FRAME)) == FRAME[::-1]


def test_frames_without_receive_buffers_are_dropped_and_counted(pair: tuple[Nic, Nic]) -> None:
    a, b = pair
    a.send(FRAME)
    assert wait_for(lambda: b.device.counters.rx_dropped_no_buffer == 1)
    head, buffer = b.post_rx()
    a.send(FRAME[:20] + b"second")
    assert wait_for(lambda: b.rx.used_idx() == 1)
    assert b.rx.take_used() == [(head, NET_HEADER.size + 26)]  # the first frame is gone for good
    assert b.driver.memory.read(buffer + NET_HEADER.size, 26) == FRAME[:20] + b"second"


def test_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept(pair: tuple[Nic, Nic]) -> None:
    a, b = pair
    head, buffer = b.post_rx(NET_HEADER.size + 20)
    a.send(FRAME)  # 60 bytes: too big
    assert wait_for(lambda: b.device.counters.rx_dropped_too_large == 1)
    a.send(FRAME[:14])
    assert wait_for(lambda: b.rx.used_idx() == 1)
    assert b.rx.take_used() == [(head, NET_HEADER.size + 14)]
    assert b.driver.memory.read(buffer + NET_HEADER.size, 14) == FRAME[:14]


def test_transmit_chain_with_writable_buffer_needs_reset(pair: tuple[Nic, Nic]) -> None:
    a, _ = pair
    a.tx.add_chain([(a.driver.arena.alloc(64), 64, True)])
    a.driver.notify(TX_QUEUE)
    assert a.device.needs_reset and a.device.counters.tx_frames == 0


def test_frames_before_driver_ok_are_dropped(memory: GuestMemory) -> None:
    port = free_udp_port()
    device = VirtioNet(memory, UdpBackend(port, free_udp_port()))
    try:
        assert not device.deliver_frame(FRAME)
        assert device.counters.rx_dropped_not_ready == 1
    finally:
        device.close()


def test_udp_backend_ignores_strangers(memory: GuestMemory) -> None:
    local, remote = free_udp_port(), free_udp_port()
    backend = UdpBackend(local, remote)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.sendto(b"not from the peer", ("127.0.0.1", local))
        assert wait_for(lambda: backend.receive() is None and backend.stats.receive_ignored == 1)
    finally:
        stranger.close()
        backend.close()


def test_mac_parsing() -> None:
    assert parse_mac("52:54:00:AB:cd:01") == bytes.fromhex("525400abcd01")
    assert format_mac(bytes.fromhex("525400abcd01")) == "52:54:00:ab:cd:01"
    for bad in ("52:54:00:ab:cd", "52-54-00-ab-cd-01", "zz:54:00:ab:cd:01", "01:00:5e:00:00:01"):
        with pytest.raises(ConfigError):
            parse_mac(bad)


@pytest.mark.parametrize("spec", ["tap:", "udp:1", "udp:a:b", "udp:0:5", "vde:x", "tcp:1:2"])
def test_backend_spec_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        open_net_backend(spec)


def test_tap_name_is_checked_before_any_interface_exists() -> None:
    with pytest.raises(ConfigError, match="1 to 15 bytes"):
        TapBackend("a-very-long-interface-name")
