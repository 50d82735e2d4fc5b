"""Build a Linux initramfs: a "newc" cpio archive, gzip-compressed or not, written in pure Python.

Uncompressed is the better choice where the guest kernel's code is emulated (kvm_pvm hosts):
the kernel then only copies the archive, where inflating a 1 MiB gzip archive took about 225 s
of a Debian kernel's boot there (measured with vmscope's profiler and console timestamps).

Everything is stored as archive entries, so no root privileges are needed for device nodes
or ownership. Output is deterministic: every mtime is 0, uid/gid are 0, inode numbers count
up from 1 in archive order, and the gzip header carries no name or timestamp.

Default layout: directories /bin /sbin /dev /proc /sys /etc /tmp /root, character devices
/dev/console (5:1) and /dev/null (1:3), /bin/busybox with symlinks for common applets (in /bin,
and /sbin for poweroff/reboot/halt), and an /init script that mounts proc, sysfs and devtmpfs,
prints ``READY_MARKER`` and runs a shell on the console, powering off when the shell exits.
"""

from __future__ import annotations

import gzip
import io
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vmscope.errors import ConfigError
from vmscope.file_limits import MAX_INITRAMFS_FILE_BYTES, read_bounded

# defined where the CLI's parser can read them without importing this module; re-exported here
from vmscope.initramfs_defaults import DEFAULT_BUSYBOX as DEFAULT_BUSYBOX
from vmscope.initramfs_defaults import INSTALL_HINT as INSTALL_HINT
from vmscope.initramfs_defaults import READY_MARKER as READY_MARKER

NEWC_MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"

DIRECTORIES = ("bin", "sbin", "dev", "proc", "sys", "etc", "tmp", "root")
#: (path, major, minor, permissions)
DEVICE_NODES = (("dev/console", 5, 1, 0o600), ("dev/null", 1, 3, 0o666))
BIN_APPLETS = (
    "sh", "ash", "cat", "chmod", "cp", "date", "df", "dmesg", "echo", "env", "false", "free", "grep",
    "head", "hostname", "kill", "ln", "ls", "mkdir", "mknod", "mount", "mv", "ps", "pwd", "rm",
    "rmdir", "sed", "setsid", "sleep", "stty", "sync", "tail", "test", "top", "true", "umount",
    "uname", "vi", "wc",
)  # fmt: skip
SBIN_APPLETS = ("poweroff", "reboot", "halt", "insmod", "modprobe", "mdev")

DEFAULT_INIT = f"""#!/bin/sh
# vmscope default init: mount the kernel filesystems, announce readiness, run a shell.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{READY_MARKER}"
/bin/sh </dev/console >/dev/console 2>&1
echo "vmscope-initramfs: shell exited, powering off"
poweroff -f
"""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``name`` is relative ("bin/sh"); ``data`` is a symlink's target."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def kind(self) -> str:
        if stat.S_ISDIR(self.mode):
            return "directory"
        if stat.S_ISLNK(self.mode):
            return "symlink"
        if stat.S_ISCHR(self.mode):
            return "char device"
        return "file"


@dataclass(frozen=True)
class InitramfsInfo:
    path: Path
    entries: tuple[str, ...]
    size: int


def directory(name: str, permissions: int = 0o755) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | permissions)


def regular_file(name: str, data: bytes, permissions: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | permissions, data)


def symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, permissions: int = 0o600) -> CpioEntry:
    return CpioEntry(name, stat.S_IFCHR | permissions, b"", major, minor)


def _pad4(length: int) -> bytes:
    return bytes(-length % 4)


def encode_newc(entries: Iterable[CpioEntry]) -> bytes:
    """The uncompressed newc archive for ``entries`` plus the trailer."""
    out = io.BytesIO()
    inode = 0
    for entry in [*entries, CpioEntry(TRAILER_NAME, 0)]:
        trailer = entry.name == TRAILER_NAME
        if not trailer:
            inode += 1
        name = entry.name.encode() + b"\0"
        fields = (
            0 if trailer else inode,
            entry.mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev_major,
            entry.rdev_minor,
            len(name),
            0,  # check (only used by the "crc" format)
        )
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        out.write(header + name + _pad4(len(header) + len(name)))
        out.write(entry.data + _pad4(len(entry.data)))
    return out.getvalue()


