"""Process memory mappings: /proc/PID/maps and the mmap events of a capture.

A sampled user address means nothing until it is placed in the mapping that
covered it *at the time of the sample*: which file, at which file offset.
The capture starts from a snapshot of /proc/PID/maps and then applies the
mmap events the kernel reports, so a library loaded mid-capture (or JIT code
mapped over an old region) is still symbolized against the right file.

Line format read (proc(5), "/proc/pid/maps")::

    address           perms offset  dev   inode       pathname
    00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
    7f3e6803b000-7f3e6805d000 rw-p 00000000 00:00 0
    7ffd1b9e3000-7ffd1b9e5000 r-xp 00000000 00:00 0   [vdso]

``address`` is ``start-end`` in hex, ``offset`` is hex, ``dev`` is
``major:minor`` in hex, ``inode`` is decimal.  ``pathname`` is empty for an
anonymous mapping, a pseudo name in brackets (``[heap]``, ``[stack]``,
``[vdso]``, ``[anon:NAME]``...), or a path, which may contain spaces and ends
in `` (deleted)`` when the file was unlinked after it was mapped.  The kernel
writes a newline inside a path as ``\\012`` (and does not escape backslashes,
so that cannot be undone reliably); such a path is kept as written.

Numbers are accepted only as the kernel prints them: plain hex digits (no
sign, ``0x``, ``_`` or non-ASCII digits, which ``int()`` would take) of at
most 16 digits for addresses and offsets, a decimal inode of at most 20
digits; anything else makes the line malformed (skipped and counted).
"""

from __future__ import annotations

import bisect
from typing import Iterable, List, Optional, Tuple, Union

from perfagent.records import NamedTuple

#: ``pathname`` suffix the kernel appends (d_path) when the file was unlinked.
DELETED_SUFFIX = " (deleted)"

#: Number of whitespace-separated fields before ``pathname``.
MAPS_FIXED_FIELDS = 5

#: Index of the execute bit in the ``perms`` string ("rwxp").
PERMS_EXEC_INDEX = 2

#: Widest numbers the kernel prints: u64 in hex, device numbers (12-bit
#: major, 20-bit minor, %02x), u64 inode in decimal.
MAX_HEX_DIGITS = 16
MAX_DEV_DIGITS = 8
MAX_INODE_DIGITS = 20

_HEX_CHARS = frozenset("0123456789abcdefABCDEF")
_DEC_CHARS = frozenset("0123456789")

#: ``perms`` given to a mapping that came from an mmap event, which only tells
#: us whether it was executable.  Unknown permissions are written as "-".
EVENT_PERMS_EXEC = "--x-"
EVENT_PERMS_NOEXEC = "----"


class MapEntry(NamedTuple):
    """One mapping, as a /proc/PID/maps line describes it.

    ``path`` is "" for an anonymous mapping and keeps pseudo names such as
    "[vdso]" and "[heap]"; ``deleted`` is True when the kernel marked the path
    " (deleted)" (the suffix itself is removed from ``path``).  ``pgoff`` is
    the file offset, in bytes, that ``start`` maps.
    """

    start: int
    end: int
    perms: str
    pgoff: int
    dev_major: int
    dev_minor: int
    inode: int
    path: str
    deleted: bool = False

    @property
    def is_exec(self) -> bool:
        """True when the mapping may hold code (the only ones samples hit)."""
        return len(self.perms) > PERMS_EXEC_INDEX and self.perms[PERMS_EXEC_INDEX] == "x"

    @property
    def size(self) -> int:
        return self.end - self.start


def split_deleted(path: str) -> Tuple[str, bool]:
    """Remove the kernel's " (deleted)" marker, returning (path, deleted).

    The file is gone from the directory tree but its mapping (and, via
    /proc/PID/map_files or the build id, often its symbols) is still there,
    so the caller wants the original name plus the fact.
    """
    if path.endswith(DELETED_SUFFIX):
        return path[: -len(DELETED_SUFFIX)], True
    return path, False


def _number(text: str, digits: frozenset, max_digits: int, base: int) -> int:
    """``text`` as the kernel prints a number, or ValueError."""
    if not 0 < len(text) <= max_digits or not digits.issuperset(text):
        raise ValueError("bad number %r" % text[:40])
    return int(text, base)


def _parse_line(line: str) -> MapEntry:
    """Parse one maps line; ValueError/IndexError on a malformed one.

    ``split(None, 5)`` keeps the pathname whole: spaces inside it (and a
    trailing one) survive, only the column padding before it is dropped.
    """
    fields = line.split(None, MAPS_FIXED_FIELDS)
    address, perms, offset, dev, inode = fields[:MAPS_FIXED_FIELDS]
    path = fields[MAPS_FIXED_FIELDS] if len(fields) > MAPS_FIXED_FIELDS else ""
    start_s, end_s = address.split("-")
    major_s, minor_s = dev.split(":")
    path, deleted = split_deleted(path)
    start = _number(start_s, _HEX_CHARS, MAX_HEX_DIGITS, 16)
    end = _number(end_s, _HEX_CHARS, MAX_HEX_DIGITS, 16)
    if end < start:
        raise ValueError("end before start")
    if len(perms) != 4:
        raise ValueError("bad perms %r" % perms[:8])
    return MapEntry(start, end, perms, _number(offset, _HEX_CHARS, MAX_HEX_DIGITS, 16),
                    _number(major_s, _HEX_CHARS, MAX_DEV_DIGITS, 16),
                    _number(minor_s, _HEX_CHARS, MAX_DEV_DIGITS, 16),
                    _number(inode, _DEC_CHARS, MAX_INODE_DIGITS, 10), path, deleted)


