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
    CFA_PLT, CFA_REG_OFFSET, CFA_UNSUPPORTED, CFITable, DWARFError, RULE_OFFSET, RULE_REGISTER,
    RULE_SAME_VALUE, RULE_UNDEFINED, RULE_UNSUPPORTED, RULE_VAL_OFFSET, UnwindRow, fde_rows,
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
    if kind == "exp":
        return row.cfa_kind in (CFA_PLT, CFA_UNSUPPORTED)
    return row.cfa_kind == CFA_REG_OFFSET and row.cfa_register == reg and row.cfa_offset == offset


def _check_rule(text: str, kind: int, value: int) -> bool:
    if text == "u":  # readelf: explicit undefined, or no rule yet (= same value)
        return kind in (RULE_UNDEFINED, RULE_SAME_VALUE)
    if text == "s":
        return kind == RULE_SAME_VALUE
    if text in ("exp", "vexp"):
        return kind == RULE_UNSUPPORTED
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
