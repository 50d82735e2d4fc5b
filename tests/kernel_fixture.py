"""A real Linux bzImage for tests: Debian's cloud kernel, fetched once into a cache directory.

``debian_kernel()`` returns ``KernelLookup(path, reason)``: ``path`` is the extracted
``vmlinuz-*`` (with its ``System.map-*`` beside it; Debian's is a placeholder) or None, and
``reason`` says why not (for ``pytest.skip``). The cache directory is
``$VMSCOPE_CACHE_DIR/kernels`` or ``~/.cache/vmscope/kernels``. When no kernel is cached it
runs ``apt-get download`` for the versioned package linux-image-cloud-amd64 depends on and
unpacks it with ``dpkg-deb -x``; set VMSCOPE_NO_DOWNLOAD=1 to only use the cache. If apt has
no package lists and we are root, ``apt-get update`` is run once first.

Loadable modules: ``kernel_modules(kernel)`` returns the kernel's ``/lib/modules/VERSION`` tree,
cached as ``modules-VERSION`` beside it (with ``config-VERSION``), taken from the same package
(fetched again if the kernel was cached before modules were kept). Debian's package ships no
modules.dep (depmod writes it at install time), so one is written here in depmod's format from
each module's own ``.modinfo`` ``depends=`` list. ``module_closure(modules_dir, names)`` gives
the files to load for ``names`` in load order (built-in names give nothing), and
``loadable_modules(paths, work_dir)`` turns them into initramfs additions, decompressing
``.ko.xz``/``.ko.gz`` (busybox insmod loads only plain ``.ko``).
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

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


def kernel_version(kernel: Path) -> str:
    """``6.1.0-56-cloud-amd64`` for ``vmlinuz-6.1.0-56-cloud-amd64`` (or ``vmlinux-...``)."""
    for prefix in ("vmlinuz-", "vmlinux-"):
        if kernel.name.startswith(prefix):
            return kernel.name.removeprefix(prefix)
    raise ValueError(f"{kernel.name}: expected a vmlinuz-VERSION or vmlinux-VERSION file name")


def modules_dir_for(kernel: Path) -> Path:
    """Where the cached ``/lib/modules/VERSION`` tree of a cached kernel lives."""
    return kernel.with_name("modules-" + kernel_version(kernel))


def config_for(kernel: Path) -> Path:
    """Where the cached ``/boot/config-VERSION`` of a cached kernel lives."""
    return kernel.with_name("config-" + kernel_version(kernel))


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
            try:
                _keep_modules(work / "root", target)
            except (OSError, ValueError, LookupError):
                pass  # a kernel without modules is still usable; kernel_modules() says why later
            partial = directory / f".{target.name}.partial"  # outside the vmlinuz-* glob
            shutil.copyfile(images[-1], partial)
            partial.replace(target)  # atomic, so a concurrent run never sees half a kernel
    except (OSError, subprocess.SubprocessError) as error:
        return KernelLookup(None, f"downloading Debian's kernel failed: {error}")
    return KernelLookup(target, "")


# --- loadable modules --------------------------------------------------------------------------

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")


def module_name(path: str | Path) -> str:
    """The kernel's name for a module file: ``kernel/.../crc32c-intel.ko.xz`` -> ``crc32c_intel``."""
    name = Path(path).name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            break
    return name.replace("-", "_")


