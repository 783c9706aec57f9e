"""Tests for perfagent.symbolize.procmaps: parsing /proc/PID/maps and the
AddressSpace kept current from mmap events."""

import mmap
import os
import ctypes
from pathlib import Path

import pytest

from perfagent.symbolize.procmaps import (
    AddressSpace, MapEntry, parse_maps, parse_maps_counted, read_maps)

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_text(name: str) -> str:
    """A fixture without its '#' annotation lines."""
    lines = (FIXTURES / name).read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("#"))


@pytest.fixture(scope="module")
def sample():
    return {e.start: e for e in parse_maps(fixture_text("maps_sample.txt"))}


def test_sample_count_and_fields(sample):
    assert len(sample) == 13
    text = sample[0x5651B20CA000]
    assert text == MapEntry(0x5651B20CA000, 0x5651B20CF000, "r-xp", 0x2000,
                            0xFE, 0x00, 260131, "/usr/bin/cat", False)
    assert text.is_exec and text.size == 0x5000
    assert not sample[0x5651B20C8000].is_exec


def test_anonymous_and_pseudo_names(sample):
    anon = sample[0x7F3E6803B000]
    assert anon.path == "" and anon.inode == 0 and not anon.deleted
    assert sample[0x5651E6EC6000].path == "[heap]"
    assert sample[0x7F3E682B3000].path == "[vdso]" and sample[0x7F3E682B3000].is_exec
    assert sample[0x7FFD1B9C2000].path == "[stack]"
    assert sample[0x7F3E68300000].path == "[anon:my arena]"
    assert sample[0xFFFFFFFFFF600000].path == "[vsyscall]"


def test_paths_with_spaces_are_kept_whole(sample):
    assert sample[0x7F3E68100000].path == "/opt/My App/lib/libfoo bar.so"
    assert sample[0x7F3E68100000].dev_major == 0x08 and sample[0x7F3E68100000].dev_minor == 0x11
    assert sample[0x7F3E68180000].path == "/tmp/trailing "


def test_deleted_suffix_becomes_flag(sample):
    gone = sample[0x7F3E680E6000]
    assert gone.path == "/usr/lib/libgone.so" and gone.deleted
    assert (gone.dev_major, gone.dev_minor) == (0x103, 0x02)
    memfd = sample[0x7F3E68200000]
    assert memfd.path == "/memfd:jit-code" and memfd.deleted


def test_malformed_lines_are_skipped_and_counted():
    entries, skipped = parse_maps_counted(fixture_text("maps_malformed.txt"))
    assert skipped == 5
    assert [e.path for e in entries] == ["/usr/bin/dbus-daemon", "", "/usr/bin/dbus-daemon"]
    assert parse_maps("") == []


# ---- AddressSpace ---------------------------------------------------------

def space(*ranges):
    """An AddressSpace of file mappings named by their (start, end, name)."""
    return AddressSpace(MapEntry(s, e, "r-xp", 0, 8, 1, 100, name) for s, e, name in ranges)


def layout(asp):
    return [(e.start, e.end, e.path, e.pgoff) for e in asp.entries()]


def test_find_boundaries():
    asp = space((0x1000, 0x2000, "a"), (0x3000, 0x4000, "b"))
    assert asp.find(0xFFF) is None
    assert asp.find(0x1000).path == "a"
    assert asp.find(0x1FFF).path == "a"
    assert asp.find(0x2000) is None
    assert asp.find(0x3ABC).path == "b"
    assert asp.find(0x4000) is None
    assert AddressSpace().find(0x1000) is None


def test_add_inside_splits_old_mapping_like_the_kernel():
    asp = space((0x1000, 0x5000, "old"))
    new = asp.add(0x2000, 0x3000, 0x7000, "/new.so", True, 8, 2, 200)
    assert new.perms == "--x-" and new.is_exec
    # The upper remainder keeps mapping the same file bytes: pgoff advances.
    assert layout(asp) == [(0x1000, 0x2000, "old", 0), (0x2000, 0x3000, "/new.so", 0x7000),
                           (0x3000, 0x5000, "old", 0x2000)]
    assert asp.find(0x2FFF).path == "/new.so"
    assert asp.find(0x3000).path == "old"


def test_add_over_several_replaces_and_trims_both_ends():
    asp = space((0x1000, 0x2000, "a"), (0x2000, 0x3000, "b"), (0x3000, 0x4000, "c"),
                (0x5000, 0x6000, "d"))
    asp.add(0x1800, 0x3800, 0, "n", False)
    assert layout(asp) == [(0x1000, 0x1800, "a", 0), (0x1800, 0x3800, "n", 0),
                           (0x3800, 0x4000, "c", 0x800), (0x5000, 0x6000, "d", 0)]
    assert not asp.find(0x2000).is_exec


def test_add_exact_cover_replaces():
    asp = space((0x1000, 0x2000, "a"), (0x2000, 0x3000, "b"))
    asp.add(0x1000, 0x3000, 0, "n", True)
    assert layout(asp) == [(0x1000, 0x3000, "n", 0)]


