"""The MC146818 CMOS/RTC: host time in BCD/binary and 12/24-hour form, memory-size bytes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from vmscope.bus import PioBus
from vmscope.devices.cmos import (
    CMOS_CENTURY,
    CMOS_PORT,
    CMOS_WINDOW_LENGTH,
    DATA_OFFSET,
    INDEX_OFFSET,
    REG_A_UPDATE_IN_PROGRESS,
    REG_B_24_HOUR,
    REG_B_BINARY,
    REG_B_SET,
    REG_D_VALID_RAM,
    RTC_DAY_OF_MONTH,
    RTC_DAY_OF_WEEK,
    RTC_HOURS,
    RTC_MINUTES,
    RTC_MONTH,
    RTC_REG_A,
    RTC_REG_B,
    RTC_REG_C,
    RTC_REG_D,
    RTC_SECONDS,
    RTC_YEAR,
    UPDATE_IN_PROGRESS_NS,
    Cmos,
)
from vmscope.errors import ConfigError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
NS = 1_000_000_000


def cmos_read(cmos: Cmos, index: int) -> int:
    cmos.write(INDEX_OFFSET, bytes([index]))
    return cmos.read(DATA_OFFSET, 1)[0]


def cmos_write(cmos: Cmos, index: int, value: int) -> None:
    cmos.write(INDEX_OFFSET, bytes([index]))
    cmos.write(DATA_OFFSET, bytes([value]))


def bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


def fixed_clock(moment: datetime, fraction_ns: int = 0) -> tuple[Cmos, list[int]]:
    now = [int(moment.timestamp()) * NS + fraction_ns]
    return Cmos(256 * MIB, clock_ns=lambda: now[0]), now


def read_time(cmos: Cmos, decode: bool = True) -> datetime:
    binary = cmos_read(cmos, RTC_REG_B) & REG_B_BINARY
    conv = (lambda v: v) if binary or not decode else bcd
    century = conv(cmos_read(cmos, CMOS_CENTURY))
    return datetime(
        century * 100 + conv(cmos_read(cmos, RTC_YEAR)),
        conv(cmos_read(cmos, RTC_MONTH)),
        conv(cmos_read(cmos, RTC_DAY_OF_MONTH)),
        conv(cmos_read(cmos, RTC_HOURS)),
        conv(cmos_read(cmos, RTC_MINUTES)),
        conv(cmos_read(cmos, RTC_SECONDS)),
        tzinfo=UTC,
    )


def test_time_matches_the_host_utc_clock() -> None:
    cmos = Cmos(128 * MIB)
    for _ in range(5):
        before = datetime.now(UTC).replace(microsecond=0)
        reported = read_time(cmos)
        weekday = cmos_read(cmos, RTC_DAY_OF_WEEK)
        after = datetime.now(UTC).replace(microsecond=0)
        if before == after:  # no second boundary during the reads: exact match
            assert reported == before
            assert weekday == before.isoweekday() % 7 + 1
            return
        assert before <= reported <= after
    pytest.fail("every attempt straddled a second boundary")


def test_bcd_is_the_default_format() -> None:
    cmos, _ = fixed_clock(datetime(2031, 12, 25, 19, 47, 58, tzinfo=UTC))
    assert cmos_read(cmos, RTC_REG_B) & (REG_B_BINARY | REG_B_24_HOUR) == REG_B_24_HOUR
    raw = [cmos_read(cmos, i) for i in (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_MONTH, RTC_MONTH)]
    assert raw == [0x58, 0x47, 0x19, 0x25, 0x12]
    assert (cmos_read(cmos, RTC_YEAR), cmos_read(cmos, CMOS_CENTURY)) == (0x31, 0x20)
    assert read_time(cmos) == datetime(2031, 12, 25, 19, 47, 58, tzinfo=UTC)


def test_binary_format_when_register_b_bit_2_set() -> None:
    cmos, _ = fixed_clock(datetime(2031, 12, 25, 19, 47, 58, tzinfo=UTC))
    cmos_write(cmos, RTC_REG_B, REG_B_24_HOUR | REG_B_BINARY)
    raw = [cmos_read(cmos, i) for i in (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_MONTH, RTC_MONTH)]
    assert raw == [58, 47, 19, 25, 12]
    assert (cmos_read(cmos, RTC_YEAR), cmos_read(cmos, CMOS_CENTURY)) == (31, 20)


@pytest.mark.parametrize(
    ("hour", "bcd_value", "binary_value"),
    [
        (0, 0x12, 12),  # midnight is 12 AM
        (1, 0x01, 1),
        (11, 0x11, 11),
        (12, 0x80 | 0x12, 0x80 | 12),  # noon is 12 PM
        (13, 0x80 | 0x01, 0x80 | 1),
        (23, 0x80 | 0x11, 0x80 | 11),
    ],
)
def test_twelve_hour_mode_with_pm_in_bit_7(hour: int, bcd_value: int, binary_value: int) -> None:
    cmos, _ = fixed_clock(datetime(2024, 2, 29, hour, 0, 0, tzinfo=UTC))
    cmos_write(cmos, RTC_REG_B, 0)
    assert cmos_read(cmos, RTC_HOURS) == bcd_value
    cmos_write(cmos, RTC_REG_B, REG_B_BINARY)
    assert cmos_read(cmos, RTC_HOURS) == binary_value
    cmos_write(cmos, RTC_REG_B, REG_B_BINARY | REG_B_24_HOUR)
    assert cmos_read(cmos, RTC_HOURS) == hour


@pytest.mark.parametrize(
    ("day", "rtc_weekday"),
    [
        (datetime(2024, 3, 3, tzinfo=UTC), 1),  # a Sunday
        (datetime(2024, 3, 4, tzinfo=UTC), 2),
        (datetime(2024, 3, 9, tzinfo=UTC), 7),
    ],
)
def test_day_of_week_counts_from_sunday_as_1(day: datetime, rtc_weekday: int) -> None:
    cmos, _ = fixed_clock(day)
    assert cmos_read(cmos, RTC_DAY_OF_WEEK) == rtc_weekday


def test_clock_advances_with_the_host_and_ignores_guest_writes() -> None:
    cmos, now = fixed_clock(datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC))
    cmos_write(cmos, RTC_SECONDS, 0x30)
    assert cmos_read(cmos, RTC_SECONDS) == 0x59
    now[0] += NS
    assert read_time(cmos) == datetime(2000, 1, 1, 0, 0, 0, tzinfo=UTC)


def test_update_in_progress_only_just_before_a_second_boundary() -> None:
    moment = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
    cmos, now = fixed_clock(moment, fraction_ns=0)
    base = int(moment.timestamp()) * NS
    for fraction, expected in [
        (0, 0),
        (500_000_000, 0),
        (NS - UPDATE_IN_PROGRESS_NS - 1, 0),
        (NS - UPDATE_IN_PROGRESS_NS, REG_A_UPDATE_IN_PROGRESS),
        (NS - 1, REG_A_UPDATE_IN_PROGRESS),
    ]:
        now[0] = base + fraction
        assert cmos_read(cmos, RTC_REG_A) & REG_A_UPDATE_IN_PROGRESS == expected, fraction
    cmos_write(cmos, RTC_REG_B, REG_B_SET | REG_B_24_HOUR)  # updates halted: never in progress
    assert not cmos_read(cmos, RTC_REG_A) & REG_A_UPDATE_IN_PROGRESS


def test_update_in_progress_is_never_stuck_on_the_real_clock() -> None:
    cmos = Cmos(64 * MIB)
    clear = sum(1 for _ in range(200) if not cmos_read(cmos, RTC_REG_A) & REG_A_UPDATE_IN_PROGRESS)
    assert clear >= 190


def test_register_a_keeps_its_rate_bits_but_not_uip_and_c_d_are_read_only() -> None:
    cmos, _ = fixed_clock(datetime(2024, 1, 1, tzinfo=UTC))
    assert cmos_read(cmos, RTC_REG_A) == 0x26
    cmos_write(cmos, RTC_REG_A, 0xA6)
    assert cmos_read(cmos, RTC_REG_A) == 0x26
    assert cmos_read(cmos, RTC_REG_D) == REG_D_VALID_RAM
    cmos_write(cmos, RTC_REG_D, 0)
    assert cmos_read(cmos, RTC_REG_D) == REG_D_VALID_RAM
    cmos_write(cmos, RTC_REG_C, 0xF0)
    assert cmos_read(cmos, RTC_REG_C) == 0


def test_index_masks_the_nmi_disable_bit() -> None:
    cmos = Cmos(64 * MIB)
    cmos_write(cmos, 0x40, 0x5A)
    cmos.write(INDEX_OFFSET, bytes([0x80 | 0x40]))
    assert cmos.nmi_disabled and cmos.index == 0x40
    assert cmos.read(DATA_OFFSET, 1) == b"\x5a"
    cmos.write(INDEX_OFFSET, b"\x40")
    assert not cmos.nmi_disabled
    assert cmos.read(INDEX_OFFSET, 1) == b"\xff"  # the index port is write-only


def test_general_purpose_ram_round_trips() -> None:
    cmos = Cmos(64 * MIB)
    for index in (0x0E, 0x3F, 0x50, 0x7F):
        cmos_write(cmos, index, index ^ 0xA5)
    indexes = (0x0E, 0x3F, 0x50, 0x7F)
    assert [cmos_read(cmos, i) for i in indexes] == [i ^ 0xA5 for i in indexes]
    cmos.reset()  # battery-backed: survives a reset
    assert cmos_read(cmos, 0x50) == 0x50 ^ 0xA5


def memory_fields(cmos: Cmos) -> dict[str, int]:
    def word(low: int) -> int:
        return cmos_read(cmos, low) | cmos_read(cmos, low + 1) << 8

    return {
        "base": word(0x15),
        "extended": word(0x17),
        "extended_copy": word(0x30),
        "above_16m": word(0x34),
        "above_4g": cmos_read(cmos, 0x5B) | cmos_read(cmos, 0x5C) << 8 | cmos_read(cmos, 0x5D) << 16,
        "cpus_minus_one": cmos_read(cmos, 0x5F),
    }


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (
            32 * MIB,
            0,
            {"base": 640, "extended": 31 * 1024, "above_16m": (16 * MIB) // (64 * KIB), "above_4g": 0},
        ),
        (
            3 * GIB,
            0,
            {"base": 640, "extended": 0xFFFF, "above_16m": (3 * GIB - 16 * MIB) // (64 * KIB), "above_4g": 0},
        ),
        (
            0xC000_0000,
            5 * GIB,
            {"base": 640, "extended": 0xFFFF, "above_16m": 0xBF00, "above_4g": (5 * GIB) // (64 * KIB)},
        ),
        (8 * MIB, 0, {"base": 640, "extended": 7 * 1024, "above_16m": 0, "above_4g": 0}),
        (512 * KIB, 0, {"base": 512, "extended": 0, "above_16m": 0, "above_4g": 0}),
        (4 * GIB, 0, {"base": 640, "extended": 0xFFFF, "above_16m": 0xFF00, "above_4g": 0}),
    ],
)
def test_memory_size_registers(low: int, high: int, expected: dict[str, int]) -> None:
    fields = memory_fields(Cmos(low, high))
    assert {key: fields[key] for key in expected} == expected
    assert fields["extended_copy"] == fields["extended"]


def test_cpu_count_and_checksum() -> None:
    cmos = Cmos(64 * MIB, cpu_count=4)
    assert memory_fields(cmos)["cpus_minus_one"] == 3
    total = sum(cmos_read(cmos, index) for index in range(0x10, 0x2E))
    assert (cmos_read(cmos, 0x2E) << 8 | cmos_read(cmos, 0x2F)) == total
    assert total > 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Cmos(-1), "low_memory"),
        (lambda: Cmos(4 * GIB + 1), "low_memory"),
        (lambda: Cmos(MIB, -1), "high_memory"),
        (lambda: Cmos(MIB, cpu_count=0), "cpu_count"),
    ],
)
def test_bad_arguments_are_config_errors(make: Callable[[], Cmos], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_word_access_sets_index_and_data_like_the_isa_bus() -> None:
    cmos = Cmos(64 * MIB)
    cmos.write(INDEX_OFFSET, bytes([0x45, 0x99]))  # outw: 0x45 -> 0x70, 0x99 -> 0x71
    assert cmos_read(cmos, 0x45) == 0x99
    cmos.write(INDEX_OFFSET, b"\x45")
    assert cmos.read(INDEX_OFFSET, 2) == b"\xff\x99"
    assert cmos.read(DATA_OFFSET, 2) == b"\x99\xff"


def test_on_the_port_bus_at_0x70() -> None:
    bus = PioBus()
    cmos = Cmos(64 * MIB)
    bus.register(CMOS_PORT, CMOS_WINDOW_LENGTH, cmos)
    bus.write(0x70, bytes([0x80 | RTC_REG_D]))
    assert bus.read(0x71, 1) == bytes([REG_D_VALID_RAM])
    assert bus.device_errors == {}
