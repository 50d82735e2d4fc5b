"""A guest writing to a disk whose host filesystem is full gets VIRTIO_BLK_S_IOERR and exits on its
own terms; the VMM neither crashes nor stops (a real 256 KiB tmpfs, root only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmscope.guest.build import build_runtime_guest

GUEST_SRC = Path(__file__).parent / "guest_src" / "virtio_driver.c"
SRC = str(Path(__file__).resolve().parents[2] / "src")
STATUS_IO_ERROR = 35  # debug_exit(0x11): a request completed with a non-OK status

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def test_a_guest_on_a_full_host_filesystem_sees_ioerr(small_tmpfs: Path) -> None:
    guest = build_runtime_guest("virtio-driver", [GUEST_SRC], cflags=("-Wextra", "-Werror"))
    image = small_tmpfs / "disk.img"
    with open(image, "wb") as stream:
        stream.truncate(4 << 20)  # 4 MiB of sparse disk on 256 KiB of filesystem
    result = subprocess.run(
        [sys.executable, "-m", "vmscope", "-v", "run", "--elf", str(guest), "--mem", "64M",
         "--cmdline", "mode=blk blocks=128 irq=1", "--disk", str(image)],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == STATUS_IO_ERROR, result.stdout + result.stderr
    assert "failed: status 1 (IOERR)" in result.stdout
    assert "No space left on device" in result.stderr or "short transfer" in result.stderr
    assert "the guest gets VIRTIO_BLK_S_IOERR" in result.stderr
    assert "Traceback" not in result.stderr
