"""Booting Debian's stock cloud kernel on real KVM, with an initramfs from `vmscope initramfs`.

On a VT-x/AMD-V host the kernel boots to the busybox shell, runs a command typed on the serial
console and powers off through ACPI. On a kvm_pvm (software virtualization) host the kernel
cannot get that far (see ../shared/HOST-KVM.md): there the test checks what the kernel itself
prints about the machine vmscope built, and that the run ends with the emulation-failure
diagnosis rather than a hang. The kernel boots as a PVH vmlinux: the bzImage decompressor runs
minutes of CPL0 code, which software virtualization emulates instruction by instruction.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.kernel_fixture import debian_kernel, pvh_vmlinux
from vmscope.arch.x86.layout import PVH_START_INFO_ADDRESS
from vmscope.initramfs import build_initramfs
from vmscope.kvm import detect_backend
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

pytestmark = pytest.mark.slow

CMDLINE = "console=ttyS0 earlyprintk=serial nokaslr panic=-1 vmscope.test=boot"
E820_NAMES = {1: "usable", 2: "reserved", 3: "ACPI data", 4: "ACPI NVS", 5: "unusable"}
HARDWARE = detect_backend() in ("kvm_intel", "kvm_amd")


@pytest.fixture(scope="module")
def kernel() -> Path:
    lookup = debian_kernel()
    if lookup.path is None:
        pytest.skip(f"Debian's kernel package is not available: {lookup.reason}")
    vmlinux = pvh_vmlinux(lookup.path)
    if vmlinux.path is None:
        pytest.skip(f"cannot extract vmlinux: {vmlinux.reason}")
    return vmlinux.path


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("initrd") / "initrd.cpio.gz"
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("needs a static busybox for the initramfs (apt-get install busybox-static)")
    build_initramfs(path, busybox=busybox, init_script=None)
    return path


def pvh_memory_map(machine: Machine) -> list[tuple[int, int, int]]:
    """(address, size, type) entries vmscope put in hvm_start_info for the kernel."""
    start_info = machine.memory.read(PVH_START_INFO_ADDRESS, 56)
    memmap_paddr, memmap_entries = struct.unpack_from("<QI", start_info, 40)
    table = machine.memory.read(memmap_paddr, memmap_entries * 24)
    return [struct.unpack_from("<QQI", table, 24 * i) for i in range(memmap_entries)]


def test_stock_kernel_reports_the_machine_vmscope_built(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    if HARDWARE:
        pytest.skip("on a VT-x/AMD-V host the full boot test below covers this and more")
    console = tmp_path / "console.log"
    with Machine(mem="512M", cpus=2) as machine:
        install_platform_devices(machine, serial=f"file:{console}")
        guest = machine.load(kernel, cmdline=CMDLINE, modules=[initrd])
        memory_map = pvh_memory_map(machine)
        initrd_segment = next(s for s in guest.segments if "module" in s.description)
        result = machine.run(timeout=420)
    text = console.read_text(errors="replace")

    assert re.search(r"Linux version 6\.\d+\.\S+-cloud-amd64", text), text[:2000]
    assert f"Command line: {CMDLINE}" in text
    printed = re.findall(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (.+)", text)
    expected = [(f"{a:016x}", f"{a + n - 1:016x}", E820_NAMES[t]) for a, n, t in memory_map]
    assert [(a, b, c.strip()) for a, b, c in printed] == expected
    ramdisk_end = (initrd_segment.address + initrd_segment.size + 0xFFF) & ~0xFFF
    assert f"RAMDISK: [mem {initrd_segment.address:#010x}-{ramdisk_end - 1:#010x}]" in text
    assert "smpboot: Allowing 2 CPUs, 0 hotplug CPUs" in text
    assert "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23" in text
    assert "ACPI: RSDP 0x00000000000E0000" in text

    # the stop: an emulation failure, diagnosed, not a hang and not a time-out
    assert result.exit_status == 1, result.reason
    assert result.crash is not None
    assert "emulation failure" in result.crash.reason
    assert result.crash.instruction is not None
    assert result.crash.hint is not None and "kvm_pvm" in result.crash.hint


@pytest.mark.skipif(
    not HARDWARE, reason="needs VT-x/AMD-V: this host's KVM cannot run a stock kernel to user space"
)
def test_stock_kernel_boots_to_a_shell_and_powers_off(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    path = str(tmp_path / "console.sock")
    with Machine(mem="512M", cpus=2) as machine:
        install_platform_devices(machine, serial=f"unix:{path}")
        machine.load(kernel, cmdline=CMDLINE, modules=[initrd])
        output = bytearray()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.settimeout(1.0)

        def read_until(marker: bytes, deadline: float) -> bool:
            while time.monotonic() < deadline:
                try:
                    chunk = client.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    return False
                output.extend(chunk)
                if marker in output:
                    return True
            return False

        machine.start()
        assert read_until(b"vmscope-initramfs: ready", time.monotonic() + 120), output.decode(
            errors="replace"
        )
        client.sendall(b"echo hello-$((6*7))\n")
        assert read_until(b"hello-42", time.monotonic() + 30)
        client.sendall(b"poweroff -f\n")
        result = machine.wait(timeout=60)
        client.close()
    assert result is not None and result.exit_status == 0, result
    assert "powered off" in result.reason
