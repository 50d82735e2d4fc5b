"""The i8042 keyboard controller: commands, Linux's probe without devices, and reset."""

from __future__ import annotations

import pytest

from vmscope.bus import PioBus
from vmscope.devices.base import RecordingInterruptLine, RecordingMachineControl
from vmscope.devices.i8042 import (
    CMD_DISABLE_AUX,
    CMD_DISABLE_KEYBOARD,
    CMD_ENABLE_AUX,
    CMD_ENABLE_KEYBOARD,
    CMD_PULSE_RESET,
    CMD_READ_OUTPUT_PORT,
    CMD_READ_RAM,
    CMD_SELF_TEST,
    CMD_TEST_AUX_INTERFACE,
    CMD_TEST_KEYBOARD_INTERFACE,
    CMD_WRITE_AUX_DEVICE,
    CMD_WRITE_AUX_OUTPUT,
    CMD_WRITE_KEYBOARD_OUTPUT,
    CMD_WRITE_OUTPUT_PORT,
    CMD_WRITE_RAM,
    CONFIG_AUX_DISABLED,
    CONFIG_AUX_INTERRUPT,
    CONFIG_KEYBOARD_DISABLED,
    CONFIG_KEYBOARD_INTERRUPT,
    CONFIG_SYSTEM_FLAG,
    CONFIG_TRANSLATE,
    DATA_OFFSET,
    I8042,
    I8042_PORT,
    I8042_WINDOW_LENGTH,
    INTERFACE_TEST_OK,
    NO_DEVICE_RESPONSE,
    OUTPUT_PORT_A20,
    OUTPUT_PORT_AUX_FULL,
    OUTPUT_PORT_KEYBOARD_FULL,
    OUTPUT_PORT_RESET_INACTIVE,
    OUTPUT_QUEUE_LIMIT,
    RESET_REASON,
    SELF_TEST_PASSED,
    STATUS_AUX_DATA,
    STATUS_COMMAND_OFFSET,
    STATUS_INPUT_FULL,
    STATUS_LAST_WAS_COMMAND,
    STATUS_OUTPUT_FULL,
    STATUS_SYSTEM_FLAG,
    STATUS_TIMEOUT,
)


class ControllerTimeout(Exception):
    pass


class Driver:
    """Talks to the controller the way Linux's i8042_command does, with bounded polling."""

    POLLS = 50

    def __init__(self, with_irqs: bool = True) -> None:
        self.machine = RecordingMachineControl()
        self.kbd_irq = RecordingInterruptLine()
        self.aux_irq = RecordingInterruptLine()
        self.dev = I8042(
            self.machine,
            keyboard_irq=self.kbd_irq if with_irqs else None,
            aux_irq=self.aux_irq if with_irqs else None,
        )

    def status(self) -> int:
        return self.dev.read(STATUS_COMMAND_OFFSET, 1)[0]

    def data(self) -> int:
        return self.dev.read(DATA_OFFSET, 1)[0]

    def _wait_write(self) -> None:
        for _ in range(self.POLLS):
            if not self.status() & STATUS_INPUT_FULL:
                return
        raise ControllerTimeout("input buffer never emptied")

    def _wait_read(self) -> None:
        for _ in range(self.POLLS):
            if self.status() & STATUS_OUTPUT_FULL:
                return
        raise ControllerTimeout("no reply")

    def command(self, command: int, params: bytes = b"", replies: int = 0) -> list[int]:
        self._wait_write()
        self.dev.write(STATUS_COMMAND_OFFSET, bytes([command]))
        for value in params:
            self._wait_write()
            self.dev.write(DATA_OFFSET, bytes([value]))
        answers = []
        for _ in range(replies):
            self._wait_read()
            answers.append(self.data())
        return answers

    def flush(self) -> int:
        flushed = 0
        while self.status() & STATUS_OUTPUT_FULL:
            self.data()
            flushed += 1
            assert flushed <= 16, "controller never stops producing data"
        return flushed


@pytest.fixture
def d() -> Driver:
    return Driver()


