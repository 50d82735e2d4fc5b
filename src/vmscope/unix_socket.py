"""Listening UNIX stream sockets at a path: claiming a stale path, binding privately, cleaning up.

Shared by the control socket and the ``unix:`` serial backend. A path is only ever replaced when
it holds a socket nobody listens on any more (left by a VMM that died); a file of another kind,
or a live socket, is an error. Errors are :class:`ConfigError` prefixed with ``what`` (e.g.
"control socket /tmp/vm.sock"), since the path comes from the user.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from vmscope.errors import ConfigError

#: (st_dev, st_ino) of the socket file a listener created
SocketIdentity = tuple[int, int]


def socket_is_live(path: str) -> bool:
    """Whether a process accepts connections on the UNIX socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def claim_socket_path(path: str, what: str) -> None:
    """Make ``path`` free for a new socket: remove a stale socket there, refuse anything else."""
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise ConfigError(f"{what}: {error.strerror or error}") from None
    if not stat.S_ISSOCK(existing.st_mode):
        raise ConfigError(f"{what}: the path exists and is not a socket; refusing to replace it")
    if socket_is_live(path):
        raise ConfigError(f"{what}: another process is listening there")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale: nobody listens on it any more


def listen_unix(
    path: str, what: str, *, backlog: int, private: bool = False
) -> tuple[socket.socket, SocketIdentity]:
    """A socket listening at ``path`` (claimed first) and the identity of its file.

    ``private``: only the owner may connect (mode 0600 from the moment the file exists).
    """
    claim_socket_path(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if private:
            # Linux creates the socket file with the socket inode's mode (minus the umask), so the
            # file is 0600 from the moment it exists; the checks below hold before listen() anyway.
            os.fchmod(sock.fileno(), 0o600)
        sock.bind(path)
        created = os.lstat(path)
        if not stat.S_ISSOCK(created.st_mode):
            raise ConfigError(f"{what}: replaced by something else while it was created")
        if private and stat.S_IMODE(created.st_mode) != 0o600:
            os.chmod(path, 0o600)
            created = os.lstat(path)
            if stat.S_IMODE(created.st_mode) != 0o600:
                raise ConfigError(f"{what}: cannot restrict its mode to 0600")
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise ConfigError(f"{what}: cannot listen: {error.strerror or error}") from None
    except BaseException:
        sock.close()
        raise
    return sock, (created.st_dev, created.st_ino)


def remove_socket_file(path: str, identity: SocketIdentity | None) -> None:
    """Remove ``path`` only while it is still the socket file with ``identity`` (never someone else's)."""
    if identity is None:
        return
    try:
        current = os.lstat(path)
    except OSError:
        return
    if (current.st_dev, current.st_ino) == identity:
        with contextlib.suppress(OSError):
            os.unlink(path)
