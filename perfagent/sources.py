"""The BPF sources of a run, behind one interface.

A source is started once the targets are known (the set of followed
processes, or None for every process), told about processes that were
forked or exited (so its kernel-side filter only holds live ones), asked
every drain cycle to move what it captured into the capture state, and
stopped at the end.  ``run`` composes them; it does not know what each one
does:

* :class:`OnCpuCounts` -- ``--unwind fp``: samples counted per stack in
  the kernel (frame-pointer user stacks, Python stacks);
* :class:`OnCpuRecords` -- ``--unwind dwarf``/``auto``: each sample
  captured whole (registers, stack copy, kernel and Python stacks) for the
  DWARF walker;
* :class:`OffCpu` -- ``--offcpu``: blocked time per stack.

The perf ring buffer (perfagent.perf.sampler) is not a source: it is the
side band every run reads first (MMAP2, COMM, FORK, EXIT), and the
fallback for on-CPU samples when BPF is not available.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Set

from perfagent.capture import CaptureState


def loss_details(dropped: int, lost_stacks: int, refused: int, what: str) -> str:
    """What the kernel side lost, for the summary line ("" when nothing)."""
    parts = []
    if dropped:
        parts.append("%d %s dropped (kernel map or ring full)" % (dropped, what))
    if lost_stacks:
        parts.append("%d stacks lost (kernel stack store full)" % lost_stacks)
    if refused:
        parts.append("%d processes not followed (filter map full)" % refused)
    return "".join(", " + p for p in parts)


class Source:
    """The interface (and the shared following of processes)."""

    #: The kernel-side object (an InKernelSampler, RecordSampler or
    #: OffCpuCollector): has add_tgid/remove_tgid, dropped, lost_stacks,
    #: tgids_refused.
    engine = None

    def __init__(self, state: CaptureState, tgids: Optional[Set[int]]) -> None:
        self.state = state
        self.tgids = None if tgids is None else set(tgids)

    def start(self) -> None:
        self.engine.start()

    def enable(self) -> None:
        """Start sampling, for a source whose start() left its events off."""

    def proc_read(self, pid: int, maps) -> None:
        """Process ``pid`` was read from /proc at the start (``maps``: all
        its mappings, as read then), before the events go on."""

    def follow(self, new: List[tuple], gone: List[int]) -> None:
        """Processes forked by followed ones are followed too (their threads
        are covered by the tgid already), exited ones forgotten."""
        if self.tgids is None:
            return
        for pid, ppid in new:
            if ppid in self.tgids and pid not in self.tgids:
                self.tgids.add(pid)
                self.engine.add_tgid(pid)
        for pid in gone:
            if pid in self.tgids:
                self.tgids.discard(pid)
                self.engine.remove_tgid(pid)

    def feed(self) -> None:
        """Move what was captured since the last call into the state."""
        raise NotImplementedError

    def max_wait(self) -> float:
        """Seconds this source may go without a drain from now on (0: at the
        normal pace).  A source whose kernel side can be woken for, or
        holds what it captures for long enough, lets a quiet capture drain
        less often (see perfagent.session.Capture.next_wait)."""
        return 0.0

    def wake_fds(self) -> List[int]:
        """Descriptors that become readable when this source's kernel side
        wants a drain before its max_wait is up (a ring a quarter full)."""
        return []

    def stop(self) -> None:
        """Detach and move the remainder into the state."""
        self.engine.stop()

    def close(self) -> None:
        """Release the kernel objects without collecting (after a failure)."""
        self.engine.stop()

    @property
    def dropped(self) -> int:
        """Events the kernel side could not keep (full maps or ring)."""
        return self.engine.dropped if self.engine is not None else 0

    def losses(self, what: str) -> str:
        e = self.engine
        return loss_details(e.dropped, e.lost_stacks, e.tgids_refused, what)

    def summary(self) -> str:
        return ""


class PythonWalk(Source):
    """The processes whose Python stacks the programs walk in the kernel.

    Not a source of samples: it keeps the walk's maps in step with the
    processes of the run (perfagent.python.tracking) -- examines the ones
    that exist at the start as the capture reads them from /proc (with the
    mappings it read: proc_read), registers children of walked ones as they are
    forked, examines a process again when it execs or maps a libpython,
    forgets it when it exits (one cycle late, so its last samples are still
    named), and refreshes thread states.  It runs before the sample
    sources in every cycle, so what they bring can be named.
    """

    def __init__(self, state: CaptureState, tgids: Optional[Set[int]], maps) -> None:
        from perfagent.python.tracking import PythonProcesses
        super().__init__(state, tgids)
        self.tracker = PythonProcesses(maps)
        self.maps = maps
        state.python = self.tracker
        self._exited: List[int] = []
        # --pid: the one process whose fate the end-of-run line names.
        self.target = next(iter(tgids)) if tgids is not None and len(tgids) == 1 else None

    def proc_read(self, pid: int, maps) -> None:
        """The processes that exist at the start are examined as the capture
        reads them from /proc, with the mappings it read (not read twice);
        a launched command, once it execs (follow)."""
        self.tracker.add(pid, maps)

    def follow(self, new: List[tuple], gone: List[int]) -> None:
        tracker = self.tracker
        for pid in self._exited:
            tracker.exit(pid)
            if pid != self.target:
                tracker.reasons.pop(pid, None)  # only --pid's target's reason is ever told
        self._exited = list(gone)
        for pid, ppid in new:
            if tracker.walked(ppid):
                tracker.fork(pid, ppid)
        # Processes that exec'd or mapped a libpython (only followed
        # processes produce those records): examine them (again).
        for pid in dict.fromkeys(self.state.python_rechecks):
            if tracker.walked(pid):
                tracker.exec(pid)
            else:
                tracker.add(pid)
        self.state.python_rechecks = []

    def feed(self) -> None:
        self.tracker.new_drain()
        self.tracker.refresh()

    def max_wait(self) -> float:
        # Thread states are refreshed by the clock (the program finds new
        # threads on its own meanwhile); forks and execs are seen when the
        # side band is drained, which Capture.next_wait keeps prompt.
        return float("inf")

    def stop(self) -> None:
        self.tracker.new_drain()

    def close(self) -> None:
        from perfagent.offcpu.common import close_all
        close_all([self.maps.procs, self.maps.threads])

    def losses(self, what: str) -> str:
        return ""

    def summary(self) -> str:
        return self.tracker.summary(self.target)


class OnCpuSource(Source):
    """An on-CPU source: cpu-clock events on every CPU run its program,
    which keeps the samples of the followed processes (``tgids``; None:
    every process).

    Per-CPU events rather than per-thread ones (as the ring-buffer fallback
    uses): an inherited per-thread event counts each new thread's CPU time
    from zero, so a thread that lives less than one sampling period (a
    thread per request) is never sampled at all.  A CPU's timer samples
    whatever runs on it.  The program follows children of followed
    processes on its own (their parent is followed), from their first
    sample."""

    names_due = 0.0   # when python_names_due next says yes

    def start(self) -> None:
        """The program loaded and attached, its events still off: the
        capture turns them on (enable) once it has read /proc and opened
        the side band.  Until a process's tables load, each of its stacks
        is left to the agent's walker: on a host with thousands of
        processes, reading /proc with the events on was that many more
        stack copies to walk."""
        self.engine.start(enable=False)

    def enable(self) -> None:
        self.engine.enable()

    def max_wait(self) -> float:
        """Until the count map or the stack stores could fill (see
        counts_room), and no later than the Python names are due."""
        return self._names_wait(counts_room(self.engine))

    def _names_wait(self, wait: float) -> float:
        """``wait``, or less when the Python names are due sooner."""
        python = self.state.python
        if python is not None and len(python):
            wait = min(wait, max(NAMES_SLACK, self.names_due - time.monotonic()))
        return wait


#: Counted stacks are collected at least this often while CPython processes
#: are walked: their Python frames are named from the live process's memory
#: (code objects), which is gone once it exits -- a short-lived or killed
#: interpreter whose counts waited for a full map or the end was all
#: ``<unknown>``.  Names are cached per process, so later collections cost little.
PYTHON_COLLECT_INTERVAL = 1.0
#: A drain this close to the due time collects (a quiet drain loop waits
#: until the names are due: a wait that ends a little early, the poll's
#: milliseconds rounded down, must not cost another cycle).
NAMES_SLACK = 0.02


#: A quiet source lets the drain loop wait at most this share of the time its
#: kernel maps or ring would take to fill at the worst rate: every CPU
#: sampled at the full rate, each sample a new stack (or a whole record).
FILL_SHARE = 0.25


def counts_room(engine) -> float:
    """Seconds before a counting engine's maps could fill (times
    FILL_SHARE): its count map (inserts since the last collection, at
    most), and its native stack store, which holds a user and a kernel
    stack per count until the collection drains it."""
    rate = float(engine.sample_rate * max(1, len(engine.cpus)))
    pending = engine.pending_bound(time.monotonic())
    room = min(engine.max_entries - pending, (engine.stack_entries - 2 * pending) / 2.0)
    return FILL_SHARE * max(0.0, room) / rate


def python_names_due(source) -> bool:
    """Whether a counting source should collect now so that its Python
    frames are named while their processes live (see PYTHON_COLLECT_INTERVAL)."""
    python = source.state.python
    if python is None or not len(python):
        return False
    now = time.monotonic()
    if now < source.names_due - NAMES_SLACK:
        return False
    source.names_due = now + PYTHON_COLLECT_INTERVAL
    return True


def add_counted_stacks(state: CaptureState, stacks) -> None:
    """Stacks counted in the kernel (``--unwind fp``, the kernel walk) into the state."""
    add = state.add_counted
    for st in stacks or ():
        add(st.tgid, st.tid, tuple(st.kernel_ips), tuple(st.user_ips), st.samples, st.period_ns,
            st.python)


def add_records(state: CaptureState, samples, fell_back=None) -> None:
    """Whole captures (registers and stack copy) for the state's walker, as
    the ring-buffer sample tuple (perfagent.perf.records) with the Python
    stack appended; ``fell_back(tgid, seconds)`` hears of each one that
    carries a user context (the kernel walk left it to user space)."""
    on_sample = state.on_sample
    for s in samples:
        regs = s.regs
        if regs and fell_back is not None:
            fell_back(s.tgid, s.time / 1e9 if s.time else None)
        ip = regs[3] if regs else (s.kernel_ips[0] if s.kernel_ips else 0)
        on_sample((s.tgid, s.tid, s.time, s.cpu, s.period, ip, s.kernel_ips, (),
                   regs, s.stack if regs else None, s.python))


class OnCpuCounts(OnCpuSource):
    """``--unwind fp``: counted in the kernel; drained when half full and at the end."""

    def __init__(self, state: CaptureState, tgids: Optional[Set[int]], sample_rate: int,
                 python=None) -> None:
        from perfagent.offcpu.inkernel import InKernelSampler
        super().__init__(state, tgids)
        self.engine = InKernelSampler(sample_rate, self.tgids, python=python)

    def feed(self) -> None:
        # Registered by a running source only (one that failed to start
        # must not hold exited processes forever).
        self.state.hold_counts("oncpu")
        if self.state.exits_waiting() or python_names_due(self):
            # Exited processes are released once their counts are in.
            self._add(self.engine.collect_if_full(0.0))
            self.state.counts_collected("oncpu")
        else:
            self._add(self.engine.collect_if_full())

    def stop(self) -> None:
        self.engine.stop()
        self._add(self.engine.collect())

    def _add(self, stacks) -> None:
        add_counted_stacks(self.state, stacks)


class OnCpuRecords(OnCpuSource):
    """``--unwind dwarf|auto``: whole captures, unwound by the state's walker."""

    def __init__(self, state: CaptureState, tgids: Optional[Set[int]], sample_rate: int,
                 stack_size: int, python=None) -> None:
        from perfagent.offcpu.inkernel import RecordSampler
        super().__init__(state, tgids)
        self.engine = RecordSampler(sample_rate, self.tgids, stack_size, python=python)

    def feed(self) -> None:
        self._add(self.engine.drain())

    def max_wait(self) -> float:
        return 0.0      # every sample is a record in a ring nothing wakes us for

    def stop(self) -> None:
        self.engine.stop()
        self._add(self.engine.collect())

    def _add(self, samples) -> None:
        add_records(self.state, samples)


