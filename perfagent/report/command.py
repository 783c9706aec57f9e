"""``perf-agent report FILE``: the command line of the report views.

``main(argv)`` is the whole command: it parses flags, reads the profile,
runs the filters and writes the chosen views. It returns the exit status
and prints failures as one ``perf-agent: error: ...`` line (2 for bad
flags, 1 for bad input or unwritable output), never a traceback, so the
top-level CLI can dispatch to it with a single call.

Flags go before or after the file name. ``--folded`` takes an optional
PATH, so ``--folded cpu.pb.gz`` alone is read as "the profile, folded to
stdout": the one word is the profile when no other file name was given.

Output files are never reached through a symbolic link (O_NOFOLLOW: a link
planted where a root user writes a flame graph must not redirect the
write), are never the profile being read, and views are written in pieces
as they are produced, not built as one string first.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from perfagent.errors import PerfAgentError, ProfileFormatError, UsageError
from perfagent.pprof.profile import Profile, decode_profile
from perfagent.report.filters import SampleFilter, parse_tag_filter
from perfagent.report.flamegraph import iter_svg
from perfagent.report.folded import folded_lines
from perfagent.report.stacks import StackSet, choose_sample_index, load_stacks, python_first
from perfagent.report.text import display
from perfagent.report.top import format_top
from perfagent.report.tree import iter_tree

# Output is handed to the file or stdout in pieces of about this many characters.
WRITE_CHUNK = 1 << 16
OUTPUT_MODE = 0o644

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
               "  %(prog)s cpu.pb.gz --folded | flamegraph.pl > flame.svg\n"
               "  %(prog)s --lines --folded cpu.pb.gz\n"
               "Flags may come before or after FILE. Profiles with Python frames are shown\n"
               "Python first (native time under a Python function is its own time); --native\n"
               "shows every frame as recorded.\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Optional to argparse only so that `--folded FILE` can mean "FILE, folded to stdout";
    # _resolve_file() makes it required again.
    p.add_argument("file", metavar="FILE", nargs="?", help="the profile (.pb.gz or uncompressed .pb)")
    v = p.add_argument_group("views")
    v.add_argument("--top", type=int, default=20, metavar="N",
                   help="rows of the top table (default: 20; 0 for all)")
    v.add_argument("--cum", action="store_true", help="sort the top table by cumulative value")
    v.add_argument("--tree", action="store_true", help="print the call tree, callers above callees")
    v.add_argument("--min-percent", type=float, default=1.0, metavar="P",
                   help="--tree: prune call paths below P%% of the total (default: 1)")
    v.add_argument("--folded", nargs="?", const=STDOUT, default=None, metavar="PATH",
                   help="write folded stacks (flamegraph.pl input) to PATH, or stdout (no PATH or -)")
    v.add_argument("--svg", metavar="PATH", help="write an interactive SVG flame graph to PATH (- for stdout)")
    v.add_argument("--title", default=None, help="--svg: the graph's title (default: the file name)")
    v.add_argument("--native", action="store_true",
                   help="every native frame as recorded (default for profiles with Python frames: "
                        "Python first, native time counted to the Python function that caused it)")
    v.add_argument("--lines", action="store_true",
                   help="one frame per source line: 'qualname (file:line)' where the profile has lines")
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
        return _run(parse_args(argv))
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


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The flags, in any order around FILE, with FILE resolved."""
    args = build_parser().parse_args(list(argv))
    _resolve_file(args)
    return args


def _resolve_file(args: argparse.Namespace) -> None:
    """``--folded X`` with no other file name: X is the profile, folded to stdout.

    argparse gives --folded's optional PATH the next word, so in
    ``report --folded cpu.pb.gz`` it took the profile. With FILE given
    elsewhere (``report --folded out.txt cpu.pb.gz``, ``report cpu.pb.gz
    --folded out.txt``) the word stays the output path, as before.
    """
    if args.file is None and args.folded not in (None, STDOUT):
        args.file, args.folded = args.folded, STDOUT
    if args.file is None:
        raise UsageError("the following arguments are required: FILE")


def _run(args: argparse.Namespace) -> int:
    sample_filter = _validated_filter(args)
    profile, identity = load_profile(args.file)
    stacks = load_stacks(profile, choose_sample_index(profile, args.sample_index), lines=args.lines)
    del profile  # the stacks hold what the views need; the rest can go
    # Filters see every frame as recorded (--focus on a C function selects the
    # Python code that spends time in it); the Python-first cut comes after.
    stacks = sample_filter.apply(stacks)
    if not args.native:
        stacks = python_first(stacks)
    if args.svg and args.svg != STDOUT:
        title = args.title if args.title is not None else os.path.basename(args.file)
        _write_file(args.svg, "--svg", identity, iter_svg(stacks, title=title))
    if args.folded is not None and args.folded != STDOUT:
        _write_file(args.folded, "--folded", identity, _with_newlines(folded_lines(stacks)))
    pieces = _stdout_view(args, stacks)
    if pieces is not None:
        _write_stdout(pieces)
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
    to_stdout = [flag for flag, wanted in (("--folded", args.folded == STDOUT), ("--svg", args.svg == STDOUT),
                                           ("--tree", args.tree)) if wanted]
    if len(to_stdout) > 1:
        raise UsageError("%s both print to stdout: give %s a PATH"
                         % (" and ".join(to_stdout), next(flag for flag in to_stdout if flag != "--tree")))
    tags = [parse_tag_filter(text) for text in args.tag_filter]
    return SampleFilter(focus=args.focus, ignore=args.ignore, pid=args.pid, tags=tags)


