"""Off-CPU time: how long threads spend blocked, and where they blocked.

A tp_btf program on sched_switch does the bookkeeping in the kernel:

* When a followed thread (``prev``) leaves the CPU *because it blocked*, it
  records the time and the thread's stacks (the capture of
  perfagent.stackprog: kernel stack, user stack, Python stack) under its
  tid.  sched_switch runs in ``prev``'s context (``current`` is still
  ``prev``), so the capture sees exactly the stacks that led into the
  scheduler.
* When a thread (``next``) comes back onto a CPU and has such a record, the
  blocked nanoseconds and one episode are added to a hash map keyed by
  (tgid, tid, kernel, user and Python stack hashes), and the record is
  deleted.

"Blocked" means the scheduler is switching the thread out with a state other
than TASK_RUNNING, and not by preemption: a thread that is preempted (or
yields) stays runnable, and the time it then spends waiting in the run queue
is left out on purpose.  That is CPU contention, not blocking, and counting
it would make every busy thread on a loaded machine look "off-CPU".  An
interval that did start with blocking ends when the thread runs again, not
when it is woken, so it includes the run-queue wait after the wakeup (on a
loaded machine, part of a 10 ms sleep is waiting for a CPU).  Dying threads
(TASK_DEAD) are not recorded: they never come back.

User stacks come in one of two ways:

* ``copy_stack=0``: bpf_get_stack with BPF_F_USER_STACK, which walks frame
  pointers from the user registers saved at kernel entry.  Code built
  without frame pointers gives short or wrong user stacks; in particular a
  libc system-call wrapper that does not set up a frame hides its caller
  (the walk continues from the caller's caller), and CPython built without
  frame pointers (every distribution's) hides every Python function.
* ``copy_stack=N``: the program also copies the thread's user registers
  (bpf_task_pt_regs: what the thread's entry into the kernel saved) and N
  bytes and a little more of its user stack from sp (bpf_probe_read_user,
  a page at a time, stopping at the first page that cannot be read without
  faulting) into a BPF ring buffer, for user space to unwind with the
  binaries' DWARF CFI exactly like an on-CPU sample (perfagent.unwind).
  The kernel and Python stacks travel in the same record.  The episode's
  end then goes to the ring too, as its own record, rather than into the
  count map, and user space pairs the two by (tid, episode start).  When
  the ring is full the episode falls back to the frame-pointer stack,
  counted in ``copies_dropped``; kernel threads (no user memory) never
  copy.

Kernel stacks are always right.

Intervals that are still open (threads still blocked) when ``collect()`` or
``stop()`` runs are closed at that moment from user space, using
CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads.  A periodic ``collect()``
credits the time so far and moves the record's start to "now" in the
kernel's map (BPF_EXIST, so a record the program has closed meanwhile is
left alone), counting the episode only once, when it really ends or at
``stop()``.  One race remains: if the thread wakes, blocks again and gets a
new record between our lookup and update (microseconds), the new record's
start is moved back to our "now" and that sliver is counted twice.
"""

from __future__ import annotations

import errno
import struct
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from perfagent.records import NamedTuple
from perfagent.bpf import syscall as sc
from perfagent.bpf.btf import vmlinux
from perfagent.bpf.maps import ArrayMap, HashMap, RingBuf, possible_cpus
from perfagent.bpf.prog import Link, Prog
from perfagent.bpf.syscall import BPFError
from perfagent.offcpu.common import (
    STAT_COPY_DROPS, FollowsTgids, Stats, close_all, make_tgid_map, thread_alive)
from perfagent.stackprog import capture as C
from perfagent.stackprog import layout as L
from perfagent.stackprog import store as S
from perfagent.stackprog.program import (
    AGGREGATE, BLOCKED, COUNT_KEY, EPISODE_END, KUNWIND, RECORD, SUMS, TID_KEY, Maps, SchedSwitchArgs,
    build_offcpu,
)

RECORD_KIND = struct.Struct("<I")  # every ring record starts with its kind
DEFAULT_RING_BYTES = 8 << 20

DEFAULT_MAX_ENTRIES = 16384     # distinct (thread, stack) pairs between collects
DEFAULT_MAX_THREADS = 32768     # threads blocked at once
DEFAULT_STACK_ENTRIES = 16384   # distinct stacks between two drains (stores are emptied)
# Live followed processes at once (exited ones are removed from the map).
DEFAULT_MAX_TGIDS = 65536


