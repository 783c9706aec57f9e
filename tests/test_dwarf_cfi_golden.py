"""Golden tests: every FDE's rows against ``readelf --debug-dump=frames-interp``.

For each FDE readelf interprets, our decoder must give the same CFA rule and
the same rules for the registers the x86-64 unwinder restores at every
location readelf prints a row for, and the compiled table must return those
rows for lookups at those locations.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
import re
from typing import Dict, List, NamedTuple, Tuple

import pytest

from perfagent.dwarf import (
    CFA_DEREF, CFA_PLT, CFA_REG_OFFSET, CFA_UNSUPPORTED, CFITable, DWARFError, RULE_EXPRESSION,
    RULE_OFFSET, RULE_REGISTER, RULE_SAME_VALUE, RULE_UNDEFINED, RULE_UNSUPPORTED,
    RULE_VAL_EXPRESSION, RULE_VAL_OFFSET, UnwindRow, fde_rows,
)
from perfagent.dwarf.table import _elf_sources
from perfagent.dwarf.x86_64 import REGISTER_NAMES, UNWIND_REGISTERS
from perfagent.elf import ELFFile

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 CFI"),
    pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf"),
]

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SOURCE = os.path.join(FIXTURES, "cfi_sample.c")

# name -> gcc flags
VARIANTS = {
    "O2_omit_fp": ["-O2", "-fomit-frame-pointer"],
    "O0": ["-O0"],
    "alloca_fp": ["-O2", "-fno-omit-frame-pointer"],
    "async_tables": ["-O1", "-fasynchronous-unwind-tables"],
    "shared": ["-O2", "-fPIC", "-shared", "-DCFI_SHARED"],
    "debug_frame": ["-O1", "-g", "-fno-asynchronous-unwind-tables"],
    "lazy_plt": ["-O2", "-Wl,-z,lazy"],
}

LIB_DIRS = ["/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib"]


def _find_system(names: List[str]) -> List[str]:
    found = []
    for name in names:
        for d in LIB_DIRS + ["/usr/bin", "/usr/local/bin"]:
            p = os.path.join(d, name)
            if os.path.isfile(p) and os.path.realpath(p) not in [os.path.realpath(f) for f in found]:
                found.append(p)
                break
    return found


SYSTEM = _find_system(["libc.so.6", "libstdc++.so.6", "libpython3.11.so.1.0", "python3.11"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    out = tmp_path_factory.mktemp("cfi")
    paths = {}
    for name, flags in VARIANTS.items():
        path = str(out / name)
        subprocess.run(["gcc", *flags, "-o", path, SOURCE], check=True)
        paths[name] = path
    return paths


# ------------------------------------------------ readelf frames-interp
#
# readelf prints, per FDE, one row per location change with columns for the
# CFA and every register any row mentions: u (undefined, or no rule yet),
# s (same value), c<off> (saved at CFA+off), v<off> (value CFA+off),
# exp/vexp, or the name of the register holding the value.

_SECTION = re.compile(r"^Contents of the (\.\S+) section")
_ENTRY = re.compile(r"^([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+) FDE cie=([0-9a-f]+) pc=([0-9a-f]+)\.\.([0-9a-f]+)")
_OTHER_ENTRY = re.compile(r"^[0-9a-f]+ (?:[0-9a-f]+ [0-9a-f]+ CIE|ZERO terminator)")
_REG_NAME = re.compile(r"\br(\d+) \([^)]*\)")
_ROW = re.compile(r"^([0-9a-f]{8,16}) (\S.*)$")


class ReadelfFDE(NamedTuple):
    section: str
    offset: int
    pc_start: int
    pc_end: int
    # loc -> {column name: text}; "CFA" is one of the columns.  The last row
    # printed for a location wins (readelf prints one per advance).
    rows: Dict[int, Dict[str, str]]


def readelf_fdes(path: str) -> List[ReadelfFDE]:
    out = subprocess.run(["readelf", "--debug-dump=frames-interp", path], check=False,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    fdes: List[ReadelfFDE] = []
    section = ""
    current = None
    columns: List[str] = []
    for line in out.splitlines():
        m = _SECTION.match(line)
        if m:
            section, current = m.group(1), None
            continue
        m = _ENTRY.match(line)
        if m:
            current = ReadelfFDE(section, int(m.group(1), 16), int(m.group(5), 16),
                                 int(m.group(6), 16), {})
            fdes.append(current)
            continue
        if _OTHER_ENTRY.match(line):
            current = None
            continue
        if current is None:
            continue
        stripped = line.split()
        if stripped[:2] == ["LOC", "CFA"]:
            columns = stripped[1:]
            continue
        m = _ROW.match(line)
        if m:
            # A register-held value prints as "r<N> (<name>)": keep "r<N>".
            values = _REG_NAME.sub(r"r\1", m.group(2)).split()
            assert len(values) == len(columns), line
            current.rows[int(m.group(1), 16)] = dict(zip(columns, values))
    return fdes


REGISTER_NUMBERS = {
    "rax": 0, "rdx": 1, "rcx": 2, "rbx": 3, "rsi": 4, "rdi": 5, "rbp": 6, "rsp": 7,
    "r8": 8, "r9": 9, "r10": 10, "r11": 11, "r12": 12, "r13": 13, "r14": 14, "r15": 15,
    "rip": 16, "ra": 16,
}
_CFA = re.compile(r"^([a-z0-9]+)([+-]\d+)$")


def parse_cfa(text: str) -> Tuple[str, int, int]:
    """("reg", regno, offset) or ("exp", 0, 0)."""
    if text == "exp":
        return "exp", 0, 0
    m = _CFA.match(text)
    assert m, text
    return "reg", REGISTER_NUMBERS[m.group(1)], int(m.group(2))


# ------------------------------------------------------------------ comparing

def _check_cfa(text: str, row: UnwindRow) -> bool:
    kind, reg, offset = parse_cfa(text)
    if kind == "exp":  # which expression: see test_expressions_match_readelf
        return row.cfa_kind in (CFA_PLT, CFA_DEREF, CFA_UNSUPPORTED)
    return row.cfa_kind == CFA_REG_OFFSET and row.cfa_register == reg and row.cfa_offset == offset


def _check_rule(text: str, kind: int, value: int) -> bool:
    if text == "u":  # readelf: explicit undefined, or no rule yet (= same value)
        return kind in (RULE_UNDEFINED, RULE_SAME_VALUE)
    if text == "s":
        return kind == RULE_SAME_VALUE
    if text == "exp":
        return kind in (RULE_EXPRESSION, RULE_UNSUPPORTED)
    if text == "vexp":
        return kind in (RULE_VAL_EXPRESSION, RULE_UNSUPPORTED)
    if text[0] in "cv" and text[1:2] in ("+", "-"):
        return kind == (RULE_OFFSET if text[0] == "c" else RULE_VAL_OFFSET) and value == int(text[1:])
    number = int(text[1:]) if re.match(r"^r\d+$", text) else REGISTER_NUMBERS[text]
    return kind == RULE_REGISTER and value == number


def _mismatches(expected: ReadelfFDE, row: UnwindRow, loc: int) -> List[str]:
    columns = expected.rows[loc]
    problems = []
    if not _check_cfa(columns["CFA"], row):
        problems.append("CFA %s vs %r" % (columns["CFA"], row))
    for reg in UNWIND_REGISTERS:
        name = "ra" if reg == 16 else REGISTER_NAMES[reg]
        kind, value = row.rule(reg)
        text = columns.get(name)
        ok = (kind == RULE_SAME_VALUE) if text is None else _check_rule(text, kind, value)
        if not ok:
            problems.append("%s %s vs kind=%d value=%d" % (name, text, kind, value))
    return problems


def _span_at(spans, pc):
    for start, end, fields in spans:
        if start <= pc < end:
            return UnwindRow(*fields)
    return None


def compare_binary(path: str, max_seconds: float = 30.0) -> dict:
    """Compare every FDE; returns counters (asserts on any mismatch)."""
    expected_fdes = readelf_fdes(path)
    elf = ELFFile.from_path(path)
    sources = {cfi.name: cfi for cfi in _elf_sources(elf, None)}
    table = CFITable.from_elf(elf)
    table.compile()
    ambiguous = _overlapping(expected_fdes)
    counts = {"fdes": 0, "rows": 0, "table_rows": 0}
    failures: List[str] = []
    started = time.monotonic()
    for exp in expected_fdes:
        cfi = sources[exp.section]
        try:
            fde = cfi.fde_at(exp.offset)
            spans = fde_rows(cfi, fde)
        except DWARFError as exc:
            failures.append("%s FDE %#x: %s" % (exp.section, exp.offset, exc))
            continue
        assert (fde.initial_location, fde.pc_end) == (exp.pc_start, exp.pc_end), hex(exp.offset)
        counts["fdes"] += 1
        for loc in sorted(exp.rows):
            if not exp.pc_start <= loc < exp.pc_end:
                continue
            row = _span_at(spans, loc)
            if row is None:
                failures.append("%s FDE %#x loc %#x: no row" % (exp.section, exp.offset, loc))
                continue
            counts["rows"] += 1
            for problem in _mismatches(exp, row, loc):
                failures.append("%s FDE %#x loc %#x: %s" % (exp.section, exp.offset, loc, problem))
            # The merged table gives the same row unless another FDE (or, for
            # .debug_frame, any .eh_frame FDE) also covers this pc.
            if (exp.section, exp.offset) not in ambiguous:
                counts["table_rows"] += 1
                if table.lookup(loc) != row:
                    failures.append("table lookup %#x: %r vs %r" % (loc, table.lookup(loc), row))
        assert time.monotonic() - started < max_seconds, "comparison too slow"
    assert not failures, "\n".join(failures[:30]) + "\n(%d total)" % len(failures)
    assert table.stats.errors == 0, table.stats.error_messages
    return counts


def _overlapping(fdes: List[ReadelfFDE]) -> set:
    """Offsets of FDEs whose range meets another FDE that could win in the table.

    .debug_frame FDEs compete with everything; .eh_frame ones with .eh_frame.
    """
    out = set()
    for scope in (".eh_frame", None):
        ranges = sorted((f.pc_start, f.pc_end, f.section, f.offset) for f in fdes
                        if f.pc_end > f.pc_start and (scope is None or f.section == scope))
        reach_end, reach_key = -1, None
        for start, end, section, offset in ranges:
            if start < reach_end:
                out.add((section, offset))
                out.add(reach_key)
            if end > reach_end:
                reach_end, reach_key = end, (section, offset)
    return out


# ---------------------------------------------------------------------- tests

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiled_binaries_match_readelf(built, variant):
    counts = compare_binary(built[variant])
    assert counts["fdes"] > 0 and counts["rows"] > 0 and counts["table_rows"] > 0, counts


def test_debug_frame_variant_uses_debug_frame(built):
    fdes = readelf_fdes(built["debug_frame"])
    assert any(f.section == ".debug_frame" for f in fdes)
    table = CFITable.from_elf(ELFFile.from_path(built["debug_frame"]))
    table.compile()
    assert table.stats.debug_frame_fdes > 0


def test_alloca_moves_cfa_to_rbp(built):
    fdes = readelf_fdes(built["alloca_fp"])
    assert any(parse_cfa(cols["CFA"])[1] == 6 for f in fdes for cols in f.rows.values()
               if parse_cfa(cols["CFA"])[0] == "reg")


@pytest.mark.parametrize("path", SYSTEM, ids=[os.path.basename(p) for p in SYSTEM])
def test_system_libraries_match_readelf(path):
    counts = compare_binary(path)
    assert counts["fdes"] > 100
    assert counts["table_rows"] > 0.9 * counts["rows"], counts


def test_start_is_the_outermost_frame(built):
    """crt1's _start marks the return address undefined: the walk ends there."""
    elf = ELFFile.from_path(built["O2_omit_fp"])
    row = CFITable.from_elf(elf).lookup(elf.e_entry)
    if row is None:
        pytest.skip("this crt1 has no CFI for _start")
    assert row.ra_kind == RULE_UNDEFINED