def test_power_on_status_and_config(d: Driver) -> None:
    status = d.status()
    assert not status & (STATUS_OUTPUT_FULL | STATUS_INPUT_FULL)
    assert status & STATUS_SYSTEM_FLAG  # as after a BIOS POST
    assert d.command(CMD_READ_RAM, replies=1) == [d.dev.config]
    assert d.dev.config & (CONFIG_KEYBOARD_INTERRUPT | CONFIG_AUX_INTERRUPT | CONFIG_TRANSLATE)


def test_self_test_and_interface_tests(d: Driver) -> None:
    assert d.command(CMD_SELF_TEST, replies=1) == [SELF_TEST_PASSED]
    assert d.command(CMD_TEST_KEYBOARD_INTERFACE, replies=1) == [INTERFACE_TEST_OK]
    assert d.command(CMD_TEST_AUX_INTERFACE, replies=1) == [INTERFACE_TEST_OK]
    assert not d.status() & STATUS_OUTPUT_FULL


def test_config_byte_write_then_read(d: Driver) -> None:
    d.command(CMD_WRITE_RAM, bytes([0x65]))
    assert d.command(CMD_READ_RAM, replies=1) == [0x65]
    assert d.dev.config == 0x65
    d.command(CMD_WRITE_RAM, bytes([0x00]))
    assert not d.status() & STATUS_SYSTEM_FLAG  # the status bit follows the config byte
    d.command(CMD_WRITE_RAM + 5, bytes([0x99]))  # other controller RAM bytes
    assert d.command(CMD_READ_RAM + 5, replies=1) == [0x99]
    assert d.dev.config == 0x00


def test_status_bit_3_tracks_command_versus_data_writes(d: Driver) -> None:
    d.dev.write(STATUS_COMMAND_OFFSET, bytes([CMD_WRITE_RAM]))
    assert d.status() & STATUS_LAST_WAS_COMMAND
    d.dev.write(DATA_OFFSET, bytes([0x47]))
    assert not d.status() & STATUS_LAST_WAS_COMMAND


@pytest.mark.parametrize(
    ("disable", "enable", "bit"),
    [
        (CMD_DISABLE_KEYBOARD, CMD_ENABLE_KEYBOARD, CONFIG_KEYBOARD_DISABLED),
        (CMD_DISABLE_AUX, CMD_ENABLE_AUX, CONFIG_AUX_DISABLED),
    ],
)
def test_port_enable_disable_shows_in_config(d: Driver, disable: int, enable: int, bit: int) -> None:
    d.command(disable)
    assert d.command(CMD_READ_RAM, replies=1)[0] & bit
    d.command(enable)
    assert not d.command(CMD_READ_RAM, replies=1)[0] & bit


def test_output_port_read_and_write(d: Driver) -> None:
    port = d.command(CMD_READ_OUTPUT_PORT, replies=1)[0]
    assert port & OUTPUT_PORT_RESET_INACTIVE and port & OUTPUT_PORT_A20
    assert not port & (OUTPUT_PORT_KEYBOARD_FULL | OUTPUT_PORT_AUX_FULL)
    d.command(CMD_WRITE_OUTPUT_PORT, bytes([OUTPUT_PORT_RESET_INACTIVE]))  # A20 off, no reset
    assert d.command(CMD_READ_OUTPUT_PORT, replies=1) == [OUTPUT_PORT_RESET_INACTIVE]
    assert d.machine.stops == []


def test_output_port_reports_which_buffer_is_full(d: Driver) -> None:
    d.command(CMD_WRITE_AUX_OUTPUT, b"\x11")
    d.dev.write(STATUS_COMMAND_OFFSET, bytes([CMD_READ_OUTPUT_PORT]))
    d.data()  # the aux byte queued first
    assert d.data() & OUTPUT_PORT_AUX_FULL


def test_pulse_reset_requests_a_stop_with_status_zero(d: Driver) -> None:
    d.command(CMD_PULSE_RESET)
    assert d.machine.stops == [(RESET_REASON, 0)]


