"""User space's half of the in-kernel DWARF walk (perfagent.stackprog.kunwind).

:class:`KernelTables` fills the walk's maps: a process is loaded lazily,
the first time the kernel could not walk one of its stacks (the walk falls
back, the sample arrives as a record, and its pid is handed to
:meth:`KernelTables.refresh`), and reloaded when its executable mappings
changed.  Loading a process compiles the compact table
(perfagent.unwind.compact) of each binary it maps that is not loaded yet --
once per binary for the whole capture, shared by every process (the same
CFICache the user-space walker uses) -- and writes the process's sorted
mapping list.  What cannot be loaded (tables full, a binary refused) is
marked so the kernel hands its samples to the user-space walker.

:class:`KUnwindSampler` is the on-CPU engine: the KUNWIND stack program on
every CPU's cpu-clock event; its counts and stores drain like
InKernelSampler's and its fallback records like RecordSampler's.
"""

from __future__ import annotations

import bisect
import os
import time
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Set, Tuple

from perfagent.bpf import syscall as sc
from perfagent.bpf.asm import R0, R1, R2, R3, R4, Program
from perfagent.offcpu.common import close_all
from perfagent.offcpu.inkernel import RecordSampler
from perfagent.stackprog import kunwind as KU
from perfagent.stackprog.accounting import STAT_KUNWIND
from perfagent.stackprog.program import KUNWIND, Maps
from perfagent.unwind import compact as K

# Work one drain cycle may spend loading processes (the rest waits for the
# next cycle; their samples meanwhile go to the user-space walker).
# A third of a drain interval: loading must not slow the drain loop down
# (measured with 300 processes of 15 ms each: at 0.1 s per cycle the loop
# made 40 drains where it should make 60, and the agent's CPU starved the
# very processes it sampled).
LOAD_SECONDS_PER_CYCLE = 0.03
# ... or this share of the time since the last load, when drain cycles run
# long (a loaded machine, thousands of fallbacks to walk: every cycle spent
# walking the stacks of a process not loaded makes the next one longer;
# measured on a 2-core VM at load 5, a 10 s capture made two loads).
LOAD_SHARE = 0.3
LOAD_MAX_SECONDS = 1.0
# A process is loaded once this many of its stacks fell back and its first
# fallback is LOAD_MIN_AGE old (or at once when every binary it maps is
# compiled already): a process sampled less, or living shorter, is not
# worth compiling tables for -- the user-space walker has its stacks.
LOAD_AFTER_FALLBACKS = 8
LOAD_MIN_AGE = 0.5
# ... but a process that fell back this often is loaded at the next cycle
# whatever its age: it is busy (at 999 Hz, 16 samples are 16 ms on a CPU),
# and every one of its stacks walked in user space costs the agent about
# 0.1 ms.  Waiting LOAD_MIN_AGE for the two busy targets of
# tools/bench_kunwind.py walked ~1,000 stacks in user space, a fifth of the
# agent's CPU for a 10 s capture at 999 Hz; with this and the session's
# early first drain (FIRST_WAIT) 130-170 in most runs.
LOAD_HOT_FALLBACKS = 16
# The fallback ring holds this share of RecordSampler's half second: an
# eighth of a second of every CPU's samples with whole 32 KiB copies (16 MiB
# at 999 Hz on 2 CPUs).  Its program wakes the drain loop once a quarter of
# it waits (perfagent.stackprog.capture.emit_ringbuf_output), so it need
# only outlast the wake-up and one drain cycle (the table loader spreads a
# large binary's work over cycles), not a whole wait.  The ring's pages are
# the kernel's memory, allocated and zeroed whole at creation and mapped
# whole (twice: the wrap-around) by the agent: 64 MiB cost 18 ms of CPU to
# create, map and close and 128 MB of the agent's RSS.  A record is the
# stack up to its top, mostly a few KiB, and a busy process is loaded
# within a cycle or two (LOAD_HOT_FALLBACKS); records lost to a full ring
# are counted in the summary.
FALLBACK_RING_SHARE = 4