def module_bytes(path: Path) -> bytes:
    """The plain ELF object in a ``.ko``, ``.ko.xz`` or ``.ko.gz`` file."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    return data


def module_info(path: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a module: key -> values (``alias`` repeats)."""
    try:
        section = ELFFile(io.BytesIO(module_bytes(path))).get_section_by_name(".modinfo")
    except (ELFError, lzma.LZMAError, OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable kernel module ({error})") from None
    if section is None:
        raise ValueError(f"{path}: no .modinfo section, so not a kernel module")
    info: dict[str, list[str]] = {}
    for item in section.data().split(b"\0"):
        key, equals, value = item.decode(errors="replace").partition("=")
        if equals:
            info.setdefault(key, []).append(value)
    return info


def module_files(modules_dir: Path) -> dict[str, str]:
    """Module name -> path relative to ``modules_dir`` for every module file under ``kernel/``."""
    files: dict[str, str] = {}
    for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
        if path.name.endswith(MODULE_SUFFIXES):
            files.setdefault(module_name(path), path.relative_to(modules_dir).as_posix())
    return files


def write_modules_dep(modules_dir: Path) -> Path:
    """Write ``modules.dep`` from each module's ``depends=``, in depmod's format and order.

    Each line is ``kernel/x.ko: DEP...`` where DEP lists all direct and indirect dependencies,
    the one to load last first (depmod's order; modprobe loads the list from its end).
    """
    files = module_files(modules_dir)
    direct: dict[str, list[str]] = {}
    for name, relative in files.items():
        depends = module_info(modules_dir / relative).get("depends", [""])[0]
        direct[name] = [d.replace("-", "_") for d in depends.split(",") if d]
    lines = []
    for name, relative in files.items():
        order = _load_order([name], lambda n: direct.get(n), lambda n: False)
        dependencies = [files[n] for n in reversed(order) if n != name]
        lines.append(f"{relative}: {' '.join(dependencies)}".rstrip(" ") + "\n")
    target = modules_dir / "modules.dep"
    target.write_text("".join(lines))
    return target


def read_modules_dep(modules_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """modules.dep as module name -> (its path, the module names it depends on)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for number, line in enumerate((modules_dir / "modules.dep").read_text().splitlines(), 1):
        if not line.strip():
            continue
        path, colon, rest = line.partition(":")
        if not colon or not path.strip():
            raise ValueError(f"{modules_dir / 'modules.dep'}:{number}: expected 'PATH: DEPS', got {line!r}")
        entries[module_name(path.strip())] = (path.strip(), [module_name(d) for d in rest.split()])
    return entries


def builtin_modules(modules_dir: Path) -> set[str]:
    """Names of the modules compiled into the kernel (modules.builtin; empty if absent)."""
    listing = modules_dir / "modules.builtin"
    if not listing.exists():
        return set()
    return {module_name(line.strip()) for line in listing.read_text().splitlines() if line.strip()}


def module_closure(modules_dir: Path, names: list[str] | tuple[str, ...]) -> list[Path]:
    """The module files to load for ``names``, every dependency before its dependents.

    Names may use ``-`` or ``_``. A built-in name contributes nothing; a name that is neither
    a module in modules.dep nor built in raises LookupError. Each file appears once.
    """
    modules_dir = Path(modules_dir)
    entries = read_modules_dep(modules_dir)
    builtin = builtin_modules(modules_dir)

    def dependencies(name: str) -> list[str] | None:
        entry = entries.get(name)
        return None if entry is None else entry[1]

    order = _load_order([n.replace("-", "_") for n in names], dependencies, lambda n: n in builtin)
    return [modules_dir / entries[name][0] for name in order]


def _load_order(
    names: list[str],
    dependencies: Callable[[str], list[str] | None],
    is_builtin: Callable[[str], bool],
) -> list[str]:
    """Depth-first post-order over ``dependencies``: dependencies first, each name once."""
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        deps = dependencies(name)
        if deps is None:
            if is_builtin(name):
                state[name] = "done"
                return
            wanted_by = f" (needed by {chain[-1]})" if chain else ""
            raise LookupError(f"no module {name!r} in modules.dep and not built in{wanted_by}")
        state[name] = "visiting"
        # modules.dep lists the last-to-load first; visit from its end so the order matches modprobe
        for dependency in reversed(deps):
            visit(dependency, (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in names:
        visit(name, ())
    return order


def loadable_modules(paths: list[Path], work_dir: Path) -> list[tuple[Path, str]]:
    """Initramfs additions ``(file, /lib/modules/NAME.ko)`` for ``paths``, in the same order.

    Compressed modules are decompressed into ``work_dir`` (busybox insmod cannot load them).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    additions: list[tuple[Path, str]] = []
    for path in paths:
        name = module_name(path)
        if path.name.endswith(".ko"):
            source = path
        else:
            source = work_dir / f"{name}.ko"
            source.write_bytes(module_bytes(path))
        additions.append((source, f"/lib/modules/{name}.ko"))
    return additions


def _keep_modules(root: Path, kernel: Path) -> bool:
    """Move ``root/lib/modules/VERSION`` (with a written modules.dep) and the config into the cache."""
    version = kernel_version(kernel)
    tree = root / "lib" / "modules" / version
    if not (tree / "modules.order").exists():
        return False
    config = root / "boot" / f"config-{version}"
    if config.exists():
        shutil.copyfile(config, config_for(kernel))
    if not (tree / "modules.dep").exists():
        write_modules_dep(tree)
    target = modules_dir_for(kernel)
    try:
        tree.rename(target)  # atomic: a concurrent run sees the whole tree or none
    except OSError:
        if not (target / "modules.dep").exists():
            raise
    return True


def kernel_modules(kernel: Path, *, download: bool | None = None) -> KernelLookup:
    """The ``/lib/modules/VERSION`` tree of a cached Debian kernel, fetched from its package if needed."""
    target = modules_dir_for(kernel)
    if (target / "modules.dep").exists():
        return KernelLookup(target, "")
    if download is None:
        download = os.environ.get("VMSCOPE_NO_DOWNLOAD", "") in ("", "0")
    if not download:
        return KernelLookup(None, f"no {target.name} in {kernel.parent} and VMSCOPE_NO_DOWNLOAD is set")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            return KernelLookup(None, f"no {target.name} in {kernel.parent} and no {tool} to download it")
    package = "linux-image-" + kernel_version(kernel)
    try:
        with tempfile.TemporaryDirectory(dir=kernel.parent) as scratch:
            work = Path(scratch)
            fetched = _run(["apt-get", "download", package], cwd=work)
            if fetched.returncode != 0 and os.geteuid() == 0:
                _run(["apt-get", "update", "-qq"])
                fetched = _run(["apt-get", "download", package], cwd=work)
            debs = list(work.glob("*.deb"))
            if fetched.returncode != 0 or not debs:
                return KernelLookup(None, f"apt-get download {package} failed: {fetched.stderr.strip()}")
            unpacked = _run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")])
            if unpacked.returncode != 0 or not _keep_modules(work / "root", kernel):
                return KernelLookup(None, f"no /lib/modules in {debs[0].name}: {unpacked.stderr.strip()}")
    except (OSError, ValueError, LookupError, subprocess.SubprocessError) as error:
        return KernelLookup(None, f"fetching the modules of {kernel.name} failed: {error}")
    return KernelLookup(target, "")