def test_other_pulse_commands_reset_only_when_bit_0_is_pulsed(d: Driver) -> None:
    d.command(0xFF)  # pulses nothing
    d.command(0xFD)  # pulses bit 1 (A20), not reset
    assert d.machine.stops == []
    d.command(0xF0)
    assert len(d.machine.stops) == 1 and d.machine.stops[0][1] == 0


def test_output_port_write_clearing_bit_0_resets(d: Driver) -> None:
    d.command(CMD_WRITE_OUTPUT_PORT, bytes([OUTPUT_PORT_A20]))
    assert len(d.machine.stops) == 1
    reason, status = d.machine.stops[0]
    assert reason.startswith(RESET_REASON) and status == 0


def test_linux_style_probe_without_devices_concludes(d: Driver) -> None:
    # i8042_controller_check / selftest
    assert d.flush() == 0
    assert d.command(CMD_SELF_TEST, replies=1) == [SELF_TEST_PASSED]
    # i8042_controller_init: two equal CTR reads, then a new CTR with both ports off
    ctr = [d.command(CMD_READ_RAM, replies=1)[0] for _ in range(2)]
    assert ctr[0] == ctr[1]
    new_ctr = (ctr[0] & ~(CONFIG_KEYBOARD_INTERRUPT | CONFIG_AUX_INTERRUPT)) | (
        CONFIG_KEYBOARD_DISABLED | CONFIG_AUX_DISABLED
    )
    d.command(CMD_WRITE_RAM, bytes([new_ctr]))
    assert d.flush() == 0
    # i8042_check_aux: the aux loop echoes, marked as aux data
    d.dev.write(STATUS_COMMAND_OFFSET, bytes([CMD_WRITE_AUX_OUTPUT]))
    d.dev.write(DATA_OFFSET, b"\x5a")
    assert d.status() & STATUS_AUX_DATA
    assert d.data() == 0x5A
    # i8042_check_mux: the third loop byte comes back unchanged -> not a MUX controller
    echoes = [d.command(CMD_WRITE_AUX_OUTPUT, bytes([v]), replies=1)[0] for v in (0xF0, 0x56, 0xA4)]
    assert echoes == [0xF0, 0x56, 0xA4]
    # bit assignment test: aux disable/enable visible in CTR
    d.command(CMD_DISABLE_AUX)
    assert d.command(CMD_READ_RAM, replies=1)[0] & CONFIG_AUX_DISABLED
    d.command(CMD_ENABLE_AUX)
    assert not d.command(CMD_READ_RAM, replies=1)[0] & CONFIG_AUX_DISABLED
    # enable the keyboard port with interrupts; atkbd's first command (GETID) fails at once
    d.command(CMD_WRITE_RAM, bytes([CONFIG_KEYBOARD_INTERRUPT | CONFIG_AUX_INTERRUPT | CONFIG_SYSTEM_FLAG]))
    d.dev.write(DATA_OFFSET, b"\xf2")
    assert d.kbd_irq.level
    status = d.status()
    assert status & STATUS_OUTPUT_FULL and status & STATUS_TIMEOUT and not status & STATUS_AUX_DATA
    assert d.data() == NO_DEVICE_RESPONSE
    assert not d.kbd_irq.level
    # psmouse's first command through 0xD4 fails the same way on the aux side
    d.command(CMD_WRITE_AUX_DEVICE, b"\xff")
    assert d.aux_irq.level and not d.kbd_irq.level
    assert d.status() & (STATUS_AUX_DATA | STATUS_TIMEOUT) == STATUS_AUX_DATA | STATUS_TIMEOUT
    assert d.data() == NO_DEVICE_RESPONSE
    assert not d.aux_irq.level
    assert not d.status() & (STATUS_OUTPUT_FULL | STATUS_TIMEOUT)
    assert d.machine.stops == []


def test_probe_works_without_interrupt_lines_wired() -> None:
    driver = Driver(with_irqs=False)
    assert driver.command(CMD_SELF_TEST, replies=1) == [SELF_TEST_PASSED]
    driver.dev.write(DATA_OFFSET, b"\xf2")
    assert driver.data() == NO_DEVICE_RESPONSE


