"""emulate(): complete one instruction the host's KVM could not, or say why not.

Register, XCR0 and XSAVE-image changes are buffered and handed to the CPU only when the
instruction completes, so a fault part-way (#PF on the memory operand, #GP on an alignment
check) leaves the vCPU exactly as it was, with rip at the instruction. Memory writes come
last in every instruction and are checked for writability before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable

from capstone import x86_const as x86

from vmscope.emulate import alu
from vmscope.emulate import xstate as xs
from vmscope.emulate.cpu import ControlState, CpuAccess, MemoryFault, UnsupportedAccess
from vmscope.emulate.decode import (
    GPR_PARTS,
    SEGMENT_NAMES,
    STACK_BASES,
    CapstoneInstruction,
    Decoded,
    decode,
    xmm_index,
)
from vmscope.emulate.outcome import BP, GP, MF, NM, PF, UD, Completed, Outcome, RaiseException, Unsupported

CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_NE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 5
CR4_OSFXSR, CR4_OSXSAVE = 1 << 9, 1 << 18
RFLAGS_AC = 1 << 18
MASK64 = (1 << 64) - 1


class _Fault(Exception):
    """An architectural exception found while executing (nothing has been committed)."""

    def __init__(self, vector: int, error_code: int | None = None) -> None:
        super().__init__(vector)
        self.vector = vector
        self.error_code = error_code


class _Unsupported(Exception):
    pass


class _Context:
    """One instruction's view of the CPU, with buffered register and state writes."""

    def __init__(self, cpu: CpuAccess, control: ControlState, decoded: Decoded) -> None:
        self.cpu = cpu
        self.control = control
        self.insn: CapstoneInstruction = decoded.insn
        self.size = decoded.size
        self.bits = control.code_bits
        self.registers: dict[str, int] = {}
        self._image: bytearray | None = None
        self.image_dirty = False
        self.new_xcr0: int | None = None

    # -- registers ------------------------------------------------------------------------

    def reg64(self, name: str) -> int:
        value = self.registers.get(name)
        return int(self.cpu.get_register(name)) if value is None else value

    def set_reg64(self, name: str, value: int) -> None:
        self.registers[name] = value & MASK64

    def read_gpr(self, name: str) -> int:
        full, shift, width = GPR_PARTS[name]
        if full == "rip":
            return int(self.reg64("rip") + self.size) & ((1 << width) - 1)
        return int(self.reg64(full) >> shift) & ((1 << width) - 1)

    def write_gpr(self, name: str, value: int) -> None:
        full, shift, width = GPR_PARTS[name]
        mask = (1 << width) - 1
        if width == 32:  # a 32-bit write zero-extends into the whole register
            self.set_reg64(full, value & mask)
            return
        if width == 64:
            self.set_reg64(full, value)
            return
        old = self.reg64(full)
        self.set_reg64(full, (old & ~(mask << shift)) | ((value & mask) << shift))

    def set_arith_flags(self, flags: int) -> None:
        self.set_reg64("rflags", (self.reg64("rflags") & ~alu.ARITH_FLAGS) | flags)

    # -- memory -----------------------------------------------------------------------------

    def linear_address(self, operand: object) -> int:
        insn = self.insn
        mem = operand.mem  # type: ignore[attr-defined]
        address_bits = int(insn.addr_size) * 8
        offset = int(mem.disp)
        if mem.base == x86.X86_REG_RIP or mem.base == x86.X86_REG_EIP:
            offset += self.reg64("rip") + self.size
        elif mem.base != 0:
            offset += self.read_gpr(insn.reg_name(mem.base))
        if mem.index != 0:
            offset += self.read_gpr(insn.reg_name(mem.index)) * int(mem.scale)
        offset &= (1 << address_bits) - 1
        segment = SEGMENT_NAMES.get(mem.segment)
        if segment is None:
            segment = "ss" if mem.base in STACK_BASES else "ds"
        if self.bits == 64:
            base = self.control.segment_bases.get(segment, 0) if segment in ("fs", "gs") else 0
            linear = (offset + base) & MASK64
            if not -(1 << 47) <= ((linear ^ (1 << 63)) - (1 << 63)) < (1 << 47):  # not canonical
                raise _Fault(GP, 0)
            return linear
        return (self.control.segment_bases.get(segment, 0) + offset) & 0xFFFF_FFFF

    def memory_operand(self) -> tuple[object, int]:
        for operand in self.insn.operands:
            if operand.type == x86.X86_OP_MEM:
                return operand, self.linear_address(operand)
        raise _Unsupported("expected a memory operand")

    def read(self, linear: int, size: int) -> bytes:
        return bytes(self.cpu.read_memory(linear, size))

    # -- FPU/SSE state ----------------------------------------------------------------------

    @property
    def image(self) -> bytearray:
        if self._image is None:
            self._image = bytearray(self.cpu.get_xsave())
        return self._image

    def touch_image(self) -> bytearray:
        self.image_dirty = True
        return self.image

    def xcr0(self) -> int:
        return self.new_xcr0 if self.new_xcr0 is not None else self.cpu.get_xcr0()

    # -- commit -------------------------------------------------------------------------------

    def commit(self) -> None:
        if self.new_xcr0 is not None:
            try:
                self.cpu.set_xcr0(self.new_xcr0)
            except ValueError:
                raise _Fault(GP, 0) from None
        if self.image_dirty and self._image is not None:
            self.cpu.set_xsave(bytes(self._image))
        for name, value in self.registers.items():
            self.cpu.set_register(name, value)


