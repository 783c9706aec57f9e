"""The capture command: from validated options to written profiles.

The capture itself is perfagent.session.Capture (the library API drives the
same class); this module adds what only the command line does: the output
paths (checked, and reserved, before anything starts), signal handling, the
progress line and the end-of-run lines.

The order of things is chosen so that nothing is lost and nothing is left
behind: the output path is checked before sampling starts; SIGINT and
SIGTERM only set a flag, so the capture stops at the next drain and the
profile is still written; events are closed in ``finally``.
"""

from __future__ import annotations

import gc
import os
import signal
import stat
import sys
import time
from typing import Optional

from perfagent.cli import Options, PROG
from perfagent.errors import CaptureError
from perfagent.pprof.encode import make_temp_file
from perfagent.session import Capture, CaptureOptions
from perfagent.target import procfs



def log(msg: str) -> None:
    print("%s: %s" % (PROG, msg), file=sys.stderr, flush=True)


# -- output paths --------------------------------------------------------------
def safe_comm(comm: str) -> str:
    """A process name usable as a file name part (no '/', spaces, or oddities)."""
    out = "".join(c if (c.isalnum() or c in "._-") else "_" for c in comm).strip("._")
    return out or "process"


def _numbered(path: str, n: int) -> str:
    """``name-N.pb.gz`` for ``name.pb.gz`` (n > 0)."""
    if n == 0:
        return path
    for suffix in (".pb.gz", ".pb", ".gz"):
        if path.endswith(suffix):
            return "%s-%d%s" % (path[: -len(suffix)], n, suffix)
    return "%s-%d" % (path, n)


def unique_path(path: str) -> str:
    """``path``, or ``name-1.pb.gz``, ``name-2.pb.gz``... if it exists."""
    n = 0
    while os.path.lexists(_numbered(path, n)):
        n += 1
    return _numbered(path, n)


def reserve_path(path: str) -> str:
    """Create ``path`` (or the first free ``name-N`` variant) exclusively
    and return it: two captures started in the same minute in the same
    directory get different files, whatever the timing (O_EXCL).  The empty
    file is replaced atomically when the profile is written."""
    n = 0
    while True:
        candidate = _numbered(path, n)
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            n += 1
            continue
        os.close(fd)
        return candidate


def default_output(comm: Optional[str], kind: str = "on-cpu", now: Optional[float] = None) -> str:
    stamp = time.strftime("%Y%m%d%H%M", time.localtime(now))
    name = "%s-%s.pb.gz" % (stamp, kind) if comm is None else "%s-%s-%s.pb.gz" % (safe_comm(comm), stamp, kind)
    return unique_path(name)


def check_writable(path: str, flag: str) -> None:
    """Fail before capturing when the profile could not be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CaptureError("%s: %s is a directory; give a file path" % (flag, path))
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise CaptureError("%s: directory %s does not exist; create it or choose another path"
                           % (flag, directory)) from None
    except PermissionError:
        raise CaptureError("%s: directory %s cannot be reached (permission denied); choose another path"
                           % (flag, directory)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise CaptureError("%s: %s is not a directory" % (flag, directory))
    # Creating a file is the only honest test: root passes access(2) even on
    # read-only mounts and pseudo file systems.
    try:
        fd, probe = make_temp_file(directory, ".perf-agent-")
    except OSError as exc:
        raise CaptureError("%s: directory %s is not writable (%s); choose another path"
                           % (flag, directory, exc.strerror)) from None
    os.close(fd)
    os.unlink(probe)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CaptureError("%s: %s exists and is not writable" % (flag, path))


# -- targets -------------------------------------------------------------------
def check_pid(pid: int) -> str:
    """The process's comm; a clear error when it is gone or not readable."""
    try:
        procfs.read_bounded(procfs.proc_path(pid, "maps"), 1)
    except (FileNotFoundError, ProcessLookupError):
        raise CaptureError("--pid %d: no such process" % pid) from None
    except PermissionError:
        raise CaptureError("--pid %d: permission denied reading /proc/%d/maps; run as root or "
                           "grant CAP_SYS_PTRACE (and CAP_PERFMON)" % (pid, pid)) from None
    return procfs.comm(pid)


