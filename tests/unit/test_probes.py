"""c8.probes without root: fetch-argument syntax, names, kallsyms, ELF offsets.

kallsyms and kprobe_events are faked with files in tmp_path (this kernel has
no kprobes, and the tests must not depend on the host's symbol table); the
ELF tests read the machine's real libc and compare with binutils' output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from c8.probes import (
    KprobesUnavailable,
    ProbeError,
    kernel_probe,
    kprobes_available,
    parse_fetchargs,
    probe_name,
    render_fetchargs,
    resolve_kernel_symbol,
    user_probe,
)
from c8.probes.elf import resolve_executable, symbol_file_offset
from c8.probes.fetchargs import FetchArgError
from c8.probes.tracefs import _normalized, kind_of, parse_line

# --- fetch arguments: valid ---------------------------------------------------

VALID = [
    # (kind, is_return, text, rendered)
    ("uprobe", False, "fd=%di:s32", "fd=%di:s32"),
    ("uprobe", False, "fd=%di:s32 port=+2(%si):u16 path=+0(%si):string",
     "fd=%di:s32 port=+2(%si):u16 path=+0(%si):string"),
    ("uprobe", False, "%di", "arg1=%di:x64"),
    ("uprobe", False, "a=%r8:u64 b=%r15:s8 c=%ax:x16", "a=%r8:u64 b=%r15:s8 c=%ax:x16"),
    ("uprobe", False, "s=$stack0:u64 sp=$stack", "s=$stack0:u64 sp=$stack:x64"),
    ("uprobe", False, "c=$comm", "c=$comm:string"),
    ("uprobe", False, "c=$comm:string", "c=$comm:string"),
    ("uprobe", True, "ret=$retval:s32", "ret=$retval:s32"),
    ("uprobe", True, "ret=$retval", "ret=$retval:x64"),
    ("uprobe", False, "x=-0x10(%sp):u32", "x=-16(%sp):u32"),
    ("uprobe", False, "x=+u8(+0(%di)):u8", "x=+u8(+0(%di)):u8"),
    ("uprobe", False, "g=@0x601040:u32", "g=@0x601040:u32"),
    ("uprobe", False, "g=@+0x1234:u32", "g=@+0x1234:u32"),
    ("uprobe", False, "arr=+0(%di):u8[16]", "arr=+0(%di):u8[16]"),
    ("uprobe", False, "argv=+0(%si):string[4]", "argv=+0(%si):string[4]"),
    ("uprobe", False, "bf=+4(%di):b3@2/8", "bf=+4(%di):b3@2/8"),
    ("uprobe", False, "bf=+4(%di):b32@32/64", "bf=+4(%di):b32@32/64"),
    ("uprobe", False, "ch=+0(%di):char u=+0(%si):ustring", "ch=+0(%di):char u=+0(%si):ustring"),
    ("uprobe", False, r"k=\42:u32 h=\0x10:u8 neg=\-1:s64", r"k=\42:u32 h=\16:u8 neg=\-1:s64"),
    ("uprobe", False, r'tag=\"hello"', r'tag=\"hello":string'),
    ("uprobe", False, "o=+010(%di):u8", "o=+8(%di):u8"),  # kstrtol base 0: octal
    ("uprobe", False, "", ""),
    ("uprobe", False, "  fd=%di:s32   ", "fd=%di:s32"),
    ("kprobe", False, "dport=+12(%di):u16", "dport=+12(%di):u16"),
    ("kprobe", False, "sk=$arg1 len=$arg3:u32", "sk=$arg1:x64 len=$arg3:u32"),
    ("kprobe", True, "ret=$retval:s64 a=$arg1", "ret=$retval:s64 a=$arg1:x64"),
    ("kprobe", False, "j=@jiffies:u64 o=@init_task+16:x64", "j=@jiffies:u64 o=@init_task+16:x64"),
    ("kprobe", False, "o=@init_task-0x8:x64", "o=@init_task-8:x64"),
    ("kprobe", False, "f=%ip:symbol s=%ip:symstr", "f=%ip:symbol s=%ip:symstr"),
    ("kprobe", False, "d=+0(%di):%pd", "d=+0(%di):%pd"),
    ("kprobe", False, "name=+0(+24(%di)):string", "name=+0(+24(%di)):string"),
]


@pytest.mark.parametrize("kind,is_return,text,rendered", VALID)
def test_valid_fetchargs_render_to_kernel_syntax(kind, is_return, text, rendered):
    args = parse_fetchargs(text, kind, is_return)
    assert render_fetchargs(args) == rendered
    # Rendering is a fixed point: parsing the rendered text gives the same arguments.
    assert parse_fetchargs(rendered, kind, is_return) == args


def test_parsed_structure():
    fd, port, path = parse_fetchargs("fd=%di:s32 port=+2(%si):u16 path=+0(%si):string", "uprobe", False)
    assert (fd.name, fd.fetch.op, fd.fetch.value, fd.type.base) == ("fd", "reg", "di", "s32")
    assert (port.fetch.op, port.fetch.offset, port.fetch.inner.value) == ("deref", 2, "si")
    assert path.type.is_string and not port.type.is_string


# --- fetch arguments: invalid, with the error text ----------------------------

INVALID = [
    ("uprobe", False, "fd=%rdi:s32", r"argument 'fd' .*unknown register %rdi for x86_64 \(the kernel calls it %di\)"),
    ("uprobe", False, "fd=%edi", r"unknown register %edi .*%di"),
    ("uprobe", False, "x=%r9d", r"unknown register %r9d .*%r9"),
    ("uprobe", False, "x=%xmm0", r"unknown register %xmm0 for x86_64 \(known: "),
    ("uprobe", False, "x=%", r"unknown register % for x86_64"),
    ("uprobe", False, "port=+2(%si):u17", r"argument 'port' .*bad type 'u17'"),
    ("uprobe", False, "x=%di:int", r"bad type 'int'"),
    ("uprobe", False, "x=%di:", r"bad type ''"),
    ("uprobe", False, "r=$retval:s32", r"argument 'r' .*\$retval is only available on return probes"),
    ("uprobe", False, "a=$arg1", r"argument 'a' .*\$argN is not available on uprobes"),
    ("kprobe", False, "a=$arg0", r"\$argN counts from 1"),
    ("uprobe", False, "1x=%di", r"argument '1x' .*invalid name"),
    ("uprobe", False, "my-arg=%di", r"invalid name"),
    ("uprobe", False, "=%di", r"invalid name"),
    ("uprobe", False, "a" * 33 + "=%di", r"name longer than 32"),
    ("uprobe", False, "common_pid=%di", r"name 'common_pid' is reserved"),
    ("uprobe", False, "__probe_ip=%di", r"reserved"),
    ("uprobe", False, "a=%di a=%si", r"argument 'a' .*name used twice"),
    ("uprobe", False, "%di arg1=%si", r"argument 'arg1' .*name used twice"),
    ("uprobe", False, "p=%di:string", r"type 'string' needs memory: dereference the pointer, e.g. \+0\(%di\):string"),
    ("uprobe", False, "p=$stack0:ustring", r"needs memory"),
    ("uprobe", False, "a=%di:u8[4]", r"an array type needs memory"),
    ("uprobe", False, "a=+0(%di):u8[65]", r"array length 65 out of range 1..64"),
    ("uprobe", False, "a=+0(%di):u8[0]", r"array length 0 out of range"),
    ("uprobe", False, "a=+0(%di):u8[x]", r"bad array type"),
    ("uprobe", False, "a=+0(%di):b3@2/8[2]", r"arrays of bitfields are not supported"),
    ("uprobe", False, "b=%di:b5@4/8", r"bitfield b5@4/8 does not fit its 8-bit container"),
    ("uprobe", False, "b=%di:b0@0/8", r"does not fit"),
    ("uprobe", False, "b=%di:b3@2/12", r"bad type 'b3@2/12'"),
    ("uprobe", False, "c=$comm:u32", r"\$comm can only be fetched as a string"),
    ("uprobe", False, r'c=\"x":u8', r"can only be fetched as a string"),
    ("uprobe", False, "x=+0($comm):u8", r"cannot dereference \$comm"),
    ("uprobe", False, "x=+2(%si:u16", r"unbalanced parentheses"),
    ("uprobe", False, "x=+(%si):u16", r"needs an offset"),
    ("uprobe", False, "x=+2%si:u16", r"base in parentheses"),
    ("uprobe", False, "x=%di)", r"unexpected '\)' after '%di'"),
    ("uprobe", False, "x=" + "+0(" * 9 + "%di" + ")" * 9, r"more than 8 nested dereferences"),
    ("uprobe", False, "x=$foo", r"unknown variable \$foo"),
    ("uprobe", False, "skb", r"unknown fetch expression 'skb'.*BTF argument names are not supported"),
    ("uprobe", False, "x=@jiffies:u64", r"@SYMBOL is for kprobes only"),
    ("kprobe", False, "x=@+0x10:u64", r"@\+OFFSET \(file offset\) is for uprobes only"),
    ("uprobe", False, "x=%ip:symbol", r"type 'symbol' is for kernel probes only"),
    ("uprobe", False, "x=+0(%di):%pd", r"type '%pd' is for kernel probes only"),
    ("uprobe", False, r"x=\zz", r"needs an immediate number"),
    ("uprobe", False, r'x=\"abc', r"without its closing quote"),
    ("uprobe", False, " ".join(f"a{i}=%di" for i in range(129)), r"too many fetch arguments: 129"),
]


@pytest.mark.parametrize("kind,is_return,text,message", INVALID)
def test_invalid_fetchargs_are_refused_with_a_clear_error(kind, is_return, text, message):
    with pytest.raises(FetchArgError, match=message):
        parse_fetchargs(text, kind, is_return)


def test_argn_refused_after_an_offset():
    with pytest.raises(FetchArgError, match=r"function's entry"):
        parse_fetchargs("a=$arg1", "kprobe", False, function_entry=False)


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="kind must be"):
        parse_fetchargs("a=%di", "tracepoint", False)


# --- types to numpy dtypes (what the tracefs format file shows) ----------------

DTYPES = [
    ("u8", "u1"), ("u16", "<u2"), ("u32", "<u4"), ("u64", "<u8"),
    ("s8", "i1"), ("s16", "<i2"), ("s32", "<i4"), ("s64", "<i8"),
    ("x8", "u1"), ("x16", "<u2"), ("x32", "<u4"), ("x64", "<u8"),
    ("char", "u1"), ("string", "S256"), ("ustring", "S256"),
    ("b3@2/8", "u1"), ("b12@4/32", "<u4"),
]


@pytest.mark.parametrize("type_text,dtype", DTYPES)
def test_type_dtypes(type_text, dtype):
    (arg,) = parse_fetchargs(f"v=+0(%di):{type_text}", "uprobe", False)
    assert arg.type.dtype() == np.dtype(dtype)


def test_array_and_kernel_type_dtypes():
    arr, strs = parse_fetchargs("a=+0(%di):u16[4] s=+0(%si):string[2]", "uprobe", False)
    assert arr.type.dtype() == np.dtype(("<u2", (4,)))
    assert strs.type.dtype(string_width=64) == np.dtype(("S64", (2,)))
    sym, sstr = parse_fetchargs("f=%ip:symbol s=%ip:symstr", "kprobe", False)
    assert sym.type.dtype() == np.dtype("<u8") and sstr.type.dtype() == np.dtype("S256")


# --- probe names ----------------------------------------------------------------

def test_probe_names_are_deterministic_and_tracefs_safe():
    parts = ("uprobe", "/usr/lib/libc.so.6", "connect", "fd=%di:s32", False)
    name = probe_name(parts)
    assert name == probe_name(list(parts))
    assert re.fullmatch(r"up_connect_[0-9a-f]{12}", name)
    assert probe_name(parts[:3] + ("fd=%di:s64", False)) != name
    assert probe_name(parts[:4] + (True,)).startswith("ur_connect_")
    assert probe_name(("kprobe", "", "tcp_connect", "", False)).startswith("kp_tcp_connect_")
    long = probe_name(("uprobe", "/x", "a" * 200 + "@@GLIBC.2", "", False))
    assert len(long) <= 64 and re.fullmatch(r"[A-Za-z0-9_]+", long)


# --- kprobes: availability and kallsyms on fake files ---------------------------

FAKE_KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81e2e5d0 T __x64_sys_connect
ffffffff81e2e600 t __se_sys_openat
ffffffff81e2e700 t __do_sys_bind
ffffffff82000000 D tcp_connect_data
ffffffff81e30000 T tcp_connect
ffffffff81e31000 t tcp_v4_connect.cold
ffffffffc0000000 t helper_fn\t[some_module]
"""


