"""perfagent.elf against readelf: compiled layouts, system libraries, odd files.

Every comparison parses ``readelf -W`` output independently and checks the
reader field by field, so a disagreement names the field and the file.
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import struct
import subprocess
import zlib
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import pytest

from perfagent.elf import ELFFile, LoadMap
from perfagent.elf import elffile as elffile_module
from perfagent.elf.constants import (
    PT_DYNAMIC, PT_LOAD, PT_NOTE, SHF_COMPRESSED, SHN_XINDEX, SHT_NOBITS,
)
from perfagent.errors import ELFError

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "elf_minimal64.hex")

pytestmark = pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils")

C_SOURCE = r"""
#include <stdio.h>
int counter;
__attribute__((noinline)) int f(int x) { counter += x; return x * 3; }
__attribute__((noinline)) static int helper(int x) { return f(x) + 1; }
#ifndef SHARED
int main(void) { printf("%d\n", helper(2)); return 0; }
#else
int exported(int x) { return helper(x); }
#endif
"""

# A freestanding 32-bit program: this machine has gcc -m32 but no 32-bit libc.
C_SOURCE_32 = r"""
int f(int x) { return x * 3; }
void _start(void) { for (;;) f(1); }
"""

VARIANTS: Dict[str, List[str]] = {
    "nopie": ["-O1", "-no-pie", "-fno-pie"],
    "pie": ["-O1", "-pie", "-fpie"],
    "separate-code": ["-O1", "-pie", "-fpie", "-Wl,-z,separate-code"],
    "noseparate-code": ["-O1", "-no-pie", "-fno-pie", "-Wl,-z,noseparate-code"],
    "shared": ["-O1", "-shared", "-fpic", "-DSHARED", "-Wl,-soname,libfoo.so.1"],
    "build-id-sha1": ["-O1", "-Wl,--build-id=sha1"],
    "build-id-md5": ["-O1", "-Wl,--build-id=md5"],
    "no-build-id": ["-O1", "-Wl,--build-id=none"],
    "debug-zlib": ["-O1", "-g", "-Wl,--compress-debug-sections=zlib"],
}


# ----------------------------------------------------------------- building

@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("elf"))


def compile_variant(build_dir: str, name: str) -> str:
    out = os.path.join(build_dir, name)
    if os.path.exists(out):
        return out
    src = os.path.join(build_dir, "prog.c")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    subprocess.run(["gcc", *VARIANTS[name], "-o", out, src], check=True)
    return out


def compile_m32(build_dir: str) -> str:
    out = os.path.join(build_dir, "m32")
    src = os.path.join(build_dir, "prog32.c")
    with open(src, "w") as f:
        f.write(C_SOURCE_32)
    result = subprocess.run(["gcc", "-m32", "-O1", "-nostdlib", "-static", "-Wl,--build-id",
                             "-o", out, src], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        pytest.skip("gcc -m32 does not work here")
    return out


def load_fixture() -> bytes:
    with open(FIXTURE) as f:
        return b"".join(bytes.fromhex(line) for line in f
                        if line.strip() and not line.lstrip().startswith("#"))


# ------------------------------------------------------- readelf, parsed

def readelf(path: str, *options: str) -> str:
    return subprocess.run(["readelf", "-W", *options, path], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, universal_newlines=True,
                          errors="replace").stdout


E_TYPES = {"NONE": 0, "REL": 1, "EXEC": 2, "DYN": 3, "CORE": 4}
MACHINES = {"Advanced Micro Devices X86-64": 62, "Intel 80386": 3, "PowerPC64": 21,
            "MIPS R3000": 8, "PowerPC": 20, "AArch64": 183}
P_TYPES = {"NULL": 0, "LOAD": 1, "DYNAMIC": 2, "INTERP": 3, "NOTE": 4, "SHLIB": 5, "PHDR": 6,
           "TLS": 7, "GNU_EH_FRAME": 0x6474E550, "GNU_STACK": 0x6474E551,
           "GNU_RELRO": 0x6474E552, "GNU_PROPERTY": 0x6474E553}
SH_TYPES = {"NULL": 0, "PROGBITS": 1, "SYMTAB": 2, "STRTAB": 3, "RELA": 4, "HASH": 5,
            "DYNAMIC": 6, "NOTE": 7, "NOBITS": 8, "REL": 9, "DYNSYM": 11, "INIT_ARRAY": 14,
            "FINI_ARRAY": 15, "PREINIT_ARRAY": 16, "GROUP": 17, "SYMTAB SECTION INDICES": 18,
            "GNU_HASH": 0x6FFFFFF6, "VERSYM": 0x6FFFFFFF, "VERNEED": 0x6FFFFFFE,
            "VERDEF": 0x6FFFFFFD}
SH_FLAG_LETTERS = {"W": 0x1, "A": 0x2, "X": 0x4, "M": 0x10, "S": 0x20, "I": 0x40, "L": 0x80,
                   "O": 0x100, "G": 0x200, "T": 0x400, "C": 0x800}
ST_TYPES = {"NOTYPE": 0, "OBJECT": 1, "FUNC": 2, "SECTION": 3, "FILE": 4, "COMMON": 5,
            "TLS": 6, "IFUNC": 10}
ST_BINDS = {"LOCAL": 0, "GLOBAL": 1, "WEAK": 2, "UNIQUE": 10}
ST_VIS = {"DEFAULT": 0, "INTERNAL": 1, "HIDDEN": 2, "PROTECTED": 3}
ST_NDX = {"UND": 0, "ABS": 0xFFF1, "COM": 0xFFF2}

PHDR_RE = re.compile(r"^\s+(\S+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+"
                     r"0x([0-9a-f]+)\s+0x([0-9a-f]+)\s([R ][W ][E ])\s0x([0-9a-f]+)$")
SHDR_RE = re.compile(r"^\s*\[\s*(\d+)\]\s(.{17}\S*)\s+(\S+(?: SECTION INDICES)?)\s+([0-9a-f]+)\s+"
                     r"([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([A-Za-z]*)\s+(\d+)\s+(\d+)\s+(\d+)$")
SYM_RE = re.compile(r"^\s*(\d+):\s+([0-9a-f]+)\s+(0x[0-9a-f]+|\d+)\s+(\S+)\s+(\S+)\s+(\S+)"
                    r"(?:\s+\[[^\]]*\])?\s+(\S+)(?: (.*))?$")


def first_int(text: str, base: int = 10) -> int:
    return int(text.split()[0], base)


def resolved_int(text: str) -> int:
    """'0 (31)' -> 31 (readelf's extended numbering display), '31' -> 31."""
    m = re.search(r"\((\d+)\)", text)
    return int(m.group(1)) if m else first_int(text)


def readelf_header(path: str) -> Dict[str, str]:
    fields = {}
    for line in readelf(path, "-h").splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


def readelf_segments(path: str) -> List[Tuple]:
    return [m.groups() for m in map(PHDR_RE.match, readelf(path, "-l").splitlines()) if m]


def readelf_sections(path: str) -> List[Tuple]:
    return [m.groups() for m in map(SHDR_RE.match, readelf(path, "-S").splitlines()) if m]


def readelf_symbols(path: str) -> Dict[str, List[Tuple]]:
    tables: Dict[str, List[Tuple]] = {}
    current: Optional[List[Tuple]] = None
    for line in readelf(path, "-s").splitlines():
        header = re.match(r"^Symbol table '(\S+)' contains (\d+) entr", line)
        if header:
            current = tables.setdefault(header.group(1), [])
            continue
        m = SYM_RE.match(line)
        if m and current is not None:
            current.append(m.groups())
    return tables


def readelf_build_id(path: str) -> Optional[str]:
    m = re.search(r"Build ID: ([0-9a-f]+)", readelf(path, "-n"))
    return m.group(1) if m else None


def readelf_soname(path: str) -> Optional[str]:
    m = re.search(r"\(SONAME\)\s+Library soname: \[(.*)\]", readelf(path, "-d"))
    return m.group(1) if m else None


def readelf_debuglink(path: str) -> Optional[Tuple[str, int]]:
    text = readelf(path, "-wk")
    at = text.find("Contents of the .gnu_debuglink section")
    if at < 0:
        return None
    m = re.search(r"Separate debug info file: (.*)\n\s*CRC value: 0x([0-9a-f]+)", text[at:])
    return (m.group(1).strip(), int(m.group(2), 16)) if m else None


def flag_letters(sh_flags: int) -> str:
    return "".join(sorted(k for k, bit in SH_FLAG_LETTERS.items() if sh_flags & bit))


def symbol_name_matches(ours: str, theirs: str) -> bool:
    """readelf appends symbol versions ('@GLIBC_2.2.5 (3)') to .dynsym names."""
    if ours == theirs:
        return True
    stripped = re.sub(r" \(\d+\)$", "", theirs)
    return stripped == ours or stripped.split("@")[0] == ours.split("@")[0]


# ----------------------------------------------------------- comparisons

def assert_header_matches(elf: ELFFile, path: str) -> None:
    h = readelf_header(path)
    assert elf.e_ident == bytes.fromhex(h["Magic"])
    assert elf.elfclass == (64 if h["Class"] == "ELF64" else 32)
    assert elf.little_endian == ("little endian" in h["Data"])
    assert elf.e_type == E_TYPES[h["Type"].split()[0]]
    if h["Machine"] in MACHINES:
        assert elf.e_machine == MACHINES[h["Machine"]]
    assert elf.e_version == int(h["Version"], 16)
    assert elf.e_entry == int(h["Entry point address"], 16)
    assert elf.e_phoff == first_int(h["Start of program headers"])
    assert elf.e_shoff == first_int(h["Start of section headers"])
    assert elf.e_flags == int(h["Flags"].split(",")[0], 16)
    assert elf.e_ehsize == first_int(h["Size of this header"])
    assert elf.e_phentsize == first_int(h["Size of program headers"])
    assert elf.e_shentsize == first_int(h["Size of section headers"])
    assert elf.e_phnum == first_int(h["Number of program headers"])
    assert elf.e_shnum == first_int(h["Number of section headers"])
    assert elf.e_shstrndx == first_int(h["Section header string table index"])
    assert elf.num_sections == resolved_int(h["Number of section headers"])
    assert elf.shstrndx == resolved_int(h["Section header string table index"])


def assert_segments_match(elf: ELFFile, path: str) -> None:
    rows = readelf_segments(path)
    assert len(rows) == len(elf.segments) == elf.num_segments
    for seg, (ptype, off, vaddr, paddr, filesz, memsz, flags, align) in zip(elf.segments, rows):
        if ptype in P_TYPES:
            assert seg.p_type == P_TYPES[ptype], (seg, ptype)
        assert (seg.p_offset, seg.p_vaddr, seg.p_paddr, seg.p_filesz, seg.p_memsz, seg.p_align) == (
            int(off, 16), int(vaddr, 16), int(paddr, 16), int(filesz, 16), int(memsz, 16),
            int(align, 16)), seg
        letters = "".join(c for c in flags if c != " ")
        ours = ("R" if seg.p_flags & 4 else "") + ("W" if seg.p_flags & 2 else "") + \
               ("E" if seg.p_flags & 1 else "")
        assert ours == letters, seg


def assert_sections_match(elf: ELFFile, path: str) -> None:
    rows = readelf_sections(path)
    assert len(rows) == len(elf.sections)
    for sec, row in zip(elf.sections, rows):
        nr, name, stype, addr, off, size, es, flg, lk, inf, al = row
        assert sec.name == name.strip(), (sec, row)
        if stype in SH_TYPES:
            assert sec.sh_type == SH_TYPES[stype], (sec, row)
        assert (sec.sh_addr, sec.sh_offset, sec.sh_size, sec.sh_entsize) == (
            int(addr, 16), int(off, 16), int(size, 16), int(es, 16)), (sec, row)
        assert (sec.sh_link, sec.sh_info, sec.sh_addralign) == (int(lk), int(inf), int(al)), (sec, row)
        theirs = "".join(sorted(c for c in flg if c in SH_FLAG_LETTERS))
        assert flag_letters(sec.sh_flags) == theirs, (sec, row)


def assert_symbols_match(elf: ELFFile, path: str) -> None:
    tables = readelf_symbols(path)
    for table in (".symtab", ".dynsym"):
        sec = elf.section(table)
        ours = list(elf.iter_symbols(table))
        theirs = tables.get(table, [])
        if sec is not None and sec.sh_type == SHT_NOBITS:
            assert ours == []
            continue
        assert len(ours) == len(theirs), table
        for sym, row in zip(ours, theirs):
            num, value, size, stype, bind, vis, ndx, name = row
            assert sym.st_value == int(value, 16), (sym, row)
            assert sym.st_size == int(size, 0), (sym, row)
            if stype in ST_TYPES:
                assert sym.st_type == ST_TYPES[stype], (sym, row)
            if bind in ST_BINDS:
                assert sym.st_bind == ST_BINDS[bind], (sym, row)
            assert sym.st_other & 3 == ST_VIS[vis], (sym, row)
            assert sym.st_shndx == (ST_NDX[ndx] if ndx in ST_NDX else int(ndx)), (sym, row)
            assert symbol_name_matches(sym.name, name or ""), (sym, row)


def assert_matches_readelf(path: str) -> SimpleNamespace:
    """Compare everything; return the file's metadata (the ELFFile is closed)."""
    with ELFFile.from_path(path) as elf:
        assert_header_matches(elf, path)
        assert_segments_match(elf, path)
        assert_sections_match(elf, path)
        assert_symbols_match(elf, path)
        assert elf.build_id == readelf_build_id(path)
        assert elf.soname == readelf_soname(path)
        assert elf.debuglink == readelf_debuglink(path)
        for sec in elf.sections:  # every section's bytes are reachable
            data = elf.section_data(sec)
            if sec.sh_type != SHT_NOBITS and not sec.sh_flags & SHF_COMPRESSED:
                assert len(data) == sec.sh_size
        return SimpleNamespace(
            elfclass=elf.elfclass, little_endian=elf.little_endian, build_id=elf.build_id,
            soname=elf.soname, debuglink=elf.debuglink, sections=list(elf.sections),
            symtab=list(elf.iter_symbols(".symtab")))


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiled_binary_matches_readelf(build_dir, variant):
    path = compile_variant(build_dir, variant)
    elf = assert_matches_readelf(path)
    if variant == "shared":
        assert elf.soname == "libfoo.so.1"
    if variant == "no-build-id":
        assert elf.build_id is None
    if variant == "build-id-sha1":
        assert len(elf.build_id) == 40
    if variant == "build-id-md5":
        assert len(elf.build_id) == 32


def test_m32_binary_matches_readelf(build_dir):
    path = compile_m32(build_dir)
    elf = assert_matches_readelf(path)
    assert elf.elfclass == 32 and elf.little_endian
    assert [s.name for s in elf.symtab if s.name == "f"] == ["f"]


def _system_binaries() -> List[str]:
    patterns = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
                "/usr/lib/x86_64-linux-gnu/libpython3*.so.1.0", "/usr/bin/python3.1?",
                "/usr/bin/ls", "/lib64/libc.so.6", "/usr/lib64/libstdc++.so.6"]
    found = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern))[:1]:
            if os.path.realpath(path) not in map(os.path.realpath, found):
                found.append(path)
    return found


