"""One capture run, from validated options to a written profile.

The order of things is chosen so that nothing is lost and nothing is left
behind: the output path is checked before sampling starts; SIGINT and
SIGTERM only set a flag, so the capture stops at the next drain and the
profile is still written; events are closed in ``finally``.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from typing import Callable, List, Optional

from perfagent.capture import CaptureState
from perfagent.cli import Options, PROG
from perfagent.errors import CaptureError
from perfagent.oncpu import build_profile
from perfagent.perf.sampler import Sampler, list_threads
from perfagent.sources import OffCpu, OnCpuCounts, OnCpuRecords, OnCpuSource, PythonWalk
from perfagent.symbolize.native import BinaryCache
from perfagent.symbolize.symbolizer import Symbolizer
from perfagent.target import procfs

DRAIN_INTERVAL_MS = 100
TERM_GRACE_SECONDS = 2.0


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
        fd, probe = tempfile.mkstemp(prefix=".perf-agent-", dir=directory)
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


class LaunchedCommand:
    """A command started blocked before exec, so events exist before its first instruction."""

    def __init__(self, argv: List[str], env: Optional[dict] = None) -> None:
        path = argv[0] if "/" in argv[0] else shutil.which(argv[0])
        if path is None or not os.path.exists(path):
            raise CaptureError("command not found: %s" % argv[0])
        if not os.access(path, os.X_OK) or os.path.isdir(path):
            raise CaptureError("command is not executable: %s" % path)
        self.argv = argv
        self.path = path
        self.status: Optional[int] = None
        go_r, self._go_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: wait for the go, then exec
            try:
                os.close(self._go_w)
                os.close(err_r)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                if os.read(go_r, 1) == b"g":
                    if env is None:
                        os.execv(path, argv)
                    os.execve(path, argv, env)
            except OSError as exc:
                os.write(err_w, str(exc.errno).encode())
            finally:
                os._exit(127)
        os.close(go_r)
        os.close(err_w)
        self._err_r = err_r
        self.pid = pid

    def start(self) -> None:
        """Let the child exec; raise if exec failed."""
        os.write(self._go_w, b"g")
        os.close(self._go_w)
        self._go_w = -1
        data = os.read(self._err_r, 32)  # EOF on successful exec (the pipe is close-on-exec)
        os.close(self._err_r)
        if data:
            self.wait()
            code = int(data) if data.isdigit() else 0
            raise CaptureError("cannot execute %s: %s" % (self.path, os.strerror(code)))

    def abandon(self) -> None:
        """The capture failed before start(): the child exits without exec."""
        if self._go_w >= 0:
            os.close(self._go_w)
            self._go_w = -1
        self.wait()

    def poll(self) -> bool:
        """True once the command has exited (its status is then recorded)."""
        if self.status is not None:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.status = 0
            return True
        if pid == 0:
            return False
        self.status = status
        return True

    def wait(self) -> None:
        while not self.poll():
            time.sleep(0.01)

    def terminate(self, grace: float, during: Callable[[], None]) -> str:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns what was done."""
        if self.poll():
            return ""
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            during()
            if self.poll():
                return "terminated with SIGTERM"
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        self.wait()
        return "killed with SIGKILL after %.0fs" % grace

    def describe_status(self) -> str:
        st = self.status or 0
        if os.WIFSIGNALED(st):
            sig = os.WTERMSIG(st)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return "killed by signal %s" % name
        return "exited with status %d" % os.WEXITSTATUS(st)

    def exit_code(self) -> int:
        st = self.status or 0
        return 128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)


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

    def update(self, elapsed: float, samples: int, lost: int, processes: int) -> None:
        if not self.enabled or elapsed < self._next:
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


