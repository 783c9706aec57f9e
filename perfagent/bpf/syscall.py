"""bpf(2) through ctypes: one function per command, nothing owned.

The lowest layer, in the style of perfagent.perf.event: each function packs
the part of ``union bpf_attr`` its command reads (include/uapi/linux/bpf.h),
makes the system call, and turns a negative return into ``BPFError`` (an
OSError-carrying PerfAgentError) whose one-line message names the command and,
for EPERM/ENOSYS, what the user can do about it.  Objects that own the
returned fds live in maps.py and prog.py.

Only the fields a command needs are packed; the kernel zero-fills the rest of
the union (it accepts any ``size`` up to its own and checks that bytes beyond
what it knows are zero), so the same layouts work from 5.x to today.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import List, Optional, Tuple

from perfagent import libc as _libc
from perfagent.errors import PerfAgentError

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_PROG_GET_NEXT_ID = 11
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_BTF_LOAD = 18
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_MAP_FREEZE = 22
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_LINK_CREATE = 28
BPF_LINK_GET_NEXT_ID = 31

BPF_CMD_NAMES = {
    BPF_MAP_CREATE: "BPF_MAP_CREATE",
    BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM",
    BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM",
    BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM",
    BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY",
    BPF_PROG_LOAD: "BPF_PROG_LOAD",
    BPF_PROG_TEST_RUN: "BPF_PROG_TEST_RUN",
    BPF_PROG_GET_NEXT_ID: "BPF_PROG_GET_NEXT_ID",
    BPF_MAP_GET_NEXT_ID: "BPF_MAP_GET_NEXT_ID",
    BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD",
    BPF_RAW_TRACEPOINT_OPEN: "BPF_RAW_TRACEPOINT_OPEN",
    BPF_BTF_LOAD: "BPF_BTF_LOAD",
    BPF_MAP_LOOKUP_AND_DELETE_ELEM: "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
    BPF_MAP_FREEZE: "BPF_MAP_FREEZE",
    BPF_MAP_LOOKUP_BATCH: "BPF_MAP_LOOKUP_BATCH",
    BPF_MAP_LOOKUP_AND_DELETE_BATCH: "BPF_MAP_LOOKUP_AND_DELETE_BATCH",
    BPF_LINK_CREATE: "BPF_LINK_CREATE",
    BPF_LINK_GET_NEXT_ID: "BPF_LINK_GET_NEXT_ID",
}

# enum bpf_map_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_STACK_TRACE = 7
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_RINGBUF = 27

# enum bpf_prog_type
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_PERF_EVENT = 7
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_TRACING = 26

# enum bpf_attach_type (only what tracing needs)
BPF_TRACE_RAW_TP = 23
BPF_TRACE_FENTRY = 24
BPF_TRACE_FEXIT = 25

# map_flags of BPF_MAP_CREATE: programs may only read the map (with
# BPF_MAP_FREEZE, user space may no longer write it either: what makes its
# bytes a constant string for helpers such as bpf_snprintf's format).
BPF_F_RDONLY_PROG = 1 << 7

# Flags for BPF_MAP_UPDATE_ELEM
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# Flags for bpf_ringbuf_output(): no poll wakeup for this record (the
# reader drains on its own timer, so a busy program does not wake it up
# once per record).
BPF_RB_NO_WAKEUP = 1 << 0
# ... or a wakeup now, whatever the kernel's own policy (the reader asked to
# hear once a quarter of the ring waits: see emit_ringbuf_output).
BPF_RB_FORCE_WAKEUP = 1 << 1
# bpf_ringbuf_query() flags: what to read of the ring.
BPF_RB_AVAIL_DATA = 0

# Flags for bpf_get_stackid() / bpf_get_stack()
BPF_F_SKIP_FIELD_MASK = 0xFF
BPF_F_USER_STACK = 1 << 8
BPF_F_FAST_STACK_CMP = 1 << 9
BPF_F_REUSE_STACKID = 1 << 10

# include/linux/perf_event.h (not uapi, but fixed since 4.x): the depth of a
# stack map value when the map does not say otherwise.
PERF_MAX_STACK_DEPTH = 127

BPF_OBJ_NAME_LEN = 16

# The kernel's internal "operation not supported" errno (ENOTSUPP, not the
# uapi EOPNOTSUPP): what the batch ops return for map types lacking them.
ENOTSUPP = 524


class BPFError(PerfAgentError):
    """A bpf(2) command failed; ``errno`` is the kernel's, ``str()`` is one line.

    A verifier rejection (``VerifierError``) adds the log; everything else is
    a single line naming the command and the reason.
    """

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


class VerifierError(BPFError):
    """BPF_PROG_LOAD rejected the program; ``log`` is the verifier's full log.

    ``str()`` is the summary line followed by the tail of the log, because
    the verifier's explanation is only useful with the instructions that led
    to it.
    """

    def __init__(self, message: str, err: int, log: str, insn: Optional[str]) -> None:
        super().__init__(message, err)
        self.log = log
        self.insn = insn


_PERMISSION_HINT = ("needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)"
                    "; before Linux 5.11 also a large enough RLIMIT_MEMLOCK (ulimit -l)")


def explain(cmd: int, err: int, what: str = "") -> str:
    """The one-line message for ``cmd`` failing with ``err``."""
    name = BPF_CMD_NAMES.get(cmd, "bpf(%d)" % cmd)
    if what:
        name = "%s (%s)" % (name, what)
    if err == errno.EPERM or (err == errno.EACCES and cmd != BPF_PROG_LOAD):
        return "%s: %s: %s" % (name, os.strerror(err), _PERMISSION_HINT)
    if err == errno.ENOSYS:
        return "%s: this kernel has no bpf() system call (CONFIG_BPF_SYSCALL is off)" % name
    if err == ENOTSUPP:
        return "%s: operation not supported for this map or program type" % name
    return "%s: %s" % (name, os.strerror(err))


class _Buf:
    """A ctypes buffer kept alive with its address, for pointer fields."""

    __slots__ = ("raw", "addr")

    def __init__(self, data_or_size) -> None:
        if isinstance(data_or_size, int):
            self.raw = ctypes.create_string_buffer(data_or_size)
        else:
            self.raw = ctypes.create_string_buffer(bytes(data_or_size), len(data_or_size))
        self.addr = ctypes.addressof(self.raw)

    def bytes(self, n: Optional[int] = None) -> bytes:
        return self.raw.raw if n is None else self.raw.raw[:n]


def bpf(cmd: int, attr: bytearray, what: str = "") -> int:
    """The raw call: ``attr`` is updated in place with what the kernel writes back.

    Returns the non-negative result (an fd or 0); raises BPFError otherwise.
    """
    size = len(attr)
    buf = (ctypes.c_char * size).from_buffer(attr)
    ret = _libc.libc().syscall(
        ctypes.c_long(_libc.syscall_number("bpf")), ctypes.c_int(cmd),
        ctypes.byref(buf), ctypes.c_uint(size),
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise BPFError(explain(cmd, err, what), err)
    return ret


# union bpf_attr, BPF_MAP_CREATE part:
# struct {
#     __u32 map_type;              0
#     __u32 key_size;              4
#     __u32 value_size;            8
#     __u32 max_entries;           12
#     __u32 map_flags;             16
#     __u32 inner_map_fd;          20
#     __u32 numa_node;             24
#     char  map_name[16];          28
#     __u32 map_ifindex;           44
# };                               48
MAP_CREATE_ATTR = struct.Struct("<IIIIIII16sI")


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               map_flags: int = 0, map_name: str = "") -> int:
    """BPF_MAP_CREATE; returns the new map's fd (owned by the caller)."""
    attr = bytearray(MAP_CREATE_ATTR.pack(
        map_type, key_size, value_size, max_entries, map_flags, 0, 0,
        map_name.encode()[:BPF_OBJ_NAME_LEN - 1], 0))
    return bpf(BPF_MAP_CREATE, attr, map_name)


