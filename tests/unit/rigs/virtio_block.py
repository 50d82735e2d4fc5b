"""virtio-blk requests laid out the way Linux lays them out, on a known disk image."""

from __future__ import annotations

import itertools
import struct

from tests.unit.rigs.virtqueue import Ring

SECTORS = 128


IMAGE = bytes((i * 7 + i // 512) & 0xFF for i in range(SECTORS * 512))


class Request:
    """One virtio-blk request laid out in guest memory: header, data, status byte."""

    def __init__(self, ring: Ring, head: int, data_in: int, data_in_length: int, status: int) -> None:
        self.ring, self.head = ring, head
        self.data_in, self.data_in_length, self.status_address = data_in, data_in_length, status

    @property
    def status(self) -> int:
        return self.ring.memory.read_u8(self.status_address)

    def data(self) -> bytes:
        return self.ring.memory.read(self.data_in, self.data_in_length)


def submit(
    ring: Ring,
    request_type: int,
    sector: int = 0,
    *,
    out: bytes = b"",
    in_length: int = 0,
    indirect: bool = False,
    in_pieces: int = 1,
) -> Request:
    """Queue a request the way Linux lays it out (header / data / status in separate buffers)."""
    arena, memory = ring.arena, ring.memory
    header = arena.put(struct.pack("<IIQ", request_type, 0, sector))
    buffers: list[tuple[int, int, bool]] = [(header, 16, False)]
    if out:
        buffers.append((arena.put(out), len(out), False))
    data_in = arena.alloc(in_length or 1)
    memory.fill(data_in, in_length or 1, 0xEE)
    if in_length:
        # split the data area into pieces of uneven size to cross descriptor boundaries
        cuts = sorted({0, in_length, *(in_length * k // in_pieces + k for k in range(1, in_pieces))})
        for start, end in itertools.pairwise(cuts):
            buffers.append((data_in + start, end - start, True))
    status = arena.alloc(1)
    memory.write_u8(status, 0xFF)
    buffers.append((status, 1, True))
    head = ring.add_indirect(buffers) if indirect else ring.add_chain(buffers)
    return Request(ring, head, data_in, in_length, status)
