"""The BPF layer against the running kernel: maps, programs on real events,
verifier rejections, and nothing left behind afterwards.

Needs root (or CAP_BPF + CAP_PERFMON) and bpf(); skipped otherwise.  No
tracefs: raw tracepoints are attached by name with BPF_RAW_TRACEPOINT_OPEN
and tp_btf programs by BTF id.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import time
from typing import Iterable, List, Set

import pytest

from perfagent.bpf import syscall as sc
from perfagent.bpf.asm import DW, FP, R0, R1, R2, R3, R4, R6, W, Program
from perfagent.bpf.btf import VMLINUX_PATH, vmlinux
from perfagent.bpf.maps import ArrayMap, HashMap, PerCPUHashMap, StackTraceMap, possible_cpus
from perfagent.bpf.prog import PerfEvent, Prog, summarize_log
from perfagent.bpf.syscall import BPFError, VerifierError
from perfagent.perf import attr as pattr


def _bpf_usable() -> str:
    try:
        with HashMap(4, 4, 1, name="probe"):
            return ""
    except BPFError as exc:
        return str(exc)


_WHY = _bpf_usable()
pytestmark = pytest.mark.skipif(bool(_WHY), reason="bpf() unusable here: %s" % _WHY)

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
# struct key { __u32 tgid; __u32 tid; __s32 ustack; __s32 kstack; };
STACK_KEY = struct.Struct("<IIii")


# -- helpers -------------------------------------------------------------------

def emit_count(p: Program, counts, key_off: int, one_off: int) -> None:
    """counts[*(key *)(fp + key_off)] += 1, inserting 1 when absent.

    Clobbers r0-r5; expects nothing in them.  ``one_off`` is a free u64 slot.
    """
    p.ld_map_fd(R1, counts)
    p.mov(R2, FP)
    p.add(R2, key_off)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "insert")
    p.mov(R1, 1)
    p.atomic_add(DW, R0, R1, 0)          # lock *(u64 *)r0 += 1
    p.ja("counted")
    p.label("insert")
    p.st(DW, FP, one_off, 1)
    p.ld_map_fd(R1, counts)
    p.mov(R2, FP)
    p.add(R2, key_off)
    p.mov(R3, FP)
    p.add(R3, one_off)
    p.mov(R4, sc.BPF_NOEXIST)            # a racing insert on another CPU wins; fine
    p.call("map_update_elem")
    p.label("counted")


def sleeper(n: int = 50, interval: float = 0.01) -> subprocess.Popen:
    """A process that sleeps ``n`` times: at least ``n`` context switches out."""
    code = "import time\nfor _ in range(%d): time.sleep(%r)\n" % (n, interval)
    return subprocess.Popen([sys.executable, "-c", code])


def bpf_fds() -> Set[int]:
    """This process's fds that are BPF progs, maps or links (from fdinfo)."""
    out = set()
    for name in os.listdir("/proc/self/fdinfo"):
        try:
            with open("/proc/self/fdinfo/" + name) as f:
                text = f.read()
        except OSError:
            continue
        if "prog_type:" in text or "map_type:" in text or "link_type:" in text:
            out.add(int(name))
    return out


def assert_gone(prog_ids: Iterable[int] = (), map_ids: Iterable[int] = (),
                link_ids: Iterable[int] = (), timeout: float = 5.0) -> None:
    """The kernel no longer enumerates any of these ids.

    Freeing is deferred past an RCU grace period for maps a program used,
    so poll briefly.
    """
    want = [(sc.BPF_PROG_GET_NEXT_ID, set(prog_ids)), (sc.BPF_MAP_GET_NEXT_ID, set(map_ids)),
            (sc.BPF_LINK_GET_NEXT_ID, set(link_ids))]
    deadline = time.monotonic() + timeout
    while True:
        left = [(cmd, ids & set(sc.all_ids(cmd))) for cmd, ids in want]
        if not any(ids for _cmd, ids in left):
            return
        if time.monotonic() > deadline:
            raise AssertionError("still in the kernel: %r" % left)
        time.sleep(0.05)


@pytest.fixture
def no_fd_leak():
    before = bpf_fds()
    yield
    assert bpf_fds() <= before


