"""The i8042 PS/2 keyboard controller, with no keyboard or mouse plugged in.

One device covers ports 0x60-0x64: offset 0 is the data port (0x60), offset 4 the
status (read) / command (write) port (0x64). Offsets 1-3 (0x61-0x63) belong to other
chipset functions and behave as unclaimed: they read 0xff and ignore writes. An access
wider than a byte is split into byte accesses at consecutive offsets, as the ISA bus does.

What is modelled is what a kernel needs to probe the controller and to reset the machine:
the status register, the configuration ("command") byte and the rest of the 32-byte
controller RAM (0x20-0x3f / 0x60-0x7f), self-test (0xAA -> 0x55), interface tests
(0xAB, 0xA9 -> 0x00: the port lines are fine), enabling and disabling the ports
(0xAD/0xAE/0xA7/0xA8), the output port (0xD0/0xD1), writing the output buffer as if
from the keyboard or mouse (0xD2/0xD3, the "loop" commands Linux's probe relies on), and
pulsing the reset line (0xFE, or 0xD1 with bit 0 clear) -> ``request_stop(..., 0)``.

Because no device is attached, every byte sent to the keyboard (a plain data-port write)
or to the mouse (0xD4) is answered at once with 0xFE and the status register's time-out
bit, which is what a controller reports when the device never clocks the byte in. Linux
therefore concludes its probe cleanly: the aux loop test echoes, the MUX test fails as
on a plain controller, and atkbd/psmouse see their first command fail and give up, quickly
when the IRQ 1/12 lines are wired and after their own timeouts when they are not. A20
gating (output port bit 1) is stored but not applied: KVM guests always see A20 enabled.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping

from vmscope.devices.base import Device, InterruptLine, MachineControl, NullInterruptLine
from vmscope.devices.state import StateReader
from vmscope.firmware import FirmwareContribution

log = logging.getLogger("vmscope.devices.i8042")

I8042_PORT = 0x60
I8042_WINDOW_LENGTH = 5
KEYBOARD_IRQ = 1
AUX_IRQ = 12

DATA_OFFSET = 0  # port 0x60
STATUS_COMMAND_OFFSET = 4  # port 0x64

# status register (read at 0x64)
STATUS_OUTPUT_FULL = 0x01
STATUS_INPUT_FULL = 0x02  # never set: commands and data are consumed at once
STATUS_SYSTEM_FLAG = 0x04
STATUS_LAST_WAS_COMMAND = 0x08
STATUS_KEYBOARD_UNLOCKED = 0x10  # the keylock switch does not inhibit the keyboard
STATUS_AUX_DATA = 0x20
STATUS_TIMEOUT = 0x40
STATUS_PARITY_ERROR = 0x80

# configuration byte (controller RAM byte 0)
CONFIG_KEYBOARD_INTERRUPT = 0x01
CONFIG_AUX_INTERRUPT = 0x02
CONFIG_SYSTEM_FLAG = 0x04
CONFIG_KEYBOARD_DISABLED = 0x10
CONFIG_AUX_DISABLED = 0x20
CONFIG_TRANSLATE = 0x40
#: as a PC BIOS leaves it after POST: both interrupts on, self-test passed, translation on
CONFIG_AFTER_POST = CONFIG_KEYBOARD_INTERRUPT | CONFIG_AUX_INTERRUPT | CONFIG_SYSTEM_FLAG | CONFIG_TRANSLATE

# commands (written at 0x64)
CMD_READ_RAM = 0x20  # 0x20-0x3f: read RAM byte (cmd & 0x1f); 0x20 reads the configuration byte
CMD_WRITE_RAM = 0x60  # 0x60-0x7f: the next data byte goes to RAM byte (cmd & 0x1f)
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX_INTERFACE = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KEYBOARD_INTERFACE = 0xAB
CMD_DISABLE_KEYBOARD = 0xAD
CMD_ENABLE_KEYBOARD = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KEYBOARD_OUTPUT = 0xD2
CMD_WRITE_AUX_OUTPUT = 0xD3
CMD_WRITE_AUX_DEVICE = 0xD4
CMD_PULSE_OUTPUT_BASE = 0xF0  # 0xf0-0xff pulse the output-port bits 0-3 that are 0 in the command
CMD_PULSE_RESET = 0xFE

# responses
SELF_TEST_PASSED = 0x55
INTERFACE_TEST_OK = 0x00
NO_DEVICE_RESPONSE = 0xFE

# output port
OUTPUT_PORT_RESET_INACTIVE = 0x01  # active low: clearing it resets the CPU
OUTPUT_PORT_A20 = 0x02
OUTPUT_PORT_KEYBOARD_FULL = 0x10
OUTPUT_PORT_AUX_FULL = 0x20
OUTPUT_PORT_KEYBOARD_CLOCK = 0x40
OUTPUT_PORT_KEYBOARD_DATA = 0x80
OUTPUT_PORT_RESET_VALUE = (
    OUTPUT_PORT_RESET_INACTIVE | OUTPUT_PORT_A20 | OUTPUT_PORT_KEYBOARD_CLOCK | OUTPUT_PORT_KEYBOARD_DATA
)

RESET_REASON = "guest reset via i8042"
#: bytes the controller holds for the guest; a guest that never reads cannot grow it further
OUTPUT_QUEUE_LIMIT = 16
_RAM_SIZE = 32
_PARAMETER_COMMANDS = frozenset(
    {CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KEYBOARD_OUTPUT, CMD_WRITE_AUX_OUTPUT, CMD_WRITE_AUX_DEVICE}
)


class I8042(Device):
    """The keyboard controller at 0x60-0x64 (register with length :data:`I8042_WINDOW_LENGTH`)."""

    def __init__(
        self,
        machine: MachineControl,
        keyboard_irq: InterruptLine | None = None,
        aux_irq: InterruptLine | None = None,
        name: str = "i8042",
    ) -> None:
        self.name = name
        self._machine = machine
        self._keyboard_irq = keyboard_irq if keyboard_irq is not None else NullInterruptLine()
        self._aux_irq = aux_irq if aux_irq is not None else NullInterruptLine()
        self._lock = threading.Lock()
        # (byte, status bits that come with it: STATUS_AUX_DATA / STATUS_TIMEOUT)
        self._output: deque[tuple[int, int]] = deque()
        self._ram = bytearray(_RAM_SIZE)
        self._power_on()

    def _power_on(self) -> None:
        self._output.clear()
        self._ram[:] = bytes(_RAM_SIZE)
        self._ram[0] = CONFIG_AFTER_POST
        self._output_port = OUTPUT_PORT_RESET_VALUE
        self._pending_command: int | None = None
        self._last_was_command = False
        self._last_read = 0
        self._keyboard_level = False
        self._aux_level = False

    @property
    def config(self) -> int:
        """The configuration ("command") byte."""
        return self._ram[0]

    # -- guest access ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return bytes(self._read_byte(offset + index) for index in range(size))

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            for index, value in enumerate(data):
                self._write_byte(offset + index, value)

    def _read_byte(self, offset: int) -> int:
        if offset == DATA_OFFSET:
            if self._output:
                self._last_read = self._output.popleft()[0]
                self._update_irqs()
            return self._last_read  # an empty output buffer still holds the last byte
        if offset == STATUS_COMMAND_OFFSET:
            return self._status()
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == DATA_OFFSET:
            self._last_was_command = False
            command, self._pending_command = self._pending_command, None
            if command is None:
                self._queue(NO_DEVICE_RESPONSE, STATUS_TIMEOUT)  # a byte for the (absent) keyboard
            else:
                self._parameter(command, value)
        elif offset == STATUS_COMMAND_OFFSET:
            self._last_was_command = True
            self._pending_command = None  # a new command abandons one still waiting for its byte
            self._command(value)

    def _status(self) -> int:
        status = STATUS_KEYBOARD_UNLOCKED
        if self._output:
            status |= STATUS_OUTPUT_FULL | self._output[0][1]
        if self._ram[0] & CONFIG_SYSTEM_FLAG:
            status |= STATUS_SYSTEM_FLAG
        if self._last_was_command:
            status |= STATUS_LAST_WAS_COMMAND
        return status

    # -- commands -------------------------------------------------------------------------

    def _command(self, command: int) -> None:
        if CMD_READ_RAM <= command < CMD_READ_RAM + _RAM_SIZE:
            self._queue(self._ram[command - CMD_READ_RAM], 0)
        elif CMD_WRITE_RAM <= command < CMD_WRITE_RAM + _RAM_SIZE or command in _PARAMETER_COMMANDS:
            self._pending_command = command
        elif command == CMD_DISABLE_AUX:
            self._set_config(self._ram[0] | CONFIG_AUX_DISABLED)
        elif command == CMD_ENABLE_AUX:
            self._set_config(self._ram[0] & ~CONFIG_AUX_DISABLED)
        elif command == CMD_DISABLE_KEYBOARD:
            self._set_config(self._ram[0] | CONFIG_KEYBOARD_DISABLED)
        elif command == CMD_ENABLE_KEYBOARD:
            self._set_config(self._ram[0] & ~CONFIG_KEYBOARD_DISABLED)
        elif command == CMD_SELF_TEST:
            self._set_config(self._ram[0] | CONFIG_SYSTEM_FLAG)
            self._queue(SELF_TEST_PASSED, 0)
        elif command in (CMD_TEST_KEYBOARD_INTERFACE, CMD_TEST_AUX_INTERFACE):
            self._queue(INTERFACE_TEST_OK, 0)
        elif command == CMD_READ_OUTPUT_PORT:
            self._queue(self._output_port_value(), 0)
        elif command >= CMD_PULSE_OUTPUT_BASE:
            if not command & OUTPUT_PORT_RESET_INACTIVE:
                self._machine.request_stop(RESET_REASON, 0)
        else:
            log.debug("i8042: ignoring unsupported command %#04x", command)

    def _parameter(self, command: int, value: int) -> None:
        if command == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            if not value & OUTPUT_PORT_RESET_INACTIVE:
                self._machine.request_stop(f"{RESET_REASON} (output port write {value:#04x})", 0)
        elif command == CMD_WRITE_KEYBOARD_OUTPUT:
            self._queue(value, 0)
        elif command == CMD_WRITE_AUX_OUTPUT:
            self._queue(value, STATUS_AUX_DATA)
        elif command == CMD_WRITE_AUX_DEVICE:
            self._queue(NO_DEVICE_RESPONSE, STATUS_AUX_DATA | STATUS_TIMEOUT)  # no mouse to take it
        elif command == CMD_WRITE_RAM:
            self._set_config(value)
        else:
            self._ram[command - CMD_WRITE_RAM] = value

    def _output_port_value(self) -> int:
        value = self._output_port & ~(OUTPUT_PORT_KEYBOARD_FULL | OUTPUT_PORT_AUX_FULL)
        if self._output:
            from_aux = self._output[0][1] & STATUS_AUX_DATA
            value |= OUTPUT_PORT_AUX_FULL if from_aux else OUTPUT_PORT_KEYBOARD_FULL
        return value

    def _set_config(self, value: int) -> None:
        self._ram[0] = value & 0xFF
        self._update_irqs()

    # -- output buffer and interrupts -----------------------------------------------------

    def _queue(self, value: int, status_bits: int) -> None:
        if len(self._output) >= OUTPUT_QUEUE_LIMIT:
            log.debug("i8042: output buffer full, dropping %#04x", value)
            return
        self._output.append((value, status_bits))
        self._update_irqs()

    def _update_irqs(self) -> None:
        keyboard = aux = False
        if self._output:
            config = self._ram[0]
            if self._output[0][1] & STATUS_AUX_DATA:
                aux = bool(config & CONFIG_AUX_INTERRUPT)
            else:
                keyboard = bool(config & CONFIG_KEYBOARD_INTERRUPT)
        if keyboard != self._keyboard_level:
            self._keyboard_level = keyboard
            self._keyboard_irq.set_level(keyboard)
        if aux != self._aux_level:
            self._aux_level = aux
            self._aux_irq.set_level(aux)

    def firmware_contribution(self) -> FirmwareContribution:
        """The FADT says the machine has an 8042 (IA-PC boot architecture flags)."""
        return FirmwareContribution(boot_flags=frozenset({"i8042"}))

    # -- state ----------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        with self._lock:
            return {
                "ram": self._ram.hex(),
                "output": bytes(value for value, _ in self._output).hex(),
                "output_status": [bits for _, bits in self._output],
                "output_port": self._output_port,
                "pending_command": self._pending_command,
                "last_was_command": self._last_was_command,
                "last_read": self._last_read,
            }

    def load_state(self, state: Mapping[str, object]) -> None:
        reader = StateReader(self.name, state)
        ram = reader.hex_bytes("ram", _RAM_SIZE)
        values = reader.hex_bytes("output", max_length=OUTPUT_QUEUE_LIMIT)
        status_bits = reader.integers("output_status", maximum=0xFF, count=len(values))
        for index, bits in enumerate(status_bits):
            if bits & ~(STATUS_AUX_DATA | STATUS_TIMEOUT):
                raise reader.error(f"output_status[{index}]", f"{bits:#x} is not a queued byte's status")
        output = list(zip(values, status_bits, strict=True))
        output_port = reader.integer("output_port", 0, 0xFF)
        pending = reader.optional_integer("pending_command", 0, 0xFF)
        if pending is not None and not (
            CMD_WRITE_RAM <= pending < CMD_WRITE_RAM + _RAM_SIZE or pending in _PARAMETER_COMMANDS
        ):
            raise reader.error("pending_command", f"{pending:#x} takes no parameter byte")
        last_was_command = reader.flag("last_was_command")
        last_read = reader.integer("last_read", 0, 0xFF)
        with self._lock:
            self._ram[:] = ram
            self._output.clear()
            self._output.extend(output)
            self._output_port, self._pending_command = output_port, pending
            self._last_was_command, self._last_read = last_was_command, last_read
            self._update_irqs()

    def reset(self) -> None:
        with self._lock:
            self._power_on()
            self._keyboard_irq.set_level(False)
            self._aux_irq.set_level(False)
