"""Loaded programs, their attachments, and the verifier log.

``Prog`` owns a program fd; ``Link`` owns the fd of an attachment made with
BPF_RAW_TRACEPOINT_OPEN or BPF_LINK_CREATE (detached when closed);
``PerfEvent`` owns a perf event fd a PERF_EVENT program is attached to with
PERF_EVENT_IOC_SET_BPF.  All are context managers and close on garbage
collection too, so a failing run leaves nothing in the kernel.

Loading first runs without a log (the verifier is much faster without one);
only a rejection is retried with log_level 1 and a buffer that grows on
ENOSPC, and the resulting VerifierError names the verifier's complaint and
the instruction it was looking at.
"""

from __future__ import annotations

import errno
import re
import struct
from typing import List, Optional, Tuple

from perfagent import libc as _libc
from perfagent.bpf import syscall as sc
from perfagent.bpf.syscall import BPFError, VerifierError
from perfagent.perf import event as _event

LOG_SIZE_START = 256 * 1024
# Kernels before 5.2 reject log_size >= 16 MiB; later ones allow more but
# a log that large is not something a person reads.
LOG_SIZE_MAX = (1 << 24) - 1
LOG_TAIL_LINES = 10

# "12: (85) call bpf_map_lookup_elem#1": one instruction as the verifier prints it.
_INSN_LINE = re.compile(r"^\d+: \([0-9a-f]{2}\)")
# Statistics the verifier appends after its verdict.
_STATS_LINE = re.compile(r"^(processed \d+ insns|verification time|stack depth|mark_read)")


def summarize_log(log: str):
    """(reason, offending instruction, tail lines) from a verifier log."""
    lines = [ln.rstrip() for ln in log.splitlines() if ln.strip()]
    body = list(lines)
    while body and _STATS_LINE.match(body[-1]):
        body.pop()
    reason = body[-1] if body else ""
    insn = None
    for ln in reversed(body):
        if _INSN_LINE.match(ln):
            insn = ln
            break
    return reason, insn, lines[-LOG_TAIL_LINES:]


def _rejection(name: str, err: int, log: str) -> VerifierError:
    reason, insn, tail = summarize_log(log)
    what = "BPF_PROG_LOAD%s: the verifier rejected the program (%s)" % (
        " (%s)" % name if name else "", errno.errorcode.get(err, str(err)))
    if reason:
        what += ": " + reason
    if insn and insn != reason:
        what += " at insn " + insn
    message = what + "\n  verifier log tail:\n" + "\n".join("    " + ln for ln in tail)
    return VerifierError(message, err, log, insn)


# struct btf_type for the function records below (uapi linux/btf.h):
# { __u32 name_off; __u32 info (kind << 24 | vlen); __u32 size_or_type; }
# struct btf_param { __u32 name_off; __u32 type; }
# struct bpf_func_info { __u32 insn_off; __u32 type_id; }
_BTF_HEADER = struct.Struct("<HBBIIIII")
_BTF_TYPE = struct.Struct("<III")
_BTF_PARAM = struct.Struct("<II")
_FUNC_INFO = struct.Struct("<II")
_KIND_INT, _KIND_PTR, _KIND_FUNC, _KIND_FUNC_PROTO = 1, 2, 12, 13


def func_btf(functions) -> "tuple":
    """(BTF blob, func_info bytes) naming ``functions`` -- (insn offset,
    name, number of pointer arguments) in program order -- each
    ``int f(void *, ...)`` with static linkage: what the verifier needs to
    check a program that has subprograms (a bpf_loop callback)."""
    strings = bytearray(b"\0")

    def name(text: str) -> int:
        off = len(strings)
        strings.extend(text.encode() + b"\0")
        return off

    types = bytearray()
    types += _BTF_TYPE.pack(name("int"), _KIND_INT << 24, 4) + struct.pack("<I", (1 << 24) | 32)  # 1: int
    types += _BTF_TYPE.pack(0, _KIND_PTR << 24, 0)                                                # 2: void *
    next_id = 3
    info = bytearray()
    for insn_off, fname, nargs in functions:
        types += _BTF_TYPE.pack(0, (_KIND_FUNC_PROTO << 24) | nargs, 1)
        for i in range(nargs):
            types += _BTF_PARAM.pack(name("a%d" % i), 2)
        types += _BTF_TYPE.pack(name(fname), _KIND_FUNC << 24, next_id)
        info += _FUNC_INFO.pack(insn_off, next_id + 1)
        next_id += 2
    header = _BTF_HEADER.pack(0xEB9F, 1, 0, _BTF_HEADER.size, 0, len(types), len(types), len(strings))
    return header + bytes(types) + bytes(strings), bytes(info)


def load_program(prog_type: int, insns: bytes, license: str = "GPL",
                 expected_attach_type: int = 0, attach_btf_id: int = 0,
                 name: str = "", functions=None) -> int:
    """BPF_PROG_LOAD with the verifier log captured on rejection; returns the fd.
    ``functions``: see :func:`func_btf` (None: a program without subprograms)."""
    kw = dict(license=license, expected_attach_type=expected_attach_type,
              attach_btf_id=attach_btf_id, prog_name=name)
    btf_fd = None
    if functions:
        blob, kw["func_info"] = func_btf(functions)
        btf_fd = kw["prog_btf_fd"] = sc.btf_load(blob)
    try:
        return _load_program(prog_type, insns, name, kw)
    finally:
        if btf_fd is not None:
            sc.close_fd(btf_fd)   # the program holds its own reference