# -- maps ------------------------------------------------------------------------

def test_hash_map_crud(no_fd_leak):
    with HashMap(4, 8, 16, name="crud") as m:
        assert m.lookup(U32.pack(1)) is None
        assert m.next_key(None) is None
        m.update(U32.pack(1), U64.pack(10))
        m.update(U32.pack(2), U64.pack(20))
        assert U64.unpack(m.lookup(U32.pack(1)))[0] == 10
        m.update(U32.pack(1), U64.pack(11), sc.BPF_EXIST)
        assert U64.unpack(m.lookup(U32.pack(1)))[0] == 11
        with pytest.raises(BPFError) as ei:
            m.update(U32.pack(2), U64.pack(0), sc.BPF_NOEXIST)
        assert ei.value.errno == errno.EEXIST
        assert "BPF_MAP_UPDATE_ELEM" in str(ei.value)
        assert sorted(U32.unpack(k)[0] for k in m.keys()) == [1, 2]
        assert m.delete(U32.pack(2)) is True
        assert m.delete(U32.pack(2)) is False
        assert [U32.unpack(k)[0] for k in m.keys()] == [1]
        with pytest.raises(ValueError):
            m.lookup(b"abc")
        mid = m.id
        assert mid > 0
    assert m.closed
    assert_gone(map_ids=[mid])


def test_hash_map_drain_batch(no_fd_leak):
    with HashMap(8, 8, 4096, name="batch") as m:
        for i in range(1000):
            m.update(U64.pack(i), U64.pack(i * 3))
        got = dict((U64.unpack(k)[0], U64.unpack(v)[0]) for k, v in m.drain(chunk=64))
        assert m._batch_ok is True  # BPF_MAP_LOOKUP_AND_DELETE_BATCH was used
        assert got == {i: i * 3 for i in range(1000)}
        assert m.next_key(None) is None
        assert m.drain() == []


def test_batch_drains_reuse_their_buffers_without_stale_entries(no_fd_leak):
    """A map drained again and again (a stack store, every collection) keeps
    its batch buffers: each drain returns exactly what is in the map now,
    never entries a bigger earlier drain left in the buffers."""
    value = struct.Struct("<Q3064x")   # a Python stack store's 3 KiB values
    with HashMap(8, value.size, 4096, name="rebatch") as m:
        for i in range(600):
            m.update(U64.pack(i), value.pack(i * 3))
        got = dict((U64.unpack(k)[0], value.unpack(v)[0]) for k, v in m.drain())
        assert got == {i: i * 3 for i in range(600)}
        bufs = m._batch_bufs
        for i in range(5):
            m.update(U64.pack(10000 + i), value.pack(i * 7))
        got = dict((U64.unpack(k)[0], value.unpack(v)[0]) for k, v in m.drain())
        assert got == {10000 + i: i * 7 for i in range(5)}
        assert m._batch_bufs is bufs             # the same buffers, not new ones
        assert m.drain() == []


def test_update_many_writes_what_update_would(no_fd_leak):
    with HashMap(8, 8, 4096, name="many") as m:
        m.update_many([(U64.pack(i), U64.pack(i * 7)) for i in range(2500)])   # three batches
        m.update_many([(U64.pack(5), U64.pack(1))])                          # one: a plain update
        got = dict((U64.unpack(k)[0], U64.unpack(v)[0]) for k, v in m.items())
        want = {i: i * 7 for i in range(2500)}
        want[5] = 1
        assert got == want
        with pytest.raises(ValueError):
            m.update_many([(U64.pack(1), b"x"), (U64.pack(2), b"y")])
    with StackTraceMap(8, name="st2") as st:
        # No batch ops for stack maps: one update each (here refused as stack
        # maps refuse user updates), never a silent loss.
        with pytest.raises(BPFError):
            st.update_many([(U32.pack(1), bytes(st.value_size_user))] * 2)


