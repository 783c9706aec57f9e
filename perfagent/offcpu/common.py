"""What the off-CPU collector and the in-kernel sampler share.

Both programs (built by perfagent.stackprog) count events in a hash map
whose value is two u64 sums, keep counters in a small array, and may be
limited to a set of processes held in a BPF hash map (so user space can add
and remove processes while the program runs).  The emitters here write
those pieces of BPF assembly; ``FollowsTgids`` is the user-space life
cycle both share.
"""

from __future__ import annotations

import errno
import struct
from typing import Iterable, Optional

from perfagent.bpf import syscall as sc
from perfagent.bpf.asm import DW, FP, R0, R1, R2, R3, R4, W, Program
from perfagent.bpf.maps import ArrayMap, HashMap

# The process filter: tgid -> a byte nobody reads (presence is the answer).
# struct { __u32 tgid; } -> struct { __u8 unused; }
TGID_KEY = struct.Struct("<I")
TGID_VALUE = b"\x01"

# Counters the programs keep in a u64 array:
STAT_INSERTS = 0     # new keys inserted into the count map (ever)
STAT_DROPS = 1       # events dropped because the count map was full
STAT_COPY_DROPS = 2  # captures (or episode ends) the full ring refused
STAT_STORE_DROPS = 3  # stacks a full stack store refused (their counts lose that stack)
STATS_SLOTS = 4
U64 = struct.Struct("<Q")


def emit_bump(p: Program, stats: ArrayMap, slot: int, scratch_off: int, tag: str) -> None:
    """``lock stats[slot] += 1`` (a u64 array slot).  Clobbers r0-r5 and the
    u32 at fp+scratch_off."""
    p.st(W, FP, scratch_off, slot)
    p.ld_map_fd(R1, stats)
    p.mov(R2, FP)
    p.add(R2, scratch_off)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, tag + "_bumped")
    p.mov(R1, 1)
    p.atomic_add(DW, R0, R1, 0)
    p.label(tag + "_bumped")


def emit_accumulate(p: Program, counts: HashMap, key_off: int, sums_off: int,
                    stats: ArrayMap, scratch_off: int, tag: str) -> None:
    """``counts[key] += sums``, both on the stack at fp+key_off / fp+sums_off.

    Existing entries are added to with atomic adds (several CPUs may hit the
    same key); a missing one is inserted with BPF_NOEXIST (and counted in
    stats[STAT_INSERTS], so user space knows how full the map is without
    walking it), and if another CPU inserted it first the add is retried on
    its entry.  A full map drops the event (counted in stats[STAT_DROPS]).
    Clobbers r0-r5; ``tag`` keeps the labels unique.
    """
    def add_into_r0() -> None:
        p.ldx(DW, R1, FP, sums_off)
        p.atomic_add(DW, R0, R1, 0)              # lock entry->a += sums.a
        p.ldx(DW, R1, FP, sums_off + 8)
        p.atomic_add(DW, R0, R1, 8)              # lock entry->b += sums.b

    def lookup() -> None:
        p.ld_map_fd(R1, counts)
        p.mov(R2, FP)
        p.add(R2, key_off)
        p.call("map_lookup_elem")

    lookup()
    p.jeq(R0, 0, tag + "_insert")
    add_into_r0()
    p.ja(tag + "_done")

    p.label(tag + "_insert")
    p.ld_map_fd(R1, counts)
    p.mov(R2, FP)
    p.add(R2, key_off)
    p.mov(R3, FP)
    p.add(R3, sums_off)
    p.mov(R4, sc.BPF_NOEXIST)
    p.call("map_update_elem")
    p.jne(R0, 0, tag + "_raced")
    emit_bump(p, stats, STAT_INSERTS, scratch_off, tag + "_insert")
    p.ja(tag + "_done")

    # Another CPU inserted the key between our lookup and update, or the
    # map is full and the second lookup fails too.
    p.label(tag + "_raced")
    lookup()
    p.jeq(R0, 0, tag + "_full")
    add_into_r0()
    p.ja(tag + "_done")
    p.label(tag + "_full")
    emit_bump(p, stats, STAT_DROPS, scratch_off, tag + "_drop")
    p.label(tag + "_done")


def emit_tgid_filter(p: Program, tgids: Optional[HashMap], tgid_off: int,
                     skip: str) -> None:
    """``if (tgids && !lookup(tgids, fp+tgid_off)) goto skip``; nothing when
    every process is followed.  Clobbers r0-r5."""
    if tgids is None:
        return
    p.ld_map_fd(R1, tgids)
    p.mov(R2, FP)
    p.add(R2, tgid_off)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, skip)


def make_tgid_map(tgids: Optional[Iterable[int]], max_entries: int) -> Optional[HashMap]:
    """The filter map filled with ``tgids``; None (no filter) for None."""
    if tgids is None:
        return None
    m = HashMap(TGID_KEY.size, len(TGID_VALUE), max_entries, name="tgids")
    try:
        for t in tgids:
            m.update(TGID_KEY.pack(t), TGID_VALUE)
    except BaseException:
        m.close()
        raise
    return m


class Stats:
    """The programs' counters, and how full the count map is.

    The count map is emptied by draining it, so its size is inserts since
    the last drain; knowing that lets the caller drain early instead of
    dropping events, without walking the map.
    """

    def __init__(self) -> None:
        self.map = ArrayMap(U64.size, STATS_SLOTS, name="stats")
        self._inserts_at_drain = 0

    def read(self, slot: int) -> int:
        raw = self.map.lookup(struct.pack("<I", slot))
        return U64.unpack(raw)[0] if raw is not None else 0

    @property
    def drops(self) -> int:
        return self.read(STAT_DROPS)

    def pending(self) -> int:
        """Entries in the count map now (approximately: a racing insert)."""
        return self.read(STAT_INSERTS) - self._inserts_at_drain

    def before_drain(self) -> None:
        """Call right before draining: entries inserted later are pending."""
        self._inserts_at_drain = self.read(STAT_INSERTS)

    def close(self) -> None:
        self.map.close()


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
