"""A custom port-I/O device that logs every access, on the bundled demo guest.

    python examples/logging_device.py

The demo guest writes its phase markers to port 0x510; this device claims ports 0x510-0x51f,
prints each access and answers reads with a counter. It knows nothing of KVM: it implements
read/write on offsets, like every vmscope device.
"""

from __future__ import annotations

import vmscope
from vmscope.guest.build import demo_guest


class LoggingDevice(vmscope.Device):
    name = "logger"

    def __init__(self) -> None:
        self.accesses = 0

    def read(self, offset: int, size: int) -> bytes:
        self.accesses += 1
        print(f"logger: read  +{offset:#x} ({size} bytes)")
        return self.accesses.to_bytes(8, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.accesses += 1
        print(f"logger: write +{offset:#x} = {data.hex()}")


def main() -> int:
    with vmscope.Machine(mem="64M") as vm:
        vmscope.install_platform_devices(vm, serial="none")
        logger = LoggingDevice()
        vm.add_pio_device(0x510, 0x10, logger)
        vm.load(demo_guest(), cmdline="iterations=2")
        result = vm.run()
    print(f"guest exited with status {result.exit_status} after {logger.accesses} device accesses")
    return 0 if result.exit_status == 0 else 1  # the demo powers off (ACPI S5) on success


if __name__ == "__main__":
    raise SystemExit(main())
