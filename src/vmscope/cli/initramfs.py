"""``vmscope initramfs``: build a gzip-compressed newc initramfs with busybox and an /init."""

from __future__ import annotations

import argparse
from pathlib import Path

from vmscope.errors import ConfigError
from vmscope.initramfs_defaults import DEFAULT_BUSYBOX, INSTALL_HINT, READY_MARKER

EPILOG = f"""\
examples:
  vmscope initramfs -o initrd.cpio.gz --busybox
  vmscope initramfs -o initrd.cpio.gz --busybox --init my-init.sh --add ./tool:/bin/tool

The default /init mounts /proc, /sys and /dev, prints "{READY_MARKER}" and runs a shell on
the console (powering off when it exits). --busybox needs a static busybox ({INSTALL_HINT}).
"""


def _parse_addition(text: str) -> tuple[Path, str]:
    source, separator, destination = text.rpartition(":")
    if not separator or not source or not destination.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected SRC:/DEST (e.g. ./tool:/bin/tool), got {text!r}")
    return Path(source), destination


def handle(args: argparse.Namespace) -> int:
    from vmscope.initramfs import build_initramfs  # not for --help: start-up time, issue 15

    init_script = None
    if args.init is not None:
        try:
            init_script = Path(args.init).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read --init script {args.init}: {error}") from None
    info = build_initramfs(
        Path(args.output), busybox=args.busybox, init_script=init_script, additions=args.add,
        compress=not args.no_compress,
    )  # fmt: skip
    print(f"wrote {info.path}: {len(info.entries)} entries, {info.size} bytes")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "initramfs",
        help="build an initramfs (newc cpio, gzip unless --no-compress) with busybox and an /init script",
        description="Build a newc cpio initramfs for booting Linux under vmscope.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="archive to write (e.g. initrd.cpio.gz)"
    )
    parser.add_argument(
        "--busybox",
        nargs="?",
        type=Path,
        const=DEFAULT_BUSYBOX,
        default=None,
        metavar="PATH",
        help=f"install a static busybox and its applet links (default PATH: {DEFAULT_BUSYBOX})",
    )
    parser.add_argument(
        "--init", metavar="SCRIPT", help="use this file as /init instead of the default script"
    )
    parser.add_argument(
        "--add",
        action="append",
        type=_parse_addition,
        default=[],
        metavar="SRC:DST",
        help="add a host file or directory at DST in the archive (repeatable)",
    )
    parser.add_argument(
        "--no-compress",
        action="store_true",
        help="write the archive uncompressed: the kernel then only copies it, which on kvm_pvm hosts "
        "(kernel code emulated) saves minutes of inflating",
    )
    parser.set_defaults(func=handle)