def parse_maps_counted(text: str) -> Tuple[List[MapEntry], int]:
    """Parse maps text; return (entries, number of malformed lines skipped).

    A reader of a system file must never crash the capture, so a line that
    does not parse is skipped; the count lets the caller report it.
    """
    entries: List[MapEntry] = []
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entries.append(_parse_line(line))
        except (ValueError, IndexError):
            skipped += 1
    return entries, skipped


def parse_maps(text: str) -> List[MapEntry]:
    """Parse the text of a /proc/PID/maps file (malformed lines are skipped)."""
    return parse_maps_counted(text)[0]


def read_maps(pid: Union[int, str]) -> List[MapEntry]:
    """Read and parse /proc/PID/maps (``pid`` may also be "self").

    Raises what the kernel reports, for the caller to turn into a message:
    FileNotFoundError when there is no such process, PermissionError when we
    may not inspect it (ptrace access check), ProcessLookupError when it
    exits while being read.  A process that is already a zombie has an empty
    maps file and yields [].  Bytes that are not UTF-8 are kept via
    surrogateescape so ``os.fsencode(path)`` gives back the real file name.
    """
    # One bounded read (perfagent.target.procfs): the kernel builds the text
    # under the mmap lock page by page, and fewer reads means fewer chances
    # to see the map change underneath.
    from perfagent.target.procfs import maps_bytes
    return parse_maps(maps_bytes(pid).decode("utf-8", "surrogateescape"))


class AddressSpace:
    """The mappings of one process, kept current as mmap events arrive.

    Mappings never overlap, like the kernel's VMAs: a new mapping replaces
    whatever it covers, splitting older ones that stick out on either side.
    Lookups run once per sampled frame, so the mappings are kept as parallel
    lists sorted by start and found with ``bisect`` (no object creation per
    lookup); the rarer ``add`` pays for keeping them sorted.
    """

    __slots__ = ("_starts", "_ends", "_entries")

    def __init__(self, entries: Iterable[MapEntry] = ()) -> None:
        self._starts: List[int] = []
        self._ends: List[int] = []
        self._entries: List[MapEntry] = []
        for entry in sorted(entries, key=lambda e: e.start):
            self.add_entry(entry)

    @classmethod
    def from_pid(cls, pid: Union[int, str]) -> "AddressSpace":
        """Snapshot a live process; raises like ``read_maps``."""
        return cls(read_maps(pid))

    def fork_copy(self) -> "AddressSpace":
        """The child's address space at fork: a copy of ours.

        Entries are immutable tuples, so only the lists are copied.
        """
        child = AddressSpace()
        child._starts = self._starts[:]
        child._ends = self._ends[:]
        child._entries = self._entries[:]
        return child

    def add(self, start: int, end: int, pgoff: int, path: str, prot_exec: bool,
            dev_major: int = 0, dev_minor: int = 0, inode: int = 0) -> MapEntry:
        """Record an mmap event's mapping [start, end); return the new entry.

        ``path`` may carry the kernel's " (deleted)" suffix (mmap event file
        names come from the same d_path as /proc).  The event only tells
        whether the mapping is executable, so ``perms`` is "--x-" or "----".
        """
        path, deleted = split_deleted(path)
        perms = EVENT_PERMS_EXEC if prot_exec else EVENT_PERMS_NOEXEC
        entry = MapEntry(start, end, perms, pgoff, dev_major, dev_minor, inode, path, deleted)
        self.add_entry(entry)
        return entry

    def add_entry(self, entry: MapEntry) -> None:
        """Insert ``entry``, replacing the parts of older mappings it covers.

        Like the kernel's split_vma, the piece of an old mapping left above
        the new one keeps mapping the same file bytes, so its ``pgoff``
        advances by the length cut off its front.  An empty mapping is ignored.
        """
        start, end = entry.start, entry.end
        if end <= start:
            return
        # Mappings are disjoint and sorted, so ends are sorted too: the
        # overlapping ones are the contiguous run [lo, hi).
        lo = bisect.bisect_right(self._ends, start)
        hi = bisect.bisect_left(self._starts, end)
        pieces: List[MapEntry] = []
        if lo < hi and self._entries[lo].start < start:
            old = self._entries[lo]
            pieces.append(old._replace(end=start))
        pieces.append(entry)
        if lo < hi and self._entries[hi - 1].end > end:
            old = self._entries[hi - 1]
            pieces.append(old._replace(start=end, pgoff=old.pgoff + (end - old.start)))
        self._entries[lo:hi] = pieces
        self._starts[lo:hi] = [p.start for p in pieces]
        self._ends[lo:hi] = [p.end for p in pieces]

    def find(self, addr: int) -> Optional[MapEntry]:
        """The mapping containing ``addr``, or None (per-frame hot path)."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return self._entries[i]
        return None

    def entries(self) -> List[MapEntry]:
        """All mappings, sorted by start (a copy)."""
        return self._entries[:]

    def __len__(self) -> int:
        return len(self._entries)