# union bpf_attr, map element part:
# struct {
#     __u32 map_fd;                0
#     (4 bytes padding)
#     __aligned_u64 key;           8
#     union { __aligned_u64 value; __aligned_u64 next_key; };  16
#     __u64 flags;                 24
# };                               32
MAP_ELEM_ATTR = struct.Struct("<I4xQQQ")


def _map_elem(cmd: int, map_fd: int, key_addr: int, value_addr: int, flags: int = 0) -> int:
    attr = bytearray(MAP_ELEM_ATTR.pack(map_fd, key_addr, value_addr, flags))
    return bpf(cmd, attr)


def map_lookup_elem(map_fd: int, key: bytes, value_size: int) -> Optional[bytes]:
    """The value for ``key``, or None when the key is absent (ENOENT)."""
    k, v = _Buf(key), _Buf(value_size)
    try:
        _map_elem(BPF_MAP_LOOKUP_ELEM, map_fd, k.addr, v.addr)
    except BPFError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.bytes()


def map_update_elem(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k, v = _Buf(key), _Buf(value)
    _map_elem(BPF_MAP_UPDATE_ELEM, map_fd, k.addr, v.addr, flags)


def map_delete_elem(map_fd: int, key: bytes) -> bool:
    """Delete ``key``; False when it was not there."""
    k = _Buf(key)
    try:
        _map_elem(BPF_MAP_DELETE_ELEM, map_fd, k.addr, 0)
    except BPFError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_get_next_key(map_fd: int, key: Optional[bytes], key_size: int) -> Optional[bytes]:
    """The key after ``key`` (the first key for None); None at the end."""
    k = _Buf(key) if key is not None else None
    nk = _Buf(key_size)
    try:
        _map_elem(BPF_MAP_GET_NEXT_KEY, map_fd, k.addr if k else 0, nk.addr)
    except BPFError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return nk.bytes()


# union bpf_attr, batch part:
# struct {
#     __aligned_u64 in_batch;      0
#     __aligned_u64 out_batch;     8
#     __aligned_u64 keys;          16
#     __aligned_u64 values;        24
#     __u32 count;                 32
#     __u32 map_fd;                36
#     __u64 elem_flags;            40
#     __u64 flags;                 48
# };                               56
MAP_BATCH_ATTR = struct.Struct("<QQQQIIQQ")


BPF_MAP_UPDATE_BATCH = 26


def map_update_batch(map_fd: int, keys: bytes, values: bytes, count: int) -> int:
    """BPF_MAP_UPDATE_BATCH (Linux 5.6+): ``count`` packed keys and values
    in one call; returns how many the kernel wrote (all, unless it raised)."""
    k, v = _Buf(keys), _Buf(values)
    attr = bytearray(MAP_BATCH_ATTR.pack(0, 0, k.addr, v.addr, count, map_fd, 0, 0))
    bpf(BPF_MAP_UPDATE_BATCH, attr, "BPF_MAP_UPDATE_BATCH")
    return MAP_BATCH_ATTR.unpack(attr)[4]


class BatchBuffers:
    """The key and value buffers of batch calls on one map, made once: a
    store of 3 KiB Python stacks drained 256 entries a call needs 788 KiB of
    values, and allocating (zeroing) it and copying it whole into bytes on
    every call cost more than the call (1.4 ms for an empty map)."""

    __slots__ = ("keys", "values", "count")

    def __init__(self, key_size: int, value_size: int, count: int) -> None:
        self.keys, self.values, self.count = _Buf(key_size * count), _Buf(value_size * count), count


def map_batch(cmd: int, map_fd: int, in_batch: Optional[bytes], batch_size: int,
              key_size: int, value_size: int, count: int, bufs: Optional[BatchBuffers] = None
              ) -> Tuple[bytes, bytes, int, Optional[bytes]]:
    """One BPF_MAP_LOOKUP[_AND_DELETE]_BATCH call (into ``bufs`` when given,
    holding at least ``count`` entries).

    Returns (keys, values, n, out_batch): ``n`` entries were copied; out_batch
    is the token for the next call, None when the map has been walked to the
    end (the kernel's ENOENT, which may still come with entries).
    """
    inb = _Buf(in_batch) if in_batch is not None else None
    outb = _Buf(batch_size)
    if bufs is None or bufs.count < count:
        bufs = BatchBuffers(key_size, value_size, count)
    keys, values = bufs.keys, bufs.values
    attr = bytearray(MAP_BATCH_ATTR.pack(
        inb.addr if inb else 0, outb.addr, keys.addr, values.addr, count, map_fd, 0, 0))
    done = False
    try:
        bpf(cmd, attr)
    except BPFError as exc:
        if exc.errno != errno.ENOENT:
            raise
        done = True
    n = MAP_BATCH_ATTR.unpack(attr)[4]
    # Only the n entries written are copied out (never the whole buffer).
    return (ctypes.string_at(keys.addr, n * key_size), ctypes.string_at(values.addr, n * value_size), n,
            None if done else outb.bytes())


# union bpf_attr, BPF_PROG_LOAD part:
# struct {
#     __u32 prog_type;             0
#     __u32 insn_cnt;              4
#     __aligned_u64 insns;         8
#     __aligned_u64 license;       16
#     __u32 log_level;             24
#     __u32 log_size;              28
#     __aligned_u64 log_buf;       32
#     __u32 kern_version;          40
#     __u32 prog_flags;            44
#     char prog_name[16];          48
#     __u32 prog_ifindex;          64
#     __u32 expected_attach_type;  68
#     __u32 prog_btf_fd;           72
#     __u32 func_info_rec_size;    76
#     __aligned_u64 func_info;     80
#     __u32 func_info_cnt;         88
#     __u32 line_info_rec_size;    92
#     __aligned_u64 line_info;     96
#     __u32 line_info_cnt;         104
#     __u32 attach_btf_id;         108
#     __u32 attach_prog_fd;        112 (union with attach_btf_obj_fd)
#     (4 bytes padding)
# };                               120
PROG_LOAD_ATTR = struct.Struct("<IIQQIIQII16sIIIIQIIQIII4x")


def prog_load(prog_type: int, insns: bytes, license: str = "GPL",
              log_level: int = 0, log_buf: Optional[_Buf] = None,
              expected_attach_type: int = 0, attach_btf_id: int = 0,
              prog_name: str = "", kern_version: int = 0, prog_btf_fd: int = 0,
              func_info: bytes = b"") -> int:
    """BPF_PROG_LOAD; returns the program fd.  ``log_buf`` receives the verifier log.
    ``func_info``: struct bpf_func_info records (8 bytes each) naming the
    program's functions in the BTF object ``prog_btf_fd`` (needed by
    programs with callbacks)."""
    lic = _Buf(license.encode() + b"\0")
    code = _Buf(insns)
    fi = _Buf(func_info) if func_info else None
    attr = bytearray(PROG_LOAD_ATTR.pack(
        prog_type, len(insns) // 8, code.addr, lic.addr,
        log_level, len(log_buf.raw) if log_buf else 0, log_buf.addr if log_buf else 0,
        kern_version, 0, prog_name.encode()[:BPF_OBJ_NAME_LEN - 1], 0,
        expected_attach_type, prog_btf_fd, 8 if fi else 0, fi.addr if fi else 0,
        len(func_info) // 8, 0, 0, 0, attach_btf_id, 0))
    return bpf(BPF_PROG_LOAD, attr, prog_name)


# union bpf_attr, BPF_MAP_FREEZE part: struct { __u32 map_fd; };
MAP_FREEZE_ATTR = struct.Struct("<I4x")


def map_freeze(map_fd: int) -> None:
    """BPF_MAP_FREEZE (Linux 5.2+): user space can no longer write the map."""
    bpf(BPF_MAP_FREEZE, bytearray(MAP_FREEZE_ATTR.pack(map_fd)), "BPF_MAP_FREEZE")


# union bpf_attr, BPF_PROG_TEST_RUN part:
# struct {
#     __u32 prog_fd;               0
#     __u32 retval;                4   (out)
#     __u32 data_size_in;          8
#     __u32 data_size_out;         12
#     __aligned_u64 data_in;       16
#     __aligned_u64 data_out;      24
#     __u32 repeat;                32
#     __u32 duration;              36  (out)
#     __u32 ctx_size_in;           40
#     __u32 ctx_size_out;          44
#     __aligned_u64 ctx_in;        48
#     __aligned_u64 ctx_out;       56
#     __u32 flags;                 64
#     __u32 cpu;                   68
#     __u32 batch_size;            72
# };                               80 (padded)
PROG_TEST_RUN_ATTR = struct.Struct("<IIIIQQIIIIQQIII4x")


def prog_test_run(prog_fd: int, ctx_in: bytes) -> int:
    """BPF_PROG_TEST_RUN of a program that takes only a context (raw
    tracepoint programs, Linux 5.10+: ``ctx_in`` is the tracepoint's u64
    arguments); returns the program's r0."""
    ctx = _Buf(ctx_in)
    attr = bytearray(PROG_TEST_RUN_ATTR.pack(prog_fd, 0, 0, 0, 0, 0, 0, 0,
                                             len(ctx_in), 0, ctx.addr, 0, 0, 0, 0))
    bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return PROG_TEST_RUN_ATTR.unpack(attr)[1]


# union bpf_attr, BPF_RAW_TRACEPOINT_OPEN part:
# struct {
#     __u64 name;                  0
#     __u32 prog_fd;               8
#     (4 bytes padding)
# };                               16
RAW_TRACEPOINT_ATTR = struct.Struct("<QI4x")


def raw_tracepoint_open(prog_fd: int, name: Optional[str]) -> int:
    """BPF_RAW_TRACEPOINT_OPEN; ``name`` None for tp_btf/fentry programs (the
    kernel takes the target from the program's attach_btf_id).  Returns a link fd."""
    n = _Buf(name.encode() + b"\0") if name is not None else None
    attr = bytearray(RAW_TRACEPOINT_ATTR.pack(n.addr if n else 0, prog_fd))
    return bpf(BPF_RAW_TRACEPOINT_OPEN, attr, name or "")


# union bpf_attr, BPF_LINK_CREATE part (tracing flavour):
# struct {
#     __u32 prog_fd;               0
#     __u32 target_fd;             4
#     __u32 attach_type;           8
#     __u32 flags;                 12
#     struct { __u32 target_btf_id; __u64 cookie; } tracing;  16, 24
# };                               32
LINK_CREATE_ATTR = struct.Struct("<IIIII4xQ")


def link_create(prog_fd: int, target_fd: int, attach_type: int,
                target_btf_id: int = 0, cookie: int = 0) -> int:
    """BPF_LINK_CREATE; returns the link fd."""
    attr = bytearray(LINK_CREATE_ATTR.pack(prog_fd, target_fd, attach_type, 0,
                                           target_btf_id, cookie))
    return bpf(BPF_LINK_CREATE, attr)


# union bpf_attr, BPF_BTF_LOAD part:
# struct {
#     __aligned_u64 btf;           0
#     __aligned_u64 btf_log_buf;   8
#     __u32 btf_size;              16
#     __u32 btf_log_size;          20
#     __u32 btf_log_level;         24
#     (4 bytes padding)
# };                               32
BTF_LOAD_ATTR = struct.Struct("<QQIII4x")


def btf_load(data: bytes) -> int:
    """BPF_BTF_LOAD of raw BTF bytes; returns the BTF object's fd."""
    b = _Buf(data)
    attr = bytearray(BTF_LOAD_ATTR.pack(b.addr, 0, len(data), 0, 0))
    return bpf(BPF_BTF_LOAD, attr)


# union bpf_attr, BPF_OBJ_GET_INFO_BY_FD part:
# struct {
#     __u32 bpf_fd;                0
#     __u32 info_len;              4
#     __aligned_u64 info;          8
# };                               16
OBJ_INFO_ATTR = struct.Struct("<IIQ")

# The head of struct bpf_prog_info / bpf_map_info / bpf_link_info:
# struct bpf_prog_info { __u32 type; __u32 id; __u8 tag[8]; ... };
# struct bpf_map_info  { __u32 type; __u32 id; __u32 key_size; __u32 value_size;
#                        __u32 max_entries; __u32 map_flags; char name[16]; ... };
# struct bpf_link_info { __u32 type; __u32 id; __u32 prog_id; ... };
INFO_HEAD = struct.Struct("<III")
_INFO_SIZE = 256


def obj_get_info_by_fd(fd: int) -> bytes:
    """The info struct of a prog/map/link/BTF fd, as many bytes as the kernel filled."""
    info = _Buf(_INFO_SIZE)
    attr = bytearray(OBJ_INFO_ATTR.pack(fd, _INFO_SIZE, info.addr))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    n = OBJ_INFO_ATTR.unpack(attr)[1]
    return info.bytes(n)


def obj_id(fd: int) -> int:
    """The kernel-wide id of a prog, map or link fd (second u32 of its info)."""
    return INFO_HEAD.unpack_from(obj_get_info_by_fd(fd))[1]


# union bpf_attr, BPF_*_GET_NEXT_ID part:
# struct {
#     __u32 start_id;              0
#     __u32 next_id;               4
#     __u32 open_flags;            8
# };                               12
NEXT_ID_ATTR = struct.Struct("<III")


def get_next_id(cmd: int, start_id: int) -> Optional[int]:
    """BPF_PROG_GET_NEXT_ID / BPF_MAP_GET_NEXT_ID / BPF_LINK_GET_NEXT_ID: the
    next id after ``start_id``, None at the end."""
    attr = bytearray(NEXT_ID_ATTR.pack(start_id, 0, 0))
    try:
        bpf(cmd, attr)
    except BPFError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return NEXT_ID_ATTR.unpack(attr)[1]


def all_ids(cmd: int) -> List[int]:
    """Every id the kernel enumerates for ``cmd`` (a *_GET_NEXT_ID command)."""
    ids = []
    cur = get_next_id(cmd, 0)
    while cur is not None:
        ids.append(cur)
        cur = get_next_id(cmd, cur)
    return ids


def close_fd(fd: int) -> None:
    """close(2), ignoring an fd that is already gone."""
    try:
        os.close(fd)
    except OSError:
        pass


class OwnedFD:
    """Owns one fd (a map, program, link or perf event); closes it once.

    ``kind`` names it in the error raised after close.
    """

    kind = "fd"

    def __init__(self, fd: int) -> None:
        self._fd: Optional[int] = fd

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise BPFError("%s is closed" % self.kind, errno.EBADF)
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            close_fd(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass
