"""``perf-agent top --pid N`` (or ``-a``): the live view's command line and loop.

``main(argv)`` is the whole command.  The capture is perfagent.session.
Capture, driven as the capture command drives it (same options, same
signal handling through perfagent.run.StopFlag, same checks of the pid and
of ``--profile-output`` before sampling starts); the foreground loop calls
its ``poll()`` (one drain, about 100 ms), reads keys between drains, and
once per interval turns the capture's increments into the next bucket of
the sliding window (perfagent.top.window) and redraws.

Failures before the view starts are one ``perf-agent: error: ...`` line
(2 for a bad flag, 1 for a process that cannot be profiled); the terminal
is only touched once sampling runs, and is always put back.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import List, Optional, Sequence, Tuple

from perfagent.cli import (
    DEFAULT_SAMPLE_RATE, DEFAULT_STACK_SIZE, checked_duration, checked_sample_rate,
    checked_stack_size, checked_unwind,
)
from perfagent.errors import CaptureError, PerfAgentError, UsageError
from perfagent.top.window import (
    SORT_NAME, SORT_SELF, SORT_TOTAL, LiveNames, SlidingWindow, bucket_of, sorted_rows, window_view,
)

PROG = "perf-agent"
DEFAULT_WINDOW = 10.0
DEFAULT_INTERVAL = 1.0
MIN_INTERVAL = 0.1          # one drain cycle
FIRST_REFRESH = 0.5         # on a terminal, the first table comes sooner than the interval
HEADER_LINES = 6            # title, view, sort, blank, column titles, and a note line
SORT_BY_KEY = {"s": SORT_SELF, "t": SORT_TOTAL, "n": SORT_NAME}
QUIT_KEYS = "qQ"
TOGGLE_VIEW_KEYS = "pP"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG + " top",
        usage="%(prog)s (--pid PID | -a) [options]",
        description="A live view of the functions using the CPU: self and total CPU time per "
                    "function over a sliding window, refreshed every second (Python first, like "
                    "`perf-agent report`). Keys: s sort by self time, t by total time, n by name, "
                    "p Python first / native, q quit (Ctrl-C too). On a pipe: one table per interval.",
        epilog="Examples:\n"
               "  %(prog)s --pid 1234\n"
               "  %(prog)s -a --window 30 --native\n"
               "  %(prog)s --pid 1234 --duration 1m --profile-output cpu.pb.gz\n"
               "  %(prog)s --pid 1234 --duration 10 --interval 5 > top.log\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to watch")
    g.add_argument("--pid", metavar="PID", help="one process: all its threads, including ones started later")
    g.add_argument("-a", "--all", action="store_true", help="every process on the machine")
    g.add_argument("--children", action="store_true",
                   help="with --pid: also the process's existing descendants (children forked while "
                        "watching are always followed)")
    v = p.add_argument_group("the view")
    v.add_argument("--window", default=str(DEFAULT_WINDOW), metavar="D",
                   help="the sliding window the times cover: Go-style (30s, 2m) or seconds "
                        "(default: %gs)" % DEFAULT_WINDOW)
    v.add_argument("--interval", default=str(DEFAULT_INTERVAL), metavar="D",
                   help="time between refreshes (default: %gs; at least %gs)" % (DEFAULT_INTERVAL, MIN_INTERVAL))
    v.add_argument("--rows", type=int, default=None, metavar="N",
                   help="functions shown (default: as many as the terminal has lines; 20 on a pipe)")
    v.add_argument("--native", action="store_true",
                   help="every native frame as recorded (default: Python first, native time under a "
                        "Python function counted as its own; key p switches)")
    v.add_argument("--lines", action="store_true",
                   help="one row per source line of Python functions: 'qualname (file:line)'")
    v.add_argument("--duration", default=None, metavar="D",
                   help="stop after D (Go-style or seconds) (default: until q, Ctrl-C or the process exits)")
    s = p.add_argument_group("sampling (as the capture command)")
    s.add_argument("--sample-rate", default=str(DEFAULT_SAMPLE_RATE), metavar="HZ",
                   help="samples per second per CPU (default: %d)" % DEFAULT_SAMPLE_RATE)
    s.add_argument("--unwind", default="auto", metavar="MODE", help="fp, dwarf or auto (default: auto)")
    s.add_argument("--stack-size", default=str(DEFAULT_STACK_SIZE), metavar="BYTES",
                   help="user stack copied per sample for dwarf/auto (default: %d)" % DEFAULT_STACK_SIZE)
    s.add_argument("--no-in-kernel", action="store_true",
                   help="sample through perf's ring buffer instead of BPF programs")
    s.add_argument("--no-python-walk", action="store_true",
                   help="do not read Python stacks from the interpreter's memory")
    s.add_argument("--inject-python", action="store_true",
                   help="switch on CPython 3.12+'s perf trampoline while watching (through ptrace)")
    s.add_argument("--keep-native-frames", action="store_true",
                   help="with --native: keep the interpreter's own frames between Python frames")
    o = p.add_argument_group("output")
    o.add_argument("--profile-output", default=None, metavar="PATH",
                   help="also write the whole session's on-CPU profile (pprof) to PATH at the end "
                        "(default: nothing is written)")
    return p


class TopOptions:
    """Validated options of one ``top`` run."""

    def __init__(self) -> None:
        self.pid: Optional[int] = None
        self.all = False
        self.children = False
        self.window = DEFAULT_WINDOW
        self.interval = DEFAULT_INTERVAL
        self.rows: Optional[int] = None
        self.native = False
        self.lines = False
        self.duration: Optional[float] = None
        self.sample_rate = DEFAULT_SAMPLE_RATE
        self.unwind = "auto"
        self.stack_size = DEFAULT_STACK_SIZE
        self.in_kernel = True
        self.python_walk = True
        self.inject_python = False
        self.keep_native_frames = False
        self.profile_output: Optional[str] = None


def parse_args(argv: Sequence[str]) -> TopOptions:
    """The flags, checked as the capture command checks them (same messages)."""
    ns = build_parser().parse_args(list(argv))
    opts = TopOptions()
    if ns.pid is not None:
        if not ns.pid.isdigit() or int(ns.pid) <= 0:
            raise UsageError("--pid: not a process id: %r" % ns.pid)
        opts.pid = int(ns.pid)
    opts.all = ns.all
    if opts.pid is None and not opts.all:
        raise UsageError("nothing to watch: give --pid PID or -a")
    if opts.pid is not None and opts.all:
        raise UsageError("--pid and -a are mutually exclusive: give only one")
    opts.children = ns.children
    if opts.children and opts.pid is None:
        raise UsageError("--children goes with --pid (-a already watches every process)")
    opts.window = checked_duration("--window", ns.window)
    opts.interval = checked_duration("--interval", ns.interval)
    if opts.interval < MIN_INTERVAL:
        raise UsageError("--interval: at least %gs, got %gs" % (MIN_INTERVAL, opts.interval))
    if opts.window < opts.interval:
        raise UsageError("--window: %gs is shorter than --interval %gs" % (opts.window, opts.interval))
    if ns.duration is not None:
        opts.duration = checked_duration("--duration", ns.duration)
    if ns.rows is not None and ns.rows <= 0:
        raise UsageError("--rows: must be a positive number of rows, got %d" % ns.rows)
    opts.rows = ns.rows
    opts.native = ns.native
    opts.lines = ns.lines
    opts.sample_rate = checked_sample_rate(ns.sample_rate)
    opts.unwind = checked_unwind(ns.unwind)
    opts.stack_size = checked_stack_size(ns.stack_size)
    opts.in_kernel = not ns.no_in_kernel
    opts.python_walk = not ns.no_python_walk
    opts.inject_python = ns.inject_python
    opts.keep_native_frames = ns.keep_native_frames
    if ns.profile_output is not None:
        if not ns.profile_output.strip():
            raise UsageError("--profile-output: empty path")
        opts.profile_output = ns.profile_output
    return opts


def main(argv: Sequence[str]) -> int:
    """Run the top command; returns the exit status."""
    try:
        opts = parse_args(argv)
        return run(opts)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except PerfAgentError as exc:
        print("%s: error: %s" % (PROG, exc), file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader of the plain tables (`| head`) went away: not an error.
        _silence_stdout()
        return 0
    except KeyboardInterrupt:  # before the signal handlers were installed
        print("%s: interrupted" % PROG, file=sys.stderr)
        return 130


# -- the run -------------------------------------------------------------------

def make_screen(encoding: str):
    """The full-screen view when stdout is a terminal, else plain tables."""
    from perfagent.top.screen import PlainScreen, TerminalScreen
    out = sys.stdout.fileno()
    if not os.isatty(out):
        return PlainScreen(out, encoding)
    try:
        key_fd: Optional[int] = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        key_fd = None
    if key_fd is not None and not os.isatty(key_fd):
        key_fd = None
    return TerminalScreen(out, key_fd, encoding)


class Notes:
    """What the capture logs: shown at once on a pipe, kept for the status
    line and printed after the view on a terminal."""

    def __init__(self, immediate: bool) -> None:
        self.immediate = immediate
        self.kept: List[str] = []

    def add(self, line: str) -> None:
        if self.immediate:
            _log(line)
        else:
            self.kept.append(line)

    @property
    def latest(self) -> str:
        return self.kept[-1] if self.kept else ""


def _log(line: str) -> None:
    try:
        print("%s: %s" % (PROG, line), file=sys.stderr, flush=True)
    except OSError:  # the terminal hung up: nobody to tell
        pass


def run(opts: TopOptions) -> int:
    from perfagent import run as capture_run
    from perfagent.session import Capture, CaptureOptions
    comm = capture_run.check_pid(opts.pid) if opts.pid is not None else None
    out_path = None
    if opts.profile_output is not None:
        out_path = capture_run.output_path(opts.profile_output, comm, "on-cpu", "--profile-output")
    screen = make_screen(sys.stdout.encoding or "utf-8")
    notes = Notes(immediate=not screen.interactive)
    cap = Capture(CaptureOptions(
        pid=opts.pid, all=opts.all, children=opts.children, sample_rate=opts.sample_rate,
        unwind=opts.unwind, stack_size=opts.stack_size, in_kernel=opts.in_kernel,
        python_walk=opts.python_walk, inject_python=opts.inject_python,
        keep_native_frames=opts.keep_native_frames), notes.add)
    title = ("%s top: pid %d (%s)" % (PROG, opts.pid, comm)) if opts.pid is not None else PROG + " top: all processes"
    stop = _stop_flag()
    stop.install()
    try:
        reason, by_user = _watch(cap, screen, opts, title, notes, stop)
        if out_path is not None:
            try:
                cap.build(False).write(out_path)
            except OSError as exc:
                raise CaptureError("cannot write %s: %s" % (out_path, exc.strerror or exc)) from None
    finally:
        stop.restore()
        cap.close()
        for line in notes.kept:  # after the view: on the normal screen
            _log(line)
    _end_lines(cap, out_path, reason, by_user)
    return 0


def _watch(cap, screen, opts: TopOptions, title: str, notes: Notes, stop) -> Tuple[str, bool]:
    """Start sampling, run the view until it ends, stop sampling: (why it
    ended, whether the user asked).  The terminal is back as it was before
    this returns or raises."""
    cap.state.take_increments()  # from now on the state keeps each interval's increments
    cap.start()
    top = TopLoop(cap, screen, opts, title, notes)
    reason, by_user = "", True
    try:
        screen.enter()
        reason, by_user = top.loop(stop)
    finally:
        screen.leave()
        cap.stop(reason, on_finishing=stop.finishing)
    if screen.interactive and not by_user and top.last_lines:
        # The view ended by itself: its last table stays on the normal screen.
        _write_stdout("\n".join(top.last_lines) + "\n")
    return reason, by_user


def _end_lines(cap, out_path: Optional[str], reason: str, by_user: bool) -> None:
    from perfagent.run import plural
    if out_path is None:
        for warning in cap.symbolizer.warnings:
            _log("warning: %s" % warning)
        if reason and not by_user:
            _log(reason)
        return
    for line in cap.summary_lines():  # the capture command's end-of-run lines
        _log(line)
    lost, losses = cap.oncpu_losses()
    _log("wrote %s: %s, %d lost%s, %s" % (out_path, plural(cap.samples, "sample"), lost, losses,
                                          plural(len(cap.state.pids_seen), "process", "processes")))


def _write_stdout(text: str) -> None:
    encoding = sys.stdout.encoding or "utf-8"
    sys.stdout.flush()
    data = text.encode(encoding, "backslashreplace")
    fd = sys.stdout.fileno()
    while data:
        data = data[os.write(fd, data):]


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _stop_flag():
    """The capture command's StopFlag, plus SIGHUP (the ssh session or the
    terminal closed): each stops the view at the next drain."""
    from perfagent.run import StopFlag

    class TopStopFlag(StopFlag):
        SIGNALS = StopFlag.SIGNALS + (signal.SIGHUP,)
    return TopStopFlag()


class TopLoop:
    """The refresh loop over a started capture."""

    def __init__(self, cap, screen, opts: TopOptions, title: str, notes: Notes) -> None:
        self.cap = cap
        self.screen = screen
        self.opts = opts
        self.title = title
        self.notes = notes
        self.names = LiveNames(cap.state, cap.symbolizer, opts.lines, opts.keep_native_frames)
        self.window = SlidingWindow(opts.window, opts.interval)
        self.sort_key = SORT_SELF
        self.native = opts.native
        self.view = None
        self.last_lines: List[str] = []
        self._bucket_start = cap.mono_start
        self._generation_start = cap.mono_start

    def loop(self, stop) -> Tuple[str, bool]:
        """Until q, a signal, --duration or the target's exit: (why it
        stopped, whether the user asked for it)."""
        cap, screen, opts = self.cap, self.screen, self.opts
        interval = opts.interval
        start = cap.mono_start
        next_refresh = start + (min(FIRST_REFRESH, interval) if screen.interactive else interval)
        deadline = None if opts.duration is None else start + opts.duration
        if screen.interactive:
            self.draw()  # the frame, at once: sampling runs
        while True:
            if stop.signum:
                return "stopped by %s" % signal.Signals(stop.signum).name, True
            if screen.hangup:
                return "the terminal went away", True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self._final_refresh(now)
                return "", False
            wait = min(0.1, next_refresh - now, deadline - now if deadline is not None else 0.1)
            reason = cap.poll(max(0.001, wait))
            if reason:
                self._final_refresh(time.monotonic())
                return reason, False
            for key in screen.keys():
                if key in QUIT_KEYS:
                    return "", True
                self._key(key)
            now = time.monotonic()
            if now >= next_refresh:
                self.refresh(now)
                next_refresh += interval
                if next_refresh <= now:  # a slow refresh: skip the missed ones
                    next_refresh = now + interval
            elif screen.resized:
                screen.resized = False
                self.draw()

    def _key(self, key: str) -> None:
        sort_key = SORT_BY_KEY.get(key.lower())
        if sort_key is not None and sort_key != self.sort_key:
            self.sort_key = sort_key
            self.draw()
        elif key in TOGGLE_VIEW_KEYS:
            self.native = not self.native
            self.compute_view()
            self.draw()

    def _final_refresh(self, now: float) -> None:
        """The last bit of the capture (drained first: a slow refresh may
        have left samples in the kernel), unless the last refresh just
        covered it."""
        if now - self._bucket_start > self.opts.interval / 4.0:
            self.cap.drain()
            self.refresh(now)

    def refresh(self, now: float) -> None:
        """The next bucket into the window, the totals over it, the table."""
        self.push_bucket(now)
        self.compute_view()
        self.draw()

    def push_bucket(self, now: float) -> None:
        """This interval's increments, named, into the window (the expired
        interval out)."""
        bucket = bucket_of(self.cap.state.take_increments(), self.names)
        self.window.push(self._bucket_start, now, bucket)
        self._bucket_start = now
        if now - self._generation_start >= self.opts.window:
            self.names.new_generation()
            self._generation_start = now

    def compute_view(self) -> None:
        self.view = window_view(self.window, self.names, self.native)

    def draw(self) -> None:
        from perfagent.top.screen import DEFAULT_PLAIN_ROWS, render
        from perfagent.top.window import WindowView
        view = self.view or WindowView([], 0, 0, 0.0, False)
        limit = self.opts.rows
        if limit is None:
            limit = max(1, self.screen.height() - HEADER_LINES) if self.screen.interactive else DEFAULT_PLAIN_ROWS
        rows = sorted_rows(view.rows, self.sort_key)[:limit]
        lines = render(self.title, time.monotonic() - self.cap.mono_start, self.cap.lost_so_far(), view, rows,
                       self.sort_key, self.native, self.screen.interactive, self.opts.window,
                       self.notes.latest if self.screen.interactive else "")
        self.last_lines = lines
        self.screen.show(lines)
