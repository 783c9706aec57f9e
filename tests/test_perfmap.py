"""Tests for perfagent.symbolize.perfmap: the JIT perf map format, the
later-wins rule, the trust rule, and incremental refresh."""

import os
import random
from pathlib import Path

import pytest

from perfagent.symbolize import perfmap as perfmap_mod
from perfagent.symbolize.perfmap import PerfMap

FIXTURES = Path(__file__).parent / "fixtures"
OTHER_UID = 12345
ME = os.getuid()


def fixture_text(name: str) -> str:
    """A fixture without its '#' annotation lines."""
    lines = (FIXTURES / name).read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("#"))


@pytest.fixture
def map_path(tmp_path):
    return tmp_path / "perf-4242.map"


def test_fixture_overlaps_and_malformed(map_path):
    map_path.write_text(fixture_text("perfmap_overlap.txt"))
    pm = PerfMap(str(map_path), ME)
    assert pm.exists and pm.trusted and pm.reason == ""
    assert pm.skipped == 3
    assert pm.lookup(0xFFF) is None
    assert pm.lookup(0x1000) == "first function"
    assert pm.lookup(0x10FF) == "first function"
    assert pm.lookup(0x1100) == "LazyCompile:~main /app/index.js:1"
    assert pm.lookup(0x1180) is None
    # Later entries win where they overlap; the old one shows around them.
    assert pm.lookup(0x12FF) == "old big"
    assert pm.lookup(0x1300) == "new in middle"
    assert pm.lookup(0x137F) == "new in middle"
    assert pm.lookup(0x1380) == "old big"
    assert pm.lookup(0x13FF) == "old big"
    assert pm.lookup(0x1400) is None
    assert pm.lookup(0x2000) == "fresh" and pm.lookup(0x203F) == "fresh"
    assert pm.lookup(0x4000) is None


def brute_force(entries, addr):
    """Reference for later-wins: the last entry listed that covers addr."""
    for start, size, name in reversed(entries):
        if start <= addr < start + size:
            return name
    return None


def test_later_wins_matches_brute_force(map_path):
    rng = random.Random(7)
    entries = [(rng.randrange(0, 0x400), rng.randrange(1, 0x80), "f%d" % i) for i in range(300)]
    map_path.write_text("".join("%x %x %s\n" % e for e in entries))
    pm = PerfMap(str(map_path), ME)
    assert len(pm) == 300
    for addr in range(0, 0x500):
        assert pm.lookup(addr) == brute_force(entries, addr), hex(addr)


def test_reused_addresses_update_in_place(map_path):
    """A JIT that recompiles into the same few addresses: each entry is laid
    over the view (no rebuild from every entry read, which was quadratic),
    the view holds what is current, and nothing grows with the history."""
    entries = [(0x1000 + 0x100 * (i % 16), 0x80 + (i % 3) * 0x40, "gen%d" % i) for i in range(20000)]
    map_path.write_text("".join("%x %x %s\n" % entries[i] for i in range(10000)))
    pm = PerfMap(str(map_path), ME)
    with map_path.open("a") as f:
        f.write("".join("%x %x %s\n" % entries[i] for i in range(10000, 20000)))
    assert pm.refresh()
    assert len(pm) == 20000
    assert pm.pieces() <= 32, pm.pieces()
    tail = entries[-64:]
    for addr in range(0x1000, 0x2100, 0x10):
        assert pm.lookup(addr) == brute_force(tail, addr), hex(addr)


def test_missing_file_is_not_an_error(map_path):
    pm = PerfMap(str(map_path), ME)
    assert not pm.exists and pm.lookup(0x1000) is None
    assert pm.refresh() is False and not pm.exists
    map_path.write_text("1000 10 appeared\n")
    assert pm.refresh() is True
    assert pm.exists and pm.lookup(0x1000) == "appeared"


def test_symlink_is_refused(tmp_path, map_path):
    target = tmp_path / "target.map"
    target.write_text("1000 10 via_link\n")
    map_path.symlink_to(target)
    pm = PerfMap(str(map_path), ME)
    assert pm.exists and not pm.trusted
    assert "symbolic link" in pm.reason
    assert pm.lookup(0x1000) is None
    # The open itself refuses a symlink even if the lstat was fooled.
    with pytest.raises(OSError):
        os.open(str(map_path), perfmap_mod._OPEN_FLAGS)


