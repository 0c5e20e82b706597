"""ELF symbols to file offsets, and library names to paths, for uprobes.

uprobe_events wants ``PATH:OFFSET`` with OFFSET a file offset, so a symbol's
virtual address is mapped through the PT_LOAD segment that contains it:
``offset = st_value - p_vaddr + p_offset``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from c8.probes.definition import ProbeError

LIBRARY_DIRS = (
    "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
    "/lib", "/usr/lib", "/usr/local/lib",
)
# pyelftools names STT_GNU_IFUNC (10) STT_LOOS.
_IFUNC_TYPES = ("STT_GNU_IFUNC", "STT_LOOS")
_FUNC_TYPES = ("STT_FUNC", *_IFUNC_TYPES)


def resolve_executable(executable: str) -> str:
    """An absolute, symlink-free path for a binary or library.

    A path (with '/') is made absolute; a bare library name (``libc.so.6``)
    is looked up in ``ldconfig -p`` then the standard library directories; a
    bare program name (``bash``) in PATH. Raises ProbeError naming the file.
    """
    if not executable or any(c.isspace() for c in executable):
        raise ProbeError(f"bad executable {executable!r}: empty or containing whitespace")
    if "/" in executable:
        path = os.path.realpath(os.path.abspath(executable))
    else:
        path = _find_library(executable) or shutil.which(executable) or ""
        if not path:
            raise ProbeError(
                f"executable {executable!r} not found by ldconfig -p, in "
                f"{', '.join(LIBRARY_DIRS)} or in PATH"
            )
        path = os.path.realpath(path)
    if not os.path.isfile(path):
        raise ProbeError(f"executable {executable!r}: {path} is not a file")
    if any(c.isspace() for c in path):
        raise ProbeError(f"executable {path!r}: uprobe_events cannot take a path with whitespace")
    return path


def _find_library(name: str) -> str | None:
    try:
        out = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fallback = None
    for line in out.splitlines():
        # "\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6"
        left, arrow, path = line.strip().partition(" => ")
        if arrow and left.split(" ", 1)[0] == name:
            if "x86-64" in left:
                return path
            fallback = fallback or path
    if fallback:
        return fallback
    for d in LIBRARY_DIRS:
        candidate = os.path.join(d, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _version_names(elf: ELFFile) -> dict[int, str]:
    verdef = elf.get_section_by_name(".gnu.version_d")
    names: dict[int, str] = {}
    if verdef is not None:
        for vd, aux in verdef.iter_versions():
            first = next(iter(aux), None)
            if first is not None:
                names[vd["vd_ndx"]] = first.name
    return names


def _candidates(elf: ELFFile, name: str):
    """(symbol, version or None, is_default_version) for every defined function ``name``."""
    versions = _version_names(elf)
    for section_name in (".symtab", ".dynsym"):
        table = elf.get_section_by_name(section_name)
        if table is None:
            continue
        versym = elf.get_section_by_name(".gnu.version") if section_name == ".dynsym" else None
        for index, sym in enumerate(table.iter_symbols()):
            if sym.name != name:
                continue
            version, default = None, True
            if versym is not None:
                ndx = versym.get_symbol(index)["ndx"]
                if isinstance(ndx, int):
                    default = not ndx & 0x8000
                    version = versions.get(ndx & 0x7FFF)
            yield sym, version, default


def symbol_file_offset(path: str, symbol: str) -> int:
    """The file offset of function ``symbol`` in the ELF file ``path``.

    Searches .symtab and .dynsym. ``symbol`` may carry a version:
    ``connect@@GLIBC_2.2.5`` (default) or ``name@VERSION``; without one the
    default version is preferred. Raises ProbeError naming file and symbol.
    """
    name, _, version = symbol.partition("@")
    version = version.lstrip("@") or None
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            found = None
            kinds: set[str] = set()
            for sym, sym_version, default in _candidates(elf, name):
                kinds.add(sym["st_info"]["type"])
                if sym["st_shndx"] == "SHN_UNDEF" or sym["st_info"]["type"] not in _FUNC_TYPES:
                    continue
                if version is not None and sym_version != version:
                    continue
                if found is None or (default and not found[1]):
                    found = (sym, default)
            if found is None:
                what = "an undefined or non-function symbol" if kinds else "no such symbol"
                wanted = f"{name}@{version}" if version else name
                raise ProbeError(f"function {wanted!r} not found in {path}: {what} in .symtab/.dynsym")
            sym = found[0]
            if sym["st_info"]["type"] in _IFUNC_TYPES:
                raise ProbeError(
                    f"{symbol!r} in {path} is an IFUNC resolver, called once at load time: "
                    "probe the implementation it selects instead"
                )
            address = sym["st_value"]
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= address < seg["p_vaddr"] + seg["p_filesz"]:
                    return address - seg["p_vaddr"] + seg["p_offset"]
            raise ProbeError(f"function {symbol!r} in {path}: address 0x{address:x} is in no PT_LOAD segment")
    except (OSError, ELFError) as e:
        raise ProbeError(f"cannot read ELF symbols of {path} for {symbol!r}: {e}") from e
