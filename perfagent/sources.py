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
from typing import List, Optional, Set

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
    that exist at the start, registers children of walked ones as they are
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

    def start(self) -> None:
        from perfagent.target import procfs
        for pid in sorted(self.tgids) if self.tgids is not None else procfs.pids():
            if not procfs.kernel_thread(pid):
                self.tracker.add(pid)

    def follow(self, new: List[tuple], gone: List[int]) -> None:
        tracker = self.tracker
        for pid in self._exited:
            tracker.exit(pid)
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
        if self.state.exits_waiting():
            # Exited processes are released once their counts are in.
            self._add(self.engine.collect_if_full(0.0))
            self.state.counts_collected("oncpu")
        else:
            self._add(self.engine.collect_if_full())

    def stop(self) -> None:
        self.engine.stop()
        self._add(self.engine.collect())

    def _add(self, stacks) -> None:
        for st in stacks or ():
            self.state.add_counted(st.tgid, st.tid, tuple(st.kernel_ips), tuple(st.user_ips),
                                   st.samples, st.period_ns, st.python)


class OnCpuRecords(OnCpuSource):
    """``--unwind dwarf|auto``: whole captures, unwound by the state's walker."""

    def __init__(self, state: CaptureState, tgids: Optional[Set[int]], sample_rate: int,
                 stack_size: int, python=None) -> None:
        from perfagent.offcpu.inkernel import RecordSampler
        super().__init__(state, tgids)
        self.engine = RecordSampler(sample_rate, self.tgids, stack_size, python=python)

    def feed(self) -> None:
        self._add(self.engine.drain())

    def stop(self) -> None:
        self.engine.stop()
        self._add(self.engine.collect())

    def _add(self, samples) -> None:
        on_sample = self.state.on_sample
        for s in samples:
            regs = s.regs
            ip = regs[3] if regs else (s.kernel_ips[0] if s.kernel_ips else 0)
            # The ring-buffer sample tuple (perfagent.perf.records), with the
            # Python stack appended.
            on_sample((s.tgid, s.tid, s.time, s.cpu, s.period, ip, s.kernel_ips, (),
                       regs, s.stack if regs else None, s.python))


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
                 kernel_lookup, log, python=None) -> None:
        super().__init__(state, tgids)
        self.python = python
        self.stack_size = stack_size if state.offcpu_walker is not None else 0
        self.kernel_lookup = kernel_lookup
        self.log = log
        self.engine = self._collector(self.stack_size)
        self._next = 0.0

    def _collector(self, copy_stack: int):
        from perfagent.offcpu.collector import OffCpuCollector
        return OffCpuCollector(set(self.tgids) if self.tgids is not None else None,
                               copy_stack=copy_stack, on_copy=self.state.unwind_copy,
                               python=self.python)

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
            return
        self._next = now + self.COLLECT_INTERVAL
        self._add(self.engine.collect())
        self.state.counts_collected("offcpu")

    def stop(self) -> None:
        self.engine.stop()
        self._add(self.engine.collect())  # intervals still open are closed now

    def summary(self) -> str:
        """The off-CPU unwinding line, or "" without stack copies."""
        if not self.stack_size or self.state.offcpu_walker is None:
            return ""
        line = "off-CPU: " + self.state.offcpu_walker.summary()
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