def _stdout_view(args: argparse.Namespace, stacks: StackSet) -> Optional[Iterable[str]]:
    """What goes to stdout: folded or the SVG, else the tree, else the top table unless only files were asked for."""
    if args.folded == STDOUT:
        return _with_newlines(folded_lines(stacks))
    if args.svg == STDOUT:
        title = args.title if args.title is not None else os.path.basename(args.file)
        return iter_svg(stacks, title=title)
    if args.tree:
        return _with_newlines(iter_tree(stacks, args.min_percent))
    if args.svg or args.folded is not None:
        return None
    return _with_newlines(format_top(stacks, args.top, args.cum))


def load_profile(path: str) -> Tuple[Profile, Tuple[int, int]]:
    """Read and decode ``path``; every failure becomes one ReportError line.

    Also returns the file's (device, inode), so no output overwrites it.
    """
    shown = display(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.EISDIR:
            raise ReportError("%s: is a directory, not a profile" % shown) from None
        raise ReportError("cannot read %s: %s" % (shown, error.strerror or error)) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ReportError("%s: is a directory, not a profile" % shown)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
            # A device (/dev/zero) would be read forever.
            raise ReportError("%s: not a regular file" % shown)
        os.set_blocking(fd, True)  # O_NONBLOCK only kept open() of a FIFO from waiting
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as error:
        raise ReportError("cannot read %s: %s" % (shown, error.strerror or error)) from None
    finally:
        os.close(fd)
    if not data:
        raise ReportError("%s: empty file, not a pprof profile" % shown)
    try:
        profile = decode_profile(data)
    except ProfileFormatError as error:
        raise ReportError("%s: not a pprof profile: %s" % (shown, error)) from None
    except Exception as error:  # a decoder bug must still not show a traceback
        raise ReportError("%s: cannot decode profile (%s: %s)" % (shown, type(error).__name__, error)) from None
    if not profile.sample_type:
        raise ReportError("%s: not a pprof profile: it has no sample types" % shown)
    return profile, (info.st_dev, info.st_ino)


def _write_file(path: str, flag: str, profile_identity: Tuple[int, int], pieces: Iterable[str]) -> None:
    """Write ``pieces`` to ``path``, never through a symbolic link and never over the profile."""
    fd = _open_output(path, flag, profile_identity)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            for chunk in _chunks(pieces):
                f.write(chunk)
    except OSError as error:
        raise ReportError("cannot write %s: %s" % (display(path), error.strerror or error)) from None


def _open_output(path: str, flag: str, profile_identity: Tuple[int, int]) -> int:
    """A descriptor open for writing ``path``, created without following a link.

    O_NOFOLLOW makes open() fail on a symbolic link in the last component,
    including a dangling one that O_CREAT would otherwise create the target
    of; O_NONBLOCK keeps a FIFO without reader from blocking. The file is
    truncated only once it is known to be a regular file (or a device such
    as /dev/null) and not the profile itself.
    """
    shown = display(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, OUTPUT_MODE)
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            raise ReportError("%s: refusing to write %s: it is a symbolic link" % (flag, shown)) from None
        raise ReportError("cannot write %s: %s" % (shown, error.strerror or error)) from None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) == profile_identity:
            raise ReportError("%s: refusing to write %s: it is the profile being read" % (flag, shown))
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISCHR(info.st_mode)):
            raise ReportError("%s: refusing to write %s: not a regular file" % (flag, shown))
        if stat.S_ISREG(info.st_mode):
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
    except OSError as error:
        os.close(fd)
        raise ReportError("cannot write %s: %s" % (shown, error.strerror or error)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_stdout(pieces: Iterable[str]) -> None:
    """Write to stdout in chunks; characters its encoding lacks come out backslash-escaped."""
    out = sys.stdout
    for chunk in _chunks(pieces):
        try:
            out.write(chunk)
        except UnicodeEncodeError:  # e.g. a latin-1 terminal: nothing was written yet
            encoding = out.encoding or "utf-8"
            out.write(chunk.encode(encoding, "backslashreplace").decode(encoding))
    out.flush()


def _chunks(pieces: Iterable[str]) -> Iterator[str]:
    """``pieces`` joined into strings of about WRITE_CHUNK characters."""
    batch: List[str] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= WRITE_CHUNK:
            yield "".join(batch)
            batch, size = [], 0
    if batch:
        yield "".join(batch)


def _with_newlines(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        yield line + "\n"


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