@pytest.mark.parametrize("path", _system_binaries())
def test_system_binary_matches_readelf(path):
    assert_matches_readelf(path)


def test_system_debug_file_matches_readelf():
    """Debian -dbgsym files: NOBITS code, compressed DWARF, .symtab kept."""
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    if not os.path.exists(libc):
        pytest.skip("no libc at " + libc)
    with ELFFile.from_path(libc) as elf:
        build_id = elf.build_id
    debug = "/usr/lib/debug/.build-id/%s/%s.debug" % (build_id[:2], build_id[2:])
    if not os.path.exists(debug):
        pytest.skip("libc debug symbols not installed")
    assert assert_matches_readelf(debug).build_id == build_id


def test_compressed_section_inflates_to_the_uncompressed_bytes(build_dir):
    path = compile_variant(build_dir, "debug-zlib")
    plain = path + ".plain"
    subprocess.run(["objcopy", "--decompress-debug-sections", path, plain], check=True)
    with ELFFile.from_path(path) as packed, ELFFile.from_path(plain) as unpacked:
        compressed = [s for s in packed.sections if s.sh_flags & SHF_COMPRESSED]
        assert compressed, "gcc did not compress any debug section"
        for sec in compressed:
            assert bytes(packed.section_data(sec)) == bytes(unpacked.section_data(unpacked.section(sec.name)))