REFUSED = -1

# Rows and table ids let go (a binary evicted, a table rebuilt) are reused
# only this long after: a program that read a mapping or table entry just
# before it was changed may still be reading the old rows.  A walk lasts
# microseconds (a BPF program runs to its end on its CPU); a quarter of a
# second is several orders of magnitude beyond it.
REUSE_AFTER = 0.25
# Binaries no loaded process maps keep their tables (loading a process
# that maps them again costs no compiling), the least recently used first
# to go: at most IDLE_BINARIES of them, and fewer when rows or table ids
# run short (a 1/FREE_RESERVE fraction of each is kept free for new ones).
IDLE_BINARIES = 64
FREE_RESERVE = 8
# After a binary found no room even with every idle one evicted, binaries
# not loaded yet are not compiled again for this long (their processes
# wait; rows come free as processes exit).
NO_ROOM_WAIT = 1.0


_supported: List[Optional[str]] = []


def kernel_walk_supported() -> Optional[str]:
    """None when this kernel can run the walk, else why not (bpf_loop is
    5.17+; the verifier is the judge).  Asked once per agent."""
    if not _supported:
        _supported.append(_probe_bpf_loop())
    return _supported[0]


def _probe_bpf_loop() -> Optional[str]:
    """Load a program shaped like the walk: bpf_loop (5.17+), a callback
    that calls bpf_loop again, and the walk's stack use at each level.
    Kernels without private BPF stacks count a program and the callbacks
    it calls within 512 bytes together; the walk needs more than that
    (its main program's slots reach OFF_UW + UW_WALK_SIZE below the frame),
    so such a kernel is told here, once, instead of failing the capture."""
    from perfagent.bpf.asm import DW, FP
    p = Program("uw_probe")
    # (label, its stack use, the callback it loops over, its return value)
    levels = (("main", -KU.OFF_UW, "step", 0),      # the walk's slots
              ("step", KU.PROBE_STEP_STACK, "search", 1),
              ("search", 8, None, 1))
    for label, stack, callback, ret in levels:
        if label != "main":
            p.label(label)
        p.st(DW, FP, -stack, 0)
        if callback is not None:
            p.mov(R1, 1)
            p.ld_func(R2, callback)
            p.mov(R3, 0).mov(R4, 0)
            p.call("loop")
        p.mov(R0, ret).exit()
    try:
        p.load(sc.BPF_PROG_TYPE_PERF_EVENT).close()
    except sc.BPFError as exc:
        first = str(exc).splitlines()[0]
        if "stack" in str(exc):
            return ("this kernel holds a BPF program and its bpf_loop callbacks to 512 bytes of "
                    "stack together, less than the walk needs (%s)" % first)
        return "bpf_loop unavailable (%s)" % first
    return None


class _OutOfTime(Exception):
    """This cycle's share of loading is spent: the rest waits for the next."""


FIRST_REBUILD_WAIT = 0.1
LAST_REBUILD_WAIT = 2.0


class _NoRoom(Exception):
    """No free rows or table id now (some may come free soon): the
    process waits, nothing is refused."""


