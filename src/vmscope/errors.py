"""One exception hierarchy for vmscope.

Every error a user can cause (bad file, bad option, missing /dev/kvm) derives from
:class:`VmscopeError` and carries a one-line message that says what is wrong and, where
possible, what to do. The CLI turns these into ``vmscope: <message>`` and exit status 2.
"""

from __future__ import annotations


class VmscopeError(Exception):
    """Base of every error vmscope raises on purpose."""

    #: process exit status the CLI uses for this error
    exit_status = 2


class ConfigError(VmscopeError):
    """A command-line option or API argument is invalid."""


class KvmError(VmscopeError):
    """A KVM ioctl failed."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class KvmUnavailableError(KvmError):
    """/dev/kvm is missing, not accessible, or lacks a capability vmscope needs."""


class GuestMemoryError(VmscopeError):
    """A guest-physical or guest-virtual access falls outside guest RAM or is unmapped."""

    def __init__(self, message: str, address: int | None = None) -> None:
        super().__init__(message)
        self.address = address


class PageFault(GuestMemoryError):
    """A guest-virtual address does not translate through the guest's page tables."""


class ImageFormatError(VmscopeError):
    """A guest image (kernel, ELF, flat binary, initrd) is malformed or cannot be loaded."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class DeviceError(VmscopeError):
    """A device model was misconfigured or a guest drove it into an invalid state."""


class DeviceStateError(VmscopeError):
    """A saved device state is malformed or does not fit the device it is loaded into."""

    def __init__(self, device: str, field: str, problem: str) -> None:
        super().__init__(f"{device}: state field {field!r}: {problem}")
        self.device = device
        self.field = field
        self.problem = problem


class BusConflictError(ConfigError):
    """Two devices were registered on overlapping address ranges."""


class GuestBuildError(VmscopeError):
    """The bundled guest could not be built with the system toolchain."""
