"""On-CPU samples counted in the kernel instead of written to ring buffers.

For ``--unwind fp`` the kernel walks the stacks anyway; writing every sample
(with its callchain of up to 127 addresses) into a perf ring buffer only for
the agent to parse it and count identical stacks costs the agent CPU in
proportion to the sample rate.  Here a BPF_PROG_TYPE_PERF_EVENT program
attached to each CPU's cpu-clock event (PERF_EVENT_IOC_SET_BPF) does the
counting: it asks bpf_get_stackid for the user and kernel stack ids and adds
one sample and the sample's period to a hash map keyed by (tgid, tid, user
stack id, kernel stack id).  It returns 0, which tells perf not to emit the
sample, so no ring buffer is mapped at all; user space only drains the map.

User stacks are frame-pointer walks (bpf_get_stackid, BPF_F_USER_STACK), as
with the kernel's callchains: code without frame pointers gives short or
wrong user stacks.  What is lost compared with ring-buffer sampling: the
time of each sample (the map only has sums), and PERF_RECORD_MMAP/COMM
events; the caller reads /proc/PID/maps and comm itself, before the
processes exit.

The kernel-side cost (the stack walks, now plus a hash-map update) is paid
in the interrupted tasks' context in both designs; what in-kernel counting
saves is the agent's work per sample.  tools/bench_inkernel.py measures it.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Set, Tuple

from perfagent.records import NamedTuple
from perfagent.bpf import syscall as sc
from perfagent.bpf.btf import vmlinux
from perfagent.bpf.maps import ArrayMap, HashMap, possible_cpus
from perfagent.bpf.prog import PerfEvent, Prog
from perfagent.bpf.syscall import BPFError
from perfagent.offcpu.common import FollowsTgids, Stats, close_all, make_tgid_map
from perfagent.perf import attr as A
from perfagent.perf.sampler import online_cpus, raise_fd_limit
from perfagent.stackprog import layout as L
from perfagent.stackprog import store as S
from perfagent.stackprog.program import AGGREGATE, COUNT_KEY, RECORD, SUMS, Maps, build_oncpu

# struct bpf_perf_event_data {           (uapi linux/bpf_perf_event.h)
#     bpf_user_pt_regs_t regs;    0      (struct pt_regs on x86-64: 168 bytes)
#     __u64 sample_period;        sizeof(regs)
#     __u64 addr;
# };
# The offset comes from BTF when the struct is there; otherwise from the
# size of bpf_user_pt_regs_t; 168 (x86-64) as the last resort.
_X86_64_PT_REGS_SIZE = 168

DEFAULT_MAX_ENTRIES = 32768
# Distinct stacks between two collections (the stores are emptied at each:
# their size does not grow with the capture's length): STACK_ENTRIES_PER_CPU
# per online CPU, within these bounds.  The stores are preallocated kernel
# memory (a Python store entry is 3 KiB: 16,384 of them were 50 MB, and
# their creation 15 ms of a capture's start on a 2-CPU machine); the
# counts are collected before the native store (a user and a kernel stack
# per count) can fill (see collect_if_full).
STACK_ENTRIES_PER_CPU = 2048
MIN_STACK_ENTRIES = 4096
DEFAULT_STACK_ENTRIES = 16384
# Live followed processes at once (exited ones are removed from the map).
DEFAULT_MAX_TGIDS = 65536
# collect_if_full() drains when the map is this full.
NEAR_FULL = 0.5


class OnCpuStack(NamedTuple):
    """Samples of one thread at one (user stack, kernel stack, Python stack);
    ips leaf first; ``python`` is (frames, flags) as perfagent.stackprog.store
    decodes them, or None without a Python stack."""

    tgid: int
    tid: int
    user_ips: Tuple[int, ...]
    kernel_ips: Tuple[int, ...]
    samples: int
    period_ns: int   # sum of the samples' periods: CPU time at this stack
    python: Optional[tuple] = None


def stack_entries_for(cpus: int) -> int:
    """Entries of each stack store for a machine of ``cpus`` CPUs."""
    n = MIN_STACK_ENTRIES
    while n < min(DEFAULT_STACK_ENTRIES, cpus * STACK_ENTRIES_PER_CPU):
        n *= 2
    return n


def sample_period_offset() -> int:
    """offsetof(struct bpf_perf_event_data, sample_period) on this kernel."""
    try:
        btf = vmlinux()
    except (BPFError, OSError):
        return _X86_64_PT_REGS_SIZE
    try:
        return btf.member("bpf_perf_event_data", "sample_period").offset
    except BPFError:
        pass
    try:
        return btf.size_of(btf.find("bpf_user_pt_regs_t"))
    except BPFError:
        return _X86_64_PT_REGS_SIZE


class InKernelSampler(FollowsTgids):
    """cpu-clock sampling at ``sample_rate`` Hz on every online CPU, counted
    per stack in the kernel.

    ``tgids`` None samples every process (like ``-a``); a set limits the
    counting to those processes (the events still fire on every CPU, the
    program ignores other threads), and ``add_tgid`` adds one while running.
    Call ``collect_if_full()`` now and then (cheap: two map lookups) or
    ``collect()`` periodically, and ``collect()`` once after ``stop()``.
    """

    def __init__(self, sample_rate: int, tgids: Optional[Set[int]] = None,
                 max_entries: int = DEFAULT_MAX_ENTRIES,
                 stack_entries: int = 0,
                 max_tgids: int = DEFAULT_MAX_TGIDS, own_events: bool = True,
                 python=None) -> None:
        # python: perfagent.stackprog.python.PyWalkMaps, to walk the Python
        # stacks of the processes user space registered there.
        self.python = python
        self._pystore: Optional[HashMap] = None
        # own_events False: the program is loaded but attached by the caller
        # to its own perf events (perfagent.perf.sampler.Sampler's
        # bpf_prog_fd: per-thread events for --pid and launch mode, whose
        # samples follow the threads' own CPU time); ``prog_fd`` gives it.
        self.own_events = own_events
        self.sample_rate = sample_rate
        self._initial_tgids = None if tgids is None else set(tgids)
        self.max_entries = max_entries
        self.max_tgids = max(max_tgids, len(self._initial_tgids or ()))
        self.cpus = online_cpus()
        self.stack_entries = stack_entries or stack_entries_for(len(self.cpus))
        self._tgids: Optional[HashMap] = None
        self._counts: Optional[HashMap] = None
        self._native: Optional[HashMap] = None
        self._scratch: Optional[ArrayMap] = None
        self._stats: Optional[Stats] = None
        self._prog: Optional[Prog] = None
        self._events: List[PerfEvent] = []
        self._cache = S.StoreCache()
        self._pending: List[OnCpuStack] = []
        self._drops = 0
        self._store_drops = 0
        self._running = False

    def _attr(self) -> bytes:
        flags = A.attr_flags(disabled=True, freq=True, exclude_hv=True)
        # No sample_type bits: the program reads what it needs from the
        # context, and nothing is ever written to a ring buffer.
        return A.pack_attr(A.PERF_TYPE_SOFTWARE, A.PERF_COUNT_SW_CPU_CLOCK,
                           self.sample_rate, 0, flags)

    #: The stack program's mode (perfagent.stackprog.program).
    MODE = AGGREGATE

    def start(self, enable: bool = True) -> None:
        """Maps, the program in this sampler's MODE, then the events, on
        (sampling) unless ``enable`` is False (then :meth:`enable` turns
        them on); on any failure everything made so far is closed.
        Subclasses differ only in :meth:`_copy_spec` and :meth:`_make_maps`."""
        if self._running:
            return
        try:
            raise_fd_limit()
            copy = self._copy_spec()
            self._tgids = make_tgid_map(self._initial_tgids, self.max_tgids)
            maps = self._make_maps(copy)
            prog = build_oncpu(self.MODE, maps, sample_period_offset(), copy, python_walk=self._walk())
            self._prog = prog.load(sc.BPF_PROG_TYPE_PERF_EVENT)
            self._open_events()
            if enable:
                self.enable()
        except BaseException:
            self._close()
            raise
        self._running = True

    def _copy_spec(self):
        """What each sample copies of the user stack (None: nothing)."""
        return None

    def _make_maps(self, copy) -> Maps:
        self._make_count_maps()
        self._make_capture_maps(copy)
        return Maps(self._scratch, self._stats, self._tgids, self._counts, self._native,
                    self._pystore, None, self._follow())

    def _make_count_maps(self) -> None:
        """The count map and the stack stores (aggregated modes)."""
        self._counts = HashMap(COUNT_KEY.size, SUMS.size, self.max_entries, name="oncpu_counts")
        self._native = S.native_store(self.stack_entries, "oncpu_stacks")
        if self.python is not None:
            self._pystore = S.python_store(self.stack_entries, "oncpu_pystacks")

    def _make_capture_maps(self, copy) -> None:
        """The per-CPU capture slot (with room for ``copy``) and the stats."""
        copy_stack, pages = (self.copy_stack, copy.pages) if copy is not None else (0, 0)
        self._scratch = ArrayMap(L.scratch_size(copy_stack, pages), possible_cpus(), name="oncpu_scratch")
        self._stats = Stats()

    def _walk(self):
        if self.python is None:
            return None
        from perfagent.stackprog.program import KEY_TGID
        from perfagent.stackprog.python import emit_python_walk
        return emit_python_walk(self.python, KEY_TGID)

    def _open_events(self) -> None:
        if not self.own_events:
            return
        attr = self._attr()
        for cpu in self.cpus:
            ev = PerfEvent(attr, -1, cpu)
            self._events.append(ev)
            ev.set_bpf(self._prog)

    def enable(self) -> None:
        """Turn the events on: sampling starts (again, harmless)."""
        for ev in self._events:
            ev.enable()

    @property
    def prog_fd(self) -> int:
        """The loaded program's fd (for a caller attaching it to its events)."""
        assert self._prog is not None, "start() first"
        return self._prog.fd

    #: Entries the count map held when last read, and when (collect_if_full).
    last_pending = 0
    _pending_at = 0.0

    def pending_bound(self, now: float) -> float:
        """At most how many entries the count map holds now: as last read,
        plus one per sample since (every CPU at the rate: cpu-clock's period
        is fixed from the frequency; twice that, for safety)."""
        return self.last_pending + 2.0 * self.sample_rate * len(self.cpus) * max(0.0, now - self._pending_at)

    def collect_if_full(self, fraction: float = NEAR_FULL) -> List[OnCpuStack]:
        """``collect()`` when the count map is ``fraction`` full, or holds
        that share of half the native store's entries (a user and a kernel
        stack per count), else [].  The map's fill is read (a bpf() call)
        only when the samples since the last read could have filled it that
        far."""
        if not self._running:
            return []
        now = time.monotonic()
        limit = fraction * min(self.max_entries, self.stack_entries // 2)
        if self.pending_bound(now) < limit:
            return []
        self.last_pending, self._pending_at = self.pending_entries(), now
        if self.last_pending >= limit:
            return self._gather()
        return []

    def pending_entries(self) -> int:
        return self._stats.pending() if self._stats is not None else 0

    @property
    def dropped(self) -> int:
        """Samples lost because the count map was full."""
        if self._stats is not None:
            self._drops = self._stats.drops
        return self._drops

    @property
    def lost_stacks(self) -> int:
        """Stacks lost because a stack store was full (their samples are
        counted with that stack missing)."""
        return self._cache.lost

    @property
    def prog_ids(self) -> List[int]:
        return [self._prog.id] if self._prog is not None else []

    @property
    def map_ids(self) -> List[int]:
        maps = [self._tgids, self._counts, self._native, self._scratch,
                self._stats.map if self._stats is not None else None]
        return [m.id for m in maps if m is not None]

    def stop(self) -> None:
        if not self._running:
            self._close()
            return
        try:
            # Closing the events detaches the program: the maps are then final.
            close_all(self._events)
            self._events = []
            self._pending.extend(self._gather())
        finally:
            self._running = False
            self._close()

    def _close(self) -> None:
        objs = list(self._events) + [self._prog, self._counts, self._native, self._pystore,
                                     self._scratch, self._tgids, self._stats]
        self._events = []
        self._prog = None
        self._counts = self._native = self._pystore = self._scratch = self._tgids = None
        self._stats = None
        close_all(objs)

    def _gather(self) -> List[OnCpuStack]:
        assert self._counts is not None and self._stats is not None
        self._drops = self._stats.drops
        self._stats.before_drain()
        self.last_pending, self._pending_at = 0, time.monotonic()
        sums: Dict[Tuple[int, int, int, int, int], List[int]] = {}
        # Counts first, then the stores: every count read was added after
        # its stacks were stored, so draining the stores second finds them.
        for k, v in self._counts.drain():
            n, period = SUMS.unpack(v)
            key = COUNT_KEY.unpack(k)
            s = sums.get(key)
            if s is None:
                sums[key] = [n, period]
            else:   # the fallback drain may see a key twice
                s[0] += n
                s[1] += period
        S.drain_into(self._cache, self._native, self._pystore)
        native, python = self._cache.native, self._cache.python
        out = [OnCpuStack(tgid, tid, native(uh) or (), native(kh) or (), n, period,
                          python(ph) if ph else None)
               for (tgid, tid, kh, uh, ph), (n, period) in sums.items()]
        self._cache.rotate()   # every count was read: older stores cannot be asked for
        return out


# ----------------------------------------------------------------------------
# On-CPU samples as whole captures (record mode), for unwinding in user space.

DEFAULT_RING_BYTES_PER_CPU = 2 << 20
MAX_RING_BYTES = 256 << 20


def ring_bytes_for(copy_bytes: int, sample_rate: int, cpus: int) -> int:
    """A ring for about half a second of samples of every CPU (it is read
    every 100 ms; the first reads of a capture may be slow), a power of
    two between 2 MiB per CPU and 256 MiB."""
    want = int((copy_bytes + L.STACK_OFF) * sample_rate * cpus * 0.5)
    size = max(DEFAULT_RING_BYTES_PER_CPU * cpus, 1 << 20)
    while size < want and size < MAX_RING_BYTES:
        size *= 2
    p2 = 1
    while p2 < size:
        p2 *= 2
    return min(p2, MAX_RING_BYTES)


class CapturedSample(NamedTuple):
    """One on-CPU sample as the record program captured it."""

    tgid: int
    tid: int
    time: int
    cpu: int
    period: int
    regs: Optional[Tuple[int, ...]]   # user registers (arch order); None: no user context
    stack: bytes                      # user stack bytes from sp
    kernel_ips: Tuple[int, ...]
    python: Optional[tuple]           # (frames, flags) or None


class RecordSampler(InKernelSampler):
    """cpu-clock sampling where each sample is captured whole by the stack
    program (perfagent.stackprog, record mode): kernel stack, user
    registers, ``copy_stack`` bytes of user stack and the Python stack, in
    one ring-buffer record.  ``drain()`` returns the samples read since the
    last call; call it every ~100 ms.  Samples the full ring refused are
    counted in ``dropped``."""

    def __init__(self, sample_rate: int, tgids: Optional[Set[int]] = None, copy_stack: int = 32768,
                 ring_bytes: int = 0, max_tgids: int = DEFAULT_MAX_TGIDS, own_events: bool = True,
                 python=None) -> None:
        super().__init__(sample_rate, tgids, max_tgids=max_tgids, own_events=own_events, python=python)
        self.copy_stack = copy_stack
        self.ring_bytes = ring_bytes or ring_bytes_for(copy_stack, sample_rate, len(self.cpus))
        self._ring = None

    MODE = RECORD

    def _copy_spec(self):
        from perfagent.offcpu.collector import copy_spec
        return copy_spec(self.copy_stack)

    def _make_maps(self, copy) -> Maps:
        # Everything travels in the ring's records: no counts, no stores.
        self._make_capture_maps(copy)
        self._make_ring()
        return Maps(self._scratch, self._stats, self._tgids, None, None, None, self._ring,
                    self._follow())

    def wake_fds(self) -> List[int]:
        """The ring's descriptor: readable once the program forced a wakeup
        (a quarter of the ring waits; perfagent.stackprog.capture)."""
        return [self._ring.fd] if self._ring is not None else []

    def _make_ring(self) -> None:
        from perfagent.bpf.maps import RingBuf
        self._ring = RingBuf(self.ring_bytes, name="oncpu_samples")

    @property
    def dropped(self) -> int:
        """Samples the full ring refused."""
        from perfagent.offcpu.common import STAT_COPY_DROPS
        if self._stats is not None:
            self._drops = self._stats.read(STAT_COPY_DROPS)
        return self._drops

    @property
    def map_ids(self) -> List[int]:
        maps = [self._tgids, self._scratch, self._ring, self._stats.map if self._stats is not None else None]
        return [m.id for m in maps if m is not None]

    def drain(self) -> List[CapturedSample]:
        if self._ring is None:
            return []
        from perfagent.offcpu.collector import decode_capture
        out = []
        for rec in self._ring.consume():
            if len(rec) < L.HEADER.size:
                continue    # a RECORD_WAKE: it only ended the wait
            kind, tid, tgid, when, copy = decode_capture(rec)
            if kind != L.RECORD_SAMPLE:
                continue
            hdr = L.HEADER.unpack_from(rec, 0)
            user = hdr[15] & L.CAPTURE_USER
            out.append(CapturedSample(tgid, tid, when, hdr[3], hdr[5], copy.regs if user else None,
                                      copy.stack, copy.kernel_ips, copy.python))
        return out

    def stop(self) -> None:
        if not self._running:
            self._close()
            return
        try:
            close_all(self._events)
            self._events = []
            self._pending_samples = self.drain()
            self.dropped  # noqa: B018 - read the counter before the map closes
        finally:
            self._running = False
            self._close()

    def collect(self) -> list:
        out, self._pending_samples = getattr(self, "_pending_samples", []), []
        return out

    def _close(self) -> None:
        ring, self._ring = self._ring, None
        super()._close()
        close_all([ring])
