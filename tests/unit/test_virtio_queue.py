"""Split virtqueues built by hand in GuestMemory, as a driver would lay them out.

The driver side (``Arena``, ``Ring``) lives in tests/unit/rigs/virtqueue.py, shared by every virtio
test module; the ``memory`` and ``arena`` fixtures are in tests/unit/conftest.py.
"""

from __future__ import annotations

import pytest

from tests.unit.rigs.virtqueue import OUTSIDE_RAM, RAM_SIZE, Arena, Ring
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
    gather,
    scatter,
    slice_buffers,
    vring_need_event,
)


def make_queue(
    memory: GuestMemory, ring: Ring, *, indirect: bool = False, event_idx: bool = False
) -> Virtqueue:
    queue = Virtqueue(memory, 0, ring.size)
    queue.desc_addr, queue.avail_addr, queue.used_addr = ring.desc, ring.avail, ring.used
    queue.indirect_enabled, queue.event_idx_enabled = indirect, event_idx
    queue.activate()
    return queue


# -- chains ---------------------------------------------------------------------------------------


def test_pop_returns_readable_and_writable_buffers_with_head(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    header, data, status = arena.put(b"h" * 16), arena.alloc(512), arena.alloc(1)
    head = ring.add_chain([(header, 16, False), (data, 512, True), (status, 1, True)])

    chain = queue.pop()

    assert chain == DescriptorChain(head, ((header, 16),), ((data, 512), (status, 1)), 3)
    assert (chain.readable_length, chain.writable_length) == (16, 513)
    assert queue.pop() is None


def recording_memory(order: list[int]) -> GuestMemory:
    """Guest RAM that appends the address of every write to ``order`` (to check store order)."""

    class Recording(GuestMemory):
        def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
            order.append(gpa)
            super().write(gpa, data)

        def write_u16(self, gpa: int, value: int) -> None:
            order.append(gpa)
            super().write_u16(gpa, value)

    return Recording.for_size(RAM_SIZE)


def test_push_used_writes_element_then_index(memory: GuestMemory, arena: Arena) -> None:
    order: list[int] = []

    recording = recording_memory(order)
    try:
        ring = Ring(recording, Arena(recording), 4)
        queue = make_queue(recording, ring)
        ring.add_chain([(arena.alloc(8), 8, True)])
        chain = queue.pop()
        assert chain is not None
        order.clear()
        queue.push_used(chain.head, 5)
        assert order == [ring.used + 4, ring.used + 2]
        assert ring.take_used() == [(chain.head, 5)]
    finally:
        recording.close()


def test_push_used_many_stores_every_element_before_one_index_update(arena: Arena) -> None:
    order: list[int] = []

    recording = recording_memory(order)
    try:
        ring = Ring(recording, Arena(recording), 4)
        queue = make_queue(recording, ring)
        heads = []
        for _ in range(3):
            ring.add_chain([(0x20_0000, 8, True)])
            chain = queue.pop()
            assert chain is not None
            heads.append(chain.head)
        queue.push_used_many([(heads[0], 1), (heads[1], 2)])
        assert ring.take_used() == [(heads[0], 1), (heads[1], 2)]
        queue.push_used(heads[2], 3)
        assert ring.take_used() == [(heads[2], 3)]
        for _ in range(3):  # used slots 3, 0, 1: the store wraps around the ring
            ring.add_chain([(0x20_0000, 8, True)])
            chain = queue.pop()
            assert chain is not None
            heads.append(chain.head)
        order.clear()
        queue.push_used_many([(heads[3], 4), (heads[4], 5), (heads[5], 6)])
        assert order == [ring.used + 4 + 8 * 3, ring.used + 4, ring.used + 2]
        assert ring.take_used() == [(heads[3], 4), (heads[4], 5), (heads[5], 6)]
        assert queue.unsignalled == 6
    finally:
        recording.close()


def test_avail_idx_is_read_once_per_batch(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    reads: list[int] = []
    read_avail_idx = queue._read_avail_idx

    def counting() -> int:
        value = read_avail_idx()
        reads.append(value)
        return value

    queue._read_avail_idx = counting  # type: ignore[method-assign]
    for _ in range(3):
        ring.add_chain([(0x20_0000, 4, True)])
    heads = [queue.pop() for _ in range(3)]
    assert all(chain is not None for chain in heads)
    assert reads == [3]
    assert queue.pop() is None
    assert reads == [3, 3]
    for _ in range(2):
        ring.add_chain([(0x20_0000, 4, True)])
    batch: list[DescriptorChain] = []
    assert queue.pop_into(batch, 8) is True  # both chains, then the ring was found empty
    assert [chain.head for chain in batch] == [3, 4] and reads == [3, 3, 5, 5]


def test_zero_length_descriptors_are_skipped_not_fatal(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    data = arena.alloc(64)
    # a zero-length descriptor may point anywhere: nothing is accessed through it
    head = ring.add_chain([(OUTSIDE_RAM, 0, False), (data, 64, False), (OUTSIDE_RAM, 0, True)])

    chain = queue.pop()

    assert chain == DescriptorChain(head, ((data, 64),), (), 3)


def test_indirect_table_after_direct_descriptors(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring, indirect=True)
    a, b, c = arena.alloc(16), arena.alloc(100), arena.alloc(1)
    head = ring.add_indirect([(b, 100, False), (c, 1, True)], prefix=[(a, 16, False)])

    chain = queue.pop()

    assert chain is not None and chain.head == head
    assert chain.readable == ((a, 16), (b, 100))
    assert chain.writable == ((c, 1),)


def test_indirect_without_negotiation_is_an_error(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring, indirect=False)
    ring.add_indirect([(arena.alloc(4), 4, True)])
    with pytest.raises(VirtqueueError, match="INDIRECT_DESC not negotiated"):
        queue.pop()


def test_nested_indirect_is_an_error(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring, indirect=True)
    inner = arena.alloc(16)
    ring.write_desc(0, arena.alloc(4), 4, VIRTQ_DESC_F_WRITE, table=inner)
    outer = arena.alloc(16)
    ring.write_desc(0, inner, 16, VIRTQ_DESC_F_INDIRECT, table=outer)
    ring.write_desc(0, outer, 16, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)
    with pytest.raises(VirtqueueError, match="inside an indirect table"):
        queue.pop()


@pytest.mark.parametrize(
    ("length", "flags", "match"),
    [
        (24, VIRTQ_DESC_F_INDIRECT, "multiple of 16"),
        (0, VIRTQ_DESC_F_INDIRECT, "multiple of 16"),
        (16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, "both INDIRECT and NEXT"),
        (16 * 2048, VIRTQ_DESC_F_INDIRECT, "exceeds"),
    ],
)
def test_malformed_indirect_descriptors(
    memory: GuestMemory, arena: Arena, length: int, flags: int, match: str
) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring, indirect=True)
    ring.write_desc(0, arena.alloc(16 * 2048), length, flags, 1)
    ring.publish(0)
    with pytest.raises(VirtqueueError, match=match):
        queue.pop()


def test_indirect_table_loop_is_bounded_by_table_size(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring, indirect=True)
    table = arena.alloc(32)
    ring.write_desc(0, arena.alloc(4), 4, VIRTQ_DESC_F_NEXT, 1, table=table)
    ring.write_desc(1, arena.alloc(4), 4, VIRTQ_DESC_F_NEXT, 0, table=table)
    ring.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)
    with pytest.raises(VirtqueueError, match="loop"):
        queue.pop()


# -- adversarial chains ------------------------------------------------------------------------


def test_descriptor_loop_is_detected(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    buffer = arena.alloc(4)
    ring.write_desc(0, buffer, 4, VIRTQ_DESC_F_NEXT, 1)
    ring.write_desc(1, buffer, 4, VIRTQ_DESC_F_NEXT, 0)
    ring.publish(0)
    with pytest.raises(VirtqueueError, match="longer than the 8 descriptors"):
        queue.pop()


def test_next_index_out_of_range(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    ring.write_desc(0, arena.alloc(4), 4, VIRTQ_DESC_F_NEXT, 8)
    ring.publish(0)
    with pytest.raises(VirtqueueError, match="next index 8 is outside the descriptor table"):
        queue.pop()


def test_head_index_out_of_range(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    ring.publish(200)
    with pytest.raises(VirtqueueError, match="head index"):
        queue.pop()


@pytest.mark.parametrize(
    ("address", "length"),
    [
        (OUTSIDE_RAM, 16),  # in the MMIO hole
        (RAM_SIZE - 8, 16),  # straddles the end of RAM
        (0x1000, 0xFFFF_FFFF),  # huge length
        (0xFFFF_FFFF_FFFF_FFF0, 0x20),  # wraps the 64-bit address space
    ],
)
def test_buffers_outside_guest_ram_are_refused(
    memory: GuestMemory, arena: Arena, address: int, length: int
) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    ring.add_chain([(address, length, True)])
    with pytest.raises(VirtqueueError, match="outside guest RAM"):
        queue.pop()


def test_total_chain_length_is_capped(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    queue.max_chain_bytes = 1000
    ring.add_chain([(arena.alloc(600), 600, False), (arena.alloc(600), 600, True)])
    with pytest.raises(VirtqueueError, match="more than 1000 bytes"):
        queue.pop()


def test_readable_after_writable_is_refused(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    ring.add_chain([(arena.alloc(4), 4, True), (arena.alloc(4), 4, False)])
    with pytest.raises(VirtqueueError, match="readable descriptor after a device-writable"):
        queue.pop()


def test_available_index_running_ahead_is_refused(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    memory.write_u16(ring.avail + 2, 9)
    with pytest.raises(VirtqueueError, match="more than the queue size 8"):
        queue.pop()


@pytest.mark.parametrize(
    ("size", "desc_offset", "match"),
    [(6, 0, "not a power of two"), (16, 0, "not a power of two"), (8, 8, "not 16-byte aligned")],
)
def test_layout_validation(
    memory: GuestMemory, arena: Arena, size: int, desc_offset: int, match: str
) -> None:
    ring = Ring(memory, arena, 8)
    queue = Virtqueue(memory, 0, 8)
    queue.size = size
    queue.desc_addr, queue.avail_addr, queue.used_addr = ring.desc + desc_offset, ring.avail, ring.used
    with pytest.raises(VirtqueueError, match=match):
        queue.activate()
    assert not queue.ready


def test_rings_outside_ram_are_refused(memory: GuestMemory, arena: Arena) -> None:
    queue = Virtqueue(memory, 0, 8)
    queue.desc_addr, queue.avail_addr, queue.used_addr = 0x1000, 0x2000, RAM_SIZE - 16
    with pytest.raises(VirtqueueError, match="used ring"):
        queue.activate()


def test_unpop_returns_the_chain(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    head = ring.add_chain([(arena.alloc(4), 4, True)])
    first = queue.pop()
    queue.unpop()
    again = queue.pop()
    assert first == again and again is not None and again.head == head


# -- notification suppression ------------------------------------------------------------------


def test_vring_need_event_matches_the_spec_formula_with_wraparound() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(5, 6, 3)
    assert not vring_need_event(5, 5, 3)
    assert vring_need_event(0xFFFF, 0x0001, 0xFFFE)  # crossing 65535 -> 0
    assert not vring_need_event(0x0002, 0x0001, 0xFFFE)


def test_no_interrupt_flag_suppresses_without_event_idx(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring)
    ring.add_chain([(arena.alloc(4), 4, True)])
    ring.add_chain([(arena.alloc(4), 4, True)])
    assert not queue.needs_notification()  # nothing used yet
    chain = queue.pop()
    assert chain is not None
    queue.push_used(chain.head, 0)
    assert queue.needs_notification()
    ring.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    chain = queue.pop()
    assert chain is not None
    queue.push_used(chain.head, 0)
    assert not queue.needs_notification()
    assert (queue.notifications_sent, queue.notifications_suppressed) == (1, 1)


def test_event_idx_notifies_only_when_used_event_is_crossed(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring, event_idx=True)
    ring.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # must be ignored with EVENT_IDX
    ring.set_used_event(2)  # "tell me when used idx passes 2", i.e. reaches 3
    for _ in range(4):
        ring.add_chain([(arena.alloc(4), 4, True)])
    decisions = []
    for _ in range(4):
        chain = queue.pop()
        assert chain is not None
        queue.push_used(chain.head, 4)
        decisions.append(queue.needs_notification())
    # the first decision always notifies (no previous one), then only the crossing of 2
    assert decisions == [True, False, True, False]


def test_event_idx_publishes_avail_event_when_the_ring_runs_dry(memory: GuestMemory, arena: Arena) -> None:
    ring = Ring(memory, arena, 8)
    queue = make_queue(memory, ring, event_idx=True)
    for _ in range(3):
        ring.add_chain([(arena.alloc(4), 4, True)])
    while queue.pop() is not None:
        pass
    assert ring.avail_event() == 3


def test_event_idx_recheck_finds_a_chain_added_after_the_first_read(arena: Arena) -> None:
    class Racing(GuestMemory):
        ring: Ring | None = None

        def write_u16(self, gpa: int, value: int) -> None:
            super().write_u16(gpa, value)
            ring = self.ring
            if ring is not None and gpa == ring.used + 4 + 8 * ring.size:
                self.ring = None  # the driver adds a buffer right after avail_event is written
                ring.add_chain([(0x30_0000, 4, True)])

    racing = Racing.for_size(RAM_SIZE)
    try:
        ring = Ring(racing, Arena(racing), 8)
        queue = make_queue(racing, ring, event_idx=True)
        racing.ring = ring
        assert queue.pop() is not None
    finally:
        racing.close()


# -- buffer helpers ------------------------------------------------------------------------------


def test_gather_scatter_and_slice_cross_buffer_boundaries(memory: GuestMemory, arena: Arena) -> None:
    buffers = [(arena.alloc(3), 3), (arena.alloc(5), 5), (arena.alloc(4), 4)]
    assert scatter(memory, buffers, b"abcdefghijkl") == 12
    assert gather(memory, buffers) == b"abcdefghijkl"
    assert gather(memory, buffers, 2, 7) == b"cdefghi"
    assert scatter(memory, buffers, b"XYZ", 7) == 3
    assert gather(memory, buffers) == b"abcdefgXYZkl"
    assert scatter(memory, buffers, b"0123456789", 10) == 2
    assert slice_buffers(buffers, 2, 7) == [(buffers[0][0] + 2, 1), (buffers[1][0], 5), (buffers[2][0], 1)]
