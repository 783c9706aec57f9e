"""Deterministic mutation test of the CFI decoder, tables and walker (issue 11).

Seed inputs are the real .eh_frame, .eh_frame_hdr and .debug_frame of the
machine's libc.so.6, libpython3.11 and a gcc -g test program.  The two
libraries' sections are large, so each seed is a *window*: one CIE and a
run of the FDEs that follow it elsewhere in the section, re-linked the way a
linker would (the FDE run keeps its position relative to its pcrel targets,
the CIE pointers are patched) plus a matching .eh_frame_hdr search table.
The test program's sections are used whole.

Every mutant (fixed seed: the same ones on every run) must

* build a table through :meth:`CFITable.from_sections` (the from_elf path)
  and through :class:`LazyEhFrame` (the .eh_frame_hdr path), and answer
  lookups over the whole address range the window covers, with no exception
  at all (the tables' contract) and rows of the right shape;
* unwind a few synthetic stacks through those tables without an exception;
* decode entry by entry with no exception but the package's ParseError;
* do all of it within a generous time bound, enforced by an interval timer,
  so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
from typing import Callable, List, NamedTuple, Optional

import pytest

from perfagent.dwarf import CFITable, CallFrameInfo, EHFrameHdr, ROW_LENGTH, fde_rows
from perfagent.dwarf.constants import (
    DW_CFA_advance_loc, DW_CFA_def_cfa_expression, DW_CFA_expression, DW_CFA_nop,
    DW_CFA_remember_state, DW_CFA_restore_state, DW_CFA_val_expression, DW_EH_PE_datarel,
    DW_EH_PE_pcrel, DW_EH_PE_sdata4, DW_EH_PE_udata4, DW_OP_breg0, DW_OP_deref,
)
from perfagent.elf import ELFFile
from perfagent.errors import ParseError
from perfagent.symbolize.procmaps import AddressSpace, MapEntry
from perfagent.unwind.walker import BinaryCFI, LazyEhFrame, Walker

SEED = "perfagent-issue-11-cfi"
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LIBS = {
    "libc": "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "libpython3.11": "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
}
WINDOWS_PER_LIBRARY = 12  # windows cut from each library's .eh_frame
FDES_PER_WINDOW = 24
MUTANTS_PER_WINDOW = 100  # 2 x 12 x 100 library mutants
PROGRAM_MUTANTS = 800  # of the gcc -g program's whole sections
LOOKUPS_PER_MUTANT = 400
# A hang detector, not a timing assertion: a real mutant takes milliseconds.
SECONDS_PER_MUTANT = 20


class SeedInput(NamedTuple):
    name: str
    eh_frame: bytes
    eh_frame_addr: int
    hdr: bytes
    hdr_addr: int
    debug_frame: bytes  # b"" when none
    lo: int  # the code range the seed's FDEs cover
    hi: int


# ----------------------------------------------------------------- seeds

def _windows(name: str, path: str, count: int) -> List[SeedInput]:
    """``count`` windows of one CIE + FDES_PER_WINDOW FDEs from ``path``'s .eh_frame."""
    elf = ELFFile.from_path(path)
    sec = elf.section(".eh_frame")
    data = bytes(elf.section_data(sec))
    cfi = CallFrameInfo(data, sec.sh_addr, True)
    headers = list(cfi.iter_headers())
    fde_positions = [i for i, h in enumerate(headers) if not h.is_cie]
    rng = random.Random("%s:%s:windows" % (SEED, name))
    out = []
    for w in range(count):
        first = rng.choice(fde_positions[:-FDES_PER_WINDOW])
        cie_offset = cfi._cie_offset(headers[first])
        run = []
        for h in headers[first:first + FDES_PER_WINDOW]:  # consecutive FDEs of one CIE
            if h.is_cie or cfi._cie_offset(h) != cie_offset:
                break
            run.append(h)
        cie = headers[[h.offset for h in headers].index(cie_offset)]
        out.append(_relink(name + "#%d" % w, data, sec.sh_addr, cie, run, cfi))
    return out


