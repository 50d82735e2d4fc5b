"""Kernel modules for the Linux boot tests: modules.dep, dependency closure, initramfs contents.

Synthetic module trees (tiny ELF objects with a .modinfo section) always run; the checks on
Debian's real cloud kernel package run when it can be fetched or is cached (skipped with the
reason otherwise), and compare our modules.dep with depmod's where kmod is installed.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.kernel_fixture import (
    builtin_modules,
    config_for,
    debian_kernel,
    kernel_modules,
    loadable_modules,
    module_bytes,
    module_closure,
    module_info,
    module_name,
    read_modules_dep,
    write_modules_dep,
)
from tests.unit.rigs.newc import read_newc
from vmscope.initramfs import build_initramfs

BOOT_TEST_MODULES = ("virtio_blk", "virtio_net", "virtio_mmio", "virtio_pci", "ext4")


def fake_module(name: str, depends: list[str], extra: dict[str, str] | None = None) -> bytes:
    """A relocatable x86-64 ELF whose only content is a .modinfo section, like a .ko's."""
    fields = {"name": name.replace("-", "_"), "depends": ",".join(depends), **(extra or {})}
    modinfo = b"".join(f"{key}={value}".encode() + b"\0" for key, value in fields.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    modinfo_offset = 64
    shstrtab_offset = modinfo_offset + len(modinfo)
    section_headers = (shstrtab_offset + len(shstrtab) + 7) // 8 * 8
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 1, 62, 1, 0, 0, section_headers, 0, 64, 0, 0, 64, 3, 2)
    sections = [
        bytes(64),
        struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, modinfo_offset, len(modinfo), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstrtab_offset, len(shstrtab), 0, 0, 1, 0),
    ]
    body = header + modinfo + shstrtab
    return body + bytes(section_headers - len(body)) + b"".join(sections)


#: relative path -> direct dependencies; one xz, one gzip, one name with a dash
SYNTHETIC_TREE = {
    "kernel/lib/ring.ko": [],
    "kernel/lib/crc32c-fast.ko.xz": [],
    "kernel/core/bus.ko.gz": ["ring"],
    "kernel/core/failover.ko": [],
    "kernel/drivers/net_failover.ko": ["failover"],
    "kernel/drivers/blockdev.ko": ["bus", "ring", "crc32c_fast"],
    "kernel/drivers/netdev.ko": ["ring", "bus", "net_failover"],
    "kernel/drivers/transport.ko": ["bus", "ring"],
}
SYNTHETIC_BUILTIN = ["kernel/fs/extfs.ko", "kernel/lib/crc16.ko"]


@pytest.fixture
def synthetic_modules(tmp_path: Path) -> Path:
    root = tmp_path / "modules"
    for relative, depends in SYNTHETIC_TREE.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        plain = fake_module(module_name(relative), depends)
        if relative.endswith(".xz"):
            plain = lzma.compress(plain)
        elif relative.endswith(".gz"):
            plain = gzip.compress(plain)
        path.write_bytes(plain)
    (root / "modules.builtin").write_text("".join(f"{p}\n" for p in SYNTHETIC_BUILTIN))
    (root / "modules.order").write_text("".join(f"{p}\n" for p in SYNTHETIC_TREE))
    write_modules_dep(root)
    return root


def assert_load_order(paths: list[Path], direct: dict[str, list[str]], builtin: set[str]) -> None:
    """Every dependency of every listed module is listed before it, or built in; nothing twice."""
    names = [module_name(p) for p in paths]
    assert len(names) == len(set(names)), names
    assert not set(names) & builtin, f"built-in modules in the list: {set(names) & builtin}"
    for index, name in enumerate(names):
        for dependency in direct[name]:
            assert dependency in builtin or dependency in names[:index], (
                f"{name} needs {dependency}, which is neither built in nor loaded before it: {names}"
            )


def test_modules_dep_lists_every_indirect_dependency_last_loaded_first(synthetic_modules: Path) -> None:
    entries = read_modules_dep(synthetic_modules)
    assert {path for path, _ in entries.values()} == set(SYNTHETIC_TREE)
    path, netdev_deps = entries["netdev"]
    assert path == "kernel/drivers/netdev.ko"
    assert set(netdev_deps) == {"ring", "bus", "net_failover", "failover"}
    # depmod's order: loading the list from its end satisfies every module
    assert netdev_deps.index("net_failover") < netdev_deps.index("failover")
    assert netdev_deps.index("bus") < netdev_deps.index("ring")
    assert set(entries["blockdev"][1]) == {"bus", "ring", "crc32c_fast"}
    assert entries["ring"][1] == []
    line = next(x for x in (synthetic_modules / "modules.dep").read_text().splitlines() if "bus.ko" in x[:20])
    assert line == "kernel/core/bus.ko.gz: kernel/lib/ring.ko"


