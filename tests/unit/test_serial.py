"""The 16550A UART at register level, and its host backends."""

from __future__ import annotations

import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmscope.bus import PioBus
from vmscope.devices.base import RecordingInterruptLine
from vmscope.devices.char_backends import (
    FileBackend,
    InputSink,
    NullBackend,
    SerialBackend,
    SerialSpec,
    StdioBackend,
    open_serial_backend,
    parse_serial_spec,
)
from vmscope.devices.serial import (
    COM1_PORT,
    FIFO_SIZE,
    IER_LINE_STATUS,
    IER_MODEM_STATUS,
    IER_RX_AVAILABLE,
    IER_THR_EMPTY,
    IIR_FIFOS_ENABLED,
    IIR_LINE_STATUS,
    IIR_MODEM_STATUS,
    IIR_NO_INTERRUPT,
    IIR_RX_AVAILABLE,
    IIR_RX_TIMEOUT,
    IIR_THR_EMPTY,
    LCR_DLAB,
    LSR_DATA_READY,
    LSR_OVERRUN,
    LSR_THR_EMPTY,
    LSR_TX_EMPTY,
    MCR_DTR,
    MCR_LOOP,
    MCR_OUT1,
    MCR_OUT2,
    MCR_RTS,
    MSR_CTS,
    MSR_DCD,
    MSR_DELTA_CTS,
    MSR_DELTA_DCD,
    MSR_DELTA_DSR,
    MSR_DSR,
    MSR_RI,
    MSR_TRAILING_RI,
    REG_DATA,
    REG_IER,
    REG_IIR_FCR,
    REG_LCR,
    REG_LSR,
    REG_MCR,
    REG_MSR,
    REG_SCR,
    UART_WINDOW_LENGTH,
    Uart16550,
)
from vmscope.devices.socket_backend import UnixSocketBackend
from vmscope.errors import ConfigError


