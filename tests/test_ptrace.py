"""The ptrace layers against real processes: seize/interrupt, remote system
calls and calls through the stub, the signal frame that returns a thread by
itself, signals held with their siginfo, detach that cannot complete,
timeouts -- and the bytes of the frame and the stub against the specs."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import List, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from conftest import PROGRAMS, compile_c  # noqa: E402
from perfagent import arch  # noqa: E402
from perfagent.elf import ELFFile  # noqa: E402
from perfagent.ptrace import PtraceError, TracedThread, thread_states, tracer_pid  # noqa: E402
from perfagent.ptrace import stub as S  # noqa: E402
from perfagent.ptrace.call import (RemoteCaller, in_syscall, interrupted_syscall, locate_gadgets,  # noqa: E402
                                   temporary_sigmask, waiting_in_syscall)
from perfagent.ptrace.thread import regs_type  # noqa: E402
from perfagent.python.detect import load_bias  # noqa: E402
from perfagent.symbolize.procmaps import read_maps  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to trace"),
    pytest.mark.skipif(arch.current().NAME != "x86_64", reason="remote calls are x86-64 only"),
]

OLD_PYTHON = "/usr/bin/python3.11"
SI_USER, SI_QUEUE = 0, -1


def libc_function(pid: int, name: str) -> int:
    """Run-time address of libc function ``name`` in process ``pid``."""
    maps = read_maps(pid)
    entry = next(m for m in maps if os.path.basename(m.path).startswith("libc.so"))
    with ELFFile.from_path("/proc/%d/root%s" % (pid, entry.path)) as elf:
        sym = next(s for s in elf.iter_symbols(".dynsym") if s.name == name and s.st_shndx)
        return sym.st_value + load_bias(elf, maps, entry)


def released(pid: int) -> bool:
    return tracer_pid(pid) == 0 and not any(s in "tT" for s in thread_states(pid).values())


def wait_released(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if released(pid):
            return
        time.sleep(0.01)
    raise AssertionError("pid %d still traced or stopped: tracer %d, states %r"
                         % (pid, tracer_pid(pid), thread_states(pid)))


class CTarget:
    """A C test program whose stdout lines are collected."""

    def __init__(self, argv: List[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.lines: List[str] = []
        self.err = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self.wait_for(lambda: self.find("ready"), 10, "ready")

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode().strip())

    def _read_err(self) -> None:
        self.err = self.proc.stderr.read()

    def find(self, prefix: str) -> List[List[str]]:
        return [line.split() for line in list(self.lines) if line.startswith(prefix)]

    def wait_for(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if self.proc.poll() is not None:
                self._reader.join(2)  # what it wrote before exiting
                value = cond()
                if value:
                    return value
                break
            time.sleep(0.01)
        raise AssertionError("pid %d: no %s within %.0fs (exit %r, stderr %r, last lines %r)"
                             % (self.pid, what, timeout, self.proc.poll(), self.err, self.lines[-5:]))

    def oks(self) -> int:
        found = self.find("ok")
        return int(found[-1][1]) if found else 0

    def keeps_going(self, rounds: int = 20) -> None:
        """More rounds checked, none bad."""
        start = self.oks()
        self.wait_for(lambda: self.oks() >= start + rounds, 20, "%d more rounds" % rounds)
        assert self.proc.poll() is None and self.err == b"", self.err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def c_programs(programs_dir):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    out = {}
    flags = ["-O2", "-mno-red-zone"]
    out["regcheck"] = compile_c(os.path.join(PROGRAMS, "regcheck.c"), os.path.join(programs_dir, "regcheck"), flags)
    for name in ("sigrec", "vforker"):
        out[name] = compile_c(os.path.join(PROGRAMS, name + ".c"), os.path.join(programs_dir, name),
                              ["-O2", "-DSTANDALONE"])
    return out


@pytest.fixture
def start_c(c_programs):
    started: List[CTarget] = []

    def start(name: str, *args: str) -> CTarget:
        t = CTarget([c_programs[name], *args])
        started.append(t)
        return t
    yield start
    for t in started:
        t.close()


# ------------------------------------------------------------------ stops

def test_interrupt_in_sleep_shows_restartable_syscall_and_resumes():
    start = time.monotonic()
    p = subprocess.Popen(["sleep", "2"])
    try:
        time.sleep(0.3)
        t = TracedThread(p.pid)
        t.seize()
        try:
            st = t.interrupt(2.0)
            assert st.is_event_stop and not st.is_group_stop
            regs = t.getregs()
            nr = in_syscall(regs)
            assert nr in (arch.current().BLOCKING_SYSCALLS["clock_nanosleep"],
                          arch.current().BLOCKING_SYSCALLS["nanosleep"])
            assert waiting_in_syscall(regs)
            assert not temporary_sigmask(regs)
            # coreutils sleep uses a relative nanosleep: restart via restart_syscall.
            assert interrupted_syscall(regs) == (nr, arch.current().ERESTART_RESTARTBLOCK)
        finally:
            t.detach()
        assert released(p.pid)
        assert p.wait(10) == 0
        assert time.monotonic() - start >= 2.0
    finally:
        p.kill()
        p.wait()


def test_wait_times_out_and_detach_leaves_thread_running():
    p = subprocess.Popen(["sleep", "5"])
    try:
        time.sleep(0.2)
        t = TracedThread(p.pid)
        t.seize()
        try:
            start = time.monotonic()
            with pytest.raises(PtraceError) as info:
                t.wait(time.monotonic() + 0.2)
            assert info.value.reason == "timeout"
            assert time.monotonic() - start < 1.0
        finally:
            t.detach()
        assert released(p.pid)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_seize_of_missing_process_is_process_gone():
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(PtraceError) as info:
        TracedThread(p.pid).seize()
    assert info.value.reason == "process_gone"


def test_detach_of_a_thread_that_cannot_stop_is_left_to_the_kernel(start_c):
    """A vfork parent sleeps killable: PTRACE_INTERRUPT does not stop it, so
    PTRACE_DETACH is impossible.  detach() retries, reports detach_failed,
    and ending the tracing thread detaches it (cancelling the interrupt), so
    it never stops when it wakes."""
    t = start_c("vforker", "2500")
    time.sleep(0.5)  # in the vfork wait now
    assert thread_states(t.pid)[t.pid] == "D"
    box = {}

    def tracer():
        th = TracedThread(t.pid)
        th.seize()
        try:
            th.interrupt(0.2)
        except PtraceError as exc:
            box["interrupt"] = exc.reason
        try:
            th.detach()
        except PtraceError as exc:
            box["detach"] = exc.reason
            box["message"] = str(exc)
        box["tid"] = threading.get_native_id()

    worker = threading.Thread(target=tracer)
    worker.start()
    worker.join()
    assert box["interrupt"] == "timeout"
    assert box["detach"] == "detach_failed"
    assert "did not stop to be detached in 3 attempts" in box["message"]
    wait_released(t.pid, 2.0)
    t.wait_for(lambda: t.find("after"), 10, "the parent running on")
    assert t.proc.wait(5) == 0


# ----------------------------------------------------------- frame and stub

def test_signal_frame_layout_and_restart_rules():
    """The frame against struct rt_sigframe / ucontext / sigcontext_64 and
    _fpx_sw_bytes, byte offsets from the kernel headers."""
    a = arch.current()
    regs = regs_type()()
    for i, name in enumerate(arch.current().USER_REGS_FIELDS):
        setattr(regs, name, 0x1000 + i)
    regs.cs, regs.ss = 0x33, 0x2b
    regs.rsp = 0x7ffd00010000
    regs.rip = 0x401000
    size = 2696
    image = bytearray(range(256)) * (size // 256) + bytearray(size % 256)
    struct.pack_into("<Q", image, 464, 0x2e7)   # ptrace: XCR0 in sw_reserved word 0
    struct.pack_into("<QQ", image, 512, 0x7, 0)  # XSTATE_BV, XCOMP_BV
    top = regs.rsp - 128
    cases = [
        (-1 & (1 << 64) - 1, 7, 7, 0x401000),                              # not in a system call
        (35, -a.ERESTART_RESTARTBLOCK, 35, 0x400ffe),      # relative nanosleep: re-executed
        (219, -a.ERESTART_RESTARTBLOCK, 219, 0x400ffe),    # already in restart_syscall
        (230, -a.ERESTARTNOHAND, 230, 0x400ffe),                           # absolute clock_nanosleep
        (202, -a.ERESTARTSYS, 202, 0x400ffe),                              # futex wait
        (0, -a.ERESTARTNOINTR, 0, 0x400ffe),
        (0, -4, -4 & (1 << 64) - 1, 0x401000),                              # EINTR: returned as is
    ]
    for orig, ret, want_rax, want_rip in cases:
        regs.orig_rax = orig & (1 << 64) - 1
        regs.rax = ret & (1 << 64) - 1
        f = S.Frame(regs, (0x202, bytes(image)), 0x4000, top, restorer=0x7f0000001234)
        data = f.data
        assert f.fpstate % 64 == 0 and f.address % 16 == 0 and f.stack % 16 == 0
        assert f.uc == f.address + 8 and f.stack <= f.address - 64
        assert f.address + len(data) <= top
        assert struct.unpack_from("<Q", data, 0)[0] == 0x7f0000001234           # pretcode
        uc = 8
        assert struct.unpack_from("<Q", data, uc)[0] == 0x7                      # uc_flags
        assert data[uc + 8:uc + 40] == bytes(32)                                 # uc_link, uc_stack
        sc = uc + 40
        named = dict(zip(S.SIGCONTEXT_REGS, struct.unpack_from("<18Q", data, sc)))
        assert named["r8"] == regs.r8 and named["r15"] == regs.r15 and named["rsp"] == regs.rsp
        assert named["rbx"] == regs.rbx and named["eflags"] == regs.eflags
        assert (named["rax"], named["rip"]) == (want_rax, want_rip)
        assert struct.unpack_from("<4H", data, sc + 144) == (0x33, 0, 0, 0x2b)  # cs gs fs ss
        assert struct.unpack_from("<Q", data, sc + 184)[0] == f.fpstate          # fpstate
        assert struct.unpack_from("<Q", data, uc + 296)[0] == 0x4000             # uc_sigmask
        fp = f.fpstate - f.address
        assert data[fp:fp + 464] == bytes(image[:464]) and data[fp + 512:fp + size] == bytes(image[512:])
        # struct _fpx_sw_bytes { magic1, extended_size, xfeatures, xstate_size, padding[7] }
        assert struct.unpack_from("<IIQI", data, fp + 464) == (S.FP_XSTATE_MAGIC1, size + 4, 0x2e7, size)
        assert data[fp + 484:fp + 512] == bytes(28)
        assert struct.unpack_from("<I", data, fp + size)[0] == S.FP_XSTATE_MAGIC2
    # AMX enabled in XCR0 but unused by the thread: the tile data is left out.
    amx = bytearray(8192 + 2696)
    struct.pack_into("<Q", amx, 464, 0x602e7)
    struct.pack_into("<Q", amx, 512, 0x3)
    f = S.Frame(regs, (0x202, bytes(amx)), 0, top, restorer=1)
    fp = f.fpstate - f.address
    assert struct.unpack_from("<IIQI", f.data, fp + 464) == (S.FP_XSTATE_MAGIC1, 2700, 0x202e7, 2696)
    assert len(f.data) - fp == 2700
    # An FXSAVE-only state: no magic, no UC_FP_XSTATE.
    regs.orig_rax = (1 << 64) - 1
    f = S.Frame(regs, (2, bytes(512)), 0, top, restorer=1)
    assert struct.unpack_from("<Q", f.data, 8)[0] == S.UC_SIGCONTEXT_SS | S.UC_STRICT_RESTORE_SS
    assert len(f.data) - (f.fpstate - f.address) == 512


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_stub_code_is_what_its_listing_says(tmp_path):
    path = tmp_path / "stub.bin"
    path.write_bytes(S.CODE)
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64", str(path)],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    listing = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].strip().endswith(":"):
            listing.append((int(parts[0].strip()[:-1], 16), " ".join(parts[2].split())))
    want = [
        "call *%r12", "mov %eax,%ebp", "movl $0x1,(%r15)", "cmpl $0x0,0x4(%r15)", "jne 0x28",
        "movl $0x2,(%r15)", "lea 0x18(%r15),%rdi", "call *%r13", "movslq %eax,%rax", "mov %rax,0x8(%r15)",
        "movl $0x3,(%r15)", "mov %ebp,%edi", "call *%r14", "movl $0x4,(%r15)",
        "mov %rbx,%rsp", "mov $0xf,%eax", "syscall", "jmp 0x3b",
        "call *%r12", "mov %rax,0x8(%r15)", "movl $0x4,(%r15)", "jmp 0x3b",
        "push %rbx", "mov %rdi,%rbx", "movl $0x2,(%rbx)", "cmpl $0x0,0x4(%rbx)", "jne 0x75",
        "lea 0x18(%rbx),%rdi", "call *0x10(%rbx)", "movslq %eax,%rax", "mov %rax,0x8(%rbx)",
        "movl $0x5,(%rbx)", "xor %eax,%eax", "pop %rbx", "ret",
    ]
    assert [text for _, text in listing] == want
    offsets = dict((text, off) for off, text in reversed(listing))
    assert S.LABELS["statement"] == 0 and S.LABELS["call"] == 0x47 and S.LABELS["pending"] == 0x57
    assert S.MARKER_OFFSET == offsets["syscall"] + 2
    assert (S.SLOT_PHASE, S.SLOT_CANCEL, S.SLOT_RC, S.SLOT_FUNC, S.SLOT_TEXT) == (0, 4, 8, 16, 24)


def test_gadgets_are_found_in_libc(start_c):
    t = start_c("regcheck", "sleep")
    g = locate_gadgets(t.pid, read_maps(t.pid))
    with open("/proc/%d/mem" % t.pid, "rb") as mem:
        mem.seek(g.syscall_ret)
        assert mem.read(3) == S.SYSCALL_RET
        mem.seek(g.restorer)
        assert mem.read(9) in S.RESTORE_RT_PATTERNS or mem.read(7) in S.RESTORE_RT_PATTERNS
    libc = [m for m in read_maps(t.pid) if os.path.basename(m.path).startswith("libc.so") and "x" in m.perms]
    assert any(m.start <= g.restorer < m.end for m in libc)


# -------------------------------------------------------- borrowing a thread

def _borrow(pid: int, getpid: int, checks: bool = True) -> Tuple[int, int]:
    """Hold, syscall, map the stub, call getpid through it, unmap, release;
    (getpid via the gadget, getpid via the stub)."""
    with TracedThread(pid) as th:
        th.seize()
        th.interrupt(2.0)
        before = th.getregs()
        xstate = th.get_xstate()
        mask = th.getsigmask()
        span = 16384
        stack = th.read(before.rsp - span, span)
        c = RemoteCaller(th, locate_gadgets(pid, read_maps(pid)))
        c.hold()
        low = c.frame.low
        assert before.rsp - span < low
        by_syscall = c.syscall(arch.current().BLOCKING_SYSCALLS["getpid"])
        page = c.map_stub()
        slot = page + S.CODE_PAGES * S.PAGE_SIZE
        th.write(slot, S.slot_bytes(b""))
        c.run(page + S.LABELS["call"], page + S.MARKER_OFFSET, {"r12": getpid, "r15": slot})
        phase, _, rc = S.parse_slot(th.read(slot, 16))
        assert phase == S.PHASE_CALL_DONE
        c.unmap_stub(page)
        c.release()
        if checks:
            assert bytes(th.getregs()) == bytes(before)
            assert th.get_xstate() == xstate
            assert th.getsigmask() == mask
            # The frame's bytes are written back, the red zone never touched.
            assert th.read(low, before.rsp - low) == stack[low - (before.rsp - span):]
        return by_syscall, rc & 0xffffffff


@pytest.mark.parametrize("mode", ["sleep", "absolute", "spin"])
def test_borrowed_thread_gets_every_register_back(start_c, mode):
    """20 rounds of syscall + stub call + release on a target that checks
    its general, vector and MXCSR registers and its sleeps after each
    round: no difference, no sleep cut short."""
    t = start_c("regcheck", mode)
    t.wait_for(lambda: t.oks() >= 10, 10, "first rounds")
    getpid = libc_function(t.pid, "getpid")
    for _ in range(20):
        assert _borrow(t.pid, getpid) == (t.pid, t.pid)
        assert released(t.pid)
        time.sleep(0.01)
    t.keeps_going(20)   # regcheck exits on a sleep lost or cut short
    maps = open("/proc/%d/maps" % t.pid).read()
    assert "rwxp" not in maps


def _held_with_stub(th: TracedThread, pid: int) -> Tuple[RemoteCaller, int, int]:
    """Hold the interrupted thread and map the stub: (caller, page, an empty slot)."""
    c = RemoteCaller(th, locate_gadgets(pid, read_maps(pid)))
    c.hold()
    page = c.map_stub()
    slot = page + S.PAGE_SIZE
    th.write(slot, S.slot_bytes(b""))
    return c, page, slot


def test_sleeper_whose_restart_block_our_call_reset_sleeps_on(start_c):
    """A stub call that sleeps (usleep: nanosleep resets the restart block
    on entry) leaves restart_syscall nothing to resume: release() hands an
    interrupted relative sleep back as ERESTARTNOHAND, re-executed whole,
    instead of an EINTR; every other register verbatim."""
    t = start_c("regcheck", "sleep")
    t.wait_for(lambda: t.oks() >= 10, 10, "first rounds")
    usleep = libc_function(t.pid, "usleep")
    a = arch.current()
    in_sleep = 0
    for _ in range(10):
        with TracedThread(t.pid) as th:
            th.seize()
            th.interrupt(2.0)
            before = th.getregs()
            c, page, slot = _held_with_stub(th, t.pid)
            assert not c.restart_block_touched      # mmap and mprotect leave it
            c.run(page + S.LABELS["call"], page + S.MARKER_OFFSET, {"r12": usleep, "rdi": 1000, "r15": slot})
            assert c.restart_block_touched
            c.unmap_stub(page)
            c.release()
            after = th.getregs()
            if interrupted_syscall(before) == (35, a.ERESTART_RESTARTBLOCK):
                in_sleep += 1
                assert after.rax == -a.ERESTARTNOHAND & (1 << 64) - 1
                after.rax = before.rax
            assert bytes(after) == bytes(before)
        assert released(t.pid)
        time.sleep(0.01)
    assert in_sleep >= 5, in_sleep
    t.keeps_going(20)   # regcheck exits on an EINTR or a sleep cut short


def _caught(pid: int) -> int:
    status = open("/proc/%d/status" % pid).read()
    return int([l for l in status.splitlines() if l.startswith("SigCgt:")][0].split()[1], 16)


def test_fault_in_call_is_reported_and_undone(start_c):
    """A SIGSEGV in code we run is reported and suppressed, and the target's
    own SIGSEGV handler stays (a fault whose signal is blocked would make the
    kernel reset it to SIG_DFL)."""
    t = start_c("sigrec")
    caught = _caught(t.pid)
    assert caught & (1 << (signal.SIGSEGV - 1))
    with TracedThread(t.pid) as th:
        th.seize()
        th.interrupt(2.0)
        before = th.getregs()
        c, page, slot = _held_with_stub(th, t.pid)
        try:
            with pytest.raises(PtraceError) as info:
                c.run(page + S.LABELS["call"], page + S.MARKER_OFFSET, {"r12": 0x10, "r15": slot})
            assert info.value.reason == "target_fault"
            assert "SIGSEGV at 0x10" in str(info.value)
        finally:
            c.release()
        assert bytes(th.getregs()) == bytes(before)
    assert released(t.pid)
    assert _caught(t.pid) == caught
    time.sleep(0.2)
    assert t.proc.poll() is None and t.err == b""
    os.kill(t.pid, signal.SIGUSR1)
    t.wait_for(lambda: t.find("siginfo"), 5, "the target handling signals")


def _sigqueue(pid: int, sig: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sigqueue.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    if libc.sigqueue(pid, sig, value) != 0:
        raise OSError(ctypes.get_errno(), "sigqueue")


def test_signals_sent_while_borrowed_arrive_once_with_their_siginfo(start_c):
    """Sent while the thread runs our code, a sigqueue'd real-time signal and
    a kill()ed SIGUSR1 wait in the kernel (blocked) and reach the handler
    afterwards, each once, with the sender's pid, si_code and value."""
    t = start_c("sigrec")
    rt = signal.SIGRTMIN + 1
    getpid = libc_function(t.pid, "getpid")
    with TracedThread(t.pid) as th:
        th.seize()
        th.interrupt(2.0)
        mask = th.getsigmask()
        c = RemoteCaller(th, locate_gadgets(t.pid, read_maps(t.pid)))
        c.hold()
        page = c.map_stub()   # the mask is now "everything blocked"
        assert th.getsigmask() & (1 << (rt - 1))
        _sigqueue(t.pid, rt, 4242)
        _sigqueue(t.pid, rt, 4343)
        os.kill(t.pid, signal.SIGUSR1)
        slot = page + S.PAGE_SIZE
        th.write(slot, S.slot_bytes(b""))
        c.run(page + S.LABELS["call"], page + S.MARKER_OFFSET, {"r12": getpid, "r15": slot})
        time.sleep(0.1)
        assert t.find("siginfo") == []          # nothing ran our code's way
        c.unmap_stub(page)
        c.release()
        assert th.getsigmask() == mask
    me = str(os.getpid())
    got = t.wait_for(lambda: len(t.find("siginfo")) >= 3 and t.find("siginfo"), 5, "three signals")
    time.sleep(0.2)
    got = sorted(tuple(x[1:5]) for x in t.find("siginfo"))
    assert got == sorted([(str(rt), me, str(SI_QUEUE), "4242"), (str(rt), me, str(SI_QUEUE), "4343"),
                          (str(int(signal.SIGUSR1)), me, str(SI_USER), "0")])
    assert released(t.pid)