def test_extended_section_numbering(build_dir):
    """e_shnum 0 / SHN_XINDEX / PN_XNUM: the real values live in section header 0."""
    path = compile_variant(build_dir, "pie")
    with ELFFile.from_path(path) as original:
        shoff, nsec, shstrndx, nseg = original.e_shoff, original.num_sections, original.shstrndx, original.num_segments
        sections, segments = original.sections, original.segments
    data = bytearray(open(path, "rb").read())
    struct.pack_into("<HHHH", data, 0x38, 0xFFFF, 64, 0, SHN_XINDEX)  # e_phnum .. e_shstrndx
    struct.pack_into("<QII", data, shoff + 32, nsec, shstrndx, nseg)  # sh_size, sh_link, sh_info
    patched = path + ".xnum"
    with open(patched, "wb") as f:
        f.write(data)
    with ELFFile.from_path(patched) as elf:
        assert (elf.e_shnum, elf.e_shstrndx, elf.e_phnum) == (0, SHN_XINDEX, 0xFFFF)
        assert (elf.num_sections, elf.shstrndx, elf.num_segments) == (nsec, shstrndx, nseg)
        assert elf.sections[1:] == sections[1:]
        assert elf.segments == segments
        assert_header_matches(elf, patched)
        assert_sections_match(elf, patched)