def test_closure_is_in_load_order_without_builtins_or_repeats(synthetic_modules: Path) -> None:
    closure = module_closure(synthetic_modules, ["netdev", "blockdev", "transport", "extfs", "crc32c-fast"])
    relative = [p.relative_to(synthetic_modules).as_posix() for p in closure]
    assert set(relative) == set(SYNTHETIC_TREE)
    direct = {module_name(k): v for k, v in SYNTHETIC_TREE.items()}
    assert_load_order(closure, direct, {"extfs", "crc16"})
    assert all(p.exists() for p in closure)
    # only what the names need
    assert [module_name(p) for p in module_closure(synthetic_modules, ["transport"])] == [
        "ring",
        "bus",
        "transport",
    ]
    assert module_closure(synthetic_modules, ["extfs", "crc16"]) == []


def test_closure_refuses_unknown_modules_and_cycles(synthetic_modules: Path, tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="no module 'nosuch'"):
        module_closure(synthetic_modules, ["nosuch"])
    (synthetic_modules / "modules.dep").write_text(
        "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/missing.ko\n"
    )
    with pytest.raises(LookupError, match=r"'missing'.*needed by b"):
        module_closure(synthetic_modules, ["a"])
    (synthetic_modules / "modules.dep").write_text("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n")
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        module_closure(synthetic_modules, ["a"])
    (synthetic_modules / "modules.dep").write_text("no colon here\n")
    with pytest.raises(ValueError, match=r"modules\.dep:1"):
        module_closure(synthetic_modules, ["a"])


def test_module_info_reads_plain_and_compressed_modules(synthetic_modules: Path, tmp_path: Path) -> None:
    assert module_info(synthetic_modules / "kernel/core/bus.ko.gz")["depends"] == ["ring"]
    assert module_info(synthetic_modules / "kernel/lib/crc32c-fast.ko.xz")["name"] == ["crc32c_fast"]
    not_elf = tmp_path / "junk.ko"
    not_elf.write_bytes(b"not an ELF object")
    with pytest.raises(ValueError, match="not a readable kernel module"):
        module_info(not_elf)


def init_script_for(additions: list[tuple[Path, str]]) -> str:
    lines = ["#!/bin/sh", *(f"insmod {destination}" for _, destination in additions), "poweroff -f", ""]
    return "\n".join(lines)


def insmod_order(init: bytes) -> list[str]:
    return [line.split()[1] for line in init.decode().splitlines() if line.startswith("insmod ")]


def archive_members(path: Path) -> dict[str, bytes]:
    members = read_newc(gzip.decompress(path.read_bytes()))
    return {m.name: m.data for m in members if m.mode & 0o170000 == 0o100000}


def test_initramfs_holds_the_closure_as_plain_modules(synthetic_modules: Path, tmp_path: Path) -> None:
    closure = module_closure(synthetic_modules, ["netdev", "blockdev"])
    additions = loadable_modules(closure, tmp_path / "plain")
    initrd = tmp_path / "initrd.cpio.gz"
    build_initramfs(initrd, busybox=None, init_script=init_script_for(additions), additions=additions)
    files = archive_members(initrd)

    expected = [f"/lib/modules/{module_name(p)}.ko" for p in closure]
    assert insmod_order(files["init"]) == expected
    for path in closure:
        data = files[f"lib/modules/{module_name(path)}.ko"]
        assert data[:4] == b"\x7fELF", f"{path.name} is not stored as a plain ELF object"
        assert data == module_bytes(path)
    assert "lib/modules/crc32c_fast.ko" in files and "lib/modules/bus.ko" in files  # were .xz and .gz
    assert not any(name.endswith((".xz", ".gz")) for name in files)


# --- Debian's real cloud kernel ----------------------------------------------------------------


@pytest.fixture(scope="module")
def debian_modules() -> Path:
    lookup = debian_kernel()
    if lookup.path is None:
        pytest.skip(f"Debian's kernel package is not available: {lookup.reason}")
    modules = kernel_modules(lookup.path)
    if modules.path is None:
        pytest.skip(f"Debian's kernel modules are not available: {modules.reason}")
    return modules.path


