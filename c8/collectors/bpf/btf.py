"""A minimal reader of kernel BTF: byte offsets of struct members.

Programs read kernel structures (``task_struct.exit_code``) with
bpf_probe_read_kernel at an offset that differs between kernel builds; BTF
(/sys/kernel/btf/vmlinux) describes the running kernel's layout. Only what
member lookup needs is parsed: type records are indexed once, and struct
members (including those inside anonymous structs and unions) searched on
demand. Results are cached per file.
"""

from __future__ import annotations

import functools
import struct

VMLINUX = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BtfError(LookupError):
    """BTF is absent or unreadable, or has no such struct or member."""


def _extra(kind: int, vlen: int) -> int:
    """Bytes of kind-specific data after a 12-byte btf_type."""
    if kind in (KIND_INT, KIND_VAR, KIND_DECL_TAG):
        return 4
    if kind == KIND_ARRAY:
        return 12
    if kind in (KIND_STRUCT, KIND_UNION, KIND_DATASEC, KIND_ENUM64):
        return 12 * vlen
    if kind in (KIND_ENUM, KIND_FUNC_PROTO):
        return 8 * vlen
    return 0


class Btf:
    """Parsed type index of one BTF blob."""

    def __init__(self, data: bytes, source: str = "<bytes>"):
        self.source = source
        if len(data) < 24:
            raise BtfError(f"{source}: too short for BTF")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BtfError(f"{source}: bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types = hdr_len + type_off
        self._strs = hdr_len + str_off
        self._str_end = self._strs + str_len
        # offsets[i] = byte offset of type id i (id 0 is void)
        self._offsets = [0]
        self._by_name: dict[str, list[int]] = {}
        pos, end = self._types, self._types + type_len
        while pos < end:
            name_off, info, _ = struct.unpack_from("<III", data, pos)
            kind = (info >> 24) & 0x1F
            tid = len(self._offsets)
            self._offsets.append(pos)
            if kind in (KIND_STRUCT, KIND_UNION) and name_off:
                self._by_name.setdefault(self._str(name_off), []).append(tid)
            pos += 12 + _extra(kind, info & 0xFFFF)

    def _str(self, off: int) -> str:
        start = self._strs + off
        end = self._data.index(b"\0", start, self._str_end)
        return self._data[start:end].decode()

    def _type(self, tid: int) -> tuple[int, int, int, int, int]:
        """(kind, vlen, kind_flag, size_or_type, byte offset) of a type id."""
        pos = self._offsets[tid]
        _name, info, size = struct.unpack_from("<III", self._data, pos)
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size, pos

    def _members(self, tid: int):
        kind, vlen, kflag, _size, pos = self._type(tid)
        for i in range(vlen):
            name_off, mtype, moff = struct.unpack_from("<III", self._data, pos + 12 + 12 * i)
            bits = moff & 0xFFFFFF if kflag else moff
            yield (self._str(name_off) if name_off else ""), mtype, bits

    def _strip(self, tid: int) -> int:
        while True:
            kind, _v, _k, ref, _p = self._type(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = ref

    def _find(self, tid: int, member: str) -> tuple[int, int] | None:
        """(bit offset, type id) of ``member`` in struct/union ``tid``, searching anonymous members."""
        for name, mtype, bits in self._members(tid):
            if name == member:
                return bits, mtype
            if not name:
                inner = self._strip(mtype)
                if self._type(inner)[0] in (KIND_STRUCT, KIND_UNION):
                    found = self._find(inner, member)
                    if found:
                        return bits + found[0], found[1]
        return None

    def member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` (``exit_code`` or ``signal.live``-style dotted, by value) in the struct."""
        ids = self._by_name.get(struct_name)
        if not ids:
            raise BtfError(f"{self.source}: no struct {struct_name!r}")
        # forward-declared duplicates have vlen 0: take the one with members
        tid = max(ids, key=lambda t: self._type(t)[1])
        total = 0
        for part in path.split("."):
            found = self._find(tid, part)
            if found is None:
                raise BtfError(f"{self.source}: struct {struct_name!r} has no member {path!r}")
            bits, mtype = found
            if bits % 8:
                raise BtfError(f"{self.source}: {struct_name}.{path} is a bitfield")
            total += bits // 8
            tid = self._strip(mtype)
        return total


@functools.lru_cache(maxsize=4)
def load(path: str = VMLINUX) -> Btf:
    """The parsed BTF of ``path`` (cached)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BtfError(f"kernel BTF not found at {path}: the kernel needs CONFIG_DEBUG_INFO_BTF "
                       "for the 'exit' eBPF program") from None
    except OSError as exc:
        raise BtfError(f"cannot read kernel BTF {path}: {exc}") from None
    return Btf(data, path)


@functools.lru_cache(maxsize=64)
def member_offset(struct_name: str, path: str, btf_path: str = VMLINUX) -> int:
    """Byte offset of ``struct_name.path`` in the running kernel (cached)."""
    return load(btf_path).member_offset(struct_name, path)
