"""Tests for perfagent.symbolize.kallsyms: fixtures for the format's corner
cases, then the real /proc/kallsyms checked against the kernel's own
symbolization of a sleeping process's stack."""

import re
from pathlib import Path

import pytest

from conftest import sleeper_kernel_stack

from perfagent.symbolize.kallsyms import (
    MAX_TAIL_SYMBOL_SIZE, REASON_HIDDEN, KallsymsIndex, KernelSymbols)

FIXTURES = Path(__file__).parent / "fixtures"
KALLSYMS = "/proc/kallsyms"


def fixture_text(name: str) -> str:
    """A fixture without its '#' annotation lines."""
    lines = (FIXTURES / name).read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("#"))


@pytest.fixture(scope="module", params=["full parse", "lazy index"])
def normal(request):
    """The fixture through both readers: KernelSymbols.parse, and the lazy
    index that load() uses for a file the kernel wrote."""
    text = fixture_text("kallsyms_normal.txt")
    if request.param == "full parse":
        return KernelSymbols.parse(text)
    index = KallsymsIndex.build(text.encode("latin-1"))
    assert isinstance(index, KallsymsIndex)
    return index


def test_normal_available(normal):
    assert normal.available and normal.reason == "" and normal.skipped == 0


def test_ranges_end_at_next_symbol(normal):
    assert normal.lookup(0xFFFFFFFF80FFFFFF) is None
    assert normal.lookup(0xFFFFFFFF81000100) == "do_one"
    assert normal.lookup(0xFFFFFFFF810001FF) == "do_one"
    assert normal.lookup(0xFFFFFFFF81000200) == "local_two"
    # Data symbols are ignored: local_two runs on to the weak symbol.
    assert normal.lookup(0xFFFFFFFF810002A0) == "local_two"
    assert normal.lookup(0xFFFFFFFF81000300) == "weak_three"


def test_first_alias_wins(normal):
    assert normal.lookup(0xFFFFFFFF81000000) == "srso_alias_untrain_ret"
    assert normal.lookup(0xFFFFFFFF81000400) == "__x64_sys_getpid"
    assert normal.lookup(0xFFFFFFFFC0010000) == "mod_a_first"


def test_end_markers_are_holes_unless_shared(normal):
    # A marker sharing its address with a function loses to it.
    assert normal.lookup(0xFFFFFFFF81000380) == "after_marker_same_address"
    assert normal.lookup(0xFFFFFFFF810005FF) == "last_core_func"
    # After _etext: nothing until init text.
    assert normal.lookup(0xFFFFFFFF81000600) is None
    assert normal.lookup(0xFFFFFFFF810FFFFF) is None
    assert normal.lookup(0xFFFFFFFF81100000) == "_sinittext"
    assert normal.lookup(0xFFFFFFFF811000FF) == "init_func"
    assert normal.lookup(0xFFFFFFFF81100100) is None  # _einittext
    assert normal.lookup(0xFFFFFFFFC000FFFF) is None


def test_modules(normal):
    assert normal.lookup_full(0xFFFFFFFFC0010010) == ("mod_a_first", "mod_a")
    assert normal.lookup_module(0xFFFFFFFFC0010010) == "mod_a"
    assert normal.lookup_module(0xFFFFFFFF81000100) is None
    assert normal.lookup_full(0xFFFFFFFF81000100) == ("do_one", None)
    # Listed out of order, still sorted; the last symbol of mod_a runs up to
    # mod_b since that is within the tail cap.
    assert normal.lookup(0xFFFFFFFFC0010100) == "mod_a_second"
    assert normal.lookup(0xFFFFFFFFC001FFFF) == "mod_a_second"
    assert normal.lookup_full(0xFFFFFFFFC0020000) == ("mod_b_only", "mod_b")


def test_tail_cap_at_module_boundary_and_end(normal):
    mod_b = 0xFFFFFFFFC0020000
    assert normal.lookup(mod_b + MAX_TAIL_SYMBOL_SIZE - 1) == "mod_b_only"
    assert normal.lookup(mod_b + MAX_TAIL_SYMBOL_SIZE) is None
    assert normal.lookup_module(mod_b + MAX_TAIL_SYMBOL_SIZE) is None
    assert normal.lookup_full(mod_b + MAX_TAIL_SYMBOL_SIZE) is None
    bpf = 0xFFFFFFFFC0100000
    assert normal.lookup_full(bpf + 8) == ("bpf_prog_0123456789abcdef_handler", "bpf")
    assert normal.lookup(bpf + MAX_TAIL_SYMBOL_SIZE) is None
    assert normal.lookup(2 ** 64 - 1) is None


def test_hidden_addresses(tmp_path):
    hidden = tmp_path / "kallsyms"
    hidden.write_text(fixture_text("kallsyms_hidden.txt"))
    for syms in (KernelSymbols.parse(fixture_text("kallsyms_hidden.txt")), KernelSymbols.load(str(hidden))):
        assert not syms.available
        assert syms.reason == REASON_HIDDEN
        assert "kptr_restrict" in syms.reason
        assert syms.lookup(0) is None and syms.lookup(0xFFFFFFFF81000000) is None


