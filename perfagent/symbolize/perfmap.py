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
                 "_ident", "_offset", "_partial", "_discarding",
                 "_raw_starts", "_raw_ends", "_raw_names", "_built",
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
        # Every entry in file order (index = age, later wins) ...
        self._raw_starts: List[int] = []
        self._raw_ends: List[int] = []
        self._raw_names: List[str] = []
        # ... and the flattened, non-overlapping view lookups bisect, built
        # from the first self._built raw entries.
        self._built = 0
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
        before = len(self._raw_starts)
        for line in lines:
            self._parse_line(line)
        return len(self._raw_starts) > before

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
            self._raw_starts.append(start)
            self._raw_ends.append(start + size)
            self._raw_names.append(name)

    # ---- lookups -----------------------------------------------------------

    def __len__(self) -> int:
        """Entries read (overlapped ones included)."""
        return len(self._raw_starts)

    def lookup(self, addr: int) -> Optional[str]:
        """The JIT symbol containing ``addr``, or None (per-frame hot path).

        Parallel sorted arrays + bisect, rebuilt only when a refresh added
        entries since the last lookup, so a lookup creates no objects.
        """
        if self._built != len(self._raw_starts):
            self._flatten()
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return self._names[i]
        return None

    def _flatten(self) -> None:
        """Bring the lookup arrays up to date with the raw entries.

        Runtimes mostly emit code at increasing addresses, so new entries
        that all lie above what we have are appended; anything else (an
        overlap, an entry below) rebuilds the whole view.
        """
        if not self._append_new():
            self._starts, self._ends, self._names = _flatten_later_wins(
                self._raw_starts, self._raw_ends, self._raw_names)
        self._built = len(self._raw_starts)

    def _append_new(self) -> bool:
        """Append the new entries if each starts at or after the previous end."""
        lo, n = self._built, len(self._raw_starts)
        prev_end = self._ends[-1] if self._ends else -1
        for i in range(lo, n):
            if self._raw_starts[i] < prev_end:
                return False
            prev_end = self._raw_ends[i]
        self._starts.extend(self._raw_starts[lo:n])
        self._ends.extend(self._raw_ends[lo:n])
        self._names.extend(self._raw_names[lo:n])
        return True


def _flatten_later_wins(starts: List[int], ends: List[int], names: List[str]
                        ) -> Tuple[List[int], List[int], List[str]]:
    """Disjoint (starts, ends, names) where each address shows the latest
    entry covering it; the entries' list index is their age.

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
