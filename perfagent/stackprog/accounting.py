"""Kernel-side accounting both stack programs share, and its user-space half.

Both programs count events in a hash map whose value is two u64 sums
(``emit_accumulate``), keep counters in a small array (``Stats``,
``emit_bump``), and may be limited to a set of processes held in a BPF
hash map (``emit_tgid_filter``, ``make_tgid_map``), so user space can add
and remove processes while the program runs.
"""

from __future__ import annotations

import struct
from typing import Iterable, Optional

from perfagent.records import NamedTuple
from perfagent.bpf import syscall as sc
from perfagent.bpf.asm import DW, FP, R0, R1, R2, R3, R4, W, Program
from perfagent.bpf.maps import ArrayMap, HashMap
from perfagent.stackprog.layout import RECORD_WAKE

# The process filter: tgid -> a byte nobody reads (presence is the answer).
# struct { __u32 tgid; } -> struct { __u8 unused; }
TGID_KEY = struct.Struct("<I")
TGID_VALUE = b"\x01"

# Counters the programs keep in a u64 array:
STAT_INSERTS = 0     # new keys inserted into the count map (ever)
STAT_DROPS = 1       # events dropped because the count map was full
STAT_COPY_DROPS = 2  # captures (or episode ends) the full ring refused
STAT_STORE_DROPS = 3  # stacks a full stack store refused (their counts lose that stack)
# The in-kernel DWARF walk's outcomes (perfagent.stackprog.kunwind), one slot
# per UW_STATUS_* from STAT_KUNWIND on.
STAT_KUNWIND = 4
# Where a program with a wake ring wakes its reader: when STAT_INSERTS
# reaches this (0: never).  User space arms it after each drain of the
# count map (Stats.arm_wake), so a long wait cannot let the map fill.
STAT_WAKE_AT = 10
STATS_SLOTS = 11
# The record a program sends to wake its reader: RECORD_WAKE, 0.
WAKE_RECORD = struct.Struct("<II")
U64 = struct.Struct("<Q")


def emit_bump(p: Program, stats: ArrayMap, slot: int, scratch_off: int, tag: str) -> None:
    """``lock stats[slot] += 1`` (a u64 array slot).  Clobbers r0-r5 and the
    u32 at fp+scratch_off."""
    _emit_slot_lookup(p, stats, slot, scratch_off)
    p.jeq(R0, 0, tag + "_bumped")
    p.mov(R1, 1)
    p.atomic_add(DW, R0, R1, 0)
    p.label(tag + "_bumped")


def _emit_slot_lookup(p: Program, stats: ArrayMap, slot: int, scratch_off: int) -> None:
    """r0 = &stats[slot] (or 0), the key in the u32 at fp+scratch_off."""
    p.st(W, FP, scratch_off, slot)
    p.ld_map_fd(R1, stats)
    p.mov(R2, FP)
    p.add(R2, scratch_off)
    p.call("map_lookup_elem")


