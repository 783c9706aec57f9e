"""The state of one capture: processes, threads, mappings and sample counts.

Samples arrive as raw instruction pointers.  Mappings change while the
capture runs (libraries are loaded and unloaded, processes exec and exit),
so each stack is resolved against the address space *at drain time* into
(mapping, address) frames; names are looked up only at the end, once per
distinct location, when the profile is written.

Hot path: ``on_sample`` only counts the raw stack in a dict (identical
stacks dominate any real profile); ``resolve_pending`` then resolves each
distinct stack of the drain once, with a per-process cache of resolved
addresses that is dropped whenever that process's mappings change.
"""

from __future__ import annotations

import os
import sys
from array import array
from typing import Dict, Iterator, List, Optional, Tuple

from perfagent import budget
from perfagent.symbolize.native import MappedFile
from perfagent.symbolize.procmaps import AddressSpace, MapEntry, read_maps
from perfagent.target import memory, procfs
from perfagent.target import process as target_process

# Mapping kinds, stored in MappingRecord.kind.
KIND_FILE = 0     # a file-backed executable mapping: ELF symbols
KIND_JIT = 1      # anonymous executable memory: /tmp/perf-PID.map
KIND_VDSO = 2     # [vdso]
KIND_KERNEL = 3   # kernel text: /proc/kallsyms
KIND_OTHER = 4    # [vsyscall], [stack], ... : addresses only

KERNEL_MAPPING = 0  # index of the single kernel mapping in CaptureState.mappings

# The upper half of the x86-64 / aarch64 (48-bit VA) address space.
KERNEL_START = 0xFFFF800000000000
KERNEL_LIMIT = 0xFFFFFFFFFFFFFFFF

PROT_EXEC = 4

# Drains an exited process waits for in-kernel count sources to collect on
# their own before they are asked to (about a second).
EXIT_COLLECT_DRAINS = 10
# Raw counted stacks whose frames one process remembers (ProcessInfo.counted_memo;
# emptied when full: a process with more distinct stacks resolves them anew).
COUNTED_MEMO_MAX = 4096
# Every this many drains (about ten seconds) in which processes were
# released, the unwind tables of binaries no live process maps are let go.
CFI_SWEEP_DRAINS = 100
# Every this many drains (about a second) in which processes were released,
# their counted stacks move into the packed store (one pass over the live
# counts: its cost is spread, not paid per exit).
COMPACT_DRAINS = 10


class MappingRecord:
    """One mapping as the profile will show it (a pprof Mapping)."""

    __slots__ = ("index", "kind", "start", "end", "pgoff", "path", "dev_major",
                 "dev_minor", "inode", "pid", "deleted")

    def __init__(self, index: int, kind: int, entry: Optional[MapEntry], pid: int) -> None:
        self.index = index
        self.kind = kind
        self.pid = pid
        if entry is None:
            self.start, self.end, self.pgoff, self.path = KERNEL_START, KERNEL_LIMIT, 0, "[kernel]"
            self.dev_major = self.dev_minor = self.inode = 0
            self.deleted = False
        else:
            self.start, self.end, self.pgoff = entry.start, entry.end, entry.pgoff
            self.path = entry.path
            self.dev_major, self.dev_minor, self.inode = entry.dev_major, entry.dev_minor, entry.inode
            self.deleted = entry.deleted


def mapping_kind(entry: MapEntry) -> int:
    path = entry.path
    if not path:
        return KIND_JIT
    if path == "[vdso]":
        return KIND_VDSO
    if path.startswith("//anon") or path.startswith("[anon"):
        return KIND_JIT  # anonymous executable memory: how MMAP2 records and prctl names show it
    if path.startswith("["):
        return KIND_OTHER
    if path.startswith("/memfd:"):
        return KIND_JIT
    return KIND_FILE


def mapped_file(pid: int, entry) -> MappedFile:
    """What identifies the file behind ``entry`` (a MapEntry or MappingRecord) of process ``pid``."""
    return MappedFile(pid, entry.path, entry.dev_major, entry.dev_minor, entry.inode,
                      entry.start, entry.end, entry.deleted)


class ProcessInfo:
    """One process of the capture.

    Identified by (pid, start time): a pid that is reused during the capture
    gets a new ProcessInfo, so nothing of the old process (mappings, comm,
    uid and the trust in its perf map, caches) is applied to the new one.
    ``ns_pid``, ``container_id`` and ``pod_uid`` come from /proc once, while
    it lives (``view_loaded``).
    """

    __slots__ = ("pid", "comm", "space", "uid", "frame_cache", "unwind_cache", "exited", "maps_known",
                 "start", "ns_pid", "container_id", "pod_uid", "view_loaded", "released", "counted_memo")

    def __init__(self, pid: int, comm: str = "") -> None:
        self.pid = pid
        self.comm = comm
        self.space = AddressSpace()
        self.uid = -1
        self.frame_cache: Dict[int, Tuple[int, int]] = {}
        #: (kernel ips, user ips, Python stack) counted in the kernel -> (its
        #: frames, what its Python names were read from): the same stacks come
        #: back at every collection (CaptureState._counted_frames).  Derived
        #: from the mappings like frame_cache, and cleared with it.
        self.counted_memo: Dict[tuple, tuple] = {}
        # lookup pc -> (mapping, binary CFI, row), filled by the unwinder
        self.unwind_cache: Dict[int, tuple] = {}
        self.exited = False
        self.maps_known = False
        self.start = 0
        self.ns_pid = pid
        self.container_id = ""
        self.pod_uid = ""
        self.view_loaded = False
        self.released = False  # exited, and its mappings and caches let go

    def release(self) -> None:
        """Keep only the profile's labels of an exited process (pid, start,
        comm, namespace pid, container): its mappings and caches go."""
        self.space = AddressSpace()
        self.frame_cache = {}
        self.counted_memo = {}
        self.unwind_cache = {}
        self.released = True

    def apply_view(self, view: "target_process.ProcessView") -> None:
        self.start = view.identity.start
        self.comm = view.comm or self.comm
        self.uid = view.uid
        self.ns_pid = view.ns_pid
        self.container_id = view.container.container_id
        self.pod_uid = view.container.pod_uid
        self.view_loaded = True

    def mappings_changed(self) -> None:
        """Drop what was derived from the old mappings."""
        self.frame_cache.clear()
        self.counted_memo.clear()
        self.unwind_cache.clear()


