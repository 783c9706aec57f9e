"""The terminal side of ``perf-agent top``: the table's text, and where it goes.

Standard library only, so it works wherever the agent runs (a console, an
ssh session, tmux):

* ``TerminalScreen`` -- stdout is a terminal: the alternate screen, the
  cursor hidden, each refresh drawn from the top left with every line
  cleared to its end (ANSI/VT100 escapes every terminal emulator knows);
  keys read from stdin in cbreak mode (no echo, no line buffering; Ctrl-C
  still sends SIGINT).  The terminal is put back as it was on every way
  out: ``leave()`` runs from the command's ``finally`` (quit, Ctrl-C,
  SIGTERM, SIGHUP, an exception), and Ctrl-Z restores it before the agent
  stops, and re-enters it when it continues.
* ``PlainScreen`` -- stdout is a pipe or a file: one table per refresh,
  separated by a blank line, no escapes and no key handling.

Names reach this module already escaped (perfagent.report.text.display: a
perf map's control characters cannot drive the terminal); characters the
output encoding lacks are written backslash-escaped.
"""

from __future__ import annotations

import os
import select
import signal
import termios
import time
from typing import List, Optional, Sequence

from perfagent.report.top import FunctionTotals
from perfagent.report.stacks import PYTHON_FIRST_NOTE
from perfagent.top.window import SORT_NAME, SORT_SELF, SORT_TOTAL, WindowView

# VT100/xterm sequences (ECMA-48 CSI and xterm's private modes).
CSI = "\x1b["
ENTER_SCREEN = CSI + "?1049h" + CSI + "?25l"   # the alternate screen, cursor hidden
LEAVE_SCREEN = CSI + "?25h" + CSI + "?1049l"   # cursor shown, the normal screen back
HOME = CSI + "H"                                # cursor to the top left
CLEAR_LINE_END = CSI + "K"                      # erase to the end of the line
CLEAR_BELOW = CSI + "J"                         # erase to the end of the screen

KEYS_HELP = "keys: s self  t total  n name  p Python first/native  q quit"
SORT_TITLES = {SORT_SELF: "self time", SORT_TOTAL: "total time", SORT_NAME: "name"}
COLUMNS = "%7s %7s %9s %9s  %s"
DEFAULT_PLAIN_ROWS = 20


def format_seconds(nanoseconds: int) -> str:
    return "%.2fs" % (nanoseconds / 1e9)


def format_share(part: int, total: int) -> str:
    return "%.1f%%" % (100.0 * part / total) if total else "0.0%"


