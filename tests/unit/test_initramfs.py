"""The newc initramfs writer: archive parsed back, entries, modes, links, device nodes, CLI."""

from __future__ import annotations

import argparse
import gzip
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tests.unit.rigs.newc import Member, read_newc
from vmscope import initramfs
from vmscope.cli import initramfs as cli_initramfs
from vmscope.errors import ConfigError


def fake_elf(path: Path, interpreter: str | None = None) -> Path:
    """A minimal x86-64 ELF executable; with ``interpreter`` it has a PT_INTERP (dynamic)."""
    phdrs = []
    interp = (interpreter.encode() + b"\0") if interpreter else b""
    header_size, phdr_size = 64, 56
    count = 2 if interpreter else 1
    interp_offset = header_size + phdr_size * count
    if interpreter:
        phdrs.append(struct.pack("<IIQQQQQQ", 3, 4, interp_offset, 0, 0, len(interp), len(interp), 1))
    phdrs.append(struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, 0x200, 0x200, 0x1000))
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,
        62,
        1,
        0x400000 + 0x100,
        header_size,
        0,
        0,
        header_size,
        phdr_size,
        count,
        64,
        0,
        0,
    )
    body = header + b"".join(phdrs) + interp
    path.write_bytes(body + bytes(0x200 - len(body)))
    return path


@pytest.fixture
def static_busybox(tmp_path: Path) -> Path:
    return fake_elf(tmp_path / "busybox")


def build(tmp_path: Path, **options: object) -> tuple[Path, list[Member]]:
    out = tmp_path / "out.cpio.gz"
    initramfs.build_initramfs(out, **options)  # type: ignore[arg-type]
    return out, read_newc(gzip.decompress(out.read_bytes()))


def by_name(members: list[Member]) -> dict[str, Member]:
    return {m.name: m for m in members}


def test_default_archive_layout(tmp_path: Path, static_busybox: Path) -> None:
    _, members = build(tmp_path, busybox=static_busybox, init_script=None)
    entries = by_name(members)
    for directory in ("bin", "sbin", "dev", "proc", "sys", "etc", "tmp", "root"):
        assert stat.S_ISDIR(entries[directory].mode), directory
    console, null = entries["dev/console"], entries["dev/null"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    assert stat.S_ISCHR(null.mode) and null.rdev == (1, 3)
    assert stat.S_IMODE(null.mode) == 0o666
    busybox = entries["bin/busybox"]
    assert stat.S_ISREG(busybox.mode) and stat.S_IMODE(busybox.mode) == 0o755
    assert busybox.data == static_busybox.read_bytes()
    for applet in ("sh", "ls", "cat", "echo", "mount"):
        link = entries[f"bin/{applet}"]
        assert stat.S_ISLNK(link.mode) and link.data == b"busybox"
    assert entries["sbin/poweroff"].data == b"../bin/busybox"
    init = entries["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    script = init.data.decode()
    assert script.startswith("#!/bin/sh\n")
    assert initramfs.READY_MARKER in script
    for mount in ("-t proc", "-t sysfs", "-t devtmpfs"):
        assert mount in script


def test_entries_are_deterministic_and_owned_by_root(tmp_path: Path, static_busybox: Path) -> None:
    first, members = build(tmp_path, busybox=static_busybox, init_script=None)
    data = first.read_bytes()
    second = tmp_path / "again.cpio.gz"
    initramfs.build_initramfs(second, busybox=static_busybox, init_script=None)
    assert second.read_bytes() == data
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    inodes = [m.ino for m in members]
    assert inodes == list(range(1, len(members) + 1))
    assert data[4:8] == bytes(4)  # gzip MTIME field


def test_parents_precede_children(tmp_path: Path, static_busybox: Path) -> None:
    source = tmp_path / "tree"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "leaf.txt").write_text("leaf")
    _, members = build(
        tmp_path, busybox=static_busybox, init_script=None, additions=[(source, "/usr/share/tree")]
    )
    seen: set[str] = set()
    for member in members:
        parent = member.name.rpartition("/")[0]
        assert not parent or parent in seen, f"{member.name} before {parent}"
        seen.add(member.name)
    entries = by_name(members)
    assert stat.S_ISDIR(entries["usr"].mode) and stat.S_ISDIR(entries["usr/share/tree/sub"].mode)
    assert entries["usr/share/tree/sub/leaf.txt"].data == b"leaf"


def test_additions_keep_the_executable_bit_and_may_replace_init(tmp_path: Path) -> None:
    tool = tmp_path / "tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    config = tmp_path / "config"
    config.write_text("x=1\n")
    config.chmod(0o600)
    my_init = tmp_path / "my-init"
    my_init.write_text("#!/bin/tool\n")
    _, members = build(
        tmp_path,
        busybox=None,
        init_script="#!/bin/sh\necho ignored\n",
        additions=[(tool, "/bin/tool"), (config, "/etc/config"), (my_init, "/init")],
    )
    entries = by_name(members)
    assert stat.S_IMODE(entries["bin/tool"].mode) == 0o755
    assert stat.S_IMODE(entries["etc/config"].mode) == 0o644
    assert entries["init"].data == b"#!/bin/tool\n"
    assert "bin/busybox" not in entries


def test_custom_init_script(tmp_path: Path, static_busybox: Path) -> None:
    _, members = build(tmp_path, busybox=static_busybox, init_script="#!/bin/sh\necho custom\n")
    assert by_name(members)["init"].data == b"#!/bin/sh\necho custom\n"


def test_no_init_at_all_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no /init"):
        initramfs.build_initramfs(tmp_path / "x.cpio.gz", busybox=None, init_script=None)


def test_dynamic_busybox_is_refused_with_the_install_hint(tmp_path: Path) -> None:
    dynamic = fake_elf(tmp_path / "busybox", interpreter="/lib64/ld-linux-x86-64.so.2")
    with pytest.raises(
        ConfigError, match=r"dynamically linked \(needs /lib64/ld-linux-x86-64.so.2\).*busybox-static"
    ):
        initramfs.build_initramfs(tmp_path / "x.cpio.gz", busybox=dynamic, init_script=None)


def test_missing_or_non_elf_busybox_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"busybox not found .*apt-get install busybox-static"):
        initramfs.build_initramfs(tmp_path / "x.cpio.gz", busybox=tmp_path / "absent", init_script=None)
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    with pytest.raises(ConfigError, match="not a readable ELF executable"):
        initramfs.build_initramfs(tmp_path / "x.cpio.gz", busybox=text, init_script=None)


