"""A real Linux bzImage for tests: Debian's cloud kernel, fetched once into a cache directory.

``debian_kernel()`` returns ``KernelLookup(path, reason)``: ``path`` is the extracted
``vmlinuz-*`` (with its ``System.map-*`` beside it; Debian's is a placeholder) or None, and
``reason`` says why not (for ``pytest.skip``). The cache directory is
``$VMSCOPE_CACHE_DIR/kernels`` or ``~/.cache/vmscope/kernels``. When no kernel is cached it
runs ``apt-get download`` for the versioned package linux-image-cloud-amd64 depends on and
unpacks it with ``dpkg-deb -x``; set VMSCOPE_NO_DOWNLOAD=1 to only use the cache. If apt has
no package lists and we are root, ``apt-get update`` is run once first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

META_PACKAGE = "linux-image-cloud-amd64"
COMMAND_TIMEOUT_S = 600


class KernelLookup(NamedTuple):
    path: Path | None
    reason: str


def kernel_cache_dir() -> Path:
    base = os.environ.get("VMSCOPE_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "vmscope"
    return root / "kernels"


def cached_kernel(cache_dir: Path | None = None) -> Path | None:
    """The newest-named vmlinuz-* already in the cache that has its System.map beside it."""
    directory = cache_dir or kernel_cache_dir()
    kernels = sorted(directory.glob("vmlinuz-*")) if directory.is_dir() else []
    kernels = [k for k in kernels if system_map_for(k).exists()]
    return kernels[-1] if kernels else None


def system_map_for(kernel: Path) -> Path:
    """Where the System.map of a cached ``vmlinuz-VERSION`` lives."""
    return kernel.with_name("System.map-" + kernel.name.removeprefix("vmlinuz-"))


def pvh_vmlinux(kernel: Path) -> KernelLookup:
    """The uncompressed vmlinux inside a bzImage (an ELF with the PVH note), cached beside it.

    Booting it through PVH skips the bzImage's decompressor, which is pure CPL0 code and
    takes minutes on a software-virtualization host. Needs the ``lz4`` tool for LZ4 kernels
    (Debian's cloud kernel); gzip and xz payloads are decompressed in Python.
    """
    import gzip
    import lzma
    import struct

    target = kernel.with_name("vmlinux-" + kernel.name.removeprefix("vmlinuz-"))
    if target.exists():
        return KernelLookup(target, "")
    data = kernel.read_bytes()
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    partial = target.with_name(f".{target.name}.partial")
    if payload[:4] == b"\x02\x21\x4c\x18":  # LZ4 legacy frame
        if shutil.which("lz4") is None:
            return KernelLookup(None, "the kernel is LZ4-compressed and lz4 is missing (apt-get install lz4)")
        packed = partial.with_suffix(".lz4")
        packed.write_bytes(payload)
        # lz4 exits 1 on the size word the kernel appends after the stream; the output is whole
        _run(["lz4", "-d", "-f", str(packed), str(partial)])
        packed.unlink()
    elif payload[:2] == b"\x1f\x8b":
        partial.write_bytes(gzip.decompress(payload))
    elif payload[:6] == b"\xfd7zXZ\x00":
        partial.write_bytes(lzma.decompress(payload))
    else:
        return KernelLookup(None, f"{kernel.name}: unsupported payload compression {payload[:4].hex()}")
    if not partial.exists() or partial.read_bytes()[:4] != b"\x7fELF":
        return KernelLookup(None, f"{kernel.name}: decompressing the payload gave no ELF vmlinux")
    partial.replace(target)
    return KernelLookup(target, "")


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )


def _versioned_package() -> tuple[str | None, str]:
    """The linux-image-<version>-cloud-amd64 package the meta package depends on."""
    result = _run(["apt-cache", "depends", META_PACKAGE])
    match = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", result.stdout)
    if result.returncode == 0 and match:
        return match.group(1), ""
    return None, (result.stderr.strip() or result.stdout.strip() or f"apt-cache knows no {META_PACKAGE}")


def debian_kernel(cache_dir: Path | None = None, *, download: bool | None = None) -> KernelLookup:
    """Find or fetch Debian's cloud bzImage (see the module docstring)."""
    directory = cache_dir or kernel_cache_dir()
    found = cached_kernel(directory)
    if found is not None:
        return KernelLookup(found, "")
    if download is None:
        download = os.environ.get("VMSCOPE_NO_DOWNLOAD", "") in ("", "0")
    if not download:
        return KernelLookup(None, f"no vmlinuz-* in {directory} and VMSCOPE_NO_DOWNLOAD is set")
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            return KernelLookup(None, f"no kernel in {directory} and no {tool} to download Debian's")
    try:
        package, problem = _versioned_package()
        if package is None and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"])
            package, problem = _versioned_package()
        if package is None:
            return KernelLookup(None, f"cannot resolve {META_PACKAGE} (run apt-get update?): {problem}")
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            work = Path(scratch)
            fetched = _run(["apt-get", "download", package], cwd=work)
            debs = list(work.glob("*.deb"))
            if fetched.returncode != 0 or not debs:
                return KernelLookup(None, f"apt-get download {package} failed: {fetched.stderr.strip()}")
            unpacked = _run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")])
            images = sorted((work / "root" / "boot").glob("vmlinuz-*"))
            if unpacked.returncode != 0 or not images:
                return KernelLookup(None, f"no /boot/vmlinuz-* in {debs[0].name}: {unpacked.stderr.strip()}")
            target = directory / images[-1].name
            maps = sorted((work / "root" / "boot").glob("System.map-*"))
            if maps:
                shutil.copyfile(maps[-1], system_map_for(target))
            partial = directory / f".{target.name}.partial"  # outside the vmlinuz-* glob
            shutil.copyfile(images[-1], partial)
            partial.replace(target)  # atomic, so a concurrent run never sees half a kernel
    except (OSError, subprocess.SubprocessError) as error:
        return KernelLookup(None, f"downloading Debian's kernel failed: {error}")
    return KernelLookup(target, "")
