"""ptrace in layers: raw binding, a traced-thread object, remote calls.

* :mod:`.binding` -- ptrace(2)/waitpid(2) through ctypes, constants, wait
  statuses;
* :mod:`.thread` -- :class:`TracedThread`: seize, interrupt, registers,
  signal mask, memory, resume, detach (retried; left to the kernel when
  impossible), with a deadline on every wait;
* :mod:`.stub` -- the return path that needs no agent: the signal frame
  (struct rt_sigframe) holding a thread's saved state, the libc gadgets
  (``syscall; ret``, ``__restore_rt``) and the stub's machine code;
* :mod:`.call` -- :class:`RemoteCaller`: borrow a stopped thread for
  system calls and calls through the stub, signals held, and give it back;
* :mod:`.stack` -- unwind a stopped thread's stack (the capture's DWARF
  walker) to see what it is blocked in.
"""

from .thread import PTRACE_EPERM_HINT, PtraceError, TracedThread, thread_states, tracer_pid

__all__ = ["PTRACE_EPERM_HINT", "PtraceError", "TracedThread", "thread_states", "tracer_pid"]