class _Rows:
    """Free ranges of the rows array: first fit, neighbours merged when a
    range is given back (tables come and go as binaries are evicted and
    rebuilt; a table's rows are one range, as uw_table's first/count say)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: List[List[int]] = [[0, size]] if size else []   # [first, count], by first
        self.used = 0

    def take(self, n: int) -> Optional[int]:
        if n <= 0:
            return 0
        for i, (first, count) in enumerate(self.free):
            if count >= n:
                if count == n:
                    del self.free[i]
                else:
                    self.free[i] = [first + n, count - n]
                self.used += n
                return first
        return None

    def give(self, first: int, n: int) -> None:
        if n <= 0:
            return
        self.used -= n
        free = self.free
        i = bisect.bisect_left(free, [first, 0])
        if i > 0 and free[i - 1][0] + free[i - 1][1] == first:
            i -= 1
            free[i][1] += n
        else:
            free.insert(i, [first, n])
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
            free[i][1] += free.pop(i + 1)[1]


class _Binary:
    """One binary's table in the kernel, and the mappings that use it."""

    __slots__ = ("table", "base", "cfi", "decoded", "refs", "complete", "path", "next_rebuild", "wait",
                 "first", "count")

    def __init__(self, table: int, first: int, count: int, base: int, cfi, decoded: int, complete: bool,
                 path: str) -> None:
        self.path = path
        self.wait = FIRST_REBUILD_WAIT       # doubles after each rebuild, up to LAST_REBUILD_WAIT
        self.next_rebuild = 0.0
        self.table = table          # index into unwind_tables
        self.first = first          # its rows: rows[first:first + count]
        self.count = count
        self.base = base            # link-time address of row pc 0
        self.cfi = cfi              # the walker's BinaryCFI (its lazily decoded FDEs); None while idle
        self.decoded = decoded      # FDEs in the table (partial tables grow)
        self.complete = complete    # every FDE is in (no UW_CFA_FALLBACK gaps to fill)
        self.refs: Dict[int, tuple] = {}   # mapping index -> (start, end, vaddr of start)


def _lazy_spans(cfi) -> Optional[list]:
    """The rows of the FDEs the user-space walker decoded so far, when
    ``cfi``'s table decodes lazily (perfagent.unwind.walker.LazyEhFrame,
    whose FDE cache is read, not changed: every binary's table, since a
    whole table is never compiled for the walker); None for a whole
    CFITable."""
    fdes = getattr(cfi.table, "_fdes", None)
    if fdes is None:
        return None
    spans = []
    for _starts, fde_spans in list(fdes.values()):
        spans.extend(fde_spans)
    return spans


