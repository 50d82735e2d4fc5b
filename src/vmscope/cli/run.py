"""``vmscope run``: boot a guest and run it to completion."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vmscope.errors import ConfigError

# The machine, loaders and devices are imported when a guest is built, not when the parser is:
# `vmscope run --help` must not load them (start-up time, issue 15).
if TYPE_CHECKING:
    from vmscope.vmm.machine import Machine, RunResult

EPILOG = """\
exit status: the guest's debug-exit status ((value << 1) | 1), 0 on a clean power-off or
reset, 1 when the guest crashed (triple fault, KVM internal error), 2 for usage or input errors.

examples:
  vmscope run                                    boot the bundled demo guest
  vmscope run --elf guest.elf --cmdline 'n=5'    a PVH or plain ELF guest
  vmscope run --flat boot.bin --mode real --load-address 0x7c00
  vmscope run --kernel vmlinux --mem 512M --cpus 2 --serial file:/tmp/console.log
  vmscope run --kernel bzImage --initrd initrd.cpio.gz --cmdline console=ttyS0 --symbols System.map
  vmscope run --elf guest.elf --gdb tcp::1234 --gdb-wait      then: gdb guest.elf -ex 'target remote :1234'
"""


#: see vmscope.sandbox; the whole test suite passes with "on"
DEFAULT_SECCOMP = "on"
#: the values of vmscope.arch.x86.cpu_state.CpuMode, spelled out so that the parser does not import
#: that module (tests/unit/test_cli.py checks they match)
FLAT_MODES = ("real", "protected", "long")


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (use 0x for hex)") from None


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (a negative or zero limit would stop the guest at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def add_machine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that boots a guest (run, stat, record)."""
    image = parser.add_argument_group("guest image (default: the bundled demo guest)")
    choice = image.add_mutually_exclusive_group()
    choice.add_argument(
        "--kernel", type=Path, metavar="FILE", help="Linux bzImage, PVH vmlinux or any ELF kernel"
    )
    choice.add_argument("--elf", type=Path, metavar="FILE", help="an ELF guest (PVH note -> PVH boot)")
    choice.add_argument(
        "--flat", type=Path, metavar="FILE", help="a flat binary (needs --mode, --load-address)"
    )
    image.add_argument("--mode", choices=FLAT_MODES, help="entry mode of a flat binary")
    image.add_argument("--load-address", type=_int, metavar="ADDR", help="where a flat binary is loaded")
    image.add_argument(
        "--entry", type=_int, metavar="ADDR", help="entry of a flat binary (default: load address)"
    )
    image.add_argument("--initrd", type=Path, metavar="FILE", help="initial ramdisk (Linux) / PVH module")
    image.add_argument("--cmdline", default="", metavar="TEXT", help="guest kernel command line")
    image.add_argument(
        "--decompress",
        choices=["auto", "vmm", "guest"],
        default="auto",
        help="who decompresses a bzImage's kernel: vmm (vmscope, then startup_64; no KASLR), guest (the "
        "kernel's decompressor), auto (vmm on kvm_pvm hosts, where the decompressor runs for minutes)",
    )
    machine = parser.add_argument_group("machine")
    machine.add_argument(
        "--mem", default="256M", metavar="SIZE", help="guest RAM, e.g. 256M or 2G (default 256M)"
    )
    machine.add_argument("--cpus", type=int, default=1, metavar="N", help="number of vCPUs (default 1)")
    machine.add_argument(
        "--cpu-features",
        default="",
        metavar="LIST",
        help="CPUID policy, e.g. -cx16,-xsave hides those features",
    )
    machine.add_argument(
        "--serial", metavar="SPEC", help="COM1 backend: stdio (default), none, file:PATH or unix:PATH"
    )
    machine.add_argument(
        "--restore", type=Path, metavar="SNAPSHOT",
        help="continue from a snapshot (vmscope ctl SOCKET snapshot); only backends may be given with it",
    )  # fmt: skip
    machine.add_argument(
        "--debug-exit-port",
        type=_int,
        default=0xF4,
        metavar="PORT",
        help="isa-debug-exit port (default 0xf4)",
    )
    machine.add_argument(
        "--emulate-fallback", choices=("on", "off"), default="on",
        help="complete in vmscope the instructions the host's KVM cannot emulate (default on); "
        "off shows KVM's own behaviour (a crash report)",
    )  # fmt: skip
    machine.add_argument(
        "--coalesce", choices=("on", "off"), default="on",
        help="let KVM queue writes no device claims and port 0x80 POST codes instead of exiting; "
        "still counted, as 'out coalesced' (default on); off makes every write a real exit",
    )  # fmt: skip
    machine.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="stop the guest after this long")
    machine.add_argument(
        "--control", metavar="PATH", help="serve a control socket (mode 0600) at PATH for vmscope ctl / top"
    )
    machine.add_argument(
        "--seccomp", choices=("on", "log", "off"), default=DEFAULT_SECCOMP,
        help="system-call allow-lists per thread once the guest runs: on (a forbidden call stops vmscope), "
        f"log (the kernel logs it; dmesg), off (default {DEFAULT_SECCOMP})",
    )  # fmt: skip
    io = parser.add_argument_group("virtio devices")
    io.add_argument(
        "--disk", action="append", default=[], metavar="PATH[,readonly][,transport=mmio|pci]",
        help="virtio-blk on a raw image file (repeatable)",
    )  # fmt: skip
    io.add_argument(
        "--net", action="append", default=[], metavar="tap:NAME|udp:LOCAL_PORT:REMOTE_PORT",
        help="virtio-net backend (repeatable; udp links two vmscope VMs on 127.0.0.1)",
    )  # fmt: skip
    io.add_argument("--console", metavar="SPEC", help="virtio-console (hvc0): stdio, file:PATH or unix:PATH")
    io.add_argument("--rng", action="store_true", help="virtio-rng fed from the host's getrandom()")
    io.add_argument(
        "--iothreads", choices=("on", "off"), default="on",
        help="serve virtio queues on per-device I/O threads (on) or on the vCPU exit path (off)",
    )  # fmt: skip
    machine.add_argument(
        "--symbols", type=Path, action="append", default=[], metavar="FILE",
        help="symbols for crash reports and profiles: ELF (vmlinux), System.map or kallsyms (repeatable)",
    )  # fmt: skip