@pytest.fixture
def kallsyms(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text(FAKE_KALLSYMS)
    return str(path)


@pytest.fixture
def fake_tracefs(tmp_path):
    """A directory standing in for tracefs on a kernel with kprobes (not this one)."""
    root = tmp_path / "tracing"
    root.mkdir()
    (root / "kprobe_events").write_text("")
    return str(root)


@pytest.mark.parametrize("symbol,resolved", [
    ("tcp_connect", "tcp_connect"),
    ("sys_connect", "__x64_sys_connect"),
    ("SyS_connect", "__x64_sys_connect"),
    ("__x64_sys_connect", "__x64_sys_connect"),
    ("sys_openat", "__se_sys_openat"),
    ("sys_bind", "__do_sys_bind"),
    ("tcp_v4_connect.cold", "tcp_v4_connect.cold"),
    ("helper_fn", "helper_fn"),
])
def test_resolve_kernel_symbol(kallsyms, symbol, resolved):
    assert resolve_kernel_symbol(symbol, kallsyms) == resolved


def test_resolve_kernel_symbol_errors_list_what_was_tried(kallsyms):
    with pytest.raises(ProbeError, match=r"'sys_nosuch' not found in .*kallsyms as a text symbol "
                       r"\(tried: sys_nosuch, __x64_sys_nosuch, __se_sys_nosuch, __do_sys_nosuch\)"):
        resolve_kernel_symbol("sys_nosuch", kallsyms)
    with pytest.raises(ProbeError, match=r"tried: tcp_connect_data\)"):
        resolve_kernel_symbol("tcp_connect_data", kallsyms)  # a data symbol is not a function
    with pytest.raises(ProbeError, match="cannot read"):
        resolve_kernel_symbol("x", kallsyms + ".missing")


def test_kprobes_available_reads_the_tracefs_file(tmp_path, fake_tracefs, kallsyms):
    assert kprobes_available(fake_tracefs, kallsyms)
    empty = tmp_path / "no-kprobes"
    empty.mkdir()
    assert not kprobes_available(str(empty), kallsyms)


def test_kprobes_available_falls_back_to_kallsyms(tmp_path, kallsyms):
    # The unprivileged broker cannot look into tracefs (0700): kallsyms still
    # names trace_kprobe_create on kernels built with kprobe events.
    unreadable = str(tmp_path / "no-tracefs-here")
    assert not kprobes_available(unreadable, kallsyms)
    with_kprobes = tmp_path / "kallsyms-kprobes"
    with_kprobes.write_text(FAKE_KALLSYMS + "ffffffff814c6000 t trace_kprobe_create\n")
    assert kprobes_available(unreadable, str(with_kprobes))


def test_kernel_probe_lines(fake_tracefs, kallsyms):
    d = kernel_probe("tcp_connect", "dport=+12(%di):u16", False, "tc", tracefs=fake_tracefs, kallsyms=kallsyms)
    assert d.line == "p:c8probes/tc tcp_connect dport=+12(%di):u16"
    assert (d.kind, d.source, d.symbol, d.executable, d.is_return) == ("kprobe", "c8probes:tc", "tcp_connect", None, False)
    assert d.argument_names == ("dport",)
    r = kernel_probe("sys_connect", "ret=$retval:s32", True, "rc", maxactive=16,
                     tracefs=fake_tracefs, kallsyms=kallsyms)
    assert r.line == "r16:c8probes/rc __x64_sys_connect ret=$retval:s32"
    o = kernel_probe("tcp_connect+0x4", "", False, tracefs=fake_tracefs, kallsyms=kallsyms)
    assert o.line == f"p:c8probes/{o.name} tcp_connect+4" and o.name.startswith("kp_tcp_connect_4_")
    with pytest.raises(FetchArgError, match="function's entry"):
        kernel_probe("tcp_connect+4", "a=$arg1", False, tracefs=fake_tracefs, kallsyms=kallsyms)
    with pytest.raises(ProbeError, match="maxactive"):
        kernel_probe("tcp_connect", "", False, maxactive=4, tracefs=fake_tracefs, kallsyms=kallsyms)
    with pytest.raises(ProbeError, match="bad kernel symbol"):
        kernel_probe("tcp connect", "", False, tracefs=fake_tracefs, kallsyms=kallsyms)


def test_kernel_probe_without_kprobes_says_so(tmp_path, kallsyms):
    root = tmp_path / "tracing"
    root.mkdir()
    with pytest.raises(KprobesUnavailable) as e:
        kernel_probe("tcp_connect", "", False, tracefs=str(root), kallsyms=kallsyms)
    assert str(e.value) == (
        "kernel function probes need kprobes (CONFIG_KPROBES); "
        f"this kernel has no {root}/kprobe_events"
    )


# --- definition lines as tracefs lists them --------------------------------------

def test_listed_lines_compare_equal_to_ours():
    ours = "p:c8probes/x /usr/lib/libc.so.6:0x10a7b0 fd=%di:s32"
    listed = "p:c8probes/x /usr/lib/libc.so.6:0x000000000010a7b0 fd=%di:s32"
    assert _normalized(ours) == _normalized(listed)
    assert _normalized(ours) != _normalized(listed.replace("s32", "s64"))
    assert _normalized("p:c8probes/k tcp_connect a=%di") == _normalized("p:c8probes/k tcp_connect+0 a=%di")
    assert parse_line(ours)[:4] == ("p", "c8probes", "x", "/usr/lib/libc.so.6:0x10a7b0")
    assert kind_of(ours) == "uprobe" and kind_of("r:c8probes/k tcp_connect") == "kprobe"
    with pytest.raises(ProbeError, match="bad probe definition"):
        parse_line("nonsense")


# --- ELF symbols on the machine's libc, compared with binutils ---------------------

LIBC = resolve_executable("libc.so.6")


def _binutils_offset(path: str, symbol: str) -> int:
    """File offset of a dynamic symbol from `nm -D` and `readelf -lW`, the slow way."""
    nm = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    addresses = {int(a, 16) for a, _, n in (line.split() for line in nm.splitlines() if len(line.split()) == 3)
                 if n == f"{symbol}@@" + n.split("@@")[-1] or n == symbol}
    assert len(addresses) == 1, (symbol, addresses)
    address = addresses.pop()
    segments = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True, check=True).stdout
    for line in segments.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            offset, vaddr, filesz = int(f[1], 16), int(f[2], 16), int(f[4], 16)
            if vaddr <= address < vaddr + filesz:
                return address - vaddr + offset
    raise AssertionError(f"{symbol} in no LOAD segment")