def test_drain_fallback_and_percpu(no_fd_leak):
    # Stack maps have no batch ops: drain falls back to iterate + delete.
    with StackTraceMap(8, name="st") as st:
        assert st.drain() == []
        assert st._batch_ok is False
    with ArrayMap(8, 4, name="arr") as a:
        a.update(U32.pack(2), U64.pack(5))
        got = dict(a.drain())
        assert U64.unpack(got[U32.pack(2)])[0] == 5
        assert U64.unpack(a.lookup(U32.pack(2)))[0] == 0
    with PerCPUHashMap(4, 8, 4, name="pcpu") as pc:
        assert pc.value_size_user == 8 * possible_cpus()
        pc.update(U32.pack(1), b"".join(U64.pack(c) for c in range(possible_cpus())))
        vals = struct.unpack("<%dQ" % possible_cpus(), pc.lookup(U32.pack(1)))
        assert list(vals) == list(range(possible_cpus()))


# -- programs ----------------------------------------------------------------------

def test_verifier_rejection_names_the_problem(no_fd_leak):
    p = Program("uninit")
    p.mov(R0, 0)
    p.mov(R0, R2)        # r2 is never written: the verifier refuses to read it
    p.exit()
    with pytest.raises(VerifierError) as ei:
        p.load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT)
    e = ei.value
    first = str(e).splitlines()[0]
    assert "BPF_PROG_LOAD (uninit)" in first
    assert "R2 !read_ok" in first
    assert "1: (bf) r0 = r2" in first          # the offending instruction
    assert e.insn == "1: (bf) r0 = r2"
    assert "R2 !read_ok" in e.log
    assert len(str(e).splitlines()) <= 2 + 10


def test_verifier_log_grows(no_fd_leak, monkeypatch):
    # A log buffer too small for the log: the loader retries with a bigger one.
    import perfagent.bpf.prog as prog_mod
    monkeypatch.setattr(prog_mod, "LOG_SIZE_START", 64)
    p = Program("small_log")
    for _ in range(50):
        p.mov(R1, 1)
    p.mov(R0, R3)
    p.exit()
    with pytest.raises(VerifierError) as ei:
        p.load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT)
    assert "R3 !read_ok" in str(ei.value).splitlines()[0]


def test_summarize_log():
    log = ("func#0 @0\n0: R1=ctx() R10=fp0\n0: (b7) r0 = 0\n1: (79) r2 = *(u64 *)(r1 +8)\n"
           "invalid bpf_context access off=8 size=8\n"
           "processed 2 insns (limit 1000000) max_states_per_insn 0\n")
    reason, insn, tail = summarize_log(log)
    assert reason == "invalid bpf_context access off=8 size=8"
    assert insn == "1: (79) r2 = *(u64 *)(r1 +8)"
    assert tail[-1].startswith("processed 2 insns")


def test_permission_message():
    msg = sc.explain(sc.BPF_PROG_LOAD, errno.EPERM)
    assert "needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)" in msg
    assert "\n" not in msg
    assert "CONFIG_BPF_SYSCALL" in sc.explain(sc.BPF_MAP_CREATE, errno.ENOSYS)


def count_switches_raw_tp():
    """BPF_PROG_TYPE_RAW_TRACEPOINT on sched_switch: counts[current tid] += 1.

    sched_switch fires in the context of the task being switched out, so
    current is ``prev``.
    """
    counts = HashMap(4, 8, 10240, name="sw_raw")
    p = Program("sw_raw")
    p.call("get_current_pid_tgid")       # r0 = tgid << 32 | tid
    p.stx(W, FP, R0, -4)                 # key = tid
    emit_count(p, counts, -4, -16)
    p.mov(R0, 0)
    p.exit()
    return counts, p


def test_raw_tracepoint_counts_context_switches(no_fd_leak):
    counts, p = count_switches_raw_tp()
    with counts, p.load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT) as prog:
        ids = (prog.id, counts.id)
        with prog.attach_raw_tracepoint("sched_switch") as link:
            link_id = link.id
            child = sleeper(50)
            child.wait(timeout=30)
        n = counts.lookup(U32.pack(child.pid))
    assert n is not None, "no context switches counted for the sleeping child"
    n = U64.unpack(n)[0]
    assert 50 <= n < 10000, n
    assert_gone([ids[0]], [ids[1]], [link_id])