def test_fixture_minimal_elf64():
    data = load_fixture()
    elf = ELFFile.from_bytes(data)
    assert (elf.elfclass, elf.little_endian, elf.e_type, elf.e_machine) == (64, True, 2, 62)
    assert (elf.e_entry, elf.e_phoff, elf.e_shoff) == (0x400078, 0x40, 0xE0)
    assert (elf.e_phnum, elf.e_shnum, elf.e_shstrndx) == (1, 5, 4)
    (load,) = elf.segments
    assert (load.p_type, load.p_flags, load.p_offset, load.p_vaddr, load.p_filesz, load.p_align) == (
        PT_LOAD, 5, 0, 0x400000, 0x7C, 0x1000)
    assert [s.name for s in elf.sections] == ["", ".text", ".symtab", ".strtab", ".shstrtab"]
    assert bytes(elf.section_data(elf.section(".text"))) == b"\x31\xc0\xc3\x90"
    symbols = list(elf.iter_symbols(".symtab"))
    assert symbols[1] == (  # Symbol(name, st_value, st_size, st_type, st_bind, st_shndx, st_other)
        "answer", 0x400078, 3, 2, 1, 1, 0)
    assert elf.offset_to_vaddr(0x79) == 0x400079
    assert elf.vaddr_to_offset(0x40007A) == 0x7A
    assert elf.offset_to_vaddr(0x7C) is None
    assert elf.build_id is None and elf.soname is None and elf.debuglink is None


# ------------------------------------------------ other classes / byte orders

def build_synthetic(elfclass: int, little: bool, with_sections: bool = True) -> bytes:
    """A tiny shared object in any class/byte order, written field by field.

    The toolchain here only targets x86, so big-endian images with program
    headers, notes and a dynamic section are assembled by hand.
    """
    o = "<" if little else ">"
    is64 = elfclass == 64
    ehsize, phentsize, shentsize = (64, 56, 64) if is64 else (52, 32, 40)
    base = 0x10000
    text = b"\x00" * 16
    note = struct.pack(o + "III", 4, 8, 3) + b"GNU\0" + bytes(range(1, 9))
    dynstr = b"\0libbe.so.7\0"
    strtab = b"\0fn\0"
    debuglink = b"be.debug\0" + b"\0" * 3 + struct.pack(o + "I", 0xCAFEF00D)
    phnum = 3
    text_off = ehsize + phnum * phentsize
    note_off = text_off + len(text)
    dynstr_off = note_off + len(note)
    dyn_off = (dynstr_off + len(dynstr) + 7) & ~7
    dyn_fmt = o + ("qQ" if is64 else "iI")
    dynamic = b"".join(struct.pack(dyn_fmt, tag, val) for tag, val in
                       ((14, 1), (5, base + dynstr_off), (10, len(dynstr)), (0, 0)))
    sym_off = dyn_off + len(dynamic)
    sym_fmt = o + ("IBBHQQ" if is64 else "IIIBBH")
    if is64:
        syms = struct.pack(sym_fmt, 0, 0, 0, 0, 0, 0) + struct.pack(sym_fmt, 1, 0x12, 0, 1, base + text_off, 16)
    else:
        syms = struct.pack(sym_fmt, 0, 0, 0, 0, 0, 0) + struct.pack(sym_fmt, 1, base + text_off, 16, 0x12, 0, 1)
    strtab_off = sym_off + len(syms)
    link_off = strtab_off + len(strtab)
    names = [b"", b".text", b".note.gnu.build-id", b".dynstr", b".dynamic", b".symtab", b".strtab",
             b".gnu_debuglink", b".shstrtab"]
    shstrtab = b"\0" + b"".join(n + b"\0" for n in names[1:])
    shstr_off = link_off + len(debuglink)
    shoff = (shstr_off + len(shstrtab) + 7) & ~7
    end_of_load = sym_off
    phdr_fmt = o + ("IIQQQQQQ" if is64 else "IIIIIIII")

    def phdr(p_type, p_flags, off, size, align):
        if is64:
            return struct.pack(phdr_fmt, p_type, p_flags, off, base + off, base + off, size, size, align)
        return struct.pack(phdr_fmt, p_type, off, base + off, base + off, size, size, p_flags, align)

    phdrs = phdr(PT_LOAD, 5, 0, end_of_load, 0x1000) + phdr(PT_NOTE, 4, note_off, len(note), 4) + \
        phdr(PT_DYNAMIC, 6, dyn_off, len(dynamic), 8)
    shdr_fmt = o + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")

    def name_index(n):
        return shstrtab.index(n + b"\0") if n else 0

    shdr_rows = [(0, 0, 0, 0, 0, 0, 0, 0, 0),
                 (b".text", 1, 6, base + text_off, text_off, len(text), 0, 0, 4, 0),
                 (b".note.gnu.build-id", 7, 2, base + note_off, note_off, len(note), 0, 0, 4, 0),
                 (b".dynstr", 3, 2, base + dynstr_off, dynstr_off, len(dynstr), 0, 0, 1, 0),
                 (b".dynamic", 6, 3, base + dyn_off, dyn_off, len(dynamic), 3, 0, 8, len(dynamic) // 4),
                 (b".symtab", 2, 0, 0, sym_off, len(syms), 6, 1, 8, len(syms) // 2),
                 (b".strtab", 3, 0, 0, strtab_off, len(strtab), 0, 0, 1, 0),
                 (b".gnu_debuglink", 1, 0, 0, link_off, len(debuglink), 0, 0, 4, 0),
                 (b".shstrtab", 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0)]
    shdrs = b"\0" * shentsize + b"".join(
        struct.pack(shdr_fmt, name_index(r[0]), *r[1:]) for r in shdr_rows[1:])
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if little else 2, 1]) + b"\0" * 9
    ehdr_fmt = o + ("16sHHIQQQIHHHHHH" if is64 else "16sHHIIIIIHHHHHH")
    ehdr = struct.pack(ehdr_fmt, ident, 3, 20, 1, base + text_off, ehsize,
                       shoff if with_sections else 0, 0, ehsize, phentsize, phnum,
                       shentsize, len(names) if with_sections else 0, 8 if with_sections else 0)
    body = ehdr + phdrs + text + note + dynstr
    body += b"\0" * (dyn_off - len(body)) + dynamic + syms + strtab + debuglink + shstrtab
    body += b"\0" * (shoff - len(body))
    return body + (shdrs if with_sections else b"")


