"""Guest memory and guest page-table walking."""

from vmscope.memory.guest_memory import GuestMemory, parse_size
from vmscope.memory.paging import PagingMode, read_virtual, translate, write_virtual

__all__ = ["GuestMemory", "PagingMode", "parse_size", "read_virtual", "translate", "write_virtual"]