class CaptureBackend(SerialBackend):
    """Keeps every write separately; remembers the input sink the UART handed over."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.deliver: InputSink | None = None
        self.closed = False

    @property
    def output(self) -> bytes:
        return b"".join(self.writes)

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def start(self, deliver: InputSink) -> None:
        self.deliver = deliver

    def close(self) -> None:
        self.closed = True


class Harness:
    def __init__(self, backend: SerialBackend | None = None) -> None:
        self.irq = RecordingInterruptLine()
        self.backend = backend if backend is not None else CaptureBackend()
        self.uart = Uart16550(self.irq, self.backend)
        self.uart.start()  # as the machine does when it starts

    def rd(self, offset: int) -> int:
        data = self.uart.read(offset, 1)
        assert len(data) == 1
        return data[0]

    def wr(self, offset: int, value: int) -> None:
        self.uart.write(offset, bytes([value]))

    def iir(self) -> int:
        return self.rd(REG_IIR_FCR)


@pytest.fixture
def h() -> Harness:
    return Harness()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


# -- registers ------------------------------------------------------------------------------


def test_power_on_register_values(h: Harness) -> None:
    assert h.rd(REG_LSR) == LSR_THR_EMPTY | LSR_TX_EMPTY
    assert h.iir() == IIR_NO_INTERRUPT
    assert h.rd(REG_IER) == 0
    assert h.rd(REG_LCR) == 0
    assert h.rd(REG_MCR) == 0
    assert h.rd(REG_MSR) == MSR_CTS | MSR_DSR | MSR_DCD  # a ready peer, no deltas
    assert h.irq.changes == []


def test_thr_writes_reach_the_backend_one_byte_each(h: Harness) -> None:
    for value in b"hi\n\x00\xff":
        h.wr(REG_DATA, value)
    assert h.backend.writes == [b"h", b"i", b"\n", b"\x00", b"\xff"]  # type: ignore[attr-defined]
    assert h.rd(REG_LSR) & (LSR_THR_EMPTY | LSR_TX_EMPTY) == LSR_THR_EMPTY | LSR_TX_EMPTY


def test_divisor_latch_round_trip(h: Harness) -> None:
    h.wr(REG_IER, IER_RX_AVAILABLE)
    h.wr(REG_LCR, LCR_DLAB | 0x03)
    h.wr(REG_DATA, 0x34)
    h.wr(REG_IER, 0x12)
    assert (h.rd(REG_DATA), h.rd(REG_IER)) == (0x34, 0x12)
    assert h.backend.writes == []  # type: ignore[attr-defined]  # DLL writes are not output
    h.wr(REG_LCR, 0x03)
    assert h.rd(REG_IER) == IER_RX_AVAILABLE  # IER untouched by the DLM write
    h.wr(REG_DATA, ord("x"))
    assert h.backend.writes == [b"x"]  # type: ignore[attr-defined]
    h.wr(REG_LCR, LCR_DLAB)
    assert (h.rd(REG_DATA), h.rd(REG_IER)) == (0x34, 0x12)  # the divisor survives DLAB toggling
    assert h.rd(REG_LCR) == LCR_DLAB


def test_dlab_read_does_not_consume_received_data(h: Harness) -> None:
    h.uart.receive(b"Q")
    h.wr(REG_LCR, LCR_DLAB)
    h.rd(REG_DATA)
    h.wr(REG_LCR, 0)
    assert h.rd(REG_LSR) & LSR_DATA_READY
    assert h.rd(REG_DATA) == ord("Q")


def test_ier_keeps_only_the_16550a_bits(h: Harness) -> None:
    h.wr(REG_IER, 0xFF)
    assert h.rd(REG_IER) == 0x0F
    h.wr(REG_MCR, 0xFF)
    assert h.rd(REG_MCR) == 0x1F


def test_scratch_register_holds_any_byte(h: Harness) -> None:
    for value in (0x00, 0x55, 0xAA, 0xFF, 0x5A):
        h.wr(REG_SCR, value)
        assert h.rd(REG_SCR) == value


# -- receiver and LSR -----------------------------------------------------------------------


def test_received_byte_sets_data_ready_until_read(h: Harness) -> None:
    h.uart.receive(b"A")
    assert h.rd(REG_LSR) & LSR_DATA_READY
    assert h.rd(REG_DATA) == ord("A")
    assert not h.rd(REG_LSR) & LSR_DATA_READY
    assert h.rd(REG_DATA) == ord("A")  # an empty RBR still shows the last character


def test_overrun_without_fifo_overwrites_and_sets_oe_until_lsr_read(h: Harness) -> None:
    h.uart.receive(b"AB")
    lsr = h.rd(REG_LSR)
    assert lsr & LSR_OVERRUN and lsr & LSR_DATA_READY
    assert not h.rd(REG_LSR) & LSR_OVERRUN  # reading LSR cleared it
    assert h.rd(REG_DATA) == ord("B")
    assert not h.rd(REG_LSR) & LSR_DATA_READY


def test_fifo_holds_sixteen_bytes_then_overruns(h: Harness) -> None:
    h.wr(REG_IIR_FCR, 0x01)
    data = bytes(range(0x40, 0x40 + FIFO_SIZE + 1))
    h.uart.receive(data)
    assert h.rd(REG_LSR) & LSR_OVERRUN
    received = bytes(h.rd(REG_DATA) for _ in range(FIFO_SIZE))
    assert received == data[:FIFO_SIZE]  # the byte that found the FIFO full is lost
    assert not h.rd(REG_LSR) & LSR_DATA_READY


def test_fcr_clear_rx_empties_the_fifo(h: Harness) -> None:
    h.wr(REG_IIR_FCR, 0x01)
    h.uart.receive(b"abc")
    h.wr(REG_IIR_FCR, 0x01 | 0x02 | 0x04)
    assert not h.rd(REG_LSR) & LSR_DATA_READY
    h.uart.receive(b"z")
    assert h.rd(REG_DATA) == ord("z")


def test_switching_fifo_mode_clears_the_receiver(h: Harness) -> None:
    h.wr(REG_IIR_FCR, 0x01)
    h.uart.receive(b"abc")
    h.wr(REG_IIR_FCR, 0x00)
    assert not h.rd(REG_LSR) & LSR_DATA_READY
    h.uart.receive(b"12")  # back to a one-byte receiver
    assert h.rd(REG_LSR) & LSR_OVERRUN


def test_iir_reports_fifos_enabled_in_bits_6_and_7(h: Harness) -> None:
    assert h.iir() == IIR_NO_INTERRUPT
    h.wr(REG_IIR_FCR, 0x01)
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_NO_INTERRUPT
    h.wr(REG_IIR_FCR, 0x00)
    assert h.iir() == IIR_NO_INTERRUPT


def test_rx_trigger_level_selects_timeout_or_data_available(h: Harness) -> None:
    h.wr(REG_MCR, MCR_OUT2)
    h.wr(REG_IER, IER_RX_AVAILABLE)
    h.wr(REG_IIR_FCR, 0xC1)  # trigger at 14 bytes
    h.uart.receive(b"12345")
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_RX_TIMEOUT
    assert h.irq.level
    h.uart.receive(b"6789abcde")
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_RX_AVAILABLE
    h.wr(REG_IIR_FCR, 0x41)  # trigger at 4; FIFO contents kept (no clear bit)
    for _ in range(11):
        h.rd(REG_DATA)
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_RX_TIMEOUT  # 3 left, below 4
    for _ in range(3):
        h.rd(REG_DATA)
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_NO_INTERRUPT
    assert not h.irq.level


# -- interrupts -----------------------------------------------------------------------------


def test_iir_priorities_line_status_data_thre_modem(h: Harness) -> None:
    h.wr(REG_IIR_FCR, 0x01)
    # loopback with DTR clear drops DSR (a modem-status change); THR bytes come back as input
    h.wr(REG_MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)
    h.wr(REG_IER, IER_RX_AVAILABLE | IER_THR_EMPTY | IER_LINE_STATUS | IER_MODEM_STATUS)
    for value in range(FIFO_SIZE + 1):  # one more than fits: overrun
        h.wr(REG_DATA, value)
    assert h.irq.level
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_LINE_STATUS
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_LINE_STATUS  # persists until LSR is read
    assert h.rd(REG_LSR) & LSR_OVERRUN
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_RX_AVAILABLE
    assert [h.rd(REG_DATA) for _ in range(FIFO_SIZE)] == list(range(FIFO_SIZE))
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_THR_EMPTY
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_MODEM_STATUS  # reading IIR acknowledged THRE
    assert h.irq.level
    assert h.rd(REG_MSR) & (MSR_DELTA_CTS | MSR_DELTA_DSR) == MSR_DELTA_DSR
    assert h.iir() == IIR_FIFOS_ENABLED | IIR_NO_INTERRUPT
    assert not h.irq.level


def test_thre_interrupt_cleared_by_iir_read_and_rearmed_by_thr_write(h: Harness) -> None:
    h.wr(REG_MCR, MCR_OUT2)
    h.wr(REG_IER, IER_THR_EMPTY)
    assert h.irq.level  # enabling THRE interrupts with THR empty raises one at once
    assert h.iir() == IIR_THR_EMPTY
    assert not h.irq.level
    assert h.iir() == IIR_NO_INTERRUPT
    h.wr(REG_DATA, ord("a"))
    assert h.irq.level
    h.wr(REG_DATA, ord("b"))  # still pending: no change of level
    assert h.irq.changes == [True, False, True]
    assert h.iir() == IIR_THR_EMPTY
    assert not h.irq.level


def test_thre_is_reasserted_when_re_enabled_as_linux_startup_checks(h: Harness) -> None:
    # serial8250_do_startup: IER=THRI, read IIR, IER=0, IER=THRI, read IIR; both must show THRE
    h.wr(REG_IER, IER_THR_EMPTY)
    first = h.iir()
    h.wr(REG_IER, 0)
    h.wr(REG_IER, IER_THR_EMPTY)
    second = h.iir()
    assert first == IIR_THR_EMPTY and second == IIR_THR_EMPTY


def test_out2_gates_the_interrupt_output(h: Harness) -> None:
    h.wr(REG_IER, IER_RX_AVAILABLE)
    h.uart.receive(b"x")
    assert h.iir() == IIR_RX_AVAILABLE  # pending inside the UART...
    assert not h.irq.level  # ...but OUT2 is clear, so the PC's IRQ line stays low
    h.wr(REG_MCR, MCR_OUT2 | MCR_DTR | MCR_RTS)
    assert h.irq.level and h.uart.interrupt_asserted
    h.wr(REG_MCR, MCR_DTR)
    assert not h.irq.level
    h.wr(REG_MCR, MCR_OUT2)
    assert h.irq.level
    h.rd(REG_DATA)
    assert not h.irq.level
    assert h.irq.changes == [True, False, True, False]


def test_disabling_interrupts_in_ier_lowers_the_line(h: Harness) -> None:
    h.wr(REG_MCR, MCR_OUT2)
    h.uart.receive(b"x")
    assert not h.irq.level  # nothing enabled yet
    h.wr(REG_IER, IER_RX_AVAILABLE)
    assert h.irq.level
    h.wr(REG_IER, 0)
    assert not h.irq.level
    assert h.iir() == IIR_NO_INTERRUPT
    assert h.rd(REG_LSR) & LSR_DATA_READY  # the data itself is still there


def test_line_status_interrupt_on_overrun(h: Harness) -> None:
    h.wr(REG_MCR, MCR_OUT2)
    h.wr(REG_IER, IER_LINE_STATUS)
    h.uart.receive(b"x")
    assert not h.irq.level  # data alone does not raise a line-status interrupt
    h.uart.receive(b"y")
    assert h.irq.level
    assert h.iir() == IIR_LINE_STATUS
    h.rd(REG_LSR)
    assert not h.irq.level
    assert h.iir() == IIR_NO_INTERRUPT


def test_modem_status_interrupt_until_msr_read(h: Harness) -> None:
    h.wr(REG_IER, IER_MODEM_STATUS)
    h.wr(REG_MCR, MCR_LOOP | MCR_OUT2)  # loopback drops CTS and DSR (only OUT2->DCD remains)
    assert h.irq.level
    assert h.iir() == IIR_MODEM_STATUS
    msr = h.rd(REG_MSR)
    assert msr == MSR_DCD | MSR_DELTA_CTS | MSR_DELTA_DSR
    assert not h.irq.level
    assert h.rd(REG_MSR) == MSR_DCD  # deltas cleared by the read


# -- loopback and modem status --------------------------------------------------------------


def test_loopback_echoes_transmitted_bytes_into_the_receiver(h: Harness) -> None:
    h.wr(REG_MCR, MCR_LOOP)
    h.wr(REG_DATA, ord("e"))
    assert h.backend.writes == []  # type: ignore[attr-defined]  # nothing leaves the chip
    assert h.rd(REG_LSR) & LSR_DATA_READY
    assert h.rd(REG_DATA) == ord("e")
    h.wr(REG_MCR, 0)
    h.wr(REG_DATA, ord("f"))
    assert h.backend.writes == [b"f"]  # type: ignore[attr-defined]
    assert not h.rd(REG_LSR) & LSR_DATA_READY


def test_loopback_msr_mirrors_mcr_outputs_as_linux_probes(h: Harness) -> None:
    h.wr(REG_MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)  # Linux's autoconfig writes 0x1a, expects 0x90
    assert h.rd(REG_MSR) & 0xF0 == MSR_DCD | MSR_CTS
    h.wr(REG_MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    assert h.rd(REG_MSR) == MSR_DSR | MSR_RI | MSR_DELTA_CTS | MSR_DELTA_DSR | MSR_DELTA_DCD


def test_trailing_edge_of_ring_indicator(h: Harness) -> None:
    h.wr(REG_MCR, MCR_LOOP | MCR_OUT1)
    h.rd(REG_MSR)
    h.wr(REG_MCR, MCR_LOOP | MCR_OUT1)  # no change, no delta
    assert h.rd(REG_MSR) == MSR_RI
    h.wr(REG_MCR, MCR_LOOP)  # RI falls
    assert h.rd(REG_MSR) == MSR_TRAILING_RI
    h.wr(REG_MCR, MCR_LOOP | MCR_OUT1)  # RI rises: no TERI
    assert h.rd(REG_MSR) == MSR_RI


def test_leaving_loopback_restores_the_line_inputs(h: Harness) -> None:
    h.wr(REG_MCR, MCR_LOOP)
    h.rd(REG_MSR)
    h.wr(REG_MCR, 0)
    assert h.rd(REG_MSR) == MSR_CTS | MSR_DSR | MSR_DCD | MSR_DELTA_CTS | MSR_DELTA_DSR | MSR_DELTA_DCD


def test_line_input_is_disconnected_in_loopback(h: Harness) -> None:
    h.wr(REG_MCR, MCR_LOOP)
    h.uart.receive(b"lost")
    assert not h.rd(REG_LSR) & LSR_DATA_READY


# -- odd accesses ---------------------------------------------------------------------------


def test_wide_accesses_act_on_the_first_byte_and_zero_extend(h: Harness) -> None:
    assert h.uart.read(REG_LSR, 4) == bytes([LSR_THR_EMPTY | LSR_TX_EMPTY, 0, 0, 0])
    h.uart.write(REG_SCR, b"\x12\x34")
    assert h.uart.read(REG_SCR, 2) == b"\x12\x00"
    h.uart.write(REG_DATA, b"AB")
    assert h.backend.writes == [b"A"]  # type: ignore[attr-defined]


def test_every_offset_and_size_is_tolerated(h: Harness) -> None:
    for offset in range(-2, 12):
        for size in (0, 1, 2, 3, 4, 8):
            assert len(h.uart.read(offset, size)) == size
            h.uart.write(offset, bytes(range(size)))


def test_random_register_traffic_keeps_invariants() -> None:
    rng = random.Random(1234)
    harness = Harness()
    for _ in range(20000):
        offset = rng.randrange(UART_WINDOW_LENGTH)
        if rng.random() < 0.5:
            harness.uart.write(offset, bytes([rng.randrange(256)]))
        else:
            size = rng.choice((1, 2, 4))
            data = harness.uart.read(offset, size)
            assert len(data) == size and data[1:] == bytes(size - 1)
        if rng.random() < 0.05:
            harness.uart.receive(bytes([rng.randrange(256)]))
        lcr = harness.rd(REG_LCR)
        assert harness.rd(REG_LSR) & (LSR_THR_EMPTY | LSR_TX_EMPTY) == LSR_THR_EMPTY | LSR_TX_EMPTY
        harness.wr(REG_LCR, lcr)
        # the line follows the rule: OUT2 and an enabled pending interrupt
        mcr = harness.rd(REG_MCR)
        harness.wr(REG_LCR, lcr & ~LCR_DLAB)
        pending_iir = harness.uart._pending_source()
        harness.wr(REG_LCR, lcr)
        assert harness.irq.level == (bool(mcr & MCR_OUT2) and pending_iir != IIR_NO_INTERRUPT)


def test_mapped_on_the_port_bus_as_com1() -> None:
    harness = Harness()
    bus = PioBus()
    bus.register(COM1_PORT, UART_WINDOW_LENGTH, harness.uart)
    bus.write(COM1_PORT + REG_SCR, b"\x77")
    assert bus.read(COM1_PORT + REG_SCR, 1) == b"\x77"
    bus.write(COM1_PORT, b"!")
    assert harness.backend.writes == [b"!"]  # type: ignore[attr-defined]
    assert bus.device_errors == {}


def test_reset_returns_to_power_on_state(h: Harness) -> None:
    h.wr(REG_MCR, MCR_OUT2 | MCR_LOOP)
    h.wr(REG_IER, 0x0F)
    h.wr(REG_IIR_FCR, 0x01)
    h.wr(REG_DATA, 1)
    assert h.irq.level
    h.uart.reset()
    assert not h.irq.level
    assert (h.rd(REG_IER), h.rd(REG_MCR), h.iir(), h.rd(REG_LSR)) == (0, 0, IIR_NO_INTERRUPT, 0x60)


# -- flow-controlled input ------------------------------------------------------------------


def test_deliver_input_waits_for_fifo_room_and_never_overruns(h: Harness) -> None:
    h.wr(REG_IIR_FCR, 0x01)
    h.wr(REG_MCR, MCR_OUT2)
    h.wr(REG_IER, IER_RX_AVAILABLE)
    payload = bytes(range(200))
    assert h.backend.deliver is not None  # type: ignore[attr-defined]
    feeder = threading.Thread(target=h.backend.deliver, args=(payload,))  # type: ignore[attr-defined]
    feeder.start()
    received = bytearray()
    deadline = time.monotonic() + 5
    while len(received) < len(payload) and time.monotonic() < deadline:
        lsr = h.rd(REG_LSR)
        assert not lsr & LSR_OVERRUN
        if lsr & LSR_DATA_READY:
            assert h.irq.level
            received.append(h.rd(REG_DATA))
    feeder.join(5)
    assert bytes(received) == payload
    assert not feeder.is_alive()


def test_deliver_input_waits_out_loopback_and_stops_on_close(h: Harness) -> None:
    h.wr(REG_MCR, MCR_LOOP)
    results: list[bool] = []
    feeder = threading.Thread(target=lambda: results.append(h.uart.deliver_input(b"ab")))
    feeder.start()
    time.sleep(0.05)
    assert not h.rd(REG_LSR) & LSR_DATA_READY  # held back while the line is disconnected
    h.wr(REG_MCR, 0)
    assert wait_until(lambda: bool(h.rd(REG_LSR) & LSR_DATA_READY))
    assert h.rd(REG_DATA) == ord("a")
    h.uart.close()
    feeder.join(5)
    assert results in ([False], [True])  # "b" may have gone in before the close
    assert h.backend.closed  # type: ignore[attr-defined]
    assert h.uart.deliver_input(b"late") is False


# -- backends -------------------------------------------------------------------------------


def test_file_backend_appends_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"earlier run\n")
    harness = Harness(FileBackend(str(path)))
    every_byte = bytes(range(256))
    for value in every_byte:
        harness.wr(REG_DATA, value)
    # nothing is buffered in the VMM: the bytes are in the file before close
    assert path.read_bytes() == b"earlier run\n" + every_byte
    harness.uart.close()
    assert path.read_bytes() == b"earlier run\n" + every_byte


def test_file_backend_reports_an_unopenable_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open"):
        FileBackend(str(tmp_path / "missing-dir" / "log"))


def socket_path(tmp_path: Path) -> str:
    path = str(tmp_path / "s.sock")
    if len(path) > 100:  # keep under the sun_path limit on deep temporary directories
        path = os.path.join("/tmp", f"vmscope-test-{os.getpid()}-{time.monotonic_ns()}.sock")
    return path


def test_unix_socket_round_trip(tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    backend = UnixSocketBackend(path)
    harness = Harness(backend)
    harness.wr(REG_MCR, MCR_OUT2)
    harness.wr(REG_IER, IER_RX_AVAILABLE)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        client.settimeout(5)
        assert backend.wait_connected(5)
        for value in b"hello":
            harness.wr(REG_DATA, value)
        received = b""
        while len(received) < 5:
            received += client.recv(64)
        assert received == b"hello"
        client.sendall(b"ok")
        assert wait_until(lambda: harness.irq.level)
        assert harness.iir() == IIR_RX_AVAILABLE
        text = bytes([harness.rd(REG_DATA)])
        assert wait_until(lambda: bool(harness.rd(REG_LSR) & LSR_DATA_READY))
        text += bytes([harness.rd(REG_DATA)])
        assert text == b"ok"
        assert not harness.irq.level
    finally:
        client.close()
        harness.uart.close()
    assert not os.path.exists(path)


def test_unix_socket_drops_output_without_a_client(tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    backend = UnixSocketBackend(path)
    harness = Harness(backend)
    try:
        started = time.monotonic()
        for value in b"into the void":
            harness.wr(REG_DATA, value)
        assert time.monotonic() - started < 1
        assert backend.dropped_bytes == len(b"into the void")
        assert not backend.connected
    finally:
        harness.uart.close()


def test_unix_socket_serves_the_next_client_after_a_disconnect(tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    backend = UnixSocketBackend(path)
    harness = Harness(backend)
    try:
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        first.connect(path)
        assert backend.wait_connected(5)
        first.close()
        assert wait_until(lambda: not backend.connected)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.settimeout(5)
        second.connect(path)
        assert backend.wait_connected(5)
        harness.wr(REG_DATA, ord("2"))
        assert second.recv(8) == b"2"
        second.close()
    finally:
        harness.uart.close()


def test_unix_socket_client_that_stops_reading_does_not_stall_the_guest(tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    backend = UnixSocketBackend(path)
    harness = Harness(backend)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(path)
        assert backend.wait_connected(5)
        chunk = b"x" * 65536
        started = time.monotonic()
        for _ in range(64):  # far more than the socket buffers hold
            backend.write(chunk)
        for _ in range(1000):  # once congested, each write is dropped without waiting
            backend.write(b"y")
        assert time.monotonic() - started < 2
        assert backend.dropped_bytes >= 1000
        assert backend.connected  # a slow client is not thrown off
    finally:
        client.close()
        harness.uart.close()


def test_unix_socket_replaces_a_stale_socket_but_not_a_file(tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # bound, never listening: the path is left behind like a crashed VMM's
    backend = UnixSocketBackend(path)
    try:
        with pytest.raises(ConfigError, match="another process is listening"):
            UnixSocketBackend(path)
    finally:
        backend.close()
    regular = tmp_path / "plain"
    regular.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        UnixSocketBackend(str(regular))
    assert regular.read_text() == "keep me"


def test_stdio_backend_writes_output_and_reads_piped_input() -> None:
    out_read, out_write = os.pipe()
    in_read, in_write = os.pipe()
    try:
        backend = StdioBackend(output_fd=out_write, input_fd=in_read)
        assert backend.has_input
        harness = Harness(backend)
        harness.wr(REG_IIR_FCR, 0x01)
        harness.wr(REG_DATA, ord("o"))
        assert os.read(out_read, 16) == b"o"
        os.write(in_write, b"in")
        assert wait_until(lambda: bool(harness.rd(REG_LSR) & LSR_DATA_READY))
        got = bytes([harness.rd(REG_DATA)])
        assert wait_until(lambda: bool(harness.rd(REG_LSR) & LSR_DATA_READY))
        got += bytes([harness.rd(REG_DATA)])
        assert got == b"in"
        harness.uart.close()
    finally:
        for fd in (out_read, out_write, in_read, in_write):
            os.close(fd)


def test_stdio_backend_survives_a_closed_reader() -> None:
    out_read, out_write = os.pipe()
    os.close(out_read)
    backend = StdioBackend(output_fd=out_write, input_fd=None)
    try:
        backend.write(b"nobody listens")  # EPIPE: logged and dropped, never raised
        backend.write(b"again")
    finally:
        os.close(out_write)


def test_stdio_input_only_from_a_non_interactive_open_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe_read, pipe_write = os.pipe()
    tty_master, tty_slave = os.openpty()
    try:
        with os.fdopen(pipe_read, "rb", closefd=False) as piped:
            monkeypatch.setattr(sys, "stdin", piped)
            assert StdioBackend(output_fd=pipe_write).has_input
        monkeypatch.setattr(sys, "stdin", piped)  # now closed
        assert not StdioBackend(output_fd=pipe_write).has_input
        with os.fdopen(tty_slave, "rb", closefd=False) as terminal:
            monkeypatch.setattr(sys, "stdin", terminal)
            assert not StdioBackend(output_fd=pipe_write).has_input
    finally:
        for fd in (pipe_read, pipe_write, tty_master, tty_slave):
            os.close(fd)


# -- specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stdio", SerialSpec("stdio")),
        ("none", SerialSpec("none")),
        ("file:/tmp/out.log", SerialSpec("file", "/tmp/out.log")),
        ("file:relative:with:colons", SerialSpec("file", "relative:with:colons")),
        ("unix:/run/vm.sock", SerialSpec("unix", "/run/vm.sock")),
    ],
)
def test_parse_serial_spec_accepts_the_documented_forms(text: str, expected: SerialSpec) -> None:
    spec = parse_serial_spec(text)
    assert spec == expected
    assert str(spec) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected stdio, none, file:PATH or unix:PATH"),
        ("tty", "expected stdio"),
        ("STDIO", "expected stdio"),
        ("tcp:localhost:4444", "expected stdio"),
        ("file:", "file: needs a path"),
        ("unix:", "unix: needs a path"),
        ("file:a\0b", "NUL"),
        ("unix:/" + "d" * 120, "socket path is 121 bytes"),
        ("bad\nspec", "expected stdio"),
    ],
)
def test_parse_serial_spec_rejects_bad_specs_in_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_serial_spec(text)
    text_of_error = str(caught.value)
    assert message in text_of_error
    assert "\n" not in text_of_error


def test_open_serial_backend_builds_each_kind(tmp_path: Path) -> None:
    assert isinstance(open_serial_backend("none"), NullBackend)
    stdio = open_serial_backend("stdio")
    assert isinstance(stdio, StdioBackend)
    stdio.close()
    log = tmp_path / "out.log"
    file_backend = open_serial_backend(f"file:{log}")
    file_backend.write(b"abc")
    file_backend.close()
    assert log.read_bytes() == b"abc"
    path = socket_path(tmp_path)
    unix_backend = open_serial_backend(SerialSpec("unix", path))
    assert isinstance(unix_backend, UnixSocketBackend)
    unix_backend.close()
    with pytest.raises(ConfigError):
        open_serial_backend("serial0")


def test_host_input_is_taken_only_once_the_uart_is_started() -> None:
    """A restored machine loads the UART's state before it starts: input taken earlier would be
    dropped by the state load, or raise an interrupt the restored controllers then overwrite."""
    backend = CaptureBackend()
    uart = Uart16550(RecordingInterruptLine(), backend)
    assert backend.deliver is None
    uart.load_state(uart.save_state())
    uart.start()
    uart.start()  # a second start changes nothing
    assert backend.deliver is not None
    assert backend.deliver(b"x") is True
    assert uart.read(0, 1) == b"x"
    closed = Uart16550(RecordingInterruptLine(), CaptureBackend())
    closed.close()
    closed.start()
    assert closed.backend.deliver is None  # type: ignore[attr-defined]
