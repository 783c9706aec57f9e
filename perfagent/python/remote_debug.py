"""PEP 768 (CPython 3.14+): the interpreter runs a script at its own safe point.

CPython 3.14 gives every thread state a ``_PyRemoteDebuggerSupport``::

    typedef struct {                       /* Include/cpython/pystate.h */
        int32_t debugger_pending_call;
        char debugger_script_path[_Py_MAX_SCRIPT_PATH_SIZE];   /* 512 */
    } _PyRemoteDebuggerSupport;

and checks it in the eval-breaker handler (``_Py_HandlePending`` ->
``_PyRunRemoteDebugger``), between two bytecodes, holding the GIL: if
remote debugging is enabled (``PyConfig.remote_debug``; off with
``-X disable-remote-debug`` or ``PYTHON_DISABLE_REMOTE_DEBUG``) and
``debugger_pending_call`` is 1, it sets it back to 0, copies the path and
runs that file (audit event ``cpython.remote_debugger_script``).  A
debugger (``sys.remote_exec``) writes the path, then the flag, then sets
``_PY_EVAL_PLEASE_STOP_BIT`` in the thread's ``eval_breaker`` so the
thread gets there soon.  No ptrace, no stop, no code of ours in the target.

Where those fields are comes from the interpreter's own
``_Py_DebugOffsets`` (section ``debugger_support``), parsed by
perfagent.python.debug_offsets and found by perfagent.python.interpreter;
this module only follows them: ``_PyRuntime`` -> first interpreter
(``runtime_state.interpreters_head``) -> ``remote_debugging_enabled`` (an
int in the interpreter's config) and the main thread
(``interpreter_state.threads_main``) -> its support struct and eval
breaker.  Memory is read and written through perfagent.target.memory.

Like ``sys.remote_exec`` the eval breaker is updated with a plain
read-modify-write (a bit another thread sets at the same instant can be
lost; CPython accepts the same).  The thread only runs the script when it
next checks the eval breaker: a thread blocked in a system call does not
until the call returns (the caller falls back to ptrace for those).
"""

from __future__ import annotations

import struct
from typing import Optional

from perfagent.errors import CaptureError
from perfagent.python import debug_offsets as dbg
from perfagent.target import memory

#: _PY_EVAL_PLEASE_STOP_BIT (Include/internal/pycore_ceval.h, 3.14 and 3.15).
PLEASE_STOP_BIT = 1 << 5
#: First version with the debugger_support section.
MIN_VERSION = (3, 14)

_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")


class Unavailable(CaptureError):
    """PEP 768 cannot be used for this process; ``reason`` says why:
    ``too_old``, ``no_debug_offsets``, ``no_interpreter``, ``disabled``,
    ``no_main_thread``, ``busy`` (another debugger's script is pending)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RemoteDebug:
    """The main thread's remote-debugger fields of one process."""

    def __init__(self, pid: int, pending_addr: int, path_addr: int, path_size: int,
                 eval_breaker_addr: int) -> None:
        self.pid = pid
        self.pending_addr = pending_addr
        self.path_addr = path_addr
        self.path_size = path_size
        self.eval_breaker_addr = eval_breaker_addr

    @classmethod
    def locate(cls, pid: int, runtime: int, offsets: Optional[dbg.DebugOffsets]) -> "RemoteDebug":
        """Follow the debug offsets from ``_PyRuntime`` at ``runtime``."""
        if offsets is None:
            raise Unavailable("no_debug_offsets", "no _Py_DebugOffsets")
        if offsets.version < MIN_VERSION or "debugger_support" not in offsets.offsets:
            raise Unavailable("too_old", "CPython %d.%d has no PEP 768 support" % offsets.version)
        o = offsets.offsets
        ds = o["debugger_support"]
        interp = _U64.unpack(memory.read_exact(pid, runtime + o["runtime_state"]["interpreters_head"], 8))[0]
        if interp == 0:
            raise Unavailable("no_interpreter", "no interpreter yet (or any more)")
        enabled = _I32.unpack(memory.read_exact(pid, interp + ds["remote_debugging_enabled"], 4))[0]
        if enabled != 1:
            raise Unavailable("disabled", "remote debugging is disabled in the process "
                              "(-X disable-remote-debug or PYTHON_DISABLE_REMOTE_DEBUG)")
        tstate = _U64.unpack(memory.read_exact(pid, interp + o["interpreter_state"]["threads_main"], 8))[0]
        if tstate == 0:
            raise Unavailable("no_main_thread", "the interpreter has no main thread state")
        support = tstate + ds["remote_debugger_support"]
        return cls(pid, support + ds["debugger_pending_call"], support + ds["debugger_script_path"],
                   ds["debugger_script_path_size"], tstate + ds["eval_breaker"])

    def pending(self) -> int:
        """debugger_pending_call: 1 while a script waits for the thread."""
        return _I32.unpack(memory.read_exact(self.pid, self.pending_addr, 4))[0]

    def submit(self, path: str) -> None:
        """Ask the main thread to run the script at ``path`` (as it sees it)."""
        raw = path.encode("utf-8") + b"\0"
        if len(raw) > self.path_size:
            raise Unavailable("path_too_long", "script path of %d bytes exceeds %d" % (len(raw), self.path_size))
        if self.pending() != 0:
            raise Unavailable("busy", "another debugger's script is already pending")
        memory.write(self.pid, self.path_addr, raw)
        memory.write(self.pid, self.pending_addr, _I32.pack(1))
        breaker = _U64.unpack(memory.read_exact(self.pid, self.eval_breaker_addr, 8))[0]
        memory.write(self.pid, self.eval_breaker_addr, _U64.pack(breaker | PLEASE_STOP_BIT))

    def cancel(self) -> None:
        """Withdraw a script not taken yet (it may be taken meanwhile)."""
        memory.write(self.pid, self.pending_addr, _I32.pack(0))
