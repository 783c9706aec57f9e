"""On-CPU sampling: the set of cpu-clock events of one capture and their rings.

Which threads are followed, and how:

* ``-a``: one event per online CPU with pid = -1.
* launch mode: the command is started blocked before ``exec``; one event per
  CPU on its pid with ``inherit`` and ``enable_on_exec``, so it and every
  thread and child it creates are sampled from the first instruction of the
  new image.
* ``--pid``: an event per (thread, CPU) with ``inherit``.  perf_event_open on
  a pid follows one *thread*, and inheritance only covers threads created
  after the event exists, so every existing thread needs its own events; new
  threads and children of any followed thread then inherit them and the
  kernel reports them with PERF_RECORD_FORK.  A thread created by a thread we
  had not reached yet is caught by re-listing /proc/PID/task after the
  events are open (threads seen in FORK records are already covered, so
  nothing is sampled twice).  All events of one CPU write into the first
  event's ring (PERF_EVENT_IOC_SET_OUTPUT), so a capture has one ring per CPU
  whatever the thread count.
"""

from __future__ import annotations

import os
import select
from typing import Callable, Dict, Iterable, List, Set

from perfagent.errors import CaptureError
from perfagent.perf import attr as A
from perfagent.perf import event as E
from perfagent.perf.records import RecordParser
from perfagent.perf.ring import RingBuffer

SAMPLE_TYPE = (A.PERF_SAMPLE_IP | A.PERF_SAMPLE_TID | A.PERF_SAMPLE_TIME
               | A.PERF_SAMPLE_CPU | A.PERF_SAMPLE_PERIOD | A.PERF_SAMPLE_CALLCHAIN)

# With a BPF program capturing samples, the events' own sample records are
# never written: the sample_id trailer of side-band records is all that
# these bits shape.
SIDE_BAND_SAMPLE_TYPE = A.PERF_SAMPLE_IP | A.PERF_SAMPLE_TID | A.PERF_SAMPLE_TIME | A.PERF_SAMPLE_CPU

# 128 pages (512 KiB) per CPU holds several seconds of 99 Hz samples with full
# 127-frame callchains (about 1 KiB each), so a drain every 100 ms keeps the
# buffer nearly empty even when the agent is descheduled for a while.
DEFAULT_DATA_PAGES = 128


