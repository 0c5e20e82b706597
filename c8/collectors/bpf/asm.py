"""An eBPF assembler: instructions built in Python, labels resolved, bytes out.

No compiler is involved: a :class:`Program` collects instructions through
small methods named like the mnemonics (``mov``, ``ldx``, ``jeq``, ``call``),
jumps name a label, and :meth:`Program.assemble` resolves every label to a
relative offset (in 8-byte slots; ``ld_imm64`` takes two) and packs the
``struct bpf_insn`` array the bpf(BPF_PROG_LOAD) call takes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# registers
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FP = R10

# instruction classes
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
# sizes
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
SIZE_BYTES = {W: 4, H: 2, B: 1, DW: 8}
SIZE_OF = {1: B, 2: H, 4: W, 8: DW}
# modes
IMM, MEM, ATOMIC = 0x00, 0x60, 0xC0
ATOMIC_ADD = 0x00  # imm of an ATOMIC store: lock *(dst + off) += src
# source operand
K, X = 0x00, 0x08

ALU_OPS = {"add": 0x00, "sub": 0x10, "mul": 0x20, "div": 0x30, "or": 0x40, "and": 0x50,
           "lsh": 0x60, "rsh": 0x70, "neg": 0x80, "mod": 0x90, "xor": 0xA0, "mov": 0xB0,
           "arsh": 0xC0}
JMP_OPS = {"ja": 0x00, "jeq": 0x10, "jgt": 0x20, "jge": 0x30, "jset": 0x40, "jne": 0x50,
           "jsgt": 0x60, "jsge": 0x70, "call": 0x80, "exit": 0x90, "jlt": 0xA0, "jle": 0xB0,
           "jslt": 0xC0, "jsle": 0xD0}

PSEUDO_MAP_FD = 1

# helper function ids (include/uapi/linux/bpf.h)
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
PROBE_READ = 4
KTIME_GET_NS = 5
GET_SMP_PROCESSOR_ID = 8
GET_CURRENT_PID_TGID = 14
GET_CURRENT_UID_GID = 15
GET_CURRENT_COMM = 16
PERF_EVENT_OUTPUT = 25
GET_CURRENT_TASK = 35
PROBE_READ_USER = 112
PROBE_READ_KERNEL = 113
PROBE_READ_USER_STR = 114
PROBE_READ_KERNEL_STR = 115
RINGBUF_OUTPUT = 130
TASK_STORAGE_GET = 156
GET_CURRENT_TASK_BTF = 158
LOCAL_STORAGE_GET_F_CREATE = 1

BPF_F_CURRENT_CPU = 0xFFFFFFFF
BPF_ANY = 0

_INSN = struct.Struct("<BBhi")
INSN_SIZE = _INSN.size


class AsmError(ValueError):
    """An instruction that cannot be encoded, or a label that does not resolve."""


@dataclass
class Insn:
    """One ``struct bpf_insn``; ``target`` names a label for jumps."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: str | None = None

    def pack(self) -> bytes:
        if not (-(1 << 15) <= self.off < (1 << 15)):
            raise AsmError(f"offset {self.off} out of s16 range (code {self.code:#x})")
        if not (-(1 << 31) <= self.imm < (1 << 32)):
            raise AsmError(f"immediate {self.imm} out of 32-bit range (code {self.code:#x})")
        imm = self.imm - (1 << 32) if self.imm >= (1 << 31) else self.imm
        return _INSN.pack(self.code, (self.src << 4) | self.dst, self.off, imm)


def _reg(r: int) -> int:
    if not isinstance(r, int) or not 0 <= r <= 10:
        raise AsmError(f"bad register {r!r}")
    return r