class PythonInjection:
    """--inject-python for running processes: activate before, deactivate after.

    Strict (--pid): a target that cannot be activated aborts the run.
    Lenient (-a): each failure is logged as ``pid=N reason=...`` and the run
    goes on; one summary line gives the counts.  Deactivation runs for every
    process whose activation succeeded, whatever ends the run.
    """

    # Seconds one activation may take: a single --pid target gets time to
    # reach a safe point; with -a, one process that never does must not
    # hold up the whole machine's capture.
    STRICT_TIMEOUT = 5.0
    LENIENT_TIMEOUT = 1.0

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.timeout = self.STRICT_TIMEOUT if strict else self.LENIENT_TIMEOUT
        self.active: List[int] = []
        self.skipped: dict = {}

    def activate(self, pids: List[int]) -> None:
        from perfagent.python.detect import InjectionSkip
        from perfagent.python.inject import InjectionError, activate
        me = os.getpid()
        for pid in pids:
            if pid == me:
                continue
            try:
                activate(pid, timeout=self.timeout)
            except (InjectionSkip, InjectionError) as exc:
                if self.strict:
                    raise CaptureError("--inject-python: %s" % exc) from None
                self.skipped[exc.reason] = self.skipped.get(exc.reason, 0) + 1
                if exc.reason not in ("not_python", "process_gone"):
                    log(str(exc))
                continue
            self.active.append(pid)
        if not self.strict:
            counts = " ".join("%s=%d" % kv for kv in sorted(self.skipped.items()))
            log("inject-python: activated %d processes%s" % (len(self.active),
                                                            "; skipped " + counts if counts else ""))

    def deactivate(self) -> None:
        from perfagent.python.detect import InjectionSkip
        from perfagent.python.inject import InjectionError, deactivate
        active, self.active = self.active, []
        for pid in active:
            try:
                deactivate(pid, timeout=self.timeout)
            except (InjectionSkip, InjectionError) as exc:
                if exc.reason != "process_gone":  # the target exited meanwhile: harmless
                    log("deactivation failed: %s" % exc)


class StopFlag:
    """What SIGINT/SIGTERM do, by phase of the run.

    * While sampling, the first signal ends the capture at the next drain
      (within 100 ms); the profile is then finished as usual (names and all).
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

    def __init__(self) -> None:
        self.signum = 0
        self.count = 0
        self.phase = self.SAMPLING
        self._old = {}

    def install(self) -> None:
        from perfagent import budget
        budget.reset()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)

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


def _discover_threads(sampler: Sampler, state: CaptureState, pid: int) -> None:
    """Open events on threads that appeared while we opened the first ones.

    List first, then drain: a thread created by an already-followed thread
    has its FORK record in the ring by the time we drain, so it is not opened
    twice (which would double its samples).
    """
    for _ in range(20):
        try:
            tids = list_threads(pid)
        except ProcessLookupError:
            return
        drain(sampler, state)
        new = [t for t in tids if t not in sampler.followed_tids and t not in state.forked_tids]
        if not new:
            return
        sampler.open_threads(new, enable_now=True)


def drain(sampler: Sampler, state: CaptureState) -> None:
    sampler.drain(state.on_sample, state.on_event)
    state.resolve_pending()


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


def _sampler(opts: Options, samples: bool, bpf_prog_fd: int = -1) -> Sampler:
    """The perf events of the run: the side band only, sampling into the
    rings, or sampling with a BPF program that captures each sample."""
    if not samples:
        return Sampler(1, side_band_only=True)  # mappings and names only
    if bpf_prog_fd >= 0:
        return Sampler(opts.sample_rate, bpf_prog_fd=bpf_prog_fd)
    if opts.unwind == "fp":
        return Sampler(opts.sample_rate)
    from perfagent.arch import current
    from perfagent.perf import attr as A
    from perfagent.perf.sampler import SAMPLE_TYPE, data_pages_for
    return Sampler(opts.sample_rate, data_pages=data_pages_for(opts.stack_size, opts.sample_rate),
                   sample_type=SAMPLE_TYPE | A.PERF_SAMPLE_REGS_USER | A.PERF_SAMPLE_STACK_USER,
                   sample_regs_user=current().UNWIND_REGS_MASK, sample_stack_user=opts.stack_size)


def _python_walk(opts: Options, state: CaptureState, tgids: Optional[set],
                 notes: List[str]) -> Optional[PythonWalk]:
    """The in-kernel Python walk's maps and process tracking, or None (with
    the line saying why in ``notes``) when BPF cannot have them."""
    from perfagent.bpf.syscall import BPFError
    from perfagent.stackprog import python as pywalk
    try:
        maps = pywalk.make_maps(pywalk.fsbase_offset())
    except (BPFError, OSError) as exc:
        notes.append("Python frames from the interpreter's memory unavailable (%s); "
                     "--inject-python names Python functions through the perf trampoline instead" % exc)
        return None
    walk = PythonWalk(state, tgids, maps)
    walk.start()
    return walk


def _oncpu_source(opts: Options, state: CaptureState, tgids: Optional[set],
                  notes: List[str], python=None) -> Optional[OnCpuSource]:
    """The BPF on-CPU source, started; None when the kernel refuses BPF (the
    perf ring buffer samples instead), with the line saying so in ``notes``
    (printed once the perf events opened: when they cannot either, their
    error is the one to show)."""
    from perfagent.bpf.syscall import BPFError
    if opts.unwind == "fp":
        source: OnCpuSource = OnCpuCounts(state, tgids, opts.sample_rate, python)
    else:
        source = OnCpuRecords(state, tgids, opts.sample_rate, opts.stack_size, python)
    try:
        source.start()
    except (BPFError, OSError) as exc:
        notes.append("BPF sampling unavailable (%s); sampling through the perf ring buffer "
                     "(no Python frames from the interpreter's memory)" % exc)
        return None
    return source


class _Sources(list):
    """The run's BPF sources: fed, followed and stopped together."""

    def feed(self, state: CaptureState) -> None:
        for src in self:
            src.follow(state.new_processes, state.gone_processes)
            src.feed()
        state.new_processes = []
        state.gone_processes = []

    def stop(self, state: CaptureState) -> None:
        for src in self:
            src.follow(state.new_processes, state.gone_processes)
            src.stop()

    def close(self) -> None:
        for src in self:
            try:
                src.close()
            except Exception:  # noqa: BLE001 - closing after a failure: carry on
                pass


