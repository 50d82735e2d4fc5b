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

Latency. Every request leaves a :class:`RequestTrace` (bounded per device, oldest dropped)
with ``time.perf_counter_ns`` stamps for notification, pickup, backend start/end, used-ring
publication and interrupt injection, so a profiler can split where the time went.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vmscope.errors import ConfigError, GuestMemoryError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.device import DEVICE_ID_BLOCK, VirtioDevice
from vmscope.virtio.queue import (
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
    gather,
    scatter,
    slice_buffers,
)

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

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

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
_ZERO_CHUNK = bytes(1 << 20)

# struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes)
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

REQUEST_TYPE_NAMES = {
    VIRTIO_BLK_T_IN: "read",
    VIRTIO_BLK_T_OUT: "write",
    VIRTIO_BLK_T_FLUSH: "flush",
    VIRTIO_BLK_T_GET_ID: "get-id",
    VIRTIO_BLK_T_DISCARD: "discard",
    VIRTIO_BLK_T_WRITE_ZEROES: "write-zeroes",
}


@dataclass(slots=True)
class RequestTrace:
    """Timestamps (``time.perf_counter_ns``) of one virtio-blk request, for latency splitting.

    ``notify_ns``: the notification was seen (I/O thread woke on the queue eventfd, or the
    vCPU's QueueNotify exit reached the device); ``pickup_ns``: the chain was taken off the
    available ring; ``backend_start_ns`` / ``backend_end_ns``: around the host syscalls
    (equal when the request needed none); ``complete_ns``: the used element was published;
    ``interrupt_ns``: the interrupt was injected, or None when notification suppression
    (EVENT_IDX / NO_INTERRUPT) decided none was needed.
    """

    device: str
    queue: int
    head: int
    request_type: int
    sector: int
    #: data bytes moved (read, written, discarded or zeroed)
    length: int
    status: int
    notify_ns: int
    pickup_ns: int
    backend_start_ns: int
    backend_end_ns: int
    complete_ns: int
    interrupt_ns: int | None = None
    #: the thread that served it ("io:virtio-blk0", or a vCPU thread with --iothreads=off)
    thread: str = ""

    @property
    def type_name(self) -> str:
        return REQUEST_TYPE_NAMES.get(self.request_type, f"type-{self.request_type}")

    @property
    def queue_wait_ns(self) -> int:
        """Notification to pickup: time the request sat in the ring."""
        return self.pickup_ns - self.notify_ns

    @property
    def backend_ns(self) -> int:
        return self.backend_end_ns - self.backend_start_ns

    @property
    def total_ns(self) -> int:
        """Notification to interrupt (or to completion when no interrupt was sent)."""
        end = self.interrupt_ns if self.interrupt_ns is not None else self.complete_ns
        return end - self.notify_ns


class _Transfer:
    """A read or write request whose data can move in the same syscall as its neighbours'."""

    __slots__ = ("chain", "length", "offset", "pickup_ns", "pieces", "request_type", "sector")

    def __init__(
        self,
        chain: DescriptorChain,
        pickup_ns: int,
        request_type: int,
        sector: int,
        length: int,
        pieces: list[tuple[int, int]],
    ) -> None:
        self.chain = chain
        self.pickup_ns = pickup_ns
        self.request_type = request_type
        self.sector = sector
        self.offset = sector * SECTOR_SIZE
        self.length = length
        #: the guest buffers of the data, in order
        self.pieces = pieces