class OffCpuStack(NamedTuple):
    """Blocked time of one thread at one (user stack, kernel stack).

    Instruction pointers are leaf first; an empty tuple means the stack was
    not available (see ``OffCpuCollector.lost_stacks``).  The kernel stack
    starts inside the BPF program: see ``strip_tracing_frames``.
    """

    tgid: int
    tid: int
    user_ips: Tuple[int, ...]
    kernel_ips: Tuple[int, ...]
    blocked_ns: int
    count: int      # blocking episodes that ended (or were closed at stop())
    # With copy_stack: the episode's user registers and stack, to unwind
    # (``user_ips`` is then empty).  One object per episode: several
    # entries (credits of an open interval, then its end) share it.
    copy: Optional["StackCopy"] = None
    # The Python stack, (frames, flags) as perfagent.stackprog.store decodes it.
    python: Optional[tuple] = None


class StackCopy:
    """One episode's capture: user registers and stack copy (from sp
    upward), kernel stack and Python stack.

    ``user_ips`` is for the consumer: it unwinds once, stores the result
    here and drops ``stack`` (tens of KiB) with ``unwound()``.
    """

    __slots__ = ("regs", "stack", "user_ips", "kernel_ips", "python", "sps")

    def __init__(self, regs: Tuple[int, ...], stack: bytes, kernel_ips: Tuple[int, ...] = (),
                 python: Optional[tuple] = None) -> None:
        self.regs = regs
        self.stack = stack
        self.kernel_ips = kernel_ips
        self.python = python
        self.user_ips: Optional[Tuple[int, ...]] = None
        self.sps: Optional[list] = None

    def unwound(self, user_ips: Tuple[int, ...], sps: Optional[list] = None) -> None:
        self.user_ips = user_ips
        self.sps = sps
        self.stack = b""


def decode_capture(rec: bytes) -> Tuple[int, int, int, int, StackCopy]:
    """(kind, tid, tgid, time, StackCopy) of a RECORD_STACK / RECORD_SAMPLE."""
    hdr = L.HEADER.unpack_from(rec, 0)
    kind, tid, tgid, _cpu, when = hdr[:5]
    regs = tuple(hdr[6:14])
    size = hdr[14]
    flags = hdr[15]
    kn = min(L.STACK.unpack_from(rec, L.KERNEL_OFF)[0], L.PERF_MAX_STACK_DEPTH)
    kernel = L.STACK.unpack_from(rec, L.KERNEL_OFF)[2:2 + kn]
    python = S.decode_pystack(rec, L.PYTHON_OFF)
    stack = rec[L.STACK_OFF:L.STACK_OFF + size] if flags & L.CAPTURE_USER else b""
    return kind, tid, tgid, when, StackCopy(regs if flags & L.CAPTURE_USER else (0,) * 8, stack,
                                            kernel, python if python[0] or python[1] else None)


def _sched_switch_args() -> SchedSwitchArgs:
    btf = vmlinux()
    names = [a.name for a in btf.raw_tp_args("sched_switch")]

    def index(name: str, default: Optional[int]) -> Optional[int]:
        return names.index(name) if name in names else default

    state = btf.member_any("task_struct", "__state", "state")
    # Unnamed arguments (no __bpf_trace_sched_switch in BTF): the order has
    # been (preempt, prev, next[, prev_state]) since 4.x.
    return SchedSwitchArgs(
        preempt=index("preempt", 0), prev=index("prev", 1), next=index("next", 2),
        prev_state=index("prev_state", 3 if len(names) >= 4 else None),
        state_off=state.offset, state_size=btf.member_size(state),
        pid_off=btf.member("task_struct", "pid").offset,
        attach_btf_id=btf.raw_tp_btf_id("sched_switch"))


def copy_spec(copy_bytes: int) -> C.CopySpec:
    """What the capture needs to copy ``copy_bytes`` of user stack (from BTF)."""
    from perfagent.arch import current
    fields = getattr(current(), "UNWIND_PT_REGS", None)
    if fields is None:
        raise BPFError("user stack copies are not supported on %s yet" % current().NAME,
                       errno.EOPNOTSUPP)
    btf = vmlinux()
    return C.CopySpec(C.copy_pages(copy_bytes), btf.member("task_struct", "mm").offset,
                      tuple(btf.member("pt_regs", f).offset for f in fields))


SCHEDULER_ENTRY = "__schedule"


