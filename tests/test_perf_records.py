"""Record decoding and the ring buffer, on real captured bytes and hand-built buffers."""

from __future__ import annotations

import mmap
import os
import struct
import time

import pytest

from perfagent.perf import attr as A
from perfagent.perf.records import (
    PERF_CONTEXT_KERNEL, PERF_CONTEXT_USER, RecordParser, parse_all, split_callchain,
)
from perfagent.perf.ring import DATA_HEAD_OFFSET, DATA_OFFSET_OFFSET, DATA_SIZE_OFFSET, DATA_TAIL_OFFSET, RingBuffer
from perfagent.perf.sampler import SAMPLE_TYPE

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "perf_records.hex")


def load_fixture():
    """{name: [record bytes, ...]} from the annotated hex file."""
    records = []
    for line in open(FIXTURE):
        line = line.strip()
        if line.startswith("=="):
            records.append([line[2:].strip(), b""])
        elif line and not line.startswith("#"):
            records[-1][1] += bytes.fromhex(line)
    return records


def test_fixture_records_decode():
    recs = load_fixture()
    data = b"".join(r for _, r in recs)
    samples, events = parse_all(data, SAMPLE_TYPE)
    assert len(samples) == 1
    kinds = [e[0] for e in events]
    assert kinds == ["comm", "mmap", "comm", "fork", "exit"]
    comm = events[0]
    assert comm[3] == "chain" and comm[4] is True  # exec comm
    pid = comm[1]
    mm = events[1]
    assert mm[1] == pid and mm[10] == "/tmp/chain"
    assert (mm[3], mm[4], mm[5]) == (0x55B8F9663000, 0x1000, 0x1000)
    assert (mm[6], mm[7], mm[8], mm[9]) == (0xFE, 0, 0x20C435, 5)  # maj, min, ino, PROT_READ|PROT_EXEC
    fork = events[3]
    assert fork[1] == pid and fork[2] == pid and fork[3] != pid  # a new thread of the process
    s = samples[0]
    assert s[0] == pid and s[4] > 0 and s[6] == ()  # user-mode sample: no kernel frames
    assert s[7][0] == s[5]  # first user frame is the sampled ip
    assert len(s[7]) >= 4


def test_callchain_markers_split():
    ips = (PERF_CONTEXT_KERNEL, 0xFFFFFFFF81000010, 0xFFFFFFFF81000020, PERF_CONTEXT_USER, 0x401000, 0x401100)
    assert split_callchain(ips) == ((0xFFFFFFFF81000010, 0xFFFFFFFF81000020), (0x401000, 0x401100))


def _header(rtype, misc, size):
    return struct.pack("<IHH", rtype, misc, size)


def test_lost_and_lost_samples_counted():
    trailer = struct.pack("<IIQII", 1, 1, 123, 0, 0)
    lost = _header(2, 0, 8 + 16 + 24) + struct.pack("<QQ", 7, 42) + trailer
    lost_samples = _header(13, 0, 8 + 8 + 24) + struct.pack("<Q", 5) + trailer
    parser = RecordParser(SAMPLE_TYPE)
    events = []
    parser.parse(lost + lost_samples, lambda s: None, events.append)
    assert events == [("lost", 42), ("lost_samples", 5)]
    assert parser.lost == 42 and parser.lost_samples == 5


def test_truncated_record_is_counted_not_raised():
    data = load_fixture()[1][1]
    parser = RecordParser(SAMPLE_TYPE)
    parser.parse(data[:-8], lambda s: None, lambda e: None)
    assert parser.malformed == 1
    parser = RecordParser(SAMPLE_TYPE)
    bad = bytearray(data)
    bad[6:8] = struct.pack("<H", 4)  # size smaller than a header
    parser.parse(bytes(bad), lambda s: None, lambda e: None)
    assert parser.malformed == 1


def test_sample_with_regs_and_stack():
    st = SAMPLE_TYPE | A.PERF_SAMPLE_REGS_USER | A.PERF_SAMPLE_STACK_USER
    regs_mask = 0b111
    body = struct.pack("<Q", 0x401000)          # ip
    body += struct.pack("<II", 10, 11)           # pid, tid
    body += struct.pack("<Q", 99)                # time
    body += struct.pack("<II", 1, 0)             # cpu, res
    body += struct.pack("<Q", 1000)              # period
    body += struct.pack("<QQQ", 2, PERF_CONTEXT_USER, 0x401000)  # callchain
    body += struct.pack("<Q", 2) + struct.pack("<3Q", 1, 2, 3)  # abi=64, regs
    body += struct.pack("<Q", 16) + b"A" * 8 + b"B" * 8 + struct.pack("<Q", 8)  # size, data, dyn_size
    rec = _header(9, 2, 8 + len(body)) + body
    parser = RecordParser(st, regs_mask)
    out = []
    parser.parse(rec, out.append, lambda e: None)
    assert out == [(10, 11, 99, 1, 1000, 0x401000, (), (0x401000,), (1, 2, 3), b"A" * 8)]


