"""Booting Debian's stock cloud kernel on real KVM, with an initramfs from `vmscope initramfs`.

On a VT-x/AMD-V host the kernel boots to the busybox shell, runs a command typed on the serial
console and powers off through ACPI. On a kvm_pvm (software virtualization) host the kernel
cannot get that far (see ../shared/HOST-KVM.md): there the test checks what the kernel itself
prints about the machine vmscope built, and that the run ends with the emulation-failure
diagnosis rather than a hang. The kernel boots as a PVH vmlinux: the bzImage decompressor runs
minutes of CPL0 code, which software virtualization emulates instruction by instruction.

The virtio tests boot two VMs linked by virtio-net over UDP, one with a virtio-blk ext4 disk,
with the kernel's own virtio modules (tests/kernel_fixture.py) loaded by /init. vmscope runs them
on a VT-x/AMD-V host only; the same guests also run under QEMU's TCG emulator wherever QEMU is
installed, so the guest side of that test is checked on every host.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import vmscope
from tests.kernel_fixture import (
    debian_kernel,
    kernel_modules,
    kernel_version,
    loadable_modules,
    module_closure,
    pvh_vmlinux,
)
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


@pytest.mark.guest_support(
    "Linux PVH vmlinux",
    devices="COM1 serial, ACPI, 2 vCPUs, initramfs",
    detail="Debian linux-image-cloud-amd64 (bookworm 6.1), early boot: banner, e820, command line",
)
def test_stock_kernel_reports_the_machine_vmscope_built(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    if HARDWARE:
        pytest.skip("on a VT-x/AMD-V host the full boot test below covers this and more")
    console = tmp_path / "console.log"
    # KVM's own behaviour: the first instruction it cannot emulate ends the run, diagnosed
    # (vmscope's fallback emulator would take the kernel further; tests/kvm/test_emulate_fallback.py)
    with Machine(mem="512M", cpus=2, emulate_fallback=False) as machine:
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


@pytest.mark.linux_full  # more stock-kernel boots to user space: tens of minutes each on kvm_pvm hosts
@pytest.mark.guest_support(
    "Linux PVH vmlinux",
    devices="COM1 serial, ACPI power-off, 2 vCPUs, busybox initramfs",
    detail="Debian linux-image-cloud-amd64 (bookworm 6.1), to a shell and power-off",
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


# --- virtio-blk and virtio-net under the stock kernel ------------------------------------------

#: what /init loads (the closure adds virtio, virtio_ring, the PCI helpers and net_failover);
#: ext4, jbd2, mbcache and crc16 are built into Debian's cloud kernel and so add nothing
VIRTIO_MODULES = ("virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "ext4")
VIRTIO_CMDLINE = "console=ttyS0 nokaslr panic=-1 vmscope.test=virtio"
MARK = "vmscope-virtio:"
GUEST_ADDRESSES = ("10.0.2.1", "10.0.2.2")
PEER_PORT = 7777  # VM 2 listens here (inside the guests' network) for VM 1's "done" message
TRANSPORT_PATH = {"pci": "/pci0000:00/", "mmio": "/LNRO0005:"}  # in a virtio device's sysfs path
VIRTIO_VM_TIMEOUT_S = 240


def virtio_init_script(vm: int, modules: list[str], token: str) -> str:
    """/init for VM ``vm`` (1 or 2): load the modules, bring up eth0, then VM 1 mounts /dev/vda,
    reads and writes a file and pings VM 2, and tells it so over TCP; VM 2 waits for that word.

    Every step prints a ``vmscope-virtio:`` line; a failing step prints ``FAIL`` and powers off,
    so the host sees how far the guest got. Every wait in here is bounded.
    """
    address, peer = GUEST_ADDRESSES if vm == 1 else GUEST_ADDRESSES[::-1]
    lines = [
        "#!/bin/sh",
        f"# vmscope virtio test, VM {vm}",
        "export PATH=/bin:/sbin:/usr/bin:/usr/sbin",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        "mkdir -p /usr/bin /usr/sbin /mnt && /bin/busybox --install -s",
        f'say() {{ echo "{MARK} $*"; }}',
        'fail() { say "FAIL: $*"; sync; poweroff -f; sleep 10; }',
        # wait up to 10 s for a path to appear (drivers probe asynchronously)
        'await() { n=0; while [ ! -e "$1" ]; do n=$((n+1)); [ $n -gt 100 ] && return 1; sleep 0.1; done; }',
        *(f"insmod /lib/modules/{name}.ko || fail 'insmod {name}'" for name in modules),
        f'say "vm{vm} modules loaded: {len(modules)}"',
        "await /sys/class/net/eth0 || fail 'no eth0'",
        f'say "vm{vm} eth0 at $(readlink -f /sys/class/net/eth0/device)"',
        "ip link set lo up",
        f"ip addr add {address}/24 dev eth0 || fail 'ip addr'",
        "ip link set eth0 up || fail 'ip link up'",
        f'say "vm{vm} eth0 up as {address}"',
    ]
    if vm == 1:
        lines += [
            "await /dev/vda || fail 'no /dev/vda'",
            'say "vm1 vda at $(readlink -f /sys/block/vda/device)"',
            "mount -t ext4 /dev/vda /mnt || fail 'mount /dev/vda'",
            "say \"vm1 mounted: $(grep '^/dev/vda ' /proc/mounts)\"",
            'say "vm1 file: $(cat /mnt/hello.txt)"',
            f"echo 'written by vm1 {token}' > /mnt/from-guest.txt || fail 'write'",
            "umount /mnt || fail 'umount'",
            'say "vm1 unmounted"',
            # the peer may still be booting: wait for its first reply (ARP included), at most ~90 s
            "n=0",
            f"until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do",
            "  n=$((n+1)); [ $n -gt 60 ] && fail 'peer never answered'; sleep 0.5",
            "done",
            'say "vm1 peer answered after $n retries"',
            f"ping -c 3 {peer}",
            'say "vm1 ping exit status $?"',
            "n=0",
            f"until echo 'done-{token}' | nc {peer} {PEER_PORT}; do",
            "  n=$((n+1)); [ $n -gt 10 ] && fail 'peer took no message'; sleep 1",
            "done",
            'say "vm1 done"',
        ]
    else:
        lines += [
            f"message=$(timeout {VIRTIO_VM_TIMEOUT_S - 60} nc -l -p {PEER_PORT})",
            'say "vm2 received: $message"',
        ]
    lines += ["sync", "poweroff -f", "sleep 10", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class VirtioGuests:
    """Everything the two VMs need: initrds for VM 1 and 2, the ext4 image, the token in it."""

    initrds: tuple[Path, Path]
    image: Path
    token: str
    modules: tuple[str, ...]


def make_ext4_image(directory: Path, content: str) -> Path:
    """A 16 MiB ext4 image holding /hello.txt, made by mkfs.ext4 -d (e2fsprogs)."""
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if mkfs is None:
        pytest.skip("needs mkfs.ext4 to make the disk image (apt-get install e2fsprogs)")
    tree = directory / "image-root"
    tree.mkdir()
    (tree / "hello.txt").write_text(content + "\n")
    image = directory / "disk.ext4"
    with image.open("wb") as sparse:
        sparse.truncate(16 << 20)
    result = subprocess.run(
        [mkfs, "-q", "-F", "-t", "ext4", "-L", "vmscope", "-d", str(tree), str(image)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return image


def read_ext4_file(image: Path, name: str) -> str | None:
    """A file's text from an ext4 image (debugfs, e2fsprogs), or None when it is not there."""
    debugfs = shutil.which("debugfs") or shutil.which("debugfs", path="/usr/sbin:/sbin")
    assert debugfs is not None, "debugfs (e2fsprogs) is missing"
    result = subprocess.run(
        [debugfs, "-R", f"cat /{name}", str(image)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0 or "File not found" in result.stderr:
        return None
    return result.stdout


@pytest.fixture(scope="module")
def modules_dir(kernel: Path) -> Path:
    lookup = kernel_modules(kernel)
    if lookup.path is None:
        pytest.skip(f"the kernel's modules are not available: {lookup.reason}")
    return lookup.path


@pytest.fixture
def virtio_guests(tmp_path: Path, modules_dir: Path) -> VirtioGuests:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("needs a static busybox for the initramfs (apt-get install busybox-static)")
    token = secrets.token_hex(8)
    image = make_ext4_image(tmp_path, f"hello from virtio-blk {token}")
    additions = loadable_modules(module_closure(modules_dir, VIRTIO_MODULES), tmp_path / "modules")
    names = [Path(destination).stem for _, destination in additions]
    initrds = []
    for vm in (1, 2):
        path = tmp_path / f"initrd-vm{vm}.cpio.gz"
        build_initramfs(
            path, busybox=busybox, init_script=virtio_init_script(vm, names, token), additions=additions
        )
        initrds.append(path)
    return VirtioGuests((initrds[0], initrds[1]), image, token, tuple(names))


def free_udp_ports() -> tuple[int, int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for udp in sockets:
            udp.bind(("127.0.0.1", 0))
        return sockets[0].getsockname()[1], sockets[1].getsockname()[1]
    finally:
        for udp in sockets:
            udp.close()


def run_vm_pair(commands: list[list[str]], limit_s: float, log_dir: Path) -> list[int]:
    """Start both VMM processes, wait for both within ``limit_s``; kill whatever is left.

    Each process's own output goes to ``log_dir/vmmN.out`` (vmscope's crash report, QEMU's errors).
    """
    source = str(Path(vmscope.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    processes = []
    for number, command in enumerate(commands, 1):
        with (log_dir / f"vmm{number}.out").open("wb") as log:
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + limit_s
    statuses: list[int] = []
    try:
        for process in processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            statuses.append(process.returncode if process.returncode is not None else -1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    return statuses


def check_virtio_consoles(
    guests: VirtioGuests, consoles: tuple[str, str], statuses: list[int], transport: str
) -> None:
    """What both VMs must have printed, and what VM 1 must have left on the disk."""
    vm1, vm2 = consoles
    assert f"{MARK} FAIL" not in vm1 + vm2, f"VM 1:\n{vm1[-3000:]}\nVM 2:\n{vm2[-3000:]}"
    for vm, text in ((1, vm1), (2, vm2)):
        assert f"{MARK} vm{vm} modules loaded: {len(guests.modules)}" in text, text[-3000:]
        assert f"{MARK} vm{vm} eth0 up as {GUEST_ADDRESSES[vm - 1]}" in text, text[-3000:]
        eth0 = re.search(rf"{MARK} vm{vm} eth0 at (\S+)", text)
        assert eth0 is not None and TRANSPORT_PATH[transport] in eth0.group(1), text[-3000:]
    vda = re.search(rf"{MARK} vm1 vda at (\S+)", vm1)
    assert vda is not None and TRANSPORT_PATH[transport] in vda.group(1), vm1[-3000:]
    assert re.search(rf"{MARK} vm1 mounted: /dev/vda /mnt ext4 rw", vm1), vm1[-3000:]
    assert f"{MARK} vm1 file: hello from virtio-blk {guests.token}" in vm1
    assert re.search(r"3 packets transmitted, 3 (packets )?received", vm1), vm1[-3000:]
    assert f"{MARK} vm1 ping exit status 0" in vm1
    assert f"{MARK} vm1 done" in vm1
    assert f"{MARK} vm2 received: done-{guests.token}" in vm2, vm2[-3000:]
    assert statuses == [0, 0], f"exit statuses {statuses}\nVM 1:\n{vm1[-2000:]}\nVM 2:\n{vm2[-2000:]}"
    assert read_ext4_file(guests.image, "from-guest.txt") == f"written by vm1 {guests.token}\n"


@pytest.mark.linux_full  # more stock-kernel boots to user space: tens of minutes each on kvm_pvm hosts
@pytest.mark.guest_support(
    "Linux PVH vmlinux",
    devices="virtio-blk, virtio-net over virtio-pci and virtio-mmio",
    detail="Debian linux-image-cloud-amd64 (bookworm 6.1): mounts a disk, pings",
)
@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_stock_kernel_mounts_virtio_blk_and_pings_over_virtio_net(
    tmp_path: Path, kernel: Path, virtio_guests: VirtioGuests, transport: str
) -> None:
    """Two ``vmscope run`` processes linked by ``--net udp:A:B`` / ``udp:B:A``; VM 1 also has
    ``--disk`` with an ext4 image. /init loads the drivers, VM 1 mounts /dev/vda, reads the
    host's file and writes one back (checked on the host with debugfs), pings VM 2 three times
    and tells it so over TCP; both power off.

    Transports: in Debian's cloud kernel (6.1) CONFIG_VIRTIO_PCI and CONFIG_VIRTIO_MMIO are
    both modules (=m) and CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is off, so /init insmods the
    closure of virtio_pci, virtio_mmio, virtio_blk and virtio_net (ext4 is built in), and the
    devices must be found through ACPI: over PCI via the PNP0A03 host bridge in the DSDT, over
    MMIO via the DSDT's LNRO0005 devices, which virtio_mmio.ko matches (alias acpi*:LNRO0005:*).
    tests/unit/test_kernel_modules.py checks these facts on the package. ``vmscope run`` puts a
    distribution kernel's (bzImage's) devices on PCI and a PVH ELF's on virtio-mmio, so the
    "pci" case boots the bzImage and the "mmio" case the PVH vmlinux: both ways users run it.
    The guest prints its devices' sysfs paths, and the test checks each sits on the transport
    under test. test_virtio_guest_side_on_the_reference_vmm runs the same guests under QEMU.
    """
    image = kernel.with_name("vmlinuz-" + kernel_version(kernel)) if transport == "pci" else kernel
    port_a, port_b = free_udp_ports()
    consoles = (tmp_path / "vm1.log", tmp_path / "vm2.log")
    commands = []
    for vm, (local, remote) in ((1, (port_a, port_b)), (2, (port_b, port_a))):
        command = [
            sys.executable, "-m", "vmscope", "run", "--kernel", str(image),
            "--initrd", str(virtio_guests.initrds[vm - 1]), "--cmdline", VIRTIO_CMDLINE,
            "--mem", "512M", "--cpus", "2", "--serial", f"file:{consoles[vm - 1]}",
            "--net", f"udp:{local}:{remote}", "--timeout", str(VIRTIO_VM_TIMEOUT_S),
        ]  # fmt: skip
        if vm == 1:
            command += ["--disk", str(virtio_guests.image)]
        commands.append(command)
    statuses = run_vm_pair(commands, VIRTIO_VM_TIMEOUT_S + 60, tmp_path)
    check_virtio_consoles(virtio_guests, read_consoles(tmp_path, consoles), statuses, transport)


def read_consoles(log_dir: Path, consoles: tuple[Path, Path]) -> tuple[str, str]:
    """Each VM's serial console, followed by its VMM's own output (for failure messages)."""
    texts = []
    for number, console in enumerate(consoles, 1):
        text = console.read_text(errors="replace") if console.exists() else "(no console output)\n"
        vmm = log_dir / f"vmm{number}.out"
        texts.append(
            text + "\n--- VMM output ---\n" + (vmm.read_text(errors="replace") if vmm.exists() else "")
        )
    return texts[0], texts[1]


QEMU = shutil.which("qemu-system-x86_64")


def host_tsc_khz() -> int:
    """The host CPU's clock in kHz from /proc/cpuinfo (2 GHz if it says nothing)."""
    try:
        match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return int(float(match.group(1)) * 1000) if match else 2_000_000


@pytest.mark.qemu_reference  # minutes of TCG emulation: run on demand, see README
@pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86)")
@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_virtio_guest_side_on_the_reference_vmm(
    tmp_path: Path, kernel: Path, virtio_guests: VirtioGuests, transport: str
) -> None:
    """The guest half of the test above (modules, /init, disk image, ping and TCP handshake,
    every console check) on QEMU with its TCG emulator, which needs no KVM: so on a host where
    the vmscope test cannot run, what it expects from the guest is still known to hold for
    Debian's kernel. QEMU's q35 gives virtio-pci devices behind an ACPI PCI host bridge, and
    its microvm (ACPI on) virtio-mmio devices described as LNRO0005 in the DSDT, as vmscope does.
    """
    assert QEMU is not None
    port_a, port_b = free_udp_ports()
    consoles = (tmp_path / "vm1.log", tmp_path / "vm2.log")
    suffix = "pci" if transport == "pci" else "device"
    image = kernel.with_name("vmlinuz-" + kernel_version(kernel)) if transport == "pci" else kernel
    cmdline = VIRTIO_CMDLINE
    if transport == "mmio":
        # microvm has no HPET or ACPI PM timer: when the PIT calibration of the TSC fails (a TCG
        # vCPU descheduled on a busy host), the kernel stops early. Give it the TSC rate (TCG's
        # guest TSC is the host's) instead.
        cmdline += f" tsc_early_khz={host_tsc_khz()}"
    commands = []
    for vm, (local, remote) in ((1, (port_a, port_b)), (2, (port_b, port_a))):
        command = [
            QEMU, "-accel", "tcg", "-nodefaults", "-display", "none", "-no-reboot", "-m", "512",
            "-M", "q35" if transport == "pci" else "microvm,acpi=on",
            "-kernel", str(image),
            "-initrd", str(virtio_guests.initrds[vm - 1]), "-append", cmdline,
            "-serial", f"file:{consoles[vm - 1]}",
            "-netdev", f"socket,id=net0,udp=127.0.0.1:{remote},localaddr=127.0.0.1:{local}",
            "-device", f"virtio-net-{suffix},netdev=net0",
        ]  # fmt: skip
        if vm == 1:
            command += [
                "-drive", f"file={virtio_guests.image},format=raw,if=none,id=disk0",
                "-device", f"virtio-blk-{suffix},drive=disk0",
            ]  # fmt: skip
        commands.append(command)
    statuses = run_vm_pair(commands, VIRTIO_VM_TIMEOUT_S + 60, tmp_path)
    check_virtio_consoles(virtio_guests, read_consoles(tmp_path, consoles), statuses, transport)


# --- one full boot to user space on every host: shell, disks on both transports, network -------

#: test-only speed-ups (every one is an ordinary kernel parameter; vmscope itself adds none):
#: skip the ftrace weak-function scan (37,000 kallsyms lookups, minutes of emulated kernel code on
#: kvm_pvm) and the crypto self-tests
FULL_BOOT_CMDLINE = (
    "console=ttyS0 panic=-1 initcall_blacklist=ftrace_check_for_weak_functions cryptomgr.notests"
)
SHELL_MARK = "vmscope-shell:"
#: how long the boot to the shell may take: minutes on kvm_pvm (measured there: 1278 s to the shell,
#: 1434 s for the whole test), seconds elsewhere
FULL_BOOT_LIMIT_S = 40 * 60 if not HARDWARE else 300


def shell_init_script(modules: list[str]) -> str:
    """/init: the kernel filesystems, the virtio modules, then a shell on the console."""
    return "\n".join(
        [
            "#!/bin/sh",
            "export PATH=/bin:/sbin:/usr/bin:/usr/sbin",
            "mount -t proc proc /proc",
            "mount -t sysfs sysfs /sys",
            "mount -t devtmpfs devtmpfs /dev",
            "mkdir -p /usr/bin /usr/sbin /mnt && /bin/busybox --install -s",
            *(
                f"insmod /lib/modules/{name}.ko || echo '{SHELL_MARK} insmod {name} failed'"
                for name in modules
            ),
            f"echo '{SHELL_MARK} ready'",
            "exec /bin/sh </dev/console >/dev/console 2>&1",
            "",
        ]
    )


class GuestConsole:
    """The guest's serial console through vmscope's ``unix:`` backend."""

    def __init__(self, path: Path, log: Path, connect_timeout_s: float = 120.0) -> None:
        self.output = bytearray()
        #: everything the guest printed, kept for whoever reads a failed run's files
        self.log = log.open("ab")
        self._serial = 0
        deadline = time.monotonic() + connect_timeout_s
        while True:
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.socket.connect(str(path))
                break
            except OSError:
                self.socket.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.socket.settimeout(0.5)

    def expect(self, marker: str, timeout_s: float, start: int = 0) -> bool:
        """Read until ``marker`` appears after offset ``start`` of the output."""
        deadline = time.monotonic() + timeout_s
        wanted = marker.encode()
        while wanted not in self.output[start:]:
            if time.monotonic() > deadline:
                return False
            try:
                chunk = self.socket.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return False
            self.output.extend(chunk)
            self.log.write(chunk)
            self.log.flush()
        return True

    def run(self, command: str, timeout_s: float = 300.0) -> str:
        """Type ``command`` and return what it printed (the end is marked by arithmetic the tty
        echo of the typed line cannot contain)."""
        self._serial += 1
        start = len(self.output)
        self.socket.sendall(f"{command}; echo done-$(({self._serial}*1000+7))\n".encode())
        end_mark = f"done-{self._serial * 1000 + 7}"
        assert self.expect(end_mark, timeout_s, start), (
            f"no {end_mark!r} after {command!r}:\n{self.text[-3000:]}"
        )
        return self.output[start:].decode(errors="replace")

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def close(self) -> None:
        self.socket.close()
        self.log.close()


def vmscope_process(arguments: list[str], log: Path) -> subprocess.Popen[bytes]:
    source = str(Path(vmscope.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "vmscope", *arguments], stdout=output, stderr=subprocess.STDOUT, env=env
        )


@pytest.mark.guest_support(
    "Linux bzImage",
    devices="COM1 serial (unix socket), ACPI power-off, virtio-blk on virtio-pci and virtio-mmio, virtio-net",
    detail="Debian linux-image-cloud-amd64 (bookworm 6.1): shell, ext4 on both transports, ping, snapshot",
)
def test_stock_kernel_reaches_a_shell_mounts_disks_pings_a_restored_twin_and_powers_off(
    tmp_path: Path, kernel: Path, modules_dir: Path
) -> None:
    """The user-space test that runs on every host, this project's kvm_pvm ones included (one
    boot: tens of minutes there). Debian's bzImage with a busybox initramfs that loads the
    virtio modules boots to a shell on a unix-socket console; the shell runs a command, mounts
    an ext4 virtio-blk disk on virtio-pci and another on virtio-mmio (reads the host's file,
    writes one the host checks), brings up eth0, and the VM is snapshotted. A second VM restored
    from that snapshot, linked by virtio-net over UDP, takes another address, and the first pings
    it. Both power off through ACPI with status 0.
    """
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("needs a static busybox for the initramfs (apt-get install busybox-static)")
    bzimage = kernel.with_name("vmlinuz-" + kernel_version(kernel))
    token = secrets.token_hex(8)
    disks = []
    for transport in ("pci", "mmio"):
        directory = tmp_path / transport
        directory.mkdir()
        disks.append(make_ext4_image(directory, f"hello from virtio-blk over {transport} {token}"))
    additions = loadable_modules(module_closure(modules_dir, VIRTIO_MODULES), tmp_path / "modules")
    names = [Path(destination).stem for _, destination in additions]
    initrd = tmp_path / "initrd.cpio"  # uncompressed: inflating it is minutes of emulated code on kvm_pvm
    build_initramfs(
        initrd, busybox=busybox, init_script=shell_init_script(names), additions=additions, compress=False
    )
    port_a, port_b = free_udp_ports()
    control, snapshot = tmp_path / "vm1.ctl", tmp_path / "vm1.snap"
    consoles = (tmp_path / "vm1.console", tmp_path / "vm2.console")
    started = time.monotonic()
    vm1 = vmscope_process(
        [
            "run", "--kernel", str(bzimage), "--initrd", str(initrd), "--cmdline", FULL_BOOT_CMDLINE,
            "--mem", "256M", "--serial", f"unix:{consoles[0]}", "--control", str(control),
            "--disk", f"{disks[0]},transport=pci", "--disk", f"{disks[1]},transport=mmio",
            "--net", f"udp:{port_a}:{port_b}", "--timeout", str(FULL_BOOT_LIMIT_S + 600),
        ],
        tmp_path / "vm1.out",
    )  # fmt: skip
    vm2: subprocess.Popen[bytes] | None = None
    shell = twin = None
    try:
        shell = GuestConsole(consoles[0], tmp_path / "vm1.console.log")
        assert shell.expect(f"{SHELL_MARK} ready", FULL_BOOT_LIMIT_S), shell.text[-5000:]
        boot_s = time.monotonic() - started
        assert f"{SHELL_MARK} insmod" not in shell.text, shell.text[-5000:]
        assert "hello-42" in shell.run("echo hello-$((6*7))")
        # which disk sits on which transport: the sysfs path of its device (probe order varies)
        device_for = {}
        for name in ("vda", "vdb"):
            where = shell.run(f"readlink -f /sys/block/{name}/device")
            device_for.update(
                {transport: name for transport, part in TRANSPORT_PATH.items() if part in where}
            )
        assert sorted(device_for) == ["mmio", "pci"], shell.text[-3000:]
        for transport, name in sorted(device_for.items()):
            shell.run(f"mkdir -p /mnt/{transport} && mount -t ext4 /dev/{name} /mnt/{transport}")
            content = shell.run(f"cat /mnt/{transport}/hello.txt")
            assert f"hello from virtio-blk over {transport} {token}" in content, content
            shell.run(f"echo 'written over {transport} {token}' > /mnt/{transport}/from-guest.txt")
            shell.run(f"umount /mnt/{transport}")
        shell.run(f"ip link set lo up; ip addr add {GUEST_ADDRESSES[0]}/24 dev eth0; ip link set eth0 up")
        answer = subprocess.run(
            [sys.executable, "-m", "vmscope", "ctl", str(control), "snapshot", str(snapshot)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert answer.returncode == 0, answer.stderr
        vm2 = vmscope_process(
            [
                "run",
                "--restore",
                str(snapshot),
                "--serial",
                f"unix:{consoles[1]}",
                "--net",
                f"udp:{port_b}:{port_a}",
            ],
            tmp_path / "vm2.out",
        )
        twin = GuestConsole(consoles[1], tmp_path / "vm2.console.log")
        twin.run(
            f"ip link set eth0 down; ip link set eth0 address 52:54:00:76:6d:02; ip addr flush dev eth0; "
            f"ip addr add {GUEST_ADDRESSES[1]}/24 dev eth0; ip link set eth0 up"
        )
        pinged = shell.run(f"ping -c 3 -W 5 {GUEST_ADDRESSES[1]}", timeout_s=300)
        assert re.search(r"3 packets transmitted, 3 (packets )?received", pinged), pinged
        twin.socket.sendall(b"poweroff -f\n")
        shell.socket.sendall(b"poweroff -f\n")
        assert vm1.wait(timeout=300) == 0
        assert vm2.wait(timeout=300) == 0
    finally:
        for console in (shell, twin):
            if console is not None:
                console.close()
        for process in (vm1, vm2):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    print(f"boot to the shell took {boot_s:.0f} s")
    for disk, transport in zip(disks, ("pci", "mmio"), strict=True):
        assert read_ext4_file(disk, "from-guest.txt") == f"written over {transport} {token}\n"