def test_bad_destinations_and_conflicts_are_refused(tmp_path: Path, static_busybox: Path) -> None:
    source = tmp_path / "f"
    source.write_text("f")
    with pytest.raises(ConfigError, match="must be a path like"):
        initramfs.build_initramfs(
            tmp_path / "x", busybox=static_busybox, init_script=None, additions=[(source, "/../etc/f")]
        )
    with pytest.raises(ConfigError, match="both a directory and a file"):
        initramfs.build_initramfs(
            tmp_path / "x", busybox=static_busybox, init_script=None, additions=[(source, "/bin")]
        )
    with pytest.raises(ConfigError, match="cannot read"):
        initramfs.build_initramfs(
            tmp_path / "x", busybox=static_busybox, init_script=None, additions=[(tmp_path / "absent", "/x")]
        )


GZIP = shutil.which("gzip")
CPIO = shutil.which("cpio")


@pytest.mark.skipif(GZIP is None, reason="gzip not installed")
def test_gzip_t_accepts_the_archive(tmp_path: Path, static_busybox: Path) -> None:
    assert GZIP is not None
    out, _ = build(tmp_path, busybox=static_busybox, init_script=None)
    subprocess.run([GZIP, "-t", str(out)], check=True)


@pytest.mark.skipif(CPIO is None, reason="cpio not installed (apt-get install cpio)")
def test_cpio_lists_the_same_entries(tmp_path: Path, static_busybox: Path) -> None:
    assert CPIO is not None
    out, members = build(tmp_path, busybox=static_busybox, init_script=None)
    listing = subprocess.run(
        [CPIO, "-it", "--quiet"], input=gzip.decompress(out.read_bytes()), capture_output=True, check=True
    )
    assert listing.stdout.decode().split() == [m.name for m in members]


REAL_BUSYBOX = Path("/bin/busybox")


def test_real_static_busybox_when_installed(tmp_path: Path) -> None:
    try:
        initramfs.check_static_busybox(REAL_BUSYBOX)
    except ConfigError as error:
        pytest.skip(f"no static busybox on this host: {error}")
    _, members = build(tmp_path, busybox=REAL_BUSYBOX, init_script=None)
    assert by_name(members)["bin/busybox"].data == REAL_BUSYBOX.read_bytes()


# -- CLI ---------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmscope")
    cli_initramfs.register(parser.add_subparsers())
    return parser


def test_cli_builds_an_archive(
    tmp_path: Path, static_busybox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "init.sh"
    script.write_text("#!/bin/sh\necho from-cli\n")
    extra = tmp_path / "extra.txt"
    extra.write_text("extra")
    out = tmp_path / "cli.cpio.gz"
    args = make_parser().parse_args(
        ["initramfs", "-o", str(out), "--busybox", str(static_busybox), "--init", str(script),
         "--add", f"{extra}:/etc/extra.txt"]
    )  # fmt: skip
    assert args.func(args) == 0
    entries = by_name(read_newc(gzip.decompress(out.read_bytes())))
    assert entries["init"].data == b"#!/bin/sh\necho from-cli\n"
    assert entries["etc/extra.txt"].data == b"extra"
    assert "bin/busybox" in entries
    assert str(out) in capsys.readouterr().out


def test_cli_busybox_flag_without_path_uses_bin_busybox() -> None:
    args = make_parser().parse_args(["initramfs", "-o", "x", "--busybox"])
    assert args.busybox == initramfs.DEFAULT_BUSYBOX
    assert make_parser().parse_args(["initramfs", "-o", "x"]).busybox is None


def test_cli_rejects_a_malformed_add(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        make_parser().parse_args(["initramfs", "-o", "x", "--add", "nodest"])
    assert "expected SRC:/DEST" in capsys.readouterr().err


def test_cli_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        make_parser().parse_args(["initramfs", "--help"])
    assert "vmscope initramfs -o initrd.cpio.gz --busybox" in capsys.readouterr().out


def test_uncompressed_archive_holds_the_same_entries(tmp_path: Path, static_busybox: Path) -> None:
    packed, members = build(tmp_path, busybox=static_busybox, init_script=None)
    plain = tmp_path / "plain.cpio"
    info = initramfs.build_initramfs(plain, busybox=static_busybox, init_script=None, compress=False)
    assert plain.read_bytes() == gzip.decompress(packed.read_bytes())
    assert plain.read_bytes()[:6] == b"070701" and info.size == plain.stat().st_size
    assert [m.name for m in read_newc(plain.read_bytes())] == [m.name for m in members]


def test_cli_no_compress_option(tmp_path: Path, static_busybox: Path) -> None:
    out = tmp_path / "initrd.cpio"
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    cli_initramfs.register(subparsers)
    args = parser.parse_args(["initramfs", "-o", str(out), "--busybox", str(static_busybox), "--no-compress"])
    assert args.func(args) == 0
    assert out.read_bytes()[:6] == b"070701"
