"""JIT symbol files (/tmp/perf-PID.map), read incrementally during a capture.

JIT runtimes (V8/node --perf-basic-prof, the JVM with perf-map-agent, .NET,
CPython 3.12 -X perf, LuaJIT...) write the code they generate to this file,
as described in the kernel's tools/perf/Documentation/jit-interface.txt::

    START SIZE symbolname

one entry per line, START and SIZE hex numbers without 0x, symbolname the
rest of the line (it may contain spaces).  For example::

    7f1c2a401000 2c LazyCompile:~main /app/index.js:1
    7f1c2a401040 80 Builtin:ArgumentsAdaptorTrampoline

The file only grows while the runtime lives, and code memory gets reused, so
a later entry wins over an earlier one covering the same addresses.

The file is written by the profiled process, i.e. by possibly another user,
and we may run as root: it is opened with O_NOFOLLOW and accepted only when
it is a regular file owned by the process's uid or by root.  (Only the last
path component is protected from symlinks; the directories are the caller's
choice, e.g. /proc/PID/root/tmp for a process in a container.)
"""

from __future__ import annotations

import bisect
import heapq
import os
import stat
from typing import List, Optional, Tuple

#: Owner that is always trusted besides the profiled process's own uid.
ROOT_UID = 0

#: O_NONBLOCK: opening a FIFO planted at the path must not hang the capture
#: (fstat then refuses it as not a regular file).
_OPEN_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
               | getattr(os, "O_CLOEXEC", 0))

_NEWLINE = b"\n"
_FIELDS_BEFORE_NAME = 2

#: Longest line kept while waiting for its newline (JIT names with URLs run
#: to a few KiB).  A longer one is dropped, up to its newline, and counted:
#: an unterminated line would otherwise be copied again at every refresh.
MAX_LINE_BYTES = 1 << 16

#: Bytes read per refresh: a huge map is taken in over several refreshes.
MAX_READ_BYTES = 64 << 20

#: START and SIZE are u64s (perf reads them with strtoull).
_U64_LIMIT = 1 << 64

# Identity of the file behind the path: a change means replaced/chown'd/chmod'd.
_Ident = Tuple[int, int, int, int]


def _ident(st: os.stat_result) -> _Ident:
    return (st.st_dev, st.st_ino, st.st_uid, st.st_mode)