@pytest.mark.parametrize("attach", ["link_create", "raw_tracepoint_open"])
def test_tp_btf_reads_prev_pid(no_fd_leak, monkeypatch, attach):
    if not os.path.exists(VMLINUX_PATH):
        pytest.skip("no kernel BTF")
    if attach == "raw_tracepoint_open":
        # As on kernels whose BPF_LINK_CREATE does not take raw_tp programs.
        def refuse(*args, **kw):
            raise BPFError("BPF_LINK_CREATE: Invalid argument", errno.EINVAL)
        monkeypatch.setattr(sc, "link_create", refuse)
    btf = vmlinux()
    attach_id = btf.raw_tp_btf_id("sched_switch")
    prev_arg = btf.raw_tp_arg_index("sched_switch", "prev")
    pid = btf.member("task_struct", "pid")
    assert btf.member_size(pid) == 4
    counts = HashMap(4, 8, 10240, name="sw_btf")
    p = Program("sw_btf")
    p.ldx(DW, R3, R1, 8 * prev_arg)      # r3 = ctx[prev] (struct task_struct *)
    p.add(R3, pid.offset)                # r3 = &prev->pid
    p.mov(R1, FP)
    p.add(R1, -4)
    p.mov(R2, 4)
    p.call("probe_read_kernel")          # *(u32 *)(fp - 4) = prev->pid
    p.jne(R0, 0, "out")
    emit_count(p, counts, -4, -16)
    p.label("out")
    p.mov(R0, 0)
    p.exit()
    with counts, p.load(sc.BPF_PROG_TYPE_TRACING, expected_attach_type=sc.BPF_TRACE_RAW_TP,
                        attach_btf_id=attach_id) as prog:
        ids = (prog.id, counts.id)
        with prog.attach_tracing() as link:
            link_id = link.id
            child = sleeper(50)
            child.wait(timeout=30)
        n = counts.lookup(U32.pack(child.pid))
    assert n is not None
    assert 50 <= U64.unpack(n)[0] < 10000
    assert_gone([ids[0]], [ids[1]], [link_id])


BUSY = r"""
import os, time
end = time.monotonic() + 1.0
x = 0
while time.monotonic() < end:
    for i in range(200):
        x += i * i
    os.stat("/")  # a syscall in every short round: kernel stacks are common, not luck
    os.stat("/proc/self/status")
"""


