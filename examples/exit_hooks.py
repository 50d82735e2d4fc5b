"""Exit hooks: count the demo guest's serial-port exits per guest function, without editing vmscope.

python examples/exit_hooks.py
"""

from __future__ import annotations

from collections import Counter

import vmscope
from vmscope.guest.build import demo_guest
from vmscope.symbols import Symbolizer


def main() -> int:
    image = demo_guest()
    symbols = Symbolizer.from_elf(image)
    by_function: Counter[str] = Counter()

    def on_serial_exit(event: vmscope.ExitEvent) -> None:
        symbol = symbols.lookup(event.rip)
        by_function[symbol.name if symbol else hex(event.rip)] += 1

    with vmscope.Machine(mem="64M") as vm:
        vmscope.install_platform_devices(vm, serial="none")
        vm.add_exit_hook(on_serial_exit, reasons=["IO"], addresses=range(0x3F8, 0x400))
        vm.load(image, cmdline="iterations=1")
        result = vm.run()
    for function, count in by_function.most_common():
        print(f"{count:6d}  {function}")
    return 0 if result.exit_status == 0 else 1  # the demo powers off (ACPI S5) on success


if __name__ == "__main__":
    raise SystemExit(main())