@pytest.mark.parametrize("elfclass,little", [(64, False), (32, False), (32, True), (64, True)])
def test_synthetic_any_class_and_byte_order(tmp_path, elfclass, little):
    data = build_synthetic(elfclass, little)
    path = str(tmp_path / "synthetic.so")
    with open(path, "wb") as f:
        f.write(data)
    elf = assert_matches_readelf(path)
    assert (elf.elfclass, elf.little_endian) == (elfclass, little)
    assert elf.build_id == "0102030405060708"
    assert elf.soname == "libbe.so.7"
    assert elf.debuglink == ("be.debug", 0xCAFEF00D)
    assert [s.name for s in elf.symtab] == ["", "fn"]
    elf = ELFFile.from_bytes(data)
    text = elf.section(".text")
    assert elf.offset_to_vaddr(text.sh_offset + 3) == text.sh_addr + 3
    assert elf.vaddr_to_offset(text.sh_addr) == text.sh_offset


def _raw_symbols_by_info_agree(elf) -> int:
    """raw_symbols with an st_info filter == every row filtered after."""
    checked = 0
    for table in (".symtab", ".dynsym"):
        rows, strings = elf.raw_symbols(table)
        for wanted in ({0x12}, {0x12, 0x22, 0x1a}, set(range(256)), set()):
            infos = bytes(1 if i in wanted else 0 for i in range(256))
            some, same_strings = elf.raw_symbols(table, infos=infos)
            assert some == [r for r in rows if r[1] in wanted] and same_strings == strings
            checked += len(some)
        # The strings alone (searched before any entry is unpacked): the same table.
        assert elf.symbol_strings(table) == strings
    assert elf.symbol_strings(".no_such_table") == b""
    with pytest.raises(ELFError):
        elf.symbol_strings(".shstrtab")   # not a symbol table
    return checked


@pytest.mark.parametrize("elfclass,little", [(64, False), (32, False), (32, True), (64, True)])
def test_raw_symbols_filtered_by_st_info_in_any_class(elfclass, little):
    """The st_info column is found at its offset in both classes (Elf64_Sym
    byte 4, Elf32_Sym byte 12) and either byte order."""
    elf = ELFFile.from_bytes(build_synthetic(elfclass, little))
    assert _raw_symbols_by_info_agree(elf) > 0


def test_raw_symbols_filtered_by_st_info_on_a_system_library():
    path = _system_binaries()[0]
    with ELFFile.from_path(path) as elf:
        assert _raw_symbols_by_info_agree(elf) > 1000


@pytest.mark.parametrize("elfclass,little", [(64, False), (32, False)])
def test_no_section_headers_falls_back_to_segments(elfclass, little):
    """sstrip'd files: build id from PT_NOTE, soname via PT_DYNAMIC + DT_STRTAB."""
    elf = ELFFile.from_bytes(build_synthetic(elfclass, little, with_sections=False))
    assert elf.sections == [] and elf.num_sections == 0
    assert elf.build_id == "0102030405060708"
    assert elf.soname == "libbe.so.7"
    assert elf.debuglink is None
    assert list(elf.iter_symbols(".symtab")) == []


LLVM_MC_SOURCE = """
    .text
    .globl f
    .type f,@function
f:
    nop
    nop
    .size f, .-f
    .section .note.gnu.build-id,"a",@note
    .p2align 2
    .long 4
    .long 4
    .long 3
    .asciz "GNU"
    .byte 0xde, 0xad, 0xbe, 0xef
    .section .gnu_debuglink,"",@progbits
    .asciz "f.debug"
    .long 0x11223344
"""


@pytest.mark.parametrize("triple", ["powerpc64-linux-gnu", "mips-linux-gnu", "i686-linux-gnu",
                                    "powerpc64le-linux-gnu"])
def test_relocatable_objects_of_other_targets(tmp_path, triple):
    mc = shutil.which("llvm-mc")
    if mc is None:
        pytest.skip("llvm-mc not installed")
    src, out = tmp_path / "f.s", str(tmp_path / "f.o")
    src.write_text(LLVM_MC_SOURCE)
    if subprocess.run([mc, "-triple=" + triple, "-filetype=obj", "-o", out, str(src)]).returncode:
        pytest.skip("llvm-mc cannot target " + triple)
    elf = assert_matches_readelf(out)
    assert elf.build_id == "deadbeef"
    assert elf.debuglink == ("f.debug", 0x11223344)
    assert "f" in [s.name for s in elf.symtab]


# -------------------------------------------------------------- robustness

