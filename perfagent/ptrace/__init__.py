"""ptrace in layers: raw binding, a traced-thread object, remote calls.

* :mod:`.binding` -- ptrace(2)/waitpid(2) through ctypes, constants, wait
  statuses;
* :mod:`.thread` -- :class:`TracedThread`: seize, interrupt, registers,
  memory, resume, detach, with a deadline on every wait;
* :mod:`.call` -- :class:`RemoteCaller`: make a stopped thread call a
  function in its own address space and come back;
* :mod:`.stack` -- unwind a stopped thread's stack (the capture's DWARF
  walker) to see what it is blocked in.
"""

from .thread import PTRACE_EPERM_HINT, PtraceError, TracedThread, thread_states, tracer_pid

__all__ = ["PTRACE_EPERM_HINT", "PtraceError", "TracedThread", "thread_states", "tracer_pid"]