def _relink(name: str, data: bytes, section_addr: int, cie, run, cfi: CallFrameInfo) -> SeedInput:
    """[CIE][FDE run] with the run at its original distance from its pcrel
    targets and each FDE's CIE pointer patched, plus an .eh_frame_hdr."""
    cie_bytes = data[cie.offset:cie.end]
    run_start, run_end = run[0].offset, run[-1].end
    body = bytearray(data[run_start:run_end])
    window_addr = section_addr + run_start - len(cie_bytes)
    for h in run:
        at = h.id_pos - run_start
        pointer_pos = len(cie_bytes) + at
        struct.pack_into("<I", body, at, pointer_pos)  # distance back to offset 0
    window = cie_bytes + bytes(body)
    fdes = [(f.initial_location, window_addr + len(cie_bytes) + h.offset - run_start, f.pc_end)
            for h in run for f in [cfi.fde_at(h.offset)]]
    hdr_addr = window_addr - 0x10000
    hdr = _eh_frame_hdr(hdr_addr, window_addr, fdes)
    lo = min(f[0] for f in fdes)
    hi = max(f[2] for f in fdes)
    return SeedInput(name, window, window_addr, hdr, hdr_addr, b"", lo, hi)


def _eh_frame_hdr(hdr_addr: int, eh_frame_addr: int, fdes) -> bytes:
    """An .eh_frame_hdr as GNU ld writes it (LSB 10.6.2): version 1,
    eh_frame_ptr pcrel|sdata4, fde_count udata4, table datarel|sdata4."""
    out = bytes([1, DW_EH_PE_pcrel | DW_EH_PE_sdata4, DW_EH_PE_udata4, DW_EH_PE_datarel | DW_EH_PE_sdata4])
    out += struct.pack("<iI", eh_frame_addr - (hdr_addr + 4), len(fdes))
    for location, address, _end in sorted(fdes):
        out += struct.pack("<ii", location - hdr_addr, address - hdr_addr)
    return out


def _program_seed(tmp_dir: str) -> SeedInput:
    source = os.path.join(FIXTURES, "cfi_sample.c")
    exe = os.path.join(tmp_dir, "cfi_sample_g")
    subprocess.run(["gcc", "-O1", "-g", "-fno-asynchronous-unwind-tables", "-o", exe, source], check=True)
    elf = ELFFile.from_path(exe)

    def section(name):
        sec = elf.section(name)
        return (bytes(elf.section_data(sec)), sec.sh_addr) if sec is not None else (b"", 0)

    eh, eh_addr = section(".eh_frame")
    hdr, hdr_addr = section(".eh_frame_hdr")
    debug, _ = section(".debug_frame")
    assert eh and hdr and debug
    text = elf.section(".text")
    lo = min(s.sh_addr for s in elf.sections if s.sh_addr and s.sh_flags & 0x4)  # SHF_EXECINSTR
    return SeedInput("cfi_sample -g", eh, eh_addr, hdr, hdr_addr, debug, lo, text.sh_addr + text.sh_size)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    out = {}
    for name, path in LIBS.items():
        if os.path.exists(path):
            out[name] = _windows(name, path, WINDOWS_PER_LIBRARY)
    if shutil.which("gcc") is not None:
        out["program"] = [_program_seed(str(tmp_path_factory.mktemp("mutation_cfi")))]
    return out


# -------------------------------------------------------------- mutations

_BYTES = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0x40, 0xC0, DW_CFA_remember_state, DW_CFA_restore_state,
          DW_CFA_def_cfa_expression, DW_CFA_expression, DW_CFA_val_expression, 0x2E, 0x3F]
_WORDS = [0, 1, 4, 8, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFF, 0x10000, 0xFFFFFFFE]
_QUADS = [2 ** 64 - 1, 2 ** 64 - 16, 2 ** 63, 0x7FFFFFFFFFFFFFFF, 1 << 40]