def exercise(elf: ELFFile) -> None:
    """Touch every lazily parsed part of a file."""
    elf.build_id, elf.soname, elf.debuglink  # noqa: B018
    list(elf.iter_notes())
    list(elf.iter_dynamic())
    for table in (".symtab", ".dynsym"):
        for _ in elf.iter_symbols(table):
            pass
    for sec in elf.sections:
        elf.section_data(sec)
    for seg in elf.segments:
        elf.offset_to_vaddr(seg.p_offset)
        elf.vaddr_to_offset(seg.p_vaddr)


def parse_or_elferror(data: bytes) -> None:
    try:
        elf = ELFFile.from_bytes(data)
        exercise(elf)
    except ELFError:
        pass


@pytest.mark.parametrize("variant", ["pie", "shared", "debug-zlib"])
def test_truncation_only_raises_elferror(build_dir, variant):
    data = open(compile_variant(build_dir, variant), "rb").read()
    with ELFFile.from_bytes(data) as elf:
        interesting = {0, 1, 4, 15, 16, 17, 20, 52, 63, 64, 65, elf.e_phoff + 7, elf.e_shoff,
                       elf.e_shoff + 13, len(data) - 1}
        for sec in elf.sections:
            interesting.update((sec.sh_offset, sec.sh_offset + 1, sec.sh_offset + sec.sh_size - 1))
    offsets = sorted(o for o in interesting | set(range(0, len(data), 97)) if 0 <= o < len(data))
    for cut in offsets:
        parse_or_elferror(data[:cut])


def test_byte_flips_only_raise_elferror(build_dir):
    data = open(compile_variant(build_dir, "shared"), "rb").read()
    with ELFFile.from_bytes(data) as elf:
        regions = [(0, 64), (elf.e_phoff, elf.e_phnum * elf.e_phentsize),
                   (elf.e_shoff, elf.e_shnum * elf.e_shentsize)]
        for name in (".dynamic", ".dynsym", ".symtab", ".note.gnu.build-id", ".gnu.hash"):
            sec = elf.section(name)
            if sec is not None:
                regions.append((sec.sh_offset, min(sec.sh_size, 256)))
    rng = random.Random(1234)
    for start, size in regions:
        for offset in range(start, start + size):
            for value in (0x00, 0xFF, 0x80, rng.randrange(256)):
                mutated = bytearray(data)
                mutated[offset] = value
                parse_or_elferror(bytes(mutated))


def test_random_garbage_after_magic_only_raises_elferror():
    rng = random.Random(99)
    for _ in range(500):
        size = rng.randrange(16, 400)
        body = bytes(rng.randrange(256) for _ in range(size))
        ident = b"\x7fELF" + bytes([rng.choice((1, 2)), rng.choice((1, 2)), 1]) + body[7:16]
        parse_or_elferror(ident + body[16:])


