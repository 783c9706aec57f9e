"""``perf-agent report FILE``: the command line of the report views.

``main(argv)`` is the whole command: it parses flags, reads the profile,
runs the filters and writes the chosen views. It returns the exit status
and prints failures as one ``perf-agent: error: ...`` line (2 for bad
flags, 1 for bad input or unwritable output), never a traceback, so the
top-level CLI can dispatch to it with a single call.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from perfagent.errors import PerfAgentError, ProfileFormatError, UsageError
from perfagent.pprof.profile import Profile, decode_profile
from perfagent.report.filters import SampleFilter, parse_tag_filter
from perfagent.report.flamegraph import render_svg
from perfagent.report.folded import folded_lines
from perfagent.report.stacks import StackSet, choose_sample_index, load_stacks
from perfagent.report.top import format_top
from perfagent.report.tree import format_tree

PROG = "perf-agent"
STDOUT = "-"


class ReportError(PerfAgentError):
    """An unreadable profile or an unwritable output file (exit 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG + " report",
        description="Show a pprof profile (this tool's or any other producer's, gzip'd or not): "
                    "a top table (default), a call tree, folded stacks or an SVG flame graph.",
        epilog="Examples:\n"
               "  %(prog)s cpu.pb.gz --top 30\n"
               "  %(prog)s cpu.pb.gz --focus 'json' --tree\n"
               "  %(prog)s cpu.pb.gz --pid 1234 --svg flame.svg\n"
               "  %(prog)s cpu.pb.gz --folded | flamegraph.pl > flame.svg\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="the profile (.pb.gz or uncompressed .pb)")
    v = p.add_argument_group("views")
    v.add_argument("--top", type=int, default=20, metavar="N",
                   help="rows of the top table (default: 20; 0 for all)")
    v.add_argument("--cum", action="store_true", help="sort the top table by cumulative value")
    v.add_argument("--tree", action="store_true", help="print the call tree, callers above callees")
    v.add_argument("--min-percent", type=float, default=1.0, metavar="P",
                   help="--tree: prune call paths below P%% of the total (default: 1)")
    v.add_argument("--folded", nargs="?", const=STDOUT, default=None, metavar="PATH",
                   help="write folded stacks (flamegraph.pl input) to PATH, or stdout")
    v.add_argument("--svg", metavar="PATH", help="write an interactive SVG flame graph to PATH")
    v.add_argument("--title", default=None, help="--svg: the graph's title (default: the file name)")
    v.add_argument("--sample-index", metavar="NAME",
                   help="sample type to report, e.g. cpu or alloc_space (default: the profile's "
                        "default sample type, else its last one, as pprof)")
    f = p.add_argument_group("filters (applied before any view)")
    f.add_argument("--focus", metavar="REGEX", help="keep samples with a function matching REGEX")
    f.add_argument("--ignore", metavar="REGEX", help="drop samples with a function matching REGEX")
    f.add_argument("--pid", type=int, metavar="N", help="keep samples labelled pid=N")
    f.add_argument("--tag-filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep samples labelled KEY=VALUE (repeatable; all must match)")
    return p


def main(argv: Sequence[str]) -> int:
    """Run the report command; returns the exit status."""
    try:
        return _run(build_parser().parse_args(list(argv)))
    except SystemExit as done:  # --help: argparse printed it and "exits"; return its status instead
        return done.code if isinstance(done.code, int) else 0
    except PerfAgentError as error:
        print("%s: error: %s" % (PROG, error), file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: not an error worth a traceback.
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print("%s: interrupted" % PROG, file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    sample_filter = _validated_filter(args)
    profile = load_profile(args.file)
    stacks = sample_filter.apply(load_stacks(profile, choose_sample_index(profile, args.sample_index)))
    if args.svg:
        title = args.title if args.title is not None else os.path.basename(args.file)
        _write_file(args.svg, render_svg(stacks, title=title))
    if args.folded is not None and args.folded != STDOUT:
        _write_file(args.folded, _joined(folded_lines(stacks)))
    text = _stdout_view(args, stacks)
    if text is not None:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def _validated_filter(args: argparse.Namespace) -> SampleFilter:
    if args.top < 0:
        raise UsageError("--top: must be 0 (all) or a positive number of rows, got %d" % args.top)
    if not 0 <= args.min_percent <= 100:
        raise UsageError("--min-percent: must be between 0 and 100, got %g" % args.min_percent)
    if args.pid is not None and args.pid <= 0:
        raise UsageError("--pid: not a process id: %d" % args.pid)
    for path, flag in ((args.svg, "--svg"), (args.folded, "--folded")):
        if path is not None and not path.strip():
            raise UsageError("%s: empty path" % flag)
    if args.folded == STDOUT and args.tree:
        raise UsageError("--folded and --tree both print to stdout: give --folded a PATH")
    tags = [parse_tag_filter(text) for text in args.tag_filter]
    return SampleFilter(focus=args.focus, ignore=args.ignore, pid=args.pid, tags=tags)


def _stdout_view(args: argparse.Namespace, stacks: StackSet) -> Optional[str]:
    """What goes to stdout: folded, else the tree, else the top table unless only files were asked for."""
    if args.folded == STDOUT:
        return _joined(folded_lines(stacks))
    if args.tree:
        return _joined(format_tree(stacks, args.min_percent))
    if args.svg or args.folded is not None:
        return None
    return _joined(format_top(stacks, args.top, args.cum))


def load_profile(path: str) -> Profile:
    """Read and decode ``path``; every failure becomes one ReportError line."""
    if os.path.isdir(path):
        raise ReportError("%s: is a directory, not a profile" % path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ReportError("cannot read %s: %s" % (path, error.strerror or error)) from None
    if not data:
        raise ReportError("%s: empty file, not a pprof profile" % path)
    try:
        profile = decode_profile(data)
    except ProfileFormatError as error:
        raise ReportError("%s: not a pprof profile: %s" % (path, error)) from None
    except Exception as error:  # a decoder bug must still not show a traceback
        raise ReportError("%s: cannot decode profile (%s: %s)" % (path, type(error).__name__, error)) from None
    if not profile.sample_type:
        raise ReportError("%s: not a pprof profile: it has no sample types" % path)
    return profile


def _write_file(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as error:
        raise ReportError("cannot write %s: %s" % (path, error.strerror or error)) from None


def _joined(lines: List[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