class OnCpuKernelWalk(OnCpuSource):
    """``--unwind dwarf|auto`` walked in the kernel (``--unwind-in``): the
    stack program walks user stacks with the binaries' CFI tables and
    counts them like ``--unwind fp``; a stack it leaves to user space
    (a process not loaded yet, a binary refused) arrives as a record for
    the state's walker, and names the process whose tables to load
    (perfagent.unwind.kernel)."""

    REFRESH_INTERVAL = 1.0   # loaded processes' mappings are compared this often

    def __init__(self, state: CaptureState, tgids: Optional[Set[int]], sample_rate: int,
                 stack_size: int, auto: bool, python=None) -> None:
        from perfagent.unwind.kernel import KUnwindSampler, shared_tables
        super().__init__(state, tgids)
        self.loader = TableLoader(shared_tables(state, auto).acquire(), state)
        self.engine = KUnwindSampler(sample_rate, self.tgids, stack_size, self.loader.tables.maps,
                                     python=python)
        state.hold_counts("oncpu")
        self._fell_back = 0     # records the last drain read (walks left to user space)

    @property
    def tables(self):
        return self.loader.tables

    def follow(self, new: List[tuple], gone: List[int]) -> None:
        super().follow(new, gone)
        self.loader.gone(gone)

    def feed(self) -> None:
        self._records(self.engine.drain())
        if self.state.exits_waiting() or python_names_due(self):
            # Exited processes are released once their counts are in.
            self._add(self.engine.collect_counts(False))
            self.state.counts_collected("oncpu")
        else:
            self._add(self.engine.collect_counts())
        if self.loader.loading():
            # The fallbacks' walks first: the FDEs they decode go into the
            # tables loaded now, not into a rebuild a cycle later (which
            # let every stack of a busy process fall back one more cycle).
            self.state.walk_pending()
        self.loader.load()

    def stop(self) -> None:
        try:
            self.engine.stop()
            self._records(self.engine.collect())
            self._add(self.engine.collect_counts(False))
        finally:
            self.loader.release()

    def close(self) -> None:
        try:
            self.engine.stop()
        finally:
            self.loader.release()

    def max_wait(self) -> float:
        """The normal pace while stacks fall back to user space (a process
        waits to be loaded); else until the Python names are due (or the
        session's longest wait).  Neither the fallback ring nor the count
        map bounds the wait: the program wakes the drain loop once a quarter
        of the ring waits or the count map holds what is collected at
        (wake_fds, accounting.emit_accumulate)."""
        if self._fell_back or self.loader.loading():
            return 0.0
        return self._names_wait(float("inf"))

    def wake_fds(self) -> List[int]:
        return self.engine.wake_fds()

    def _records(self, samples) -> None:
        self._fell_back = len(samples)
        add_records(self.state, samples, self.loader.fell_back)

    def _add(self, stacks) -> None:
        add_counted_stacks(self.state, stacks)

    def summary(self) -> str:
        return kernel_walk_summary(self.engine.outcomes(), self.tables, "")


