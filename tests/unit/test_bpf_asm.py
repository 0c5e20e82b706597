"""The eBPF assembler: encodings, labels, jump bounds (no kernel)."""

import struct

import pytest

from c8.collectors.bpf import asm
from c8.collectors.bpf.asm import DW, R0, R1, R2, R10, AsmError, Program, W, disassemble


def test_alu_and_exit_encodings():
    p = Program().movi(R0, 0).exit()
    assert p.assemble() == bytes.fromhex("b700000000000000" "9500000000000000")


def test_register_move_and_32bit_move():
    code = Program().mov(R1, R10).mov32(R2, R0).assemble()
    assert disassemble(code) == [(0xBF, 1, 10, 0, 0), (0xBC, 2, 0, 0, 0)]


def test_negative_immediate_and_unsigned_32bit_immediate():
    code = Program().addi(R2, -16).ld_imm64(R1, 0xFFFFFFFF).assemble()
    ins = disassemble(code)
    assert ins[0] == (0x07, 2, 0, 0, -16)
    assert ins[1][0] == 0x18 and ins[1][4] == -1 and ins[2] == (0, 0, 0, 0, 0)


def test_memory_ops():
    code = Program().ldx(W, R1, R10, -8).stx(DW, R10, -16, R0).st(W, R10, -4, 7).assemble()
    assert disassemble(code) == [(0x61, 1, 10, -8, 0), (0x7B, 10, 0, -16, 0),
                                 (0x62, 10, 0, -4, 7)]


def test_map_fd_pseudo_load_takes_two_slots():
    p = Program().ld_map_fd(R1, 5).exit()
    assert len(p) == 3
    first = disassemble(p.assemble())[0]
    assert first == (0x18, 1, asm.PSEUDO_MAP_FD, 0, 5)


def test_labels_resolve_forward_and_backward_counting_wide_slots():
    p = Program()
    p.label("top").jmp("jeq", R1, None, 0, "end")   # slot 0
    p.ld_imm64(R2, 1 << 40)                          # slots 1-2
    p.ja("top")                                      # slot 3 -> -4
    p.label("end").movi(R0, 0).exit()                # slot 4
    ins = disassemble(p.assemble())
    assert ins[0] == (0x15, 1, 0, 3, 0)
    assert ins[3] == (0x05, 0, 0, -4, 0)
    lo, hi = ins[1][4], ins[2][4]
    assert (hi << 32) | (lo & 0xFFFFFFFF) == 1 << 40


def test_register_compare_jump_uses_x_source():
    p = Program().jmp("jne", R1, R2, None, "x").label("x").exit()
    assert disassemble(p.assemble())[0] == (0x5D, 1, 2, 0, 0)


def test_jump32_class():
    p = Program().jmp("jslt", R1, None, 0, "x", wide=False).label("x").exit()
    assert disassemble(p.assemble())[0][0] == 0x06 | 0xC0


def test_undefined_label_is_an_error():
    with pytest.raises(AsmError, match="undefined label 'nowhere'"):
        Program("t").ja("nowhere").exit().assemble()


def test_duplicate_label_is_an_error():
    p = Program().label("a")
    with pytest.raises(AsmError, match="twice"):
        p.label("a")


def test_jump_out_of_range():
    p = Program().ja("far")
    for _ in range(1 << 15):
        p.movi(R0, 0)
    p.label("far").exit()
    with pytest.raises(AsmError, match="too far"):
        p.assemble()


def test_bad_register_and_immediate():
    with pytest.raises(AsmError):
        Program().movi(11, 0)
    with pytest.raises(AsmError):
        Program().movi(R0, 1 << 33).assemble()


def test_fresh_labels_are_unique():
    p = Program()
    assert len({p.fresh() for _ in range(100)}) == 100


def test_instruction_size():
    assert asm.INSN_SIZE == 8 == struct.calcsize("<BBhi")


def test_atomic_add_encoding():
    code = Program().atomic_add(DW, R1, 8, R2).atomic_add(W, R10, -4, R0).assemble()
    assert disassemble(code) == [(0xDB, 1, 2, 8, 0), (0xC3, 10, 0, -4, 0)]
    with pytest.raises(AsmError):
        Program().atomic_add(asm.B, R1, 0, R2)