class KernelTables:
    """The walk's tables (see the module docstring).

    A binary whose CFI the walker decodes lazily (through .eh_frame_hdr) is
    loaded the same way: its table holds the FDEs the user-space walker has
    decoded -- the ones the fallback samples needed -- and UW_CFA_FALLBACK
    between them, and is rebuilt (new rows, a new table id, its mappings
    pointed at it) when more were decoded.  A whole machine's binaries are
    thus never compiled whole; the fallbacks teach the kernel the hot code.

    A long run with processes coming and going does not fill the tables:
    a binary no loaded process maps any more is idle, and idle binaries
    are evicted, least recently used first, beyond ``idle_binaries`` or
    when free rows or table ids run short; their rows and table ids (and
    those a rebuild replaced) are reused REUSE_AFTER seconds later, when
    no walk can still be reading them.
    """

    REBUILD_INTERVAL = 0.1   # seconds between two looks at the binaries' decoded FDEs

    def __init__(self, cfi_cache, auto: bool, max_procs: int = KU.MAX_PROCS, max_rows: int = 0) -> None:
        self.maps = KU.make_maps(auto, max_rows=max_rows, max_procs=max_procs)
        self.cfi = cfi_cache
        self._users = 0
        self.max_rows = self.maps.rows.max_entries
        self.max_tables = self.maps.tables.max_entries
        self._rows = _Rows(self.max_rows)
        self._next_table = 0
        self._free_tables: List[int] = []
        # (when freed, first row, rows, table id or -1): not reused before REUSE_AFTER
        self._quarantine: List[Tuple[float, int, int, int]] = []
        self._binaries: Dict[tuple, _Binary] = {}
        self._idle: "OrderedDict[tuple, None]" = OrderedDict()   # unmapped binaries, least recent first
        self.idle_binaries = IDLE_BINARIES
        self.evicted = 0
        self.rows_written = 0        # every table written (rebuilds and reloads included)
        self.no_room = 0             # loads put off for want of rows or table ids
        self._no_room_until = 0.0
        self._refused: Dict[tuple, str] = {}
        self._free_slots = list(range(max_procs - 1, -1, -1))
        # pid -> (slot, mapping signature, binary keys its mappings use,
        #         (id, size) of the AddressSpace it was loaded from)
        self._procs: Dict[int, tuple] = {}
        self.refused: Dict[str, str] = {}                # path -> why (for the summary)
        self.load_seconds = 0.0
        self.rebuilds = 0
        self._next_rebuild = 0.0
        # The agent's own samples (under -a) keep their sampled pc only.
        self.maps.procs.update(KU.UW_PROC_KEY.pack(os.getpid()), KU.UW_PROC.pack(0, KU.UW_PROC_SELF))

    def acquire(self) -> "KernelTables":
        self._users += 1
        return self

    def release(self) -> None:
        """One user (a source) is done; the last one closes the maps."""
        self._users -= 1
        if self._users <= 0:
            close_all([self.maps.procs, self.maps.mappings, self.maps.tables, self.maps.rows])

    @property
    def rows_loaded(self) -> int:
        """Rows that hold a loaded binary's table (not those waiting to be reused)."""
        return self._rows.used - sum(q[2] for q in self._quarantine)

    @property
    def binaries_loaded(self) -> int:
        return len(self._binaries)

    @property
    def tables_used(self) -> int:
        """Table ids that name a loaded binary's table."""
        return self._next_table - len(self._free_tables) - sum(1 for q in self._quarantine if q[3] >= 0)

    def counts(self) -> Dict[str, int]:
        """What the tables hold (tests of long runs assert on these)."""
        return {"binaries": len(self._binaries), "idle_binaries": len(self._idle),
                "rows": self.rows_loaded, "tables": self.tables_used, "processes": len(self._procs),
                "evicted": self.evicted, "refused": len(self._refused), "no_room": self.no_room}

    # -- processes ---------------------------------------------------------------
    def refresh(self, state, pids: Iterable[int], deadline: Optional[float] = None) -> None:
        """(Re)load the processes in ``pids`` whose mappings are not loaded
        as they are now, then grow the partial tables; stops at ``deadline``
        (time.monotonic)."""
        t0 = time.monotonic()
        self._tidy(t0)
        try:
            # First what the last walks taught (cheap, and it stops the
            # fallbacks of processes already loaded), then new processes.
            # Each gets its share: rebuilds at most half the time, and at
            # least one process is loaded per call, whatever the clock says.
            self._grow(None if deadline is None else t0 + (deadline - t0) / 2)
            first = True
            me = os.getpid()
            for pid in pids:
                if not first and deadline is not None and time.monotonic() >= deadline:
                    return
                if pid == me:
                    continue                            # never walked (UW_PROC_SELF)
                proc = state.processes.get(pid)
                if proc is None or not proc.maps_known:
                    proc = state.load_from_proc(pid)
                if proc is None or proc.exited:
                    continue
                known = self._procs.get(pid)
                if known is None and not self._free_slots:
                    continue                            # no room: it stays with user space
                entries = [e for e in proc.space.entries() if e.is_exec]
                signature = tuple((e.start, e.end, e.pgoff, e.inode) for e in entries)
                space = (id(proc.space), len(proc.space))
                if known is not None and known[1] == signature:
                    self._procs[pid] = known[:3] + (space,)
                    continue
                try:
                    self._load(pid, entries, signature, None if first else deadline, space)
                except _OutOfTime:
                    return
                except _NoRoom:
                    self.no_room += 1               # it waits: rows come free as processes exit
                first = False
        finally:
            self.load_seconds += time.monotonic() - t0

    def ready(self, state, pid: int) -> bool:
        """Whether loading ``pid`` needs no compiling (every binary it maps
        is loaded or refused already)."""
        from perfagent.capture import KIND_FILE, KIND_VDSO, mapping_kind
        proc = state.processes.get(pid)
        if proc is None or not proc.maps_known:
            return False
        for e in proc.space.entries():
            if not e.is_exec:
                continue
            kind = mapping_kind(e)
            if kind == KIND_FILE:
                key = (e.dev_major, e.dev_minor, e.inode, e.path)
            elif kind == KIND_VDSO:
                key = ("[vdso]",)
            else:
                continue
            if key not in self._binaries and key not in self._refused:
                return False
        return True

    def changed(self, state) -> List[int]:
        """Loaded processes whose address space object or size changed since
        (an exec replaces it: the kernel must not walk the new image with
        the old mappings for long); gone ones are forgotten."""
        out = []
        for pid, known in list(self._procs.items()):
            proc = state.processes.get(pid)
            if proc is None or proc.exited:
                self.forget(pid)
            elif known[3] != (id(proc.space), len(proc.space)):
                out.append(pid)
        return out

    def loaded(self, pid: int) -> bool:
        return pid in self._procs

    def loaded_pids(self) -> List[int]:
        return list(self._procs)

    def forget(self, pid: int) -> None:
        known = self._procs.pop(pid, None)
        if known is not None:
            self.maps.procs.delete(KU.UW_PROC_KEY.pack(pid))
            self._drop_refs(known)
            self._free_slots.append(known[0])

    def _drop_refs(self, known) -> None:
        slot, keys = known[0], known[2]
        first = slot * KU.MAX_MAPPINGS
        for i, key in enumerate(keys):
            b = self._binaries.get(key) if key is not None else None
            if b is not None:
                b.refs.pop(first + i, None)
                if not b.refs:
                    self._idle[key] = None      # its table stays, for the next process that maps it
                    self._idle.move_to_end(key)

    # -- eviction ----------------------------------------------------------------
    def _tidy(self, now: float) -> None:
        """Reuse what was freed long enough ago; evict idle binaries beyond
        ``idle_binaries`` or while rows or table ids run short."""
        q = self._quarantine
        n = 0
        while n < len(q) and q[n][0] + REUSE_AFTER <= now:
            _when, first, count, table = q[n]
            self._rows.give(first, count)
            if table >= 0:
                self._free_tables.append(table)
            n += 1
        if n:
            del q[:n]
        while self._idle and (len(self._idle) > self.idle_binaries or self._short()):
            self._evict(next(iter(self._idle)), now)
        # Idle tables do not hold the walker's CFI: the CFI cache's LRU
        # alone decides about that memory (_mapping takes it again).
        for key in self._idle:
            self._binaries[key].cfi = None

    def _short(self) -> bool:
        """Fewer than 1/FREE_RESERVE of the rows or table ids are free (or
        coming free)."""
        free_rows = self.max_rows - self.rows_loaded
        free_tables = self.max_tables - self.tables_used
        return free_rows * FREE_RESERVE < self.max_rows or free_tables * FREE_RESERVE < self.max_tables

    def _evict(self, key: tuple, now: float) -> None:
        """Forget an idle binary: its table id and rows are reused later."""
        del self._idle[key]
        b = self._binaries.pop(key)
        self._quarantine.append((now, b.first, b.count, b.table))
        self.evicted += 1

    def _take(self, n: int) -> Tuple[int, int]:
        """(table id, first row) for a table of ``n`` rows, evicting idle
        binaries when there is no room; _NoRoom when there is none now."""
        while True:
            first = self._rows.take(n)
            table = -1
            if first is not None:
                if self._free_tables:
                    table = self._free_tables.pop()
                elif self._next_table < self.max_tables:
                    table = self._next_table
                    self._next_table += 1
                else:
                    self._rows.give(first, n)
            if table >= 0:
                return table, first
            # Evicted rows and ids are reused only later: evict what this
            # table needs (the least recently used first), and retry then.
            now = time.monotonic()
            while self._idle and (sum(q[2] for q in self._quarantine) < n
                                  or not any(q[3] >= 0 for q in self._quarantine)):
                self._evict(next(iter(self._idle)), now)
            # Until then nothing new is compiled (and for longer when
            # nothing is coming free: rows come free as processes exit).
            self._no_room_until = now + (REUSE_AFTER if self._quarantine else NO_ROOM_WAIT)
            raise _NoRoom()

    def _load(self, pid: int, entries, signature: tuple, deadline: Optional[float], space: tuple) -> None:
        entries = sorted(entries, key=lambda e: e.start)[:KU.MAX_MAPPINGS]
        # Compile first (each binary once, checking the time between
        # binaries), then publish: a process is never half loaded.
        mappings = [self._mapping(pid, e, deadline) for e in entries]
        known = self._procs.get(pid)
        if known is not None:
            # Unpublished while rewritten: its samples fall back meanwhile.
            self.maps.procs.delete(KU.UW_PROC_KEY.pack(pid))
            self._drop_refs(known)
            slot = known[0]
        elif self._free_slots:
            slot = self._free_slots.pop()
        else:
            return                                      # no room: this process stays in user space
        first = slot * KU.MAX_MAPPINGS
        keys = []
        for i, e in enumerate(entries):
            kind, key, vaddr = mappings[i]
            b = self._binaries.get(key) if key is not None else None
            table = bias = 0
            if b is None and key is not None:
                kind = KU.UW_MAP_FALLBACK   # evicted meanwhile (room made for another binary)
            if b is not None:
                if not b.refs:
                    self._idle.pop(key, None)
                b.refs[first + i] = (e.start, e.end, vaddr)
                table, bias = b.table, e.start - vaddr + b.base
            keys.append(key if b is not None else None)
            self.maps.mappings.update(KU.UW_INDEX.pack(first + i),
                                      KU.UW_MAPPING.pack(e.start, e.end, bias & (2 ** 64 - 1), table, kind))
        self.maps.procs.update(KU.UW_PROC_KEY.pack(pid), KU.UW_PROC.pack(first, len(entries)))
        self._procs[pid] = (slot, signature, keys, space)

    # -- mappings and binaries -----------------------------------------------------
    def _mapping(self, pid: int, e, deadline: Optional[float] = None) -> Tuple[int, Optional[tuple], int]:
        """(kind, binary key, vaddr of its start) of one executable mapping,
        as the walker would treat it; the binary's table made if needed."""
        from perfagent.capture import KIND_FILE, KIND_JIT, KIND_VDSO, mapped_file, mapping_kind
        kind = mapping_kind(e)
        if kind == KIND_FILE:
            key = (e.dev_major, e.dev_minor, e.inode, e.path)
        elif kind == KIND_VDSO:
            key = ("[vdso]",)
        elif kind == KIND_JIT and os.path.exists("/tmp/perf-%d.map" % pid):
            # CPython's perf trampolines: the user-space walker knows their shape.
            return KU.UW_MAP_FALLBACK, None, 0
        else:
            return KU.UW_MAP_FP, None, 0                  # anonymous code, [vsyscall]: frame pointers
        if key in self._refused:
            return KU.UW_MAP_FALLBACK, None, 0
        binary = self.cfi.get(mapped_file(pid, e)) if kind == KIND_FILE else self.cfi.get_vdso()
        if binary is None or binary.table is None or not binary.has_cfi:
            return KU.UW_MAP_FP, None, 0
        vaddr = binary.load_map.offset_to_vaddr(e.pgoff) if binary.load_map is not None else None
        if vaddr is None:
            return KU.UW_MAP_FALLBACK, None, 0
        b = self._binaries.get(key)
        if b is None:
            now = time.monotonic()
            if now < self._no_room_until:
                raise _NoRoom()
            if deadline is not None and now >= deadline:
                raise _OutOfTime()
            if not self._new_binary(key, binary, e.path):
                return KU.UW_MAP_FALLBACK, None, 0
        elif b.cfi is None:
            b.cfi = binary          # idle until now: the cache's current CFI (it may have been reloaded)
        return KU.UW_MAP_TABLE, key, vaddr

    def _compile(self, cfi) -> Tuple["K.CompactTable", int, bool]:
        """(rows, FDEs decoded, complete) of a binary's table as known now
        (refused only when it could never fit: room is made by eviction)."""
        room = self.max_rows
        spans = _lazy_spans(cfi)
        if spans is None:
            return K.compile_rows(cfi.table, room), 0, True
        return K.compile_spans(spans, K.FALLBACK_ROW, room), len(cfi.table._fdes), False

    def _publish(self, compiled: "K.CompactTable") -> Tuple[int, int]:
        """Write a table's rows (to free ones) and range (under a free table
        id); returns (table id, first row)."""
        table, first = self._take(len(compiled.rows))
        try:
            _write_rows(self.maps.rows, first, compiled)
            self.maps.tables.update(KU.UW_INDEX.pack(table), KU.UW_TABLE.pack(first, len(compiled.rows)))
        except BaseException:
            self._quarantine.append((time.monotonic(), first, len(compiled.rows), table))
            raise
        self.rows_written += len(compiled.rows)
        return table, first

    def _new_binary(self, key: tuple, cfi, path: str) -> bool:
        try:
            compiled, decoded, complete = self._compile(cfi)
            table, first = self._publish(compiled)
        except K.TableRefused as exc:
            if len(self.refused) < 100:
                self.refused[path] = str(exc)
            self._refused[key] = str(exc)
            return False
        self._binaries[key] = _Binary(table, first, len(compiled.rows), compiled.base, cfi, decoded,
                                      complete, path)
        self._idle[key] = None      # until a process is published with it
        return True

    def _grow(self, deadline: Optional[float]) -> None:
        """Rebuild the partial tables whose binaries had more FDEs decoded
        since (each at most every REBUILD_INTERVAL).  The new rows go to a
        new range under a new table id, and only then are the mappings
        pointed at it: a program running meanwhile reads the old table or
        the new one, never a mix."""
        now = time.monotonic()
        if now < self._next_rebuild or now < self._no_room_until:
            return
        self._next_rebuild = now + self.REBUILD_INTERVAL
        for key, b in list(self._binaries.items()):
            if b.complete or not b.refs or b.cfi is None:
                continue
            fdes = getattr(b.cfi.table, "_fdes", None)
            if fdes is None or len(fdes) <= b.decoded:
                continue                    # (fewer: the CFI cache loaded it again; it catches up)
            if now < b.next_rebuild:
                continue
            # Most of a binary's hot code is decoded in the first seconds:
            # rebuilds (each rewrites the whole table) get rarer.
            b.next_rebuild = now + b.wait
            b.wait = min(2 * b.wait, LAST_REBUILD_WAIT)
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                compiled, decoded, complete = self._compile(b.cfi)
                table, first = self._publish(compiled)
            except K.TableRefused as exc:
                b.complete = True           # too large to grow: its gaps stay with user space
                if len(self.refused) < 100:
                    self.refused[b.path] = str(exc)
                continue
            except _NoRoom:
                continue                    # grows when rows come free
            old = (b.first, b.count, b.table)
            b.table, b.first, b.count = table, first, len(compiled.rows)
            b.base, b.decoded, b.complete = compiled.base, decoded, complete
            self.rebuilds += 1
            for index, (start, end, vaddr) in b.refs.items():
                self.maps.mappings.update(KU.UW_INDEX.pack(index), KU.UW_MAPPING.pack(
                    start, end, (start - vaddr + b.base) & (2 ** 64 - 1), table, KU.UW_MAP_TABLE))
            # Every mapping points at the new table: the old rows and id are
            # reused once no walk can be reading them.
            self._quarantine.append((time.monotonic(),) + old)