def process_alive(pid: int) -> bool:
    return procfs.alive(pid)


# -- the run -------------------------------------------------------------------
class Progress:
    """One status line on stderr, rewritten in place about once a second.

    Only on a terminal and without --quiet: a log file or a pipe gets no
    carriage-return noise.  Nothing ever goes to stdout, which belongs to the
    launched command.
    """

    def __init__(self, enabled: bool, total: Optional[float]) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self._next = 0.0
        self._shown = False

    def due(self, elapsed: float) -> bool:
        """Whether update() would write now (the figures it shows cost
        map reads: they are gathered only then)."""
        return self.enabled and elapsed >= self._next

    def update(self, elapsed: float, samples: int, lost: int, processes: int) -> None:
        if not self.due(elapsed):
            return
        self._next = elapsed + 1.0
        total = "/%.0fs" % self.total if self.total is not None else ""
        sys.stderr.write("\r\x1b[K%s: %.0fs%s  %d samples  %d lost  %d processes"
                         % (PROG, elapsed, total, samples, lost, processes))
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


class StopFlag:
    """What SIGINT/SIGTERM do, by phase of the run.

    * While sampling, the first signal ends the capture at once (it wakes
      the drain loop's wait); the profile is then finished as usual (names
      and all).
    * While finishing (the last drain, unwinding, symbolizing, writing), a
      signal -- the first one then, or a second one -- cancels the remaining
      work (perfagent.budget.cancel: every parse and walk loop checks it), so
      the profile is written within a second with what was resolved; frames
      not named yet keep their addresses.
    * Once cancelled, one more signal exits at once, writing nothing more.
      Nothing is left stopped or traced in a target either way.
    """

    SAMPLING = "sampling"
    FINISHING = "finishing"
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self.count = 0
        self.phase = self.SAMPLING
        self._old = {}
        #: Readable once a signal came (signal.set_wakeup_fd): the drain loop
        #: polls it with its rings, so a stop is seen at once even while a
        #: quiet capture waits longer than a drain interval.
        self.wake_fd = -1
        self._wake_w = -1
        self._old_wakeup = -1

    def install(self) -> None:
        from perfagent import budget
        budget.reset()
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handler)
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        try:
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:          # not the main thread: stops wait for the next drain
            os.close(r)
            os.close(w)
            return
        self.wake_fd, self._wake_w = r, w

    def finishing(self) -> None:
        """The capture is over: from now on a signal cancels what is left."""
        self.phase = self.FINISHING
        if self.count > 1:
            self._cancel()

    def _handler(self, signum, frame) -> None:
        from perfagent import budget
        self.count += 1
        self.signum = signum
        if budget.cancelled():
            try:
                sys.stderr.write("\n%s: stopped by %s again: exiting now\n"
                                 % (PROG, signal.Signals(signum).name))
                sys.stderr.flush()
            finally:
                os._exit(128 + signum)
        if self.phase == self.FINISHING or self.count > 1:
            self._cancel()

    @staticmethod
    def _cancel() -> None:
        from perfagent import budget
        budget.cancel()

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        if self._wake_w >= 0:
            signal.set_wakeup_fd(self._old_wakeup)
            os.close(self.wake_fd)
            os.close(self._wake_w)
            self.wake_fd = self._wake_w = -1


def output_path(explicit: Optional[str], comm: Optional[str], kind: str, flag: str) -> str:
    """The path a profile will be written to, checked before the capture starts."""
    if explicit:
        path = explicit
        if os.path.exists(path) and not os.path.isdir(path):
            log("warning: %s exists and will be replaced" % path)
        check_writable(path, flag)
        return path
    path = default_output(comm, kind)
    check_writable(path, flag)
    try:
        return reserve_path(path)
    except OSError as exc:
        raise CaptureError("%s: cannot create %s (%s); choose another path"
                           % (flag, path, exc.strerror or exc)) from None


