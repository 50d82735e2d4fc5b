"""Which loader an image needs, and loading it: :func:`load_guest` (see :mod:`vmscope.loader`)."""


from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.arch.x86.e820 import E820Entry
from vmscope.errors import ConfigError, ImageFormatError
from vmscope.file_limits import MAX_IMAGE_BYTES, check_regular_file
from vmscope.loader.base import LoadedGuest
from vmscope.loader.elf import has_elf_magic, load_elf_image, read_elf_image
from vmscope.loader.flat import load_flat
from vmscope.loader.pvh import is_linux_elf, is_pvh_elf, load_pvh_image, pvh_entry_point
from vmscope.memory.guest_memory import GuestMemory

GuestKind = Literal["auto", "elf", "flat"]
GUEST_KINDS: tuple[GuestKind, ...] = ("auto", "elf", "flat")


def is_linux_kernel(path: Path) -> bool:
    """A Linux bzImage, or an ELF kernel that says it is Linux (PVH vmlinux)."""
    path = Path(path)
    if has_elf_magic(path):
        return is_linux_elf(read_elf_image(path))
    from vmscope.loader.bzimage import is_bzimage  # bzImage code only for images that are not ELF

    return is_bzimage(path)


def takes_cmdline(path: Path) -> bool:
    """A PVH ELF or a bzImage: the images that boot with a kernel command line."""
    if has_elf_magic(path):
        return is_pvh_elf(path)
    from vmscope.loader.bzimage import is_bzimage

    return is_bzimage(path)


def load_guest(
    memory: GuestMemory,
    path: Path,
    *,
    kind: GuestKind = "auto",
    cmdline: str = "",
    modules: Sequence[Path] = (),
    flat_address: int | None = None,
    flat_mode: CpuMode | None = None,
    flat_entry: int | None = None,
    rsdp_address: int = 0,
    extra_e820: Sequence[E820Entry] = (),
    decompress_on_host: bool = False,
) -> LoadedGuest:
    """Load ``path`` into ``memory``: a Linux bzImage through the boot protocol, PVH when the ELF
    carries the PVH note, plain ELF otherwise.

    ``kind="flat"`` (or ``"auto"`` on a non-ELF file with ``flat_address`` given) loads a flat
    binary at ``flat_address`` entered in ``flat_mode``. A command line and modules need a PVH
    kernel; passing them for another kind of image is a ConfigError rather than silently ignored.
    ``decompress_on_host``: see :func:`load_bzimage` (bzImage only).
    """
    if kind not in GUEST_KINDS:
        raise ConfigError(f"unknown guest image kind {kind!r}: expected one of {', '.join(GUEST_KINDS)}")
    path = Path(path)
    # every image is a regular file of bounded size (not /dev/zero, a FIFO or a directory)
    for image_file in (path, *modules):
        check_regular_file(
            str(image_file),
            MAX_IMAGE_BYTES,
            functools.partial(ImageFormatError, str(image_file)),
            "guest image",
        )
    is_elf = has_elf_magic(path)  # also turns a missing or unreadable file into ImageFormatError
    if kind == "flat" or (kind == "auto" and not is_elf and flat_address is not None):
        if flat_address is None or flat_mode is None:
            raise ConfigError("a flat image needs a load address and a CPU mode (real, protected or long)")
        _refuse_boot_arguments(path, "a flat binary", cmdline, modules)
        return load_flat(memory, path, flat_address, flat_mode, flat_entry)
    if not is_elf:
        from vmscope.loader.bzimage import is_bzimage, load_bzimage  # only for images that are not ELF

        if is_bzimage(path):
            if len(modules) > 1:
                raise ConfigError(f"{path}: a bzImage takes one initrd, not {len(modules)} modules")
            initrd = modules[0] if modules else None
            return load_bzimage(
                memory, path, cmdline, initrd, rsdp_address, extra_e820, decompress_on_host=decompress_on_host
            )
        with open(path, "rb") as stream:
            magic = stream.read(4)
        raise ImageFormatError(
            str(path), f"not an ELF file (starts with {magic!r}); to boot a flat binary give a load address"
        )
    image = read_elf_image(path)
    if pvh_entry_point(image) is not None:
        return load_pvh_image(memory, image, cmdline, modules, rsdp_address, extra_e820)
    _refuse_boot_arguments(path, f"a plain ELF{image.elf_class} without the PVH note", cmdline, modules)
    return load_elf_image(memory, image)


def _refuse_boot_arguments(path: Path, what: str, cmdline: str, modules: Sequence[Path]) -> None:
    if cmdline:
        raise ConfigError(f"{path} is {what}: a kernel command line needs a PVH kernel")
    if modules:
        raise ConfigError(f"{path} is {what}: modules (initrd) need a PVH kernel")