def direct_dependencies(paths: list[Path]) -> dict[str, list[str]]:
    """From each module's own .modinfo (independent of modules.dep)."""
    result = {}
    for path in paths:
        depends = module_info(path).get("depends", [""])[0]
        result[module_name(path)] = [d.replace("-", "_") for d in depends.split(",") if d]
    return result


def test_debian_closure_is_complete_and_in_load_order(debian_modules: Path) -> None:
    closure = module_closure(debian_modules, BOOT_TEST_MODULES)
    builtin = builtin_modules(debian_modules)
    names = [module_name(p) for p in closure]
    for wanted in BOOT_TEST_MODULES:
        assert (wanted in names) != (wanted in builtin), f"{wanted}: in the closure iff it is not built in"
    assert_load_order(closure, direct_dependencies(closure), builtin)
    # the transports' and net's own helpers come along
    assert {"virtio", "virtio_ring", "failover", "net_failover"} <= set(names) | builtin
    assert all(p.is_file() for p in closure)


def test_debian_modules_dep_agrees_with_depmod(debian_modules: Path, tmp_path: Path) -> None:
    depmod = shutil.which("depmod") or ("/usr/sbin/depmod" if Path("/usr/sbin/depmod").exists() else None)
    if depmod is None:
        pytest.skip("depmod is not installed (apt-get install kmod) to cross-check modules.dep")
    version = debian_modules.name.removeprefix("modules-")
    (tmp_path / "lib" / "modules").mkdir(parents=True)
    (tmp_path / "lib" / "modules" / version).symlink_to(debian_modules)
    result = subprocess.run(
        [depmod, "-n", "-b", str(tmp_path), version], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    theirs = {}
    for line in result.stdout.split("\n# ")[0].splitlines():
        path, _, deps = line.partition(":")
        theirs[path] = set(deps.split())
    entries = read_modules_dep(debian_modules)
    ours = {path: {entries[d][0] for d in deps} for path, deps in entries.values()}
    assert ours == theirs


def kernel_config(debian_modules: Path) -> dict[str, str]:
    version = debian_modules.name.removeprefix("modules-")
    config = config_for(debian_modules.with_name("vmlinuz-" + version))
    if not config.exists():
        pytest.skip(f"{config} is missing (the package had no /boot/config-{version})")
    options = {}
    for line in config.read_text().splitlines():
        key, equals, value = line.partition("=")
        if equals and key.startswith("CONFIG_"):
            options[key] = value
    return options


def test_debian_kernel_can_reach_both_virtio_transports(debian_modules: Path) -> None:
    """What the hardware boot test relies on to choose its virtio transports."""
    config = kernel_config(debian_modules)
    assert config.get("CONFIG_ACPI") == "y" and config.get("CONFIG_PCI") == "y"
    # virtio_mmio.device= on the command line does nothing for this kernel: ACPI must describe it
    assert "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES" not in config
    builtin = builtin_modules(debian_modules)
    closure = {module_name(p): p for p in module_closure(debian_modules, BOOT_TEST_MODULES)}
    for option, module in (("CONFIG_VIRTIO_MMIO", "virtio_mmio"), ("CONFIG_VIRTIO_PCI", "virtio_pci")):
        assert config.get(option) in ("y", "m"), f"{option} is {config.get(option)}"
        assert (config[option] == "m") == (module in closure) == (module not in builtin)
    if "virtio_mmio" in closure:
        # the platform driver matches the LNRO0005 device vmscope puts in the DSDT
        assert "acpi*:LNRO0005:*" in module_info(closure["virtio_mmio"]).get("alias", [])
    if "virtio_pci" in closure:
        assert "pci:v00001AF4d*sv*sd*bc*sc*i*" in module_info(closure["virtio_pci"]).get("alias", [])


def test_debian_initramfs_holds_modules_for_this_kernel(debian_modules: Path, tmp_path: Path) -> None:
    version = debian_modules.name.removeprefix("modules-")
    closure = module_closure(debian_modules, BOOT_TEST_MODULES)
    additions = loadable_modules(closure, tmp_path / "plain")
    initrd = tmp_path / "initrd.cpio.gz"
    build_initramfs(initrd, busybox=None, init_script=init_script_for(additions), additions=additions)
    files = archive_members(initrd)
    assert insmod_order(files["init"]) == [f"/lib/modules/{module_name(p)}.ko" for p in closure]
    for path in closure:
        stored = tmp_path / "stored.ko"
        stored.write_bytes(files[f"lib/modules/{module_name(path)}.ko"])
        info = module_info(stored)
        assert info["name"] == [module_name(path)]
        assert info["vermagic"][0].split()[0] == version  # insmod refuses another kernel's modules
