"""A target process as the agent sees it: identity, names, namespaces.

A pid alone does not name a process: pids are reused.  ``Identity`` is
(pid, start time in clock ticks since boot); two reads that give
different start times are two processes, and everything derived from the
first (address space, comm, uid, caches, trust in its perf map) must not
be applied to the second.
"""

from __future__ import annotations

from typing import Optional, Tuple

from perfagent.records import NamedTuple
from perfagent.target import procfs
from perfagent.target.container import ContainerInfo, parse_cgroup


class Identity(NamedTuple):
    pid: int
    start: int   # /proc/PID/stat starttime; 0 when unknown (process gone)


class ProcessView(NamedTuple):
    """What /proc says about one process, read once."""

    identity: Identity
    comm: str
    uid: int                  # real uid (-1 unknown)
    ns_pids: Tuple[int, ...]  # NSpid: ours first, innermost last
    cgroup: str
    container: ContainerInfo
    kernel_thread: bool

    @property
    def pid(self) -> int:
        return self.identity.pid

    @property
    def ns_pid(self) -> int:
        """The pid the process has in its own (innermost) pid namespace."""
        return self.ns_pids[-1] if self.ns_pids else self.identity.pid

    @property
    def in_other_pid_namespace(self) -> bool:
        return len(self.ns_pids) > 1 and self.ns_pids[-1] != self.identity.pid


def identity(pid: int) -> Optional[Identity]:
    """The current identity of ``pid``, or None when there is no such process."""
    st = procfs.stat(pid)
    return Identity(pid, st.starttime) if st is not None else None


def view(pid: int) -> Optional[ProcessView]:
    """Read a process's identity, names and namespaces; None when it is gone.

    The start time is read first and again last: a pid that was reused in
    between gives None rather than a mix of two processes.
    """
    first = procfs.stat(pid)
    if first is None:
        return None
    if first.flags & procfs.PF_KTHREAD:
        # A kernel thread: root, in the root cgroup, named in stat (one
        # read instead of five: a large host runs hundreds of them, and
        # -a reads every process at start).
        return ProcessView(Identity(pid, first.starttime), first.comm, 0, (pid,), "/", parse_cgroup("/"),
                           True)
    fields = procfs.status(pid)
    comm = procfs.comm(pid) or first.comm
    cgroup = procfs.cgroup_path(pid)
    last = procfs.stat(pid)
    if last is None or last.starttime != first.starttime:
        return None
    return ProcessView(Identity(pid, first.starttime), comm, procfs.real_uid(fields),
                       procfs.ns_pids(fields), cgroup, parse_cgroup(cgroup),
                       bool(first.flags & procfs.PF_KTHREAD))
