"""The snapshot file format: a header line, then JSON sections each with its own CRC-32.

``SNAP/state``::

    VMSCOPE-SNAPSHOT\\n
    {"format": 2, "vmscope": "0.1.0",
     "sections": [{"name": "config", "length": 812, "crc32": 3735928559}, ...]}\\n   (one line)
    <section bytes, in header order, each a JSON document>

``SNAP/memory`` holds guest RAM, regions one after another, zero pages left as holes; its size
and the bytes that are data are recorded in the ``memory`` section. Reading checks the magic,
the format number, the vmscope version, every section's length and checksum, and raises a
:class:`SnapshotError` naming the first thing that differs.

The checksums find damage (a truncated copy, bit rot, a hand edit); like any unkeyed digest they
could not stop a forger, so CRC-32 does the job sha256 did in format 1, without importing
hashlib and OpenSSL into a restoring process (restore time, issue 12).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from vmscope import __version__
from vmscope.errors import SnapshotError

MAGIC = b"VMSCOPE-SNAPSHOT\n"
FORMAT_VERSION = 2
STATE_FILE = "state"
MEMORY_FILE = "memory"
#: every section a snapshot of this format has
SECTIONS = ("config", "memory", "vm", "vcpus", "devices")
_MAX_HEADER = 1 << 16


def state_path(snapshot: Path) -> Path:
    return snapshot / STATE_FILE


def memory_path(snapshot: Path) -> Path:
    return snapshot / MEMORY_FILE


def write_state(snapshot: Path, sections: dict[str, Any]) -> int:
    """Write ``SNAP/state`` (atomically: a reader never sees half a file); returns its size."""
    bodies = [(name, json.dumps(sections[name], separators=(",", ":")).encode()) for name in SECTIONS]
    header = {
        "format": FORMAT_VERSION,
        "vmscope": __version__,
        "sections": [
            {"name": name, "length": len(body), "crc32": zlib.crc32(body)}
            for name, body in bodies
        ],
    }
    data = MAGIC + json.dumps(header).encode() + b"\n" + b"".join(body for _, body in bodies)
    target = state_path(snapshot)
    temporary = target.with_name(target.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, target)
    return len(data)


def read_state(snapshot: Path) -> dict[str, Any]:
    """The sections of ``SNAP/state``, each checked; SnapshotError on any damage or mismatch."""
    path = state_path(snapshot)
    if not snapshot.is_dir():
        raise SnapshotError(
            f"{snapshot}: no such snapshot directory (make one with: vmscope ctl SOCKET snapshot)"
        )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SnapshotError(f"{path}: cannot read the snapshot state: {error.strerror}") from None
    if not data.startswith(MAGIC):
        raise SnapshotError(f"{path}: not a vmscope snapshot (bad magic)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    if end < 0:
        raise SnapshotError(f"{path}: truncated or corrupted header")
    try:
        header = json.loads(data[len(MAGIC) : end])
        format_version, version, entries = header["format"], header["vmscope"], header["sections"]
        layout = [(str(e["name"]), int(e["length"]), int(e["crc32"])) for e in entries]
    except (ValueError, KeyError, TypeError):
        raise SnapshotError(f"{path}: corrupted header") from None
    if format_version != FORMAT_VERSION:
        raise SnapshotError(
            f"{path}: snapshot format {format_version}, this vmscope reads format {FORMAT_VERSION}"
        )
    if version != __version__:
        raise SnapshotError(f"{path}: snapshot was made by vmscope {version}, this is vmscope {__version__}")
    names = [name for name, _, _ in layout]
    if names != list(SECTIONS):
        raise SnapshotError(f"{path}: sections {names}, expected {list(SECTIONS)}")
    offset = end + 1
    expected_size = offset + sum(length for _, length, _ in layout)
    if len(data) != expected_size:
        what = "truncated" if len(data) < expected_size else "has trailing bytes"
        raise SnapshotError(f"{path}: {what}: {len(data)} bytes, the header describes {expected_size}")
    sections: dict[str, Any] = {}
    for name, length, checksum in layout:
        body = data[offset : offset + length]
        offset += length
        if zlib.crc32(body) != checksum:
            raise SnapshotError(f"{path}: section '{name}' is corrupted (CRC-32 mismatch)")
        try:
            sections[name] = json.loads(body)
        except ValueError:
            raise SnapshotError(f"{path}: section '{name}' is not valid JSON") from None
    return sections