def test_empty_malformed_and_unreadable(tmp_path):
    empty = KernelSymbols.parse("")
    assert not empty.available and "no kernel text symbols" in empty.reason
    mixed = KernelSymbols.parse("garbage\nzzzz T bad_hex\nffffffff81000000 T ok\n")
    assert mixed.available and mixed.skipped == 2
    assert mixed.lookup(0xFFFFFFFF81000010) == "ok"
    missing = KernelSymbols.load(str(tmp_path / "nope"))
    assert not missing.available and "cannot read" in missing.reason
    # load(): a file with a line the kernel would not write gets the full
    # parse (which skips and counts it), an empty one the same reason.
    odd = tmp_path / "odd"
    odd.write_text("garbage\nzzzz T bad_hex\nffffffff81000000 T ok\n")
    loaded = KernelSymbols.load(str(odd))
    assert isinstance(loaded, KernelSymbols) and loaded.skipped == 2
    assert loaded.lookup(0xFFFFFFFF81000010) == "ok"
    (tmp_path / "empty").write_text("")
    assert "no kernel text symbols" in KernelSymbols.load(str(tmp_path / "empty")).reason


# ---- the real /proc/kallsyms ---------------------------------------------------

@pytest.fixture(scope="module")
def real():
    syms = KernelSymbols.load()
    if not syms.available:
        pytest.skip(syms.reason)
    return syms


def real_addresses():
    """name -> [addresses] of the text symbols in /proc/kallsyms."""
    found = {}
    for line in Path(KALLSYMS).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] in "tTwW":
            found.setdefault(fields[2], []).append(int(fields[0], 16))
    return found


def test_real_lazy_index_names_as_the_full_parse():
    """load() keeps the live file as a lazy index: on the same bytes it must
    name every address as the full parse does, at each symbol's start, just
    before it, just after, and around the tail cap."""
    data = Path(KALLSYMS).read_bytes()
    index = KallsymsIndex.build(data)
    full = KernelSymbols.parse(data.decode("latin-1"))
    if not full.available:
        pytest.skip(full.reason)
    assert isinstance(index, KallsymsIndex) and index.available
    probes = set()
    for start in full._starts:
        probes.update((start - 1, start, start + 1, start + MAX_TAIL_SYMBOL_SIZE - 1,
                       start + MAX_TAIL_SYMBOL_SIZE))
    assert len(probes) > 100000
    differ = [hex(a) for a in sorted(probes) if index.lookup_full(a) != full.lookup_full(a)]
    assert differ == []
    assert len(index) == len(full)
    assert index.address_of("schedule") == full.address_of("schedule")


def test_real_symbols_resolve_their_own_address(real):
    addresses = real_addresses()
    names = [n for n in ("do_sys_open", "__x64_sys_getpid", "schedule", "do_syscall_64",
                         "hrtimer_nanosleep") if n in addresses]
    assert names
    first_listed = {}
    for line in Path(KALLSYMS).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] in "tTwW":
            first_listed.setdefault(int(fields[0], 16), fields[2])
    for name in names:
        for addr in addresses[name]:
            # Of aliases at one address, the first listed (the kernel's own
            # choice) is what we report.
            assert real.lookup(addr) == first_listed[addr]
            assert real.lookup(addr + 1) == first_listed[addr]


def test_real_matches_kernel_stack_symbolization(real):
    """The kernel prints a blocked task's stack as NAME+0xOFF/0xSIZE: our
    lookup must agree on the name at the offset and on the symbol's extent."""
    frames = sleeper_kernel_stack()
    addresses = real_addresses()
    checked = 0
    for frame in frames:
        m = re.search(r"\] (\S+)\+0x([0-9a-f]+)/0x([0-9a-f]+)", frame)
        if not m or m.group(1) not in addresses:
            continue
        name, off, size = m.group(1), int(m.group(2), 16), int(m.group(3), 16)
        # Static functions can share a name; one of them is the frame's.
        assert any(real.lookup(a + off) == name and real.lookup(a + size - 1) == name
                   and real.lookup(a + size) != name for a in addresses[name]), frame
        checked += 1
    assert checked >= 2, frames


def test_addresses_only_as_the_kernel_prints_them():
    text = "\n".join([
        "ffffffff81000000 T good_one",
        "-ffffffff8100000 T signed",
        "0xffffffff810000 T prefixed",
        "ffff_ffff81000100 T underscored",
        "f" * 17 + " T too_wide",
        "\u0663\u0663 T arabic_digits",
        "ffffffff81000200 T good_two",
    ])
    syms = KernelSymbols.parse(text)
    assert syms.skipped == 5
    assert syms.lookup(0xFFFFFFFF81000100) == "good_one"
    assert syms.lookup(0xFFFFFFFF81000200) == "good_two"
