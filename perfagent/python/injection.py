"""--inject-python over the processes of a capture: strict or lenient.

perfagent.python.inject switches CPython's perf trampoline on and off in one
process; this is the policy over a run's targets: the single ``--pid``
target (strict: a failure aborts the run) or every process of ``-a``
(lenient: a failure is that process's skip reason, counted in one line).
"""

from __future__ import annotations

import os
from typing import Callable, List

from perfagent.errors import CaptureError
from perfagent.target import procfs


class PythonInjection:
    """--inject-python for running processes: activate before, deactivate after.

    Strict (--pid): a target that cannot be activated aborts the run.
    Lenient (-a): each failure is logged as ``pid=N reason=...`` and the run
    goes on; one summary line gives the counts.  Any error inside one
    process's injection is that process's skip reason, never a traceback.
    Deactivation runs for every process whose activation succeeded (or may
    still take effect: a call the agent stopped watching), whatever ends
    the run; then each process's injection stub is unmapped when nothing
    can use it any more (perfagent.python.inject.Session).
    """

    # Seconds to find a safe point in one process: a single --pid target
    # gets time to reach one; with -a, one process that never does must not
    # hold up the whole machine's capture.
    STRICT_TIMEOUT = 5.0
    LENIENT_TIMEOUT = 1.0
    # Seconds a started call is watched (it is never cut short: after this
    # the agent lets it finish by itself, statement cancelled if not begun).
    STRICT_CALL_TIMEOUT = 30.0
    LENIENT_CALL_TIMEOUT = 5.0

    def __init__(self, strict: bool, log: Callable[[str], None] = lambda line: None) -> None:
        self.log = log
        self.strict = strict
        self.timeout = self.STRICT_TIMEOUT if strict else self.LENIENT_TIMEOUT
        self.call_timeout = self.STRICT_CALL_TIMEOUT if strict else self.LENIENT_CALL_TIMEOUT
        self.active: List[int] = []
        self.skipped: dict = {}
        self.sessions: dict = {}

    def activate(self, pids: List[int]) -> None:
        from perfagent.python import inject
        me = os.getpid()
        for pid in pids:
            if pid == me or procfs.kernel_thread(pid):
                continue  # kernel threads have no user memory: nothing to inject, not "gone"
            try:
                session = inject.open_session(pid)
                self.sessions[pid] = session
                inject.activate(pid, timeout=self.timeout, call_timeout=self.call_timeout, session=session)
            except Exception as exc:  # one process's failure is its skip reason
                exc = inject.as_injection_error(exc, pid)
                if getattr(exc, "may_have_run", False):
                    self.active.append(pid)  # so that it is deactivated at the end
                if self.strict:
                    raise CaptureError("--inject-python: %s" % exc) from None
                self.skipped[exc.reason] = self.skipped.get(exc.reason, 0) + 1
                if exc.reason not in ("not_python", "process_gone"):
                    self.log(str(exc))
                continue
            self.active.append(pid)
        if not self.strict:
            counts = " ".join("%s=%d" % kv for kv in sorted(self.skipped.items()))
            n = len(self.active)
            self.log("inject-python: activated %d process%s%s" % (n, "" if n == 1 else "es",
                                                               "; skipped " + counts if counts else ""))

    def deactivate(self) -> None:
        from perfagent.python import inject
        active, self.active = self.active, []
        sessions, self.sessions = self.sessions, {}
        for pid in active:
            try:
                inject.deactivate(pid, timeout=self.timeout, call_timeout=self.call_timeout,
                                  session=sessions.get(pid))
            except Exception as exc:
                exc = inject.as_injection_error(exc, pid)
                if exc.reason != "process_gone":  # the target exited meanwhile: harmless
                    self.log("deactivation failed: %s" % exc)
        for pid, session in sessions.items():
            try:
                if not session.finish() and session.left_behind:
                    self.log("inject-python: pid=%d: the injection stub (2 pages at %#x) stays mapped: "
                        "a call the agent stopped watching may still use it" % (pid, session.page))
            except Exception as exc:
                exc = inject.as_injection_error(exc, pid)
                if exc.reason != "process_gone":
                    self.log("inject-python: %s" % exc)
