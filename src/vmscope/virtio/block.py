"""virtio-blk (virtio 1.2 section 5.2) on a raw image file or block device.

One request queue. Requests: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; anything
else completes with VIRTIO_BLK_S_UNSUPP. Data moves between the image and guest RAM with
``os.preadv`` / ``os.pwritev`` on zero-copy views of the guest buffers.

Durability. A write is acknowledged only after ``pwritev`` returned. With
VIRTIO_BLK_F_FLUSH negotiated (Linux always does) the host page cache acts as a
write-back cache and VIRTIO_BLK_T_FLUSH runs ``os.fsync`` before its status is written.
Without it the device is write-through: every write, discard and write-zeroes is followed
by ``os.fsync`` before completion, as the spec requires of a device that offered FLUSH.

Read-only devices offer VIRTIO_BLK_F_RO, open the image O_RDONLY and fail every write-type
request with VIRTIO_BLK_S_IOERR without touching data. Requests past the end of the disk,
or with a data length that is not a multiple of 512, also fail with IOERR. Discarded
ranges are deallocated with fallocate(PUNCH_HOLE) where the filesystem can, otherwise
zero-filled, so they always read back as zeros. A chain without a 16-byte device-readable
header or without a device-writable status byte is malformed: NEEDS_RESET.

Layout: this module is the virtio protocol and request batching; :mod:`vmscope.virtio.raw_image`
is the host side (the image file), :mod:`vmscope.virtio.block_trace` the request traces (their
names are re-exported here).

Latency. Every request leaves a :class:`RequestTrace` (bounded per device, oldest dropped)
with ``time.perf_counter_ns`` stamps for notification, pickup, backend start/end, used-ring
publication and interrupt injection, so a profiler can split where the time went.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
from pathlib import Path

from vmscope.devices.state import StateReader
from vmscope.errors import GuestMemoryError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.block_trace import (
    REQUEST_TYPE_NAMES,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_GET_LIFETIME,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_SECURE_ERASE,
    VIRTIO_BLK_T_WRITE_ZEROES,
    RequestTrace,
    RequestTraceLog,
    TraceRecord,
)
from vmscope.virtio.device import DEVICE_ID_BLOCK, VirtioDevice
from vmscope.virtio.queue import (
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
    gather,
    scatter,
    slice_buffers,
)
from vmscope.virtio.raw_image import advance_views, open_raw_image, punch_hole, write_zeros

#: the request types and traces stay importable from here (they moved to block_trace)
__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_TRACE_LIMIT",
    "DISCARD_SECTOR_ALIGNMENT",
    "DISCARD_SEGMENT",
    "ID_BYTES",
    "MAX_DISCARD_SECTORS",
    "MAX_DISCARD_SEGMENTS",
    "REQUEST_HEADER",
    "REQUEST_TYPE_NAMES",
    "SECTOR_SIZE",
    "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_CONFIG_WCE",
    "VIRTIO_BLK_F_DISCARD",
    "VIRTIO_BLK_F_FLUSH",
    "VIRTIO_BLK_F_GEOMETRY",
    "VIRTIO_BLK_F_MQ",
    "VIRTIO_BLK_F_RO",
    "VIRTIO_BLK_F_SEG_MAX",
    "VIRTIO_BLK_F_SIZE_MAX",
    "VIRTIO_BLK_F_TOPOLOGY",
    "VIRTIO_BLK_F_WRITE_ZEROES",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_T_DISCARD",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_T_GET_LIFETIME",
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_SECURE_ERASE",
    "VIRTIO_BLK_T_WRITE_ZEROES",
    "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP",
    "RequestTrace",
    "VirtioBlock",
]

log = logging.getLogger("vmscope.virtio.block")

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14


VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SIZE = 512
ID_BYTES = 20
REQUEST_HEADER = struct.Struct("<IIQ")
DISCARD_SEGMENT = struct.Struct("<QII")

DEFAULT_QUEUE_SIZE = 256
DEFAULT_TRACE_LIMIT = 4096
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEGMENTS = 32
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB, the usual filesystem block
# completions are signalled at least this often while a long batch is served
_SIGNAL_EVERY = 32
_IOV_MAX = 1024
# at most this many neighbouring reads or writes share one syscall
_MERGE_MAX_REQUESTS = 32

# struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes)
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


class _RequestFailed(Exception):
    """Completes the request with ``status`` (IOERR / UNSUPP); not a queue error."""

    def __init__(self, status: int, reason: str, *, host_fault: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        #: the host's image failed (ENOSPC, EIO, a file truncated under the VM), not the request
        self.host_fault = host_fault


class VirtioBlock(VirtioDevice):
    """A virtio-blk disk backed by ``path`` (see the module docstring)."""

    device_id = DEVICE_ID_BLOCK
    poll_queues = True

    def __init__(
        self,
        memory: GuestMemory,
        path: str | Path,
        *,
        read_only: bool = False,
        serial: str | None = None,
        name: str = "virtio-blk0",
        queue_size: int = DEFAULT_QUEUE_SIZE,
        trace_limit: int = DEFAULT_TRACE_LIMIT,
    ) -> None:
        self.path = str(path)
        self.read_only = read_only
        fd, size = open_raw_image(self.path, read_only=read_only)
        self._fd: int | None = fd
        #: disk size in 512-byte sectors (a trailing partial sector is not addressable)
        self.capacity = size // SECTOR_SIZE
        features = (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH)
        if read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        try:
            super().__init__(memory, (queue_size,), name=name, features=features)
        except BaseException:
            os.close(fd)
            raise
        self.seg_max = queue_size - 2
        id_text = serial if serial is not None else Path(self.path).name
        self.serial = id_text.encode("ascii", "replace")[:ID_BYTES]
        self._write_through = True
        self._trace_log = RequestTraceLog(trace_limit)
        self._ram: tuple[int, int, memoryview] | None = None
        #: request counters by outcome
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.io_errors = 0
        #: of io_errors, those where the host's image failed (ENOSPC, EIO, truncated under the VM)
        self.host_io_errors = 0
        self.unsupported = 0

    # -- virtio hooks ---------------------------------------------------------------------------

    def config_space(self) -> bytes:
        return _CONFIG.pack(
            self.capacity,
            0,  # size_max (not offered)
            self.seg_max,
            0,
            0,
            0,  # geometry (not offered)
            0,  # blk_size (not offered)
            0,
            0,
            0,
            0,  # topology (not offered)
            0,  # writeback (CONFIG_WCE not offered)
            0,  # unused0
            1,  # num_queues
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEGMENTS,
            DISCARD_SECTOR_ALIGNMENT,
            MAX_DISCARD_SECTORS,  # max_write_zeroes_sectors
            MAX_DISCARD_SEGMENTS,  # max_write_zeroes_seg
            1,  # write_zeroes_may_unmap
        )

    def features_accepted(self, features: int) -> None:
        self._write_through = not features >> VIRTIO_BLK_F_FLUSH & 1

    def device_reset(self) -> None:
        self._write_through = True

    def save_device_state(self) -> dict[str, object]:
        # capacity and read-only are the image's: saved so that a state meets the same disk again
        return {"write_through": self._write_through, "capacity": self.capacity, "read_only": self.read_only}

    def load_device_state(self, reader: StateReader) -> None:
        reader.expect("capacity", self.capacity)
        reader.expect("read_only", self.read_only)
        self._write_through = reader.flag("write_through")

    @property
    def write_through(self) -> bool:
        """True while every write is fsynced before completion (FLUSH not negotiated)."""
        return self._write_through

    # -- traces -----------------------------------------------------------------------------------

    def traces(self) -> list[RequestTrace]:
        """The recorded requests (the last ``trace_limit``), oldest first (a copy)."""
        return self._trace_log.traces(self.name)

    def drain_traces(self) -> list[RequestTrace]:
        """The recorded requests, oldest first, removing them."""
        return self._trace_log.drain(self.name)

    # -- request processing ---------------------------------------------------------------------

    def process_queue(self, queue: Virtqueue, notified_ns: int) -> None:
        thread = threading.current_thread().name
        clock = time.perf_counter_ns
        while True:
            # take up to _SIGNAL_EVERY chains off the ring, so neighbouring transfers can merge;
            # one pickup time for the pass (taking a chain off the ring costs about a microsecond)
            chains: list[DescriptorChain] = []
            malformed: Exception | None = None
            pickup_ns = clock()
            try:
                drained = queue.pop_into(chains, _SIGNAL_EVERY)
            except (VirtqueueError, GuestMemoryError) as error:
                malformed = error  # the chains before it are served first, as one by one would
                drained = True
            if not chains:
                if malformed is not None:
                    raise malformed
                return
            records: list[TraceRecord] = []
            try:
                self._serve_batch(queue, chains, notified_ns, pickup_ns, records)
            finally:
                if records:
                    self._complete(queue, records, thread)
            if malformed is not None:
                raise malformed
            if drained:
                # the ring was empty when last read; the driver notifies for anything newer (with
                # EVENT_IDX, pop_into published avail_event as it found the ring empty)
                return

    def _serve_batch(
        self,
        queue: Virtqueue,
        chains: list[DescriptorChain],
        notified_ns: int,
        pickup_ns: int,
        records: list[TraceRecord],
    ) -> None:
        """Serve ``chains`` in ring order; runs of reads (or writes) of consecutive disk ranges
        share one preadv (pwritev), as QEMU merges them. Records go to ``records`` as completed.

        The usual read or write (header in the first RAM region, a data length that is a
        multiple of 512 inside the disk) is recognised here with a few tuple operations; every
        other request, and anything that fails, is served alone by :meth:`_serve`, so its status
        is its own.
        """
        ram_start, ram_end, ram = self._ram_window()
        unpack_header = REQUEST_HEADER.unpack_from
        header_size = REQUEST_HEADER.size
        capacity = self.capacity
        writes_allowed = not self.read_only and self._fd is not None
        reads_allowed = self._fd is not None
        run: list[tuple[DescriptorChain, int, int]] = []  # (chain, sector, data length)
        run_pieces: list[tuple[int, int]] = []
        run_type = run_next_sector = -1
        try:
            for chain in chains:
                _head, readable, writable, _count = chain
                request_type = -1
                length = sector = 0
                pieces: list[tuple[int, int]] | tuple[tuple[int, int], ...] = ()
                if readable and writable:
                    header_address, header_length = readable[0]
                    if (
                        header_length >= header_size
                        and ram_start <= header_address
                        and header_address + header_size <= ram_end
                    ):
                        request_type, _reserved, sector = unpack_header(ram, header_address - ram_start)
                    if request_type == VIRTIO_BLK_T_IN and reads_allowed:
                        if len(writable) == 2 and writable[1][1] == 1:  # data, status
                            pieces = writable[:1]
                            length = pieces[0][1]
                        else:
                            length = sum(size for _, size in writable) - 1
                            pieces = slice_buffers(writable, 0, length)
                    elif request_type == VIRTIO_BLK_T_OUT and writes_allowed:
                        if len(readable) == 2 and header_length == header_size:  # header, data
                            pieces = readable[1:]
                            length = pieces[0][1]
                        else:
                            length = sum(size for _, size in readable) - header_size
                            pieces = slice_buffers(readable, header_size, length)
                    else:
                        request_type = -1
                    if length <= 0 or length % SECTOR_SIZE or sector + length // SECTOR_SIZE > capacity:
                        request_type = -1
                if request_type < 0:
                    if run:
                        self._serve_run(queue, run, run_pieces, run_type, notified_ns, pickup_ns, records)
                        run, run_pieces = [], []
                    records.append(self._serve(queue, chain, notified_ns, pickup_ns))
                    continue
                if run and (
                    request_type != run_type or sector != run_next_sector or len(run) >= _MERGE_MAX_REQUESTS
                ):
                    self._serve_run(queue, run, run_pieces, run_type, notified_ns, pickup_ns, records)
                    run, run_pieces = [], []
                run.append((chain, sector, length))
                run_pieces.extend(pieces)
                run_type, run_next_sector = request_type, sector + length // SECTOR_SIZE
        finally:
            if run:  # also when a later chain turned out malformed: these came before it
                self._serve_run(queue, run, run_pieces, run_type, notified_ns, pickup_ns, records)

    def _serve_run(
        self,
        queue: Virtqueue,
        run: list[tuple[DescriptorChain, int, int]],
        pieces: list[tuple[int, int]],
        request_type: int,
        notified_ns: int,
        pickup_ns: int,
        records: list[TraceRecord],
    ) -> None:
        """One syscall for a run of reads or writes of consecutive sectors (see
        :meth:`_serve_batch`), then their status bytes and one used-index update."""
        write = request_type == VIRTIO_BLK_T_OUT
        clock = time.perf_counter_ns
        first_sector = run[0][1]
        status = VIRTIO_BLK_S_OK
        backend_start = clock()
        try:
            self._transfer(self._require_fd(), pieces, first_sector * SECTOR_SIZE, write=write)
            if write and self._write_through:
                self._sync()
        except _RequestFailed as failure:
            if len(run) > 1:  # find out which request failed: serve each on its own
                for chain, _, _ in run:
                    records.append(self._serve(queue, chain, notified_ns, pickup_ns))
                return
            status = failure.status
            self._count_failure(failure, run[0][0].head)
        backend_end = clock()
        memory = self.memory
        ram_start, ram_end, ram = self._ram_window()
        completions = []
        moved = 0
        for chain, _, length in run:
            # the status is the last device-writable byte: the last byte of the last writable buffer
            status_address, status_length = chain.writable[-1]
            status_address += status_length - 1
            if ram_start <= status_address < ram_end:
                ram[status_address - ram_start] = status
            else:
                memory.write_u8(status_address, status)
            completions.append((chain.head, 1 if write or status else length + 1))
            moved += length
        self.requests += len(run)
        if status == VIRTIO_BLK_S_OK:
            if write:
                self.bytes_written += moved
            else:
                self.bytes_read += moved
        # the run finished together: one used-index update publishes all of it
        queue.push_used_many(completions)
        complete_ns = clock()
        queue_index = queue.index
        times = (notified_ns, pickup_ns, backend_start, backend_end, complete_ns)
        records.extend(
            (queue_index, chain.head, request_type, sector, length, status, *times)
            for chain, sector, length in run
        )

    def _complete(self, queue: Virtqueue, records: list[TraceRecord], thread: str) -> None:
        stamp: int | None = None
        try:
            stamp = self.signal_used(queue)
        finally:
            self._trace_log.keep(records, stamp, thread)

    def _serve(
        self, queue: Virtqueue, chain: DescriptorChain, notified_ns: int, pickup_ns: int
    ) -> TraceRecord:
        """Serve one request of any type on its own; its trace record."""
        memory = self.memory
        readable, writable = chain.readable, chain.writable
        readable_length = sum(length for _, length in readable)
        if readable_length < REQUEST_HEADER.size:
            raise VirtqueueError(
                f"request {chain.head}: {readable_length} device-readable bytes, the header needs "
                f"{REQUEST_HEADER.size} (a device-writable buffer where a readable one belongs?)"
            )
        if not writable:
            raise VirtqueueError(f"request {chain.head}: no device-writable byte for the status")
        writable_length = sum(length for _, length in writable)
        header_address, header_length = readable[0]
        if header_length >= REQUEST_HEADER.size:  # the usual layout: the header in one buffer
            header = memory.read(header_address, REQUEST_HEADER.size)
        else:
            header = gather(memory, readable, 0, REQUEST_HEADER.size)
        request_type, _reserved, sector = REQUEST_HEADER.unpack(header)
        status_offset = writable_length - 1
        written = 0
        length = 0
        perf_counter_ns = time.perf_counter_ns
        self.requests += 1
        try:
            if request_type == VIRTIO_BLK_T_IN:
                length = status_offset
                backend_start = perf_counter_ns()
                try:
                    self._read(sector, chain, length)
                finally:
                    backend_end = perf_counter_ns()
                written = length
                self.bytes_read += length
            elif request_type == VIRTIO_BLK_T_OUT:
                length = readable_length - REQUEST_HEADER.size
                backend_start = perf_counter_ns()
                try:
                    self._write(sector, chain, length)
                finally:
                    backend_end = perf_counter_ns()
                self.bytes_written += length
            elif request_type == VIRTIO_BLK_T_FLUSH:
                backend_start = perf_counter_ns()
                try:
                    self._sync()
                finally:
                    backend_end = perf_counter_ns()
            elif request_type == VIRTIO_BLK_T_GET_ID:
                backend_start = backend_end = perf_counter_ns()
                identifier = self.serial.ljust(ID_BYTES, b"\0")[: min(ID_BYTES, status_offset)]
                written = scatter(memory, writable, identifier)
            elif request_type in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                backend_start = backend_end = perf_counter_ns()
                segments = self._parse_segments(request_type, chain, readable_length)
                sector = segments[0][0]
                length = sum(count for _, count, _ in segments) * SECTOR_SIZE
                backend_start = perf_counter_ns()
                try:
                    self._zero_or_discard(request_type, segments)
                finally:
                    backend_end = perf_counter_ns()
            else:
                backend_start = backend_end = perf_counter_ns()
                raise _RequestFailed(VIRTIO_BLK_S_UNSUPP, f"unsupported request type {request_type}")
            status = VIRTIO_BLK_S_OK
        except _RequestFailed as failure:
            status = failure.status
            written = 0
            if status == VIRTIO_BLK_S_UNSUPP:
                self.unsupported += 1
                log.debug("%s: request %d unsupported: %s", self.name, chain.head, failure)
            else:
                self._count_failure(failure, chain.head)
        # the status is the last device-writable byte: the last byte of the last writable buffer
        status_address, status_length = writable[-1]
        memory.write_u8(status_address + status_length - 1, status)
        queue.push_used(chain.head, written + 1)
        return (
            queue.index, chain.head, request_type, sector, length, status,
            notified_ns, pickup_ns, backend_start, backend_end, perf_counter_ns(),
        )  # fmt: skip

    # -- backend operations ---------------------------------------------------------------------

    def _checked_range(self, sector: int, length: int) -> int:
        """Byte offset of ``sector`` after checking the request lies inside the disk."""
        if length % SECTOR_SIZE:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR, f"data length {length} is not a multiple of 512")
        if sector > self.capacity or sector + length // SECTOR_SIZE > self.capacity:
            raise _RequestFailed(
                VIRTIO_BLK_S_IOERR,
                f"sectors {sector}+{length // SECTOR_SIZE} are past the end of the disk ({self.capacity})",
            )
        return sector * SECTOR_SIZE

    def _require_fd(self) -> int:
        if self._fd is None:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR, "the disk is closed")
        return self._fd

    def _read(self, sector: int, chain: DescriptorChain, length: int) -> None:
        offset = self._checked_range(sector, length)
        fd = self._require_fd()
        self._transfer(fd, slice_buffers(chain.writable, 0, length), offset, write=False)

    def _write(self, sector: int, chain: DescriptorChain, length: int) -> None:
        if self.read_only:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
        offset = self._checked_range(sector, length)
        fd = self._require_fd()
        self._transfer(fd, slice_buffers(chain.readable, REQUEST_HEADER.size, length), offset, write=True)
        if self._write_through:
            self._sync()

    def _count_failure(self, failure: _RequestFailed, head: int) -> None:
        """Count an IOERR completion; a failing host image is the user's business (the log sink
        rate-limits it), a malformed request only the guest's."""
        self.io_errors += 1
        if failure.host_fault:
            self.host_io_errors += 1
            log.warning("%s: %s: the guest gets VIRTIO_BLK_S_IOERR", self.name, failure)
        else:
            log.debug("%s: request %d failed: %s", self.name, head, failure)

    def _transfer(self, fd: int, pieces: list[tuple[int, int]], offset: int, *, write: bool) -> None:
        """preadv/pwritev between guest buffers and the image, all bytes or IOERR."""
        if len(pieces) == 1:  # the usual case: one data buffer, usually moved by one syscall
            address, size = pieces[0]
            view = self._guest_view(address, size)
            try:
                done = os.pwrite(fd, view, offset) if write else os.preadv(fd, (view,), offset)
            except OSError as error:
                raise _RequestFailed(
                    VIRTIO_BLK_S_IOERR, f"host I/O error: {error}", host_fault=True
                ) from None
            finally:
                view.release()
            if done == size:
                return
            if done <= 0:
                raise _RequestFailed(VIRTIO_BLK_S_IOERR, "short transfer (image shrank?)", host_fault=True)
            pieces, offset = [(address + done, size - done)], offset + done
        for start in range(0, len(pieces), _IOV_MAX):
            views = [self._guest_view(address, size) for address, size in pieces[start : start + _IOV_MAX]]
            try:
                remaining = sum(len(view) for view in views)
                while remaining:
                    try:
                        done = os.pwritev(fd, views, offset) if write else os.preadv(fd, views, offset)
                    except OSError as error:
                        raise _RequestFailed(
                            VIRTIO_BLK_S_IOERR, f"host I/O error: {error}", host_fault=True
                        ) from None
                    if done <= 0:
                        raise _RequestFailed(
                            VIRTIO_BLK_S_IOERR, "short transfer (image shrank?)", host_fault=True
                        )
                    offset += done
                    remaining -= done
                    if remaining:
                        views = advance_views(views, done)
            finally:
                for view in views:
                    view.release()

    def _ram_window(self) -> tuple[int, int, memoryview]:
        """(start, end, view) of the first guest RAM region, from ``GuestMemory.view``, made once:
        slicing it is much cheaper than a ``GuestMemory`` call per buffer. Buffers reach it only
        after the queue checked them against guest RAM, and each use checks the range again."""
        window = self._ram
        if window is None:
            region = self.memory.regions[0]
            view = self.memory.view(region.guest_base, region.size)
            window = self._ram = (region.guest_base, region.guest_end, view)
        return window

    def _guest_view(self, address: int, length: int) -> memoryview:
        """A zero-copy view of guest RAM for preadv/pwritev (see :meth:`_ram_window`)."""
        start, end, ram = self._ram_window()
        if start <= address and address + length <= end:
            return ram[address - start : address - start + length]
        return self.memory.view(address, length)

    def _sync(self) -> None:
        fd = self._require_fd()
        try:
            os.fsync(fd)
        except OSError as error:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR, f"fsync failed: {error}", host_fault=True) from None

    def _parse_segments(
        self, request_type: int, chain: DescriptorChain, readable_length: int
    ) -> list[tuple[int, int, int]]:
        if self.read_only:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR, "discard/write-zeroes on a read-only disk")
        feature = VIRTIO_BLK_F_DISCARD if request_type == VIRTIO_BLK_T_DISCARD else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.negotiated(feature):
            raise _RequestFailed(VIRTIO_BLK_S_UNSUPP, "feature not negotiated")
        data_length = readable_length - REQUEST_HEADER.size
        if data_length <= 0 or data_length % DISCARD_SEGMENT.size:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR, f"segment data of {data_length} bytes")
        count = data_length // DISCARD_SEGMENT.size
        if count > MAX_DISCARD_SEGMENTS:
            raise _RequestFailed(VIRTIO_BLK_S_UNSUPP, f"{count} segments, over {MAX_DISCARD_SEGMENTS}")
        raw = gather(self.memory, chain.readable, REQUEST_HEADER.size, data_length)
        segments = [DISCARD_SEGMENT.unpack_from(raw, 16 * index) for index in range(count)]
        for sector, sectors, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise _RequestFailed(VIRTIO_BLK_S_UNSUPP, f"unknown segment flags {flags:#x}")
            if request_type == VIRTIO_BLK_T_DISCARD and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise _RequestFailed(VIRTIO_BLK_S_UNSUPP, "unmap flag set on a discard")
            if sectors > MAX_DISCARD_SECTORS:
                raise _RequestFailed(VIRTIO_BLK_S_IOERR, f"segment of {sectors} sectors is too large")
            self._checked_range(sector, sectors * SECTOR_SIZE)
        return segments

    def _zero_or_discard(self, request_type: int, segments: list[tuple[int, int, int]]) -> None:
        fd = self._require_fd()
        try:
            for sector, sectors, flags in segments:
                offset, length = sector * SECTOR_SIZE, sectors * SECTOR_SIZE
                deallocate = (
                    request_type == VIRTIO_BLK_T_DISCARD or flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                )
                if length and not (deallocate and punch_hole(fd, offset, length)):
                    write_zeros(fd, offset, length)
        except OSError as error:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR, f"host I/O error: {error}", host_fault=True) from None
        if self._write_through:
            self._sync()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            super().close()
            window, self._ram = self._ram, None
            if window is not None:  # so guest RAM can be unmapped
                window[2].release()
            fd, self._fd = self._fd, None
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