# (mapping index or -1, address used for lookup), or for a named JIT frame
# (mapping index, address, name as the perf map said while it was sampled).
Frame = tuple


#: The "mapping index" of a Python frame: (PYTHON_FRAME, qualname, file, line, firstlineno).
PYTHON_FRAME = -2


def _insert_python(frames: List[Frame], user_start: int, placement: tuple,
                   intern: Dict[Frame, Frame]) -> List[Frame]:
    """``frames`` (kernel then user, leaf first) with the Python frames of
    ``placement`` inserted before the native user frame each run belongs to
    (each frame tuple interned in ``intern``: one per distinct frame, not
    one per stack that holds it)."""
    out = frames[:user_start]
    user = frames[user_start:]
    at = 0
    for index, names in placement:
        index = min(index, len(user))
        out.extend(user[at:index])
        for n in names:
            frame = (PYTHON_FRAME,) + tuple(n)
            out.append(intern.setdefault(frame, frame))
        at = max(at, index)
    out.extend(user[at:])
    return out


def sample_label_tuples(pid: int, tid: int, thread: str, process: str, ns_pid: int,
                        container_id: str, pod_uid: str) -> Tuple[tuple, tuple]:
    """The (string, numeric) labels of a thread's samples (see
    perfagent.oncpu.sample_labels), from the values they are made of: the
    same for a live process and a released one's shell."""
    labels = [("comm", thread), ("process", process)]
    numbers = [("pid", pid), ("tid", tid)]
    if container_id:
        labels.append(("container_id", container_id))
    if pod_uid:
        labels.append(("pod_uid", pod_uid))
    if ns_pid != pid:
        numbers.append(("ns_pid", ns_pid))
    return tuple(labels), tuple(numbers)


# A released process's label shell: a plain tuple (some 120 bytes, its
# strings interned) in place of a ProcessInfo with its emptied address space
# and caches (about 0.5 KB).  ``comm`` is the process label as the profile
# shows it (the thread name of the leader when the process had none).
SHELL_PID, SHELL_START, SHELL_UID, SHELL_COMM, SHELL_NS_PID, SHELL_CONTAINER, SHELL_POD, \
    SHELL_FLAGS = range(8)
SHELL_MAPS_KNOWN = 1
SHELL_VIEW_LOADED = 2


class ReleasedCounts:
    """The counted stacks of released processes, one row per (process
    shell, thread, stack) with integers only, in packed arrays: 32 bytes a
    row, where a live count costs a dict slot, its (pid, tid, stack) key
    tuple and a [count, total] list with its integers (some 0.3 KB).  The
    stack is an id in the capture's table of distinct stacks (shared by
    every process that had it), the thread's name an id in a table of
    distinct names."""

    __slots__ = ("shells", "tids", "names", "stacks", "counts", "totals")

    def __init__(self) -> None:
        self.shells = array("I")
        self.tids = array("I")
        self.names = array("I")
        self.stacks = array("I")
        self.counts = array("q")
        self.totals = array("q")

    def add(self, shell: int, tid: int, name: int, stack: int, count: int, total: int) -> None:
        self.shells.append(shell)
        self.tids.append(tid)
        self.names.append(name)
        self.stacks.append(stack)
        self.counts.append(count)
        self.totals.append(total)

    def __len__(self) -> int:
        return len(self.shells)

    def rows(self) -> Iterator[tuple]:
        """(shell id, tid, name id, stack id, count, total) per row."""
        return zip(self.shells, self.tids, self.names, self.stacks, self.counts, self.totals)

    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self.shells, self.tids, self.names, self.stacks,
                                                  self.counts, self.totals))


def _add_count(counts: dict, key: tuple, samples: int, period: int) -> None:
    slot = counts.get(key)
    if slot is None:
        counts[key] = [samples, period]
    else:
        slot[0] += samples
        slot[1] += period