needs_binutils = pytest.mark.skipif(not (shutil.which("nm") and shutil.which("readelf")), reason="binutils")


@needs_binutils
@pytest.mark.parametrize("symbol", ["connect", "open", "getpid"])
def test_libc_symbol_offsets_match_binutils(symbol):
    assert symbol_file_offset(LIBC, symbol) == _binutils_offset(LIBC, symbol)


@needs_binutils
def test_versioned_names_resolve_to_the_same_offset():
    plain = symbol_file_offset(LIBC, "connect")
    assert symbol_file_offset(LIBC, "connect@@GLIBC_2.2.5") == plain
    assert symbol_file_offset(LIBC, "connect@GLIBC_2.2.5") == plain
    with pytest.raises(ProbeError, match=r"'connect@GLIBC_9.9' not found in .*libc"):
        symbol_file_offset(LIBC, "connect@GLIBC_9.9")


def test_elf_errors_name_file_and_symbol(tmp_path):
    with pytest.raises(ProbeError, match=r"'c8_no_such_function' not found in .*libc.*no such symbol"):
        symbol_file_offset(LIBC, "c8_no_such_function")
    with pytest.raises(ProbeError, match=r"'stdout' not found in .*undefined or non-function"):
        symbol_file_offset(LIBC, "stdout")  # a data object
    with pytest.raises(ProbeError, match=r"'strlen' in .* is an IFUNC resolver"):
        symbol_file_offset(LIBC, "strlen")
    text = tmp_path / "not-elf"
    text.write_text("hello")
    with pytest.raises(ProbeError, match=r"cannot read ELF symbols of .*not-elf for 'main'"):
        symbol_file_offset(str(text), "main")


