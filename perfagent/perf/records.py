"""Decoding the records the kernel writes into a perf ring buffer.

Layouts from include/uapi/linux/perf_event.h (enum perf_event_type).  Every
record starts with ``struct perf_event_header``; non-sample records end with
the ``sample_id`` trailer when ``sample_id_all`` is set, whose fields depend
on ``sample_type`` the same way a sample's do.

The parser is the per-sample hot path of a capture, so it dispatches on the
record type with plain integer compares, unpacks with precompiled Structs
straight from the buffer (``unpack_from`` on a memoryview: no slicing
copies), and emits tuples, not objects.

Every read is bounded by the record's own end (``off + size``), never just
the buffer's: a record shorter than its body, or a count or size field that
claims more than the record holds (a callchain ``nr``, a user-stack
``size`` up to 2^64), makes that record malformed (counted) instead of
being decoded from the bytes of the next record or sizing an allocation.
"""

from __future__ import annotations

import struct
from typing import Callable, Dict, List, Optional, Tuple

from perfagent.errors import ParseError
from perfagent.perf.attr import (
    PERF_SAMPLE_ADDR, PERF_SAMPLE_CALLCHAIN, PERF_SAMPLE_CPU, PERF_SAMPLE_ID,
    PERF_SAMPLE_IDENTIFIER, PERF_SAMPLE_IP, PERF_SAMPLE_PERIOD, PERF_SAMPLE_READ,
    PERF_SAMPLE_REGS_USER, PERF_SAMPLE_STACK_USER, PERF_SAMPLE_STREAM_ID,
    PERF_SAMPLE_TID, PERF_SAMPLE_TIME, PERF_SAMPLE_RAW, PERF_SAMPLE_BRANCH_STACK,
)

# enum perf_event_type
PERF_RECORD_MMAP = 1
PERF_RECORD_LOST = 2
PERF_RECORD_COMM = 3
PERF_RECORD_EXIT = 4
PERF_RECORD_THROTTLE = 5
PERF_RECORD_UNTHROTTLE = 6
PERF_RECORD_FORK = 7
PERF_RECORD_READ = 8
PERF_RECORD_SAMPLE = 9
PERF_RECORD_MMAP2 = 10
PERF_RECORD_LOST_SAMPLES = 13

# perf_event_header.misc bits
PERF_RECORD_MISC_CPUMODE_MASK = 7
PERF_RECORD_MISC_KERNEL = 1
PERF_RECORD_MISC_USER = 2
PERF_RECORD_MISC_COMM_EXEC = 1 << 13
PERF_RECORD_MISC_MMAP_BUILD_ID = 1 << 14

# enum perf_callchain_context: markers inside PERF_SAMPLE_CALLCHAIN
PERF_CONTEXT_HV = (1 << 64) - 32
PERF_CONTEXT_KERNEL = (1 << 64) - 128
PERF_CONTEXT_USER = (1 << 64) - 512
PERF_CONTEXT_GUEST = (1 << 64) - 2048
PERF_CONTEXT_GUEST_KERNEL = (1 << 64) - 2176
PERF_CONTEXT_GUEST_USER = (1 << 64) - 2560
PERF_CONTEXT_MAX = (1 << 64) - 4095

# struct perf_event_header { __u32 type; __u16 misc; __u16 size; };
PERF_EVENT_HEADER = struct.Struct("<IHH")
_U64 = struct.Struct("<Q")
_U32X2 = struct.Struct("<II")
# PERF_RECORD_MMAP2 body up to the filename:
#   u32 pid, tid; u64 addr, len, pgoff;
#   union { struct { u32 maj, min; u64 ino, ino_generation; };
#           struct { u8 build_id_size, __reserved_1; u16 __reserved_2; u8 build_id[20]; }; };
#   u32 prot, flags; char filename[];
MMAP2_BODY = struct.Struct("<IIQQQIIQQII")
MMAP2_BUILD_ID = struct.Struct("<IIQQQBBH20sII")
# PERF_RECORD_MMAP: u32 pid, tid; u64 addr, len, pgoff; char filename[];
MMAP_BODY = struct.Struct("<IIQQQ")
# PERF_RECORD_FORK / PERF_RECORD_EXIT: u32 pid, ppid, tid, ptid; u64 time;
FORK_BODY = struct.Struct("<IIIIQ")
# PERF_RECORD_LOST: u64 id, lost;
LOST_BODY = struct.Struct("<QQ")

