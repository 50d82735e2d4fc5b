"""Reading newc cpio archives back, to check what the initramfs writer produced."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def read_newc(archive: bytes) -> list[Member]:
    """An independent newc reader: checks magic, field syntax and 4-byte alignment."""
    members: list[Member] = []
    pos = 0
    while True:
        assert pos % 4 == 0
        assert archive[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, filesize, _, _, rmajor, rminor, namesize, check = fields
        assert check == 0
        name_start = pos + 110
        name = archive[name_start : name_start + namesize]
        assert name.endswith(b"\0") and b"\0" not in name[:-1]
        data_start = (name_start + namesize + 3) // 4 * 4
        assert archive[name_start + namesize : data_start] == bytes(data_start - name_start - namesize)
        data = archive[data_start : data_start + filesize]
        pos = (data_start + filesize + 3) // 4 * 4
        decoded = name[:-1].decode()
        if decoded == "TRAILER!!!":
            assert archive[pos:] == bytes(len(archive) - pos)
            return members
        members.append(Member(decoded, ino, mode, uid, gid, nlink, mtime, (rmajor, rminor), data))