def _insert_into_entry(rng: random.Random, data: bytearray, insert: bytes) -> None:
    """Insert bytes at the end of a random entry and grow its 32-bit length,
    so the entry stays well-formed and the instructions are what changes."""
    offsets, pos = [], 0
    while pos + 4 <= len(data):
        length = struct.unpack_from("<I", data, pos)[0]
        if length == 0 or length >= 0xFFFFFFF0 or pos + 4 + length > len(data):
            break
        offsets.append(pos)
        pos += 4 + length
    if not offsets:
        data[rng.randrange(len(data) + 1):0] = insert
        return
    at = rng.choice(offsets)
    length = struct.unpack_from("<I", data, at)[0]
    end = at + 4 + length
    data[end:end] = insert
    struct.pack_into("<I", data, at, length + len(insert))


def _opcode_run(rng: random.Random) -> bytes:
    choice = rng.randrange(6)
    n = rng.choice([1, 2, 63, 64, 65, 300, 5000])
    if choice == 0:
        return bytes([DW_CFA_remember_state]) * n
    if choice == 1:
        return bytes([DW_CFA_advance_loc | rng.randrange(64)]) * n
    if choice == 2:
        return bytes([DW_CFA_nop]) * n
    breg = bytes([DW_OP_breg0 + rng.randrange(32)]) + _sleb(rng.choice([0, 8, 160, -8, 2 ** 40, -(2 ** 63)]))
    if choice == 3:
        expr = breg + (bytes([DW_OP_deref]) if rng.random() < 0.7 else b"")
        return bytes([DW_CFA_def_cfa_expression]) + _uleb(len(expr)) + expr
    reg = rng.choice([3, 6, 7, 12, 13, 14, 15, 16, 40])
    return bytes([rng.choice([DW_CFA_expression, DW_CFA_val_expression])]) + _uleb(reg) + _uleb(len(breg)) + breg


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _sleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        done = (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40)
        out.append(byte | (0 if done else 0x80))
        if done:
            return bytes(out)


def mutate(rng: random.Random, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        if not data:
            data = bytearray(rng.randrange(256) for _ in range(8))
        op = rng.randrange(10)
        pos = rng.randrange(len(data))
        if op == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos] = rng.choice(_BYTES)
        elif op == 2:
            data[pos] = rng.randrange(256)
        elif op == 3 and len(data) >= 4:
            pos = rng.randrange(0, len(data) - 3) & ~3
            struct.pack_into("<I", data, pos, rng.choice(_WORDS))
        elif op == 4 and len(data) >= 8:
            pos = rng.randrange(0, len(data) - 7) & ~3
            struct.pack_into("<Q", data, pos, rng.choice(_QUADS))
        elif op == 5:
            del data[pos:pos + rng.randrange(1, 16)]
        elif op == 6:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 7:
            n = rng.randrange(1, 64)
            data[pos:pos] = data[rng.randrange(len(data)):][:n]  # splice a copy of another piece
        elif op == 8:
            del data[pos:]
        else:
            _insert_into_entry(rng, data, _opcode_run(rng))
    return bytes(data)


# --------------------------------------------------------------- checking

class MutantHang(Exception):
    pass


def _alarm(signum, frame):
    raise MutantHang("a mutant ran longer than %d s" % SECONDS_PER_MUTANT)


def _check_row(row) -> None:
    assert row is None or (isinstance(row, tuple) and len(row) == ROW_LENGTH
                           and all(isinstance(v, int) for v in row)), row


class _LoadMap:
    def __init__(self, base: int) -> None:
        self.base = base

    def offset_to_vaddr(self, off: int) -> int:
        return off + self.base


class _Proc:
    pid = 0

    def __init__(self, lo: int, hi: int) -> None:
        self.space = AddressSpace([MapEntry(lo, hi, "r-xp", 0, 8, 1, 1, "/mutant")])
        self.unwind_cache = {}


