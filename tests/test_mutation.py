"""Every parser's contract under mutation: bounded, and only its own errors.

A small deterministic mutation engine (:class:`Mutator`) derives mutants from
real seed inputs (binaries of this machine, captured perf records, /proc
text, BTF, pprof files) and each parser's test feeds them through the reads
the agent really does.  Each mutant must either be accepted or raise the
parser's own error type (ParseError subclasses; BPFError for BTF; the perf
record parser raises nothing and counts), and finish within
:data:`MUTANT_SECONDS` (a hang detector, not a benchmark; a mutant stuck far
longer is interrupted by an interval timer and reported the same way).

Mutant ``i`` of a seed is always the same bytes: its random generator is
seeded with ``"name/i"``, so with the same seed bytes and regions (a
``Mutator`` built as the failing test builds it) ``mutant(i)`` replays it::

    data = open("/bin/true", "rb").read()
    m = Mutator("elf:true", data, regions=elf_regions(data))
    with m.mutant(123) as (mutant, ops):
        exercise_elf(mutant)

A failure message names the seed, the index and the operations applied, and
the failing bytes are also saved (under ``$TMPDIR/perfagent-mutants/``),
because some seeds are taken live (this process's maps, a perf capture) and
differ from run to run.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sysconfig
import tempfile
import threading
import time
import traceback
import zlib
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import pytest

from perfagent.bpf import btf as B
from perfagent.bpf.syscall import BPFError
from perfagent.budget import Budget
from perfagent.elf import ELFFile
from perfagent.elf.constants import SHF_COMPRESSED, SHT_NOTE
from perfagent.errors import ParseError, ProfileFormatError
from perfagent.perf import attr as A
from perfagent.perf.records import RecordParser, parse_all
from perfagent.perf.sampler import SAMPLE_TYPE
from perfagent.pprof.profile import ProfileBuilder, decode_profile
from perfagent.symbolize.kallsyms import KallsymsIndex, KernelSymbols
from perfagent.symbolize.perfmap import PerfMap
from perfagent.symbolize.procmaps import AddressSpace, parse_maps_counted

#: A mutant taking longer than this fails its test.  Generous on purpose: it
#: catches hangs and quadratic blow-ups, not slow machines.
MUTANT_SECONDS = 2.0

#: A mutant still running after this long is interrupted (SIGALRM) and
#: reported, so a real infinite loop fails the test instead of hanging it.
INTERRUPT_SECONDS = 20.0

#: Peak RSS a whole parser's run may add, in KiB (ru_maxrss units).
MAX_RSS_GROWTH_KIB = 512 * 1024

#: PERFAGENT_MUTATION_SCALE=N runs N times as many mutants (a deeper search
#: by hand; the suite runs the fixed default).
SCALE = float(os.environ.get("PERFAGENT_MUTATION_SCALE", "1"))

INTERESTING = {
    1: (0, 1, 0x7F, 0x80, 0xFF),
    2: (0, 1, 0x7FFF, 0x8000, 0xFFFF),
    4: (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF),
    8: (0, 1, (1 << 31) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1),
}

#: Tokens spliced into text inputs (maps, kallsyms, perf maps).
TEXT_TOKENS = (
    b"-", b"0x", b"-1", b"+1", b"_", b" ", b"\t", b"\n", b"\r", b"\0", b"[", b"]",
    b"ffffffffffffffff", b"10000000000000000", b"ffffffffffffffffffffffffffffffff",
    b"9" * 40, b"f" * 5000, b"\xff\xfe", b"\xc3\x28", b" (deleted)", b"\xd9\xa3",
)


class Mutator:
    """Deterministic mutants of one seed input.

    ``regions`` is a list of (start, size) byte ranges where most mutations
    land (headers and tables: a random offset in a 20 MB library mostly hits
    code no parser reads).  ``structural`` allows mutants of another length
    (truncation, deleted or duplicated chunks); large seeds are mutated in
    place and restored, without copies.  ``text`` adds line-oriented edits.
    """

    def __init__(self, name: str, data: bytes, regions: Sequence[Tuple[int, int]] = (),
                 structural: bool = True, text: bool = False) -> None:
        self.name = name
        self.seed = bytes(data)
        self.buf = bytearray(data)
        self.regions = [(s, n) for s, n in regions if n > 0 and 0 <= s < len(data)]
        self.structural = structural
        self.text = text

    # -- choosing offsets --------------------------------------------------------

    def _offset(self, rng: random.Random, width: int = 1, align: int = 1) -> int:
        size = len(self.buf)
        if self.regions and rng.random() < 0.85:
            start, length = rng.choice(self.regions)
            off = start + rng.randrange(length)
        else:
            off = rng.randrange(size)
        off -= off % align
        return max(0, min(off, size - width))

    # -- in-place operations (each returns an undo record) -----------------------

    def _write(self, off: int, raw: bytes, undo: list) -> None:
        raw = raw[: len(self.buf) - off]
        undo.append((off, bytes(self.buf[off:off + len(raw)])))
        self.buf[off:off + len(raw)] = raw

    def _op_flip(self, rng, undo) -> str:
        off = self._offset(rng)
        bit = rng.randrange(8)
        self._write(off, bytes([self.buf[off] ^ (1 << bit)]), undo)
        return "flip@%#x.%d" % (off, bit)

    def _op_byte(self, rng, undo) -> str:
        off = self._offset(rng)
        value = rng.choice(INTERESTING[1])
        self._write(off, bytes([value]), undo)
        return "u8@%#x=%#x" % (off, value)

    def _op_word(self, rng, undo) -> str:
        width = rng.choice((2, 4, 4, 8, 8))
        off = self._offset(rng, width, align=rng.choice((1, width, width)))
        value = rng.choice(INTERESTING[width] + (len(self.buf), len(self.buf) - off, len(self.buf) + 1))
        value &= (1 << (8 * width)) - 1
        order = "big" if rng.random() < 0.2 else "little"
        self._write(off, value.to_bytes(width, order), undo)
        return "u%d%s@%#x=%#x" % (8 * width, "be" if order == "big" else "", off, value)

    def _op_inflate(self, rng, undo) -> str:
        """Make an existing length-like field bigger (a count, a size, an offset)."""
        width = rng.choice((2, 4, 8))
        off = self._offset(rng, width, align=width)
        old = int.from_bytes(self.buf[off:off + width], "little")
        value = old * rng.choice((2, 16, 256, 1 << 16)) + rng.choice((0, 1, 8, 4096)) if old \
            else rng.choice((8, 4096, 1 << 20, 1 << 31))
        value &= (1 << (8 * width)) - 1
        self._write(off, value.to_bytes(width, "little"), undo)
        return "inflate%d@%#x:%#x->%#x" % (8 * width, off, old, value)

    def _op_random(self, rng, undo) -> str:
        off = self._offset(rng)
        n = rng.randrange(1, 17)
        self._write(off, bytes(rng.randrange(256) for _ in range(n)), undo)
        return "random@%#x+%d" % (off, n)

    def _op_token(self, rng, undo) -> str:
        off = self._offset(rng)
        token = rng.choice(TEXT_TOKENS)
        self._write(off, token, undo)
        return "token@%#x=%r" % (off, token[:8])

    # -- structural operations (return a new buffer) -----------------------------

    def _op_truncate(self, rng, data: bytearray) -> Tuple[bytearray, str]:
        cut = rng.randrange(len(data) + 1) if rng.random() < 0.5 else self._offset(rng)
        return data[:cut], "truncate@%#x" % cut

    def _op_delete(self, rng, data: bytearray) -> Tuple[bytearray, str]:
        off = rng.randrange(len(data) + 1)
        n = rng.choice((1, 4, 8, rng.randrange(1, 256)))
        return data[:off] + data[off + n:], "delete@%#x+%d" % (off, n)

    def _op_duplicate(self, rng, data: bytearray) -> Tuple[bytearray, str]:
        src = rng.randrange(len(data) + 1)
        n = rng.choice((8, 16, 64, rng.randrange(1, 512)))
        dst = rng.randrange(len(data) + 1)
        return data[:dst] + data[src:src + n] + data[dst:], "dup %#x+%d@%#x" % (src, n, dst)

    def _op_insert_token(self, rng, data: bytearray) -> Tuple[bytearray, str]:
        off = rng.randrange(len(data) + 1)
        token = rng.choice(TEXT_TOKENS)
        return data[:off] + token + data[off:], "insert@%#x=%r" % (off, token[:8])

    def _op_lines(self, rng, data: bytearray) -> Tuple[bytearray, str]:
        lines = bytes(data).split(b"\n")
        i = rng.randrange(len(lines))
        how = rng.choice(("dup", "drop", "swap", "repeat"))
        if how == "dup":
            lines.insert(rng.randrange(len(lines) + 1), lines[i])
        elif how == "drop":
            del lines[i]
        elif how == "swap":
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i:i + 1] = [lines[i]] * rng.choice((2, 100, 2000))
        return bytearray(b"\n".join(lines)), "lines:%s#%d" % (how, i)

    # -- mutants -----------------------------------------------------------------

    @contextlib.contextmanager
    def mutant(self, index: int) -> Iterator[Tuple[bytearray, List[str]]]:
        """Yield (mutant bytes, operations); the seed is restored afterwards.

        The bytes are the mutator's own buffer (in-place mutants) or a new
        bytearray (structural ones); callers must not keep them.
        """
        rng = random.Random("%s/%d" % (self.name, index))
        ops: List[str] = []
        undo: list = []
        in_place = [self._op_flip, self._op_byte, self._op_word, self._op_word,
                    self._op_inflate, self._op_inflate, self._op_random]
        structural = [self._op_truncate, self._op_delete, self._op_duplicate]
        if self.text:
            in_place += [self._op_token, self._op_token]
            structural += [self._op_insert_token, self._op_lines, self._op_lines]
        try:
            for _ in range(1 + min(3, int(rng.expovariate(1.0)))):
                if not self.buf:
                    break
                ops.append(rng.choice(in_place)(rng, undo))
            data = self.buf
            if self.structural and rng.random() < 0.3:
                data, op = rng.choice(structural)(rng, bytearray(data))
                ops.append(op)
            yield data, ops
        finally:
            for off, old in reversed(undo):
                self.buf[off:off + len(old)] = old
        assert self.buf == self.seed, "mutator failed to restore its seed"


class _Interrupted(BaseException):
    """Raised by the interval timer in a mutant that runs far too long."""


@contextlib.contextmanager
def _interrupt_after(seconds: float) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _Interrupted("still running after %g s" % seconds)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _save(name: str, index: int, data: bytearray) -> str:
    """Write a failing mutant where it can be replayed from; return the path."""
    directory = os.path.join(tempfile.gettempdir(), "perfagent-mutants")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "%s-%d.bin" % ("".join(c if c.isalnum() else "_" for c in name), index))
    with open(path, "wb") as f:
        f.write(data)
    return path


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return "%s:%d" % (os.path.relpath(last.filename), last.lineno) if last else "?"


def run_mutants(mutator: Mutator, count: int, exercise: Callable[[bytearray], None],
                allowed: Tuple[type, ...], first: int = 0) -> None:
    """Feed mutants ``first .. first+count-1`` to ``exercise``; assert the contract.

    Failures are collected so one run reports every bad mutant (up to 20),
    each with its seed name and index.
    """
    count = max(1, int(count * SCALE))
    failures: List[str] = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for index in range(first, first + count):
        with mutator.mutant(index) as (data, ops):
            started = time.monotonic()
            try:
                with _interrupt_after(INTERRUPT_SECONDS):
                    exercise(data)
            except allowed:
                pass
            except (Exception, _Interrupted) as exc:
                failures.append("%s mutant %d %s: %s: %s (at %s; bytes in %s)" % (
                    mutator.name, index, " ".join(ops), type(exc).__name__,
                    str(exc)[:200], _where(exc), _save(mutator.name, index, data)))
            elapsed = time.monotonic() - started
            if elapsed > MUTANT_SECONDS:
                failures.append("%s mutant %d %s: took %.1f s (bytes in %s)" % (
                    mutator.name, index, " ".join(ops), elapsed, _save(mutator.name, index, data)))
        if len(failures) >= 20:
            break
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert not failures, "%d failing mutants:\n%s" % (len(failures), "\n".join(failures))
    assert grown < MAX_RSS_GROWTH_KIB, "%s: peak RSS grew by %d MiB" % (mutator.name, grown // 1024)


def catching(allowed: Tuple[type, ...], *steps: Callable[[], object]) -> None:
    """Run each step; an allowed error ends only that step (as the agent's
    readers treat each part of a file independently)."""
    for step in steps:
        try:
            step()
        except allowed:
            pass


# ======================================================================= ELF

#: What one mutated ELF parse may allocate for derived data.
ELF_BUDGET_BYTES = 64 << 20


def _consume(iterable) -> int:
    n = 0
    for _ in iterable:
        n += 1
    return n


def exercise_elf(data: bytearray) -> None:
    """The reads the symbolizer and the unwinder do on a binary."""
    budget = Budget("mutant", seconds=60.0, max_bytes=ELF_BUDGET_BYTES)
    elf = ELFFile(data, path="mutant", budget=budget)
    try:
        catching(
            (ParseError,),
            lambda: _consume(elf.iter_symbols(".symtab")),
            lambda: _consume(elf.iter_symbols(".dynsym")),
            lambda: elf.build_id,
            lambda: elf.debuglink,
            lambda: elf.soname,
            lambda: _consume(elf.iter_notes()),
            lambda: _consume(elf.iter_dynamic()),
            lambda: elf.section(".eh_frame"),
        )
        for sec in elf.sections[:80]:
            catching((ParseError,), lambda: len(elf.section_data(sec)))
        for seg in elf.segments[:32]:
            elf.offset_to_vaddr(seg.p_offset)
            elf.offset_to_vaddr(seg.p_offset + seg.p_filesz - 1)
            elf.vaddr_to_offset(seg.p_vaddr)
    finally:
        elf.close()


def elf_regions(data: bytes) -> List[Tuple[int, int]]:
    """Headers, tables and the starts of the sections a symbolizer reads."""
    elf = ELFFile(bytes(data))
    try:
        regions = [(0, 64), (elf.e_phoff, elf.num_segments * elf.e_phentsize),
                   (elf.e_shoff, elf.num_sections * elf.e_shentsize)]
        for sec in elf.sections:
            if sec.name in (".symtab", ".dynsym", ".strtab", ".dynstr", ".shstrtab", ".dynamic",
                            ".gnu_debuglink", ".note.gnu.build-id", ".interp") \
                    or sec.sh_flags & SHF_COMPRESSED or sec.sh_type == SHT_NOTE:
                regions.append((sec.sh_offset, min(sec.sh_size, 4096)))
                if sec.sh_size > 4096:
                    regions.append((sec.sh_offset + sec.sh_size - 256, 256))
        return regions
    finally:
        elf.close()


C_PROGRAM = r"""
#include <stdio.h>
static int helper(int x) { return x * 3 + 1; }
int work(int n) { int s = 0; for (int i = 0; i < n; i++) s += helper(i); return s; }
int main(int argc, char **argv) { printf("%d\n", work(argc * 1000)); return 0; }
"""


@pytest.fixture(scope="module")
def elf_seeds(tmp_path_factory) -> dict:
    """name -> bytes of the ELF seed inputs (compiled ones when gcc exists)."""
    seeds = {"true": open("/bin/true", "rb").read()}
    d = tmp_path_factory.mktemp("mutation_elf")
    if shutil.which("gcc"):
        src = d / "prog.c"
        src.write_text(C_PROGRAM)
        prog = str(d / "prog")
        subprocess.run(["gcc", "-O2", "-g", "-Wl,--build-id", "-o", prog, str(src)], check=True)
        seeds["gcc-prog"] = open(prog, "rb").read()
        seeds["compressed-symtab"] = compress_symtab(seeds["gcc-prog"])
        if shutil.which("objcopy"):
            subprocess.run(["objcopy", "--compress-debug-sections=zlib", prog, prog + ".z"], check=True)
            subprocess.run(["objcopy", "--only-keep-debug", prog, prog + ".debug"], check=True)
            subprocess.run(["objcopy", "--strip-all", "--add-gnu-debuglink=" + prog + ".debug",
                            prog, prog + ".stripped"], check=True)
            seeds["gcc-zdebug"] = open(prog + ".z", "rb").read()
            seeds["gcc-debuglink"] = open(prog + ".stripped", "rb").read()
    # The running interpreter's libpython (pyenv's keeps .symtab and DWARF)
    # and the distribution's (stripped, with .gnu_debuglink).
    libpython = os.path.join(sysconfig.get_config_var("LIBDIR") or "",
                             sysconfig.get_config_var("LDLIBRARY") or "")
    if ".so" in os.path.basename(libpython) and os.path.isfile(libpython):
        seeds["libpython"] = open(os.path.realpath(libpython), "rb").read()
    for lib in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libpython3.*.so.1.0"))[:1]:
        seeds["libpython-distro"] = open(lib, "rb").read()
    for lib in ("/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1"):
        if os.path.isfile(lib):
            seeds["libz"] = open(lib, "rb").read()  # Debian: stripped, with .gnu_debuglink
            break
    return seeds


def compress_symtab(image: bytes) -> bytes:
    """``image`` with its .symtab moved to the end of the file, zlib-compressed
    behind an Elf64_Chdr and flagged SHF_COMPRESSED (as no linker writes it,
    but the gABI allows for any non-SHF_ALLOC section)."""
    elf = ELFFile(image)
    try:
        index = elf.sections.index(elf.section(".symtab"))
        sec = elf.sections[index]
        plain = bytes(elf.section_data(sec))
        shdr_at = elf.e_shoff + index * elf.e_shentsize
    finally:
        elf.close()
    payload = struct.pack("<IIQQ", 1, 0, len(plain), 8) + zlib.compress(plain, 9)
    out = bytearray(image)
    out += bytes(-len(out) % 8)
    offset = len(out)
    out += payload
    # Elf64_Shdr: sh_name, sh_type, sh_flags @8, sh_addr, sh_offset @24, sh_size @32
    flags = struct.unpack_from("<Q", out, shdr_at + 8)[0] | SHF_COMPRESSED
    struct.pack_into("<Q", out, shdr_at + 8, flags)
    struct.pack_into("<QQ", out, shdr_at + 24, offset, len(payload))
    return bytes(out)


#: (seed, mutants).  Small seeds get most; libpython's full parse costs ~10 ms.
ELF_PLAN = (("true", 1500), ("gcc-prog", 1200), ("compressed-symtab", 1200),
            ("gcc-zdebug", 500), ("gcc-debuglink", 500), ("libz", 500), ("libpython", 150),
            ("libpython-distro", 150))


@pytest.mark.parametrize("seed_name,count", ELF_PLAN, ids=[p[0] for p in ELF_PLAN])
def test_elf_mutants(elf_seeds, seed_name, count):
    if seed_name not in elf_seeds:
        pytest.skip("no %s seed on this machine" % seed_name)
    data = elf_seeds[seed_name]
    exercise_elf(bytearray(data))  # the seed itself parses
    big = len(data) > (4 << 20)
    mutator = Mutator("elf:" + seed_name, data, regions=elf_regions(data), structural=not big)
    run_mutants(mutator, count, exercise_elf, (ParseError,))


# ============================================================== perf records


DWARF_SAMPLE_TYPE = SAMPLE_TYPE | A.PERF_SAMPLE_REGS_USER | A.PERF_SAMPLE_STACK_USER
REGS_MASK = 0x1FF  # 9 registers (any mask: the block has no length of its own)
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def fixture_records() -> bytes:
    """The records of tests/fixtures/perf_records.hex, back to back."""
    data = b""
    with open(os.path.join(FIXTURES, "perf_records.hex")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "==")):
                data += bytes.fromhex(line)
    return data


def crafted_dwarf_records() -> bytes:
    """Records as a --unwind dwarf capture gets them, written field by field
    from perf_event.h: samples with registers and a user stack copy,
    MMAP2 with inode and with build id, COMM, LOST, THROTTLE; each with the
    sample_id trailer (pid, tid | time | cpu, res)."""
    trailer = struct.pack("<IIQII", 7, 8, 1000, 1, 0)

    def record(rtype, misc, body, with_trailer=True):
        body += trailer if with_trailer else b""
        return struct.pack("<IHH", rtype, misc, 8 + len(body)) + body

    def sample(stack: bytes, dyn_size: int, nr_ips=3):
        body = struct.pack("<Q", 0x401000) + struct.pack("<II", 7, 8) + struct.pack("<Q", 999)
        body += struct.pack("<II", 1, 0) + struct.pack("<Q", 10101010)
        body += struct.pack("<Q", nr_ips) + struct.pack("<%dQ" % nr_ips, *(
            [(1 << 64) - 128] + [0xFFFFFFFF81000000 + i for i in range(nr_ips - 1)]))
        body += struct.pack("<Q", 2) + struct.pack("<9Q", *range(0x7FFE0000, 0x7FFE0009))
        body += struct.pack("<Q", len(stack)) + stack
        if stack:
            body += struct.pack("<Q", dyn_size)
        return record(9, 2, body, with_trailer=False)

    name = b"/usr/lib/x86_64-linux-gnu/libc.so.6".ljust(40, b"\0")
    mmap2 = struct.pack("<IIQQQIIQQII", 7, 7, 0x7F0000000000, 0x200000, 0x28000, 8, 1, 123456, 0, 5, 2)
    mmap2_bid = struct.pack("<IIQQQBBH20sII", 7, 7, 0x7F0000400000, 0x1000, 0, 20, 0, 0,
                            bytes(range(20)), 5, 2)
    out = record(10, 2, mmap2 + name)
    out += sample(bytes(range(256)) * 2, 384)
    out += record(10, 2 | (1 << 14), mmap2_bid + name)
    out += record(3, 1 << 13, struct.pack("<II", 7, 8) + b"worker\0\0")
    out += sample(b"", 0, nr_ips=1)
    out += record(2, 0, struct.pack("<QQ", 1, 5))
    out += record(13, 0, struct.pack("<Q", 3))
    out += record(5, 0, struct.pack("<QQQ", 1234, 1, 0))
    out += record(1, 2, struct.pack("<IIQQQ", 7, 7, 0x400000, 0x1000, 0) + b"/bin/true\0\0\0\0\0\0\0")
    out += sample(bytes(64), 64)
    return out


def live_dwarf_records() -> Optional[bytes]:
    """A few KiB of records from a real perf_event_open on this thread
    (samples with registers and stack copies, the MMAP2 of an executable
    mapping made meanwhile), or None when sampling is not allowed here."""
    import mmap as mmap_module
    from perfagent.perf.sampler import Sampler
    try:
        s = Sampler(4000, data_pages=16, sample_type=DWARF_SAMPLE_TYPE,
                    sample_regs_user=REGS_MASK, sample_stack_user=512)
    except Exception:
        return None
    try:
        try:
            s.open_threads([threading.get_native_id()])
            s.enable()
        except Exception:
            return None
        code = mmap_module.mmap(-1, 4096, prot=mmap_module.PROT_READ | mmap_module.PROT_EXEC)
        deadline = time.monotonic() + 0.3
        x = 0
        while time.monotonic() < deadline:
            x += sum(range(1000))
        code.close()
        s.disable()
        data = b"".join(ring.read() for ring in s.rings.values())
    finally:
        s.close()
    # Keep whole records up to ~12 KiB: enough variety, cheap mutants.
    off = 0
    while off + 8 <= len(data) and off < 12 << 10:
        size = struct.unpack_from("<H", data, off + 6)[0]
        if size < 8:
            break
        off += size
    return data[:off] or None


def exercise_records(data: bytearray) -> None:
    """Both parsers a capture may use, each in both delivery modes; the
    contract is to count what is malformed, never to raise."""
    n = len(data)
    for sample_type, regs in ((SAMPLE_TYPE, 0), (DWARF_SAMPLE_TYPE, REGS_MASK)):
        parser = RecordParser(sample_type, regs)
        samples: list = []
        events: list = []
        parser.parse(data, samples.append, events.append)
        parser.parse(data, samples.append, events.append, timed_events=[])
        for smp in samples:
            stack = smp[9]
            assert stack is None or len(stack) <= n, "stack copy larger than the record"
            assert len(smp[6]) + len(smp[7]) <= n // 8, "more ips than the record holds"
        for ev in events:
            if ev[0] == "mmap":
                assert len(ev[10]) <= n, "file name larger than the record"
        assert parser.malformed >= 0 and parser.lost >= 0


@pytest.fixture(scope="module")
def record_seeds() -> dict:
    seeds = {"fixture": fixture_records(), "crafted-dwarf": crafted_dwarf_records()}
    if os.geteuid() == 0:
        live = live_dwarf_records()
        if live:
            seeds["live-dwarf"] = live
    return seeds


RECORDS_PLAN = (("fixture", 1500), ("crafted-dwarf", 1500), ("live-dwarf", 800))


@pytest.mark.parametrize("seed_name,count", RECORDS_PLAN, ids=[p[0] for p in RECORDS_PLAN])
def test_perf_record_mutants(record_seeds, seed_name, count):
    if seed_name not in record_seeds:
        pytest.skip("no %s seed here (perf_event_open needs root)" % seed_name)
    data = record_seeds[seed_name]
    # The seeds are well formed: nothing is malformed before mutation.
    config = (SAMPLE_TYPE, 0) if seed_name == "fixture" else (DWARF_SAMPLE_TYPE, REGS_MASK)
    parser = RecordParser(*config)
    samples: list = []
    parser.parse(data, samples.append, lambda e: None)
    assert parser.malformed == 0 and samples
    regions = [(0, len(data))]
    run_mutants(Mutator("records:" + seed_name, data, regions), count, exercise_records, ())
    run_mutants(Mutator("records-all:" + seed_name, data, regions), count // 10,
                lambda d: parse_all(bytes(d), config[0], config[1]), (ParseError,))


# ====================================================================== BTF


# Per kind: (indexes of type ids among the extra words of a fixed part,
#            words per vlen item, index of the type id in an item,
#            index of a name_off in an item) -- include/uapi/linux/btf.h.
_BTF_REFS = {
    B.BTF_KIND_ARRAY: ((0, 1), 0, None, None),
    B.BTF_KIND_STRUCT: ((), 3, 1, 0),
    B.BTF_KIND_UNION: ((), 3, 1, 0),
    B.BTF_KIND_ENUM: ((), 2, None, 0),
    B.BTF_KIND_ENUM64: ((), 3, None, 0),
    B.BTF_KIND_FUNC_PROTO: ((), 2, 1, 0),
    B.BTF_KIND_DATASEC: ((), 3, 0, None),
}
# Kinds whose btf_type.type is a type id (the others hold a size).
_BTF_TYPE_FIELD = (B.BTF_KIND_PTR, B.BTF_KIND_TYPEDEF, B.BTF_KIND_VOLATILE, B.BTF_KIND_CONST,
                   B.BTF_KIND_RESTRICT, B.BTF_KIND_FUNC, B.BTF_KIND_FUNC_PROTO, B.BTF_KIND_VAR,
                   B.BTF_KIND_DECL_TAG, B.BTF_KIND_TYPE_TAG)


def btf_subset(btf: "B.BTF", roots: Sequence[int], limit: int = 400) -> bytes:
    """A standalone BTF blob of the types reachable from ``roots`` (at most
    ``limit``; pointers to data are not followed but become ``void *``,
    and anything past the limit is referenced as id 0), renumbered, with its
    own string section: a slice of vmlinux with real layouts that stays
    small."""
    words = btf._w
    new_id = {0: 0}
    order: List[int] = []
    queue = list(roots)
    while queue and len(order) < limit:
        tid = queue.pop(0)
        if tid in new_id or not 0 < tid < len(btf):
            continue
        new_id[tid] = len(order) + 1
        order.append(tid)
        for ref in _btf_refs(btf, tid):
            if ref not in new_id:
                queue.append(ref)
    strs = bytearray(b"\0")
    string_at = {0: 0}

    def name(off: int) -> int:
        if off not in string_at:
            string_at[off] = len(strs)
            end = btf._strs.index(b"\0", off)
            strs.extend(btf._strs[off:end + 1])
        return string_at[off]

    out = bytearray()
    for tid in order:
        p = btf._offsets[tid]
        end = btf._offsets[tid + 1] if tid + 1 < len(btf) else len(words)
        rec = list(words[p:end])
        kind, vlen = (rec[1] >> 24) & 0x1F, rec[1] & 0xFFFF
        rec[0] = name(rec[0])
        if kind == B.BTF_KIND_PTR and not _points_to_function(btf, tid):
            rec[2] = 0
        elif kind in _BTF_TYPE_FIELD:
            rec[2] = new_id.get(rec[2], 0)
        fixed, per_item, type_at, name_at = _BTF_REFS.get(kind, ((), 0, None, None))
        for i in fixed:
            rec[3 + i] = new_id.get(rec[3 + i], 0)
        for item in range(vlen if per_item else 0):
            base = 3 + per_item * item
            if type_at is not None:
                rec[base + type_at] = new_id.get(rec[base + type_at], 0)
            if name_at is not None:
                rec[base + name_at] = name(rec[base + name_at])
        out += struct.pack("<%dI" % len(rec), *rec)
    header = B.BTF_HEADER.pack(B.BTF_MAGIC, 1, 0, B.BTF_HEADER.size, 0, len(out), len(out), len(strs))
    return header + bytes(out) + bytes(strs)


def _points_to_function(btf: "B.BTF", tid: int) -> bool:
    return btf.type(btf.resolve(btf.type(tid).size_or_type)).kind == B.BTF_KIND_FUNC_PROTO


def _btf_refs(btf: "B.BTF", tid: int) -> List[int]:
    t = btf.type(tid)
    follow = t.kind != B.BTF_KIND_PTR or _points_to_function(btf, tid)
    refs = [t.size_or_type] if t.kind in _BTF_TYPE_FIELD and follow else []
    fixed, per_item, type_at, _name_at = _BTF_REFS.get(t.kind, ((), 0, None, None))
    refs += [btf._extra(tid, i) for i in fixed]
    if type_at is not None:
        refs += [btf._extra(tid, per_item * i + type_at) for i in range(t.vlen)]
    return refs


#: Names the agent looks up, and (struct, member path) pairs.
BTF_NAMES = ("task_struct", "pt_regs", "outer", "inner", "btf_trace_sched_switch",
             "__bpf_trace_sched_switch", "btf_trace_demo", "do_it", "u32")
BTF_MEMBERS = (("task_struct", "pid"), ("task_struct", "__state"), ("task_struct", "mm"),
               ("pt_regs", "sp"), ("outer", "in.flags"), ("outer", "w"), ("old", "n"),
               ("task_struct", "se.sum_exec_runtime"))


def exercise_btf(data: bytearray) -> None:
    """Everything the off-CPU and in-kernel programs ask of BTF, plus every
    accessor on the first types."""
    btf = B.BTF(bytes(data), "mutant")
    for tid in range(min(len(btf), 300)):
        catching((BPFError,),
                 lambda: btf.type(tid), lambda: btf.size_of(tid), lambda: btf.members(tid),
                 lambda: btf.member(tid, "zz_no_such_member"), lambda: btf.params(tid))
    for name in BTF_NAMES:
        catching((BPFError,), lambda: btf.find_all(name), lambda: btf.find(name, B.BTF_KIND_STRUCT))
    for struct_name, path in BTF_MEMBERS:
        catching((BPFError,), lambda: btf.member_size(btf.member(struct_name, path)))
    catching((BPFError,), lambda: btf.member_any("task_struct", "__state", "state"),
             lambda: btf.raw_tp_args("sched_switch"), lambda: btf.raw_tp_arg_index("sched_switch", "next"),
             lambda: btf.raw_tp_args("demo"))


@pytest.fixture(scope="module")
def btf_seeds() -> dict:
    from test_bpf_btf import synthetic
    seeds = {"synthetic": synthetic()}
    if os.path.exists(B.VMLINUX_PATH):
        vmlinux = B.BTF.load_vmlinux()
        roots = []
        for name, kind in (("btf_trace_sched_switch", B.BTF_KIND_TYPEDEF),
                           ("__bpf_trace_sched_switch", B.BTF_KIND_FUNC),
                           ("pt_regs", B.BTF_KIND_STRUCT), ("task_struct", B.BTF_KIND_STRUCT)):
            roots += vmlinux.find_all(name, kind)[:1]
        seeds["vmlinux-slice"] = btf_subset(vmlinux, roots)
    return seeds


BTF_PLAN = (("synthetic", 2000), ("vmlinux-slice", 600))


@pytest.mark.parametrize("seed_name,count", BTF_PLAN, ids=[p[0] for p in BTF_PLAN])
def test_btf_mutants(btf_seeds, seed_name, count):
    if seed_name not in btf_seeds:
        pytest.skip("no kernel BTF here")
    data = btf_seeds[seed_name]
    seed = B.BTF(data, seed_name)
    if seed_name == "vmlinux-slice":  # the slice keeps what the agent needs
        assert seed.member("task_struct", "pid").offset == B.vmlinux().member("task_struct", "pid").offset
        assert [p.name for p in seed.raw_tp_args("sched_switch")][:3] == ["preempt", "prev", "next"]
    exercise_btf(bytearray(data))
    run_mutants(Mutator("btf:" + seed_name, data, [(0, B.BTF_HEADER.size), (0, len(data))]),
                count, exercise_btf, (BPFError,))


# ===================================================================== pprof


def encoder_profile() -> bytes:
    """A profile as the agent writes one: mappings with build ids, inlined
    frames, labels, two sample types, comments (perfagent.pprof's encoder)."""
    b = ProfileBuilder(sample_types=[("samples", "count"), ("cpu", "nanoseconds")],
                       period_type=("cpu", "nanoseconds"), period=10101010,
                       time_nanos=1_700_000_000_000_000_000, comments=["perfagent", "host=db1"],
                       default_sample_type="cpu")
    exe = b.add_mapping(0x400000, 0x500000, 0x1000, "/usr/bin/app", build_id="abcdef0123")
    libc = b.add_mapping(0x7F0000000000, 0x7F0000200000, 0, "/lib/libc.so.6")
    funcs = [b.function_id("f%d" % i, "_Z2f%dv" % i, "app.c", i) for i in range(8)]
    memcpy = b.function_id("memcpy")
    locs = [b.location_id(exe, 0x401000 + 0x40 * i, ((funcs[i], 10 + i),)) for i in range(8)]
    inl = b.location_id(exe, 0x402000, ((funcs[1], 4, 9), (funcs[2], 25)))
    lc = b.location_id(libc, 0x7F0000001000, ((memcpy, 0),))
    for i in range(12):
        stack = [lc, inl] + locs[i % 8:] if i % 3 else locs[: 1 + i % 8]
        b.add_sample(tuple(stack), (1 + i, 10101010 * (1 + i)),
                     labels=(("pid", str(40 + i % 3)), ("comm", "app")),
                     num_labels=(("bytes", 64 * i, "bytes"),) if i % 4 == 0 else ())
    b.set_duration(2_000_000_000)
    return b.encode()


def exercise_pprof(data: bytearray) -> None:
    decode_profile(bytes(data))


@pytest.fixture(scope="module")
def pprof_seeds() -> dict:
    go_gz = open(os.path.join(FIXTURES, "pprof_go_heap.pb.gz"), "rb").read()
    ours = encoder_profile()
    return {"go-heap": gzip.decompress(go_gz), "go-heap-gz": go_gz,
            "encoder": ours, "encoder-gz": gzip.compress(ours, mtime=0)}


PPROF_PLAN = (("go-heap", 1200), ("encoder", 1200), ("go-heap-gz", 300), ("encoder-gz", 300))


@pytest.mark.parametrize("seed_name,count", PPROF_PLAN, ids=[p[0] for p in PPROF_PLAN])
def test_pprof_mutants(pprof_seeds, seed_name, count):
    data = pprof_seeds[seed_name]
    assert decode_profile(data).samples
    run_mutants(Mutator("pprof:" + seed_name, data, [(0, len(data))]), count, exercise_pprof,
                (ProfileFormatError,))


# ============================================ /proc maps, kallsyms, perf maps


def _fixture_bytes(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return b"".join(line for line in f if not line.startswith(b"#"))


def _probes(starts: Sequence[int]) -> List[int]:
    out = [0, 1, (1 << 64) - 1]
    for s in list(starts)[:64]:
        out += [s, s - 1, s + 1]
    return out


def exercise_maps(data: bytearray) -> None:
    text = bytes(data).decode("utf-8", "surrogateescape")
    entries, skipped = parse_maps_counted(text)
    assert skipped >= 0
    space = AddressSpace(entries)
    child = space.fork_copy()
    for e in entries[:32]:
        child.add(e.start + 0x100, e.end + 0x100, e.pgoff, e.path + " (deleted)", e.is_exec)
        assert e.size >= 0 and len(e.perms) == 4
    for addr in _probes([e.start for e in entries]):
        space.find(addr)
        child.find(addr)


def exercise_kallsyms(data: bytearray) -> None:
    syms = KernelSymbols.parse(bytes(data).decode("latin-1"))
    assert syms.skipped >= 0
    starts = syms._starts
    # The lazy index load() uses: a mutant it accepts names alike.
    index = KallsymsIndex.build(bytes(data))
    for addr in _probes(starts):
        syms.lookup(addr)
        found = syms.lookup_full(addr)
        syms.lookup_module(addr)
        if isinstance(index, KallsymsIndex):
            assert index.lookup_full(addr) == found, hex(addr)
    len(syms)


class PerfMapExercise:
    """Writes each mutant to a real file and reads it the way a capture does:
    half of it, a refresh after the rest is appended, then lookups."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "perf-4242.map")

    def __call__(self, data: bytearray) -> None:
        half = len(data) // 2
        with open(self.path, "wb") as f:
            f.write(data[:half])
        pm = PerfMap(self.path, os.getuid())
        with open(self.path, "ab") as f:
            f.write(data[half:])
        pm.refresh()
        assert pm.trusted and pm.skipped >= 0
        for addr in _probes(pm._starts):
            pm.lookup(addr)
        os.unlink(self.path)


def live_kallsyms_slice() -> Optional[bytes]:
    """The first 200 lines of /proc/kallsyms and 100 module lines, or None."""
    try:
        with open("/proc/kallsyms", "rb") as f:
            lines = f.read().splitlines(keepends=True)
    except OSError:
        return None
    modules = [line for line in lines if line.endswith(b"]\n")]
    return b"".join(lines[:200] + modules[:100]) or None


def python_perf_map(directory: str) -> Optional[bytes]:
    """The perf map a CPython 3.12+ of this machine writes with -X perf."""
    candidates = [shutil.which("python" + v) for v in ("3.13", "3.12")]
    candidates += sorted(glob.glob("/root/.pyenv/versions/3.1[2-9]*/bin/python3.1[2-9]"))
    for exe in candidates:
        if exe is None:
            continue
        script = "def f(n):\n return n and f(n - 1)\nf(50)\nimport os; print(os.getpid())"
        result = subprocess.run([exe, "-X", "perf", "-c", script], stdout=subprocess.PIPE,
                                cwd=directory, timeout=60)
        path = "/tmp/perf-%s.map" % result.stdout.decode().strip()
        if result.returncode == 0 and os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            os.unlink(path)
            return data[:16 << 10]
    return None


@pytest.fixture(scope="module")
def text_seeds(tmp_path_factory) -> dict:
    with open("/proc/self/maps", "rb") as f:
        self_maps = f.read()
    seeds = {
        "maps:sample": _fixture_bytes("maps_sample.txt"),
        "maps:malformed": _fixture_bytes("maps_malformed.txt"),
        "maps:self": self_maps,
        "kallsyms:normal": _fixture_bytes("kallsyms_normal.txt"),
        "kallsyms:hidden": _fixture_bytes("kallsyms_hidden.txt"),
        "perfmap:overlap": _fixture_bytes("perfmap_overlap.txt"),
    }
    live = live_kallsyms_slice()
    if live:
        seeds["kallsyms:live"] = live
    jit = python_perf_map(str(tmp_path_factory.mktemp("perfmap_seed")))
    if jit:
        seeds["perfmap:cpython"] = jit
    return seeds


TEXT_PLAN = (("maps:sample", 1200), ("maps:malformed", 600), ("maps:self", 800),
             ("kallsyms:normal", 1200), ("kallsyms:hidden", 400), ("kallsyms:live", 800),
             ("perfmap:overlap", 1500), ("perfmap:cpython", 600))


@pytest.mark.parametrize("seed_name,count", TEXT_PLAN, ids=[p[0] for p in TEXT_PLAN])
def test_text_parser_mutants(text_seeds, tmp_path, seed_name, count):
    if seed_name not in text_seeds:
        pytest.skip("no %s seed here" % seed_name)
    data = text_seeds[seed_name]
    kind = seed_name.split(":")[0]
    exercise = {"maps": exercise_maps, "kallsyms": exercise_kallsyms,
                "perfmap": PerfMapExercise(str(tmp_path))}[kind]
    exercise(bytearray(data))
    # These parsers count what they skip: nothing may escape, not even a ParseError.
    run_mutants(Mutator(seed_name, data, [(0, len(data))], text=True), count, exercise, ())
