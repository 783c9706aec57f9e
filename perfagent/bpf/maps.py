"""BPF maps as objects that own their fd.

``Map`` works on raw bytes (keys and values exactly as the kernel stores
them); callers pack/unpack with their own struct.Struct.  For per-CPU maps a
value is ``possible_cpus()`` slots of round_up(value_size, 8) bytes, which is
what the kernel copies in and out; ``value_size_user`` says how many.

``drain()`` empties the map and returns what it held, using
BPF_MAP_LOOKUP_AND_DELETE_BATCH where the map type and kernel support it and
falling back to get_next_key + lookup + delete otherwise (stack maps, pre-5.6
kernels; arrays, whose slots cannot be deleted, are read and zeroed).  The fallback is not atomic: an entry the program updates between
our lookup and delete loses that update, which is acceptable for profiling
counts and why the batch path is preferred.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Dict, Iterator, List, Optional, Tuple

from perfagent.bpf import syscall as sc
from perfagent.bpf.syscall import BPFError

PERCPU_TYPES = (sc.BPF_MAP_TYPE_PERCPU_HASH, sc.BPF_MAP_TYPE_PERCPU_ARRAY,
                sc.BPF_MAP_TYPE_LRU_PERCPU_HASH)

ARRAY_TYPES = (sc.BPF_MAP_TYPE_ARRAY, sc.BPF_MAP_TYPE_PERCPU_ARRAY)

_POSSIBLE_PATH = "/sys/devices/system/cpu/possible"
_possible: Optional[int] = None


def possible_cpus() -> int:
    """How many CPUs the kernel may ever bring up (the per-CPU value count).

    Parsed from the "0-7,9" list in sysfs: the highest listed CPU plus one,
    since per-CPU storage is indexed by CPU number.
    """
    global _possible
    if _possible is None:
        try:
            with open(_POSSIBLE_PATH) as f:
                text = f.read().strip()
            top = 0
            for part in text.split(","):
                top = max(top, int(part.split("-")[-1]))
            _possible = top + 1
        except (OSError, ValueError):
            _possible = os.cpu_count() or 1
    return _possible


class Map(sc.OwnedFD):
    """One kernel map; closes its fd on close() / leaving a ``with`` block.

    A program that references the map holds its own kernel reference, so
    closing the Map while a program is loaded does not free it.
    """

    def __init__(self, map_type: int, key_size: int, value_size: int,
                 max_entries: int, map_flags: int = 0, name: str = "") -> None:
        self._fd: Optional[int] = None
        self.map_type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.name = name
        if map_type in PERCPU_TYPES:
            self.value_size_user = ((value_size + 7) // 8 * 8) * possible_cpus()
        else:
            self.value_size_user = value_size
        self._fd = sc.map_create(map_type, key_size, value_size,
                                 max_entries, map_flags, name)
        self._batch_ok: Optional[bool] = None
        self._batch_bufs: Optional[sc.BatchBuffers] = None

    @property
    def kind(self) -> str:
        return "map %r" % self.name

    @property
    def id(self) -> int:
        """The kernel-wide map id (BPF_OBJ_GET_INFO_BY_FD)."""
        return sc.obj_id(self.fd)

    def __repr__(self) -> str:
        return "<Map %r type=%d fd=%s>" % (self.name, self.map_type, self._fd)

    def _check_key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise ValueError("key is %d bytes, map %r wants %d" % (len(key), self.name, self.key_size))
        return key

    def lookup(self, key: bytes) -> Optional[bytes]:
        """The value stored for ``key``, None when absent."""
        return sc.map_lookup_elem(self.fd, self._check_key(key), self.value_size_user)

    def update(self, key: bytes, value: bytes, flags: int = sc.BPF_ANY) -> None:
        if len(value) != self.value_size_user:
            raise ValueError("value is %d bytes, map %r wants %d"
                             % (len(value), self.name, self.value_size_user))
        sc.map_update_elem(self.fd, self._check_key(key), value, flags)

    def update_many(self, pairs: List[Tuple[bytes, bytes]]) -> None:
        """Write every (key, value): BPF_MAP_UPDATE_BATCH where the kernel
        and map type have it (one call per chunk instead of one per entry),
        else one update each."""
        if self._batch_ok is not False and len(pairs) > 1:
            try:
                for i in range(0, len(pairs), 1024):
                    chunk = pairs[i:i + 1024]
                    keys = b"".join(self._check_key(k) for k, _ in chunk)
                    values = b"".join(v for _, v in chunk)
                    if len(values) != len(chunk) * self.value_size_user:
                        raise ValueError("values must be %d bytes for map %r"
                                         % (self.value_size_user, self.name))
                    sc.map_update_batch(self.fd, keys, values, len(chunk))
                return
            except BPFError as exc:
                if exc.errno not in (errno.EINVAL, sc.ENOTSUPP, errno.EOPNOTSUPP):
                    raise
        for key, value in pairs:
            self.update(key, value)

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False if it was not there."""
        return sc.map_delete_elem(self.fd, self._check_key(key))

    def next_key(self, key: Optional[bytes]) -> Optional[bytes]:
        return sc.map_get_next_key(self.fd, None if key is None else self._check_key(key),
                                   self.key_size)

    def keys(self) -> Iterator[bytes]:
        """Every key, by BPF_MAP_GET_NEXT_KEY (a snapshot-free walk: entries
        added or removed meanwhile may or may not be seen)."""
        key = self.next_key(None)
        while key is not None:
            yield key
            key = self.next_key(key)

    def items(self) -> List[Tuple[bytes, bytes]]:
        """(key, value) for every key whose value could still be read."""
        out = []
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                out.append((key, value))
        return out

    def drain(self, chunk: int = 256) -> List[Tuple[bytes, bytes]]:
        """Remove and return every (key, value), batched when the kernel can."""
        if self._batch_ok is not False:
            try:
                out = self._drain_batch(chunk)
                self._batch_ok = True
                return out
            except BPFError as exc:
                if exc.errno not in (errno.EINVAL, sc.ENOTSUPP, errno.EOPNOTSUPP):
                    raise
                if self._batch_ok:
                    raise
                self._batch_ok = False
        return self._drain_iterate()

    def _drain_batch(self, chunk: int) -> List[Tuple[bytes, bytes]]:
        out: List[Tuple[bytes, bytes]] = []
        token: Optional[bytes] = None
        # The batch token for hash maps is a bucket index (u32); for arrays
        # it is a key.  A buffer that fits either.
        batch_size = max(self.key_size, 8)
        count = max(1, min(chunk, self.max_entries))
        ks, vs = self.key_size, self.value_size_user
        bufs = self._batch_bufs     # kept: a store is drained every collection
        while True:
            if bufs is None or bufs.count < count:
                bufs = self._batch_bufs = sc.BatchBuffers(ks, vs, count)
            try:
                keys, values, n, token = sc.map_batch(
                    sc.BPF_MAP_LOOKUP_AND_DELETE_BATCH, self.fd, token, batch_size,
                    ks, vs, count, bufs)
            except BPFError as exc:
                # One hash bucket holds more entries than ``count``: retry bigger.
                if exc.errno == errno.ENOSPC and count < self.max_entries:
                    count = min(self.max_entries, count * 4)
                    continue
                raise
            for i in range(n):
                out.append((keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs]))
            if token is None:
                return out

    def _drain_iterate(self) -> List[Tuple[bytes, bytes]]:
        if self.map_type in ARRAY_TYPES:
            # Array slots cannot be deleted: read them and write zeros back.
            zero = bytes(self.value_size_user)
            out = []
            for key, value in self.items():
                self.update(key, zero)
                out.append((key, value))
            return out
        out = []
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None and self.delete(key):
                out.append((key, value))
        return out

    def as_dict(self) -> Dict[bytes, bytes]:
        return dict(self.items())