Handler = Callable[[_Context], int | None]  # returns a trap vector to raise after completing


def emulate(cpu: CpuAccess, instruction_bytes: bytes, control: ControlState | None = None) -> Outcome:
    """Complete the instruction at the vCPU's rip (``instruction_bytes`` are its bytes).

    Returns Completed (effects written, rip advanced), RaiseException (the caller injects
    it; for #BP rip was advanced, for faults nothing changed) or Unsupported.
    """
    control = control if control is not None else cpu.control_state()
    decoded = decode(bytes(instruction_bytes), control.code_bits)
    if decoded is None:
        shown = bytes(instruction_bytes[:15]).hex(" ")
        return Unsupported("(undecodable)", f"capstone cannot decode {shown}")
    mnemonic = decoded.mnemonic
    handler = HANDLERS.get(decoded.id)
    if handler is None:
        if mnemonic.startswith("v"):
            reason = "VEX/EVEX-encoded (AVX) instructions are not emulated by vmscope"
        else:
            reason = f"vmscope's fallback emulator does not implement {mnemonic}"
        return Unsupported(mnemonic, reason)
    context = _Context(cpu, control, decoded)
    try:
        trap = handler(context)
        next_rip = context.reg64("rip") + decoded.size
        if context.bits != 64:
            next_rip &= 0xFFFF_FFFF if context.bits == 32 else 0xFFFF
        context.set_reg64("rip", next_rip)
        context.commit()
    except _Fault as fault:
        return RaiseException(mnemonic, fault.vector, fault.error_code)
    except MemoryFault as fault:
        return RaiseException(mnemonic, PF, fault.error_code, cr2=fault.address)
    except (_Unsupported, UnsupportedAccess) as problem:
        return Unsupported(mnemonic, f"{mnemonic} {decoded.insn.op_str}: {problem}")
    except (ValueError, KeyError, IndexError) as problem:  # an operand form no handler expects
        return Unsupported(mnemonic, f"{mnemonic} {decoded.insn.op_str}: unexpected form ({problem!r})")
    if trap is not None:
        return RaiseException(mnemonic, trap)
    return Completed(mnemonic)


# --- handlers --------------------------------------------------------------------------------


def _int3(ctx: _Context) -> int | None:
    return BP  # a trap: delivered with rip past the int3


def _bit_count(function: Callable[[int, int], tuple[int | None, int]]) -> Handler:
    def handler(ctx: _Context) -> int | None:
        destination, source = ctx.insn.operands
        bits = destination.size * 8
        if source.type == x86.X86_OP_MEM:
            value = int.from_bytes(ctx.read(ctx.linear_address(source), source.size), "little")
        else:
            value = ctx.read_gpr(ctx.insn.reg_name(source.reg))
        result, flags = function(value, bits)
        if result is not None:  # bsf/bsr of zero leave the destination alone
            ctx.write_gpr(ctx.insn.reg_name(destination.reg), result)
        ctx.set_arith_flags(flags)
        return None

    return handler


def _require_cpl0(ctx: _Context) -> None:
    if ctx.control.cpl != 0:
        raise _Fault(UD)


