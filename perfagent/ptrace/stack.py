"""The call stack of a stopped thread, unwound with the capture's DWARF walker.

Used to judge whether a stopped thread is at a point where a remote call
is safe: the instruction pointer alone says "in futex()", the return
addresses say *why* (waiting for the GIL inside pthread_cond_timedwait, or
sleeping in time.sleep with the GIL released).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple

from perfagent import arch
from perfagent.symbolize.procmaps import AddressSpace, MapEntry
from perfagent.capture import mapped_file
from perfagent.unwind.walker import CFICache, Walker

#: Bytes of stack copied for the unwind: enough for the few innermost frames
#: the safe-point check looks at.
STACK_BYTES = 32 * 1024

_cfi = CFICache()


def _binary_for(pid: int):
    cache = {}

    def binary_for(entry: MapEntry):
        key = (entry.path, entry.inode)
        if key in cache:
            return cache[key]
        binary = None
        if entry.path == "[vdso]":
            binary = _cfi.get_vdso()
        elif entry.path.startswith("/"):
            binary = _cfi.get(mapped_file(pid, entry))
        cache[key] = binary
        return binary
    return binary_for


def unwind(thread, regs, space: Optional[AddressSpace] = None, max_bytes: int = STACK_BYTES) -> Tuple[int, ...]:
    """Return addresses of ``thread``'s user frames, innermost first.

    ``regs`` are its registers (from getregs); the stack is read through the
    thread's /proc/PID/mem.  An empty or short result means the unwind
    stopped early (no CFI, unreadable memory): callers must treat that as
    "unknown".
    """
    a = arch.current()
    if a.USER_REGS_FIELDS is None:
        return ()
    if space is None:
        space = AddressSpace.from_pid(thread.tgid)
    sp = regs.rsp
    entry = space.find(sp)
    size = max_bytes if entry is None else min(max_bytes, entry.end - sp)
    try:
        stack = thread.read(sp, size) if size > 0 else b""
    except Exception:
        stack = b""
    proc = SimpleNamespace(pid=thread.tgid, space=space, unwind_cache={})
    walker = Walker("dwarf", _cfi)
    return walker.walk(proc, _binary_for(thread.tgid),
                       (regs.rbx, regs.rbp, regs.rsp, regs.rip, regs.r12, regs.r13, regs.r14, regs.r15),
                       stack)


def reset_cache() -> None:
    """Forget compiled CFI (for long-running callers after upgrades)."""
    global _cfi
    _cfi = CFICache()


__all__ = ["unwind", "reset_cache", "STACK_BYTES"]
