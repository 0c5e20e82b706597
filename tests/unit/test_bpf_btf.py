"""The BTF reader on a synthetic blob (the real vmlinux BTF is used in integration)."""

import struct

import pytest

from c8.collectors.bpf import btf


def _blob() -> bytes:
    strs = b"\0int\0task\0x\0a\0b\0z\0bits\0"

    def s(name: str) -> int:
        return strs.index(b"\0" + name.encode() + b"\0") + 1

    types = b""
    types += struct.pack("<III", s("int"), btf.KIND_INT << 24, 4) + struct.pack("<I", 32)  # id 1
    types += struct.pack("<III", 0, (btf.KIND_UNION << 24) | 2, 4)                          # id 2
    types += struct.pack("<III", s("a"), 1, 0) + struct.pack("<III", s("b"), 1, 0)
    types += struct.pack("<III", 0, btf.KIND_CONST << 24, 2)                                # id 3
    types += struct.pack("<III", s("task"), (btf.KIND_STRUCT << 24) | (1 << 31) | 4, 24)    # id 4
    types += struct.pack("<III", s("x"), 1, 0) + struct.pack("<III", 0, 3, 64)
    types += struct.pack("<III", s("z"), 1, 128) + struct.pack("<III", s("bits"), 1, (3 << 24) | 165)
    hdr = struct.pack("<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, len(types), len(types), len(strs))
    return hdr + types + strs


def test_member_offsets_including_anonymous_union_through_const():
    b = btf.Btf(_blob())
    assert b.member_offset("task", "x") == 0
    assert b.member_offset("task", "a") == 8
    assert b.member_offset("task", "b") == 8
    assert b.member_offset("task", "z") == 16


def test_errors_name_what_is_missing():
    b = btf.Btf(_blob())
    with pytest.raises(btf.BtfError, match="no member 'nope'"):
        b.member_offset("task", "nope")
    with pytest.raises(btf.BtfError, match="no struct 'other'"):
        b.member_offset("other", "x")
    with pytest.raises(btf.BtfError, match="bitfield"):
        b.member_offset("task", "bits")
    with pytest.raises(btf.BtfError, match="magic"):
        btf.Btf(b"\0" * 32)


def test_absent_btf_file_is_a_clear_error(tmp_path):
    with pytest.raises(btf.BtfError, match="CONFIG_DEBUG_INFO_BTF"):
        btf.load(str(tmp_path / "vmlinux"))
