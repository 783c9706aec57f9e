"""The ptrace layers against real processes: seize/interrupt, remote calls,
system-call restart, deferred signals, timeouts, detach."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from perfagent import arch  # noqa: E402
from perfagent.elf import ELFFile  # noqa: E402
from perfagent.ptrace import PtraceError, TracedThread, thread_states, tracer_pid  # noqa: E402
from perfagent.ptrace.call import RemoteCaller, in_syscall, interrupted_syscall, waiting_in_syscall  # noqa: E402
from perfagent.python.detect import load_bias  # noqa: E402
from perfagent.symbolize.procmaps import read_maps  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to trace"),
    pytest.mark.skipif(arch.current().USER_REGS_FIELDS is None, reason="remote calls are x86-64 only"),
]

OLD_PYTHON = "/usr/bin/python3.11"


def libc_function(pid: int, name: str) -> int:
    """Run-time address of libc function ``name`` in process ``pid``."""
    maps = read_maps(pid)
    entry = next(m for m in maps if os.path.basename(m.path).startswith("libc.so"))
    with ELFFile.from_path("/proc/%d/root%s" % (pid, entry.path)) as elf:
        sym = next(s for s in elf.iter_symbols(".dynsym") if s.name == name and s.st_shndx)
        return sym.st_value + load_bias(elf, maps, entry)


def released(pid: int) -> bool:
    return tracer_pid(pid) == 0 and not any(s in "tT" for s in thread_states(pid).values())


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


def test_remote_call_returns_value_and_sleep_is_not_cut_short():
    start = time.monotonic()
    p = subprocess.Popen(["sleep", "2"])
    try:
        time.sleep(0.3)
        getpid = libc_function(p.pid, "getpid")
        with TracedThread(p.pid) as t:
            t.seize()
            t.interrupt(2.0)
            before = t.getregs()
            sp = before.rsp
            below = t.read(sp - 512, 512)
            c = RemoteCaller(t)
            c.begin()
            addr = c.push(b"hello\0")
            assert addr < sp - arch.current().STACK_RED_ZONE
            deadline = time.monotonic() + 5
            for _ in range(3):
                assert c.call(getpid, (), deadline, "getpid") == p.pid
            c.restore()
            after = t.getregs()
            assert bytes(after) == bytes(before)
            assert t.read(sp - 512, 512) == below
        assert released(p.pid)
        assert p.wait(10) == 0
        assert time.monotonic() - start >= 2.0
    finally:
        p.kill()
        p.wait()


def test_remote_call_fault_is_reported_and_undone():
    p = subprocess.Popen(["sleep", "1"])
    try:
        time.sleep(0.2)
        with TracedThread(p.pid) as t:
            t.seize()
            t.interrupt(2.0)
            c = RemoteCaller(t)
            c.begin()
            try:
                with pytest.raises(PtraceError) as info:
                    c.call(0x10, (), time.monotonic() + 5)
                assert info.value.reason == "target_fault"
            finally:
                c.restore()
        assert released(p.pid)
        assert p.wait(10) == 0
    finally:
        p.kill()
        p.wait()


@pytest.mark.skipif(not os.access(OLD_PYTHON, os.X_OK), reason="no %s" % OLD_PYTHON)
def test_signal_arriving_while_held_is_delivered_after_detach():
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGUSR1, lambda *a: print('usr1', flush=True))\n"
            "print('ready', flush=True)\n"
            "t = time.monotonic(); time.sleep(2); print('done %.3f' % (time.monotonic() - t), flush=True)\n")
    p = subprocess.Popen([OLD_PYTHON, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        getpid = libc_function(p.pid, "getpid")
        with TracedThread(p.pid) as t:
            t.seize()
            t.interrupt(2.0)
            os.kill(p.pid, signal.SIGUSR1)
            c = RemoteCaller(t)
            c.begin()
            try:
                assert c.call(getpid, (), time.monotonic() + 5) == p.pid
            finally:
                c.restore()
            assert t.pending_signals == [signal.SIGUSR1]
        out, err = p.communicate(timeout=10)
        lines = out.split()
        assert lines[0] == "usr1", (out, err)
        assert lines[1] == "done" and float(lines[2]) >= 2.0
        assert err == ""
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