# ------------------------------------------- glibc's signal trampoline

LIBC = next((p for p in SYSTEM if os.path.basename(p) == "libc.so.6"), None)
_EXPR_CFA = re.compile(r"^\s+DW_CFA_def_cfa_expression \(DW_OP_breg(\d+) \(\w+\): (-?\d+); DW_OP_deref\)$")
_EXPR_REG = re.compile(r"^\s+DW_CFA_expression: r(\d+) \(\w+\) \(DW_OP_breg(\d+) \(\w+\): (-?\d+)\)$")


def _signal_fdes(path: str):
    """(CIE offset, FDE offset, pc_start, pc_end, instruction lines) of every
    FDE whose CIE has the 'S' augmentation, from readelf --debug-dump=frames."""
    out = subprocess.run(["readelf", "--debug-dump=frames", path], check=False,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    lines = out.splitlines()
    signal_cies = set()
    found = []
    for i, line in enumerate(lines):
        m = re.match(r"^([0-9a-f]+) [0-9a-f]+ [0-9a-f]+ CIE$", line)
        if m and 'Augmentation:          "zRS"' in lines[i + 2]:
            signal_cies.add(int(m.group(1), 16))
        m = _ENTRY.match(line)
        if m and int(m.group(4), 16) in signal_cies:
            body = []
            for follow in lines[i + 1:]:
                if not follow.strip():
                    break
                body.append(follow)
            found.append((int(m.group(4), 16), int(m.group(1), 16), int(m.group(5), 16),
                          int(m.group(6), 16), body))
    return found


def _ucontext_offsets(tmp_path) -> Dict[str, int]:
    """offsetof(ucontext_t, uc_mcontext.gregs[REG_*]) from the C library's own headers."""
    names = ["RBP", "RBX", "R12", "R13", "R14", "R15", "RSP", "RIP"]
    src = tmp_path / "uc.c"
    src.write_text("#define _GNU_SOURCE\n#include <stddef.h>\n#include <stdio.h>\n#include <ucontext.h>\n"
                   "int main(void) {\n" + "".join(
                       '    printf("%s %%zu\\n", offsetof(ucontext_t, uc_mcontext.gregs[REG_%s]));\n' % (n, n)
                       for n in names) + "    return 0;\n}\n")
    exe = str(tmp_path / "uc")
    subprocess.run(["gcc", "-o", exe, str(src)], check=True)
    out = subprocess.run([exe], check=True, stdout=subprocess.PIPE, text=True).stdout
    return {line.split()[0].lower(): int(line.split()[1]) for line in out.splitlines()}


@pytest.mark.skipif(LIBC is None, reason="no libc.so.6")
def test_libc_restore_rt_matches_readelf_and_the_ucontext(tmp_path):
    """The bytes of libc's __restore_rt CIE+FDE, cut out of the real libc.so.6,
    decode to what readelf prints and to the ucontext_t layout of <ucontext.h>."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    fdes = _signal_fdes(LIBC)
    assert len(fdes) == 1, fdes  # glibc has exactly one sa_restorer on x86-64
    cie_offset, fde_offset, pc_start, pc_end, body = fdes[0]
    cfa = [m.groups() for m in map(_EXPR_CFA.match, body) if m]
    regs = {int(m.group(1)): (int(m.group(2)), int(m.group(3))) for m in map(_EXPR_REG.match, body) if m}
    assert cfa == [("7", "160")] and len(regs) == 17, body  # every register rax..r15, rip

    elf = ELFFile.from_path(LIBC)
    sec = elf.section(".eh_frame")
    data = bytes(elf.section_data(sec))
    fde_end = fde_offset + 4 + int.from_bytes(data[fde_offset:fde_offset + 4], "little")
    piece = data[cie_offset:fde_end]  # the CIE and its FDE, nothing else
    from perfagent.dwarf import CallFrameInfo
    cfi = CallFrameInfo(piece, sec.sh_addr + cie_offset, True)
    fde = cfi.fde_at(fde_offset - cie_offset)
    assert (fde.initial_location, fde.pc_end) == (pc_start, pc_end)
    assert fde.cie.signal_frame
    spans = fde_rows(cfi, fde)
    assert len(spans) == 1 and spans[0][:2] == (pc_start, pc_end)
    row = UnwindRow(*spans[0][2])
    assert (row.cfa_kind, row.cfa_register, row.cfa_offset, row.signal_frame) == (CFA_DEREF, 7, 160, 1)
    for reg in UNWIND_REGISTERS:
        base, offset = regs[reg]
        assert row.rule(reg) == (RULE_EXPRESSION, offset) and row.rule_base(reg) == base == 7, reg

    # The handler's return address points at the ucontext: rsp at
    # __restore_rt is &uc, so the offsets are offsetof(ucontext_t, ...).
    uc = _ucontext_offsets(tmp_path)
    assert row.cfa_offset == uc["rsp"]
    names = {16: "rip", 6: "rbp", 3: "rbx", 12: "r12", 13: "r13", 14: "r14", 15: "r15"}
    for reg, name in names.items():
        assert row.rule(reg)[1] == uc[name], name
    # The whole library's table has the same row there (and the walker's
    # lookup of "return address - 1" lands in it: the FDE starts one byte
    # before __restore_rt for exactly that reason).
    assert CFITable.from_elf(elf).lookup(pc_start) == row
