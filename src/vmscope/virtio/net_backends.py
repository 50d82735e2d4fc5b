"""Host ends of a virtio-net device: where transmitted frames go, where received ones come from.

A :class:`NetBackend` exposes a non-blocking descriptor that the device's I/O thread polls
(so receive costs no extra thread), ``receive()`` returning one Ethernet frame or None,
and ``send(frame)``, which never blocks: a frame the host cannot take right now is
dropped and counted, as a NIC would.

``tap:NAME``
    A Linux TAP interface (``/dev/net/tun``, IFF_TAP | IFF_NO_PI): one read or write per
    frame. Creating or attaching to a TAP needs CAP_NET_ADMIN (or a persistent TAP owned by
    the user). The TUNSETIFF ioctl is issued by :func:`_tun_set_iff` in this module: it is
    a TUN driver ioctl, not a KVM one, so it does not belong in :mod:`vmscope.kvm`.
``udp:LOCAL_PORT:REMOTE_PORT``
    An unprivileged point-to-point link over UDP on 127.0.0.1: each frame is one datagram
    sent to REMOTE_PORT; datagrams arriving at LOCAL_PORT from anywhere but
    127.0.0.1:REMOTE_PORT are ignored. Two vmscope VMs with mirrored ports share a wire.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass

from vmscope.errors import ConfigError

log = logging.getLogger("vmscope.virtio.net")

#: the largest frame a backend hands over (a 64 KiB GSO super-frame plus Ethernet header)
MAX_FRAME = 65535 + 14
_RECV_BUFFER = 65536 + 64

_TUN_DEVICE = "/dev/net/tun"
_TUNSETIFF = 0x4004_54CA  # _IOW('T', 202, int)
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFNAMSIZ = 16


@dataclass
class NetBackendStats:
    frames_sent: int = 0
    frames_received: int = 0
    send_dropped: int = 0
    receive_ignored: int = 0
    #: errors the host reported on receive (ECONNREFUSED after the peer went away, ...)
    receive_errors: int = 0


class NetBackend(ABC):
    """One host-side network endpoint; see the module docstring."""

    def __init__(self) -> None:
        self.stats = NetBackendStats()

    @abstractmethod
    def fileno(self) -> int:
        """A non-blocking descriptor that is readable when :meth:`receive` has a frame."""

    @abstractmethod
    def receive(self) -> bytes | None:
        """The next frame, or None when none is waiting (never blocks)."""

    @abstractmethod
    def send(self, frame: bytes) -> bool:
        """Hand a frame to the host; False (and counted) when it had to be dropped."""

    def close(self) -> None:
        """Release the descriptor."""


def _tun_set_iff(fd: int, name: str) -> str:
    """TUNSETIFF: attach ``fd`` to TAP interface ``name`` (created if absent); returns its name."""
    raw = name.encode()
    if not raw or len(raw) >= _IFNAMSIZ:
        raise ConfigError(f"net tap:{name}: interface names are 1 to {_IFNAMSIZ - 1} bytes")
    request = struct.pack(f"{_IFNAMSIZ}sH22x", raw, _IFF_TAP | _IFF_NO_PI)
    reply = fcntl.ioctl(fd, _TUNSETIFF, request)
    return bytes(reply[:_IFNAMSIZ]).rstrip(b"\0").decode()


class TapBackend(NetBackend):
    """A TAP interface (needs CAP_NET_ADMIN unless the TAP is persistent and owned by the user)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        try:
            self._fd: int | None = os.open(_TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise ConfigError(f"net tap:{name}: cannot open {_TUN_DEVICE}: {error.strerror}") from None
        try:
            self.name = _tun_set_iff(self._fd, name)
        except OSError as error:
            os.close(self._fd)
            hint = (
                " (creating a TAP needs CAP_NET_ADMIN)" if error.errno in (errno.EPERM, errno.EACCES) else ""
            )
            raise ConfigError(f"net tap:{name}: TUNSETIFF failed: {error.strerror}{hint}") from None
        except BaseException:
            os.close(self._fd)
            raise

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("tap backend is closed")
        return self._fd

    def receive(self) -> bytes | None:
        if self._fd is None:
            return None
        try:
            frame = os.read(self._fd, _RECV_BUFFER)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as error:
            log.warning("tap %s: read failed: %s", self.name, error)
            return None
        self.stats.frames_received += 1
        return frame

    def send(self, frame: bytes) -> bool:
        if self._fd is None:
            return False
        try:
            os.write(self._fd, frame)
        except OSError:  # full queue (EAGAIN), interface down (EIO): drop like a NIC
            self.stats.send_dropped += 1
            return False
        self.stats.frames_sent += 1
        return True

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class UdpBackend(NetBackend):
    """Frames as UDP datagrams between two ports on one host (default 127.0.0.1)."""

    def __init__(self, local_port: int, remote_port: int, host: str = "127.0.0.1") -> None:
        super().__init__()
        for port in (local_port, remote_port):
            if not 0 < port < 65536:
                raise ConfigError(f"net udp:{local_port}:{remote_port}: port {port} is out of range")
        self.remote = (host, remote_port)
        self._socket: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._socket.setblocking(False)
            self._socket.bind((host, local_port))
        except OSError as error:
            self._socket.close()
            raise ConfigError(
                f"net udp:{local_port}:{remote_port}: cannot bind {host}:{local_port}: {error.strerror}"
            ) from None
        self.local_port = self._socket.getsockname()[1]

    def fileno(self) -> int:
        if self._socket is None:
            raise ValueError("udp backend is closed")
        return self._socket.fileno()

    def receive(self) -> bytes | None:
        sock = self._socket
        while sock is not None:
            try:
                frame, sender = sock.recvfrom(_RECV_BUFFER)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as error:  # e.g. ECONNREFUSED reported for an earlier send
                self.stats.receive_errors += 1
                log.debug("udp backend port %d: receive error %s", self.local_port, error)
                return None
            if sender[:2] != self.remote:
                self.stats.receive_ignored += 1
                continue
            self.stats.frames_received += 1
            return frame
        return None

    def send(self, frame: bytes) -> bool:
        sock = self._socket
        if sock is None:
            return False
        try:
            sock.sendto(frame, self.remote)
        except OSError:  # socket buffer full, peer absent: drop
            self.stats.send_dropped += 1
            return False
        self.stats.frames_sent += 1
        return True

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def open_net_backend(spec: str) -> NetBackend:
    """Open ``tap:NAME`` or ``udp:LOCAL_PORT:REMOTE_PORT``; ConfigError with the accepted forms otherwise."""
    kind, _, rest = spec.partition(":")
    if kind == "tap" and rest:
        return TapBackend(rest)
    if kind == "udp":
        local, _, remote = rest.partition(":")
        try:
            return UdpBackend(int(local), int(remote))
        except ValueError:
            pass
    raise ConfigError(f"net backend {spec!r}: expected tap:NAME or udp:LOCAL_PORT:REMOTE_PORT")