def _clac(ctx: _Context) -> int | None:
    _require_cpl0(ctx)
    ctx.set_reg64("rflags", ctx.reg64("rflags") & ~RFLAGS_AC)
    return None


def _stac(ctx: _Context) -> int | None:
    _require_cpl0(ctx)
    ctx.set_reg64("rflags", ctx.reg64("rflags") | RFLAGS_AC)
    return None


def _fwait(ctx: _Context) -> int | None:
    cr0 = ctx.control.cr0
    if cr0 & CR0_TS and cr0 & CR0_MP:
        raise _Fault(NM)
    if xs.u(ctx.image, xs.FSW, 2) & 0x80:  # an unmasked x87 exception is pending (FSW.ES)
        if cr0 & CR0_NE:
            raise _Fault(MF)
        raise _Unsupported("a pending x87 exception with CR0.NE=0 (FERR#/IRQ 13) is not emulated")
    return None


def _require_sse(ctx: _Context) -> None:
    cr0, cr4 = ctx.control.cr0, ctx.control.cr4
    if cr0 & CR0_EM or not cr4 & CR4_OSFXSR:
        raise _Fault(UD)
    if cr0 & CR0_TS:
        raise _Fault(NM)


def _check_mxcsr(image: bytes | bytearray, value: int) -> None:
    if value & ~xs.mxcsr_mask(image) & 0xFFFF_FFFF:
        raise _Fault(GP, 0)


def _ldmxcsr(ctx: _Context) -> int | None:
    _require_sse(ctx)
    _, linear = ctx.memory_operand()
    value = int.from_bytes(ctx.read(linear, 4), "little")
    _check_mxcsr(ctx.image, value)
    image = ctx.touch_image()
    xs.put(image, xs.MXCSR, 4, value)
    xs.mark_in_use(image, xs.SSE_BIT)  # KVM loads MXCSR from an image only with SSE or AVX set
    return None


def _stmxcsr(ctx: _Context) -> int | None:
    _require_sse(ctx)
    _, linear = ctx.memory_operand()
    ctx.cpu.write_memory(linear, bytes(ctx.image[xs.MXCSR : xs.MXCSR + 4]))
    return None


def _cmpxchg_wide(size: int) -> Handler:
    """cmpxchg8b (size 8: EDX:EAX / ECX:EBX) and cmpxchg16b (16: RDX:RAX / RCX:RBX)."""

    def handler(ctx: _Context) -> int | None:
        _, linear = ctx.memory_operand()
        if size == 16 and linear % 16:
            raise _Fault(GP, 0)
        half_bits = size * 4
        half_mask = (1 << half_bits) - 1
        expected = (ctx.reg64("rdx") & half_mask) << half_bits | (ctx.reg64("rax") & half_mask)
        replacement = (ctx.reg64("rcx") & half_mask) << half_bits | (ctx.reg64("rbx") & half_mask)
        with ctx.cpu.exclusive():
            ctx.cpu.check_writable(linear, size)  # the locked cycle writes even when unequal
            current = int.from_bytes(ctx.read(linear, size), "little")
            flags = ctx.reg64("rflags") & ~alu.ZF
            if current == expected:
                ctx.cpu.write_memory(linear, replacement.to_bytes(size, "little"))
                flags |= alu.ZF
            else:
                ctx.cpu.write_memory(linear, current.to_bytes(size, "little"))
                ctx.set_reg64("rax", current & half_mask)
                ctx.set_reg64("rdx", current >> half_bits)
            ctx.set_reg64("rflags", flags)
        return None

    return handler


def _require_xsave(ctx: _Context) -> None:
    if not ctx.control.cr4 & CR4_OSXSAVE:
        raise _Fault(UD)


def _xgetbv(ctx: _Context) -> int | None:
    _require_xsave(ctx)
    index = ctx.reg64("rcx") & 0xFFFF_FFFF
    if index == 0:
        value = ctx.xcr0()
    elif index == 1:  # XINUSE: the enabled components not in their initial state
        value = ctx.xcr0() & (xs.xstate_bv(ctx.image) | xs.X87_BIT | xs.SSE_BIT)
    else:
        raise _Fault(GP, 0)
    ctx.set_reg64("rax", value & 0xFFFF_FFFF)
    ctx.set_reg64("rdx", value >> 32)
    return None


