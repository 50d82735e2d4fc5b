"""A 16550A UART (the PC's COM1 when mapped at 0x3f8 with IRQ 4).

Modelled at register level: the divisor latch (LCR.DLAB), 16-byte receive FIFO and
trigger levels, the four-level interrupt identification of the IIR, LSR error bits,
MSR delta bits, loopback, the scratch register, and OUT2 gating the interrupt output as
PC serial ports do (Linux's 8250 driver sets OUT2 before it expects interrupts).

Simplifications, all invisible to a driver that follows the datasheet:

* Transmission is instantaneous: a THR write goes straight to the backend, so THRE and
  TEMT always read set and the transmit FIFO is always empty (FCR bit 2 has nothing to
  clear). A THR write re-arms the THRE interrupt (the holding register emptied again)
  without first dropping the interrupt line: a driver's handler re-reads IIR until it
  reports nothing pending, so it never needs a fresh edge per byte, and the hot path
  stays free of two interrupt-line calls per character.
* Host input arrives in bursts, faster than any baud rate, so the receiver's character
  timeout is treated as already expired: while the FIFO holds data below the trigger
  level the IIR reports a character timeout (0x0C) rather than holding the interrupt back.
* There are no parity, framing or break conditions on a virtual line; only overrun can
  set an LSR error bit. Baud rate and line format are stored and read back, not applied.

Concurrency: the vCPU thread accesses registers while a backend's reader thread delivers
host input, so all state is guarded by one lock, and the interrupt line is driven under it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping

from vmscope.devices.base import Device, InterruptLine
from vmscope.devices.char_backends import NullBackend, SerialBackend
from vmscope.devices.state import StateReader

COM1_PORT = 0x3F8
COM1_IRQ = 4
UART_WINDOW_LENGTH = 8

# register offsets
REG_DATA = 0  # RBR on read, THR on write; DLL when LCR.DLAB is set
REG_IER = 1  # DLM when LCR.DLAB is set
REG_IIR_FCR = 2  # IIR on read, FCR on write
REG_LCR = 3
REG_MCR = 4
REG_LSR = 5
REG_MSR = 6
REG_SCR = 7

# interrupt enable register
IER_RX_AVAILABLE = 0x01
IER_THR_EMPTY = 0x02
IER_LINE_STATUS = 0x04
IER_MODEM_STATUS = 0x08
IER_WRITABLE = 0x0F  # the 16550A has no extended bits; Linux checks that bits 4-7 stay clear

# interrupt identification register
IIR_NO_INTERRUPT = 0x01
IIR_MODEM_STATUS = 0x00
IIR_THR_EMPTY = 0x02
IIR_RX_AVAILABLE = 0x04
IIR_LINE_STATUS = 0x06
IIR_RX_TIMEOUT = 0x0C
IIR_FIFOS_ENABLED = 0xC0

# FIFO control register
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_TRIGGER_SHIFT = 6
RX_TRIGGER_LEVELS = (1, 4, 8, 14)
FIFO_SIZE = 16

# line control register
LCR_DLAB = 0x80

# modem control register
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_WRITABLE = 0x1F

# line status register
LSR_DATA_READY = 0x01
LSR_OVERRUN = 0x02
LSR_PARITY_ERROR = 0x04
LSR_FRAMING_ERROR = 0x08
LSR_BREAK = 0x10
LSR_THR_EMPTY = 0x20
LSR_TX_EMPTY = 0x40
LSR_FIFO_ERROR = 0x80
LSR_ERRORS = LSR_OVERRUN | LSR_PARITY_ERROR | LSR_FRAMING_ERROR | LSR_BREAK

# modem status register
MSR_DELTA_CTS = 0x01
MSR_DELTA_DSR = 0x02
MSR_TRAILING_RI = 0x04
MSR_DELTA_DCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

#: modem inputs of the virtual line outside loopback: a peer is present and ready
LINE_MODEM_INPUTS = MSR_CTS | MSR_DSR | MSR_DCD
#: divisor after reset: 9600 baud from the PC's 1.8432 MHz clock
RESET_DIVISOR = 12

_BYTE = tuple(bytes((value,)) for value in range(256))


class Uart16550(Device):
    """A 16550A UART driving ``interrupt`` and talking to ``backend``.

    :meth:`start` (called by the machine when it starts) starts the backend's input thread;
    :meth:`close` stops it.
    """

    def __init__(
        self, interrupt: InterruptLine, backend: SerialBackend | None = None, name: str = "serial0"
    ) -> None:
        self.name = name
        self._irq = interrupt
        self._irq_level = False
        self.backend = backend if backend is not None else NullBackend()
        self._emit = self.backend.write
        self._lock = threading.Lock()
        self._rx_room = threading.Condition(self._lock)
        self._closed = False
        self._rx: deque[int] = deque()
        self._input_started = False
        self._power_on()

    def start(self) -> None:
        """Take host input from now on (once; the backend's reader thread delivers it)."""
        with self._lock:
            if self._input_started or self._closed:
                return
            self._input_started = True
        self.backend.start(self.deliver_input)

    def _power_on(self) -> None:
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scratch = 0
        self._divisor = RESET_DIVISOR
        self._fifo_enabled = False
        self._rx_capacity = 1
        self._rx_trigger = 1
        self._rx.clear()
        self._last_rx = 0
        self._lsr_errors = 0
        self._thr_pending = False
        self._line_inputs = LINE_MODEM_INPUTS
        self._msr_delta = 0

    # -- guest access ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset == REG_LSR:
                value = LSR_THR_EMPTY | LSR_TX_EMPTY | self._lsr_errors | (LSR_DATA_READY if self._rx else 0)
                if self._lsr_errors:  # reading LSR clears the error bits and the line-status interrupt
                    self._lsr_errors = 0
                    self._update_irq()
            elif offset == REG_DATA:
                value = self._divisor & 0xFF if self._lcr & LCR_DLAB else self._read_rbr()
            elif offset == REG_IIR_FCR:
                value = self._read_iir()
            elif offset == REG_IER:
                value = self._divisor >> 8 if self._lcr & LCR_DLAB else self._ier
            elif offset == REG_LCR:
                value = self._lcr
            elif offset == REG_MCR:
                value = self._mcr
            elif offset == REG_MSR:
                value = self._modem_inputs() | self._msr_delta
                if self._msr_delta:
                    self._msr_delta = 0
                    self._update_irq()
            elif offset == REG_SCR:
                value = self._scratch
            else:
                return b"\xff" * size
        if size == 1:
            return _BYTE[value]
        return _BYTE[value] + bytes(size - 1) if size > 0 else b""

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        with self._lock:
            if offset == REG_DATA and not self._lcr & LCR_DLAB:
                if self._mcr & MCR_LOOP:
                    self._receive_byte(value)
                    self._thr_pending = True
                    self._update_irq()
                    return
                self._emit(_BYTE[value])
                if not self._thr_pending:  # the holding register is empty again at once
                    self._thr_pending = True
                    self._update_irq()
                return
            if offset == REG_DATA:
                self._divisor = (self._divisor & 0xFF00) | value
            elif offset == REG_IER:
                if self._lcr & LCR_DLAB:
                    self._divisor = (self._divisor & 0x00FF) | (value << 8)
                else:
                    self._write_ier(value)
            elif offset == REG_IIR_FCR:
                self._write_fcr(value)
            elif offset == REG_LCR:
                self._lcr = value
            elif offset == REG_MCR:
                self._write_mcr(value)
            elif offset == REG_SCR:
                self._scratch = value
            # LSR and MSR are read-only; other offsets are outside the UART

    def _read_rbr(self) -> int:
        rx = self._rx
        if not rx:
            return self._last_rx  # an empty RBR still holds the last character
        value = rx.popleft()
        self._last_rx = value
        if not rx:
            self._update_irq()
        self._rx_room.notify()
        return value

    def _read_iir(self) -> int:
        source = self._pending_source()
        if source == IIR_THR_EMPTY:  # reporting THRE acknowledges it, as on real hardware
            self._thr_pending = False
            self._update_irq()
        return (source | IIR_FIFOS_ENABLED) if self._fifo_enabled else source

    def _write_ier(self, value: int) -> None:
        value &= IER_WRITABLE
        changed = self._ier ^ value
        self._ier = value
        if changed & IER_THR_EMPTY:
            # enabling THRE interrupts while THR is empty (always, here) raises one at once
            self._thr_pending = bool(value & IER_THR_EMPTY)
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        if enable != self._fifo_enabled:
            self._rx.clear()  # switching FIFO mode resets both FIFOs
        self._fifo_enabled = enable
        if enable:
            # the other FCR bits are only programmed while FCR0 is written as 1
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self._rx_trigger = RX_TRIGGER_LEVELS[value >> FCR_TRIGGER_SHIFT]
            self._rx_capacity = FIFO_SIZE
        else:
            self._rx_trigger = 1
            self._rx_capacity = 1
        self._update_irq()
        self._rx_room.notify_all()

    def _write_mcr(self, value: int) -> None:
        before = self._modem_inputs()
        self._mcr = value & MCR_WRITABLE
        after = self._modem_inputs()
        changed = before ^ after
        delta = 0
        if changed & MSR_CTS:
            delta |= MSR_DELTA_CTS
        if changed & MSR_DSR:
            delta |= MSR_DELTA_DSR
        if before & MSR_RI and not after & MSR_RI:
            delta |= MSR_TRAILING_RI
        if changed & MSR_DCD:
            delta |= MSR_DELTA_DCD
        self._msr_delta |= delta
        self._update_irq()
        self._rx_room.notify_all()  # leaving loopback reconnects the line input

    def _modem_inputs(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return self._line_inputs
        # loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD
        return (
            (MSR_CTS if mcr & MCR_RTS else 0)
            | (MSR_DSR if mcr & MCR_DTR else 0)
            | (MSR_RI if mcr & MCR_OUT1 else 0)
            | (MSR_DCD if mcr & MCR_OUT2 else 0)
        )

    # -- interrupts -----------------------------------------------------------------------

    def _pending_source(self) -> int:
        """The IIR identification of the highest-priority enabled pending interrupt."""
        ier = self._ier
        if ier & IER_LINE_STATUS and self._lsr_errors:
            return IIR_LINE_STATUS
        if ier & IER_RX_AVAILABLE and self._rx:
            if self._fifo_enabled and len(self._rx) < self._rx_trigger:
                return IIR_RX_TIMEOUT
            return IIR_RX_AVAILABLE
        if ier & IER_THR_EMPTY and self._thr_pending:
            return IIR_THR_EMPTY
        if ier & IER_MODEM_STATUS and self._msr_delta:
            return IIR_MODEM_STATUS
        return IIR_NO_INTERRUPT

    def _update_irq(self) -> None:
        level = bool(self._mcr & MCR_OUT2) and self._pending_source() != IIR_NO_INTERRUPT
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)

    # -- host side ------------------------------------------------------------------------

    def _receive_byte(self, value: int) -> None:
        rx = self._rx
        if len(rx) < self._rx_capacity:
            rx.append(value)
            return
        self._lsr_errors |= LSR_OVERRUN
        if not self._fifo_enabled:
            rx[0] = value  # without a FIFO the new character overwrites the unread one

    def receive(self, data: bytes) -> None:
        """Characters arriving on the line now, with no flow control.

        Past the receiver's room they overrun (LSR.OE), as on a real wire. In loopback mode
        the line input is disconnected and they are lost.
        """
        with self._lock:
            if self._mcr & MCR_LOOP:
                return
            for value in data:
                self._receive_byte(value)
            self._update_irq()

    def deliver_input(self, data: bytes) -> bool:
        """Flow-controlled input for backend reader threads: wait for FIFO room, never overrun.

        Returns once every byte was taken (True) or when the UART is closed (False).
        Waits while the UART is in loopback mode, whose line input is disconnected.
        """
        position = 0
        with self._rx_room:
            while position < len(data):
                while not self._closed and (self._mcr & MCR_LOOP or len(self._rx) >= self._rx_capacity):
                    self._rx_room.wait()
                if self._closed:
                    return False
                room = self._rx_capacity - len(self._rx)
                self._rx.extend(data[position : position + room])
                position += room
                self._update_irq()
        return True

    @property
    def interrupt_asserted(self) -> bool:
        """The current level of the interrupt output."""
        return self._irq_level

    def reset(self) -> None:
        with self._lock:
            self._power_on()
            self._update_irq()
            self._rx_room.notify_all()

    # -- state ----------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        with self._lock:
            return {
                "ier": self._ier,
                "lcr": self._lcr,
                "mcr": self._mcr,
                "scratch": self._scratch,
                "divisor": self._divisor,
                "fifo_enabled": self._fifo_enabled,
                "rx_trigger": self._rx_trigger,
                "rx": bytes(self._rx).hex(),
                "last_rx": self._last_rx,
                "lsr_errors": self._lsr_errors,
                "thr_pending": self._thr_pending,
                "msr_delta": self._msr_delta,
            }

    def load_state(self, state: Mapping[str, object]) -> None:
        reader = StateReader(self.name, state)
        fifo_enabled = reader.flag("fifo_enabled")
        rx_trigger = reader.integer("rx_trigger", 1, FIFO_SIZE)
        if rx_trigger not in (RX_TRIGGER_LEVELS if fifo_enabled else (1,)):
            raise reader.error("rx_trigger", f"{rx_trigger} is not a trigger level of this FIFO mode")
        capacity = FIFO_SIZE if fifo_enabled else 1
        values = {
            "ier": reader.integer("ier", 0, IER_WRITABLE),
            "lcr": reader.integer("lcr", 0, 0xFF),
            "mcr": reader.integer("mcr", 0, MCR_WRITABLE),
            "scratch": reader.integer("scratch", 0, 0xFF),
            "divisor": reader.integer("divisor", 0, 0xFFFF),
            "last_rx": reader.integer("last_rx", 0, 0xFF),
            "lsr_errors": reader.integer("lsr_errors", 0, LSR_ERRORS),
            "msr_delta": reader.integer("msr_delta", 0, 0x0F),
        }
        rx = reader.hex_bytes("rx", max_length=capacity)
        thr_pending = reader.flag("thr_pending")
        with self._lock:
            self._ier, self._lcr, self._mcr = values["ier"], values["lcr"], values["mcr"]
            self._scratch, self._divisor = values["scratch"], values["divisor"]
            self._last_rx, self._lsr_errors = values["last_rx"], values["lsr_errors"]
            self._msr_delta = values["msr_delta"]
            self._fifo_enabled, self._rx_trigger, self._rx_capacity = fifo_enabled, rx_trigger, capacity
            self._rx.clear()
            self._rx.extend(rx)
            self._thr_pending = thr_pending
            self._update_irq()
            self._rx_room.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._rx_room.notify_all()
        self.backend.close()
