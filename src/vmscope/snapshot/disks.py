"""Which disk image a snapshot was taken with: size plus a hash of its first and last MiB.

Content, not inode or mtime: a copy of the image restores, while an image the guest (or
anyone) changed near its start or end since the snapshot, or one of another size, does not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vmscope.errors import SnapshotError

_EDGE = 1 << 20


def disk_identity(path: Path) -> dict[str, Any]:
    import hashlib  # only for machines with disks: restore time (issue 12)

    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        digest = hashlib.sha256(file.read(_EDGE))
        if size > _EDGE:
            file.seek(max(_EDGE, size - _EDGE))
            digest.update(file.read(_EDGE))
    return {"path": str(path), "size": size, "edges_sha256": digest.hexdigest()}


def check_disk(path: Path, recorded: dict[str, Any]) -> None:
    """SnapshotError naming the difference when ``path`` is not the image the snapshot recorded."""
    try:
        found = disk_identity(path)
    except OSError as error:
        raise SnapshotError(f"disk {path}: cannot read it: {error.strerror}") from None
    if found["size"] != recorded.get("size"):
        raise SnapshotError(
            f"disk {path} is {found['size']} bytes, the snapshot was taken with {recorded.get('size')} "
            f"({recorded.get('path')})"
        )
    if found["edges_sha256"] != recorded.get("edges_sha256"):
        raise SnapshotError(
            f"disk {path} differs from the image the snapshot was taken with ({recorded.get('path')}): "
            "its first or last MiB changed"
        )