def _xsetbv(ctx: _Context) -> int | None:
    _require_xsave(ctx)
    if ctx.control.cpl != 0 or ctx.reg64("rcx") & 0xFFFF_FFFF != 0:
        raise _Fault(GP, 0)
    value = (ctx.reg64("rdx") & 0xFFFF_FFFF) << 32 | (ctx.reg64("rax") & 0xFFFF_FFFF)
    avx_without_sse = value & xs.AVX_BIT and not value & xs.SSE_BIT
    if not value & xs.X87_BIT or avx_without_sse or value & ~ctx.cpu.supported_xcr0():
        raise _Fault(GP, 0)
    ctx.new_xcr0 = value
    return None


def _requested_bitmap(ctx: _Context) -> int:
    request = (ctx.reg64("rdx") & 0xFFFF_FFFF) << 32 | (ctx.reg64("rax") & 0xFFFF_FFFF)
    return ctx.xcr0() & request


def _xsave_prologue(ctx: _Context) -> tuple[int, int]:
    _require_xsave(ctx)
    if ctx.control.cr0 & CR0_TS:
        raise _Fault(NM)
    _, linear = ctx.memory_operand()
    if linear % 64:
        raise _Fault(GP, 0)
    return linear, _requested_bitmap(ctx)


def _component_bytes(ctx: _Context, component: int, in_use: int) -> bytes:
    """An extended component's bytes from the image, or zeros (its initial state)."""
    info = ctx.cpu.xstate_layout().get(component)
    if info is None:
        raise _Unsupported(f"XSAVE state component {component} has no known layout")
    if in_use >> component & 1:
        return bytes(ctx.image[info.offset : info.offset + info.size])
    return bytes(info.size)


def _legacy_pieces(ctx: _Context, bitmap: int, in_use: int) -> list[tuple[int, bytes]]:
    """(offset, bytes) of the legacy region for the x87/SSE bits of ``bitmap``."""
    pieces: list[tuple[int, bytes]] = []
    long_mode = ctx.bits == 64
    for component in (xs.X87, xs.SSE):
        if not bitmap >> component & 1:
            continue
        initial = xs.init_legacy(component)
        base = 0 if component == xs.X87 else xs.XMM_REGS
        for offset, size in xs.legacy_ranges(component, long_mode):
            if in_use >> component & 1:
                pieces.append((offset, bytes(ctx.image[offset : offset + size])))
            else:
                pieces.append((offset, initial[offset - base : offset - base + size]))
    if bitmap & (xs.SSE_BIT | xs.AVX_BIT):
        pieces.append((xs.MXCSR, bytes(ctx.image[xs.MXCSR : xs.MXCSR + 8])))
    return pieces


def _in_use(ctx: _Context) -> int:
    # KVM's image header says which components hold state; x87 and SSE are always kept there
    return xs.xstate_bv(ctx.image) | xs.X87_BIT | xs.SSE_BIT


def _xsave(ctx: _Context) -> int | None:
    """xsave and xsaveopt (which may skip unmodified state; writing all of it is allowed)."""
    linear, bitmap = _xsave_prologue(ctx)
    in_use = _in_use(ctx)
    layout = ctx.cpu.xstate_layout()
    pieces = _legacy_pieces(ctx, bitmap, in_use)
    end = xs.HEADER + 8
    for component in sorted(layout):
        if bitmap >> component & 1:
            pieces.append((layout[component].offset, _component_bytes(ctx, component, in_use)))
            end = max(end, layout[component].offset + layout[component].size)
    old_header = int.from_bytes(ctx.read(linear + xs.HEADER, 8), "little")
    header = (old_header & ~bitmap) | (in_use & bitmap)
    pieces.append((xs.HEADER, header.to_bytes(8, "little")))
    ctx.cpu.check_writable(linear, end)
    for offset, data in pieces:
        ctx.cpu.write_memory(linear + offset, data)
    return None