def _load_program(prog_type: int, insns: bytes, name: str, kw: dict) -> int:
    try:
        return sc.prog_load(prog_type, insns, **kw)
    except BPFError as exc:
        if exc.errno in (errno.EPERM, errno.ENOSYS, errno.E2BIG, errno.ENOMEM):
            raise
        first = exc
    size = LOG_SIZE_START
    while True:
        buf = sc._Buf(size)
        try:
            # Accepted with a log after all (e.g. a transient ENOMEM): keep it.
            return sc.prog_load(prog_type, insns, log_level=1, log_buf=buf, **kw)
        except BPFError as exc:
            if exc.errno == errno.ENOSPC and size < LOG_SIZE_MAX:
                size = min(size * 4, LOG_SIZE_MAX)
                continue
            log = buf.raw.value.decode("utf-8", "replace")
            if not log.strip():
                raise first from None
            raise _rejection(name, exc.errno, log) from None


# struct bpf_prog_info { ... __u64 run_time_ns; __u64 run_cnt; ... } (uapi bpf.h):
# the two counters sit at byte 192, after prog_tags.
PROG_INFO_RUN_OFF = 192
PROG_INFO_RUN = struct.Struct("<QQ")


class Link(sc.OwnedFD):
    """An attachment; the program stays attached until this is closed."""

    kind = "link"

    @property
    def id(self) -> int:
        return sc.obj_id(self.fd)


class Prog(sc.OwnedFD):
    """A loaded, verified program.

    ``maps`` keeps the Map objects the program references alive for as long
    as the Prog is (the kernel holds its own references anyway).
    """

    kind = "program"

    def __init__(self, prog_type: int, insns: bytes, license: str = "GPL",
                 expected_attach_type: int = 0, attach_btf_id: int = 0,
                 name: str = "", maps: Optional[List[object]] = None, functions=None) -> None:
        self._fd = None
        self.prog_type = prog_type
        self.expected_attach_type = expected_attach_type
        self.name = name
        self.maps = list(maps or ())
        super().__init__(load_program(prog_type, insns, license, expected_attach_type,
                                      attach_btf_id, name, functions))

    @property
    def id(self) -> int:
        """The kernel-wide program id (BPF_OBJ_GET_INFO_BY_FD)."""
        return sc.obj_id(self.fd)

    def run_stats(self) -> Tuple[int, int]:
        """(run_time_ns, run_cnt): the time the program ran and how often,
        counted only while kernel.bpf_stats_enabled is 1 (0, 0 on kernels
        whose bpf_prog_info is shorter)."""
        info = sc.obj_get_info_by_fd(self.fd)
        if len(info) < PROG_INFO_RUN_OFF + PROG_INFO_RUN.size:
            return 0, 0
        return PROG_INFO_RUN.unpack_from(info, PROG_INFO_RUN_OFF)

    def attach_raw_tracepoint(self, name: str) -> Link:
        """BPF_RAW_TRACEPOINT_OPEN for a BPF_PROG_TYPE_RAW_TRACEPOINT program.

        ``name`` is the tracepoint without its group ("sched_switch"); no
        tracefs is needed.
        """
        return Link(sc.raw_tracepoint_open(self.fd, name))

    def attach_tracing(self) -> Link:
        """Attach a BPF_PROG_TYPE_TRACING program (tp_btf, fentry, fexit) to the
        target named by its attach_btf_id.

        BPF_LINK_CREATE where the kernel takes it for this attach type (raw_tp
        links since 6.x), else BPF_RAW_TRACEPOINT_OPEN with no name, which
        every kernel with tracing programs accepts.
        """
        try:
            return Link(sc.link_create(self.fd, 0, self.expected_attach_type))
        except BPFError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, sc.ENOTSUPP):
                raise
        return Link(sc.raw_tracepoint_open(self.fd, None))


class PerfEvent(sc.OwnedFD):
    """A perf event fd (from perf_event_open) that can run a PERF_EVENT program.

    The program runs on every sample (overflow) of the event while the event
    is open and enabled; closing the event detaches it.
    """

    kind = "perf event"

    def __init__(self, attr: bytes, pid: int, cpu: int) -> None:
        self._fd = None
        super().__init__(_event.perf_event_open(attr, pid, cpu))

    def set_bpf(self, prog: Prog) -> None:
        """PERF_EVENT_IOC_SET_BPF: run ``prog`` on each overflow."""
        try:
            _libc.ioctl(self.fd, _event.PERF_EVENT_IOC_SET_BPF, prog.fd)
        except OSError as exc:
            raise BPFError("PERF_EVENT_IOC_SET_BPF: %s" % exc.strerror, exc.errno or 0) from None

    def enable(self) -> None:
        _event.enable(self.fd)

    def disable(self) -> None:
        _event.disable(self.fd)