class Program:
    """A list of instructions with labels; methods append and return self."""

    def __init__(self, name: str = "prog"):
        self.name = name
        self.insns: list[Insn] = []
        self.labels: dict[str, int] = {}
        self._slot = 0  # index in 8-byte slots of the next instruction
        self._uniq = 0

    # -- bookkeeping ---------------------------------------------------------
    def _emit(self, insn: Insn) -> Program:
        self.insns.append(insn)
        self._slot += 1
        return self

    def label(self, name: str) -> Program:
        """Mark the next instruction's position as ``name``."""
        if name in self.labels:
            raise AsmError(f"{self.name}: label {name!r} defined twice")
        self.labels[name] = self._slot
        return self

    def fresh(self, stem: str = "L") -> str:
        """A label name not used yet in this program."""
        self._uniq += 1
        return f".{stem}{self._uniq}"

    def __len__(self) -> int:
        return self._slot

    # -- ALU -----------------------------------------------------------------
    def alu(self, op: str, dst: int, src: int | None = None, imm: int = 0,
            wide: bool = True) -> Program:
        """``dst op= src`` (register) or ``dst op= imm`` when ``src`` is None."""
        cls = ALU64 if wide else ALU
        code = cls | ALU_OPS[op]
        if src is None:
            return self._emit(Insn(code | K, _reg(dst), 0, 0, imm))
        return self._emit(Insn(code | X, _reg(dst), _reg(src), 0, 0))

    def mov(self, dst: int, src: int) -> Program:
        """dst = src (64-bit register move)."""
        return self.alu("mov", dst, src)

    def movi(self, dst: int, imm: int) -> Program:
        """dst = imm (sign-extended 32-bit immediate)."""
        return self.alu("mov", dst, None, imm)

    def mov32(self, dst: int, src: int) -> Program:
        """dst = (u32)src, upper half zeroed."""
        return self.alu("mov", dst, src, wide=False)

    def addi(self, dst: int, imm: int) -> Program:
        return self.alu("add", dst, None, imm)

    def add(self, dst: int, src: int) -> Program:
        return self.alu("add", dst, src)

    def sub(self, dst: int, src: int) -> Program:
        return self.alu("sub", dst, src)

    def andi(self, dst: int, imm: int) -> Program:
        return self.alu("and", dst, None, imm)

    def rshi(self, dst: int, imm: int) -> Program:
        return self.alu("rsh", dst, None, imm)

    def lshi(self, dst: int, imm: int) -> Program:
        return self.alu("lsh", dst, None, imm)

    def arshi(self, dst: int, imm: int) -> Program:
        return self.alu("arsh", dst, None, imm)

    # -- loads and stores ----------------------------------------------------
    def ldx(self, size: int, dst: int, src: int, off: int) -> Program:
        """dst = *(size *)(src + off)."""
        return self._emit(Insn(LDX | MEM | size, _reg(dst), _reg(src), off, 0))

    def stx(self, size: int, dst: int, off: int, src: int) -> Program:
        """*(size *)(dst + off) = src."""
        return self._emit(Insn(STX | MEM | size, _reg(dst), _reg(src), off, 0))

    def st(self, size: int, dst: int, off: int, imm: int) -> Program:
        """*(size *)(dst + off) = imm."""
        return self._emit(Insn(ST | MEM | size, _reg(dst), 0, off, imm))

    def atomic_add(self, size: int, dst: int, off: int, src: int) -> Program:
        """lock *(size *)(dst + off) += src (W or DW): a counter safe against
        another program on the same CPU interrupting this one."""
        if size not in (W, DW):
            raise AsmError(f"atomic add takes W or DW, not size {size:#x}")
        return self._emit(Insn(STX | ATOMIC | size, _reg(dst), _reg(src), off, ATOMIC_ADD))

    def ld_imm64(self, dst: int, imm: int, src: int = 0) -> Program:
        """dst = 64-bit immediate (two slots)."""
        imm &= (1 << 64) - 1
        self._emit(Insn(LD | IMM | DW, _reg(dst), src, 0, imm & 0xFFFFFFFF))
        return self._emit(Insn(0, 0, 0, 0, imm >> 32))

    def ld_map_fd(self, dst: int, map_fd: int) -> Program:
        """dst = the map of file descriptor ``map_fd`` (BPF_PSEUDO_MAP_FD)."""
        return self.ld_imm64(dst, map_fd, src=PSEUDO_MAP_FD)

    # -- jumps ---------------------------------------------------------------
    def jmp(self, op: str, dst: int, src: int | None, imm: int, target: str,
            wide: bool = True) -> Program:
        """``if dst op src|imm goto target``."""
        cls = JMP if wide else JMP32
        code = cls | JMP_OPS[op]
        if src is None:
            return self._emit(Insn(code | K, _reg(dst), 0, 0, imm, target))
        return self._emit(Insn(code | X, _reg(dst), _reg(src), 0, 0, target))

    def ja(self, target: str) -> Program:
        return self._emit(Insn(JMP | JMP_OPS["ja"], target=target))

    def call(self, helper: int) -> Program:
        return self._emit(Insn(JMP | JMP_OPS["call"], imm=helper))

    def exit(self) -> Program:
        return self._emit(Insn(JMP | JMP_OPS["exit"]))

    # -- output ----------------------------------------------------------------
    def resolve(self) -> list[Insn]:
        """Instructions with every jump's ``off`` set from its label."""
        out = []
        slot = 0
        for insn in self.insns:
            if insn.target is not None:
                if insn.target not in self.labels:
                    raise AsmError(f"{self.name}: undefined label {insn.target!r}")
                off = self.labels[insn.target] - (slot + 1)
                if not (-(1 << 15) <= off < (1 << 15)):
                    raise AsmError(f"{self.name}: jump to {insn.target!r} too far ({off})")
                insn = Insn(insn.code, insn.dst, insn.src, off, insn.imm)
            out.append(insn)
            slot += 1
        for name, pos in self.labels.items():
            if pos > slot:
                raise AsmError(f"{self.name}: label {name!r} past the end")
        return out

    def assemble(self) -> bytes:
        """The program as the bytes of a ``struct bpf_insn`` array."""
        if not self.insns:
            raise AsmError(f"{self.name}: empty program")
        return b"".join(i.pack() for i in self.resolve())


def disassemble(code: bytes) -> list[tuple[int, int, int, int, int]]:
    """(code, dst, src, off, imm) of each slot: for tests and debugging."""
    out = []
    for i in range(0, len(code), INSN_SIZE):
        op, regs, off, imm = _INSN.unpack_from(code, i)
        out.append((op, regs & 0xF, regs >> 4, off, imm))
    return out