def _xsavec(ctx: _Context) -> int | None:
    linear, bitmap = _xsave_prologue(ctx)
    in_use = _in_use(ctx)
    layout = ctx.cpu.xstate_layout()
    saved = bitmap & in_use
    pieces = _legacy_pieces(ctx, saved | (bitmap & xs.AVX_BIT), in_use)
    offsets = xs.compacted_offsets(bitmap, layout)
    end = xs.HEADER + 16
    for component, offset in offsets.items():
        if saved >> component & 1:
            pieces.append((offset, _component_bytes(ctx, component, in_use)))
        end = max(end, offset + layout[component].size)
    header = saved.to_bytes(8, "little") + (xs.COMPACTED | bitmap).to_bytes(8, "little")
    pieces.append((xs.HEADER, header))
    ctx.cpu.check_writable(linear, end)
    for offset, data in pieces:
        ctx.cpu.write_memory(linear + offset, data)
    return None


def _xrstor(ctx: _Context) -> int | None:
    linear, bitmap = _xsave_prologue(ctx)
    header = ctx.read(linear + xs.HEADER, xs.HEADER_SIZE)
    state_bv = int.from_bytes(header[0:8], "little")
    comp_bv = int.from_bytes(header[8:16], "little")
    xcr0 = ctx.xcr0()
    layout = ctx.cpu.xstate_layout()
    compacted = bool(comp_bv & xs.COMPACTED)
    if compacted:
        if comp_bv & ~(xcr0 | xs.COMPACTED) or state_bv & ~comp_bv or any(header[16:]):
            raise _Fault(GP, 0)
        offsets = xs.compacted_offsets(comp_bv & ~xs.COMPACTED, layout)
    else:
        if state_bv & ~xcr0 or any(header[8:24]):
            raise _Fault(GP, 0)
        offsets = {component: info.offset for component, info in layout.items()}
    legacy = ctx.read(linear, xs.LEGACY_SIZE) if bitmap & (xs.X87_BIT | xs.SSE_BIT | xs.AVX_BIT) else b""
    image = bytearray(ctx.image)
    load_mxcsr = bool(bitmap & (xs.SSE_BIT | xs.AVX_BIT)) and (not compacted or state_bv & xs.SSE_BIT)
    if load_mxcsr:
        mxcsr = int.from_bytes(legacy[xs.MXCSR : xs.MXCSR + 4], "little")
        _check_mxcsr(image, mxcsr)
        xs.put(image, xs.MXCSR, 4, mxcsr)
    elif compacted and bitmap & xs.SSE_BIT:
        xs.put(image, xs.MXCSR, 4, xs.MXCSR_RESET)
    for component in (xs.X87, xs.SSE):
        if not bitmap >> component & 1:
            continue
        initial = xs.init_legacy(component)
        base = 0 if component == xs.X87 else xs.XMM_REGS
        for offset, size in xs.legacy_ranges(component, ctx.bits == 64):
            if state_bv >> component & 1:
                image[offset : offset + size] = legacy[offset : offset + size]
            else:
                image[offset : offset + size] = initial[offset - base : offset - base + size]
    in_use = xs.xstate_bv(image) | xs.X87_BIT | xs.SSE_BIT  # KVM keeps x87/SSE explicit
    for component, info in sorted(layout.items()):
        if not bitmap >> component & 1:
            continue
        if component not in offsets:
            raise _Unsupported(f"XSAVE state component {component} is missing from XCOMP_BV")
        if state_bv >> component & 1:
            data = ctx.read(linear + offsets[component], info.size)
            image[info.offset : info.offset + info.size] = data
            in_use |= 1 << component
        else:
            image[info.offset : info.offset + info.size] = bytes(info.size)
            in_use &= ~(1 << component)
    unknown = bitmap & ~(xs.X87_BIT | xs.SSE_BIT) & ~sum(1 << c for c in layout)
    if unknown:
        raise _Unsupported(f"XSAVE state components {unknown:#x} have no known layout")
    xs.put(image, xs.HEADER, 8, in_use)
    ctx._image = image
    ctx.image_dirty = True
    return None


def _fx_prologue(ctx: _Context) -> int:
    cr0 = ctx.control.cr0
    if cr0 & CR0_EM:
        raise _Fault(UD)
    if cr0 & CR0_TS:
        raise _Fault(NM)
    _, linear = ctx.memory_operand()
    if linear % 16:
        raise _Fault(GP, 0)
    return linear