# -- the ring buffer -----------------------------------------------------------
def _fake_ring(data_pages: int, head: int, tail: int, payload: bytes, start: int):
    """A memfd laid out like a perf mmap: metadata page, then the data area."""
    page = mmap.PAGESIZE
    fd = os.memfd_create("ring")
    os.ftruncate(fd, (1 + data_pages) * page)
    mm = mmap.mmap(fd, (1 + data_pages) * page)
    struct.pack_into("<Q", mm, DATA_OFFSET_OFFSET, page)
    struct.pack_into("<Q", mm, DATA_SIZE_OFFSET, data_pages * page)
    struct.pack_into("<Q", mm, DATA_TAIL_OFFSET, tail)
    struct.pack_into("<Q", mm, DATA_HEAD_OFFSET, head)
    size = data_pages * page
    for i, b in enumerate(payload):
        mm[page + (start + i) % size] = b
    return fd, mm


def test_ring_read_wraps_and_joins_split_record():
    page = mmap.PAGESIZE
    rec = load_fixture()[1][1]  # a 112-byte MMAP2 record
    size = page
    start = size - 40  # the record is split: 40 bytes at the end, 72 at the beginning
    tail = 3 * size + start
    fd, mm = _fake_ring(1, tail + len(rec), tail, rec, start)
    ring = RingBuffer(fd, 1)
    try:
        assert ring.pending() == len(rec)
        assert ring.read() == rec
        assert struct.unpack_from("<Q", mm, DATA_TAIL_OFFSET)[0] == tail + len(rec)
        assert ring.read() == b""
        _, events = parse_all(rec, SAMPLE_TYPE)
        assert events[0][10] == "/tmp/chain"
    finally:
        ring.close()
        mm.close()
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs perf_event_open as root")
def test_real_ring_many_wraps_no_malformed():
    """A one-page ring at a high rate wraps hundreds of times; every record must parse."""
    from perfagent.perf.sampler import Sampler
    s = Sampler(4000, data_pages=1)
    try:
        s.open_threads([os.getpid()])
        s.enable()
        samples = []
        events = []
        t0 = time.monotonic()
        x = 0
        while time.monotonic() - t0 < 1.0:
            x += sum(range(2000))
            s.drain(samples.append, events.append)
        s.disable()
        s.drain(samples.append, events.append)
        ring = next(iter(s.rings.values()))
        assert s.parser.malformed == 0
        assert len(samples) > 200
        assert sum(r.bytes_read for r in s.rings.values()) > 20 * ring.data_size  # wrapped many times
        assert all(smp[0] == os.getpid() for smp in samples)
    finally:
        s.close()


# -- side-band events across rings -------------------------------------------------

def test_event_times_come_from_the_sample_id_trailer():
    recs = load_fixture()
    data = b"".join(r for _, r in recs)
    timed = []
    RecordParser(SAMPLE_TYPE).parse(data, lambda s: None, lambda e: None, timed)
    assert [e[0] for _, e in timed] == ["comm", "mmap", "comm", "fork", "exit"]
    times = [t for t, _ in timed]
    assert all(t > 0 for t in times)
    assert times[0] < times[1]        # the exec's COMM, then the new image's MMAP2
    # fork/exit carry their own time too, from the same clock a moment apart
    for t, ev in timed:
        if ev[0] in ("fork", "exit"):
            assert abs(t - ev[5]) < 1_000_000, (t, ev)


class _Ring:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self) -> bytes:
        data, self.data = self.data, b""
        return data