def run(opts: Options) -> int:
    if opts.all:
        comm: Optional[str] = None
    elif opts.pid is not None:
        comm = check_pid(opts.pid)
    else:
        comm = os.path.basename(opts.command[0])
    out_path = output_path(opts.profile_output, comm, "on-cpu", "--profile-output") if opts.profile else None
    offcpu_path = output_path(opts.offcpu_output, comm, "off-cpu", "--offcpu-output") if opts.offcpu else None
    reserved = [p for p, explicit in ((out_path, opts.profile_output), (offcpu_path, opts.offcpu_output))
                if p is not None and not explicit]
    try:
        return _capture(opts, comm, out_path, offcpu_path)
    except BaseException:
        for path in reserved:  # the empty files reserved for a capture that failed
            try:
                if os.path.getsize(path) == 0:
                    os.unlink(path)
            except OSError:
                pass
        raise


def capture_options(opts: Options, comm: Optional[str]) -> CaptureOptions:
    return CaptureOptions(
        pid=opts.pid, command=tuple(opts.command), all=opts.all, children=opts.children,
        profile=opts.profile, offcpu=opts.offcpu, sample_rate=opts.sample_rate, unwind=opts.unwind,
        unwind_in=opts.unwind_in,
        stack_size=opts.stack_size, in_kernel=opts.in_kernel, python_walk=opts.python_walk,
        inject_python=opts.inject_python, keep_native_frames=opts.keep_native_frames,
        comm=comm or "")


def _capture(opts: Options, comm: Optional[str], out_path: Optional[str],
             offcpu_path: Optional[str]) -> int:
    from perfagent import budget
    cap = Capture(capture_options(opts, comm), log)
    stop = StopFlag()
    stop.install()
    try:
        # What start-up builds (symbol and CFI tables, BTF, the processes
        # found) lives for the whole run: built without the cycle collector
        # and then frozen out of its sight, so that its collections stay
        # cheap (they were 3-4% of a 10 s capture's CPU, walking those
        # objects again and again).
        gc.disable()
        try:
            cap.start()
        finally:
            gc.freeze()
            gc.enable()
        if stop.wake_fd >= 0:
            cap.watch(stop.wake_fd)
        deadline = None if opts.duration is None else cap.mono_start + opts.duration
        progress = Progress(not opts.quiet, opts.duration)
        reason = ""
        try:
            while True:
                if stop.signum:
                    reason = "stopped by %s" % signal.Signals(stop.signum).name
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                timeout = cap.next_wait()
                if deadline is not None:
                    timeout = min(timeout, deadline - now)
                reason = cap.poll(max(0.001, timeout)) or ""
                if progress.due(cap.elapsed):
                    progress.update(cap.elapsed, cap.samples, cap.lost_so_far(), len(cap.state.pids_seen))
                if reason:
                    break
        finally:
            progress.clear()
            cap.stop(reason, on_finishing=stop.finishing)
        comments = ["%s=%s" % kv for kv in opts.tags]
        for path, is_offcpu in ((out_path, False), (offcpu_path, True)):
            if path is None:
                continue
            try:
                cap.build(is_offcpu, comments).write(path)
            except OSError as exc:
                raise CaptureError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
    finally:
        stop.restore()
        cap.close()
    if budget.cancelled():
        log("stopped by %s while finishing: frames not named by then keep their addresses"
            % signal.Signals(stop.signum).name)
    for line in cap.summary_lines():
        log(line)
    state = cap.state
    if out_path is not None:
        if state.samples == 0:
            log("warning: no samples were collected (was the target idle?); wrote an empty profile")
        lost, losses = cap.oncpu_losses()
        log("wrote %s: %s, %d lost%s, %s"
            % (out_path, plural(state.samples, "sample"), lost, losses,
               plural(len(state.pids_seen), "process", "processes")))
        hint = cap.children_hint()
        if hint:
            log(hint)
    if offcpu_path is not None:
        total_ns = state.offcpu_nanoseconds()
        losses = cap.offcpu.losses("episodes") if cap.offcpu is not None else ""
        log("wrote %s: %s, %.3f s off-CPU%s" % (
            offcpu_path, plural(state.offcpu_samples, "blocking episode"), total_ns / 1e9,
            losses or ", nothing lost"))
    return cap.exit_code


def plural(n: int, one: str, many: str = "") -> str:
    """``1 sample``, ``2 samples``."""
    return "%d %s" % (n, one if n == 1 else (many or one + "s"))
