"""Guest image loaders: each fills guest memory and returns a :class:`LoadedGuest`.

:func:`load_guest` picks the loader: an ELF with the PVH note boots through PVH, any other
x86 ELF as a plain executable, and a flat binary when asked for (or when the file is not ELF
and a load address was given).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.lazy_exports import lazy_exports

# Imported on first use: a restored machine needs LoadedGuest but no loader (start-up, issue 15).
if TYPE_CHECKING:
    from vmscope.loader.base import LoadedGuest, LoadedSegment
    from vmscope.loader.dispatch import GUEST_KINDS, GuestKind, is_linux_kernel, load_guest
    from vmscope.loader.elf import load_elf
    from vmscope.loader.flat import load_flat
    from vmscope.loader.pvh import is_pvh_elf, load_pvh

__all__ = [
    "GUEST_KINDS",
    "GuestKind",
    "LoadedGuest",
    "LoadedSegment",
    "is_linux_kernel",
    "is_pvh_elf",
    "load_elf",
    "load_flat",
    "load_guest",
    "load_pvh",
]

EXPORTS = {
    "GUEST_KINDS": ".dispatch",
    "GuestKind": ".dispatch",
    "is_linux_kernel": ".dispatch",
    "load_guest": ".dispatch",
    "LoadedGuest": ".base",
    "LoadedSegment": ".base",
    "load_elf": ".elf",
    "load_flat": ".flat",
    "is_pvh_elf": ".pvh",
    "load_pvh": ".pvh",
}

__getattr__ = lazy_exports(__name__, EXPORTS)