def test_not_elf_and_empty_files(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    text = tmp_path / "text"
    text.write_text("#!/bin/sh\necho hello\n")
    for path in (empty, text):
        with pytest.raises(ELFError):
            ELFFile.from_path(str(path))
    for data in (b"", b"\x7fEL", b"\x7fELF", b"\x7fELF\x03\x01\x01" + b"\0" * 60,
                 b"\x7fELF\x02\x03\x01" + b"\0" * 60):
        with pytest.raises(ELFError):
            ELFFile.from_bytes(data)
    with pytest.raises(ELFError):
        ELFFile.from_path("/dev/null")


def test_file_others_can_write_is_read_not_mapped(build_dir, tmp_path):
    # A file another user could truncate must not be mmapped (SIGBUS): it is
    # read into memory; a root-owned, not group/world-writable one is mapped.
    path = compile_variant(build_dir, "pie")
    copy = tmp_path / "writable"
    copy.write_bytes(open(path, "rb").read())
    os.chmod(str(copy), 0o666)
    with ELFFile.from_path(str(copy)) as elf:
        assert elf._mmap is None
        assert elf.build_id == readelf_build_id(path)
    os.chmod(str(copy), 0o644)
    os.chown(str(copy), 0, 0)
    with ELFFile.from_path(str(copy)) as elf:
        assert elf._mmap is not None
        assert elf.build_id == readelf_build_id(path)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    with pytest.raises(ELFError, match="not a regular file"):
        ELFFile.from_path(str(fifo))


def test_close_unmaps(build_dir):
    path = compile_variant(build_dir, "pie")
    with ELFFile.from_path(path) as elf:
        mapping = elf._mmap
        assert mapping is not None
        elf.build_id  # noqa: B018
    assert mapping.closed


def test_close_with_a_live_view_does_not_raise(build_dir):
    path = compile_variant(build_dir, "pie")
    with ELFFile.from_path(path) as elf:
        view = elf.section_data(elf.section(".text"))
    assert elf._mmap is None
    assert len(view) == elf.section(".text").sh_size  # still readable; unmapped when dropped


def read_vdso() -> Optional[bytes]:
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("[vdso]"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                with open("/proc/self/mem", "rb") as mem:
                    mem.seek(start)
                    return mem.read(end - start)
    return None


def test_vdso_image_from_memory():
    image = read_vdso()
    if image is None:
        pytest.skip("no [vdso] mapping")
    elf = ELFFile.from_bytes(bytearray(image), path="[vdso]")
    assert elf.soname is not None and elf.soname.startswith("linux-")
    names = {s.name for s in elf.iter_symbols(".dynsym")}
    assert names & {"__vdso_clock_gettime", "__kernel_clock_gettime", "__vdso_gettimeofday"}
    assert elf.offset_to_vaddr(elf.section(".text").sh_offset) == elf.section(".text").sh_addr


def test_loadmap_prefers_exact_segment_over_page_lead_in():
    from perfagent.elf import Segment
    segs = [Segment(PT_LOAD, 5, 0x1000, 0x1000, 0x1000, 0x200, 0x200, 0x1000),
            Segment(PT_LOAD, 6, 0x1DD0, 0x2DD0, 0x2DD0, 0x100, 0x300, 0x1000)]
    lm = LoadMap(segs)
    assert lm.offset_to_vaddr(0x1100) == 0x1100
    assert lm.offset_to_vaddr(0x1DD8) == 0x2DD8
    assert lm.offset_to_vaddr(0x1C00) == 0x2C00  # mapped lead-in page of the data segment
    assert lm.offset_to_vaddr(0x5000) is None
    assert lm.vaddr_to_offset(0x2DD0 + 0x150) is None  # .bss has no file bytes


# ------------------------------------------------------- hostile sizes (issue 11)

def zlib_of_zeros(mib: int) -> bytes:
    """A zlib stream of ``mib`` MiB of zeros, built in milliseconds.

    One MiB is deflated once and ended with a full flush (byte-aligned, no
    back-references across it), so the raw block run can be repeated; an
    empty final block and the Adler-32 of n zeros (a=1, b=n mod 65521) end
    the stream.  zlib reaches ~1000x on zeros: 900 MiB from 0.9 MB.
    """
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = raw.compress(bytes(1 << 20)) + raw.flush(zlib.Z_FULL_FLUSH)
    n = mib << 20
    adler = ((n % 65521) << 16) | 1
    return b"\x78\xda" + chunk * mib + b"\x03\x00" + struct.pack(">I", adler)


def with_compressed_symtab(image: bytes, payload: bytes, ch_size: int) -> bytes:
    """``image`` whose .symtab is replaced by an SHF_COMPRESSED section at the
    end of the file: Elf64_Chdr {ELFCOMPRESS_ZLIB, 0, ch_size, 8} + payload."""
    with ELFFile.from_bytes(image) as elf:
        index = elf.sections.index(elf.section(".symtab"))
        shdr_at = elf.e_shoff + index * elf.e_shentsize
    out = bytearray(image) + bytes(-len(image) % 8)
    offset = len(out)
    out += struct.pack("<IIQQ", 1, 0, ch_size, 8) + payload
    flags = struct.unpack_from("<Q", out, shdr_at + 8)[0] | SHF_COMPRESSED
    struct.pack_into("<Q", out, shdr_at + 8, flags)
    struct.pack_into("<QQ", out, shdr_at + 24, offset, 24 + len(payload))
    return bytes(out)


def peak_traced_bytes(fn) -> int:
    """Peak bytes Python allocated while ``fn`` ran."""
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_compressed_symtab_bomb_is_refused_without_inflating(build_dir):
    """Issue 11: a 0.9 MB file whose compressed .symtab claims 900 MiB took
    4.4 s and +1.8 GB.  Now the claim is checked against the payload first."""
    image = open(compile_variant(build_dir, "pie"), "rb").read()
    bomb = zlib_of_zeros(900)
    assert len(bomb) < 1 << 20
    data = with_compressed_symtab(image, bomb, 900 << 20)
    elf = ELFFile.from_bytes(data)

    def read_symtab():
        with pytest.raises(ELFError, match=r"claims 943718400 decompressed bytes .*more than 64x"):
            list(elf.iter_symbols(".symtab"))
    assert peak_traced_bytes(read_symtab) < 1 << 20
    # The rest of the file is still usable.
    assert elf.build_id is not None and len(list(elf.iter_symbols(".dynsym"))) > 3


def test_compressed_section_never_inflates_past_its_claim(build_dir):
    """A claim within the ratio whose stream inflates further stops at the
    claim: the 900 MiB stream costs at most the claimed ~58 MiB."""
    image = open(compile_variant(build_dir, "pie"), "rb").read()
    bomb = zlib_of_zeros(900)
    claim = elffile_module.MAX_INFLATE_RATIO * len(bomb)
    elf = ELFFile.from_bytes(with_compressed_symtab(image, bomb, claim))

    def read_symtab():
        with pytest.raises(ELFError, match="inflates to more than the %d bytes" % claim):
            list(elf.iter_symbols(".symtab"))
    assert peak_traced_bytes(read_symtab) < claim * 1.3


def test_symbols_are_charged_to_the_budget(build_dir):
    """Inflated bytes and decoded symbols count against the caller's Budget:
    a small budget refuses before allocating, and a generous one decodes."""
    from perfagent.budget import Budget, BudgetExceeded
    image = open(compile_variant(build_dir, "pie"), "rb").read()
    rng = random.Random(11)
    count = (2 << 20) // 24  # 2 MiB of unnamed symbols with random values
    table = b"".join(struct.pack("<IBBHQQ", 0, 0x12, 0, 1, rng.getrandbits(48), 16)
                     for _ in range(count))
    data = with_compressed_symtab(image, zlib.compress(table, 1), len(table))
    elf = ELFFile.from_bytes(data, budget=Budget("small", max_bytes=1 << 20))

    def refused():
        with pytest.raises(BudgetExceeded, match="small: needs more memory"):
            list(elf.iter_symbols(".symtab"))
    assert peak_traced_bytes(refused) < 1 << 20
    # Inflating fits in 4 MiB, but 87381 symbols at SYMBOL_COST do not.
    with pytest.raises(BudgetExceeded):
        list(elf.iter_symbols(".symtab", budget=Budget("medium", max_bytes=4 << 20)))
    big = Budget("big", max_bytes=1 << 30)
    assert sum(1 for _ in elf.iter_symbols(".symtab", budget=big)) == count
    assert big.bytes_left == (1 << 30) - len(table) - count * elffile_module.SYMBOL_COST


def test_symbol_names_aimed_into_one_long_string_are_bounded(build_dir):
    """Many symbols whose st_name points into one long NUL-less string would
    each copy the rest of it (quadratic memory); names are cut at
    MAX_NAME_BYTES, and a table handing out far more than its size fails."""
    image = bytearray(open(compile_variant(build_dir, "pie"), "rb").read())
    with ELFFile.from_bytes(bytes(image)) as elf:
        symtab = elf.section(".symtab")
        strtab = elf.sections[symtab.sh_link]
    # Overwrite .strtab with one long run of 'A's (NUL at the very end).
    image[strtab.sh_offset:strtab.sh_offset + strtab.sh_size - 1] = b"A" * (strtab.sh_size - 1)
    count = symtab.sh_size // 24
    for i in range(1, count):  # st_name of every symbol: 1, 2, 3, ...
        struct.pack_into("<I", image, symtab.sh_offset + 24 * i, i)
    elf = ELFFile.from_bytes(bytes(image))
    names = [s.name for s in elf.iter_symbols(".symtab")]
    assert names[1] == "A" * (strtab.sh_size - 2) and len(names) == count
    # The same, with a strtab longer than the window: names are cut.
    big = bytearray(image) + b"B" * (8 * elffile_module.MAX_NAME_BYTES) + b"\0"
    struct.pack_into("<QQ", big, elf.e_shoff + symtab.sh_link * 64 + 24, len(image),
                     8 * elffile_module.MAX_NAME_BYTES + 1)
    elf = ELFFile.from_bytes(bytes(big))
    names = [s.name for s in elf.iter_symbols(".symtab")]
    assert {len(n) for n in names[1:]} == {elffile_module.MAX_NAME_BYTES}
    # 64 KiB from a 512 KiB table for each of many symbols: refused once
    # the names outgrow the table 8 times over (or 16 windows).
    many = bytearray(big) + bytes(24 * 4000)
    for i in range(4000):
        struct.pack_into("<IBBHQQ", many, len(big) + 24 * i, 1 + i, 0x12, 0, 1, 0x1000 + i, 1)
    struct.pack_into("<QQ", many, elf.e_shoff + elf.sections.index(symtab) * 64 + 24,
                     len(big), 24 * 4000)
    elf = ELFFile.from_bytes(bytes(many))
    with pytest.raises(ELFError, match="names overlap far more than"):
        list(elf.iter_symbols(".symtab"))


def test_loadmap_keeps_a_bounded_number_of_segments():
    from perfagent.elf import Segment
    from perfagent.elf.loadmap import MAX_LOAD_SEGMENTS
    segs = [Segment(PT_LOAD, 5, i << 12, i << 12, i << 12, 0x1000, 0x1000, 0x1000) for i in range(100000)]
    lm = LoadMap(segs)
    assert lm.offset_to_vaddr((MAX_LOAD_SEGMENTS - 1) << 12) == (MAX_LOAD_SEGMENTS - 1) << 12
    assert lm.offset_to_vaddr(MAX_LOAD_SEGMENTS << 12) is None


def test_aliased_compressed_sections_share_one_allowance(build_dir):
    """Section headers can all point at one compressed payload: together
    they inflate to at most MAX_INFLATE_RATIO times the file (or
    MIN_INFLATE_CAP), not that much per header."""
    image = open(compile_variant(build_dir, "pie"), "rb").read()
    data = bytearray(with_compressed_symtab(image, zlib_of_zeros(1)[:-4] + b"\0" * 4, 1 << 20))
    with ELFFile.from_bytes(bytes(data)) as elf:
        symtab = elf.section(".symtab")
        shoff, count, names = elf.e_shoff, elf.num_sections, elf.shstrndx
    adler = ((1 << 20) % 65521) << 16 | 1
    struct.pack_into(">I", data, symtab.sh_offset + symtab.sh_size - 4, adler)
    aliases = [i for i in range(1, count) if i != names]
    for i in aliases:  # every other section: SHT_PROGBITS, compressed, on the payload
        struct.pack_into("<IQ", data, shoff + 64 * i + 4, 1, SHF_COMPRESSED)
        struct.pack_into("<QQ", data, shoff + 64 * i + 24, symtab.sh_offset, symtab.sh_size)
    elf = ELFFile.from_bytes(bytes(data))
    inflated, refused = 0, 0
    for sec in (elf.sections[i] for i in aliases):
        try:
            inflated += len(elf.section_data(sec))
        except ELFError as exc:
            assert "past 64x the file's size" in str(exc)
            refused += 1
    allowance = max(elffile_module.MIN_INFLATE_CAP, elffile_module.MAX_INFLATE_RATIO * len(data))
    assert inflated == (allowance // (1 << 20)) << 20
    assert refused == len(aliases) - allowance // (1 << 20) > 0


def test_many_note_headers_aimed_at_the_same_bytes_are_read_once(build_dir):
    """10000 PT_NOTE program headers on one note: notes are read once per
    distinct container, not 10000 times per build-id lookup."""
    image = bytearray(open(compile_variant(build_dir, "pie"), "rb").read())
    with ELFFile.from_bytes(bytes(image)) as elf:
        abi_tag = elf.section(".note.ABI-tag")
        build_id = elf.build_id
    image += bytes(-len(image) % 8)
    phoff = len(image)
    for _ in range(10000):  # Elf64_Phdr: PT_NOTE on .note.ABI-tag
        image += struct.pack("<IIQQQQQQ", PT_NOTE, 4, abi_tag.sh_offset, 0, 0,
                             abi_tag.sh_size, abi_tag.sh_size, 4)
    struct.pack_into("<Q", image, 0x20, phoff)      # e_phoff
    struct.pack_into("<H", image, 0x38, 10000)      # e_phnum
    elf = ELFFile.from_bytes(bytes(image))
    assert elf.num_segments == 10000
    assert [n.n_name for n in elf.iter_notes()] == [b"GNU"]  # the ABI tag, once
    assert elf.build_id == build_id                    # found in the note sections
