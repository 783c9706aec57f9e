"""``perf-agent dump --pid N``: every thread's stack now, as text or JSON.

``main(argv)`` is the whole command: flags, the dump, the output.  Failures
are one ``perf-agent: error: ...`` line (2 for a bad flag, 1 for a process
that cannot be dumped), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Sequence

from perfagent.dump.model import JSON_SCHEMA, KIND_KERNEL, KIND_PYTHON, Dump, Frame, Thread, to_json
from perfagent.errors import PerfAgentError, UsageError

PROG = "perf-agent"
DEFAULT_STACK = 64 * 1024
MAX_STACK = 8 << 20


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG + " dump",
        description="Print every thread of a running process with its stack, now: thread name and\n"
                    "state, Python frames with file:line and which thread holds the GIL (CPython),\n"
                    "native and kernel frames.  The process is left as it was.",
        epilog="Examples:\n"
               "  %(prog)s --pid 1234                 # Python frames (a Python process is not stopped)\n"
               "  %(prog)s --pid 1234 --native        # Python frames merged into the native stacks\n"
               "  %(prog)s --pid 1234 --json | jq .\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pid", metavar="PID", help="the process to dump (required)")
    p.add_argument("--native", action="store_true",
                   help="Python processes: also native frames, with the Python frames merged where "
                        "the interpreter runs them (stops each thread for well under a millisecond, "
                        "one at a time).  Always on for other processes")
    p.add_argument("--json", action="store_true",
                   help="JSON output (fields in README.md; --json-schema prints the JSON Schema)")
    p.add_argument("--json-schema", action="store_true", help="print the JSON output's JSON Schema and exit")
    p.add_argument("--stack-size", default=str(DEFAULT_STACK), metavar="BYTES",
                   help="bytes of each thread's stack copied for native unwinding: a multiple of 8, "
                        "at most %d (default: %d)" % (MAX_STACK, DEFAULT_STACK))
    return p


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    ns = build_parser().parse_args(list(argv))
    if ns.json_schema:
        return ns
    if ns.pid is None:
        raise UsageError("the following arguments are required: --pid")
    if not ns.pid.isdigit() or int(ns.pid) <= 0:
        raise UsageError("--pid: not a process id: %r" % ns.pid)
    ns.pid = int(ns.pid)
    try:
        ns.stack_size = int(ns.stack_size)
    except ValueError:
        raise UsageError("--stack-size: not an integer: %r" % ns.stack_size) from None
    if not 0 < ns.stack_size <= MAX_STACK or ns.stack_size % 8:
        raise UsageError("--stack-size: must be a multiple of 8 between 8 and %d, got %d"
                         % (MAX_STACK, ns.stack_size))
    return ns


# ------------------------------------------------------------------ text

def frame_text(f: Frame) -> str:
    """One frame as the text view prints it (after the kind column)."""
    if f.kind == KIND_PYTHON:
        return "%s (%s:%s)" % (f.name, f.file, f.line if f.line else "?")
    if f.kind == KIND_KERNEL:
        return f.name if not f.module or not f.module.startswith("[") or f.module == "[kernel.kallsyms]" \
            else "%s %s" % (f.name, f.module)
    from perfagent.dump.native import module_label
    where = module_label(f.module)
    if f.name:
        return "%s (%s)" % (f.name, where)
    if f.offset is not None:
        return "0x%x (%s+0x%x)" % (f.address or 0, where, f.offset)
    return "0x%x (%s)" % (f.address or 0, where)


def _thread_header(t: Thread) -> str:
    if t.tid is None:
        head = "Python thread (kernel thread unknown)"
    else:
        head = "Thread %d" % t.tid
        if t.ns_tid is not None and t.ns_tid != t.tid:
            head += " (%d in its namespace)" % t.ns_tid
        head += ' "%s"' % t.name
    extra = [t.state or "state unknown"]
    if t.holds_gil:
        extra.append("holds the GIL")
    return "%s %s" % (head, ", ".join(extra))


def render_text(d: Dump) -> str:
    p = d.process
    lines: List[str] = []
    cmd = " ".join(p.cmdline) if p.cmdline else ("[%s]" % p.name if p.kernel_thread else p.exe)
    pid = "%d" % p.pid if p.ns_pid == p.pid else "%d (%d in its namespace)" % (p.pid, p.ns_pid)
    lines.append('Process %s "%s": %s' % (pid, p.name, cmd))
    if p.python is not None:
        holders = [t for t in d.threads if t.holds_gil]
        gil = "held by thread %s" % ", ".join(str(t.tid) for t in holders) if holders else "not held"
        lines.append("Python %s (%s); GIL %s" % (p.python["version"], p.python["path"], gil))
    elif p.python_missing:
        lines.append("Python frames not available: %s" % p.python_missing)
    for note in d.notes:
        lines.append("note: %s" % note)
    for t in d.threads:
        lines.append("")
        lines.append(_thread_header(t))
        for f in t.frames:
            lines.append("    %-6s  %s" % (f.kind, frame_text(f)))
        if not t.frames:
            lines.append("    (no frames)")
        for note in t.notes:
            lines.append("    note: %s" % note)
    return "\n".join(_printable(line) for line in lines) + "\n"


def _printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped.

    Names, file names, thread names and command lines come from the target
    (its memory, its comm): an escape sequence in them must not reach the
    terminal as one.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "\\x%02x" % ord(c) if ord(c) < 256 else "\\u%04x" % ord(c)
                   if ord(c) < 0x10000 else "\\U%08x" % ord(c) for c in text)


def summary_line(d: Dump) -> str:
    s = "%s: dumped %d thread%s in %.1f ms" % (PROG, len(d.threads), "" if len(d.threads) == 1 else "s",
                                              d.total_ms)
    if d.threads_stopped:
        s += "; %d stopped one at a time, each held at most %.2f ms (%.2f ms to reach the stop)" % (
            d.threads_stopped, (d.max_stop_us or 0) / 1000.0, (d.max_stop_wait_us or 0) / 1000.0)
    elif d.process.python is not None and not d.native:
        s += "; nothing was stopped (add --native for native frames)"
    return s


# ------------------------------------------------------------------ main

def main(argv: Sequence[str]) -> int:
    try:
        ns = _parse(argv)
        if ns.json_schema:
            sys.stdout.write(json.dumps(JSON_SCHEMA, indent=2) + "\n")
            return 0
        from perfagent.dump.collect import collect  # after parsing: --help needs no ctypes
        d = collect(ns.pid, native=True if ns.native else None, stack_bytes=ns.stack_size)
        sys.stdout.write(to_json(d) if ns.json else render_text(d))
        sys.stdout.flush()
        if not ns.json:
            print(summary_line(d), file=sys.stderr)
        return 0
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except PerfAgentError as exc:
        print("%s: error: %s" % (PROG, exc), file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except OSError as exc:  # e.g. /proc not mounted: one line, not a traceback
        print("%s: error: %s" % (PROG, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("%s: interrupted" % PROG, file=sys.stderr)
        return 130


def run(argv: Optional[Sequence[str]] = None) -> int:
    return main(sys.argv[1:] if argv is None else argv)