# Rows written per BPF_MAP_UPDATE_BATCH call.
ROWS_PER_BATCH = 8192


def _write_rows(rows_map, first: int, compiled: "K.CompactTable") -> None:
    """rows[first:] = the table's rows: batched (one syscall per
    ROWS_PER_BATCH rows: a per-row update costs 20 us of Python and syscall,
    a second for a large library), one by one where batches are refused."""
    import array
    packed = compiled.pack()
    n = len(compiled.rows)
    size = K.UNWIND_ROW.size
    done = 0
    try:
        while done < n:
            count = min(ROWS_PER_BATCH, n - done)
            keys = array.array("I", range(first + done, first + done + count)).tobytes()
            sc.map_update_batch(rows_map.fd, keys, packed[done * size:(done + count) * size], count)
            done += count
    except sc.BPFError:
        for i in range(done, n):
            rows_map.update(KU.UW_INDEX.pack(first + i), packed[i * size:(i + 1) * size])


def shared_tables(state, auto: bool) -> KernelTables:
    """The capture's one KernelTables (the on-CPU and off-CPU programs walk
    with the same maps), made on first use; ``acquire`` it."""
    tables = getattr(state, "kernel_tables", None)
    if tables is None or tables._users <= 0:
        tables = state.kernel_tables = KernelTables((state.walker or state.offcpu_walker).cache, auto)
    return tables


