"""A fault-injecting device: every third write raises, to show how vmscope contains device bugs.

python examples/fault_injecting_device.py          # errors are logged, the guest runs on
python examples/fault_injecting_device.py --strict # the first error stops the VM (status 1)
"""

from __future__ import annotations

import argparse
import logging

import vmscope
from vmscope.guest.build import demo_guest


class FlakyDevice(vmscope.Device):
    name = "flaky"

    def __init__(self, fail_every: int = 3) -> None:
        self.fail_every = fail_every
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        if self.writes % self.fail_every == 0:
            raise OSError(f"injected fault on write #{self.writes}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strict", action="store_true", help="stop the VM on the first device error")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    with vmscope.Machine(mem="64M", strict_devices=args.strict) as vm:
        vmscope.install_platform_devices(vm, serial="none")
        vm.add_pio_device(0x510, 0x10, FlakyDevice())
        vm.load(demo_guest(), cmdline="iterations=2")
        result = vm.run()
        errors = vm.pio_bus.device_errors["flaky"]
    print(f"{result.reason}; exit status {result.exit_status}; {errors} device error(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