#: options that describe the machine itself, which a snapshot holds: not allowed with --restore
_MACHINE_OPTIONS = (
    ("kernel", "--kernel", None), ("elf", "--elf", None), ("flat", "--flat", None),
    ("mode", "--mode", None), ("load_address", "--load-address", None), ("entry", "--entry", None),
    ("initrd", "--initrd", None), ("cmdline", "--cmdline", ""), ("mem", "--mem", "256M"),
    ("cpus", "--cpus", 1), ("cpu_features", "--cpu-features", ""),
    ("debug_exit_port", "--debug-exit-port", 0xF4),
    ("rng", "--rng", False), ("iothreads", "--iothreads", "on"),
)  # fmt: skip


def _restore_machine(args: argparse.Namespace) -> Machine:
    """The machine of the snapshot ``--restore`` names, with the backends the options override."""
    from vmscope.snapshot.restore import BackendOverrides, restore_machine

    for dest, option, default in _MACHINE_OPTIONS:
        if getattr(args, dest) != default:
            raise ConfigError(
                f"{option} cannot be used with --restore: the snapshot holds the machine's configuration"
            )
    overrides = BackendOverrides(serial=args.serial, console=args.console, disks=args.disk, nets=args.net)
    machine = restore_machine(args.restore, overrides)
    if args.symbols:
        machine.symbolize = symbolizer_for(machine, args.symbols)
    return machine


def build_machine(args: argparse.Namespace) -> Machine:
    """A Machine with the platform devices and the requested guest loaded (or restored)."""
    from vmscope import sandbox

    sandbox.configure(args.seccomp)
    if args.restore is not None:
        return _restore_machine(args)
    from vmscope.arch.x86.cpu_state import CpuMode
    from vmscope.memory.guest_memory import parse_size
    from vmscope.vmm.assemble import assemble_machine
    from vmscope.vmm.config import MachineConfig

    if args.flat is None and (args.mode or args.load_address is not None or args.entry is not None):
        raise ConfigError("--mode, --load-address and --entry apply to --flat images only")
    if args.flat is not None and (args.mode is None or args.load_address is None):
        raise ConfigError("--flat needs --mode (real, protected or long) and --load-address")
    # Linux distribution kernels find virtio over PCI; PVH/ELF guests use virtio-mmio
    linux_kernel = False
    if args.kernel is not None:
        from vmscope.loader.bzimage import is_bzimage

        linux_kernel = is_bzimage(args.kernel)
    config = MachineConfig(
        mem=parse_size(args.mem), cpus=args.cpus, cpu_features=args.cpu_features,
        serial=args.serial or "stdio", debug_exit_port=args.debug_exit_port,
        disks=tuple(args.disk), nets=tuple(args.net), console=args.console, rng=args.rng,
        iothreads=args.iothreads == "on", default_transport="pci" if linux_kernel else "mmio",
        emulate_fallback=args.emulate_fallback == "on", coalesce_writes=args.coalesce == "on",
        cmdline=args.cmdline, symbols=tuple(str(path) for path in args.symbols),
    )  # fmt: skip
    machine = assemble_machine(config)
    try:
        modules = [args.initrd] if args.initrd is not None else []
        if args.flat is not None:
            if modules or args.cmdline:
                raise ConfigError("a flat binary takes no --cmdline or --initrd")
            machine.load(
                args.flat,
                kind="flat",
                flat_address=args.load_address,
                flat_mode=CpuMode(args.mode),
                flat_entry=args.entry,
            )
        else:
            image = args.kernel or args.elf
            if image is None:
                from vmscope.guest.build import demo_guest

                image = demo_guest()
            machine.load(image, kind="elf", cmdline=args.cmdline, modules=modules, decompress=args.decompress)
        guest = machine.guest
        if guest is not None:  # what a snapshot needs to describe the image it continues
            symbol_file = str(guest.symbol_file.absolute()) if guest.symbol_file is not None else None
            machine.config = config._replace(guest_image=symbol_file, guest_kind=guest.kind)
        if args.symbols or args.kernel is not None:  # a stock kernel names its code by kallsyms
            machine.symbolize = symbolizer_for(machine, args.symbols, args.kernel)
    except BaseException:
        machine.close()
        raise
    return machine


