"""Bounded readers of /proc/PID/* files: the only code that opens them.

/proc contents are input from a possible attacker: a process chooses its
own comm (with spaces, parentheses, newlines), a thread's name, its cgroup
(inside its own cgroup namespace), and can exit or be replaced by another
process with the same pid between two reads.  So every read here is
bounded, every parse tolerates garbage (a malformed field gives a default,
never an exception other than the OSError of a process that is gone), and
identity is (pid, start time) rather than pid alone.

proc(5) formats used:

* ``/proc/PID/stat``: ``pid (comm) state ppid ...``; comm may hold any
  byte but NUL and is at most 16 bytes (TASK_COMM_LEN), so the fields after
  it are found from the *last* ``)``.  Field 22 (1-based) is ``starttime``,
  in clock ticks since boot: with the pid, a process's identity.
* ``/proc/PID/status``: ``Key:\\tvalue`` lines; ``Uid`` (real, effective,
  saved, fs), ``NSpid`` (the pid in each pid namespace, outermost first),
  ``TracerPid``, ``PPid``, ``Tgid``.
* ``/proc/PID/cgroup``: ``hierarchy-ID:controllers:path`` lines; cgroup v2
  is the ``0::/path`` line.
"""

from __future__ import annotations

import errno
import os
from typing import Dict, List, Optional, Tuple

from perfagent.records import NamedTuple

#: Caps on what one /proc read may return.  maps of a process with a
#: million mappings is ~100 MB; 64 MB covers every real one and bounds a
#: hostile one.
MAPS_LIMIT = 64 << 20
SMALL_LIMIT = 64 << 10

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)


def proc_path(pid: int, *parts: str) -> str:
    return "/proc/%d/%s" % (pid, "/".join(parts))


def read_bounded(path: str, limit: int = SMALL_LIMIT) -> bytes:
    """At most ``limit`` bytes of a /proc (or any) file.

    A pid that does not exist raises FileNotFoundError (or
    ProcessLookupError when it vanished mid-read, as the kernel reports
    ESRCH): callers treat both as "gone".
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        chunks = []
        got = 0
        while got < limit:
            chunk = os.read(fd, min(1 << 20, limit - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(pid: int, name: str, limit: int = SMALL_LIMIT) -> str:
    """A /proc/PID file as text (undecodable bytes kept via surrogateescape)."""
    return read_bounded(proc_path(pid, name), limit).decode("utf-8", "surrogateescape")


class Stat(NamedTuple):
    """The /proc/PID/stat fields the agent uses."""

    pid: int
    comm: str
    state: str          # R, S, D, Z, T, t, X, I ...
    ppid: int
    starttime: int      # clock ticks after boot
    flags: int          # PF_* (PF_KTHREAD 0x00200000 marks a kernel thread)


#: include/linux/sched.h
PF_KTHREAD = 0x00200000


def parse_stat(data: bytes) -> Optional[Stat]:
    """Parse /proc/PID/stat bytes; None when malformed."""
    open_paren = data.find(b"(")
    close_paren = data.rfind(b")")
    if open_paren < 0 or close_paren < open_paren:
        return None
    try:
        pid = int(data[:open_paren].strip() or b"-1")
        comm = data[open_paren + 1:close_paren].decode("utf-8", "replace")
        rest = data[close_paren + 2:].split()
        # rest[0] is field 3 (state); field N is rest[N - 3].
        return Stat(pid, comm, rest[0].decode("ascii", "replace"), int(rest[1]),
                    int(rest[19]), int(rest[6]))
    except (ValueError, IndexError):
        return None


def stat(pid: int, tid: Optional[int] = None) -> Optional[Stat]:
    """The stat of process ``pid`` (or its thread ``tid``); None when gone or unreadable."""
    path = proc_path(pid, "stat") if tid is None else proc_path(pid, "task", str(tid), "stat")
    try:
        return parse_stat(read_bounded(path, 4096))
    except OSError:
        return None


def start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot, or None when gone."""
    st = stat(pid)
    return st.starttime if st is not None else None