class CaptureState:
    """Everything a capture learned, fed by the sampler's callbacks."""

    def __init__(self, skip_idle: bool = True, walker=None, symbolizer=None,
                 offcpu_walker=None) -> None:
        self.walker = walker
        # Unwinds off-CPU stack copies: its own outcome counts, the same CFI cache.
        self.offcpu_walker = offcpu_walker
        # Names JIT frames while the capture runs (perf maps are re-read as
        # they grow, and JIT memory is reused: a name is right only for the
        # samples taken while it was current).
        self.symbolizer = symbolizer  # a perfagent.unwind.walker.Walker for --unwind dwarf/auto
        self._pending_walks: List[tuple] = []
        self._binary_for: Dict[int, object] = {}
        self.processes: Dict[int, ProcessInfo] = {}
        self.thread_comm: Dict[int, str] = {}
        self.mappings: List[MappingRecord] = [MappingRecord(KERNEL_MAPPING, KIND_KERNEL, None, -1)]
        self._mapping_index: Dict[tuple, int] = {}
        # One tuple per distinct frame and per distinct stack, however many
        # processes and threads share them (processes share mapping records,
        # so their frames are equal): the counts' keys hold references.
        self._frames: Dict[Frame, Frame] = {}
        # Distinct stacks: stack -> id, and id -> stack (released processes'
        # counts hold the id).
        self._stack_ids: Dict[Tuple[Frame, ...], int] = {}
        self._stack_list: List[Tuple[Frame, ...]] = []
        self._pending: Dict[tuple, List[int]] = {}
        # (pid, tid, frames) -> [samples, period nanoseconds]
        self.stacks: Dict[Tuple[int, int, Tuple[Frame, ...]], List[int]] = {}
        # The same counts since the last take_increments(), when someone
        # asked for them (perf-agent top's sliding window); None: not kept.
        self.increments: Optional[Dict[Tuple[int, int, Tuple[Frame, ...]], List[int]]] = None
        self.samples = 0
        self.skip_idle = skip_idle
        self.idle_samples = 0
        self.pids_seen: set = set()
        self.forked_tids: set = set()
        # (pid, tid, frames) -> [blocks, off-CPU nanoseconds]
        self.offcpu_stacks: Dict[tuple, List[int]] = {}
        self.offcpu_samples = 0
        # perfagent.python.tracking.PythonProcesses: names the Python
        # stacks the in-kernel walk records (None: no walk in this run).
        self.python = None
        self.python_rechecks: List[int] = []  # pids that exec'd or mapped a libpython
        self.new_processes: List[Tuple[int, int]] = []  # (pid, parent pid) from FORK records
        self.gone_processes: List[int] = []  # pids from EXIT records (since last taken)
        # Threads whose EXIT came: (drain number, pid, tid), released once
        # their samples are resolved (see _release_exited).
        self._exited: List[Tuple[int, int, int]] = []
        self._drain_no = 0
        # Sources that count stacks in the kernel (their samples of a gone
        # process arrive when they collect) -> drain of their last collection.
        self._holders: Dict[str, int] = {}
        self.sampled_tids: set = set()  # tids with samples: their names label the profile
        self.released_processes = 0
        # What released processes leave (see _compact_released): their
        # label shells, their counts packed, the distinct thread names.
        self._to_compact: List[int] = []
        self._next_compact = 0
        self._shells: List[tuple] = []
        self._shell_of: Dict[int, int] = {}   # pid -> its newest shell
        self._released_on = ReleasedCounts()
        self._released_off = ReleasedCounts()
        self._names: List[str] = []
        self._name_ids: Dict[str, int] = {}
        self._next_sweep = CFI_SWEEP_DRAINS
        self._swept_at = 0          # released_processes at the last sweep

    def take_increments(self) -> Dict[Tuple[int, int, Tuple[Frame, ...]], List[int]]:
        """The on-CPU counts added since the previous call (the first call
        starts keeping them), so a live view costs what changed, not the
        whole capture."""
        taken, self.increments = self.increments or {}, {}
        return taken

    # -- processes ---------------------------------------------------------
    def process(self, pid: int) -> ProcessInfo:
        proc = self._known(pid)
        if proc is None:
            proc = self.processes[pid] = ProcessInfo(pid)
        return proc

    def _known(self, pid: int) -> Optional[ProcessInfo]:
        """The process ``pid`` as the capture knows it: a live one, or a
        released one (revived from its shell: a late sample of it resolves
        and is labelled as before it was compacted)."""
        proc = self.processes.get(pid)
        if proc is None and pid in self._shell_of:
            proc = self.processes[pid] = self._revive(pid)
            self._to_compact.append(pid)   # it leaves again at the next compaction
        return proc

    def process_info(self, pid: int) -> Optional[ProcessInfo]:
        """``pid``'s ProcessInfo for reading (labels, JIT names at the end):
        a live one, or one made from a released process's shell (not
        kept)."""
        return self.processes.get(pid) or self._revive(pid)

    def _revive(self, pid: int) -> Optional[ProcessInfo]:
        """A released ProcessInfo (no mappings, no caches) from ``pid``'s
        newest shell, or None."""
        sid = self._shell_of.get(pid)
        if sid is None:
            return None
        shell = self._shells[sid]
        proc = ProcessInfo(pid, shell[SHELL_COMM])
        proc.start = shell[SHELL_START]
        proc.uid = shell[SHELL_UID]
        proc.ns_pid = shell[SHELL_NS_PID]
        proc.container_id = shell[SHELL_CONTAINER]
        proc.pod_uid = shell[SHELL_POD]
        proc.maps_known = bool(shell[SHELL_FLAGS] & SHELL_MAPS_KNOWN)
        proc.view_loaded = bool(shell[SHELL_FLAGS] & SHELL_VIEW_LOADED)
        proc.exited = proc.released = True
        return proc

    def _new_process(self, pid: int) -> ProcessInfo:
        """A fresh ProcessInfo for ``pid``, replacing an older process's."""
        old = self.processes.get(pid)
        if old is not None:
            self._binary_for.pop(pid, None)
            memory.forget(pid)
        proc = self.processes[pid] = ProcessInfo(pid)
        return proc

    def load_view(self, proc: ProcessInfo) -> bool:
        """Read the process's identity, names and namespaces from /proc once.

        False when it is gone, or when the pid now belongs to another process
        than the one ``proc`` describes (its start time differs).
        """
        if proc.view_loaded:
            return True
        view = target_process.view(proc.pid)
        if view is None or (proc.start and view.identity.start != proc.start):
            return False
        proc.apply_view(view)
        return True

    def load_from_proc(self, pid: int, seen_maps=None) -> Optional[ProcessInfo]:
        """Seed a process from /proc: identity, mappings, comm, uid, threads' names.

        Returns None when it is already gone (or unreadable): samples of it
        will still resolve through the MMAP2 records of the capture.  A pid
        whose start time differs from the one recorded is a new process.
        ``seen_maps(pid, entries)`` is told every mapping read (the state
        keeps the executable ones), for the sources that examine processes.
        """
        view = target_process.view(pid)
        if view is None:
            return None
        proc = self.processes.get(pid)
        if proc is None or (proc.start and proc.start != view.identity.start):
            proc = self._new_process(pid)
        entries: List[MapEntry] = []     # a kernel thread: no user memory
        if not view.kernel_thread:
            try:
                entries = read_maps(pid)
            except (OSError, ValueError):
                return None
        proc.apply_view(view)
        if seen_maps is not None and entries:
            seen_maps(pid, entries)
        proc.space = AddressSpace(e for e in entries if e.is_exec)
        proc.mappings_changed()
        proc.maps_known = True
        if view.kernel_thread:
            self.thread_comm.setdefault(pid, view.comm)   # its one thread, named in the view
            return proc
        try:
            for tid in procfs.threads(pid):
                comm = procfs.comm(pid, tid)
                if comm:
                    self.thread_comm.setdefault(tid, comm)
        except OSError:
            pass
        return proc

    # -- record callbacks --------------------------------------------------
    def on_event(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "mmap":
            _, pid, tid, addr, length, pgoff, maj, mnr, ino, prot, filename, _bid = ev
            if pid == 0xFFFFFFFF or not prot & PROT_EXEC:
                return  # kernel module maps (pid -1) and data mappings
            proc = self.process(pid)
            proc.space.add(addr, addr + length, pgoff, filename, True, maj, mnr, ino)
            proc.mappings_changed()
            if self.python is not None and "libpython" in filename and not self.python.walked(pid):
                self.python_rechecks.append(pid)
        elif kind == "comm":
            _, pid, tid, comm, is_exec = ev
            comm = sys.intern(comm)   # one string per distinct name, however many threads had it
            self.thread_comm[tid] = comm
            proc = self.process(pid)
            if pid == tid:
                proc.comm = comm
            if is_exec:
                # exec replaced the image: its MMAP2 records follow this one.
                proc.space = AddressSpace()
                proc.mappings_changed()
                proc.maps_known = True
                if self.python is not None:
                    self.python_rechecks.append(pid)
        elif kind == "fork":
            _, pid, ppid, tid, ptid, _time = ev
            self.forked_tids.add(tid)
            if pid == ppid and self.python is not None:
                self.python.thread_born(pid)     # a new thread: its thread state
            parent = self.processes.get(ppid)
            # A new process starts with its parent's mappings and name.  Rings
            # of different CPUs are not ordered with each other, so the child's
            # own COMM/MMAP2 (after an exec on another CPU) may already be in:
            # never overwrite what the child itself reported.
            known = self.processes.get(pid)
            if pid != ppid and (known is None or known.exited):
                # A new process; one that had this pid before is gone (its
                # EXIT was seen): nothing of it carries over (pid reuse).
                self.new_processes.append((pid, ppid))
                child = self._new_process(pid)
                if parent is not None:
                    child.space = parent.space.fork_copy()
                    child.comm = parent.comm
                    child.uid = parent.uid
                    child.maps_known = parent.maps_known
                    child.mappings_changed()
            if tid not in self.thread_comm:
                name = self.thread_comm.get(ptid) or (parent.comm if parent else "")
                if name:
                    self.thread_comm[tid] = name
        elif kind == "exit":
            _, pid, _ppid, tid, _ptid, _time = ev
            self._exited.append((self._drain_no, pid, tid))
            if pid == tid:
                self.gone_processes.append(pid)
                if pid in self.processes:
                    self.processes[pid].exited = True
                    memory.forget(pid)

    def on_sample(self, s: tuple) -> None:
        """Count one raw sample (the per-sample hot path: one dict update)."""
        pid = s[0]
        if pid == 0 and self.skip_idle:
            self.idle_samples += 1
            return
        kernel_ips = s[6]
        user_ips = s[7]
        python = s[10] if len(s) > 10 else None
        if s[8] is not None and self.walker is not None:
            # Unwound after the drain, once every ring's MMAP2 records are in.
            self._pending_walks.append((pid, s[1], kernel_ips, s[8], s[9], s[4], python))
            return
        if not kernel_ips and not user_ips:
            ip = s[5]
            if ip >= KERNEL_START:
                kernel_ips = (ip,)
            else:
                user_ips = (ip,)
        key = (pid, s[1], kernel_ips, user_ips, self._python_placement(pid, user_ips, python))
        slot = self._pending.get(key)
        if slot is None:
            self._pending[key] = [1, s[4]]
        else:
            slot[0] += 1
            slot[1] += s[4]

    # -- resolution --------------------------------------------------------
    def resolve_pending(self) -> None:
        """Resolve this drain's distinct raw stacks against the current mappings."""
        if self.symbolizer is not None:
            self._refresh_perf_maps()
        self.walk_pending()
        pending, self._pending = self._pending, {}
        stacks = self.stacks
        increments = self.increments
        for (pid, tid, kernel_ips, user_ips, python), (count, period) in pending.items():
            frames = self._resolve(pid, kernel_ips, user_ips, python)
            key = (pid, tid, frames)
            slot = stacks.get(key)
            if slot is None:
                stacks[key] = [count, period]
            else:
                slot[0] += count
                slot[1] += period
            if increments is not None:
                _add_count(increments, key, count, period)
            self.samples += count
            if pid not in self.pids_seen:
                self._first_seen(pid)
            if tid not in self.sampled_tids:
                self._first_sample_of(pid, tid)
        self._release_exited()

    # -- process lifetime --------------------------------------------------
    def hold_counts(self, holder: str) -> None:
        """A source that counts stacks in the kernel: exited processes are
        released only after it collected (:meth:`counts_collected`).
        Called again and again by a running source (the first call counts)."""
        self._holders.setdefault(holder, -1)

    def counts_collected(self, holder: str) -> None:
        """``holder`` collected everything it counted so far."""
        self._holders[holder] = self._drain_no

    def exits_waiting(self, drains: int = EXIT_COLLECT_DRAINS) -> bool:
        """Has an exited process waited ``drains`` drains for the in-kernel
        counts to be collected?  (Such sources then collect early.)"""
        return bool(self._exited) and self._exited[0][0] <= self._drain_no - drains

    def _release_exited(self) -> None:
        """Forget what threads and processes that exited held, once their
        samples are resolved: one drain after their EXIT (samples still in
        other CPUs' rings are in by then), and after every in-kernel count
        source collected: a long system-wide run holds what its live
        processes need, not everything it ever saw.

        A process with samples keeps a shell (pid, start, comm, namespace
        pid, container: its profile labels) without mappings or caches,
        and about every second the shells and counts released since are
        packed (_compact_released); one without samples is dropped.  Its perf map, unwind closure and
        the walker's per-process memo go; names of threads without samples
        go.  Nothing a resolved stack refers to is released: frames hold
        mapping indexes, and MappingRecords stay.
        """
        current = self._drain_no
        self._drain_no += 1
        # An exit seen in drain d: released from drain d + 1 on, and only
        # once every count source collected in drain d or later.
        collected = min(self._holders.values()) if self._holders else current
        exited = self._exited
        n = 0
        while n < len(exited) and exited[n][0] < current and exited[n][0] <= collected:
            _, pid, tid = exited[n]
            n += 1
            if tid not in self.sampled_tids:
                self.thread_comm.pop(tid, None)
            self.forked_tids.discard(tid)
            if pid == tid:
                self._release_process(pid)
        if n:
            del exited[:n]
        if self._to_compact and current >= self._next_compact:
            self._next_compact = current + COMPACT_DRAINS
            self._compact_released()
        if current >= self._next_sweep:
            self._next_sweep = current + CFI_SWEEP_DRAINS
            if self.released_processes != self._swept_at:
                self._swept_at = self.released_processes
                self._sweep_cfi()

    def _sweep_cfi(self) -> None:
        """Unwind tables of binaries that only exited processes mapped go
        (the CFI cache's byte bound would keep them until it is reached)."""
        walker = self.walker or self.offcpu_walker
        if walker is None:
            return
        cache = walker.cache
        mapped = set()
        for proc in self.processes.values():
            if proc.released:
                continue  # (an exited one not released yet may still have samples to unwind)
            for e in proc.space.entries():
                if mapping_kind(e) == KIND_FILE:
                    mapped.add(cache.key_of(mapped_file(proc.pid, e)))
        cache.retain(mapped)

    def _release_process(self, pid: int) -> None:
        proc = self.processes.get(pid)
        if proc is None or not proc.exited:
            return  # a new process has the pid now
        self._binary_for.pop(pid, None)
        for walker in (self.walker, self.offcpu_walker):
            if walker is not None and hasattr(walker, "forget"):
                walker.forget(pid)
        if self.symbolizer is not None:
            self.symbolizer.forget_perf_map(pid, proc.start)
        self.released_processes += 1
        if pid in self.pids_seen:
            proc.release()
            self._to_compact.append(pid)
        else:
            del self.processes[pid]

    def _compact_released(self) -> None:
        """Move what released processes with samples hold into the compact
        store: the label shell (a tuple, strings interned) and each counted
        stack as a row of integers (stack and thread name as ids in tables
        shared by all processes).  Their ProcessInfo leaves ``processes``
        (revived from the shell by a late sample, see _known).  One pass
        over the live counts for the whole batch.  The profile is the same:
        build_profile reads the rows back with the same labels."""
        batch: Dict[int, int] = {}
        for pid in self._to_compact:
            proc = self.processes.get(pid)
            if proc is None or not proc.released or pid in batch:
                continue  # a new process has the pid now: its old counts stay under it, as before
            batch[pid] = self._new_shell(proc)
        self._to_compact = []
        if not batch:
            return
        ids = self._stack_ids
        # The leader's name goes too, whether or not rows came with it: a
        # record read late (a COMM after the release, under load) revives a
        # packed process and names it again, with no counts to move.
        threads = set(batch)
        for counts, store in ((self.stacks, self._released_on), (self.offcpu_stacks, self._released_off)):
            moved = [key for key in counts if key[0] in batch]
            for key in moved:
                pid, tid, frames = key
                count, total = counts.pop(key)
                shell = batch[pid]
                name = self.thread_comm.get(tid, "") or self._shells[shell][SHELL_COMM]
                store.add(shell, tid, self._name_id(name), ids[frames], count, total)
                threads.add(tid)
        for pid in batch:
            del self.processes[pid]
        # The threads' names are in the rows now.  (A tid forked again since
        # is another thread, which keeps its name.)
        for tid in threads:
            if tid not in self.forked_tids:
                self.thread_comm.pop(tid, None)
                self.sampled_tids.discard(tid)

    def _new_shell(self, proc: ProcessInfo) -> int:
        """Record ``proc``'s labels as a shell; its id."""
        flags = ((SHELL_MAPS_KNOWN if proc.maps_known else 0)
                 | (SHELL_VIEW_LOADED if proc.view_loaded else 0))
        comm = proc.comm or self.thread_comm.get(proc.pid, "")
        shell = (proc.pid, proc.start, proc.uid, sys.intern(comm), proc.ns_pid,
                 sys.intern(proc.container_id), sys.intern(proc.pod_uid), flags)
        sid = len(self._shells)
        self._shells.append(shell)
        self._shell_of[proc.pid] = sid
        return sid

    def _name_id(self, name: str) -> int:
        nid = self._name_ids.get(name)
        if nid is None:
            nid = self._name_ids[name] = len(self._names)
            self._names.append(name)
        return nid

    def released_counts(self, offcpu: bool = False) -> Iterator[Tuple[Tuple[tuple, tuple], Tuple[Frame, ...], int, int]]:
        """((string labels, numeric labels), stack, count, total) of each
        packed count of released processes (on-CPU, or off-CPU with
        ``offcpu``): what their live counts were, with the labels
        perfagent.oncpu.sample_labels gave them."""
        store = self._released_off if offcpu else self._released_on
        stacks, names, shells = self._stack_list, self._names, self._shells
        labels_of: Dict[tuple, Tuple[tuple, tuple]] = {}
        for shell_id, tid, name, sid, count, total in store.rows():
            key = (shell_id, tid, name)
            labels = labels_of.get(key)
            if labels is None:
                sh = shells[shell_id]
                labels = labels_of[key] = sample_label_tuples(
                    sh[SHELL_PID], tid, names[name], sh[SHELL_COMM], sh[SHELL_NS_PID],
                    sh[SHELL_CONTAINER], sh[SHELL_POD])
            yield labels, stacks[sid], count, total

    def offcpu_nanoseconds(self) -> int:
        """Off-CPU time counted, live and released processes'."""
        return sum(v[1] for v in self.offcpu_stacks.values()) + sum(self._released_off.totals)

    def _released_bytes(self) -> int:
        """Bytes of what released processes left (packed counts, shells,
        their tables' slots): the figure a long run's growth is made of."""
        shells = sum(sys.getsizeof(s) + sys.getsizeof(s[SHELL_START]) for s in self._shells)
        return (self._released_on.nbytes() + self._released_off.nbytes() + shells
                + sys.getsizeof(self._shells) + sys.getsizeof(self._shell_of)
                + sum(sys.getsizeof(n) for n in self._names))

    def bookkeeping(self) -> Dict[str, int]:
        """What the capture holds, in counts (tests and benchmarks of long
        runs assert on these, not on time)."""
        live = [p for p in self.processes.values() if not p.released]
        cache = (self.walker or self.offcpu_walker)
        cfi = cache.cache if cache is not None else None
        return {
            "processes": len(self.processes),
            "processes_with_mappings": len(live),
            "mapping_entries": sum(len(p.space) for p in live),
            "frame_cache_entries": sum(len(p.frame_cache) for p in self.processes.values()),
            "unwind_cache_entries": sum(len(p.unwind_cache) for p in self.processes.values()),
            "unwind_closures": len(self._binary_for),
            "thread_names": len(self.thread_comm),
            "forked_tids": len(self.forked_tids),
            "perf_maps": self.symbolizer.perf_maps_held() if self.symbolizer is not None else 0,
            "cfi_binaries": cfi.binaries_held() if cfi is not None else 0,
            "cfi_bytes": cfi.bytes_held() if cfi is not None else 0,
            "mappings": len(self.mappings),
            "distinct_stacks": (len(self.stacks) + len(self.offcpu_stacks)
                                + len(self._released_on) + len(self._released_off)),
            "live_counts": len(self.stacks) + len(self.offcpu_stacks),
            "released_counts": len(self._released_on) + len(self._released_off),
            "process_shells": len(self._shells),
            "released_bytes": self._released_bytes(),
            "stack_table": len(self._stack_list),
            "released_processes": self.released_processes,
        }

    def add_counted(self, pid: int, tid: int, kernel_ips: tuple, user_ips: tuple,
                    samples: int, period_ns: int, python=None) -> None:
        """On-CPU samples counted in the kernel (in-kernel aggregation for
        --unwind fp); ``python``: the Python stack the kernel walked."""
        if pid == 0 and self.skip_idle:
            self.idle_samples += samples
            return
        frames, slots = self._counted_frames(pid, kernel_ips, user_ips, python, samples)
        # The stack's count per thread, found once through the whole frames
        # key (hashing a long tuple of frames) and then through the memo.
        slot = slots.get(tid) if slots is not None else None
        if slot is None:
            key = (pid, tid, frames)
            slot = self.stacks.get(key)
            if slot is None:
                slot = self.stacks[key] = [0, 0]
            if slots is not None:
                slots[tid] = slot
        slot[0] += samples
        slot[1] += period_ns
        if self.increments is not None:
            _add_count(self.increments, (pid, tid, frames), samples, period_ns)
        self.samples += samples
        if pid not in self.pids_seen:
            self._first_seen(pid)
        if tid not in self.sampled_tids:
            self._first_sample_of(pid, tid)

    def _counted_frames(self, pid: int, kernel_ips: tuple, user_ips: tuple, python, weight: int) -> tuple:
        """A counted stack's frames, and its count per thread ({tid: slot of
        self.stacks}, None when not remembered).

        Hot path: every collection brings the stacks counted since the last
        one -- the same ones again and again (one per thread, line and
        kernel path: 700-800 a second at 999 Hz on two CPUs) --, so the
        frames are remembered per process and raw stack
        (ProcessInfo.counted_memo) and used again while the mappings are
        the same (the memo is cleared with frame_cache) and every code
        object named in them is still the one read then
        (PythonProcesses.same_codes: revalidated once per drain cycle, as
        naming does).  Stacks with a frame that could not be named, or of a
        process whose Python names can no longer be read, go the long way."""
        proc = self.processes.get(pid)
        memo = proc.counted_memo if proc is not None and proc.maps_known and not proc.released else None
        key = (kernel_ips, user_ips, python)
        if memo is not None:
            got = memo.get(key)
            if got is not None:
                frames, codes, slots = got
                if codes is None:
                    return frames, slots
                if self.python is not None and self.python.same_codes(pid, codes):
                    if python[1]:
                        self.python.count_flags(python[1], weight)
                    return frames, slots
        frames = self._resolve(pid, kernel_ips, user_ips,
                               self._python_placement(pid, user_ips, python, None, weight))
        if memo is None:
            return frames, None
        codes = None
        if python and python[0] and self.python is not None:
            codes = self.python.codes_of(pid, python[0])
            if codes is None:
                return frames, None        # not all named: no memo
        elif python and python[1] and self.python is not None:
            return frames, None            # flags to count on every use: the long way
        if len(memo) >= COUNTED_MEMO_MAX:
            memo.clear()
        slots: Dict[int, List[int]] = {}   # tid -> its count in self.stacks
        memo[key] = (frames, codes, slots)
        return frames, slots

    def add_offcpu(self, pid: int, tid: int, kernel_ips: tuple, user_ips: tuple,
                   blocks: int, nanoseconds: int, copy=None, python=None) -> None:
        """Count one off-CPU stack (from the sched_switch program) at current
        mappings; with ``copy`` (a user stack copy) the user frames are its unwind."""
        sps = None
        if copy is not None:
            self.unwind_copy(pid, copy)
            user_ips = copy.user_ips
            python = copy.python
            sps = copy.sps
        frames = self._resolve(pid, kernel_ips, user_ips,
                               self._python_placement(pid, user_ips, python, sps, blocks))
        key = (pid, tid, frames)
        slot = self.offcpu_stacks.get(key)
        if slot is None:
            self.offcpu_stacks[key] = [blocks, nanoseconds]
        else:
            slot[0] += blocks
            slot[1] += nanoseconds
        self.offcpu_samples += blocks
        if pid not in self.pids_seen:
            self._first_seen(pid)
        if tid not in self.sampled_tids:
            self._first_sample_of(pid, tid)

    def _first_sample_of(self, pid: int, tid: int) -> None:
        """A thread's first sample: named from /proc when no record or /proc
        read named it yet -- a thread created while the events were being
        opened (after /proc was read, before its events or the side band
        existed) has neither its FORK nor its rename in any ring."""
        self.sampled_tids.add(tid)
        if tid not in self.thread_comm:
            name = procfs.comm(pid, tid)
            if name:
                self.thread_comm[tid] = sys.intern(name)

    def _first_seen(self, pid: int) -> None:
        """A process's first samples: read its labels (namespace pid,
        container) now, while it is alive."""
        self.pids_seen.add(pid)
        proc = self.processes.get(pid)
        if proc is None:
            proc = self.process(pid)
        if not proc.view_loaded and not proc.exited:
            self.load_view(proc)

    def _refresh_perf_maps(self) -> None:
        """Re-read grown perf maps; resolved JIT frames of those processes are redone."""
        for (pid, start), perf_map in self.symbolizer.perf_maps():
            proc = self.processes.get(pid)
            if proc is None or proc.start != start or proc.exited:
                continue  # only live processes' maps can grow
            if perf_map.refresh():
                proc.frame_cache.clear()
                proc.counted_memo.clear()

    def walk_pending(self) -> None:
        """Walk the stack copies fed so far (resolve_pending does it too;
        the in-kernel walk's table loader asks first, so that the FDEs those
        walks decode are in the tables it compiles in the same cycle)."""
        if self._pending_walks:
            self._walk_pending()

    def _walk_pending(self) -> None:
        limited = hasattr(self.walker, "new_cycle")
        if limited:
            self.walker.new_cycle()  # bounds one-time table work per drain cycle
        try:
            self._walk_all()
        finally:
            if limited:
                self.walker.new_cycle(None)

    def _walk_all(self) -> None:
        walks, self._pending_walks = self._pending_walks, []
        walk = self.walker.walk
        pending = self._pending
        me = os.getpid()
        for pid, tid, kernel_ips, regs, stack, period, python in walks:
            sps = [] if python else None
            if budget.cancelled() or pid == me:
                # Stopped by a signal while finishing: keep the sampled pc
                # only.  So for the agent's own samples (-a): walking them
                # would cost it more than they tell (as in the kernel walk,
                # perfagent.stackprog.kunwind.UW_PROC_SELF).
                user_ips = (regs[3],) if regs and regs[3] else ()
                sps = None
            else:
                user_ips = self._unwind(walk, pid, regs, stack, sps)
            key = (pid, tid, kernel_ips, user_ips, self._python_placement(pid, user_ips, python, sps))
            slot = pending.get(key)
            if slot is None:
                pending[key] = [1, period]
            else:
                slot[0] += 1
                slot[1] += period

    def _unwind(self, walk, pid: int, regs: tuple, stack: bytes, sps: Optional[list] = None) -> tuple:
        proc = self._known(pid)
        if proc is None or not proc.maps_known:
            proc = self.load_from_proc(pid) or self.process(pid)
        binary_for = self._binary_for.get(pid)
        if binary_for is None:  # one closure per process, not per sample
            binary_for = self._binary_for[pid] = self._binary_cfi_for(proc)
        return walk(proc, binary_for, regs, stack, sps)

    def unwind_copy(self, pid: int, copy) -> None:
        """Unwind an off-CPU stack copy (perfagent.offcpu.collector.StackCopy)
        once, with ``offcpu_walker``, keeping the addresses (and each frame's
        sp, when there is a Python stack to place) and freeing the bytes."""
        if copy.user_ips is None:
            sps = [] if copy.python else None
            copy.unwound(self._unwind(self.offcpu_walker.walk, pid, copy.regs, copy.stack, sps), sps)

    def _python_placement(self, pid: int, user_ips: tuple, python, sps=None, weight: int = 1) -> tuple:
        """Where the Python frames of a sample go among its native frames,
        named now, while the process lives: ((native index, (PyName, ...)), ...)
        (perfagent.python.merge); () without a Python stack.  ``weight``
        (samples, episodes) counts the walk's truncations."""
        if not python or self.python is None:
            return ()
        from perfagent.python.merge import place_runs, split_runs
        from perfagent.python.tracking import TRUNCATED_MARK
        from perfagent.stackprog.layout import PYSTACK_TRUNCATED
        entries, flags = python
        tracker = self.python
        if flags:
            tracker.count_flags(flags, weight)
        if not entries:
            return ()
        runs = split_runs(entries)
        placed = place_runs(user_ips, runs, tracker.eval_check(pid), sps)
        name = tracker.name
        out = [(index, tuple(name(pid, code, instr, lineno) for code, instr, lineno in run))
               for index, run in placed]
        if flags & PYSTACK_TRUNCATED and out:
            # The walk stopped at its bound: the outermost frames are missing.
            index, names = out[-1]
            out[-1] = (index, names + (TRUNCATED_MARK,))
        return tuple(out)

    def _binary_cfi_for(self, proc: ProcessInfo):
        """``binary_for(entry)`` for the walker: the CFI of a mapping's file, or None.

        Asks the CFI cache every time (only on a per-process cache miss:
        once per distinct pc) rather than keeping the tables here too, so
        the cache's LRU bound is what holds them."""
        cfi_cache = (self.walker or self.offcpu_walker).cache
        pid = proc.pid

        def binary_for(entry: MapEntry):
            kind = mapping_kind(entry)
            if kind == KIND_FILE:
                return cfi_cache.get(mapped_file(pid, entry))
            if kind == KIND_VDSO:
                return cfi_cache.get_vdso()
            return None
        return binary_for

    def _resolve(self, pid: int, kernel_ips: tuple, user_ips: tuple, python: tuple = ()) -> Tuple[Frame, ...]:
        # The leaf is an exact pc; every frame above it is a return address,
        # which points after the call: look up ``addr - 1`` so a call that is
        # the last instruction of a function is attributed to that function.
        frames: List[Frame] = []
        first = True
        intern = self._frames
        for ip in kernel_ips:
            frame = (KERNEL_MAPPING, ip if first else ip - 1)
            frames.append(intern.setdefault(frame, frame))
            first = False
        if user_ips:
            proc = self._known(pid)
            if proc is None or not proc.maps_known:
                proc = self.load_from_proc(pid) or self.process(pid)
            cache = proc.frame_cache
            for ip in user_ips:
                if ip == 0:
                    break  # no user context (e.g. a sample without user registers)
                addr = ip if first else ip - 1
                first = False
                frame = cache.get(addr)
                if frame is None:
                    frame = self._user_frame(proc, addr)
                    frame = cache[addr] = intern.setdefault(frame, frame)
                frames.append(frame)
        if python:
            frames = _insert_python(frames, len(frames) - len(user_ips), python, intern)
        stack = tuple(frames)
        sid = self._stack_ids.get(stack)
        if sid is None:
            self._stack_ids[stack] = len(self._stack_list)
            self._stack_list.append(stack)
            return stack
        return self._stack_list[sid]

    def _user_frame(self, proc: ProcessInfo, addr: int) -> Frame:
        entry = proc.space.find(addr)
        if entry is None:
            return (-1, addr)
        kind = mapping_kind(entry)
        shared = kind == KIND_FILE or kind == KIND_VDSO
        if shared:
            # One record per file segment (and one vDSO: the same image in
            # every process), whichever process maps it where:
            # the address moves into the first mapping's range (same file
            # offset, so the same name), and the profile holds one Mapping
            # and one Location per segment and offset, not per process.
            key = (kind, entry.end - entry.start, entry.pgoff, entry.path, entry.dev_major,
                   entry.dev_minor, entry.inode)
        else:
            key = (kind, entry.start, entry.end, entry.pgoff, entry.path, entry.inode,
                   proc.pid if kind == KIND_JIT else 0)
        index = self._mapping_index.get(key)
        if index is None:
            index = self._mapping_index[key] = len(self.mappings)
            self.mappings.append(MappingRecord(index, kind, entry, proc.pid))
            if kind == KIND_FILE and self.symbolizer is not None:
                # Named at the end of the capture: keep the file open now,
                # while the process that maps it is alive.
                self.symbolizer.binaries.pin(mapped_file(proc.pid, entry))
        if shared:
            return (index, addr - entry.start + self.mappings[index].start)
        if kind == KIND_JIT and self.symbolizer is not None:
            if not proc.view_loaded:
                self.load_view(proc)
            name = self.symbolizer.jit_name(proc, addr)
            if name is not None:
                return (index, addr, name)  # type: ignore[return-value]
        return (index, addr)

    def process_comm(self, pid: int) -> str:
        proc = self.process_info(pid)
        if proc is not None and proc.comm:
            return proc.comm
        return self.thread_comm.get(pid, "")