def _capture(opts: Options, comm: Optional[str], out_path: Optional[str],
             offcpu_path: Optional[str]) -> int:
    from perfagent.arch import current
    if opts.unwind != "fp" and current().UNWIND_REGS_MASK is None:
        raise CaptureError("--unwind %s is not supported on %s yet; use --unwind fp"
                           % (opts.unwind, current().NAME))
    walker = None
    binaries = BinaryCache()  # shared by the unwinder and the symbolizer: each file examined once
    cfi = None  # one CFI cache for the on-CPU and the off-CPU walkers
    if opts.unwind != "fp" and (opts.profile or opts.offcpu):
        from perfagent.unwind.walker import CFICache, Walker
        cfi = CFICache(binaries)
        if opts.profile:
            walker = Walker(opts.unwind, cfi)
    # Off-CPU user stacks are copied and unwound like samples unless --unwind fp.
    offcpu_walker = Walker(opts.unwind, cfi) if opts.offcpu and cfi is not None else None
    symbolizer = Symbolizer(binaries)
    state = CaptureState(walker=walker, symbolizer=symbolizer, offcpu_walker=offcpu_walker)
    stop = StopFlag()
    launched: Optional[LaunchedCommand] = None
    stop_reason = ""
    terminated_by_us = False
    exit_code = 0
    wall_start = time.time()
    mono_start = time.monotonic()
    stop.install()
    injection: Optional[PythonInjection] = None
    sources = _Sources()
    sampler: Optional[Sampler] = None
    notes: List[str] = []
    offcpu: Optional[OffCpu] = None

    def start_sources(tgids: Optional[set]) -> Sampler:
        """The BPF sources for ``tgids``, then the perf events (sampling
        only when no BPF on-CPU source could start)."""
        nonlocal offcpu
        oncpu = None
        python = None
        if opts.python_walk and (opts.offcpu or (opts.profile and opts.in_kernel)):
            walk = _python_walk(opts, state, tgids, notes)
            if walk is not None:
                sources.append(walk)   # first: it names what the others bring
                python = walk.maps
        if opts.profile and opts.in_kernel:
            oncpu = _oncpu_source(opts, state, tgids, notes, python)
            if oncpu is not None:
                sources.append(oncpu)
        if opts.offcpu:
            offcpu = OffCpu(state, tgids, opts.stack_size, symbolizer.kernel.lookup, log, python)
            offcpu.start()
            sources.append(offcpu)
        return _sampler(opts, opts.profile and oncpu is None)

    try:
        if opts.inject_python and not opts.command:
            injection = PythonInjection(strict=opts.pid is not None)
            injection.activate([opts.pid] if opts.pid is not None else procfs.pids())
            # --duration counts from when sampling starts, not from before the injections
            mono_start = time.monotonic()
            wall_start = time.time()
        try:
            # The BPF sources first (loading programs takes a while), then
            # what /proc says, then the side band: a thread created or renamed
            # before the side band opens is still read from /proc.
            if opts.all:
                sampler = start_sources(None)
                for pid in procfs.pids():
                    state.load_from_proc(pid)
                sampler.open_system_wide()
                sampler.enable()
                mono_start, wall_start = time.monotonic(), time.time()  # --duration counts from here
            elif opts.pid is not None:
                sampler = start_sources({opts.pid})
                state.load_from_proc(opts.pid)
                try:
                    sampler.open_threads(list_threads(opts.pid))
                except ProcessLookupError:
                    raise CaptureError("--pid %d: no such process" % opts.pid) from None
                sampler.enable()
                mono_start, wall_start = time.monotonic(), time.time()  # --duration counts from here
                _discover_threads(sampler, state, opts.pid)
            else:
                env = None
                if opts.inject_python:
                    # The trampoline is on from the interpreter's first call;
                    # other programs ignore the variable.
                    env = dict(os.environ, PYTHONPERFSUPPORT="1")
                launched = LaunchedCommand(opts.command, env)
                try:
                    sampler = start_sources({launched.pid})
                    sampler.open_launched(launched.pid)
                except BaseException:
                    launched.abandon()
                    raise
                state.process(launched.pid).comm = comm or ""
                state.process(launched.pid).uid = os.getuid()  # it runs as we do
                mono_start = time.monotonic()
                wall_start = time.time()
                launched.start()
        except BaseException:
            if sampler is not None:
                sampler.close()
            sources.close()
            raise
        for note in notes:
            log(note)

        def drain_all() -> None:
            # The side band first (mappings, processes), then the sources,
            # then what the samples need resolved against those mappings.
            sampler.drain(state.on_sample, state.on_event)
            sources.feed(state)
            state.resolve_pending()

        deadline = None if opts.duration is None else mono_start + opts.duration
        progress = Progress(not opts.quiet, opts.duration)
        try:
            while True:
                if stop.signum:
                    stop_reason = "stopped by %s" % signal.Signals(stop.signum).name
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                timeout = DRAIN_INTERVAL_MS if deadline is None else min(DRAIN_INTERVAL_MS, (deadline - now) * 1000)
                sampler.wait(max(1, int(timeout)))
                drain_all()
                progress.update(time.monotonic() - mono_start, state.samples,
                                sampler.lost + sum(s.dropped for s in sources),
                                len(state.pids_seen))
                if launched is not None and launched.poll():
                    stop_reason = "command %s" % launched.describe_status()
                    break
                if opts.pid is not None and not process_alive(opts.pid):
                    stop_reason = "process %d exited" % opts.pid
                    break
            if launched is not None and not launched.poll():
                terminated_by_us = True
                what = launched.terminate(TERM_GRACE_SECONDS, drain_all)
                stop_reason = (stop_reason + "; " if stop_reason else "") + "command %s" % what
        finally:
            stop.finishing()
            progress.clear()
            sampler.disable()
            sampler.drain(state.on_sample, state.on_event)
            lost = sampler.lost
            sampler.close()
            sources.stop(state)
            state.resolve_pending()
        if injection is not None:
            injection.deactivate()
            injection = None
        duration_ns = int((time.monotonic() - mono_start) * 1e9)
        comments = ["%s=%s" % kv for kv in opts.tags]
        for path, is_offcpu in ((out_path, False), (offcpu_path, True)):
            if path is None:
                continue
            builder, _table = build_profile(state, symbolizer, opts.sample_rate,
                                            int(wall_start * 1e9), duration_ns, comments,
                                            keep_native_frames=opts.keep_native_frames, offcpu=is_offcpu)
            try:
                builder.write(path)
            except OSError as exc:
                raise CaptureError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
    finally:
        if injection is not None:
            injection.deactivate()
        stop.restore()
        binaries.close()
    from perfagent import budget
    if budget.cancelled():
        log("stopped by %s while finishing: frames not named by then keep their addresses"
            % signal.Signals(stop.signum).name)
    for warning in symbolizer.warnings:
        log("warning: %s" % warning)
    if stop_reason:
        log(stop_reason)
    if walker is not None:
        log(walker.summary())
    for src in sources:
        line = src.summary()
        if line:
            log(line)
    oncpu_sources = [s for s in sources if isinstance(s, OnCpuSource)]
    if out_path is not None:
        if state.samples == 0:
            log("warning: no samples were collected (was the target idle?); wrote an empty profile")
        losses = "".join(s.losses("samples") for s in oncpu_sources)
        lost += sum(s.dropped for s in oncpu_sources)
        log("wrote %s: %d samples, %d lost%s, %d processes"
            % (out_path, state.samples, lost, losses, len(state.pids_seen)))
    if offcpu_path is not None:
        total_ns = sum(v[1] for v in state.offcpu_stacks.values())
        losses = offcpu.losses("episodes") if offcpu is not None else ""
        log("wrote %s: %d blocking episodes, %.3f s off-CPU%s" % (
            offcpu_path, state.offcpu_samples, total_ns / 1e9, losses or ", nothing lost"))
    if launched is not None and launched.status is not None and not terminated_by_us:
        exit_code = launched.exit_code()  # the command ended by itself: pass its status on
    return exit_code