def sample_child(argv: List[str]):
    """Run ``argv`` under a 1 kHz cpu-clock event whose PERF_EVENT program
    counts (tgid, tid, user stack id, kernel stack id).

    Returns the child's pid, its [(key, count)] and {stack id: ips}, read
    before the maps are closed; checks that nothing stays in the kernel.
    """
    stacks = StackTraceMap(1024, name="stacks")
    counts = HashMap(STACK_KEY.size, 8, 4096, name="samples")
    p = Program("on_sample")
    p.mov(R6, R1)                         # r6 = ctx (struct bpf_perf_event_data *)
    p.call("get_current_pid_tgid")
    p.stx(W, FP, R0, -12)                 # key.tid = low half
    p.rsh(R0, 32)
    p.stx(W, FP, R0, -16)                 # key.tgid = high half
    p.mov(R1, R6)
    p.ld_map_fd(R2, stacks)
    p.mov(R3, sc.BPF_F_USER_STACK)
    p.call("get_stackid")
    p.stx(W, FP, R0, -8)                  # key.ustack (negative errno if none)
    p.mov(R1, R6)
    p.ld_map_fd(R2, stacks)
    p.mov(R3, 0)
    p.call("get_stackid")
    p.stx(W, FP, R0, -4)                  # key.kstack
    emit_count(p, counts, -16, -24)
    p.mov(R0, 0)
    p.exit()

    attr = pattr.pack_attr(
        pattr.PERF_TYPE_SOFTWARE, pattr.PERF_COUNT_SW_CPU_CLOCK, 1000, 0,
        pattr.attr_flags(disabled=True, freq=True))
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        with stacks, counts, p.load(sc.BPF_PROG_TYPE_PERF_EVENT) as prog:
            ids = (prog.id, stacks.id, counts.id)
            with PerfEvent(attr, child.pid, -1) as ev:
                ev.set_bpf(prog)
                ev.enable()
                child.wait(timeout=30)
            samples = [(STACK_KEY.unpack(k), U64.unpack(v)[0]) for k, v in counts.drain()]
            mine = [(k, n) for k, n in samples if k[0] == child.pid]
            found = {}
            for k, _n in mine:
                for sid in k[2:]:
                    if sid >= 0:
                        found[sid] = stacks.stack(sid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert_gone([ids[0]], ids[1:])
    return child.pid, mine, found


USER_TOP = 1 << 47
KERNEL_BOTTOM = 0xFFFF800000000000


def test_perf_event_program_kernel_and_user_stacks(no_fd_leak):
    pid, mine, found = sample_child([sys.executable, "-c", BUSY])
    assert sum(n for _k, n in mine) >= 100, mine
    assert all(k[1] == pid for k, _n in mine)  # single-threaded child: tid == tgid
    ustacks = {k[2] for k, _n in mine if k[2] >= 0}
    kstacks = {k[3] for k, _n in mine if k[3] >= 0}
    assert ustacks, "no user stack collected"
    # The interpreter has no frame pointers, so only the sampled ip is sure
    # to be meaningful; deeper "frames" may be whatever rbp held.
    assert all(found[s] and 0 < found[s][0] < USER_TOP for s in ustacks)
    assert kstacks, "no kernel stack collected (the child stats / in a loop)"
    assert all(found[s] and all(ip >= KERNEL_BOTTOM for ip in found[s]) for s in kstacks)


def test_perf_event_program_frame_pointer_user_stack(no_fd_leak, chain_bin):
    pid, mine, found = sample_child([chain_bin, "1.0"])
    assert sum(n for _k, n in mine) >= 100, mine
    deep = [found[k[2]] for k, _n in mine if k[2] >= 0 and len(found[k[2]]) >= 5]
    # main > a > b > c > leaf, all walkable by frame pointer: at least five
    # user-space return addresses.
    assert deep, "no frame-pointer stack of depth >= 5: %r" % found
    assert all(0 < ip < USER_TOP for ip in deep[0][:5])


def test_obj_info_ids_and_enumeration(no_fd_leak):
    counts, p = count_switches_raw_tp()
    with counts, p.load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT) as prog:
        info = sc.obj_get_info_by_fd(prog.fd)
        ptype, pid_ = struct.unpack_from("<II", info)
        assert ptype == sc.BPF_PROG_TYPE_RAW_TRACEPOINT
        assert pid_ == prog.id
        assert prog.id in sc.all_ids(sc.BPF_PROG_GET_NEXT_ID)
        assert counts.id in sc.all_ids(sc.BPF_MAP_GET_NEXT_ID)
        minfo = sc.obj_get_info_by_fd(counts.fd)
        assert struct.unpack_from("<IIIII", minfo) == (
            sc.BPF_MAP_TYPE_HASH, counts.id, 4, 8, 10240)
        ids = (prog.id, counts.id)
    assert_gone([ids[0]], [ids[1]])


def test_closed_objects_refuse_use():
    m = HashMap(4, 4, 1, name="closed")
    m.close()
    m.close()  # idempotent
    with pytest.raises(BPFError, match="closed"):
        m.lookup(U32.pack(0))