class HashMap(Map):
    def __init__(self, key_size: int, value_size: int, max_entries: int,
                 name: str = "", map_flags: int = 0) -> None:
        super().__init__(sc.BPF_MAP_TYPE_HASH, key_size, value_size, max_entries,
                         map_flags, name)


class PerCPUHashMap(Map):
    def __init__(self, key_size: int, value_size: int, max_entries: int,
                 name: str = "", map_flags: int = 0) -> None:
        super().__init__(sc.BPF_MAP_TYPE_PERCPU_HASH, key_size, value_size, max_entries,
                         map_flags, name)


class ArrayMap(Map):
    def __init__(self, value_size: int, max_entries: int, name: str = "") -> None:
        super().__init__(sc.BPF_MAP_TYPE_ARRAY, 4, value_size, max_entries, 0, name)


class StackTraceMap(Map):
    """BPF_MAP_TYPE_STACK_TRACE: u32 stack id -> ``depth`` u64 instruction pointers.

    ``stack(id)`` returns the addresses without the zero padding.
    """

    def __init__(self, max_entries: int, depth: int = sc.PERF_MAX_STACK_DEPTH,
                 name: str = "") -> None:
        self.depth = depth
        super().__init__(sc.BPF_MAP_TYPE_STACK_TRACE, 4, 8 * depth, max_entries, 0, name)

    def stack(self, stack_id: int) -> Optional[List[int]]:
        raw = self.lookup(struct.pack("<I", stack_id))
        if raw is None:
            return None
        ips = list(struct.unpack("<%dQ" % self.depth, raw))
        while ips and ips[-1] == 0:
            ips.pop()
        return ips