class KUnwindSampler(RecordSampler):
    """cpu-clock sampling with the user stack walked in the kernel (the
    KUNWIND program): counts and stacks as InKernelSampler drains them,
    fallback records as RecordSampler's.  ``tables`` (a KernelTables) must
    be filled by the caller as fallback records name processes."""

    def __init__(self, sample_rate: int, tgids: Optional[Set[int]], copy_stack: int,
                 kmaps: KU.KUnwindMaps, python=None) -> None:
        from perfagent.offcpu.inkernel import MAX_RING_BYTES, ring_bytes_for
        from perfagent.perf.sampler import online_cpus
        ring = min(MAX_RING_BYTES, ring_bytes_for(copy_stack, sample_rate, len(online_cpus()))
                   // FALLBACK_RING_SHARE)
        super().__init__(sample_rate, tgids, copy_stack, ring_bytes=ring, python=python)
        self.kmaps = kmaps          # not ours: KernelTables owns them

    MODE = KUNWIND

    def _make_maps(self, copy) -> Maps:
        # Counts and stores for the stacks walked here, the ring for the
        # walks left to user space, and the tables (not ours).
        self._make_count_maps()
        self._make_capture_maps(copy)
        self._make_ring()
        return Maps(self._scratch, self._stats, self._tgids, self._counts, self._native,
                    self._pystore, self._ring, self._follow(), self.kmaps)

    def start(self, enable: bool = True) -> None:
        super().start(enable)
        self._arm_wake()

    def _gather(self):
        out = super()._gather()
        self._arm_wake()
        return out

    def _arm_wake(self) -> None:
        """The program wakes the drain loop (its ring, watched edge-
        triggered) once the count map holds what collect_if_full collects
        at, so the loop's waits need not assume the worst insert rate."""
        from perfagent.offcpu.inkernel import NEAR_FULL
        if self._stats is not None:
            self._stats.arm_wake(int(NEAR_FULL * min(self.max_entries, self.stack_entries // 2)))

    def outcomes(self) -> List[int]:
        """Walks per UW_STATUS_* so far."""
        if self._stats is not None:
            self._outcomes = [self._stats.read(STAT_KUNWIND + i) for i in range(len(KU.STATUS_NAMES))]
        return list(getattr(self, "_outcomes", [0] * len(KU.STATUS_NAMES)))

    @property
    def dropped(self) -> int:
        from perfagent.offcpu.common import STAT_COPY_DROPS, STAT_DROPS
        if self._stats is not None:
            self._drops = self._stats.read(STAT_COPY_DROPS) + self._stats.read(STAT_DROPS)
        return self._drops

    def collect_counts(self, if_full: bool = True):
        """The counted stacks (drained when the count map is half full, or
        always with ``if_full`` False)."""
        from perfagent.offcpu.inkernel import InKernelSampler
        if not self._running:
            out, self._pending = self._pending, []
            return out
        if if_full:
            return InKernelSampler.collect_if_full(self)
        return self._gather()

    def stop(self) -> None:
        if not self._running:
            self._close()
            return
        try:
            close_all(self._events)
            self._events = []
            self._pending_samples = self.drain()
            self._pending.extend(self._gather())
            self.dropped  # noqa: B018 - read the counters before the map closes
            self.outcomes()
        finally:
            self._running = False
            self._close()