# ------------------------------------------------------ the agent dies

AGENT = r"""
import os, sys, time
sys.path.insert(0, %(repo)r)
from perfagent import arch
from perfagent.ptrace import TracedThread, call as C, stub as S
from perfagent.ptrace.call import RemoteCaller, locate_gadgets
from perfagent.symbolize.procmaps import read_maps
pid, usleep, point = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def hook(name):
    if name == point:
        print("paused", name, flush=True)
        time.sleep(600)
C.TEST_HOOK = hook
th = TracedThread(pid)
th.seize()
th.interrupt(2.0)
c = RemoteCaller(th, locate_gadgets(pid, read_maps(pid)))
c.hold()
page = c.map_stub()
slot = page + S.PAGE_SIZE
th.write(slot, S.slot_bytes(b""))
regs = {"r12": usleep, "rdi": 100000, "r15": slot}
c.run(page + S.LABELS["call"], page + S.MARKER_OFFSET, regs)
c.unmap_stub(page)
c.release()
print("not paused", flush=True)
time.sleep(600)
"""

KILL_POINTS = ("held", "syscall_set", "syscall_exit", "stub_set", "in_call", "marker", "release_stop",
               "restored")


@pytest.mark.parametrize("mode", ["sleep", "spin"])
@pytest.mark.parametrize("point", KILL_POINTS)
def test_agent_killed_anywhere_leaves_target_intact(start_c, tmp_path, mode, point):
    """SIGKILL the tracer while it holds the thread at each step: the thread
    returns by itself (stub, then rt_sigreturn on the frame) with every
    register, its mask and its sleep intact."""
    t = start_c("regcheck", mode)
    t.wait_for(lambda: t.oks() >= 10, 10, "first rounds")
    script = tmp_path / "agent.py"
    script.write_text(AGENT % {"repo": REPO})
    usleep = libc_function(t.pid, "usleep")
    agent = subprocess.Popen([sys.executable, str(script), str(t.pid), str(usleep), point],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = agent.stdout.readline().strip()
        assert line == "paused " + point, line
        agent.kill()
        agent.wait()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    wait_released(t.pid)
    t.keeps_going(20)
    status = open("/proc/%d/status" % t.pid).read()
    blocked = [l for l in status.splitlines() if l.startswith("SigBlk:")][0].split()[1]
    assert int(blocked, 16) == 0