class PerfMap:
    """Symbols of one process's perf map, refreshed as the file grows.

    After construction (which reads the file once) and every ``refresh``:

    * ``exists`` -- the path named a file; a missing file is normal (the
      process is not a JIT, or has not written yet) and is not an error;
    * ``trusted`` -- False when the file was refused (symlink, not a regular
      file, foreign owner); ``reason`` says why and there are no symbols;
    * ``skipped`` -- malformed lines ignored so far.

    A file that disappears keeps the symbols already read: a runtime may
    delete its map at exit, after the samples that need it were taken.
    """

    __slots__ = ("path", "expected_uid", "exists", "trusted", "reason", "skipped",
                 "_ident", "_offset", "_partial", "_discarding", "_count",
                 "_starts", "_ends", "_names")

    def __init__(self, path: str, expected_uid: int) -> None:
        self.path = path
        self.expected_uid = expected_uid
        self.exists = False
        self.trusted = True
        self.reason = ""
        self.skipped = 0
        self._ident: Optional[_Ident] = None
        self._clear()
        self.refresh()

    def _clear(self) -> None:
        """Forget everything read, to start over on a replaced file."""
        self._offset = 0          # bytes consumed, including self._partial
        self._partial = b""       # an unterminated last line, for next time
        self._discarding = False  # inside an over-long line, until its newline
        self._count = 0           # entries read (overlapped ones included)
        # The flattened, non-overlapping view lookups bisect, updated entry
        # by entry as lines are read (a later entry wins over the addresses
        # it covers); the raw entries are not kept.
        self._starts: List[int] = []
        self._ends: List[int] = []
        self._names: List[str] = []

    # ---- reading -----------------------------------------------------------

    def refresh(self) -> bool:
        """Read what was appended since last time; True if entries were added.

        Nothing changed costs one lstat: same file (device, inode, owner,
        mode) and same size.  A refused file is checked again only once its
        identity changes (growth alone cannot make it trustworthy).  A file that shrank or was replaced is read again
        from the start.  (lstat, not fstat on a kept fd: an fd would never
        show the path being replaced, and keeping none open spares fds.)
        """
        try:
            st = os.lstat(self.path)
        except OSError:
            self.exists = False
            return False
        self.exists = True
        ident = _ident(st)
        if ident == self._ident and (st.st_size == self._offset or not self.trusted):
            return False  # unchanged, or refused and still the same file
        if ident != self._ident or st.st_size < self._offset:
            self._clear()
        self._ident = ident
        if stat.S_ISLNK(st.st_mode):
            return self._refuse("%s is a symbolic link" % self.path)
        return self._read_new()

    def _refuse(self, reason: str) -> bool:
        self.trusted = False
        self.reason = "perf map refused: " + reason
        self._clear()
        return False

    def _trust_problem(self, st: os.stat_result) -> Optional[str]:
        """Why the opened file must not be used, or None when it may."""
        if not stat.S_ISREG(st.st_mode):
            return "%s is not a regular file" % self.path
        if st.st_uid not in (self.expected_uid, ROOT_UID):
            return "%s is owned by uid %d, not by the process's uid %d or root" % (
                self.path, st.st_uid, self.expected_uid)
        return None

    def _read_new(self) -> bool:
        """Open safely, check trust on the opened file, parse new bytes."""
        try:
            fd = os.open(self.path, _OPEN_FLAGS)
        except FileNotFoundError:
            self.exists = False
            return False
        except OSError as e:  # ELOOP: it became a symlink since the lstat
            return self._refuse("cannot open %s: %s" % (self.path, e.strerror))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            problem = self._trust_problem(st)
            if problem is not None:
                return self._refuse(problem)
            if _ident(st) != self._ident or st.st_size < self._offset:
                self._clear()  # swapped between lstat and open
            self._ident = _ident(st)
            self.trusted, self.reason = True, ""
            f.seek(self._offset)
            data = f.read(MAX_READ_BYTES)
        self._offset += len(data)
        return self._parse(data)

    def _parse(self, data: bytes) -> bool:
        """Parse the complete lines of partial + data; keep the remainder."""
        lines = (self._partial + data).split(_NEWLINE)
        self._partial = lines.pop()
        if self._discarding and lines:
            lines.pop(0)  # the end of the over-long line
            self._discarding = False
        if len(self._partial) > MAX_LINE_BYTES:
            if not self._discarding:
                self.skipped += 1
            self._partial = b""
            self._discarding = True
        before = self._count
        for line in lines:
            self._parse_line(line)
        return self._count > before

    def _parse_line(self, line: bytes) -> None:
        fields = line.split(None, _FIELDS_BEFORE_NAME)
        if len(fields) <= _FIELDS_BEFORE_NAME:
            if fields:
                self.skipped += 1
            return
        try:
            start = int(fields[0], 16)
            size = int(fields[1], 16)
        except ValueError:
            self.skipped += 1
            return
        name = fields[2].rstrip().decode("utf-8", "replace")
        if not (0 <= start < _U64_LIMIT and 0 <= size < _U64_LIMIT) or not name:
            self.skipped += 1
        elif size:  # an empty range covers no address: nothing to keep
            self._count += 1
            self._add(start, start + size, name)

    # ---- lookups -----------------------------------------------------------

    def __len__(self) -> int:
        """Entries read (overlapped ones included)."""
        return self._count

    def pieces(self) -> int:
        """Disjoint ranges held (what the map costs in memory)."""
        return len(self._starts)

    def lookup(self, addr: int) -> Optional[str]:
        """The JIT symbol containing ``addr``, or None (per-frame hot path:
        parallel sorted arrays + bisect, no object created)."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return self._names[i]
        return None

    def _add(self, start: int, end: int, name: str) -> None:
        """Lay one new entry over the view: it wins over what it overlaps.

        Runtimes mostly emit code at increasing addresses: such an entry is
        appended.  Otherwise the pieces it overlaps are replaced by it (and
        the uncovered ends of the first and last), in one slice assignment
        per array: a JIT that reuses addresses costs a bisect and a memmove
        per entry, not a rebuild of the whole map (which was quadratic).
        """
        starts, ends, names = self._starts, self._ends, self._names
        if not ends or start >= ends[-1]:
            starts.append(start)
            ends.append(end)
            names.append(name)
            return
        lo = bisect.bisect_right(starts, start) - 1
        if lo < 0 or ends[lo] <= start:
            lo += 1
        hi = bisect.bisect_left(starts, end)  # pieces [lo, hi) start before end
        new_s, new_e, new_n = [start], [end], [name]
        if lo < hi:
            if starts[lo] < start:  # the left end of the first piece stays
                new_s.insert(0, starts[lo])
                new_e.insert(0, start)
                new_n.insert(0, names[lo])
            if ends[hi - 1] > end:  # the right end of the last piece stays
                new_s.append(end)
                new_e.append(ends[hi - 1])
                new_n.append(names[hi - 1])
        starts[lo:hi] = new_s
        ends[lo:hi] = new_e
        names[lo:hi] = new_n


def _flatten_later_wins(starts: List[int], ends: List[int], names: List[str]
                        ) -> Tuple[List[int], List[int], List[str]]:
    """Disjoint (starts, ends, names) where each address shows the latest
    entry covering it; the entries' list index is their age.  (The
    reference for :meth:`PerfMap._add`, which tests compare it with.)

    A sweep over the sorted boundaries with a heap of the entries open at
    each point, newest on top (expired ones are dropped lazily when they
    surface): O(n log n) however the entries overlap.
    """
    order = sorted(range(len(starts)), key=starts.__getitem__)
    bounds = sorted(set(starts).union(ends))
    out_s: List[int] = []
    out_e: List[int] = []
    out_n: List[str] = []
    heap: List[Tuple[int, int]] = []  # (-index, end)
    j, last = 0, -1
    for k in range(len(bounds) - 1):
        x = bounds[k]
        while j < len(order) and starts[order[j]] <= x:
            heapq.heappush(heap, (-order[j], ends[order[j]]))
            j += 1
        while heap and heap[0][1] <= x:
            heapq.heappop(heap)
        if not heap:
            last = -1
            continue
        winner = -heap[0][0]
        if winner == last:
            out_e[-1] = bounds[k + 1]
        else:
            out_s.append(x)
            out_e.append(bounds[k + 1])
            out_n.append(names[winner])
            last = winner
    return out_s, out_e, out_n