def test_not_regular_file_is_refused(map_path):
    os.mkfifo(str(map_path))
    pm = PerfMap(str(map_path), ME)  # must not block on the FIFO
    assert not pm.trusted and "not a regular file" in pm.reason


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_foreign_owner_refused_root_and_expected_accepted(map_path):
    map_path.write_text("1000 10 owned\n")
    os.chown(str(map_path), OTHER_UID, OTHER_UID)
    refused = PerfMap(str(map_path), 1000)
    assert not refused.trusted and "uid %d" % OTHER_UID in refused.reason
    assert refused.lookup(0x1000) is None
    accepted = PerfMap(str(map_path), OTHER_UID)
    assert accepted.trusted and accepted.lookup(0x1000) == "owned"
    # Handing the file to root makes it trusted for anyone: the refused
    # reader notices the owner change on its next refresh.
    os.chown(str(map_path), 0, 0)
    assert refused.refresh() is True
    assert refused.trusted and refused.reason == "" and refused.lookup(0x1000) == "owned"
    # And a chown back to a stranger drops the symbols.
    os.chown(str(map_path), OTHER_UID, OTHER_UID)
    refused.refresh()
    assert not refused.trusted and refused.lookup(0x1000) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_refused_file_growing_is_not_reopened(map_path, monkeypatch):
    map_path.write_text("1000 10 x\n")
    os.chown(str(map_path), OTHER_UID, OTHER_UID)
    pm = PerfMap(str(map_path), 1000)
    assert not pm.trusted
    with open(str(map_path), "a") as f:
        f.write("2000 10 more\n")  # growth alone cannot earn trust
    monkeypatch.setattr(os, "open", None)  # any reopen would now fail loudly
    assert pm.refresh() is False
    assert not pm.trusted and pm.lookup(0x2000) is None


def test_growth_and_partial_lines(map_path):
    map_path.write_text("1000 10 one\n")
    pm = PerfMap(str(map_path), ME)
    assert pm.lookup(0x1000) == "one"
    with open(str(map_path), "a") as f:
        f.write("2000 10 two with spaces\n3000 10 thr")  # a line written in two halves
    assert pm.refresh() is True
    assert pm.lookup(0x2005) == "two with spaces"
    assert pm.lookup(0x3000) is None  # incomplete: not parsed yet
    with open(str(map_path), "a") as f:
        f.write("ee half\n")
    assert pm.refresh() is True
    assert pm.lookup(0x3000) == "three half"
    assert pm.lookup(0x1000) == "one"
    assert len(pm) == 3 and pm.skipped == 0


def test_unchanged_refresh_is_one_lstat(map_path, monkeypatch):
    map_path.write_text("1000 10 one\n")
    pm = PerfMap(str(map_path), ME)
    calls = []
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p: calls.append(p) or real_lstat(p))
    monkeypatch.setattr(os, "open", None)
    monkeypatch.setattr(os, "fstat", None)
    assert pm.refresh() is False
    assert calls == [str(map_path)]


def test_growth_with_overlap_later_wins_after_refresh(map_path):
    map_path.write_text("1000 100 old\n")
    pm = PerfMap(str(map_path), ME)
    assert pm.lookup(0x1050) == "old"
    with open(str(map_path), "a") as f:
        f.write("1040 20 reused\n5000 10 far\n")
    pm.refresh()
    assert pm.lookup(0x1050) == "reused"
    assert pm.lookup(0x1060) == "old"
    assert pm.lookup(0x5000) == "far"


def test_shrunk_or_replaced_file_is_reread(tmp_path, map_path):
    map_path.write_text("1000 10 one\n2000 10 two\n")
    pm = PerfMap(str(map_path), ME)
    map_path.write_text("3000 10 x\n")  # truncated and rewritten: smaller
    pm.refresh()
    assert pm.lookup(0x1000) is None and pm.lookup(0x3000) == "x"
    replacement = tmp_path / "new.map"
    replacement.write_text("4000 10 y\n")  # same size, different inode
    os.replace(str(replacement), str(map_path))
    assert pm.refresh() is True
    assert pm.lookup(0x3000) is None and pm.lookup(0x4000) == "y"


def test_deleted_file_keeps_symbols(map_path):
    map_path.write_text("1000 10 one\n")
    pm = PerfMap(str(map_path), ME)
    map_path.unlink()
    assert pm.refresh() is False
    assert not pm.exists and pm.lookup(0x1000) == "one"


def test_path_through_proc_pid_root(map_path):
    map_path.write_text("1000 10 via proc root\n")
    pm = PerfMap("/proc/%d/root%s" % (os.getpid(), map_path), ME)
    assert pm.trusted and pm.lookup(0x1000) == "via proc root"


def test_unterminated_line_is_bounded_and_counted(map_path):
    """A line that never ends is not kept (and re-copied at every refresh)
    beyond MAX_LINE_BYTES; it is dropped up to its newline and counted."""
    limit = perfmap_mod.MAX_LINE_BYTES
    map_path.write_bytes(b"1000 10 before\n2000 10 " + b"x" * (limit + 10))
    pm = PerfMap(str(map_path), ME)
    assert len(pm) == 1 and pm.skipped == 1
    with open(map_path, "ab") as f:
        f.write(b"y" * 100)  # still the same long line
    pm.refresh()
    with open(map_path, "ab") as f:
        f.write(b"z\n3000 10 after\n")
    pm.refresh()
    assert (pm.lookup(0x1000), pm.lookup(0x2000), pm.lookup(0x3000)) == ("before", None, "after")
    assert pm.skipped == 1 and len(pm) == 2


def test_values_past_u64_are_skipped(map_path):
    map_path.write_bytes(b"1" + b"0" * 16 + b" 10 too_high\n1000 " + b"f" * 17 + b" too_big\n"
                         b"-1000 10 negative\n2000 10 fine\n")
    pm = PerfMap(str(map_path), ME)
    assert pm.skipped == 3 and len(pm) == 1 and pm.lookup(0x2005) == "fine"
