"""Guest memory and guest page-table walking."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from vmscope.memory.guest_memory import GuestMemory, parse_size
    from vmscope.memory.paging import PagingMode, read_virtual, translate, write_virtual

__all__ = ["GuestMemory", "PagingMode", "parse_size", "read_virtual", "translate", "write_virtual"]

# imported on first use: most users of guest memory never walk page tables
EXPORTS = {
    "GuestMemory": ".guest_memory",
    "parse_size": ".guest_memory",
    "PagingMode": ".paging",
    "read_virtual": ".paging",
    "translate": ".paging",
    "write_virtual": ".paging",
}

__getattr__ = lazy_exports(__name__, EXPORTS)
