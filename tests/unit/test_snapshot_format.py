"""Snapshot format and RAM file, without KVM: round trips and every refusal names what differs."""

from __future__ import annotations

from pathlib import Path

import pytest

import vmscope
from vmscope.errors import ConfigError, SnapshotError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.snapshot import format as snapshot_format
from vmscope.snapshot.memory_file import map_memory_file, write_memory_file
from vmscope.vmm.config import MachineConfig

SECTIONS = {
    "config": {"mem": 1 << 20},
    "memory": {"size": 1},
    "vm": {"pit2": "00"},
    "vcpus": [{"id": 0}],
    "devices": {"disks": [], "devices": []},
}


def test_state_round_trips(tmp_path: Path) -> None:
    snapshot_format.write_state(tmp_path, SECTIONS)
    assert snapshot_format.read_state(tmp_path) == SECTIONS


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-3], "truncated"),
        (lambda data: data + b"x", "has trailing bytes"),
        (lambda data: data[:-2] + bytes([data[-2] ^ 1]) + data[-1:], "section 'devices' is corrupted"),
        (lambda data: b"NOT-A-SNAPSHOT\n" + data, "not a vmscope snapshot"),
        (
            lambda data: data.replace(b'"format": 2', b'"format": 9'),
            "snapshot format 9, this vmscope reads format 2",
        ),
        (
            lambda data: data.replace(vmscope.__version__.encode(), b"9.9.9", 1),
            f"made by vmscope 9.9.9, this is vmscope {vmscope.__version__}",
        ),
    ],
)
def test_damaged_state_is_refused_naming_the_difference(tmp_path: Path, damage: object, message: str) -> None:
    snapshot_format.write_state(tmp_path, SECTIONS)
    path = snapshot_format.state_path(tmp_path)
    assert callable(damage)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotError, match=message.replace("(", r"\(").replace(")", r"\)")):
        snapshot_format.read_state(tmp_path)


def test_ram_file_is_sparse_and_maps_back_privately(tmp_path: Path) -> None:
    memory = GuestMemory.for_size(8 << 20)
    memory.write(0x1000, b"first page")
    memory.write(0x5F_F000, b"\xff" * 8192)  # two pages across a 2 MiB chunk boundary
    path = tmp_path / "memory"
    section = write_memory_file(memory, path)
    assert section["size"] == path.stat().st_size == 8 << 20
    assert section["data_bytes"] == 3 * 4096
    assert path.stat().st_blocks * 512 <= 64 << 10  # holes where RAM was zero
    restored = map_memory_file(path, section)
    assert restored.read(0x1000, 10) == b"first page"
    assert restored.read(0x5F_F000, 8192) == b"\xff" * 8192
    assert restored.read(0x40_0000, 16) == bytes(16)
    restored.write(0x1000, b"changed")  # copy-on-write: the snapshot stays as it was
    assert path.read_bytes()[0x1000:0x100A] == b"first page"
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(SnapshotError, match="RAM file is 4096 bytes, the snapshot recorded 8388608"):
        map_memory_file(path, section)


def test_machine_config_round_trips_and_rejects_unknown_fields() -> None:
    config = MachineConfig(mem=256 << 20, cpus=2, disks=("a.img,readonly",), console="file:/tmp/x")
    assert MachineConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="unknown field"):
        MachineConfig.from_json({**config.to_json(), "gpu": True})