def test_interrupts_follow_config_enable_bits(d: Driver) -> None:
    d.command(CMD_WRITE_RAM, bytes([0x00]))
    d.command(CMD_WRITE_KEYBOARD_OUTPUT, b"\x1c")
    assert not d.kbd_irq.level  # keyboard interrupt disabled in the config byte
    d.command(CMD_WRITE_RAM, bytes([CONFIG_KEYBOARD_INTERRUPT]))
    assert d.kbd_irq.level
    assert d.data() == 0x1C
    assert not d.kbd_irq.level
    assert d.kbd_irq.changes == [True, False]
    assert d.aux_irq.changes == []


def test_keyboard_output_write_reads_back_as_keyboard_data(d: Driver) -> None:
    d.command(CMD_WRITE_KEYBOARD_OUTPUT, b"\xaa")
    status = d.status()
    assert status & STATUS_OUTPUT_FULL and not status & (STATUS_AUX_DATA | STATUS_TIMEOUT)
    assert d.data() == 0xAA
    assert d.data() == 0xAA  # an empty buffer still reads the last byte
    assert not d.status() & STATUS_OUTPUT_FULL


def test_a_new_command_abandons_one_waiting_for_its_parameter(d: Driver) -> None:
    before = d.dev.config
    d.dev.write(STATUS_COMMAND_OFFSET, bytes([CMD_WRITE_RAM]))
    assert d.command(CMD_SELF_TEST, replies=1) == [SELF_TEST_PASSED]
    d.dev.write(DATA_OFFSET, b"\x00")  # now a byte for the keyboard, not the config byte
    assert d.dev.config == before
    assert d.data() == NO_DEVICE_RESPONSE


def test_output_buffer_is_bounded(d: Driver) -> None:
    for _ in range(100):
        d.dev.write(STATUS_COMMAND_OFFSET, bytes([CMD_SELF_TEST]))
    assert d.flush() == OUTPUT_QUEUE_LIMIT


def test_offsets_1_to_3_are_unclaimed_and_wide_accesses_split(d: Driver) -> None:
    for offset in (1, 2, 3):
        assert d.dev.read(offset, 1) == b"\xff"
        d.dev.write(offset, bytes([CMD_PULSE_RESET]))
    assert d.machine.stops == []
    d.command(CMD_WRITE_KEYBOARD_OUTPUT, b"\x42")
    assert d.dev.read(DATA_OFFSET, 2) == b"\x42\xff"  # 0x60 then unclaimed 0x61
    status, beyond = d.dev.read(STATUS_COMMAND_OFFSET, 2)
    assert beyond == 0xFF and not status & STATUS_OUTPUT_FULL
    d.dev.write(STATUS_COMMAND_OFFSET, bytes([CMD_PULSE_RESET, 0x00]))
    assert d.machine.stops == [(RESET_REASON, 0)]
    assert d.dev.read(STATUS_COMMAND_OFFSET, 0) == b""


def test_reset_restores_power_on_state(d: Driver) -> None:
    d.command(CMD_WRITE_RAM, bytes([CONFIG_KEYBOARD_INTERRUPT]))
    d.command(CMD_WRITE_KEYBOARD_OUTPUT, b"\x01")
    assert d.kbd_irq.level
    d.dev.reset()
    assert not d.kbd_irq.level
    assert not d.status() & STATUS_OUTPUT_FULL
    assert d.dev.config == Driver().dev.config


def test_registered_as_one_window_on_the_port_bus(d: Driver) -> None:
    bus = PioBus()
    bus.register(I8042_PORT, I8042_WINDOW_LENGTH, d.dev)
    bus.write(0x64, bytes([CMD_SELF_TEST]))
    assert bus.read(0x64, 1)[0] & STATUS_OUTPUT_FULL
    assert bus.read(0x60, 1) == bytes([SELF_TEST_PASSED])
    assert bus.read(0x61, 1) == b"\xff"
    bus.write(0x64, bytes([CMD_PULSE_RESET]))
    assert d.machine.stops == [(RESET_REASON, 0)]
    assert bus.device_errors == {}