class _RequestFailed(Exception):
    """Completes the request with ``status`` (IOERR / UNSUPP); not a queue error."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


_libc: ctypes.CDLL | None = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a file range (reads then return zeros); False where unsupported."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(error, os.strerror(error))


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
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except OSError as error:
            mode = "reading" if read_only else "reading and writing"
            raise ConfigError(f"disk {self.path}: cannot open for {mode}: {error.strerror}") from None
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode):
                size = info.st_size
            elif stat.S_ISBLK(info.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            else:
                raise ConfigError(f"disk {self.path}: not a regular file or block device")
        except BaseException:
            os.close(fd)
            raise
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
        self._traces: collections.deque[RequestTrace] = collections.deque(maxlen=trace_limit)
        self._trace_lock = threading.Lock()
        self._ram: tuple[int, int, memoryview] | None = None
        #: request counters by outcome
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.io_errors = 0
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

    @property
    def write_through(self) -> bool:
        """True while every write is fsynced before completion (FLUSH not negotiated)."""
        return self._write_through

    # -- traces -----------------------------------------------------------------------------------

    def traces(self) -> list[RequestTrace]:
        """The recorded requests, oldest first (a copy)."""
        with self._trace_lock:
            return list(self._traces)

    def drain_traces(self) -> list[RequestTrace]:
        """The recorded requests, oldest first, removing them."""
        with self._trace_lock:
            records = list(self._traces)
            self._traces.clear()
            return records

    # -- request processing ---------------------------------------------------------------------

    def process_queue(self, queue: Virtqueue, notified_ns: int) -> None:
        thread = threading.current_thread().name
        clock = time.perf_counter_ns
        pop = queue.pop
        while True:
            # take up to _SIGNAL_EVERY chains off the ring, so neighbouring transfers can merge
            chains: list[tuple[DescriptorChain, int]] = []
            malformed: Exception | None = None
            drained = False
            try:
                while len(chains) < _SIGNAL_EVERY:
                    chain = pop()
                    if chain is None:
                        drained = True
                        break
                    chains.append((chain, clock()))
            except (VirtqueueError, GuestMemoryError) as error:
                malformed = error  # the chains before it are served first, as one by one would
            if not chains:
                if malformed is not None:
                    raise malformed
                return
            batch: list[RequestTrace] = []
            try:
                self._serve_batch(queue, chains, notified_ns, thread, batch)
            finally:
                if batch:
                    self._complete(queue, batch)
            if malformed is not None:
                raise malformed
            if drained:
                # the ring was empty when last read; the driver notifies for anything newer (with
                # EVENT_IDX, pop published avail_event as it found the ring empty)
                return

    def _serve_batch(
        self,
        queue: Virtqueue,
        chains: list[tuple[DescriptorChain, int]],
        notified_ns: int,
        thread: str,
        batch: list[RequestTrace],
    ) -> None:
        """Serve ``chains`` in ring order; runs of reads (or writes) of consecutive disk ranges
        share one preadv (pwritev), as QEMU merges them. Traces go to ``batch`` as completed."""
        run: list[_Transfer] = []
        try:
            for chain, pickup_ns in chains:
                transfer = self._as_transfer(chain, pickup_ns)
                if transfer is None:
                    if run:
                        self._serve_run(queue, run, notified_ns, thread, batch)
                        run = []
                    batch.append(self._serve(queue, chain, notified_ns, pickup_ns, thread))
                    continue
                if run:
                    last = run[-1]
                    if (
                        transfer.request_type != last.request_type
                        or transfer.offset != last.offset + last.length
                        or len(run) >= _MERGE_MAX_REQUESTS
                    ):
                        self._serve_run(queue, run, notified_ns, thread, batch)
                        run = []
                run.append(transfer)
        finally:
            if run:  # also when a later chain turned out malformed: these came before it
                self._serve_run(queue, run, notified_ns, thread, batch)

    def _as_transfer(self, chain: DescriptorChain, pickup_ns: int) -> _Transfer | None:
        """The chain as a plain read or write that can share a syscall, or None (served alone:
        other types, odd layouts, and anything that fails, so its status is its own)."""
        readable, writable = chain.readable, chain.writable
        if not readable or not writable or self._fd is None:
            return None
        header_address, header_length = readable[0]
        if header_length < REQUEST_HEADER.size:
            return None
        ram_start, ram_end, ram = self._ram_window()
        if ram_start <= header_address and header_address + REQUEST_HEADER.size <= ram_end:
            request_type, _reserved, sector = REQUEST_HEADER.unpack_from(ram, header_address - ram_start)
        else:
            request_type, _reserved, sector = REQUEST_HEADER.unpack(
                self.memory.read(header_address, REQUEST_HEADER.size)
            )
        if request_type == VIRTIO_BLK_T_IN:
            length = sum(size for _, size in writable) - 1
            if len(writable) == 2 and writable[0][1] == length:
                pieces = [writable[0]]
            else:
                pieces = slice_buffers(writable, 0, length)
        elif request_type == VIRTIO_BLK_T_OUT and not self.read_only:
            length = sum(size for _, size in readable) - REQUEST_HEADER.size
            if len(readable) == 2 and header_length == REQUEST_HEADER.size:
                pieces = [readable[1]]
            else:
                pieces = slice_buffers(readable, REQUEST_HEADER.size, length)
        else:
            return None
        if length <= 0 or length % SECTOR_SIZE or sector + length // SECTOR_SIZE > self.capacity:
            return None
        return _Transfer(chain, pickup_ns, request_type, sector, length, pieces)

    def _serve_run(
        self,
        queue: Virtqueue,
        run: list[_Transfer],
        notified_ns: int,
        thread: str,
        batch: list[RequestTrace],
    ) -> None:
        """One syscall for a run of transfers (see :meth:`_as_transfer`), then their completions."""
        first = run[0]
        write = first.request_type == VIRTIO_BLK_T_OUT
        clock = time.perf_counter_ns
        pieces = first.pieces if len(run) == 1 else [piece for t in run for piece in t.pieces]
        status = VIRTIO_BLK_S_OK
        backend_start = clock()
        try:
            self._transfer(self._require_fd(), pieces, first.offset, write=write)
            if write and self._write_through:
                self._sync()
        except _RequestFailed as failure:
            if len(run) > 1:  # find out which request failed: serve each on its own
                for t in run:
                    batch.append(self._serve(queue, t.chain, notified_ns, t.pickup_ns, thread))
                return
            status = failure.status
            self.io_errors += 1
            log.debug("%s: request %d failed (status %d): %s", self.name, first.chain.head, status, failure)
        backend_end = clock()
        memory = self.memory
        ram_start, ram_end, ram = self._ram_window()
        completions = []
        for t in run:
            self.requests += 1
            written = 0
            if status == VIRTIO_BLK_S_OK:
                if write:
                    self.bytes_written += t.length
                else:
                    self.bytes_read += t.length
                    written = t.length
            # the status is the last device-writable byte: the last byte of the last writable buffer
            status_address, status_length = t.chain.writable[-1]
            status_address += status_length - 1
            if ram_start <= status_address < ram_end:
                ram[status_address - ram_start] = status
            else:
                memory.write_u8(status_address, status)
            completions.append((t.chain.head, written + 1))
        # the run finished together: one used-index update publishes all of it
        queue.push_used_many(completions)
        complete_ns = clock()
        name, queue_index = self.name, queue.index
        batch.extend(
            RequestTrace(
                name,
                queue_index,
                t.chain.head,
                t.request_type,
                t.sector,
                t.length,
                status,
                notified_ns,
                t.pickup_ns,
                backend_start,
                backend_end,
                complete_ns,
                thread=thread,
            )
            for t in run
        )

    def _complete(self, queue: Virtqueue, batch: list[RequestTrace]) -> None:
        stamp: int | None = None
        try:
            stamp = self.signal_used(queue)
        finally:
            with self._trace_lock:
                for trace in batch:
                    trace.interrupt_ns = stamp
                    self._traces.append(trace)

    def _serve(
        self, queue: Virtqueue, chain: DescriptorChain, notified_ns: int, pickup_ns: int, thread: str
    ) -> RequestTrace:
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
            else:
                self.io_errors += 1
            log.debug("%s: request %d failed (status %d): %s", self.name, chain.head, status, failure)
        # the status is the last device-writable byte: the last byte of the last writable buffer
        status_address, status_length = writable[-1]
        memory.write_u8(status_address + status_length - 1, status)
        queue.push_used(chain.head, written + 1)
        return RequestTrace(
            self.name,
            queue.index,
            chain.head,
            request_type,
            sector,
            length,
            status,
            notified_ns,
            pickup_ns,
            backend_start,
            backend_end,
            perf_counter_ns(),
            thread=thread,
        )

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

    def _transfer(self, fd: int, pieces: list[tuple[int, int]], offset: int, *, write: bool) -> None:
        """preadv/pwritev between guest buffers and the image, all bytes or IOERR."""
        if len(pieces) == 1:  # the usual case: one data buffer, usually moved by one syscall
            address, size = pieces[0]
            view = self._guest_view(address, size)
            try:
                done = os.pwrite(fd, view, offset) if write else os.preadv(fd, (view,), offset)
            except OSError as error:
                raise _RequestFailed(VIRTIO_BLK_S_IOERR, f"host I/O error: {error}") from None
            finally:
                view.release()
            if done == size:
                return
            if done <= 0:
                raise _RequestFailed(VIRTIO_BLK_S_IOERR, "short transfer (image shrank?)")
            pieces, offset = [(address + done, size - done)], offset + done
        for start in range(0, len(pieces), _IOV_MAX):
            views = [self._guest_view(address, size) for address, size in pieces[start : start + _IOV_MAX]]
            try:
                remaining = sum(len(view) for view in views)
                while remaining:
                    try:
                        done = os.pwritev(fd, views, offset) if write else os.preadv(fd, views, offset)
                    except OSError as error:
                        raise _RequestFailed(VIRTIO_BLK_S_IOERR, f"host I/O error: {error}") from None
                    if done <= 0:
                        raise _RequestFailed(VIRTIO_BLK_S_IOERR, "short transfer (image shrank?)")
                    offset += done
                    remaining -= done
                    views = _advance(views, done)
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
            raise _RequestFailed(VIRTIO_BLK_S_IOERR, f"fsync failed: {error}") from None

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
                if length and not (deallocate and _punch_hole(fd, offset, length)):
                    _write_zeros(fd, offset, length)
        except OSError as error:
            raise _RequestFailed(VIRTIO_BLK_S_IOERR, f"host I/O error: {error}") from None
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


def _advance(views: list[memoryview], done: int) -> list[memoryview]:
    """Drop ``done`` bytes from the front of an iovec list (after a short transfer)."""
    rest = []
    for view in views:
        if done >= len(view):
            done -= len(view)
            view.release()
            continue
        if done:
            rest.append(view[done:])
            view.release()
        else:
            rest.append(view)
        done = 0
    return rest


def _write_zeros(fd: int, offset: int, length: int) -> None:
    while length:
        chunk = min(length, len(_ZERO_CHUNK))
        written = os.pwrite(fd, memoryview(_ZERO_CHUNK)[:chunk], offset)
        if written <= 0:
            raise OSError(errno.EIO, "short write while zeroing")
        offset += written
        length -= written