def test_drain_applies_side_band_events_of_all_rings_in_time_order():
    # A process execs on CPU 1 and maps its libraries on CPU 0: CPU 0's ring
    # is read first, but the exec (which empties the address space) must be
    # applied before the mmap, or the mapping is lost.
    from perfagent.perf.sampler import Sampler
    (_, comm), (_, mmap2) = load_fixture()[:2]   # the exec's COMM, then the binary's MMAP2
    parser = RecordParser(SAMPLE_TYPE)
    timed = []
    parser.parse(comm + mmap2, lambda s: None, lambda e: None, timed)
    assert timed[0][0] < timed[1][0]
    sampler = Sampler(1, side_band_only=True)
    sampler.rings = {0: _Ring(mmap2), 1: _Ring(comm)}
    applied = []
    sampler.drain(lambda s: None, applied.append)
    assert [e[0] for e in applied] == ["comm", "mmap"]


# -- hostile sizes (issue 11) --------------------------------------------------

DWARF_ST = SAMPLE_TYPE | A.PERF_SAMPLE_REGS_USER | A.PERF_SAMPLE_STACK_USER


def _dwarf_sample(stack_size_field: int, stack: bytes, tail: bytes = b"") -> bytes:
    body = struct.pack("<Q", 0x401000) + struct.pack("<II", 10, 11) + struct.pack("<Q", 99)
    body += struct.pack("<II", 1, 0) + struct.pack("<Q", 1000)
    body += struct.pack("<QQ", 1, 0x401000)                       # callchain nr=1
    body += struct.pack("<Q", 2) + struct.pack("<3Q", 1, 2, 3)     # abi, 3 regs
    body += struct.pack("<Q", stack_size_field) + stack + tail
    return _header(9, 2, 8 + len(body)) + body


def test_user_stack_size_past_2_63_is_counted_not_raised():
    """Issue 11: size >= 2^63 raised OverflowError out of parse()."""
    good = _dwarf_sample(8, b"S" * 8, struct.pack("<Q", 8))
    for size in (1 << 63, (1 << 64) - 1, 1 << 40, 17, 9):
        bad = _dwarf_sample(size, b"S" * 8, struct.pack("<Q", 8))
        parser = RecordParser(DWARF_ST, 0b111)
        out = []
        parser.parse(bad + good, out.append, lambda e: None)
        assert parser.malformed == 1, size
        assert [s[9] for s in out] == [b"S" * 8]  # the next record still decodes


def test_callchain_and_regs_bounded_by_the_record():
    body = struct.pack("<Q", 0x401000) + struct.pack("<II", 10, 11) + struct.pack("<Q", 99)
    body += struct.pack("<II", 1, 0) + struct.pack("<Q", 1000)
    for nr in (2, 1 << 61, (1 << 64) - 1):
        rec = _header(9, 2, 8 + len(body) + 16) + body + struct.pack("<QQ", nr, 0x401000)
        parser = RecordParser(SAMPLE_TYPE)
        parser.parse(rec, lambda s: None, lambda e: None)
        assert parser.malformed == 1, nr
    # Register block (abi != 0) missing from a record that ends after abi.
    rec = body + struct.pack("<QQ", 1, 0x401000) + struct.pack("<Q", 2)
    parser = RecordParser(SAMPLE_TYPE | A.PERF_SAMPLE_REGS_USER, 0b111)
    parser.parse(_header(9, 2, 8 + len(rec)) + rec + _header(2, 0, 8 + 16 + 24) + bytes(40),
                 lambda s: None, lambda e: None)
    assert parser.malformed == 1 and parser.lost == 0


def test_header_only_mmap2_is_not_decoded_from_the_next_record():
    """Issue 11: an MMAP2 of size 8 (or shorter than its body) was decoded
    from the following bytes.  Every body is bounded by its own record."""
    recs = load_fixture()
    mmap2 = recs[1][1]
    comm = recs[0][1]
    for size in (8, 16, 64, len(mmap2) - 24 - 8):  # header only ... body cut before the name
        short = bytearray(mmap2[:size])
        short[6:8] = struct.pack("<H", size)
        parser = RecordParser(SAMPLE_TYPE)
        events = []
        parser.parse(bytes(short) + mmap2 + comm, lambda s: None, events.append)
        assert parser.malformed == 1, size
        assert [e[0] for e in events] == ["mmap", "comm"]
        assert events[0][10] == "/tmp/chain"
    # The same for every other record kind with a body: header + trailer only.
    for rtype in (1, 2, 3, 4, 5, 7, 13):
        rec = _header(rtype, 0, 8 + 24) + struct.pack("<IIQII", 1, 1, 5, 0, 0)
        parser = RecordParser(SAMPLE_TYPE)
        events = []
        parser.parse(rec + comm, lambda s: None, events.append)
        assert parser.malformed == 1 and [e[0] for e in events] == ["comm"], rtype