class TableLoader:
    """A source's share of the capture's KernelTables: the processes whose
    walks fell back are loaded, within each cycle's share of time; now and
    then the loaded ones whose mappings changed are reloaded."""

    REFRESH_INTERVAL = 1.0

    def __init__(self, tables, state: CaptureState) -> None:
        self.tables = tables
        self.state = state
        self.waiting: Dict[int, int] = {}   # pid -> stacks that fell back since it was (re)loaded
        self.since: Dict[int, float] = {}   # pid -> when its first stack fell back
        self._asked: Dict[int, int] = {}    # pid -> its waiting count when last found not ready
        self._next_refresh = 0.0
        self._last_load = time.monotonic()
        self._released = False

    def _ready(self, pid: int, n: int) -> bool:
        """tables.ready, asked again only when the process fell back again
        (hundreds of short-lived processes wait on a busy machine: looking
        at all their mappings every cycle cost more than it saved)."""
        if self._asked.get(pid) == n:
            return False
        self._asked[pid] = n
        return self.tables.ready(self.state, pid)

    def fell_back(self, pid: int, when: Optional[float] = None) -> None:
        """A stack of ``pid`` fell back; ``when``: the sample's time
        (CLOCK_MONOTONIC seconds, as bpf_ktime_get_ns), so that a drain
        cycle that ran long does not age the process by another cycle."""
        n = self.waiting.get(pid, 0)
        if not n and pid not in self.since:
            self.since[pid] = time.monotonic() if when is None else min(when, time.monotonic())
        self.waiting[pid] = n + 1

    def loading(self) -> bool:
        """Whether a process waits to be loaded that will be (one that fell
        back too few times stays with the user-space walker: it does not
        keep the drain loop at its normal pace)."""
        from perfagent.unwind.kernel import LOAD_AFTER_FALLBACKS
        return any(n >= LOAD_AFTER_FALLBACKS for n in self.waiting.values())

    def gone(self, pids: List[int]) -> None:
        for pid in pids:
            self.waiting.pop(pid, None)
            self.since.pop(pid, None)
            self._asked.pop(pid, None)
            self.tables.forget(pid)
        # A process's last fallback records may be read after its exit was
        # handled (the BPF ring is read after the perf ring): they name it
        # again.  Exited (or released and dropped) processes are let go here.
        procs = self.state.processes
        for held in (self.waiting, self.since, self._asked):
            dead = [pid for pid in held if procs.get(pid) is None or procs[pid].exited]
            for pid in dead:
                del held[pid]

    def load(self) -> None:
        """The busiest processes first (on a whole machine, hundreds wait at
        the start; the ones sampled most are worth loading first), until
        this cycle's share of time is spent."""
        from perfagent.unwind.kernel import (
            LOAD_AFTER_FALLBACKS, LOAD_HOT_FALLBACKS, LOAD_MAX_SECONDS, LOAD_MIN_AGE, LOAD_SECONDS_PER_CYCLE,
            LOAD_SHARE,
        )
        now = time.monotonic()
        last, self._last_load = self._last_load, now
        budget = min(LOAD_MAX_SECONDS, max(LOAD_SECONDS_PER_CYCLE, LOAD_SHARE * (now - last)))
        # A process sampled a few times, or short-lived, stays with the
        # user-space walker, unless its binaries are compiled already or it
        # is busy.
        old = now - LOAD_MIN_AGE
        pids = sorted((pid for pid, n in self.waiting.items()
                       if n >= LOAD_HOT_FALLBACKS
                       or (n >= LOAD_AFTER_FALLBACKS and self.since.get(pid, now) <= old)
                       or self._ready(pid, n)),
                      key=lambda pid: -self.waiting[pid])
        pids += [pid for pid in self.tables.changed(self.state) if pid not in self.waiting]
        if now >= self._next_refresh:
            self._next_refresh = now + self.REFRESH_INTERVAL
            pids += [pid for pid in self.tables.loaded_pids() if pid not in self.waiting]
        self.tables.refresh(self.state, pids, now + budget)
        for pid in list(self.waiting):
            if self.tables.loaded(pid):
                del self.waiting[pid]

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.tables.release()