def _fxsave(ctx: _Context) -> int | None:
    linear = _fx_prologue(ctx)
    xmm_count = 16 if ctx.bits == 64 else 8
    area = bytearray(ctx.image[: xs.XMM_REGS + 16 * xmm_count])
    if ctx.insn.id == x86.X86_INS_FXSAVE:  # 32-bit format: FIP/FDP offsets with selectors (kept 0)
        area[12:16] = bytes(4)
        area[20:24] = bytes(4)
    ctx.cpu.write_memory(linear, bytes(area))
    return None


def _fxrstor(ctx: _Context) -> int | None:
    linear = _fx_prologue(ctx)
    xmm_count = 16 if ctx.bits == 64 else 8
    area = ctx.read(linear, xs.LEGACY_SIZE)
    image = ctx.touch_image()
    _check_mxcsr(image, int.from_bytes(area[xs.MXCSR : xs.MXCSR + 4], "little"))
    mask = image[xs.MXCSR_MASK : xs.MXCSR_MASK + 4]  # read-only: fxrstor does not load it
    end = xs.XMM_REGS + 16 * xmm_count
    image[:end] = area[:end]
    image[xs.MXCSR_MASK : xs.MXCSR_MASK + 4] = mask
    xs.mark_in_use(image, xs.X87_BIT | xs.SSE_BIT)
    return None


def _rdrand(ctx: _Context) -> int | None:
    (destination,) = ctx.insn.operands
    value = int.from_bytes(ctx.cpu.random_bytes(destination.size), "little")
    ctx.write_gpr(ctx.insn.reg_name(destination.reg), value)
    ctx.set_arith_flags(alu.CF)
    return None


# --- SSE (legacy encoding) --------------------------------------------------------------------


def _xmm(ctx: _Context, operand: object) -> int | None:
    if operand.type != x86.X86_OP_REG:  # type: ignore[attr-defined]
        return None
    return xmm_index(ctx.insn.reg_name(operand.reg))  # type: ignore[attr-defined]


def _read_vector(ctx: _Context, operand: object, size: int, aligned: bool) -> bytes:
    """``size`` bytes of an XMM register, GPR or memory operand."""
    index = _xmm(ctx, operand)
    if index is not None:
        return xs.get_xmm(ctx.image, index)[:size]
    if operand.type == x86.X86_OP_MEM:  # type: ignore[attr-defined]
        linear = ctx.linear_address(operand)
        if aligned and linear % 16:
            raise _Fault(GP, 0)
        return ctx.read(linear, size)
    if operand.type == x86.X86_OP_REG:  # type: ignore[attr-defined]
        name = ctx.insn.reg_name(operand.reg)  # type: ignore[attr-defined]
        if name not in GPR_PARTS:
            raise _Unsupported(f"register {name} (MMX forms are not emulated)")
        return ctx.read_gpr(name).to_bytes(8, "little")[:size]
    raise _Unsupported("unexpected operand")


def _write_vector(ctx: _Context, operand: object, data: bytes, aligned: bool) -> None:
    """Write to an XMM register (zero-extended to 128 bits), a GPR or memory."""
    index = _xmm(ctx, operand)
    if index is not None:
        xs.set_xmm(ctx.touch_image(), index, data.ljust(16, b"\0"))
        return
    if operand.type == x86.X86_OP_MEM:  # type: ignore[attr-defined]
        linear = ctx.linear_address(operand)
        if aligned and linear % 16:
            raise _Fault(GP, 0)
        ctx.cpu.write_memory(linear, data)
        return
    name = ctx.insn.reg_name(operand.reg)  # type: ignore[attr-defined]
    if name not in GPR_PARTS:
        raise _Unsupported(f"register {name} (MMX forms are not emulated)")
    ctx.write_gpr(name, int.from_bytes(data, "little"))


def _sse_move(size: int | None, aligned: bool) -> Handler:
    """movd/movq (size 4/8: zero-extending into XMM) and the 16-byte moves."""

    def handler(ctx: _Context) -> int | None:
        _require_sse(ctx)
        destination, source = ctx.insn.operands
        if _xmm(ctx, destination) is None and _xmm(ctx, source) is None:
            raise _Unsupported("MMX forms are not emulated")
        width = size if size is not None else 16
        data = _read_vector(ctx, source, width, aligned)
        _write_vector(ctx, destination, data, aligned)
        return None

    return handler


def _lanes(data: bytes, width: int) -> list[int]:
    return [int.from_bytes(data[i : i + width], "little") for i in range(0, 16, width)]


