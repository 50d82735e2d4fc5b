"""Run the demo guest in the background, pause it, read its registers and code, resume.

python examples/pause_and_inspect.py
"""

from __future__ import annotations

import time

import vmscope
from vmscope.guest.build import demo_guest


def main() -> int:
    with vmscope.Machine(mem="64M") as vm:
        vmscope.install_platform_devices(vm, serial="none")
        vm.load(demo_guest(), cmdline="iterations=50")
        vm.start()
        time.sleep(0.2)
        vm.pause()
        registers = vm.get_registers(0)
        code = vm.read_virtual(registers["rip"], 16)
        print(f"paused at rip={registers['rip']:#x} cs={registers['cs']:#x} cr3={registers['cr3']:#x}")
        print(f"next bytes: {code.hex(' ')}")
        vm.resume()
        result = vm.wait()
    assert result is not None
    print(f"{result.reason} (exit status {result.exit_status})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