def kernel_walk_summary(counts: List[int], t, prefix: str) -> str:
    """The end-of-run line of the in-kernel walk (``counts`` per UW_STATUS_*)."""
    from perfagent.stackprog.kunwind import STATUS_NAMES, UW_STATUS_FALLBACK, UW_STATUS_RUNNING, UW_STATUS_SELF
    walked = sum(counts[1:UW_STATUS_FALLBACK])
    parts = ", ".join("%d %s" % (counts[i], STATUS_NAMES[i])
                      for i in range(1, UW_STATUS_FALLBACK))
    line = ("%sunwound %d user stacks in the kernel: %s; %d fell back to user space"
            % (prefix, walked, parts, counts[UW_STATUS_FALLBACK]))
    if counts[UW_STATUS_RUNNING]:
        line += "; %d without a user stack" % counts[UW_STATUS_RUNNING]
    if len(counts) > UW_STATUS_SELF and counts[UW_STATUS_SELF]:
        line += "; %d %s" % (counts[UW_STATUS_SELF], STATUS_NAMES[UW_STATUS_SELF])
    if t is not None:
        line += "; tables: %d binaries, %d rows (%d rebuilds as FDEs were decoded), loaded in %.2f s" % (
            t.binaries_loaded, t.rows_loaded, t.rebuilds, t.load_seconds)
        if getattr(t, "evicted", 0):
            line += "; %d evicted (no loaded process mapped them)" % t.evicted
        if t.refused:
            line += "; %d refused (%s)" % (len(t.refused), "; ".join(
                "%s: %s" % kv for kv in sorted(t.refused.items())[:3]))
    return line