# Event tuples handed to the consumer (kind first).  Plain tuples keep the
# per-record cost down; these names document the field order.
#   ("mmap", pid, tid, addr, len, pgoff, maj, min, ino, prot, filename, build_id)
#   ("comm", pid, tid, comm, is_exec)
#   ("fork", pid, ppid, tid, ptid, time)
#   ("exit", pid, ppid, tid, ptid, time)
#   ("lost", lost_count)
#   ("lost_samples", lost_count)
#   ("throttle", time)
# Sample tuples:
#   (pid, tid, time, cpu, period, ip, kernel_ips, user_ips, user_regs, user_stack)
# where kernel_ips / user_ips are tuples leaf-first with context markers removed,
# user_regs a tuple (or None) and user_stack a read-only memoryview of the
# chunk parsed, trimmed to dyn_size (or None): no copy per sample; keep
# bytes(user_stack) to hold it past the chunk's life.


# Sample fields before PERF_SAMPLE_CALLCHAIN: one u64 each (TID and CPU are
# two u32s), in the order the kernel writes them.
_FIXED_SAMPLE_FIELDS = (PERF_SAMPLE_IDENTIFIER | PERF_SAMPLE_IP | PERF_SAMPLE_TID
                        | PERF_SAMPLE_TIME | PERF_SAMPLE_ADDR | PERF_SAMPLE_ID
                        | PERF_SAMPLE_STREAM_ID | PERF_SAMPLE_CPU | PERF_SAMPLE_PERIOD)


def _popcount(x: int) -> int:
    return bin(x).count("1")


def sample_id_trailer_size(sample_type: int) -> int:
    """Bytes of the sample_id trailer appended to non-sample records."""
    n = 0
    for bit in (PERF_SAMPLE_TID, PERF_SAMPLE_TIME, PERF_SAMPLE_ID,
                PERF_SAMPLE_STREAM_ID, PERF_SAMPLE_CPU, PERF_SAMPLE_IDENTIFIER):
        if sample_type & bit:
            n += 8
    return n


