"""Devices that record activity are found by protocol, not by attribute name or port."""

from __future__ import annotations

from pathlib import Path

from vmscope.devices.base import RecordingMachineControl
from vmscope.devices.debug_exit import DebugExit
from vmscope.devices.port80 import Port80
from vmscope.devices.traces import MarkerSource, RequestTraceSource
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.block import VirtioBlock
from vmscope.virtio.rng import VirtioRng


def test_port80_is_a_marker_source_with_post_code_labels() -> None:
    stamps = iter([100, 200])
    port = Port80(clock_ns=lambda: next(stamps))
    port.write(0, b"\x2a")
    port.write(0, b"\x00\x01")
    assert isinstance(port, MarkerSource) and port.marker_track == "port80"
    assert port.markers() == [(100, "POST 0x2a"), (200, "POST 0x100")]
    assert not isinstance(DebugExit(RecordingMachineControl()), MarkerSource)


def test_virtio_block_is_a_request_trace_source_and_rng_is_not(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    memory = GuestMemory.for_size(16 << 20)
    try:
        disk = VirtioBlock(memory, image)
        assert isinstance(disk, RequestTraceSource) and disk.traces() == []
        assert not isinstance(VirtioRng(memory), RequestTraceSource)
        disk.close()
    finally:
        memory.close()