def test_resolve_executable(tmp_path):
    assert os.path.isabs(LIBC) and LIBC == os.path.realpath(LIBC)
    assert resolve_executable("/lib/x86_64-linux-gnu/libc.so.6") == LIBC
    assert resolve_executable(shutil.which("sh")) == os.path.realpath(shutil.which("sh"))
    assert resolve_executable("sh") == os.path.realpath(shutil.which("sh"))  # from PATH
    with pytest.raises(ProbeError, match=r"'libc8nothing.so' not found by ldconfig -p"):
        resolve_executable("libc8nothing.so")
    with pytest.raises(ProbeError, match=r"is not a file"):
        resolve_executable(str(tmp_path))
    with pytest.raises(ProbeError, match="whitespace"):
        resolve_executable("lib c.so")


def test_user_probe_line():
    d = user_probe("libc.so.6", "connect", "fd=%di:s32 port=+2(%si):u16", False)
    offset = symbol_file_offset(LIBC, "connect")
    assert d.line == f"p:c8probes/{d.name} {LIBC}:0x{offset:x} fd=%di:s32 port=+2(%si):u16"
    assert (d.kind, d.symbol, d.executable, d.argument_names) == ("uprobe", "connect", LIBC, ("fd", "port"))
    assert d.source == f"c8probes:{d.name}"
    # Same request, same probe (so subscriptions share it); spacing does not matter.
    assert user_probe(LIBC, "connect", " fd=%di:s32  port=+2(%si):u16 ", False).name == d.name
    r = user_probe("libc.so.6", "connect", "ret=$retval:s32", True, name="mine")
    assert r.line.startswith(f"r:c8probes/mine {LIBC}:0x{offset:x} ") and r.is_return
    with pytest.raises(FetchArgError, match=r"\$argN is not available on uprobes"):
        user_probe("libc.so.6", "connect", "fd=$arg1", False)