def state(pid: int) -> str:
    """The one-letter state, or "" when the process is gone."""
    st = stat(pid)
    return st.state if st is not None else ""


def alive(pid: int) -> bool:
    return state(pid) not in ("", "Z", "X")


def parse_status(text: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def status(pid: int, tid: Optional[int] = None) -> Dict[str, str]:
    """/proc/PID/status as a dict ({} when gone or unreadable)."""
    path = proc_path(pid, "status") if tid is None else proc_path(pid, "task", str(tid), "status")
    try:
        return parse_status(read_bounded(path).decode("utf-8", "replace"))
    except OSError:
        return {}


def _ints(value: str) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split())
    except ValueError:
        return ()


def ns_pids(fields: Dict[str, str]) -> Tuple[int, ...]:
    """NSpid: the pid in each nested pid namespace, outermost (ours) first."""
    return _ints(fields.get("NSpid", ""))


def real_uid(fields: Dict[str, str]) -> int:
    uids = _ints(fields.get("Uid", ""))
    return uids[0] if uids else -1


def tracer_of(fields: Dict[str, str]) -> int:
    """TracerPid of a parsed status (0: nobody traces it)."""
    v = _ints(fields.get("TracerPid", ""))
    return v[0] if v else 0


def tracer_pid(pid: int) -> int:
    """TracerPid (0: nobody traces it); 0 when gone."""
    v = _ints(status(pid).get("TracerPid", ""))
    return v[0] if v else 0


def comm(pid: int, tid: Optional[int] = None) -> str:
    path = proc_path(pid, "comm") if tid is None else proc_path(pid, "task", str(tid), "comm")
    try:
        return read_bounded(path, 256).rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return ""


def threads(pid: int) -> List[int]:
    """Thread ids of ``pid``, sorted; ProcessLookupError when it is gone."""
    try:
        return sorted(int(t) for t in os.listdir(proc_path(pid, "task")) if t.isdigit())
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(errno.ESRCH, "no such process: %d" % pid) from None


def pids() -> List[int]:
    """Every process id on the machine (in our pid namespace), sorted."""
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())


def cgroup_path(pid: int) -> str:
    """The process's cgroup v2 path (the ``0::`` line), else the longest v1 path; "" if unknown."""
    try:
        text = read_bounded(proc_path(pid, "cgroup")).decode("utf-8", "replace")
    except OSError:
        return ""
    best = ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            return parts[2]
        if len(parts[2]) > len(best):
            best = parts[2]
    return best


def exe_path(pid: int) -> str:
    """readlink /proc/PID/exe without " (deleted)", or ""."""
    try:
        path = os.readlink(proc_path(pid, "exe"))
    except OSError:
        return ""
    return path[:-len(" (deleted)")] if path.endswith(" (deleted)") else path


def maps_bytes(pid) -> bytes:
    """/proc/PID/maps in one bounded read (pid may be "self")."""
    return read_bounded("/proc/%s/maps" % (pid,), MAPS_LIMIT)


def kernel_thread(pid: int) -> bool:
    """True for a kernel thread (no user memory, nothing to unwind or inject)."""
    st = stat(pid)
    return st is not None and bool(st.flags & PF_KTHREAD)


#: proc(5) state letters of /proc/PID/stat, as words (TASK_REPORT in fs/proc/array.c).
STATE_WORDS = {
    "R": "running", "S": "sleeping", "D": "uninterruptible", "T": "stopped",
    "t": "tracing-stop", "Z": "zombie", "X": "dead", "I": "idle", "P": "parked",
    "W": "waking", "K": "wakekill",
}


def cmdline(pid: int) -> List[str]:
    """The process's argv from /proc/PID/cmdline ([] when gone, a zombie or a kernel thread)."""
    try:
        data = read_bounded(proc_path(pid, "cmdline"), SMALL_LIMIT)
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in data.rstrip(b"\0").split(b"\0")] if data else []