def strip_tracing_frames(kernel_ips: Sequence[int],
                         lookup: Callable[[int], Optional[str]]) -> Tuple[int, ...]:
    """``kernel_ips`` from __schedule on: without the program's own frames.

    A kernel stack taken at sched_switch starts with the BPF program and the
    tracepoint's dispatch (bpf_trace_run4 here; __bpf_trace_sched_switch and
    __traceiter_sched_switch on older kernels), which vary by kernel version,
    so they are cut by name at symbolization time rather than with a fixed
    skip count in the program.  ``lookup`` is a kallsyms lookup (e.g.
    perfagent.symbolize.kallsyms.KernelSymbols.lookup); a stack without
    __schedule (or without symbols) is returned whole.
    """
    for i, ip in enumerate(kernel_ips):
        name = lookup(ip)
        if name is not None and name.split(".")[0] == SCHEDULER_ENTRY:
            return tuple(kernel_ips[i:])
    return tuple(kernel_ips)


def _monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns()."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class OffCpuCollector(FollowsTgids):
    """Blocked time per thread and stack, from a sched_switch BPF program.

    ``tgids`` None follows every process; a set follows only threads of those
    processes, and ``add_tgid`` adds one (a child, a new pid) while running.
    Call ``collect()`` periodically (it drains the kernel's count map, which
    holds ``max_entries`` distinct (thread, stack) pairs: a full map drops
    episodes) and once more after ``stop()`` for the remainder.  ``stop()``
    closes every fd: nothing stays in the kernel.  Needs kernel BTF (tp_btf).

    ``copy_stack`` > 0 copies that many bytes (at least) of each episode's
    user stack, with its registers, for a DWARF unwind (see the module
    docstring); the ring they travel in holds ``ring_bytes`` and must be
    drained with ``drain_copies()`` often (every 100 ms or so), not only by
    ``collect()``.  ``on_copy(tgid, copy)`` is called for each copy as it is
    read, so the consumer can unwind it at once and free the bytes
    (``StackCopy.unwound``): a thread blocked for minutes would otherwise
    keep its copy that long.  Entries carrying a copy come one per episode
    (and one per credit of a still open one), not aggregated.
    """

    def __init__(self, tgids: Optional[Set[int]] = None,
                 max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_threads: int = DEFAULT_MAX_THREADS,
                 stack_entries: int = DEFAULT_STACK_ENTRIES,
                 max_tgids: int = DEFAULT_MAX_TGIDS,
                 copy_stack: int = 0,
                 ring_bytes: int = DEFAULT_RING_BYTES,
                 on_copy: Optional[Callable[[int, "StackCopy"], None]] = None,
                 python=None, kunwind=None) -> None:
        # kunwind: perfagent.stackprog.kunwind.KUnwindMaps, to walk user
        # stacks in the kernel (with copy_stack > 0: the copies are only
        # the walks the kernel left to user space).
        self.kunwind = kunwind
        # python: perfagent.stackprog.python.PyWalkMaps (Python stacks of the
        # processes registered there, at every switch-out).
        self.python = python
        self._pystore: Optional[HashMap] = None
        self._initial_tgids = None if tgids is None else set(tgids)
        self.max_entries = max_entries
        self.max_threads = max_threads
        self.stack_entries = stack_entries
        self.max_tgids = max(max_tgids, len(self._initial_tgids or ()))
        self.copy_stack = copy_stack
        self.ring_bytes = ring_bytes
        self.on_copy = on_copy
        self._ring: Optional[RingBuf] = None
        self._scratch: Optional[ArrayMap] = None
        # (tid, episode) -> its capture, until the episode's end is read
        self._copies: Dict[Tuple[int, int], StackCopy] = {}
        self._orphans: Set[Tuple[int, int]] = set()
        self.copies = 0            # captures read from the ring
        self.copies_missing = 0    # episode ends whose capture was not found
        self._copy_drops = 0
        self._tgids: Optional[HashMap] = None
        self._blocked: Optional[HashMap] = None
        self._counts: Optional[HashMap] = None
        self._native: Optional[HashMap] = None
        self._prog: Optional[Prog] = None
        self._link: Optional[Link] = None
        self._cache = S.StoreCache()
        self._stats: Optional[Stats] = None
        self._drops = 0
        self._pending: List[OffCpuStack] = []
        self._running = False

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        try:
            args = _sched_switch_args()
            copy = copy_spec(self.copy_stack) if self.copy_stack > 0 else None
            self._tgids = make_tgid_map(self._initial_tgids, self.max_tgids)
            self._blocked = HashMap(TID_KEY.size, BLOCKED.size, self.max_threads,
                                    name="offcpu_blocked")
            self._counts = HashMap(COUNT_KEY.size, SUMS.size, self.max_entries,
                                   name="offcpu_counts")
            self._native = S.native_store(self.stack_entries, "offcpu_stacks")
            self._scratch = ArrayMap(L.scratch_size(self.copy_stack, copy.pages if copy else 0),
                                     possible_cpus(), name="offcpu_scratch")
            self._stats = Stats()
            if copy is not None:
                self._ring = RingBuf(self.ring_bytes, name="offcpu_copies")
            walk = None
            if self.python is not None:
                from perfagent.stackprog.program import KEY_TGID
                from perfagent.stackprog.python import emit_python_walk
                self._pystore = S.python_store(self.stack_entries, "offcpu_pystacks")
                walk = emit_python_walk(self.python, KEY_TGID)
            maps = Maps(self._scratch, self._stats, self._tgids, self._counts, self._native,
                        self._pystore, self._ring, self._follow(), self.kunwind)
            mode = AGGREGATE if copy is None else (KUNWIND if self.kunwind is not None else RECORD)
            prog = build_offcpu(mode, maps, self._blocked, args, copy, python_walk=walk)
            self._prog = prog.load(sc.BPF_PROG_TYPE_TRACING,
                                   expected_attach_type=sc.BPF_TRACE_RAW_TP,
                                   attach_btf_id=args.attach_btf_id)
            self._link = self._prog.attach_tracing()
        except BaseException:
            self._close()
            raise
        self._running = True

    def stop(self) -> None:
        """Detach, close the open intervals, close every fd.  The remainder
        is returned by the next ``collect()``."""
        if not self._running:
            self._close()
            return
        try:
            # Detach first so that nothing changes the maps under the final walk.
            if self._link is not None:
                self._link.close()
            self._pending.extend(self._gather(final=True))
        finally:
            self._running = False
            self._close()

    def kunwind_outcomes(self) -> List[int]:
        """Walks per perfagent.stackprog.kunwind.UW_STATUS_* so far (kunwind mode)."""
        from perfagent.stackprog.accounting import STAT_KUNWIND
        from perfagent.stackprog.kunwind import STATUS_NAMES
        if self._stats is not None:
            self._kunwind_outcomes = [self._stats.read(STAT_KUNWIND + i) for i in range(len(STATUS_NAMES))]
        return list(getattr(self, "_kunwind_outcomes", [0] * len(STATUS_NAMES)))

    def _close(self) -> None:
        if self._stats is not None and self.kunwind is not None:
            self.kunwind_outcomes()
        objs = [self._link, self._prog, self._counts, self._blocked, self._native, self._pystore,
                self._tgids, self._stats, self._ring, self._scratch]
        if self._stats is not None:
            self._copy_drops = self._stats.read(STAT_COPY_DROPS)
        self._link = self._prog = None
        self._counts = self._blocked = self._tgids = None
        self._native = self._pystore = None
        self._stats = None
        self._ring = self._scratch = None
        close_all(objs)

    @property
    def lost_stacks(self) -> int:
        """Stacks lost because a stack store was full."""
        return self._cache.lost

    @property
    def dropped(self) -> int:
        """Episodes lost because the count map was full (call collect() more often
        or raise max_entries)."""
        if self._stats is not None:
            self._drops = self._stats.drops
        return self._drops

    def pending_entries(self) -> int:
        """About how many entries the kernel's count map holds now: call
        ``collect()`` when this nears ``max_entries``."""
        return self._stats.pending() if self._stats is not None else 0

    @property
    def copies_dropped(self) -> int:
        """Stack copies (or their episodes' ends) refused by a full ring: those
        episodes have the frame-pointer stack instead."""
        if self._stats is not None:
            self._copy_drops = self._stats.read(STAT_COPY_DROPS)
        return self._copy_drops

    @property
    def prog_ids(self) -> List[int]:
        return [self._prog.id] if self._prog is not None else []

    @property
    def map_ids(self) -> List[int]:
        maps = [self._tgids, self._blocked, self._counts, self._native,
                self._stats.map if self._stats is not None else None, self._ring, self._scratch]
        return [m.id for m in maps if m is not None]

    # -- draining -------------------------------------------------------------

    def drain_copies(self) -> List[OffCpuStack]:
        """Read the ring of captures (copy_stack > 0): the episodes that
        ended since the last call, one entry each.  Cheap when it is empty;
        call it every ~100 ms so the ring does not fill up."""
        if self._ring is None:
            return []
        out: List[OffCpuStack] = []
        copies = self._copies
        for rec in self._ring.consume():
            kind = RECORD_KIND.unpack_from(rec, 0)[0]
            if kind == L.RECORD_STACK:
                _kind, tid, tgid, episode, copy = decode_capture(rec)
                copies[(tid, episode)] = copy
                self.copies += 1
                if self.on_copy is not None:
                    self.on_copy(tgid, copy)
            elif kind == L.RECORD_END:
                _kind, tid, tgid, _pad, episode, blocked_ns = EPISODE_END.unpack_from(rec, 0)
                copy = copies.pop((tid, episode), None)
                if copy is None:
                    self.copies_missing += 1
                    out.append(OffCpuStack(tgid, tid, (), (), blocked_ns, 1, None))
                else:
                    out.append(OffCpuStack(tgid, tid, (), copy.kernel_ips, blocked_ns, 1, copy,
                                           copy.python))
        return out

    def _gather(self, final: bool = False) -> List[OffCpuStack]:
        assert self._blocked is not None and self._counts is not None
        sums: Dict[Tuple[int, int, int, int, int], List[int]] = {}

        def add(key: Tuple[int, int, int, int, int], ns: int, n: int) -> None:
            s = sums.get(key)
            if s is None:
                sums[key] = [ns, n]
            else:
                s[0] += ns
                s[1] += n

        # The blocked threads are listed before the ring is read: an episode
        # that is in neither (its end read, or not yet begun) leaves no copy
        # behind except by a lost end record (see _forget_orphans).
        open_tids = list(self._blocked.keys())
        out = self.drain_copies()
        live: Set[Tuple[int, int]] = set()
        pinned_native: Set[int] = set()     # hashes the open intervals hold (StoreCache.rotate_pinned)
        pinned_python: Set[int] = set()

        # Close the open intervals at "now".
        for raw_tid in open_tids:
            now = _monotonic_ns()
            raw = self._blocked.lookup(raw_tid)
            if raw is None:
                continue                         # woke up meanwhile: the kernel counted it
            since, tgid, copied, khash, uhash, pyhash, episode = BLOCKED.unpack(raw)
            pinned_native.add(khash)
            pinned_native.add(uhash)
            pinned_python.add(pyhash)
            tid = TID_KEY.unpack(raw_tid)[0]
            if since >= now:
                continue                         # a record made after our clock read
            if not thread_alive(tgid, tid):
                self._blocked.delete(raw_tid)    # gone without a switch back in
                continue
            copy = None
            if copied:
                live.add((tid, episode))
                copy = self._copies.get((tid, episode))
                if copy is None and not final:
                    continue                     # its capture is still in the ring: next time
            key = (tgid, tid, khash, uhash, pyhash)
            if final:
                self._blocked.delete(raw_tid)
                if copy is not None:
                    out.append(OffCpuStack(tgid, tid, (), copy.kernel_ips, now - since, 1, copy,
                                           copy.python))
                else:
                    add(key, now - since, 1)
                continue
            try:
                self._blocked.update(raw_tid, BLOCKED.pack(now, tgid, copied, khash, uhash, pyhash,
                                                           episode), sc.BPF_EXIST)
            except BPFError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                continue                         # closed by the program meanwhile
            if copy is not None:
                out.append(OffCpuStack(tgid, tid, (), copy.kernel_ips, now - since, 0, copy,
                                       copy.python))
            else:
                add(key, now - since, 0)
        self._forget_orphans(live, final)

        assert self._stats is not None
        self._drops = self._stats.drops
        self._stats.before_drain()
        for k, v in self._counts.drain():
            ns, n = SUMS.unpack(v)
            add(COUNT_KEY.unpack(k), ns, n)
        # After the counts and the blocked map: every hash they hold was
        # stored before they were written.
        S.drain_into(self._cache, self._native, self._pystore)
        native, python = self._cache.native, self._cache.python
        out.extend(OffCpuStack(tgid, tid, native(uh) or (), native(kh) or (), ns, n, None,
                               python(ph) if ph else None)
                   for (tgid, tid, kh, uh, ph), (ns, n) in sums.items())
        if not final:
            # What later collections can ask for: this drain, and the open
            # intervals' stacks (a long run holds those, not every stack).
            self._cache.rotate_pinned(pinned_native, pinned_python)
        return out

    def _forget_orphans(self, live: Set[Tuple[int, int]], final: bool) -> None:
        """Drop copies whose episode ended without an end record (the ring was
        full, so the end went to the count map; or the thread died).

        A copy neither blocked nor ended now may just be too new (its
        episode began after the blocked list was read): it is dropped only
        when it is still an orphan at the next collect().
        """
        if final:
            self._copies.clear()
            self._orphans = set()
            return
        orphans = {k for k in self._copies if k not in live}
        for k in orphans & self._orphans:
            del self._copies[k]
        self._orphans = orphans - self._orphans