def symbolizer_for(
    machine: Machine, paths: list[Path], kernel: Path | None = None
) -> Callable[[int], str | None]:
    """'function+0xoff [module]' lookups for crash reports over :func:`guest_symbol_tables`.

    ``--symbols`` files (``paths``) are read now, so an unreadable one is an error before the run.
    Without them, the guest's own symbols, and a stock kernel's kallsyms when ``kernel`` is one, are
    read at the first crash: decompressing a bzImage takes a second, and the slide is found from
    the crashing vCPU's state on its own thread.
    """
    from vmscope.profiler.guest_symbols import guest_symbol_tables, stock_kernel_image
    from vmscope.symbols import Symbolizer

    if paths:
        return Symbolizer(guest_symbol_tables(machine, paths)).name_and_offset
    if kernel is not None:
        # what reading kallsyms needs, imported now: at a crash it runs on the vCPU thread, under
        # that thread's seccomp filter, where an import that makes a new kind of call is fatal
        import elftools.elf.elffile  # noqa: F401

        import vmscope.profiler.kernel.context  # noqa: F401
    loaded: list[Callable[[int], str | None]] = []

    def symbolize(address: int) -> str | None:
        if not loaded:
            try:
                tables = guest_symbol_tables(machine, (), stock_kernel_image(kernel, machine.guest))
            except Exception as error:  # a crash report must come out without names too
                import logging

                logging.getLogger("vmscope.cli").debug("no symbols for the crash report: %s", error)
                tables = []
            loaded.append(Symbolizer(tables).name_and_offset)
        return loaded[0](address)

    return symbolize


def report_result(result: RunResult, quiet: bool = False) -> None:
    if result.crash is not None:
        print(result.crash.format(), file=sys.stderr)
    elif not quiet:
        suffix = "" if "exit status" in result.reason else f" (exit status {result.exit_status})"
        if result.emulated_instructions:
            suffix += f"; vmscope completed {result.emulated_instructions} instructions KVM could not emulate"
        print(f"vmscope: {result.reason}{suffix}", file=sys.stderr)


def run_with_control(machine: Machine, args: argparse.Namespace) -> RunResult:
    """Run the machine, serving the control socket while it runs when --control asks for one."""
    control = None
    if args.control:
        from vmscope.control import attach_control_server

        control = attach_control_server(machine, args.control)
    try:
        return machine.run(timeout=args.timeout, confine_caller=True)
    finally:
        if control is not None:
            control.close()


def handle(args: argparse.Namespace) -> int:
    machine = build_machine(args)
    stub = None
    try:
        if args.gdb:
            from vmscope.gdbstub import attach_gdb_stub

            stub = attach_gdb_stub(
                machine, args.gdb, wait_for_client=args.gdb_wait, allow_remote=args.gdb_allow_remote
            )
            print(f"vmscope: GDB stub listening on {args.gdb}", file=sys.stderr)
        result = run_with_control(machine, args)
    finally:
        if stub is not None:
            stub.close()
        machine.close()
    report_result(result, args.quiet)
    return result.exit_status


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="boot a guest and run it until it exits",
        description="Boot a guest on KVM and run it until it exits, crashes or is stopped.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_machine_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary line when the guest exits")
    debug = parser.add_argument_group("debugging")
    debug.add_argument("--gdb", metavar="tcp:HOST:PORT", help="serve the GDB remote protocol, e.g. tcp::1234")
    debug.add_argument("--gdb-wait", action="store_true", help="hold the guest before its first instruction")
    debug.add_argument(
        "--gdb-allow-remote", action="store_true", help="allow a non-loopback GDB address (full control)"
    )
    parser.set_defaults(func=handle)
