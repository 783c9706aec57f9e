"""What the off-CPU collector and the in-kernel samplers share in user space.

``FollowsTgids`` is their life cycle (start/stop, the process filter kept
in step with processes that come and go, collect()); the kernel-side
accounting they share is in perfagent.stackprog.accounting, whose names
are re-exported here.
"""

from __future__ import annotations

import errno
from typing import Iterable, Optional

from perfagent.bpf import syscall as sc
from perfagent.stackprog.accounting import (  # noqa: F401 - shared names, re-exported
    STAT_COPY_DROPS, STAT_DROPS, STAT_INSERTS, STAT_STORE_DROPS, STATS_SLOTS, TGID_KEY, TGID_VALUE,
    U64, Stats, emit_accumulate, emit_bump, emit_tgid_filter, make_tgid_map,
)


def close_all(objs: Iterable[object]) -> None:
    """Close every object (links before programs before maps, as given),
    carrying on past failures so nothing stays open."""
    first: Optional[BaseException] = None
    for o in objs:
        if o is None:
            continue
        try:
            o.close()  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: B902 - re-raised below
            first = first or exc
    if first is not None:
        raise first


def thread_alive(tgid: int, tid: int) -> bool:
    from perfagent.target import procfs
    return procfs.stat(tgid, tid) is not None



class FollowsTgids:
    """What the off-CPU collector and the in-kernel sampler share: a set of
    tgids mirrored into a BPF hash map the program reads, collect(), and the
    start/stop life cycle (context manager; kernel objects closed at the
    latest when the object is collected).

    Subclasses set ``_initial_tgids`` (None: every process), ``_tgids`` (the
    map once started), ``_running`` and ``_pending`` (what stop() gathered),
    and implement ``start()``, ``stop()``, ``_close()`` and ``_gather()``.
    """

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            self._close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    #: Processes that could not be followed because the filter map was full
    #: (counted, reported in the summary; never an error that ends the run).
    tgids_refused = 0

    def _follow(self):
        """The BTF offsets that let the program follow children of followed
        processes itself (None when every process is followed)."""
        if self._initial_tgids is None:
            return None
        import time
        from perfagent.stackprog.accounting import parent_offsets
        return parent_offsets(time.clock_gettime_ns(time.CLOCK_MONOTONIC))

    def add_tgid(self, tgid: int) -> None:
        """Follow process ``tgid`` too (no-op when following every process).

        A full filter map (more live processes than ``max_tgids``) refuses
        the process: it is counted in ``tgids_refused``, not raised.
        """
        if self._initial_tgids is None:
            return
        self._initial_tgids.add(tgid)
        if self._tgids is not None:
            try:
                self._tgids.update(TGID_KEY.pack(tgid), TGID_VALUE)
            except sc.BPFError as exc:
                if exc.errno not in (errno.E2BIG, errno.ENOMEM, errno.ENOSPC):
                    raise
                self._initial_tgids.discard(tgid)
                self.tgids_refused += 1

    def remove_tgid(self, tgid: int) -> None:
        """Forget process ``tgid`` (it exited): the filter map only holds live
        processes, so launch mode survives any number of short-lived children."""
        if self._initial_tgids is None or tgid not in self._initial_tgids:
            return
        self._initial_tgids.discard(tgid)
        if self._tgids is not None:
            try:
                self._tgids.delete(TGID_KEY.pack(tgid))
            except sc.BPFError:
                pass

    def collect(self) -> list:
        """Everything counted since the last call (after stop(): the final remainder)."""
        if not self._running:
            out, self._pending = self._pending, []
            return out
        return self._gather()