def _join(lanes: list[int], width: int) -> bytes:
    mask = (1 << (8 * width)) - 1
    return b"".join((lane & mask).to_bytes(width, "little") for lane in lanes)


def _sse_binary(operation: Callable[[bytes, bytes], bytes]) -> Handler:
    """xmm1 = operation(xmm1, xmm2/m128); a memory operand must be 16-byte aligned."""

    def handler(ctx: _Context) -> int | None:
        _require_sse(ctx)
        destination, source = ctx.insn.operands[:2]
        index = _xmm(ctx, destination)
        if index is None:
            raise _Unsupported("MMX forms are not emulated")
        right = _read_vector(ctx, source, 16, aligned=True)
        left = xs.get_xmm(ctx.image, index)
        xs.set_xmm(ctx.touch_image(), index, operation(left, right))
        return None

    return handler


def _lanewise(width: int, function: Callable[[int, int], int]) -> Callable[[bytes, bytes], bytes]:
    def operation(left: bytes, right: bytes) -> bytes:
        pairs = zip(_lanes(left, width), _lanes(right, width), strict=True)
        return _join([function(a, b) for a, b in pairs], width)

    return operation


def _bytewise(function: Callable[[int, int], int]) -> Callable[[bytes, bytes], bytes]:
    def operation(left: bytes, right: bytes) -> bytes:
        result = function(int.from_bytes(left, "little"), int.from_bytes(right, "little"))
        return (result & ((1 << 128) - 1)).to_bytes(16, "little")

    return operation


def _pshufb(left: bytes, right: bytes) -> bytes:
    return bytes(0 if control & 0x80 else left[control & 15] for control in right)


def _pshufd(ctx: _Context) -> int | None:
    _require_sse(ctx)
    destination, source, immediate = ctx.insn.operands
    index = _xmm(ctx, destination)
    if index is None:
        raise _Unsupported("unexpected destination")
    lanes = _lanes(_read_vector(ctx, source, 16, aligned=True), 4)
    order = immediate.imm
    xs.set_xmm(ctx.touch_image(), index, _join([lanes[(order >> (2 * i)) & 3] for i in range(4)], 4))
    return None


def _shift_immediate(width: int, left: bool) -> Handler:
    """psrld/pslld/psrlq/psllq xmm, imm8 (the register-count forms are unsupported)."""

    def handler(ctx: _Context) -> int | None:
        _require_sse(ctx)
        destination, count = ctx.insn.operands
        index = _xmm(ctx, destination)
        if index is None or count.type != x86.X86_OP_IMM:
            raise _Unsupported("only the xmm, imm8 form is emulated")
        bits = count.imm & 0xFF
        lanes = _lanes(xs.get_xmm(ctx.image, index), width)
        if bits >= 8 * width:
            shifted = [0] * len(lanes)
        else:
            shifted = [(lane << bits) if left else (lane >> bits) for lane in lanes]
        xs.set_xmm(ctx.touch_image(), index, _join(shifted, width))
        return None

    return handler


def _punpck(high: bool) -> Callable[[bytes, bytes], bytes]:
    def operation(left: bytes, right: bytes) -> bytes:
        return left[8:] + right[8:] if high else left[:8] + right[:8]

    return operation


def _equal_mask(width: int) -> Callable[[int, int], int]:
    ones = (1 << (8 * width)) - 1
    return lambda a, b: ones if a == b else 0


