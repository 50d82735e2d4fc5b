"""The MC146818 CMOS RAM and real-time clock at ports 0x70 (index) and 0x71 (data).

Register as one device of 2 ports. Writing offset 0 selects one of the 128 CMOS bytes;
its bit 7 is the chipset's NMI-disable bit, kept in :attr:`Cmos.nmi_disabled` and masked
off the index. Offset 0 is write-only and reads 0xff. Wider accesses are split into byte
accesses at consecutive offsets as the ISA bus does (``outw 0x70`` sets index and data).

Clock: registers 0x00-0x09 (and the century byte 0x32) report the host's current UTC
time, in BCD or binary (register B bit 2) and 24- or 12-hour form (register B bit 1, PM
in bit 7 of the hour). The host clock is authoritative: guest writes to the time
registers are ignored, so a guest cannot move the clock it later reads. Register A's
update-in-progress bit reads set during the last 244 microseconds before each second
boundary, the window in which a real part warns that the time registers are about to
change, so code that polls it sees it clear within a quarter millisecond; it reads clear
while register B's SET bit halts updates. Register D reports valid RAM. The alarm
registers 0x01/0x03/0x05 are plain storage.

Left out: alarm, periodic and update-ended interrupts (and the square-wave output).
Register C always reads 0, the RTC's IRQ 8 is never raised, and register B's PIE/AIE/UIE
bits are stored without effect. Daylight-saving (register B bit 0) is not applied.

Memory size fields, filled from the constructor as QEMU fills them for SeaBIOS:
0x15/0x16 base memory in KiB (at most 640), 0x17/0x18 and 0x30/0x31 memory above 1 MiB
in KiB (capped at 0xffff), 0x34/0x35 memory between 16 MiB and 4 GiB in 64 KiB units
(capped at 0xffff), 0x5b-0x5d memory above 4 GiB in 64 KiB units, 0x5f the CPU count
minus one, and the standard checksum of 0x10-0x2d in 0x2e/0x2f.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from vmscope.devices.base import Device
from vmscope.devices.state import StateReader
from vmscope.errors import ConfigError
from vmscope.firmware import FirmwareContribution

CMOS_PORT = 0x70
CMOS_WINDOW_LENGTH = 2
INDEX_OFFSET = 0
DATA_OFFSET = 1
INDEX_NMI_DISABLE = 0x80
CMOS_SIZE = 128

RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06  # 1 = Sunday
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09  # two digits
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
CMOS_CENTURY = 0x32  # the IBM convention ACPI's FADT points at

REG_A_UPDATE_IN_PROGRESS = 0x80
REG_A_RESET_VALUE = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_SET = 0x80
REG_B_PERIODIC_INTERRUPT = 0x40
REG_B_ALARM_INTERRUPT = 0x20
REG_B_UPDATE_INTERRUPT = 0x10
REG_B_SQUARE_WAVE = 0x08
REG_B_BINARY = 0x04
REG_B_24_HOUR = 0x02
REG_B_DAYLIGHT_SAVING = 0x01
REG_B_RESET_VALUE = REG_B_24_HOUR  # BCD, 24-hour: what PC firmware programs
REG_D_VALID_RAM = 0x80
HOUR_PM = 0x80

CMOS_BASE_MEMORY_KIB = 0x15  # and 0x16
CMOS_EXTENDED_MEMORY_KIB = 0x17  # and 0x18
CMOS_CHECKSUM = 0x2E  # high byte; low byte at 0x2f
CMOS_EXTENDED_MEMORY_KIB_COPY = 0x30  # and 0x31
CMOS_MEMORY_ABOVE_16M = 0x34  # and 0x35, 64 KiB units
CMOS_MEMORY_ABOVE_4G = 0x5B  # 0x5b-0x5d, 64 KiB units
CMOS_CPU_COUNT_MINUS_ONE = 0x5F
_CHECKSUMMED = range(0x10, 0x2E)

#: how long before each second boundary the update-in-progress bit reads set
UPDATE_IN_PROGRESS_NS = 244_000

_KIB = 1 << 10
_MIB = 1 << 20
_GIB = 1 << 30
_UNIT_64K = 64 * _KIB
_TIME_REGISTERS = frozenset(
    {RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR}
    | {CMOS_CENTURY}
)
_NS_PER_S = 1_000_000_000


class Cmos(Device):
    """CMOS RAM and RTC for a guest with ``low_memory`` bytes of RAM below 4 GiB and
    ``high_memory`` above it; ``clock_ns`` gives the host's UTC time in nanoseconds."""

    def __init__(
        self,
        low_memory: int,
        high_memory: int = 0,
        *,
        cpu_count: int = 1,
        clock_ns: Callable[[], int] = time.time_ns,
        name: str = "cmos",
    ) -> None:
        if not 0 <= low_memory <= 4 * _GIB:
            raise ConfigError(f"cmos: low_memory must be between 0 and 4 GiB, not {low_memory:#x}")
        if high_memory < 0:
            raise ConfigError(f"cmos: high_memory must not be negative, not {high_memory:#x}")
        if not 1 <= cpu_count <= 256:
            raise ConfigError(f"cmos: cpu_count must be between 1 and 256, not {cpu_count}")
        self.name = name
        self.low_memory = low_memory
        self.high_memory = high_memory
        self.cpu_count = cpu_count
        self._clock_ns = clock_ns
        self._index = 0
        self.nmi_disabled = False
        self._ram = bytearray(CMOS_SIZE)
        self._fill_ram()

    def _fill_ram(self) -> None:
        ram = self._ram
        ram[RTC_REG_A] = REG_A_RESET_VALUE
        ram[RTC_REG_B] = REG_B_RESET_VALUE
        self._put16(CMOS_BASE_MEMORY_KIB, min(self.low_memory // _KIB, 640))
        extended_kib = min(max(self.low_memory - _MIB, 0) // _KIB, 0xFFFF)
        self._put16(CMOS_EXTENDED_MEMORY_KIB, extended_kib)
        self._put16(CMOS_EXTENDED_MEMORY_KIB_COPY, extended_kib)
        self._put16(CMOS_MEMORY_ABOVE_16M, min(max(self.low_memory - 16 * _MIB, 0) // _UNIT_64K, 0xFFFF))
        above_4g = min(self.high_memory // _UNIT_64K, 0xFF_FFFF)
        ram[CMOS_MEMORY_ABOVE_4G : CMOS_MEMORY_ABOVE_4G + 3] = above_4g.to_bytes(3, "little")
        ram[CMOS_CPU_COUNT_MINUS_ONE] = self.cpu_count - 1
        checksum = sum(ram[_CHECKSUMMED.start : _CHECKSUMMED.stop])
        ram[CMOS_CHECKSUM] = (checksum >> 8) & 0xFF
        ram[CMOS_CHECKSUM + 1] = checksum & 0xFF

    def _put16(self, index: int, value: int) -> None:
        self._ram[index] = value & 0xFF
        self._ram[index + 1] = value >> 8

    @property
    def index(self) -> int:
        """The CMOS byte the next data access reaches."""
        return self._index

    # -- guest access ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._read_byte(offset + index) for index in range(size))

    def write(self, offset: int, data: bytes) -> None:
        for index, value in enumerate(data):
            self._write_byte(offset + index, value)

    def _read_byte(self, offset: int) -> int:
        if offset != DATA_OFFSET:
            return 0xFF  # the index port is write-only
        index = self._index
        if index in _TIME_REGISTERS:
            return self._time_field(index)
        if index == RTC_REG_A:
            return self._ram[RTC_REG_A] | self._update_in_progress()
        if index == RTC_REG_C:
            return 0  # no interrupt flags: alarm, periodic and update interrupts are not modelled
        if index == RTC_REG_D:
            return REG_D_VALID_RAM
        return self._ram[index]

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == INDEX_OFFSET:
            self.nmi_disabled = bool(value & INDEX_NMI_DISABLE)
            self._index = value & ~INDEX_NMI_DISABLE
        elif offset == DATA_OFFSET:
            index = self._index
            if index in _TIME_REGISTERS or index in (RTC_REG_C, RTC_REG_D):
                return  # the host clock is authoritative; C and D are read-only
            if index == RTC_REG_A:
                value &= ~REG_A_UPDATE_IN_PROGRESS
            self._ram[index] = value

    # -- clock ----------------------------------------------------------------------------

    def _update_in_progress(self) -> int:
        if self._ram[RTC_REG_B] & REG_B_SET:
            return 0
        if self._clock_ns() % _NS_PER_S >= _NS_PER_S - UPDATE_IN_PROGRESS_NS:
            return REG_A_UPDATE_IN_PROGRESS
        return 0

    def _time_field(self, index: int) -> int:
        now = time.gmtime(self._clock_ns() // _NS_PER_S)  # UTC; time, not datetime: start-up cost
        if index == RTC_SECONDS:
            return self._encode(now.tm_sec)
        if index == RTC_MINUTES:
            return self._encode(now.tm_min)
        if index == RTC_HOURS:
            if self._ram[RTC_REG_B] & REG_B_24_HOUR:
                return self._encode(now.tm_hour)
            return self._encode(now.tm_hour % 12 or 12) | (HOUR_PM if now.tm_hour >= 12 else 0)
        if index == RTC_DAY_OF_WEEK:
            return self._encode((now.tm_wday + 1) % 7 + 1)  # Monday=0 -> RTC's Sunday=1
        if index == RTC_DAY_OF_MONTH:
            return self._encode(now.tm_mday)
        if index == RTC_MONTH:
            return self._encode(now.tm_mon)
        if index == RTC_YEAR:
            return self._encode(now.tm_year % 100)
        return self._encode(now.tm_year // 100)  # CMOS_CENTURY

    def _encode(self, value: int) -> int:
        if self._ram[RTC_REG_B] & REG_B_BINARY:
            return value
        return ((value // 10) << 4) | (value % 10)

    def firmware_contribution(self) -> FirmwareContribution:
        """The FADT says the machine has an RTC/CMOS (IA-PC boot architecture flags)."""
        return FirmwareContribution(boot_flags=frozenset({"cmos_rtc"}))

    # -- state ----------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        # the clock registers are not state: they always read the host's time
        return {"index": self._index, "nmi_disabled": self.nmi_disabled, "ram": self._ram.hex()}

    def load_state(self, state: Mapping[str, object]) -> None:
        reader = StateReader(self.name, state)
        index = reader.integer("index", 0, CMOS_SIZE - 1)
        nmi_disabled = reader.flag("nmi_disabled")
        ram = reader.hex_bytes("ram", CMOS_SIZE)
        self._index, self.nmi_disabled, self._ram[:] = index, nmi_disabled, ram

    def reset(self) -> None:
        # CMOS RAM is battery-backed and survives a reset; only the index latch starts over
        self._index = 0
        self.nmi_disabled = False
