"""The ``perf-agent`` command line.

Flags follow the reference tool perf-agent.  Usage errors print one line
naming the flag and exit 2; run-time failures print one line naming the
cause and the fix and exit 1; neither ever shows a traceback.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

from perfagent import __version__
from perfagent.errors import PerfAgentError, UsageError

PROG = "perf-agent"
DEFAULT_DURATION = 10.0
DEFAULT_SAMPLE_RATE = 99
UNWIND_MODES = ("fp", "dwarf", "auto")
# 32 KiB of stack per sample.  Measured on CPython 3.11 (README): a plain
# Python loop needs under 4 KiB down to __libc_start_main, but every level
# where C code calls back into Python (map, sorted(key=), C extensions,
# decorators implemented in C) costs about 0.9 KiB of C stack; 32 KiB
# completes 30 such levels, 16 KiB only 10.
DEFAULT_STACK_SIZE = 32768
MAX_STACK_SIZE = 65528

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3,
                   "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds from a Go-style duration (``500ms``, ``1h30m``) or plain seconds."""
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pos = 0
        value = 0.0
        if not s:
            raise ValueError("empty duration")
        while pos < len(s):
            m = _DURATION_PART.match(s, pos)
            if m is None:
                raise ValueError("not a duration: %r (use e.g. 500ms, 10s, 2m, 1h30m)" % text)
            value += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("duration must be positive, got %r" % text)
    return value