def emit_accumulate(p: Program, counts: HashMap, key_off: int, sums_off: int,
                    stats: ArrayMap, scratch_off: int, tag: str, wake_ring=None) -> None:
    """``counts[key] += sums``, both on the stack at fp+key_off / fp+sums_off.

    Existing entries are added to with atomic adds (several CPUs may hit the
    same key); a missing one is inserted with BPF_NOEXIST (and counted in
    stats[STAT_INSERTS], so user space knows how full the map is without
    walking it), and if another CPU inserted it first the add is retried on
    its entry.  A full map drops the event (counted in stats[STAT_DROPS]).
    Clobbers r0-r5; ``tag`` keeps the labels unique.

    With ``wake_ring`` (a ring buffer its reader waits on, edge-triggered),
    an insert that brings STAT_INSERTS to stats[STAT_WAKE_AT] or past it
    sends a RECORD_WAKE there with BPF_RB_FORCE_WAKEUP: the reader may
    then wait long between drains without the map filling meanwhile.
    Clobbers the sums on the stack once they are stored.
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
    if wake_ring is not None:
        _emit_wake_if_due(p, stats, wake_ring, sums_off, scratch_off, tag + "_wake")
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


def _emit_wake_if_due(p: Program, stats: ArrayMap, ring, sums_off: int, scratch_off: int, tag: str) -> None:
    """After emit_bump(STAT_INSERTS) (r0: its slot, or 0): wake the reader
    once the inserts reach stats[STAT_WAKE_AT] (see emit_accumulate)."""
    p.jeq(R0, 0, tag + "_no")
    p.ldx(DW, R1, R0, 0)
    p.stx(DW, FP, R1, sums_off)                    # the inserts so far (the sums are stored)
    _emit_slot_lookup(p, stats, STAT_WAKE_AT, scratch_off)
    p.jeq(R0, 0, tag + "_no")
    p.ldx(DW, R2, R0, 0)
    p.jeq(R2, 0, tag + "_no")                      # not armed
    p.ldx(DW, R1, FP, sums_off)
    p.jlt(R1, R2, tag + "_no")
    p.st(W, FP, sums_off, RECORD_WAKE)
    p.st(W, FP, sums_off + 4, 0)
    p.ld_map_fd(R1, ring)
    p.mov(R2, FP)
    p.add(R2, sums_off)
    p.mov(R3, WAKE_RECORD.size)
    p.mov(R4, sc.BPF_RB_FORCE_WAKEUP)
    p.call("ringbuf_output")                       # a full ring: the drain is due anyway
    p.label(tag + "_no")


class ParentOffsets(NamedTuple):
    """Where the program finds a task's process start and parent (BTF
    offsets into task_struct), and since when children are new."""

    real_parent: int
    tgid: int
    group_leader: int
    start_time: int            # u64 ns, CLOCK_MONOTONIC (bpf_ktime_get_ns's clock)
    since: int                 # processes started before this are not followed as children


def parent_offsets(since_ns: int) -> ParentOffsets:
    from perfagent.bpf.btf import vmlinux
    btf = vmlinux()
    return ParentOffsets(btf.member("task_struct", "real_parent").offset,
                         btf.member("task_struct", "tgid").offset,
                         btf.member("task_struct", "group_leader").offset,
                         btf.member("task_struct", "start_time").offset, since_ns)


def emit_tgid_filter(p: Program, tgids: Optional[HashMap], tgid_off: int,
                     skip: str, follow: Optional[ParentOffsets] = None,
                     scratch_off: int = 0) -> None:
    """``if (tgids && !lookup(tgids, fp+tgid_off)) goto skip``; nothing when
    every process is followed.  Clobbers r0-r5.

    With ``follow``, a process that is not in the map but whose parent
    process is, and that started after ``follow.since`` (a child forked by
    a followed process during the capture), is added to the map by the
    program itself and followed from its very first event: user space hears
    of the fork only at its next drain.  Children that existed before are
    not (``--children`` asks for them, through user space).  ``scratch_off``
    is a u32 stack slot for the parent's tgid.
    """
    if tgids is None:
        return
    tag = "tgf%d" % len(p)
    p.ld_map_fd(R1, tgids)
    p.mov(R2, FP)
    p.add(R2, tgid_off)
    p.call("map_lookup_elem")
    if follow is None:
        p.jeq(R0, 0, skip)
        return
    p.jne(R0, 0, tag + "_in")
    p.call("get_current_task_btf")
    p.ldx(DW, R1, R0, follow.group_leader)         # the process, not this thread,
    p.ldx(DW, R1, R1, follow.start_time)           # ... and when it started
    p.ld_imm64(R2, follow.since)
    p.jlt(R1, R2, skip)                            # before the capture: not a new child
    p.ldx(DW, R1, R0, follow.real_parent)          # current->real_parent (a BTF pointer)
    p.ldx(W, R1, R1, follow.tgid)                  # ... its process
    p.stx(W, FP, R1, scratch_off)
    p.ld_map_fd(R1, tgids)
    p.mov(R2, FP).add(R2, scratch_off)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, skip)                             # neither it nor its parent is followed
    p.ld_map_fd(R1, tgids)
    p.mov(R2, FP).add(R2, tgid_off)
    p.mov(R3, R0)                                  # the parent's value: the same byte
    p.mov(R4, sc.BPF_NOEXIST)
    p.call("map_update_elem")                      # followed from now on
    p.label(tag + "_in")


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

    def arm_wake(self, entries: int) -> None:
        """Have a program with a wake ring wake its reader once ``entries``
        more keys were inserted than at the last drain (see emit_accumulate)."""
        self.map.update(struct.pack("<I", STAT_WAKE_AT), U64.pack(self._inserts_at_drain + max(1, entries)))

    def close(self) -> None:
        self.map.close()