def gzip_deterministic(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as compressed:
        compressed.write(data)
    return out.getvalue()


def check_static_busybox(path: Path) -> None:
    """Raise ConfigError unless ``path`` is a statically linked ELF executable."""
    # pyelftools loads here, not with the module: `vmscope initramfs --help` needs none of it
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.segments import InterpSegment

    if not path.exists():
        raise ConfigError(f"busybox not found at {path}: {INSTALL_HINT}, or pass --busybox PATH")
    try:
        with path.open("rb") as binary:
            elf = ELFFile(binary)
            interpreter: str | None = None
            for segment in elf.iter_segments():
                if isinstance(segment, InterpSegment):
                    interpreter = str(segment.get_interp_name())
    except (ELFError, OSError) as error:
        raise ConfigError(f"{path} is not a readable ELF executable ({error}): {INSTALL_HINT}") from None
    if interpreter is not None:
        raise ConfigError(
            f"{path} is dynamically linked (needs {interpreter}), so it cannot run in an initramfs "
            f"without its libraries: {INSTALL_HINT} and use /bin/busybox from it"
        )


def _parent_directories(name: str) -> list[str]:
    parents = PurePosixPath(name).parents
    return [str(parent) for parent in reversed(parents) if str(parent) != "."]


def _archive_name(destination: str) -> str:
    """'/usr/bin/x' -> 'usr/bin/x'; refuses '..' and empty names."""
    parts = PurePosixPath(destination).parts
    relative = [p for p in parts if p != "/"]
    if not relative or any(p in ("..", ".") for p in relative):
        raise ConfigError(f"initramfs destination {destination!r} must be a path like /bin/tool")
    return "/".join(relative)


def _entries_for_addition(source: Path, destination: str) -> list[CpioEntry]:
    if source.is_symlink() and source.is_dir():
        source = source.resolve()
    if source.is_dir():
        entries = [directory(destination)]
        for child in sorted(source.iterdir()):
            child_name = f"{destination}/{child.name}"
            if child.is_symlink():
                entries.append(symlink(child_name, str(child.readlink())))
            else:
                entries.extend(_entries_for_addition(child, child_name))
        return entries
    data = read_bounded(
        str(source),
        MAX_INITRAMFS_FILE_BYTES,
        lambda problem: ConfigError(f"{source}: {problem}"),
        "initramfs file",
    )
    try:
        permissions = stat.S_IMODE(source.stat().st_mode)
    except OSError as error:
        raise ConfigError(f"cannot read {source} for the initramfs: {error.strerror}") from None
    return [regular_file(destination, data, 0o755 if permissions & 0o111 else 0o644)]


class _Archive:
    """Ordered entries keyed by name; a later entry replaces an earlier one of the same name."""

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    def add(self, entry: CpioEntry) -> None:
        for parent in _parent_directories(entry.name):
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = directory(parent)
            elif not stat.S_ISDIR(existing.mode):
                raise ConfigError(
                    f"initramfs path /{entry.name} needs /{parent} to be a directory, not a {existing.kind}"
                )
        existing = self._entries.get(entry.name)
        if existing is not None and stat.S_ISDIR(existing.mode) != stat.S_ISDIR(entry.mode):
            raise ConfigError(
                f"initramfs path /{entry.name} would be both a {existing.kind} and a {entry.kind}"
            )
        self._entries[entry.name] = entry

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entries(self) -> list[CpioEntry]:
        return list(self._entries.values())


def build_initramfs(
    out_path: Path,
    *,
    busybox: Path | None,
    init_script: str | None,
    additions: Sequence[tuple[Path, str]] = (),
    compress: bool = True,
) -> InitramfsInfo:
    """Write a newc initramfs to ``out_path`` (gzip-compressed unless ``compress`` is False).

    ``busybox``: a static busybox binary to install as /bin/busybox with applet symlinks, or
    None for none. ``init_script``: the text of /init (None: the default script, which needs
    busybox). ``additions``: (host source, archive destination) pairs, files or directories;
    they may replace generated entries (e.g. their own /init).
    """
    archive = _Archive()
    for name in DIRECTORIES:
        archive.add(directory(name, 0o1777 if name == "tmp" else 0o700 if name == "root" else 0o755))
    for name, major, minor, permissions in DEVICE_NODES:
        archive.add(char_device(name, major, minor, permissions))
    if busybox is not None:
        busybox = Path(busybox)
        check_static_busybox(busybox)
        archive.add(
            regular_file(
                "bin/busybox",
                read_bounded(
                    str(busybox),
                    MAX_INITRAMFS_FILE_BYTES,
                    lambda problem: ConfigError(f"{busybox}: {problem}"),
                    "busybox",
                ),
                0o755,
            )
        )
        for applet in BIN_APPLETS:
            archive.add(symlink(f"bin/{applet}", "busybox"))
        for applet in SBIN_APPLETS:
            archive.add(symlink(f"sbin/{applet}", "../bin/busybox"))
    addition_entries = [
        entry
        for source, destination in additions
        for entry in _entries_for_addition(Path(source), _archive_name(destination))
    ]
    if init_script is not None:
        archive.add(regular_file("init", init_script.encode(), 0o755))
    elif busybox is not None:
        archive.add(regular_file("init", DEFAULT_INIT.encode(), 0o755))
    for entry in addition_entries:
        archive.add(entry)
    if "init" not in archive:
        raise ConfigError(
            "the initramfs would have no /init: give --busybox for the default init, --init SCRIPT, "
            "or --add SRC:/init"
        )
    entries = archive.entries()
    data = encode_newc(entries)
    if compress:
        data = gzip_deterministic(data)
    out_path = Path(out_path)
    try:
        out_path.write_bytes(data)
    except OSError as error:
        raise ConfigError(f"cannot write {out_path}: {error.strerror}") from None
    return InitramfsInfo(out_path, tuple("/" + e.name for e in entries), len(data))
