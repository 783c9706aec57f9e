"""Tests for perfagent.symbolize.kernelnames: kernel addresses named by the
kernel's own %pS (bpf_snprintf in a test-run raw tracepoint program),
checked against /proc/kallsyms read by perfagent.symbolize.kallsyms, and the
parser of its output under mutation."""

import random
from pathlib import Path

import pytest

from conftest import sleeper_kernel_stack

from perfagent.symbolize.kallsyms import MAX_TAIL_SYMBOL_SIZE, KernelSymbols
from perfagent.symbolize.kernelnames import BATCH, KernelNamer, KernelNamerUnavailable, parse_symbol
from perfagent.symbolize.symbolizer import Symbolizer

KALLSYMS = "/proc/kallsyms"


@pytest.fixture(scope="module")
def namer():
    try:
        k = KernelNamer()
    except KernelNamerUnavailable as exc:
        pytest.skip(str(exc))
    yield k
    k.close()


@pytest.fixture(scope="module")
def kallsyms():
    full = KernelSymbols.parse(Path(KALLSYMS).read_text("latin-1"))
    if not full.available:
        pytest.skip(full.reason)
    return full


def text_symbols():
    """(address, type, name, module) of every text symbol in /proc/kallsyms."""
    out = []
    for line in Path(KALLSYMS).read_text("latin-1").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] in "tTwW":
            module = fields[3][1:-1] if len(fields) > 3 else None
            out.append((int(fields[0], 16), fields[1], fields[2], module))
    return out


def test_names_as_kallsyms_at_and_inside_symbols(namer, kallsyms):
    """4,000 addresses of the core kernel and every module's text (each
    symbol's first byte and a byte inside): the kernel's answer is the
    name /proc/kallsyms gives, module included."""
    syms = text_symbols()
    core = [s for s in syms if s[3] is None]
    modules = [s for s in syms if s[3] is not None and not s[3].startswith("__builtin")
               and s[3] != "bpf"]
    rng = random.Random(20261202)
    chosen = rng.sample(core, 2000) + (rng.sample(modules, min(len(modules), 2000)) if modules else [])
    probes = sorted({a for s in chosen for a in (s[0], s[0] + 1)})
    namer.prefetch(probes)
    differ = []
    for a in probes:
        mine, theirs = namer.lookup_full(a), kallsyms.lookup_full(a)
        if mine != theirs:
            differ.append((hex(a), mine, theirs))
    # Of aliases at one address both take the first listed; nothing may differ.
    assert differ == []
    assert sum(1 for a in probes if namer.lookup_full(a) is not None) == len(probes)
    if modules:
        assert any(namer.lookup_module(s[0]) == s[3] for s in chosen if s[3])


def test_symbol_extent_is_the_kernels(namer, kallsyms):
    """Past the last byte of a function the next symbol (or none) is named,
    as the kernel sizes it: a function's last byte is its own."""
    syms = [s for s in text_symbols() if s[3] is None]
    starts = sorted({s[0] for s in syms})
    rng = random.Random(7)
    checked = 0
    for i in rng.sample(range(len(starts) - 1), 300):
        a, b = starts[i], starts[i + 1]
        if b - a > MAX_TAIL_SYMBOL_SIZE:
            continue
        assert namer.lookup(b - 1) == kallsyms.lookup(b - 1), hex(b - 1)
        assert namer.lookup(b) == kallsyms.lookup(b), hex(b)
        checked += 1
    assert checked > 250


def test_batches_of_twelve_and_cache(namer):
    syms = [s[0] + 2 for s in text_symbols() if s[3] is None][:1200]
    todo = {a for a in syms if a not in namer._named}
    before = namer.lookups
    namer.prefetch(syms)
    runs = namer.lookups - before
    assert len(todo) > 1000 and runs == -(-len(todo) // BATCH)
    namer.prefetch(syms)                 # cached: no more runs
    for a in syms[:50]:
        namer.lookup(a)
    assert namer.lookups - before == runs


def test_user_and_unmapped_addresses_have_no_name(namer):
    for a in (0, 0x400000, 0x7FFF00000000, 0xFFFFFFFFFFFFF000):
        assert namer.lookup_full(a) is None


def test_symbolizer_uses_the_namer_and_names_a_kernel_stack():
    """The kernel prints a blocked task's stack as NAME+0xOFF/0xSIZE
    (/proc/PID/stack); the symbolizer names those addresses identically."""
    sym = Symbolizer()
    if not isinstance(sym.kernel, KernelNamer):
        pytest.skip("bpf_snprintf naming unavailable here")
    frames = sleeper_kernel_stack()
    addresses = {}
    for s in text_symbols():
        addresses.setdefault(s[2], []).append(s[0])
    checked = 0
    for frame in frames:
        parts = frame.split("] ", 1)[-1].split("+0x")
        if len(parts) != 2 or parts[0] not in addresses:
            continue
        name = parts[0]
        off = int(parts[1].split("/")[0], 16)
        assert any(sym.kernel_name(a + off)[0] == name for a in addresses[name]), frame
        checked += 1
    assert checked >= 2, frames


GOOD = [
    "__x64_sys_getpid+0x4/0x10",
    "ext4_fill_super+0x12/0x2000 [ext4]",
    "bpf_prog_6deef7357e7b4530_sd_fw_egress+0x1c/0x60",
    "0xffffffffc0a01000",
]


def test_parse_symbol_forms():
    assert parse_symbol(GOOD[0]) == ("__x64_sys_getpid", None)
    assert parse_symbol(GOOD[1]) == ("ext4_fill_super", "ext4")
    assert parse_symbol(GOOD[2]) == ("bpf_prog_6deef7357e7b4530_sd_fw_egress", None)
    assert parse_symbol(GOOD[3]) is None
    assert parse_symbol("f+0x10/0x10") is None      # an offset beyond the size
    assert parse_symbol("") is None


def test_parse_symbol_mutations():
    """Deterministic mutants of the kernel's lines: a name pair or None,
    never an exception."""
    rng = random.Random(1202)
    alphabet = "+/0x[] \t\n\0fa9Z_.\u00e9"
    n = 0
    for line in GOOD:
        for _ in range(2000):
            chars = list(line)
            for _ in range(rng.randint(1, 4)):
                op = rng.randrange(3)
                pos = rng.randrange(len(chars) + 1)
                if op == 0:
                    chars.insert(pos, rng.choice(alphabet))
                elif op == 1 and chars:
                    del chars[min(pos, len(chars) - 1)]
                elif chars:
                    chars[min(pos, len(chars) - 1)] = rng.choice(alphabet)
            got = parse_symbol("".join(chars))
            assert got is None or (isinstance(got[0], str) and got[0] and
                                   (got[1] is None or isinstance(got[1], str)))
            n += 1
    assert n == 8000