def split_callchain(ips: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Split a raw callchain into (kernel ips, user ips) at the context markers.

    Per-sample hot path.  The kernel writes [KERNEL, k..., USER, u...] (either
    part may be missing), so the markers are found with tuple.index (a C
    scan) and the parts are two slices; max() over each part (C again)
    confirms no other marker hides in it.  Any other shape (guest and
    hypervisor contexts, repeated markers) takes the general loop.
    """
    n = len(ips)
    if not n:
        return (), ()
    start = 1 if ips[0] == PERF_CONTEXT_KERNEL else 0
    try:
        u = ips.index(PERF_CONTEXT_USER, start)
    except ValueError:
        u = n
    kernel = ips[start:u]
    user = ips[u + 1:]
    if (not kernel or max(kernel) < PERF_CONTEXT_MAX) and (not user or max(user) < PERF_CONTEXT_MAX):
        return kernel, user
    return _split_callchain_loop(ips)


def _split_callchain_loop(ips: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The general split: every marker switches the context."""
    kernel: List[int] = []
    user: List[int] = []
    current = kernel
    for ip in ips:
        if ip >= PERF_CONTEXT_MAX:
            if ip == PERF_CONTEXT_USER or ip == PERF_CONTEXT_GUEST_USER:
                current = user
            elif ip == PERF_CONTEXT_KERNEL or ip == PERF_CONTEXT_GUEST_KERNEL:
                current = kernel
            else:
                current = []  # hypervisor/guest context: not ours to show
            continue
        current.append(ip)
    return tuple(kernel), tuple(user)


class RecordParser:
    """Parses records for events opened with one ``sample_type``.

    ``regs_count`` is the number of bits set in ``sample_regs_user``; the
    parser needs it because the register block has no length of its own.
    """

    def __init__(self, sample_type: int, sample_regs_user: int = 0,
                 sample_id_all: bool = True) -> None:
        unsupported = sample_type & (PERF_SAMPLE_READ | PERF_SAMPLE_RAW | PERF_SAMPLE_BRANCH_STACK)
        if unsupported:
            raise ValueError("sample_type bits %#x are not decoded" % unsupported)
        self.sample_type = sample_type
        self.regs_count = _popcount(sample_regs_user)
        self.trailer = sample_id_trailer_size(sample_type) if sample_id_all else 0
        # Where the trailer's u64 time is, counted from the record's end
        # (struct sample_id: {pid, tid} then time), or 0 without one.
        self._time_from_end = 0
        if sample_id_all and sample_type & PERF_SAMPLE_TIME:
            self._time_from_end = self.trailer - (8 if sample_type & PERF_SAMPLE_TID else 0)
        # Bytes of the sample fields before PERF_SAMPLE_CALLCHAIN, all u64s.
        self._fixed_size = 8 * _popcount(sample_type & _FIXED_SAMPLE_FIELDS)
        self._qstructs: Dict[int, struct.Struct] = {}
        self.lost = 0
        self.lost_samples = 0
        self.throttled = 0
        self.malformed = 0

    def _q(self, n: int) -> struct.Struct:
        s = self._qstructs.get(n)
        if s is None:
            s = self._qstructs[n] = struct.Struct("<%dQ" % n)
        return s

    def parse(self, data: bytes, on_sample: Callable, on_event: Callable,
              timed_events: Optional[list] = None) -> None:
        """Decode every record in ``data``, calling back per sample / other event.

        With ``timed_events`` the other events are appended to it as
        (time, event) instead (time from the sample_id trailer, 0 without
        one), for a caller that merges several rings in time order.
        A record whose size is inconsistent stops the parse of this chunk
        (counted in ``malformed``): the kernel only publishes whole records,
        so that can only mean a corrupted buffer, never a split record.
        """
        time_from_end = self._time_from_end
        view = memoryview(data).toreadonly()  # samples' stack views must not be writable
        end = len(data)
        off = 0
        unpack_header = PERF_EVENT_HEADER.unpack_from
        while off + 8 <= end:
            rtype, misc, size = unpack_header(view, off)
            if size < 8 or off + size > end:
                self.malformed += 1
                return
            try:
                if rtype == PERF_RECORD_SAMPLE:
                    on_sample(self._sample(view, off + 8, off + size))
                else:
                    ev = self._event(rtype, misc, view, off + 8, off + size)
                    if ev is None:
                        pass
                    elif timed_events is None:
                        on_event(ev)
                    else:
                        t = _U64.unpack_from(view, off + size - time_from_end)[0] if time_from_end else 0
                        timed_events.append((t, ev))
            except (struct.error, IndexError, ValueError, OverflowError):
                # The size checks below make these unreachable for bad
                # field values; kept so that no record can end the parse.
                self.malformed += 1
            off += size

    def _sample(self, view: memoryview, off: int, end: int) -> tuple:
        st = self.sample_type
        u64 = _U64.unpack_from
        pid = tid = cpu = -1
        time = period = ip = 0
        kernel_ips: Tuple[int, ...] = ()
        user_ips: Tuple[int, ...] = ()
        regs = None
        stack = None
        if off + self._fixed_size > end:
            raise ValueError("sample shorter than its fixed fields")
        if st & PERF_SAMPLE_IDENTIFIER:
            off += 8
        if st & PERF_SAMPLE_IP:
            ip = u64(view, off)[0]
            off += 8
        if st & PERF_SAMPLE_TID:
            pid, tid = _U32X2.unpack_from(view, off)
            off += 8
        if st & PERF_SAMPLE_TIME:
            time = u64(view, off)[0]
            off += 8
        if st & PERF_SAMPLE_ADDR:
            off += 8
        if st & PERF_SAMPLE_ID:
            off += 8
        if st & PERF_SAMPLE_STREAM_ID:
            off += 8
        if st & PERF_SAMPLE_CPU:
            cpu = _U32X2.unpack_from(view, off)[0]
            off += 8
        if st & PERF_SAMPLE_PERIOD:
            period = u64(view, off)[0]
            off += 8
        if st & PERF_SAMPLE_CALLCHAIN:
            if off + 8 > end:
                raise ValueError("callchain nr past the end of the record")
            nr = u64(view, off)[0]
            off += 8
            if nr > (end - off) >> 3:
                raise ValueError("callchain past the end of the record")
            kernel_ips, user_ips = split_callchain(self._q(nr).unpack_from(view, off))
            off += nr * 8
        if st & PERF_SAMPLE_REGS_USER:
            if off + 8 > end:
                raise ValueError("user regs abi past the end of the record")
            abi = u64(view, off)[0]
            off += 8
            if abi and self.regs_count:
                if off + 8 * self.regs_count > end:
                    raise ValueError("user regs past the end of the record")
                regs = self._q(self.regs_count).unpack_from(view, off)
                off += 8 * self.regs_count
        if st & PERF_SAMPLE_STACK_USER:
            if off + 8 > end:
                raise ValueError("user stack size past the end of the record")
            size = u64(view, off)[0]
            off += 8
            if size:
                # u64 size; char data[size]; u64 dyn_size: all inside the record.
                if size > end - off - 8:
                    raise ValueError("user stack of %d bytes past the end of the record" % size)
                dyn_size = u64(view, off + size)[0]
                # A view into the drained chunk, not a copy: the walker
                # reads it with unpack_from before the drain ends.
                stack = view[off: off + min(size, dyn_size)]
                off += size + 8
        if off > end:
            raise ValueError("sample longer than its record")
        return (pid, tid, time, cpu, period, ip, kernel_ips, user_ips, regs, stack)

    def _event(self, rtype: int, misc: int, view: memoryview, off: int, end: int) -> Optional[tuple]:
        # The body lies in [off, body_end): the sample_id trailer follows it.
        body_end = end - self.trailer
        if rtype == PERF_RECORD_MMAP2:
            if misc & PERF_RECORD_MISC_MMAP_BUILD_ID:
                (pid, tid, addr, length, pgoff, bid_size, _r1, _r2, bid,
                 prot, _flags) = _body(MMAP2_BUILD_ID, view, off, body_end)
                maj = mnr = ino = 0
                build_id = bytes(bid[:bid_size]).hex()
                name_off = off + MMAP2_BUILD_ID.size
            else:
                (pid, tid, addr, length, pgoff, maj, mnr, ino, _gen,
                 prot, _flags) = _body(MMAP2_BODY, view, off, body_end)
                build_id = ""
                name_off = off + MMAP2_BODY.size
            return ("mmap", pid, tid, addr, length, pgoff, maj, mnr, ino, prot,
                    _cstring(view, name_off, body_end), build_id)
        if rtype == PERF_RECORD_MMAP:
            pid, tid, addr, length, pgoff = _body(MMAP_BODY, view, off, body_end)
            prot = 4 if not (misc & 0x2000) else 0  # MISC_MMAP_DATA marks non-exec
            return ("mmap", pid, tid, addr, length, pgoff, 0, 0, 0, prot,
                    _cstring(view, off + MMAP_BODY.size, body_end), "")
        if rtype == PERF_RECORD_COMM:
            pid, tid = _body(_U32X2, view, off, body_end)
            return ("comm", pid, tid, _cstring(view, off + 8, body_end),
                    bool(misc & PERF_RECORD_MISC_COMM_EXEC))
        if rtype == PERF_RECORD_FORK or rtype == PERF_RECORD_EXIT:
            pid, ppid, tid, ptid, time = _body(FORK_BODY, view, off, body_end)
            return ("fork" if rtype == PERF_RECORD_FORK else "exit", pid, ppid, tid, ptid, time)
        if rtype == PERF_RECORD_LOST:
            lost = _body(LOST_BODY, view, off, body_end)[1]
            self.lost += lost
            return ("lost", lost)
        if rtype == PERF_RECORD_LOST_SAMPLES:
            lost = _body(_U64, view, off, body_end)[0]
            self.lost_samples += lost
            return ("lost_samples", lost)
        if rtype == PERF_RECORD_THROTTLE:
            time = _body(_U64, view, off, body_end)[0]
            self.throttled += 1
            return ("throttle", time)
        return None


def _body(layout: struct.Struct, view: memoryview, off: int, body_end: int) -> tuple:
    """``layout`` unpacked at ``off``, which must end by ``body_end``: a record
    too short for its body is malformed, not read on into the next one."""
    if off + layout.size > body_end:
        raise ValueError("record body of %d bytes shorter than %d" % (body_end - off, layout.size))
    return layout.unpack_from(view, off)


def _cstring(view: memoryview, start: int, end: int) -> str:
    raw = bytes(view[start:end])
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    return raw.decode("utf-8", "surrogateescape")


def parse_all(data: bytes, sample_type: int, sample_regs_user: int = 0) -> Tuple[List[tuple], List[tuple]]:
    """Every sample and event in ``data``: a convenience for tests and tools."""
    samples: List[tuple] = []
    events: List[tuple] = []
    parser = RecordParser(sample_type, sample_regs_user)
    parser.parse(data, samples.append, events.append)
    if parser.malformed:
        raise ParseError("%d malformed perf records" % parser.malformed)
    return samples, events