def dwarf_oncpu_source(state: CaptureState, tgids: Optional[Set[int]], opts, python,
                       notes: List[str]) -> OnCpuSource:
    """The on-CPU source of ``--unwind dwarf|auto``: walked in the kernel when
    ``opts.unwind_in`` allows it and the kernel can (bpf_loop), else stack
    copies for the user-space walker (with a note saying why, under auto).
    ``--unwind-in kernel`` on a kernel that cannot is an error."""
    if opts.unwind_in in ("kernel", "auto"):
        from perfagent.bpf.syscall import BPFError
        from perfagent.errors import CaptureError
        from perfagent.unwind.kernel import kernel_walk_supported
        try:
            why = kernel_walk_supported()
        except (BPFError, OSError) as exc:
            why = str(exc)
        if why is None:
            return OnCpuKernelWalk(state, tgids, opts.sample_rate, opts.stack_size,
                                   opts.unwind == "auto", python)
        if opts.unwind_in == "kernel":
            raise CaptureError("--unwind-in kernel: %s; use --unwind-in user" % why)
        notes.append("user stacks are walked in user space: %s" % why)
    return OnCpuRecords(state, tgids, opts.sample_rate, opts.stack_size, python)


class OffCpu(Source):
    """``--offcpu``: the sched_switch collector.

    With a DWARF unwinder (``--unwind dwarf``/``auto``, when the state has
    an ``offcpu_walker``) the collector copies each episode's user stack
    (``stack_size`` bytes) and the state unwinds it as it arrives; a kernel
    that cannot load that program gets frame-pointer user stacks instead,
    with one line saying so (``log``).
    """

    COLLECT_INTERVAL = 1.0

    def __init__(self, state: CaptureState, tgids: Optional[Set[int]], stack_size: int,
                 kernel_lookup, log, python=None, unwind_in: str = "user", auto: bool = False) -> None:
        super().__init__(state, tgids)
        self.python = python
        self.stack_size = stack_size if state.offcpu_walker is not None else 0
        self.kernel_lookup = kernel_lookup
        self.log = log
        # --unwind-in: the walk in the kernel too (copies only for what it leaves).
        self.loader: Optional[TableLoader] = None
        if self.stack_size and unwind_in in ("kernel", "auto"):
            from perfagent.unwind.kernel import kernel_walk_supported, shared_tables
            why = kernel_walk_supported()
            if why is None:
                self.loader = TableLoader(shared_tables(state, auto).acquire(), state)
            elif unwind_in == "kernel":
                from perfagent.errors import CaptureError
                raise CaptureError("--unwind-in kernel: %s; use --unwind-in user" % why)
        self.engine = self._collector(self.stack_size)
        self._next = 0.0

    def _collector(self, copy_stack: int):
        from perfagent.offcpu.collector import OffCpuCollector
        return OffCpuCollector(set(self.tgids) if self.tgids is not None else None,
                               copy_stack=copy_stack, on_copy=self._on_copy,
                               python=self.python,
                               kunwind=self.loader.tables.maps if self.loader and copy_stack else None)

    def _on_copy(self, tgid: int, copy) -> None:
        if self.loader is not None:
            self.loader.fell_back(tgid)        # its walk fell back: load its tables
        self.state.unwind_copy(tgid, copy)

    def follow(self, new: List[tuple], gone: List[int]) -> None:
        super().follow(new, gone)
        if self.loader is not None:
            self.loader.gone(gone)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.loader is not None:
                self.loader.release()

    def start(self) -> None:
        import errno
        from perfagent.bpf.syscall import BPFError, VerifierError
        try:
            self.engine.start()
        except BPFError as exc:
            # A kernel without the helpers the copy needs rejects the program
            # (the verifier); a permission problem would fail without it too.
            if not self.stack_size or (not isinstance(exc, VerifierError)
                                       and exc.errno in (errno.EPERM, errno.EACCES)):
                raise
            self.log("off-CPU stack copies unavailable (%s); off-CPU user stacks come from "
                     "frame pointers" % exc)
            self.stack_size = 0
            self.engine = self._collector(0)
            self.engine.start()

    def feed(self) -> None:
        """Read the captures every time (their ring is bounded); the count
        map and the open intervals once every COLLECT_INTERVAL."""
        self.state.hold_counts("offcpu")  # see OnCpuCounts.feed
        now = time.monotonic()
        if now < self._next:
            self._add(self.engine.drain_copies())
        else:
            self._next = now + self.COLLECT_INTERVAL
            self._add(self.engine.collect())
            self.state.counts_collected("offcpu")
        if self.loader is not None:
            self.loader.load()

    def stop(self) -> None:
        try:
            self.engine.stop()
            self._add(self.engine.collect())  # intervals still open are closed now
        finally:
            if self.loader is not None:
                self.loader.release()

    def summary(self) -> str:
        """The off-CPU unwinding line, or "" without stack copies."""
        if not self.stack_size or self.state.offcpu_walker is None:
            return ""
        line = "off-CPU: " + self.state.offcpu_walker.summary()
        if self.engine.kunwind is not None:
            line += "; " + kernel_walk_summary(self.engine.kunwind_outcomes(), None, "")
        dropped = self.engine.copies_dropped
        if dropped:
            line += "; %d episodes kept frame-pointer stacks (stack copy ring full)" % dropped
        missing = self.engine.copies_missing
        if missing:
            line += "; %d episodes lost their stack copy" % missing
        return line

    def _add(self, stacks) -> None:
        from perfagent.offcpu.collector import strip_tracing_frames
        lookup = self.kernel_lookup
        for st in stacks:
            kernel_ips = strip_tracing_frames(st.kernel_ips, lookup) if st.kernel_ips else ()
            self.state.add_offcpu(st.tgid, st.tid, tuple(kernel_ips), tuple(st.user_ips),
                                  st.count, st.blocked_ns, st.copy, st.python)