class KernelFrame(NamedTuple):
    """One line of /proc/PID/task/TID/stack: ``[<address>] name+offset/size [module]``."""

    address: int     # 0 when the kernel hides it (the norm since Linux 4.x)
    name: str
    offset: int
    size: int
    module: str      # "" for the core kernel


def parse_kernel_stack(text: str) -> List[KernelFrame]:
    """Parse the text of /proc/PID/task/TID/stack; malformed lines are skipped.

    Each line is ``[<%px>] %pB`` (kernel/stacktrace.c, fs/proc/base.c):
    the address (zeros unless kallsyms addresses are shown to the reader),
    then ``symbol+0xoff/0xsize`` and `` [module]`` for module code; a bare
    hex address when the kernel has no symbol for it.
    """
    out: List[KernelFrame] = []
    for line in text.splitlines()[:MAX_KERNEL_FRAMES]:
        line = line.strip()
        if not line.startswith("[<"):
            continue
        close = line.find(">]")
        if close < 0:
            continue
        try:
            address = int(line[2:close], 16)
        except ValueError:
            continue
        rest = line[close + 2:].split()
        if not rest:
            continue
        module = rest[1][1:-1] if len(rest) > 1 and rest[1].startswith("[") and rest[1].endswith("]") else ""
        sym, plus, offsize = rest[0].partition("+")
        offset = size = 0
        if plus:
            off, _, sz = offsize.partition("/")
            try:
                offset, size = int(off, 16), int(sz or "0", 16)
            except ValueError:
                offset = size = 0
        out.append(KernelFrame(address, sym, offset, size, module))
    return out


#: At most this many kernel frames per thread (the kernel prints at most 64).
MAX_KERNEL_FRAMES = 128


def kernel_stack(pid: int, tid: int) -> List[KernelFrame]:
    """The kernel stack of thread ``tid`` of ``pid``, innermost first.

    Raises PermissionError when it is not readable (root only: the kernel
    checks CAP_SYS_ADMIN as well as ptrace access), FileNotFoundError or
    ProcessLookupError when the thread is gone.
    """
    return parse_kernel_stack(read_bounded(proc_path(pid, "task", str(tid), "stack"), SMALL_LIMIT)
                              .decode("utf-8", "replace"))


class SyscallRegs(NamedTuple):
    """What /proc/PID/task/TID/syscall tells of a thread that is not running."""

    nr: int      # the system call it is blocked in; -1 when not in one
    sp: int      # its user stack pointer
    pc: int      # its user program counter


def parse_syscall(text: str) -> Optional[SyscallRegs]:
    """``nr args... sp pc`` or ``-1 sp pc`` (fs/proc/base.c proc_pid_syscall); None for "running"."""
    parts = text.split()
    if len(parts) not in (3, 9):
        return None
    try:
        nr = int(parts[0])
        sp, pc = int(parts[-2], 16), int(parts[-1], 16)
    except ValueError:
        return None
    return SyscallRegs(nr, sp, pc)


def syscall_regs(pid: int, tid: int) -> Optional[SyscallRegs]:
    """The user sp and pc of a blocked or stopped thread, read without stopping it.

    None when the thread is running (the kernel says "running") or the file
    is malformed; raises PermissionError without ptrace access and
    FileNotFoundError/ProcessLookupError when the thread is gone.
    """
    return parse_syscall(read_bounded(proc_path(pid, "task", str(tid), "syscall"), 512)
                         .decode("ascii", "replace"))


def ptrace_scope() -> int:
    """kernel.yama.ptrace_scope (0-3), or -1 without Yama."""
    try:
        return int(read_bounded("/proc/sys/kernel/yama/ptrace_scope", 16).strip() or b"-1")
    except (OSError, ValueError):
        return -1