def test_add_adjacent_and_in_gap_leaves_others_alone():
    asp = space((0x1000, 0x2000, "a"), (0x4000, 0x5000, "b"))
    asp.add(0x2000, 0x4000, 0, "gap", True)
    asp.add(0x0, 0x1000, 0, "low", True)
    asp.add(0x5000, 0x6000, 0, "high", True)
    assert [p for _, _, p, _ in layout(asp)] == ["low", "a", "gap", "b", "high"]
    asp.add(0x8000, 0x8000, 0, "empty", True)
    assert len(asp) == 5


def test_add_strips_deleted_suffix():
    asp = AddressSpace()
    entry = asp.add(0x1000, 0x2000, 0, "/tmp/x.so (deleted)", True)
    assert entry.path == "/tmp/x.so" and entry.deleted
    assert asp.find(0x1000) is entry


def test_fork_copy_is_independent():
    parent = space((0x1000, 0x2000, "a"))
    child = parent.fork_copy()
    child.add(0x1000, 0x2000, 0, "exec'd", True)
    parent.add(0x3000, 0x4000, 0, "parent only", True)
    assert parent.find(0x1000).path == "a"
    assert child.find(0x1000).path == "exec'd"
    assert child.find(0x3000) is None


def test_constructor_accepts_unsorted_entries():
    asp = space((0x3000, 0x4000, "b"), (0x1000, 0x2000, "a"))
    assert [p for _, _, p, _ in layout(asp)] == ["a", "b"]


# ---- the real thing ---------------------------------------------------------

def test_read_maps_self_finds_our_own_code_and_data():
    entries = read_maps(os.getpid())
    assert entries and all(a.end <= b.start for a, b in zip(entries, entries[1:]))
    asp = AddressSpace.from_pid("self")
    # A libc function pointer lies in an executable file mapping of libc.
    libc = ctypes.CDLL(None)
    addr = ctypes.cast(libc.getpid, ctypes.c_void_p).value
    entry = asp.find(addr)
    assert entry is not None and entry.is_exec and "libc" in entry.path
    # A fresh private anonymous mmap is an anonymous mapping (a shared one
    # would show as "/dev/zero (deleted)").
    with mmap.mmap(-1, 4 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE) as m:
        buf = (ctypes.c_char * 1).from_buffer(m)
        where = ctypes.addressof(buf)
        found = AddressSpace.from_pid("self").find(where)
        del buf
    assert found is not None and found.path == "" and found.inode == 0
    assert any(e.path == "[stack]" for e in entries)


def test_read_maps_path_with_space_and_deleted(tmp_path):
    victim = tmp_path / "dir with space" / "mapped file.bin"
    victim.parent.mkdir()
    victim.write_bytes(b"\0" * mmap.PAGESIZE)
    inode = victim.stat().st_ino
    with open(victim, "r+b") as f, mmap.mmap(f.fileno(), mmap.PAGESIZE) as m:
        buf = (ctypes.c_char * 1).from_buffer(m)
        where = ctypes.addressof(buf)
        before = AddressSpace.from_pid("self").find(where)
        victim.unlink()
        after = AddressSpace.from_pid("self").find(where)
        del buf
    assert before.path == str(victim) and not before.deleted
    assert after.path == str(victim) and after.deleted
    assert before.inode == after.inode == inode


def test_read_maps_no_such_process():
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    with pytest.raises(FileNotFoundError):
        read_maps(pid_max + 1)


def test_numbers_only_as_the_kernel_prints_them():
    """int() would take signs, 0x, underscores, non-ASCII digits and numbers
    of any length; the kernel prints none of those (issue 11)."""
    good = "00400000-00452000 r-xp 00001000 08:02 173521      /usr/bin/x"
    bad = [
        "-0400000-00452000 r-xp 00001000 08:02 173521 /a",       # sign
        "0x400000-00452000 r-xp 00001000 08:02 173521 /a",       # 0x
        "00400000-00452_00 r-xp 00001000 08:02 173521 /a",       # underscore
        "00400000-00452000 r-xp -0001000 08:02 173521 /a",       # negative offset
        "00400000-00452000 r-xp 00001000 08:02 -173521 /a",      # negative inode
        "00400000-00452000 r-xp 00001000 08:02 \u0663\u0663 /a",  # Arabic-Indic digits
        "00400000-00452000 r-xp 00001000 08:02 " + "9" * 5000 + " /a",
        "00400000-" + "f" * 17 + " r-xp 00001000 08:02 1 /a",     # more than 64 bits
        "00400000-00452000 r-xp 00001000 1_0:02 1 /a",
        "00400000-00452000 r-x 00001000 08:02 1 /a",              # perms not 4 letters
    ]
    entries, skipped = parse_maps_counted("\n".join([good] + bad + [good]))
    assert skipped == len(bad)
    assert [(e.start, e.pgoff, e.inode) for e in entries] == [(0x400000, 0x1000, 173521)] * 2