def exercise(rng: random.Random, seed: SeedInput, eh: bytes, hdr: bytes, debug: bytes) -> None:
    # Entry-by-entry decoding: only the package's errors.
    cfi = CallFrameInfo(eh, seed.eh_frame_addr, True)
    errors: list = []
    for fde in cfi.iter_fdes(errors):
        try:
            fde_rows(cfi, fde)
        except ParseError:
            pass
    try:
        header = EHFrameHdr(hdr, seed.hdr_addr)
    except ParseError:
        header = None

    # The tables: no exception at all.
    sources = [CallFrameInfo(eh, seed.eh_frame_addr, True)]
    if debug:
        sources.append(CallFrameInfo(debug, 0, False))
    full = CFITable.from_sections(sources, "mutant")
    full.compile()
    tables: List[Callable] = [full.lookup]
    lazy = None
    if header is not None and len(header):
        lazy = LazyEhFrame(CallFrameInfo(eh, seed.eh_frame_addr, True), header, full)
        tables.append(lazy.lookup)
    span = max(seed.hi - seed.lo, 1)
    pcs = [seed.lo - 1, seed.hi, 0, 2 ** 64 - 1]
    pcs += [seed.lo + i * span // LOOKUPS_PER_MUTANT for i in range(LOOKUPS_PER_MUTANT)]
    pcs += [p + d for p in list(full.starts)[:LOOKUPS_PER_MUTANT // 4] for d in (-1, 0)]
    for lookup in tables:
        for pc in pcs:
            _check_row(lookup(pc))

    # Walks through whichever table the agent would use.
    lo, hi = seed.lo, max(seed.hi, seed.lo + 1)
    binary = BinaryCFI(lazy if lazy is not None else full, _LoadMap(lo), True)
    walker = Walker(rng.choice(["dwarf", "auto"]))
    proc = _Proc(lo, hi)
    for _ in range(4):
        words = [rng.choice([rng.randrange(lo, hi), rng.randrange(2 ** 64), 0x7000 + 8 * rng.randrange(64), 0])
                 for _ in range(64)]
        regs = tuple(rng.choice([0x7000 + 8 * rng.randrange(64), rng.randrange(2 ** 64)]) for _ in range(8))
        regs = regs[:2] + (0x7000, rng.randrange(lo, hi)) + regs[4:]
        ips = walker.walk(proc, lambda entry: binary, regs, struct.pack("<64Q", *words))
        assert 1 <= len(ips) <= 257 and all(isinstance(ip, int) for ip in ips)
    assert sum(walker.outcomes) == 4


def _sources(seed: SeedInput, eh: bytes, debug: bytes) -> List[CallFrameInfo]:
    out = [CallFrameInfo(eh, seed.eh_frame_addr, True)]
    if debug:
        out.append(CallFrameInfo(debug, 0, False))
    return out


def point_mutation(rng: random.Random, seed: SeedInput, in_debug_frame: bool):
    """One byte changed inside one FDE's body (its addresses or instructions,
    not its length or CIE pointer) of .eh_frame or .debug_frame:
    (mutant section, that FDE's offset, its original range)."""
    original = seed.debug_frame if in_debug_frame else seed.eh_frame
    cfi = _sources(seed, seed.eh_frame, seed.debug_frame)[1 if in_debug_frame else 0]
    h = rng.choice([h for h in cfi.iter_headers() if not h.is_cie])
    fde = cfi.fde_at(h.offset)
    data = bytearray(original)
    pos = rng.randrange(h.body, h.end)
    if rng.random() < 0.3 and h.end - h.body >= 16:  # an address field: a hostile 64-bit value
        pos = h.body + rng.choice([0, 8]) if in_debug_frame else h.body
        width = 8 if in_debug_frame else 4
        data[pos:pos + width] = rng.choice(_QUADS).to_bytes(8, "little")[:width]
    else:
        data[pos] = rng.choice([data[pos] ^ (1 << rng.randrange(8)), rng.choice(_BYTES), rng.randrange(256)])
    return bytes(data), h.offset, (fde.initial_location, fde.pc_end)


def check_isolation(seed: SeedInput, original: CFITable, eh: bytes, debug: bytes, in_debug_frame: bool,
                    fde_offset: int, old_range) -> None:
    """Every row of the other FDEs is unchanged: a malformed FDE costs only
    its own range (and whatever range its corrupted addresses now claim)."""
    sources = _sources(seed, eh, debug)
    claimed = [old_range]
    try:
        fde = sources[1 if in_debug_frame else 0].fde_at(fde_offset)
        claimed.append((fde.initial_location, fde.pc_end))
    except ParseError:
        pass
    if seed.debug_frame:
        # Merging keeps a .debug_frame FDE only where it meets no .eh_frame
        # range: one that meets a claimed range may go as a whole.
        for fde in CallFrameInfo(seed.debug_frame, 0, False).iter_fdes():
            if any(fde.initial_location < hi and lo < fde.pc_end for lo, hi in claimed[:]):
                claimed.append((fde.initial_location, fde.pc_end))
    table = CFITable.from_sections(sources, "mutant")
    for pc in original.starts:
        if not any(lo <= pc < hi for lo, hi in claimed):
            assert table.lookup(pc) == original.lookup(pc), hex(pc)


def run_mutants(seed: SeedInput, count: int, original: Optional[CFITable] = None) -> int:
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(count):
            rng = random.Random("%s:%s:%d" % (SEED, seed.name, i))
            eh, hdr, debug = seed.eh_frame, seed.hdr, seed.debug_frame
            target = rng.randrange(6)
            point = None
            if original is not None and target == 0:
                in_debug_frame = bool(debug) and rng.random() < 0.5
                mutant, fde_offset, old_range = point_mutation(rng, seed, in_debug_frame)
                if in_debug_frame:
                    debug = mutant
                else:
                    eh = mutant
                point = (in_debug_frame, fde_offset, old_range)
            elif target <= 2 or not debug:
                eh = mutate(rng, eh)
            if target == 3 or target == 5:
                hdr = mutate(rng, hdr)
            if debug and target >= 4:
                debug = mutate(rng, debug)
            signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_MUTANT)
            try:
                exercise(rng, seed, eh, hdr, debug)
                if point is not None:
                    check_isolation(seed, original, eh, debug, *point)
            except Exception as exc:
                raise AssertionError("mutant %s #%d: %s: %s" % (seed.name, i, type(exc).__name__, exc)) from exc
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    return count


# ------------------------------------------------------------------- tests

def _unmutated(seed: SeedInput) -> CFITable:
    sources = [CallFrameInfo(seed.eh_frame, seed.eh_frame_addr, True)]
    if seed.debug_frame:
        sources.append(CallFrameInfo(seed.debug_frame, 0, False))
    table = CFITable.from_sections(sources, seed.name)
    table.compile()
    return table


@pytest.mark.parametrize("library", sorted(LIBS))
def test_library_windows_under_mutation(seeds, library):
    if library not in seeds:
        pytest.skip("no %s" % LIBS[library])
    total = 0
    for seed in seeds[library]:
        table = _unmutated(seed)
        # The window is a faithful piece of the library: every FDE decodes,
        # and the lazy path finds the same rows as the table.
        assert table.stats.errors == 0 and table.stats.fdes >= 10, (seed.name, table.stats.error_messages)
        lazy = LazyEhFrame(CallFrameInfo(seed.eh_frame, seed.eh_frame_addr, True),
                           EHFrameHdr(seed.hdr, seed.hdr_addr), table)
        for start in table.starts:
            assert lazy.lookup(start) == table.lookup(start), (seed.name, hex(start))
        total += run_mutants(seed, MUTANTS_PER_WINDOW, table)
    assert total == WINDOWS_PER_LIBRARY * MUTANTS_PER_WINDOW


def test_program_sections_under_mutation(seeds):
    if "program" not in seeds:
        pytest.skip("needs gcc")
    seed = seeds["program"][0]
    table = _unmutated(seed)
    assert table.stats.errors == 0 and table.stats.debug_frame_fdes > 0, table.stats
    assert run_mutants(seed, PROGRAM_MUTANTS, table) == PROGRAM_MUTANTS


def test_mutations_are_deterministic(seeds):
    """The same seed string gives the same mutants on every run."""
    seed = next(iter(seeds.values()))[0]
    a = [mutate(random.Random("%s:%d" % (SEED, i)), seed.eh_frame) for i in range(20)]
    b = [mutate(random.Random("%s:%d" % (SEED, i)), seed.eh_frame) for i in range(20)]
    assert a == b and len(set(a)) == 20