def format_elapsed(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h03m``."""
    seconds = int(seconds)
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(seconds, 60)
    return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)


def render(title: str, elapsed: float, lost: int, view: WindowView, rows: Sequence[FunctionTotals],
           sort_key: str, native: bool, interactive: bool, window_seconds: float,
           note: str = "") -> List[str]:
    """The lines of one refresh: a header, the column titles, ``rows``."""
    cpus = view.nanoseconds / 1e9 / view.span if view.span > 0 else 0.0
    lines = ["%s  %s  elapsed %s  window %.0fs: %d samples, %.2f CPUs  %d lost" % (
        title, time.strftime("%H:%M:%S"), format_elapsed(elapsed), min(view.span, window_seconds) or 0,
        view.samples, cpus, lost)]
    if view.python_first:
        lines.append(PYTHON_FIRST_NOTE.replace("--native", "p" if interactive else "--native"))
    elif native:
        lines.append("View: native (every frame as recorded%s)" % ("; p: Python first" if interactive else ""))
    else:
        lines.append("View: every frame as recorded (no Python frames in the window)")
    lines.append("Sorted by %s%s" % (SORT_TITLES[sort_key], ("    " + KEYS_HELP) if interactive else ""))
    if note:
        lines.append(note)
    lines.append("")
    lines.append(COLUMNS % ("%Self", "%Total", "Self", "Total", "Function"))
    total = view.nanoseconds
    for row in rows:
        lines.append(COLUMNS % (format_share(row.flat, total), format_share(row.cum, total),
                                format_seconds(row.flat), format_seconds(row.cum), row.name))
    if not rows:
        lines.append("  (no samples in the window%s)" % ("" if view.span else " yet"))
    return lines


class PlainScreen:
    """Periodic tables on a pipe or a file (no escapes, no keys)."""

    interactive = False
    resized = False
    hangup = False

    def __init__(self, fd: int, encoding: str) -> None:
        self.fd = fd
        self.encoding = encoding

    def enter(self) -> None:
        pass

    def leave(self) -> None:
        pass

    def height(self) -> int:
        return 0

    def show(self, lines: List[str]) -> None:
        _write_all(self.fd, ("\n".join(lines) + "\n\n").encode(self.encoding, "backslashreplace"))

    def keys(self) -> str:
        return ""


class TerminalScreen:
    """The full-screen view (see the module docstring)."""

    interactive = True

    def __init__(self, fd: int, key_fd: Optional[int], encoding: str) -> None:
        self.fd = fd
        self.key_fd = key_fd            # None: stdin is not a terminal, no keys
        self.encoding = encoding
        self.resized = False            # SIGWINCH or a return from Ctrl-Z: redraw now
        self.hangup = False             # the terminal went away
        self._saved: Optional[list] = None
        self._entered = False
        self._old_handlers: dict = {}

    # -- entering and leaving --------------------------------------------------

    def enter(self) -> None:
        self._old_handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, self._on_resize)
        self._old_handlers[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, self._on_suspend)
        self._set_modes()

    def leave(self) -> None:
        """Put the terminal back (idempotent; never raises)."""
        self._restore_modes()
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def _set_modes(self) -> None:
        if self.key_fd is not None:
            try:
                self._saved = termios.tcgetattr(self.key_fd)
                mode = termios.tcgetattr(self.key_fd)
                # cbreak: keys arrive one by one, unechoed; ISIG stays, so
                # Ctrl-C and Ctrl-Z still send their signals.
                mode[3] &= ~(termios.ECHO | termios.ICANON)
                mode[6][termios.VMIN] = 1
                mode[6][termios.VTIME] = 0
                termios.tcsetattr(self.key_fd, termios.TCSANOW, mode)
            except termios.error:
                self._saved = None
                self.key_fd = None
        self._entered = True
        self._write(ENTER_SCREEN)

    def _restore_modes(self) -> None:
        if self._entered:
            self._entered = False
            self._write(LEAVE_SCREEN)
        if self._saved is not None:
            try:
                termios.tcsetattr(self.key_fd, termios.TCSADRAIN, self._saved)
            except (termios.error, OSError):
                pass
            self._saved = None

    def _on_resize(self, signum, frame) -> None:
        self.resized = True

    def _on_suspend(self, signum, frame) -> None:
        """Ctrl-Z: the terminal as it was, stop; on SIGCONT, the view again."""
        self._restore_modes()
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)   # stops here until continued
        signal.signal(signal.SIGTSTP, self._on_suspend)
        self._set_modes()
        self.resized = True

    # -- drawing and keys ------------------------------------------------------

    def height(self) -> int:
        return self._size()[1]

    def _size(self):
        try:
            size = os.get_terminal_size(self.fd)
            return max(size.columns, 20), max(size.lines, 5)
        except OSError:
            return 80, 24

    def show(self, lines: List[str]) -> None:
        columns, rows = self._size()
        shown = [line[:columns] for line in lines[:rows]]
        # One write per frame, every line erased to its end: no flicker, and
        # nothing of a longer previous frame stays behind.
        self._write(HOME + (CLEAR_LINE_END + "\r\n").join(shown) + CLEAR_LINE_END + CLEAR_BELOW)

    def keys(self) -> str:
        """The keys typed since the last call ("" when none)."""
        if self.key_fd is None:
            return ""
        try:
            ready, _, _ = select.select([self.key_fd], [], [], 0)
            if not ready:
                return ""
            data = os.read(self.key_fd, 64)
        except InterruptedError:
            return ""
        except OSError:
            data = b""
        if not data:  # end of file: the terminal hung up
            self.hangup = True
            self.key_fd = None
            return ""
        return data.decode("latin-1")

    def _write(self, text: str) -> None:
        try:
            _write_all(self.fd, text.encode(self.encoding, "backslashreplace"))
        except OSError:
            self.hangup = True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