def parse_tag(text: str) -> Tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError("tag must be key=value, got %r" % text)
    return key.strip(), value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The help's width from the terminal as argparse finds it, without
    argparse's ``import shutil`` for it: every add_argument makes a
    formatter, and shutil brings bz2 and lzma along (3 ms of a capture's
    start for a help screen it does not print)."""

    def __init__(self, prog: str, **kwargs) -> None:
        kwargs.setdefault("width", _terminal_columns() - 2)
        super().__init__(prog, **kwargs)


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal, else 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        usage="%(prog)s --profile (--pid PID | -a | -- COMMAND [ARGS...]) [options]\n"
              "       %(prog)s report FILE [options]   (see: %(prog)s report --help)\n"
              "       %(prog)s dump --pid PID [--native] [--json]   (see: %(prog)s dump --help)\n"
              "       %(prog)s top (--pid PID | -a) [options]   (see: %(prog)s top --help)",
        description="Profile running Linux processes with perf_event_open and write pprof.",
        epilog="Examples:\n"
               "  %(prog)s --profile --pid 1234 --duration 30s\n"
               "  %(prog)s --profile -a --duration 10s --profile-output all.pb.gz\n"
               "  %(prog)s --profile -- ./my-program --its-flag\n",
        formatter_class=_Formatter,
    )
    g = p.add_argument_group("what to profile")
    g.add_argument("--profile", action="store_true",
                   help="on-CPU sampling with stacks (writes --profile-output)")
    g.add_argument("--offcpu", action="store_true",
                   help="off-CPU profiling: where threads block and for how long, measured in the kernel "
                        "by an eBPF sched_switch program (writes --offcpu-output)")
    g.add_argument("--pid", type=str, metavar="PID",
                   help="profile one process: all its threads, including ones started during the capture")
    g.add_argument("--children", action="store_true",
                   help="with --pid: also profile the process's existing descendants (children are "
                        "always followed once they are forked during the capture)")
    g.add_argument("-a", "--all", action="store_true",
                   help="profile every process on the machine")
    y = p.add_argument_group("python")
    y.add_argument("--inject-python", action="store_true",
                   help="name Python functions in CPython 3.12+ targets: switch on the interpreter's perf "
                        "trampoline through ptrace for the capture and off again at the end (launch mode: "
                        "through PYTHONPERFSUPPORT=1) (default: off)")
    y.add_argument("--no-python-walk", action="store_true",
                   help="do not read Python stacks from the interpreter's memory in the kernel (default: "
                        "every CPython 3.8+ process's samples carry its Python stack when BPF is available)")
    y.add_argument("--keep-native-frames", action="store_true",
                   help="keep the interpreter's own frames between Python frames (default: hidden)")
    o = p.add_argument_group("sampling")
    o.add_argument("--duration", default=None, metavar="D",
                   help="how long to capture: Go-style (500ms, 10s, 2m, 1h30m) or seconds "
                        "(default: 10s; with a COMMAND: until it exits)")
    o.add_argument("--sample-rate", default=str(DEFAULT_SAMPLE_RATE), metavar="HZ",
                   help="samples per second per CPU (default: %d)" % DEFAULT_SAMPLE_RATE)
    o.add_argument("--unwind", default="auto", metavar="MODE",
                   help="user stack unwinding: fp (the kernel's frame-pointer callchain), dwarf "
                        "(the binaries' DWARF CFI over a sampled stack copy), or auto (CFI where a "
                        "binary has it, frame pointers where it does not) (default: auto)")
    o.add_argument("--unwind-in", default="auto", metavar="WHERE",
                   help="with --unwind dwarf/auto, where user stacks are walked: kernel (in the BPF "
                        "program, from CFI tables loaded into maps; only program counters reach the "
                        "agent), user (stack copies walked by the agent), or auto (the kernel when it "
                        "can run the walk: Linux 5.17+ with BPF) (default: auto)")
    o.add_argument("--no-in-kernel", action="store_true",
                   help="with --unwind fp: write every sample to the ring buffer instead of counting "
                        "stacks in the kernel with eBPF (default: count in the kernel when BPF is available)")
    o.add_argument("--stack-size", default=str(DEFAULT_STACK_SIZE), metavar="BYTES",
                   help="bytes of user stack copied per sample for dwarf/auto unwinding: a multiple "
                        "of 8, at most %d (default: %d)" % (MAX_STACK_SIZE, DEFAULT_STACK_SIZE))
    w = p.add_argument_group("output")
    w.add_argument("--profile-output", default=None, metavar="PATH",
                   help="on-CPU profile path (default: <comm>-<YYYYmmddHHMM>-on-cpu.pb.gz in the "
                        "current directory, <YYYYmmddHHMM>-on-cpu.pb.gz with -a; never overwrites "
                        "an existing file: -1, -2, ... are added)")
    w.add_argument("--offcpu-output", default=None, metavar="PATH",
                   help="off-CPU profile path (default: <comm>-<YYYYmmddHHMM>-off-cpu.pb.gz, "
                        "<YYYYmmddHHMM>-off-cpu.pb.gz with -a)")
    w.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="add KEY=VALUE to the profile's comments (repeatable; default: none)")
    w.add_argument("--quiet", action="store_true",
                   help="no live progress line (errors and the final summary are still printed)")
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return p


class Options:
    """Validated options of one run."""

    def __init__(self) -> None:
        self.profile = False
        self.pid: Optional[int] = None
        self.all = False
        self.children = False
        self.command: List[str] = []
        self.duration: Optional[float] = DEFAULT_DURATION
        self.sample_rate = DEFAULT_SAMPLE_RATE
        self.unwind = "auto"
        self.unwind_in = "auto"
        self.stack_size = DEFAULT_STACK_SIZE
        self.profile_output: Optional[str] = None
        self.offcpu = False
        self.offcpu_output: Optional[str] = None
        self.tags: List[Tuple[str, str]] = []
        self.quiet = False
        self.in_kernel = True
        self.inject_python = False
        self.python_walk = True
        self.keep_native_frames = False


def parse_args(argv: Sequence[str]) -> Options:
    argv = list(argv)
    command: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    ns = build_parser().parse_args(argv)
    opts = Options()
    opts.profile = ns.profile
    opts.offcpu = ns.offcpu
    opts.quiet = ns.quiet
    opts.in_kernel = not ns.no_in_kernel
    opts.inject_python = ns.inject_python
    opts.python_walk = not ns.no_python_walk
    opts.keep_native_frames = ns.keep_native_frames
    opts.all = ns.all
    opts.command = command
    opts.children = ns.children
    if ns.pid is not None:
        if not ns.pid.isdigit() or int(ns.pid) <= 0:
            raise UsageError("--pid: not a process id: %r" % ns.pid)
        opts.pid = int(ns.pid)
    targets = sum((opts.pid is not None, opts.all, bool(command)))
    if targets == 0:
        raise UsageError("nothing to profile: give --pid PID, -a, or -- COMMAND [ARGS...]")
    if targets > 1:
        raise UsageError("--pid, -a and a COMMAND are mutually exclusive: give only one")
    if opts.children and opts.pid is None:
        raise UsageError("--children goes with --pid (-a already profiles every process; a COMMAND's "
                         "children are always followed)")
    if not opts.profile and not opts.offcpu:
        raise UsageError("no mode selected: add --profile (on-CPU sampling) and/or --offcpu (off-CPU time)")
    if ns.duration is None:
        opts.duration = None if command else DEFAULT_DURATION
    else:
        opts.duration = checked_duration("--duration", ns.duration)
    opts.sample_rate = checked_sample_rate(ns.sample_rate)
    opts.unwind = checked_unwind(ns.unwind)
    if ns.unwind_in not in ("kernel", "user", "auto"):
        raise UsageError("--unwind-in: unknown place %r (choose kernel, user or auto)" % ns.unwind_in)
    opts.unwind_in = ns.unwind_in
    opts.stack_size = checked_stack_size(ns.stack_size)
    for tag in ns.tag:
        try:
            opts.tags.append(parse_tag(tag))
        except ValueError as exc:
            raise UsageError("--tag: %s" % exc)
    if ns.profile_output is not None:
        if not ns.profile_output.strip():
            raise UsageError("--profile-output: empty path")
        opts.profile_output = ns.profile_output
    if ns.offcpu_output is not None:
        if not ns.offcpu_output.strip():
            raise UsageError("--offcpu-output: empty path")
        opts.offcpu_output = ns.offcpu_output
    return opts


# -- validators shared by the commands that capture (the capture command, top)

def checked_integer(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError("%s: not an integer: %r" % (flag, text)) from None


def checked_duration(flag: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError("%s: %s" % (flag, exc)) from None


def checked_sample_rate(text: str) -> int:
    rate = checked_integer("--sample-rate", text)
    if rate <= 0:
        raise UsageError("--sample-rate: must be a positive number of Hz, got %d" % rate)
    max_rate = _max_sample_rate()
    if max_rate and rate > max_rate:
        raise UsageError("--sample-rate: %d Hz is above the kernel's limit kernel.perf_event_max_sample_rate=%d"
                         % (rate, max_rate))
    return rate


def checked_unwind(text: str) -> str:
    if text not in UNWIND_MODES:
        raise UsageError("--unwind: unknown mode %r (choose fp, dwarf or auto)" % text)
    return text


def checked_stack_size(text: str) -> int:
    size = checked_integer("--stack-size", text)
    if not 0 < size <= MAX_STACK_SIZE or size % 8:
        raise UsageError("--stack-size: must be a multiple of 8 between 8 and %d, got %d"
                         % (MAX_STACK_SIZE, size))
    return size


def _max_sample_rate() -> int:
    try:
        with open("/proc/sys/kernel/perf_event_max_sample_rate") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


# The cycle collector's first generation threshold for the command line
# (CPython's default is 700).  Start-up allocates hundreds of thousands of
# objects that live for the whole run (symbol tables, CFI rows, BTF), and at
# 700 the collector ran over them again and again: 4% of a 10 s capture's
# CPU in a profile of the agent, 0.03-0.08 CPU s; at 20,000 a first-
# generation collection still runs every few thousand stacks of a long
# capture.  Only the command line sets it: the library API leaves its
# host's collector alone.
GC_THRESHOLD0 = 20000


def entry() -> None:
    """``perf-agent`` as a program (``python3 -m perfagent``, the installed
    script, the zipapp): :func:`main`, then :func:`exit_now`.  The cycle
    collector is on again (``python -m perfagent`` imports with it off)."""
    gc.enable()
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with ``code`` once the standard streams are flushed,
    without the interpreter's teardown.

    Everything the command writes is written and closed by then (profiles,
    reports), every target released, every tracer thread joined; what is
    left is freeing the objects of the run one by one (the state, symbol
    and CFI tables, BTF) and unloading modules: 8-21 ms of CPU after a 10 s
    capture (the agent's whole cost is about 0.25 s), for nothing, as the
    kernel frees the memory and closes the descriptors anyway.  A stream that
    cannot be flushed (a closed pipe) leaves it to the normal exit, which
    reports it."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, gen1, gen2)
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if argv and argv[0] == "report":
        from perfagent.report.command import main as report_main
        return report_main(argv[1:])
    if argv and argv[0] == "dump":
        from perfagent.dump.command import main as dump_main
        return dump_main(argv[1:])
    if argv and argv[0] == "top":
        from perfagent.top.command import main as top_main
        return top_main(argv[1:])
    try:
        opts = parse_args(argv)
        from perfagent import run  # after parsing: --help and usage errors need no ctypes
        return run.run(opts)
    except PerfAgentError as exc:
        print("%s: error: %s" % (PROG, exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("%s: interrupted" % PROG, file=sys.stderr)
        return 130