def data_pages_for(stack_size: int, sample_rate: int) -> int:
    """Ring pages per CPU: about a second of samples with full stack copies.

    A sample with a stack copy is ``stack_size`` plus ~1 KiB; the ring is
    drained every 100 ms, but the first drains of a system-wide capture also
    load the CFI of every binary they meet, which on a busy machine took
    over half a second: a second of margin kept -a at 0 lost samples.  A
    power of two between 128 (512 KiB) and 2048 (8 MiB).
    """
    want = (stack_size + 1024) * sample_rate
    pages = 128
    while pages * 4096 < want and pages < 2048:
        pages *= 2
    return pages


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> List[int]:
    """CPU numbers from the kernel's range list (``0-3,8-11``)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: List[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


def raise_fd_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit: --pid opens threads x CPUs fds."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def list_threads(pid: int) -> List[int]:
    """Thread ids of ``pid`` (raises ProcessLookupError when it is gone)."""
    from perfagent.target import procfs
    return procfs.threads(pid)


class Sampler:
    """Opens, enables, drains and closes the sampling events of one capture."""

    def __init__(self, sample_rate: int, data_pages: int = DEFAULT_DATA_PAGES,
                 sample_type: int = SAMPLE_TYPE, sample_regs_user: int = 0,
                 sample_stack_user: int = 0, side_band_only: bool = False,
                 bpf_prog_fd: int = -1) -> None:
        # side_band_only: a dummy event that samples nothing and only reports
        # MMAP2/COMM/FORK/EXIT, for captures that need mappings but not
        # on-CPU samples (--offcpu alone).
        self.side_band_only = side_band_only
        # bpf_prog_fd: a BPF_PROG_TYPE_PERF_EVENT program run on every sample
        # of every event (PERF_EVENT_IOC_SET_BPF; events created by
        # inheritance, for new threads and children, inherit it).  It
        # captures the sample itself and returns 0, so perf writes no sample
        # record: the rings carry the side band only.
        self.bpf_prog_fd = bpf_prog_fd
        if bpf_prog_fd >= 0:
            sample_type = SIDE_BAND_SAMPLE_TYPE
        self.sample_rate = sample_rate
        self.data_pages = data_pages
        self.sample_type = sample_type
        self.sample_regs_user = sample_regs_user
        self.sample_stack_user = sample_stack_user
        self.cpus = online_cpus()
        raise_fd_limit()
        self.fds: List[int] = []
        self.rings: Dict[int, RingBuffer] = {}  # cpu -> ring
        self.parser = RecordParser(sample_type, sample_regs_user)
        self.followed_tids: Set[int] = set()
        # epoll, not poll: a BPF ring is watched edge-triggered (watch()).
        self._poller = select.epoll()

    # -- opening -----------------------------------------------------------
    def _attr(self, inherit: bool, enable_on_exec: bool) -> bytes:
        data_bytes = self.data_pages * 4096
        flags = A.attr_flags(
            disabled=True, freq=not self.side_band_only, inherit=inherit, enable_on_exec=enable_on_exec,
            mmap=True, mmap2=True, comm=True, comm_exec=True, task=True,
            sample_id_all=True, watermark=True, exclude_hv=True,
            # With a stack copy the agent unwinds user frames itself: the
            # kernel's user callchain would only cost ring-buffer space.
            exclude_callchain_user=bool(self.sample_stack_user),
        )
        return A.pack_attr(
            A.PERF_TYPE_SOFTWARE,
            A.PERF_COUNT_SW_DUMMY if self.side_band_only else A.PERF_COUNT_SW_CPU_CLOCK,
            0 if self.side_band_only else self.sample_rate,
            self.sample_type, flags,
            wakeup_events_or_watermark=data_bytes // 4,
            sample_regs_user=self.sample_regs_user,
            sample_stack_user=self.sample_stack_user,
        )

    def _open_on_cpu(self, attr: bytes, pid: int, cpu: int, what: str) -> int:
        try:
            fd = E.perf_event_open(attr, pid, cpu)
        except OSError as exc:
            raise CaptureError(E.explain_open_error(exc, what)) from None
        self.fds.append(fd)
        if self.bpf_prog_fd >= 0:
            from perfagent import libc as _libc
            try:
                _libc.ioctl(fd, E.PERF_EVENT_IOC_SET_BPF, self.bpf_prog_fd)
            except OSError as exc:
                raise CaptureError("cannot attach the sampling program to %s: %s"
                                   % (what, exc.strerror or exc)) from None
        ring = self.rings.get(cpu)
        if ring is None:
            try:
                ring = RingBuffer(fd, self.data_pages)
            except OSError as exc:
                raise CaptureError(
                    "cannot map the perf ring buffer (%s): raise kernel.perf_event_mlock_kb "
                    "or run as root" % os.strerror(exc.errno or 0)) from None
            self.rings[cpu] = ring
            self._poller.register(fd, select.EPOLLIN)
        else:
            E.set_output(fd, ring.fd)
        return fd

    def open_system_wide(self) -> None:
        attr = self._attr(inherit=False, enable_on_exec=False)
        for cpu in self.cpus:
            self._open_on_cpu(attr, -1, cpu, "all processes (-a) on CPU %d" % cpu)

    def open_launched(self, pid: int) -> None:
        """Events on a child blocked before exec: they switch on at exec."""
        attr = self._attr(inherit=True, enable_on_exec=True)
        for cpu in self.cpus:
            self._open_on_cpu(attr, pid, cpu, "command (pid %d)" % pid)
        self.followed_tids.add(pid)

    def open_threads(self, tids: Iterable[int], enable_now: bool = False) -> List[int]:
        """Events on each thread (every CPU); returns the tids that were opened.

        A thread that exits before we reach it (ESRCH) is skipped: that is a
        normal race, not an error.
        """
        attr = self._attr(inherit=True, enable_on_exec=False)
        opened = []
        for tid in tids:
            if tid in self.followed_tids:
                continue
            first_fd = len(self.fds)
            try:
                for cpu in self.cpus:
                    self._open_on_cpu(attr, tid, cpu, "pid %d" % tid)
            except CaptureError:
                from perfagent.target import procfs
                if procfs.stat(tid) is None:  # exited meanwhile: a normal race
                    continue
                raise
            self.followed_tids.add(tid)
            opened.append(tid)
            if enable_now:
                for fd in self.fds[first_fd:]:
                    E.enable(fd)
        return opened

    def enable(self) -> None:
        for fd in self.fds:
            E.enable(fd)

    def disable(self) -> None:
        for fd in self.fds:
            try:
                E.disable(fd)
            except OSError:
                pass

    # -- reading -----------------------------------------------------------
    def watch(self, fd: int, edge: bool = False) -> None:
        """Let ``fd`` (a pidfd, a signal wake-up pipe) end a :meth:`wait` too;
        with ``edge`` only when its file wakes its waiters, not whenever it
        is readable: a BPF ring is readable with a single record in it, but
        its program wakes the reader only once a quarter of it waits
        (perfagent.stackprog.capture.emit_ringbuf_output)."""
        self._poller.register(fd, select.EPOLLIN | (select.EPOLLET if edge else 0))

    def unwatch(self, fd: int) -> None:
        try:
            self._poller.unregister(fd)
        except (KeyError, OSError):
            pass

    def wait(self, timeout_ms: int) -> List[int]:
        """Sleep until a ring passes its watermark, a watched fd is ready or
        ``timeout_ms`` passes; the fds that are ready."""
        if self._poller.closed:
            return []
        try:
            return [fd for fd, _ in self._poller.poll(timeout_ms / 1000.0 if timeout_ms >= 0 else -1)]
        except InterruptedError:
            return []

    def drain(self, on_sample: Callable, on_event: Callable) -> int:
        """Parse everything in every ring; returns the number of bytes read.

        Side-band events (mmap, comm, fork, exit) of all rings are handed
        on in time order: each ring is ordered, but a process that execs on
        one CPU and maps its libraries on another puts its exec and its
        mmaps in different rings, and applying the exec (which empties the
        address space) after the mmaps would lose them.  Samples need no
        order and go out as they are parsed.
        """
        total = 0
        events: List[tuple] = []
        for ring in self.rings.values():
            data = ring.read()
            if data:
                total += len(data)
                self.parser.parse(data, on_sample, on_event, events)
        if events:
            events.sort(key=lambda te: te[0])  # stable: equal times keep ring order
            for _t, ev in events:
                on_event(ev)
        return total

    @property
    def lost(self) -> int:
        return self.parser.lost + self.parser.lost_samples

    def close(self) -> None:
        self._poller.close()
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
