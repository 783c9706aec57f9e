"""The library API: capture from Python code, get a profile object.

A small, stable surface for vendoring perfagent into other programs (the
command line is built on the same classes).  Everything else in the
package is private and may change.

    import perfagent

    # a running process (and threads it starts, and children it forks)
    with perfagent.Capture(pid=1234) as cap:
        time.sleep(10)
    profile = cap.profile()
    profile.write("cpu.pb.gz")          # gzip'd pprof: go tool pprof, perf-agent report
    print(profile.top(10))              # the top table, as `perf-agent report` prints it
    open("cpu.folded", "w").write(profile.folded())
    open("flame.svg", "w").write(profile.svg())

    # a command, until it exits; every process: perfagent.Capture(all=True)
    profile = perfagent.profile(command=["python3", "app.py"])

:class:`Capture` takes the command line's choices as keywords (see
:class:`perfagent.session.CaptureOptions`: ``offcpu``, ``sample_rate``,
``unwind``, ``children``, ...).  It samples from ``start()`` to ``stop()``
in a background thread of its own (nothing is printed and no signal
handler is installed: the host program keeps its own); ``profile()`` builds
the on-CPU (or, with ``offcpu=True``, off-CPU) profile.  Failures raise
:class:`perfagent.errors.PerfAgentError` with one clear message.
"""

from __future__ import annotations

import threading
import time
from typing import List, Optional, Sequence

from perfagent.errors import CaptureError
from perfagent.session import DRAIN_INTERVAL, Capture as _Session, CaptureOptions

__all__ = ["Capture", "Profile", "profile"]


class Profile:
    """A finished profile: pprof bytes plus the report views over them."""

    def __init__(self, data: bytes) -> None:
        self._data = data          # the pprof protobuf, uncompressed
        self._decoded = None

    # -- the pprof --------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The gzip'd pprof protobuf."""
        from perfagent.pprof.encode import gzip_profile
        return gzip_profile(self._data)

    def write(self, path: str) -> None:
        """Write the gzip'd pprof to ``path`` (atomically: temp file + rename)."""
        from perfagent.pprof.encode import write_gzipped_atomically
        write_gzipped_atomically(path, self._data)

    # -- views ------------------------------------------------------------------

    def _stacks(self, sample_type: Optional[str], lines: bool, native: bool):
        from perfagent.pprof.profile import decode_profile
        from perfagent.report.stacks import choose_sample_index, load_stacks, python_first
        if self._decoded is None:
            self._decoded = decode_profile(self._data)
        stacks = load_stacks(self._decoded, choose_sample_index(self._decoded, sample_type), lines=lines)
        return stacks if native else python_first(stacks)

    def top(self, n: int = 20, cum: bool = False, native: bool = False, lines: bool = False,
            sample_type: Optional[str] = None) -> str:
        """The top table (flat and cumulative per function), Python first
        unless ``native``, like ``perf-agent report``."""
        from perfagent.report.top import format_top
        return "".join(line + "\n" for line in format_top(self._stacks(sample_type, lines, native), n, cum))

    def folded(self, native: bool = False, lines: bool = False, sample_type: Optional[str] = None) -> str:
        """Folded stacks (``root;caller;leaf count`` per line: flamegraph.pl input)."""
        from perfagent.report.folded import folded_lines
        return "".join(line + "\n" for line in folded_lines(self._stacks(sample_type, lines, native)))

    def svg(self, title: str = "Flame Graph", native: bool = False, lines: bool = False,
            sample_type: Optional[str] = None) -> str:
        """A self-contained interactive SVG flame graph."""
        from perfagent.report.flamegraph import render_svg
        return render_svg(self._stacks(sample_type, lines, native), title=title)

    @property
    def samples(self) -> int:
        """Samples (or blocking episodes) in the profile."""
        from perfagent.pprof.profile import decode_profile
        if self._decoded is None:
            self._decoded = decode_profile(self._data)
        return sum(s.values[0] for s in self._decoded.samples)


class Capture:
    """A capture of one process (``pid=``), a command (``command=[...]``) or
    every process (``all=True``); other keywords as CaptureOptions.

    ``start()`` begins sampling (in a background thread) and raises on
    failure; ``stop()`` ends it; ``profile()`` builds a :class:`Profile`.
    As a context manager: start on entry, stop on exit.  ``duration``
    (seconds) stops it by itself; ``wait()`` blocks until it has stopped
    (the duration ran out, the process exited, the command ended).
    """

    def __init__(self, pid: Optional[int] = None, command: Optional[Sequence[str]] = None,
                 all: bool = False, duration: Optional[float] = None, **options) -> None:
        try:
            opts = CaptureOptions(pid=pid, command=tuple(command or ()), all=all, **options)
        except TypeError as exc:
            raise CaptureError("perfagent.Capture: %s" % exc) from None
        self.duration = duration
        self.lines: List[str] = []       # what the command line would have printed
        self._session = _Session(opts, self.lines.append)
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: Optional[BaseException] = None
        self.stop_reason = ""

    def start(self) -> "Capture":
        self._session.start()
        self._thread = threading.Thread(target=self._loop, name="perfagent-capture", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        session = self._session
        deadline = None if self.duration is None else session.mono_start + self.duration
        try:
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                reason = session.poll(DRAIN_INTERVAL)
                if reason:
                    self.stop_reason = reason
                    break
        except BaseException as exc:  # noqa: BLE001 - re-raised in stop()
            self._error = exc
        finally:
            self._done.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the capture stopped by itself (or ``timeout``); True if it did."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        """Stop sampling (the last samples are drained).  Raises what went
        wrong in the background, if anything did."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._session.stop(self.stop_reason)
        self.lines.extend(self._session.summary_lines())
        if self._error is not None:
            raise self._error

    def profile(self, offcpu: bool = False, comments: Sequence[str] = ()) -> Profile:
        """The on-CPU profile (``offcpu=True``: the off-CPU one)."""
        return Profile(self._session.build(offcpu, comments).encode())

    @property
    def samples(self) -> int:
        return self._session.samples

    def __enter__(self) -> "Capture":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def close(self) -> None:
        self._session.close()


def profile(pid: Optional[int] = None, command: Optional[Sequence[str]] = None, all: bool = False,
            duration: Optional[float] = 10.0, offcpu: bool = False, **options) -> Profile:
    """Capture for ``duration`` seconds (a command: until it exits, unless a
    duration is given) and return the profile."""
    if command is not None and duration == 10.0:
        duration = None
    cap = Capture(pid=pid, command=command, all=all, duration=duration, offcpu=offcpu,
                  profile=not offcpu or options.pop("profile", False), **options)
    cap.start()
    try:
        cap.wait()
    finally:
        cap.stop()
    try:
        return cap.profile(offcpu=offcpu)
    finally:
        cap.close()
