"""The shared repr of the start path's plain record classes."""

from __future__ import annotations

from vmscope.vmm.machine import DeviceMapping, RunResult, UnclaimedCount


def test_plain_records_print_their_fields_in_declaration_order_as_a_dataclass_would() -> None:
    assert repr(RunResult(33, "debug exit", duration_s=1.5)) == (
        "RunResult(exit_status=33, reason='debug exit', crash=None, duration_s=1.5, emulated_instructions=0)"
    )
    assert repr(UnclaimedCount("pio", 0x510, 1, True, 7)) == (
        "UnclaimedCount(space='pio', address=1296, size=1, is_write=True, count=7)"
    )
    assert repr(DeviceMapping("mmio", 0xD000_0000, 0x200, None)) == (  # type: ignore[arg-type]
        "DeviceMapping(bus='mmio', base=3489660928, length=512, device=None, extra={})"
    )
