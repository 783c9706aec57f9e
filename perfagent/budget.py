"""Time and memory budgets for work on untrusted input, and cancellation.

Every parse of a file another user controls (a binary, its debug file, a
perf map, BTF) runs under a :class:`Budget`: a deadline in CPU seconds
(see WALL_FACTOR) and a cap on the
bytes it may produce (decompressed sections, decoded rows).  Loops that can
run long call :meth:`Budget.check` now and then (every few thousand
iterations: it reads a clock); running out raises :class:`BudgetExceeded`,
a :class:`~perfagent.errors.ParseError`, so the caller's usual "this file is
malformed" path handles it and the one bad binary costs only its own frames.

The same check is how a capture stops on SIGINT/SIGTERM in any phase: the
signal handler calls :func:`cancel`, and every budget check afterwards
raises :class:`Cancelled` (also a ParseError), so a long symbolization or
unwind ends within one check interval and the profile is written with what
was resolved so far.
"""

from __future__ import annotations

import time
from _thread import get_ident
from typing import Optional

from perfagent.errors import ParseError

#: Default seconds one binary's parse may take (symbols, CFI, debug file).
DEFAULT_SECONDS = 10.0

#: Default bytes one binary's parse may allocate for derived data.
DEFAULT_BYTES = 512 << 20

#: A budget's seconds are the agent's CPU time: on a loaded machine wall
#: time stretches (a 2-core VM at load average 40 ran a 0.3 s parse for
#: many seconds), and a wall-clock budget then refused libc's CFI for a
#: whole run -- every stack of every process stopped at it.  CPU time is
#: what a hostile input can make us spend.  Wall time still ends a parse
#: this many times its seconds later (one starved for that long is not
#: worth finishing).
WALL_FACTOR = 30


class BudgetExceeded(ParseError):
    """A parse ran out of time or memory: its input is treated as malformed."""


class Cancelled(BudgetExceeded):
    """The capture was asked to stop (SIGINT/SIGTERM): finish with what exists."""


_cancelled = False


def cancel() -> None:
    """Make every budget check raise :class:`Cancelled` from now on.

    Async-signal-safe in Python's sense: it only assigns a module global.
    """
    global _cancelled
    _cancelled = True


def reset() -> None:
    """Forget a cancellation (a library caller starting a new capture)."""
    global _cancelled
    _cancelled = False


def cancelled() -> bool:
    return _cancelled


def check_cancelled() -> None:
    """Raise :class:`Cancelled` if a stop was requested (cheap: one global read)."""
    if _cancelled:
        raise Cancelled("stopped by a signal")


class Budget:
    """A deadline and a byte allowance for one unit of untrusted work.

    ``check()`` is cheap enough for a loop body that runs every few hundred
    iterations; ``charge(n)`` accounts ``n`` bytes about to be allocated.
    """

    __slots__ = ("what", "deadline", "cpu_deadline", "bytes_left", "seconds", "owner")

    def __init__(self, what: str = "", seconds: float = DEFAULT_SECONDS,
                 max_bytes: int = DEFAULT_BYTES) -> None:
        self.what = what
        self.seconds = seconds
        # The thread's CPU time, not the process's: on a busy machine
        # clock_gettime(CLOCK_PROCESS_CPUTIME_ID) took 27 us against 0.6 us
        # for the thread's clock (measured in the agent with two busy
        # targets on 2 CPUs; 60 budgets and 160 checks were 5% of a 10 s
        # capture's CPU).  A budget checked by another thread than its
        # maker's (the ptrace worker) starts that thread's allowance at its
        # first check there; the wall deadline bounds them all.
        self.owner = get_ident()
        self.cpu_deadline = time.thread_time() + seconds
        self.deadline = time.monotonic() + (seconds * WALL_FACTOR if seconds > 0 else seconds)
        self.bytes_left = max_bytes

    def check(self) -> None:
        if _cancelled:
            raise Cancelled("%s: stopped by a signal" % (self.what or "parse"))
        if get_ident() != self.owner:
            self.owner = get_ident()
            self.cpu_deadline = time.thread_time() + self.seconds
        if time.thread_time() > self.cpu_deadline or time.monotonic() > self.deadline:
            raise BudgetExceeded("%s: took longer than %.0f CPU s; treated as malformed"
                                 % (self.what or "parse", self.seconds))

    def charge(self, nbytes: int) -> None:
        """Account ``nbytes``; raise BudgetExceeded when the allowance is gone."""
        self.bytes_left -= nbytes
        if self.bytes_left < 0:
            raise BudgetExceeded("%s: needs more memory than its budget; treated as malformed"
                                 % (self.what or "parse"))


def unlimited(what: str = "") -> Budget:
    """A budget that only honours cancellation (trusted input, tests)."""
    return Budget(what, seconds=float("inf"), max_bytes=1 << 62)


_DEFAULT: Optional[Budget] = None


def default() -> Budget:
    """A shared unlimited budget for callers that pass none."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = unlimited("parse")
    return _DEFAULT