HANDLERS: dict[int, Handler] = {
    x86.X86_INS_INT3: _int3,
    x86.X86_INS_POPCNT: _bit_count(lambda v, b: alu.popcnt(v, b)),
    x86.X86_INS_LZCNT: _bit_count(lambda v, b: alu.lzcnt(v, b)),
    x86.X86_INS_TZCNT: _bit_count(lambda v, b: alu.tzcnt(v, b)),
    x86.X86_INS_BSF: _bit_count(alu.bsf),
    x86.X86_INS_BSR: _bit_count(alu.bsr),
    x86.X86_INS_CLAC: _clac,
    x86.X86_INS_STAC: _stac,
    x86.X86_INS_WAIT: _fwait,
    x86.X86_INS_LDMXCSR: _ldmxcsr,
    x86.X86_INS_STMXCSR: _stmxcsr,
    x86.X86_INS_CMPXCHG8B: _cmpxchg_wide(8),
    x86.X86_INS_CMPXCHG16B: _cmpxchg_wide(16),
    x86.X86_INS_XGETBV: _xgetbv,
    x86.X86_INS_XSETBV: _xsetbv,
    x86.X86_INS_XSAVE: _xsave,
    x86.X86_INS_XSAVE64: _xsave,
    x86.X86_INS_XSAVEOPT: _xsave,
    x86.X86_INS_XSAVEOPT64: _xsave,
    x86.X86_INS_XSAVEC: _xsavec,
    x86.X86_INS_XSAVEC64: _xsavec,
    x86.X86_INS_XRSTOR: _xrstor,
    x86.X86_INS_XRSTOR64: _xrstor,
    x86.X86_INS_FXSAVE: _fxsave,
    x86.X86_INS_FXSAVE64: _fxsave,
    x86.X86_INS_FXRSTOR: _fxrstor,
    x86.X86_INS_FXRSTOR64: _fxrstor,
    x86.X86_INS_RDRAND: _rdrand,
    x86.X86_INS_RDSEED: _rdrand,
    x86.X86_INS_MOVD: _sse_move(4, aligned=False),
    x86.X86_INS_MOVQ: _sse_move(8, aligned=False),
    x86.X86_INS_MOVDQA: _sse_move(None, aligned=True),
    x86.X86_INS_MOVAPS: _sse_move(None, aligned=True),
    x86.X86_INS_MOVAPD: _sse_move(None, aligned=True),
    x86.X86_INS_MOVDQU: _sse_move(None, aligned=False),
    x86.X86_INS_MOVUPS: _sse_move(None, aligned=False),
    x86.X86_INS_MOVUPD: _sse_move(None, aligned=False),
    x86.X86_INS_PXOR: _sse_binary(_bytewise(lambda a, b: a ^ b)),
    x86.X86_INS_XORPS: _sse_binary(_bytewise(lambda a, b: a ^ b)),
    x86.X86_INS_POR: _sse_binary(_bytewise(lambda a, b: a | b)),
    x86.X86_INS_PAND: _sse_binary(_bytewise(lambda a, b: a & b)),
    x86.X86_INS_PANDN: _sse_binary(_bytewise(lambda a, b: ~a & b)),
    x86.X86_INS_PADDB: _sse_binary(_lanewise(1, lambda a, b: a + b)),
    x86.X86_INS_PADDW: _sse_binary(_lanewise(2, lambda a, b: a + b)),
    x86.X86_INS_PADDD: _sse_binary(_lanewise(4, lambda a, b: a + b)),
    x86.X86_INS_PADDQ: _sse_binary(_lanewise(8, lambda a, b: a + b)),
    x86.X86_INS_PSUBB: _sse_binary(_lanewise(1, lambda a, b: a - b)),
    x86.X86_INS_PSUBW: _sse_binary(_lanewise(2, lambda a, b: a - b)),
    x86.X86_INS_PSUBD: _sse_binary(_lanewise(4, lambda a, b: a - b)),
    x86.X86_INS_PSUBQ: _sse_binary(_lanewise(8, lambda a, b: a - b)),
    x86.X86_INS_PCMPEQB: _sse_binary(_lanewise(1, _equal_mask(1))),
    x86.X86_INS_PCMPEQW: _sse_binary(_lanewise(2, _equal_mask(2))),
    x86.X86_INS_PCMPEQD: _sse_binary(_lanewise(4, _equal_mask(4))),
    x86.X86_INS_PSHUFB: _sse_binary(_pshufb),
    x86.X86_INS_PUNPCKLQDQ: _sse_binary(_punpck(high=False)),
    x86.X86_INS_PUNPCKHQDQ: _sse_binary(_punpck(high=True)),
    x86.X86_INS_PSHUFD: _pshufd,
    x86.X86_INS_PSRLD: _shift_immediate(4, left=False),
    x86.X86_INS_PSLLD: _shift_immediate(4, left=True),
    x86.X86_INS_PSRLQ: _shift_immediate(8, left=False),
    x86.X86_INS_PSLLQ: _shift_immediate(8, left=True),
}

#: mnemonics emulate() can complete (for reports and documentation)
SUPPORTED_INSTRUCTION_IDS = frozenset(HANDLERS)
