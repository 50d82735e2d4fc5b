"""Fixtures shared by the unit tests: 16 MiB of guest RAM and a buffer allocator in it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.rigs.virtqueue import RAM_SIZE, Arena
from vmscope.memory.guest_memory import GuestMemory


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory.for_size(RAM_SIZE)
    yield ram
    ram.close()


@pytest.fixture
def arena(memory: GuestMemory) -> Arena:
    return Arena(memory)