def test_unprivileged_gets_capability_hint():
    """A process without privileges gets the one-line capability message."""
    if os.getuid() != 0:
        pytest.skip("needs root to drop privileges")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, try, report
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                HashMap(4, 4, 1, name="noperm").close()
                os.write(w, b"OK")
            except BPFError as exc:
                os.write(w, ("%d|%s" % (exc.errno, exc)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    if out == "OK":
        pytest.skip("unprivileged BPF is allowed on this machine")
    err, msg = out.split("|", 1)
    assert int(err) == errno.EPERM
    assert msg.startswith("BPF_MAP_CREATE (noperm): Operation not permitted: needs CAP_BPF "
                          "and CAP_PERFMON (or CAP_SYS_ADMIN)")
    assert "\n" not in msg


PY38 = os.environ.get("PERFAGENT_PY38", "/root/.pyenv/versions/3.8.18/bin/python3.8")

SMOKE = r"""
import struct, subprocess, sys
from perfagent.bpf import syscall as sc
from perfagent.bpf.asm import Program, R0, R1, R2, R3, R4, FP, W, DW
from perfagent.bpf.btf import vmlinux
from perfagent.bpf.maps import HashMap
b = vmlinux()
off = b.member("task_struct", "pid").offset
with HashMap(4, 8, 1024, name="smoke") as counts:
    p = Program("smoke")
    p.call("get_current_pid_tgid")
    p.stx(W, FP, R0, -4)
    p.ld_map_fd(R1, counts); p.mov(R2, FP); p.add(R2, -4)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "new")
    p.mov(R1, 1); p.atomic_add(DW, R0, R1, 0); p.ja("out")
    p.label("new")
    p.st(DW, FP, -16, 1)
    p.ld_map_fd(R1, counts); p.mov(R2, FP); p.add(R2, -4); p.mov(R3, FP); p.add(R3, -16)
    p.mov(R4, 0); p.call("map_update_elem")
    p.label("out"); p.mov(R0, 0); p.exit()
    with p.load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT) as prog, prog.attach_raw_tracepoint("sched_switch"):
        child = subprocess.Popen(["sleep", "0.2"])
        child.wait()
    n = counts.lookup(struct.pack("<I", child.pid))
    print("count", struct.unpack("<Q", n)[0] if n else 0, "pid_off", off)
"""


@pytest.mark.skipif(not os.path.exists(PY38), reason="no Python 3.8 interpreter here")
def test_runs_on_python38():
    """The oldest supported interpreter loads BTF, assembles, loads and attaches."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    res = subprocess.run([PY38, "-c", SMOKE], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    words = res.stdout.split()
    assert words[0] == "count" and int(words[1]) >= 1, res.stdout


def test_ringbuf_records_from_a_program(no_fd_leak):
    from perfagent.bpf.maps import RingBuf
    rb = RingBuf(256 * 1024, name="events")
    p = Program("rb")
    p.call("get_current_pid_tgid")
    p.stx(DW, FP, R0, -16)               # record.pid_tgid
    p.call("ktime_get_ns")
    p.stx(DW, FP, R0, -8)                # record.ts
    p.ld_map_fd(R1, rb)
    p.mov(R2, FP)
    p.add(R2, -16)
    p.mov(R3, 16)
    p.mov(R4, 0)
    p.call("ringbuf_output")             # dropped (-EAGAIN) when full: fine
    p.mov(R0, 0)
    p.exit()
    records: List[bytes] = []
    with rb, p.load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT) as prog:
        ids = (prog.id, rb.id)
        with prog.attach_raw_tracepoint("sched_switch"):
            child = sleeper(20)
            while child.poll() is None:
                rb.poll(0.05)
                records += rb.consume()
        records += rb.consume()
    assert_gone([ids[0]], [ids[1]])
    assert records and all(len(r) == 16 for r in records)
    decoded = [struct.unpack("<QQ", r) for r in records]
    mine = [ts for pid_tgid, ts in decoded if pid_tgid & 0xFFFFFFFF == child.pid]
    assert len(mine) >= 20
    assert mine == sorted(mine)          # one task's switches arrive in order


def test_ringbuf_wraps_around(no_fd_leak):
    """208-byte records through a one-page ring: positions wrap several times,
    and since 208 does not divide the page some records straddle the end of
    the data area and must come out whole (the double data mapping)."""
    import mmap
    from perfagent.bpf.maps import RingBuf
    rec = 200                            # + 8 header bytes = 208 per record
    child = sleeper(60)
    try:
        rb = RingBuf(mmap.PAGESIZE, name="wrap")
        p = Program("rb_wrap")
        p.call("get_current_pid_tgid")
        p.jne32(R0, child.pid, "out")    # only the child's switches (tid in the low half)
        p.mov(R6, R0)
        for off in range(-rec, 0, 8):
            p.st(DW, FP, off, 0)         # initialise the record on the stack
        p.stx(DW, FP, R6, -rec)
        p.ld_imm64(R1, 0x1122334455667788)
        p.stx(DW, FP, R1, -8)            # a marker in the record's last word
        p.ld_map_fd(R1, rb)
        p.mov(R2, FP)
        p.add(R2, -rec)
        p.mov(R3, rec)
        p.mov(R4, 0)
        p.call("ringbuf_output")
        p.label("out")
        p.mov(R0, 0)
        p.exit()
        records: List[bytes] = []
        with rb, p.load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT) as prog:
            with prog.attach_raw_tracepoint("sched_switch"):
                while child.poll() is None:
                    rb.poll(0.005)
                    records += rb.consume()
            records += rb.consume()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert len(records) >= 30, len(records)    # > 19 records: the ring wrapped
    for r in records:
        assert len(r) == rec
        assert struct.unpack_from("<Q", r)[0] & 0xFFFFFFFF == child.pid
        assert struct.unpack_from("<Q", r, rec - 8)[0] == 0x1122334455667788
        assert r[8:rec - 8] == bytes(rec - 16)


SYS_GETPPID = 110   # x86-64 (arch/x86/entry/syscalls/syscall_64.tbl)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 syscall number")
def test_ring_wakes_its_reader_once_a_quarter_waits(no_fd_leak):
    """emit_ringbuf_output's records do not wake an edge-triggered reader
    one by one, but once a quarter of the ring waits: 264-byte records
    (256 + the 8-byte header) in a one-page ring, one per getppid() of this
    thread; the fifth sees 1056 bytes waiting (>= 1024) and forces the
    wakeup.  A level-triggered watch would report the first record."""
    import mmap
    import select
    import threading
    from perfagent.bpf.asm import R7, R8
    from perfagent.bpf.maps import RingBuf
    from perfagent.stackprog import capture as C
    rec = 256
    rb = RingBuf(mmap.PAGESIZE, name="wake")
    p = Program("rb_wake")
    p.mov(R6, R1)
    p.call("get_current_pid_tgid")
    p.jne32(R0, threading.get_native_id(), "out")
    p.ldx(DW, R1, R6, 8)                 # sys_enter(regs, id): the syscall number
    p.jne(R1, SYS_GETPPID, "out")
    for off in range(-rec, 0, 8):
        p.st(DW, FP, off, 0)
    p.mov(C.BUF, FP)
    p.add(C.BUF, -rec)
    p.mov(R8, rec)
    C.emit_ringbuf_output(p, rb, R8, lambda tag: None)
    p.label("out")
    p.mov(R0, 0)
    p.exit()
    assert C.BUF == R7
    edge, level = select.epoll(), select.epoll()
    try:
        with rb, p.load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT) as prog:
            edge.register(rb.fd, select.EPOLLIN | select.EPOLLET)
            level.register(rb.fd, select.EPOLLIN)
            with prog.attach_raw_tracepoint("sys_enter"):
                woken = []
                for _ in range(6):
                    os.getppid()
                    woken.append(bool(edge.poll(0)))
                told = bool(level.poll(0))
            records = rb.consume()
    finally:
        edge.close()
        level.close()
    assert len(records) == 6 and all(len(r) == rec for r in records)
    assert woken[:4] == [False] * 4 and woken[4], woken
    assert told


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 syscall number")
def test_count_map_wakes_its_reader_when_armed_inserts_are_reached(no_fd_leak):
    """emit_accumulate with a wake ring: each getppid() of this thread
    inserts a new key (its time); with the wake armed at 5 inserts past
    the last drain, the fifth insert sends one RECORD_WAKE with a forced
    wakeup (an edge-triggered reader hears it), the first four do not;
    re-armed after a drain, the next wake comes five inserts later again."""
    import select
    import threading
    from perfagent.bpf.maps import RingBuf
    from perfagent.stackprog.accounting import STAT_INSERTS, Stats, emit_accumulate, WAKE_RECORD
    from perfagent.stackprog.layout import RECORD_WAKE
    stats = Stats()
    counts = HashMap(8, 16, 64, name="wake_counts")
    rb = RingBuf(4096, name="wake_ring")
    p = Program("count_wake")
    p.mov(R6, R1)
    p.call("get_current_pid_tgid")
    p.jne32(R0, threading.get_native_id(), "out")
    p.ldx(DW, R1, R6, 8)
    p.jne(R1, SYS_GETPPID, "out")
    p.call("ktime_get_ns")
    p.stx(DW, FP, R0, -8)                # key: a new one per call
    p.st(DW, FP, -24, 1)                 # sums
    p.st(DW, FP, -16, 1)
    emit_accumulate(p, counts, -8, -24, stats.map, -32, "c", wake_ring=rb)
    p.label("out")
    p.mov(R0, 0)
    p.exit()
    edge = select.epoll()
    try:
        with rb, counts, p.load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT) as prog:
            edge.register(rb.fd, select.EPOLLIN | select.EPOLLET)
            stats.before_drain()
            stats.arm_wake(5)
            with prog.attach_raw_tracepoint("sys_enter"):
                woken = []
                for _ in range(5):
                    os.getppid()
                    woken.append(bool(edge.poll(0)))
                first = rb.consume()
                list(counts.drain())
                stats.before_drain()
                stats.arm_wake(5)
                again = []
                for _ in range(5):
                    os.getppid()
                    again.append(bool(edge.poll(0)))
            inserts = stats.read(STAT_INSERTS)
            second = rb.consume()
    finally:
        edge.close()
        stats.close()
    assert inserts == 10
    assert woken == [False] * 4 + [True], woken
    assert again == [False] * 4 + [True], again
    assert first == second == [WAKE_RECORD.pack(RECORD_WAKE, 0)]


@pytest.mark.parametrize("n", [0, 1, 5, 127, 200])
def test_hash_loop_and_inline_hash_agree_with_fnv(no_fd_leak, n):
    """The stack hashes through bpf_loop (what the stack programs use where
    the kernel has it) and as the inline bounded loop (kernels before 5.17)
    give the same FNV-1a as perfagent.stackprog.store, for a native stack
    and a Python one, up to and past their bounds (run with
    BPF_PROG_TEST_RUN, the buffer in an array map)."""
    from perfagent.stackprog import capture as C
    from perfagent.stackprog.store import fnv1a_words
    if not C.bpf_loop_supported():
        pytest.skip("no bpf_loop (Linux 5.17+)")
    py_bound = 150
    native_off, py_off, out_off = 8, 8 + 8 * 127, 8 + 8 * 127 + 16 * py_bound
    buf = ArrayMap(out_off + 32, 1, name="hash_test")
    words = [(0x9E3779B97F4A7C15 * (i + 1)) & (2 ** 64 - 1) for i in range(2 * py_bound)]
    value = bytearray(out_off + 32)
    struct.pack_into("<II", value, 0, n, n)              # native n at 0, Python n at 4
    struct.pack_into("<%dQ" % 127, value, native_off, *words[:127])
    struct.pack_into("<%dQ" % (2 * py_bound), value, py_off, *words)
    p = Program("hash_test")
    p.st(W, FP, -4, 0)
    p.ld_map_fd(R1, buf)
    p.mov(R2, FP).add(R2, -4)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "out")
    p.mov(C.BUF, R0)
    native_cb, python_cb = C.HASH_NATIVE_CB, C.hash_python_cb(py_bound)
    C.emit_hash_loop(p, native_off, 0, W, native_cb, -32, R0, "nl")
    p.stx(DW, C.BUF, R0, out_off)
    C.emit_hash_words(p, native_off, 0, W, 8, (0,), 127, R0, "ni")
    p.stx(DW, C.BUF, R0, out_off + 8)
    C.emit_hash_loop(p, py_off, 4, W, python_cb, -32, R0, "pl")
    p.stx(DW, C.BUF, R0, out_off + 16)
    C.emit_hash_words(p, py_off, 4, W, 16, (0, 8), py_bound, R0, "pi")
    p.stx(DW, C.BUF, R0, out_off + 24)
    p.label("out")
    p.mov(R0, 0)
    p.exit()
    C.emit_hash_callbacks(p, [native_cb, python_cb])
    with buf, p.load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT) as prog:
        buf.update(U32.pack(0), bytes(value))
        sc.prog_test_run(prog.fd, bytes(8))
        got = struct.unpack_from("<4Q", buf.lookup(U32.pack(0)), out_off)
    native = min(n, 127)
    python = min(n, py_bound)
    want_native = fnv1a_words(words[:native]) if native else 0
    want_python = fnv1a_words(words[:2 * python]) if python else 0
    assert got == (want_native, want_native, want_python, want_python)
