"""Defaults of :mod:`vmscope.initramfs` that ``vmscope initramfs --help`` shows.

A module of constants only, so that building the argument parser imports none of the archive
writer (gzip, and dataclasses, which alone costs ~10 ms of start-up: issue 15).
"""

from __future__ import annotations

from pathlib import Path

#: where ``--busybox`` without a path looks
DEFAULT_BUSYBOX = Path("/bin/busybox")
#: what the default /init prints once the kernel filesystems are mounted
READY_MARKER = "vmscope-initramfs: ready"
INSTALL_HINT = "apt-get install busybox-static"