# Ring buffer record header (kernel/bpf/ringbuf.c, uapi bpf.h):
# struct bpf_ringbuf_hdr { __u32 len; __u32 pg_off; };
# with the top two bits of len flagging a record still being written (BUSY)
# or one the program discarded (DISCARD).
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class RingBuf(Map):
    """BPF_MAP_TYPE_RINGBUF (Linux 5.8+): records a program submits with
    bpf_ringbuf_output / reserve+submit, read here through two mappings.

    The consumer page (read-write) holds the position we have read up to;
    the producer page and the data area follow, read-only, with the data
    area mapped twice back to back so that a record wrapping around the end
    is contiguous.  Positions only grow; ``pos & (size - 1)`` indexes data.

    Python has no acquire load: on x86 (TSO) plain reads of the producer
    position and then the record are ordered anyway; on weakly ordered CPUs
    (arm64) a record's header could in theory be read stale, which the BUSY
    bit check turns into "not ready yet" rather than garbage in practice,
    but it is not a formal guarantee.
    """

    def __init__(self, size: int, name: str = "") -> None:
        import mmap
        page = mmap.PAGESIZE
        if size < page or size & (size - 1):
            raise ValueError("ring buffer size must be a power of two >= the page size")
        super().__init__(sc.BPF_MAP_TYPE_RINGBUF, 0, 0, size, 0, name)
        self.size = size
        self._page = page
        self._consumer = None
        self._producer = None
        try:
            self._consumer = mmap.mmap(self.fd, page, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._producer = mmap.mmap(self.fd, page + 2 * size, mmap.MAP_SHARED,
                                       mmap.PROT_READ, offset=page)
        except OSError as exc:
            self.close()
            raise BPFError("mmap of ring buffer %r: %s" % (name, exc.strerror),
                           exc.errno or 0) from None

    def close(self) -> None:
        for attr in ("_consumer", "_producer"):
            m = getattr(self, attr, None)
            if m is not None:
                m.close()
                setattr(self, attr, None)
        super().close()

    def poll(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for data; True if some may be ready."""
        import select
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(int(timeout * 1000)))

    def consume(self, limit: int = 0) -> List[bytes]:
        """Every complete record available now (at most ``limit`` if given),
        in submission order; discarded records are skipped."""
        if self._consumer is None or self._producer is None:
            raise BPFError("ring buffer %r is closed" % self.name, errno.EBADF)
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(self._producer, 0)[0]
        mask = self.size - 1
        out: List[bytes] = []
        data = self._producer
        while cons < prod:
            off = self._page + (cons & mask)
            hdr = _U32.unpack_from(data, off)[0]
            if hdr & BPF_RINGBUF_BUSY_BIT:
                break  # the producer is still writing this one
            length = hdr & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT)
            if not hdr & BPF_RINGBUF_DISCARD_BIT:
                out.append(bytes(data[off + BPF_RINGBUF_HDR_SZ:off + BPF_RINGBUF_HDR_SZ + length]))
            cons += (length + BPF_RINGBUF_HDR_SZ + 7) & ~7
            _U64.pack_into(self._consumer, 0, cons)
            if limit and len(out) >= limit:
                break
        return out
