"""One capture: targets, sources, the drain loop, and the profiles it makes.

:class:`Capture` is what the command line (perfagent.run) and the library
API (perfagent.api) both drive:

    cap = Capture(CaptureOptions(pid=1234))
    cap.start()                      # raises CaptureError with one clear line
    while cap.poll() is None:        # one drain cycle (about 100 ms)
        ...
    cap.stop()                       # the last drain, sources stopped, injection undone
    builder = cap.build(offcpu=False)

Data flows one way: targets -> sources (the side-band perf events, the BPF
programs of perfagent.sources) -> the capture state (perfagent.capture:
processes, mappings, counted stacks) -> unwinding -> symbolization -> pprof
(perfagent.oncpu).  Nothing here installs signal handlers or prints: the
caller decides (``log`` receives the lines a user should see).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from perfagent.records import NamedTuple
from perfagent.capture import CaptureState
from perfagent.errors import CaptureError
from perfagent.oncpu import build_profile
from perfagent.perf.sampler import Sampler, list_threads
from perfagent.sources import (
    OffCpu, OnCpuCounts, OnCpuSource, PythonWalk, Source, dwarf_oncpu_source,
)
from perfagent.symbolize.native import BinaryCache
from perfagent.symbolize.symbolizer import Symbolizer
from perfagent.target import procfs

DRAIN_INTERVAL = 0.1
#: The longest wait between two drains of a quiet capture (Capture.next_wait):
#: every source's kernel side holds what it captures for longer (counts
#: aggregated in the kernel, nothing left to the agent's walker), no process
#: was born or exec'd for QUIET_AFTER seconds.  Each drain cycle costs the
#: agent about half a millisecond even when it finds nothing new.
QUIET_INTERVAL = 0.5
QUIET_AFTER = 1.0
#: The first wait after start: the first drain is where the in-kernel
#: walk's tables of the busy processes get loaded (until then every one of
#: their stacks is left to the agent's walker: 200 of them in a 0.1 s wait
#: at 999 Hz with two busy targets on 2 CPUs, most of all the stacks the
#: agent walked in a 10 s capture).
FIRST_WAIT = 0.03
#: --pid: how often the target's liveness is read from /proc when its pidfd
#: says nothing (a leader that exited while its threads run stays readable
#: as alive to the pidfd, not to /proc)
ALIVE_CHECK_INTERVAL = 1.0
TERM_GRACE_SECONDS = 2.0


class CaptureOptions(NamedTuple):
    """What to capture and how (the command line's flags, as values)."""

    pid: Optional[int] = None
    command: Tuple[str, ...] = ()
    all: bool = False
    children: bool = False            # --pid: also its existing descendants
    profile: bool = True              # on-CPU samples
    offcpu: bool = False              # off-CPU time
    sample_rate: int = 99
    unwind: str = "auto"              # fp, dwarf, auto
    unwind_in: str = "auto"           # dwarf/auto: kernel, user, auto (where stacks are walked)
    stack_size: int = 32768
    in_kernel: bool = True            # BPF sources (False: the perf ring buffer)
    python_walk: bool = True          # Python stacks from the interpreter's memory
    inject_python: bool = False       # CPython's perf trampoline through ptrace
    keep_native_frames: bool = False
    comm: str = ""                    # the launched command's name


def process_alive(pid: int) -> bool:
    return procfs.alive(pid)


def descendants(pid: int) -> List[int]:
    """Every process whose ancestry includes ``pid`` (not ``pid`` itself)."""
    children: Dict[int, List[int]] = {}
    for p in procfs.pids():
        st = procfs.stat(p)
        if st is not None and st.ppid > 0:
            children.setdefault(st.ppid, []).append(p)
    out: List[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return sorted(out)


def cpu_ticks(pids) -> int:
    """utime + stime (clock ticks) of the given processes now (gone ones: 0)."""
    total = 0
    for p in pids:
        try:
            fields = procfs.read_bounded(procfs.proc_path(p, "stat"), 4096)
        except OSError:
            continue
        rest = fields[fields.rfind(b")") + 2:].split()
        try:
            total += int(rest[11]) + int(rest[12])
        except (IndexError, ValueError):
            pass
    return total


class LaunchedCommand:
    """A command started blocked before exec, so events exist before its first instruction."""

    def __init__(self, argv: List[str], env: Optional[dict] = None) -> None:
        if "/" in argv[0]:
            path = argv[0]
        else:
            import shutil  # launch mode only (shutil imports bz2 and lzma)
            path = shutil.which(argv[0])
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
        sampler.drain(state.on_sample, state.on_event)
        state.resolve_pending()
        new = [t for t in tids if t not in sampler.followed_tids and t not in state.forked_tids]
        if not new:
            return
        sampler.open_threads(new, enable_now=True)


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

    def wake_fds(self) -> List[int]:
        return [fd for src in self for fd in src.wake_fds()]

    def enable(self) -> None:
        for src in self:
            src.enable()

    def proc_read(self, pid: int, maps) -> None:
        for src in self:
            src.proc_read(pid, maps)

    def close(self) -> None:
        for src in self:
            try:
                src.close()
            except Exception:  # noqa: BLE001 - closing after a failure: carry on
                pass


class Capture:
    """One capture (see the module docstring).  Not thread-safe: one thread
    drives it (perfagent.api runs that thread in the background)."""

    def __init__(self, opts: CaptureOptions, log: Callable[[str], None] = lambda line: None) -> None:
        from perfagent.arch import current
        targets = sum((opts.pid is not None, bool(opts.all), bool(opts.command)))
        if targets != 1:
            raise CaptureError("give exactly one target: a pid, a command, or all processes")
        if opts.unwind not in ("fp", "dwarf", "auto"):
            raise CaptureError("unwind must be fp, dwarf or auto, not %r" % (opts.unwind,))
        if opts.unwind_in not in ("kernel", "user", "auto"):
            raise CaptureError("unwind_in must be kernel, user or auto, not %r" % (opts.unwind_in,))
        if not (opts.profile or opts.offcpu):
            raise CaptureError("nothing to capture: ask for on-CPU samples, off-CPU time or both")
        if opts.unwind != "fp" and current().UNWIND_REGS_MASK is None:
            raise CaptureError("--unwind %s is not supported on %s yet; use --unwind fp"
                               % (opts.unwind, current().NAME))
        self.opts = opts
        self.log = log
        self.binaries = BinaryCache()  # shared by the unwinder and the symbolizer: each file once
        self.walker = None
        offcpu_walker = None
        if opts.unwind != "fp":
            from perfagent.unwind.walker import CFICache, Walker
            cfi = CFICache(self.binaries)   # one CFI cache for the on-CPU and off-CPU walkers
            if opts.profile:
                self.walker = Walker(opts.unwind, cfi)
            # Off-CPU user stacks are copied and unwound like samples unless --unwind fp.
            if opts.offcpu:
                offcpu_walker = Walker(opts.unwind, cfi)
        self.symbolizer = Symbolizer(self.binaries)
        self.state = CaptureState(walker=self.walker, symbolizer=self.symbolizer,
                                  offcpu_walker=offcpu_walker)
        self.sources = _Sources()
        self.sampler: Optional[Sampler] = None
        self.offcpu: Optional[OffCpu] = None
        self.launched: Optional[LaunchedCommand] = None
        self.injection = None
        self.notes: List[str] = []
        self.stop_reason = ""
        self.terminated_by_us = False
        self.lost = 0
        self.wall_start = time.time()
        self.mono_start = time.monotonic()
        self.mono_end: Optional[float] = None
        self.tgids: Optional[Set[int]] = None
        self._children_cpu = 0
        self._started = False
        self._stopped = False
        self._wait = DRAIN_INTERVAL      # next_wait's ramp: doubled while quiet
        self._waited = False             # next_wait has answered (FIRST_WAIT)
        self._born_at = 0.0              # when a drain last saw a process born or exec'd
        self._exit_fd = -1               # a pidfd of the --pid target or the command
        self._alive_due = 0.0            # --pid: when /proc is read next (see ALIVE_CHECK_INTERVAL)

    # -- start ------------------------------------------------------------------

    def start(self) -> None:
        """Open everything and start sampling; CaptureError on failure (with
        nothing left behind)."""
        opts = self.opts
        state = self.state
        try:
            if opts.inject_python and not opts.command:
                from perfagent.python.injection import PythonInjection
                self.injection = PythonInjection(strict=opts.pid is not None, log=self.log)
                try:
                    self.injection.activate([opts.pid] if opts.pid is not None else procfs.pids())
                except CaptureError as exc:
                    reason = getattr(exc.__cause__ or exc, "reason", "") or str(exc)
                    if opts.python_walk and any(r in reason for r in (
                            "python_too_old", "no_perf_trampoline", "no_libpython_symbols",
                            "ptrace_eperm", "timeout", "process_stopped")):
                        raise CaptureError("%s; without --inject-python, Python frames of CPython 3.8+ "
                                           "are read from the interpreter's memory, nothing injected"
                                           % exc) from None
                    raise
            # The BPF sources first (loading programs takes a while), then
            # what /proc says, then the side band: a thread created or renamed
            # before the side band opens is still read from /proc.  The BPF
            # on-CPU events go on last (sources.enable): a sample before its
            # process is read is a stack left to the agent's walker.
            if opts.all:
                self.sampler = self._start_sources(None)
                for pid in procfs.pids():
                    state.load_from_proc(pid, self.sources.proc_read)
                self.sampler.open_system_wide()
                self.sampler.enable()
                self.sources.enable()
            elif opts.pid is not None:
                pids = [opts.pid] + (descendants(opts.pid) if opts.children else [])
                self.sampler = self._start_sources(set(pids))
                for pid in pids:
                    state.load_from_proc(pid, self.sources.proc_read)
                for pid in pids:
                    try:
                        self.sampler.open_threads(list_threads(pid))
                    except ProcessLookupError:
                        if pid == opts.pid:
                            raise CaptureError("--pid %d: no such process" % opts.pid) from None
                self.sampler.enable()
                self.sources.enable()
                _discover_threads(self.sampler, state, opts.pid)
                if not opts.children:
                    self._children_cpu = cpu_ticks(descendants(opts.pid))
            else:
                env = None
                if opts.inject_python:
                    # The trampoline is on from the interpreter's first call;
                    # other programs ignore the variable.
                    env = dict(os.environ, PYTHONPERFSUPPORT="1")
                self.launched = LaunchedCommand(list(opts.command), env)
                try:
                    self.sampler = self._start_sources({self.launched.pid})
                    self.sampler.open_launched(self.launched.pid)
                except BaseException:
                    self.launched.abandon()
                    raise
                state.process(self.launched.pid).comm = opts.comm or os.path.basename(opts.command[0])
                state.process(self.launched.pid).uid = os.getuid()  # it runs as we do
                self.sources.enable()
                self.launched.start()
        except BaseException:
            self._close_after_failure()
            raise
        self._watch_exit()
        wake = self.sources.wake_fds()
        for fd in wake:
            self.sampler.watch(fd, edge=True)
        if wake:
            # Registering reports a ring that already holds records (the
            # events went on just before, and the walks fall back until the
            # first tables load) once: swallowed here, or it would end the
            # first wait (FIRST_WAIT) at once, before any process fell back
            # often enough to be loaded in it.
            self.sampler.wait(0)
        # --duration counts from here, when sampling runs.
        self.mono_start, self.wall_start = time.monotonic(), time.time()
        self._started = True
        for note in self.notes:
            self.log(note)

    def _start_sources(self, tgids: Optional[Set[int]]) -> Sampler:
        """The BPF sources for ``tgids``, then the perf events (sampling
        only when no BPF on-CPU source could start)."""
        opts = self.opts
        self.tgids = tgids
        oncpu = None
        python = None
        if opts.python_walk and (opts.offcpu or (opts.profile and opts.in_kernel)):
            walk = self._python_walk(tgids)
            if walk is not None:
                self.sources.append(walk)   # first: it names what the others bring
                python = walk.maps
        if opts.profile and opts.in_kernel:
            oncpu = self._oncpu_source(tgids, python)
            if oncpu is not None:
                self.sources.append(oncpu)
        if opts.offcpu:
            self.offcpu = OffCpu(self.state, tgids, opts.stack_size, self.symbolizer.kernel.lookup,
                                 self.log, python, opts.unwind_in, opts.unwind == "auto")
            self.offcpu.start()
            self.sources.append(self.offcpu)
        return self._sampler(opts.profile and oncpu is None)

    def _sampler(self, samples: bool) -> Sampler:
        """The perf events of the run: the side band only, or sampling into the rings."""
        opts = self.opts
        if not samples:
            return Sampler(1, side_band_only=True)  # mappings and names only
        if opts.unwind == "fp":
            return Sampler(opts.sample_rate)
        from perfagent.arch import current
        from perfagent.perf import attr as A
        from perfagent.perf.sampler import SAMPLE_TYPE, data_pages_for
        return Sampler(opts.sample_rate, data_pages=data_pages_for(opts.stack_size, opts.sample_rate),
                       sample_type=SAMPLE_TYPE | A.PERF_SAMPLE_REGS_USER | A.PERF_SAMPLE_STACK_USER,
                       sample_regs_user=current().UNWIND_REGS_MASK, sample_stack_user=opts.stack_size)

    def _python_walk(self, tgids: Optional[Set[int]]) -> Optional[PythonWalk]:
        """The in-kernel Python walk's maps and process tracking, or None (with
        the line saying why in ``notes``) when BPF cannot have them."""
        from perfagent.bpf.syscall import BPFError
        from perfagent.stackprog import python as pywalk
        try:
            maps = pywalk.make_maps(pywalk.fsbase_offset())
        except (BPFError, OSError) as exc:
            self.notes.append("Python frames from the interpreter's memory unavailable (%s); "
                              "--inject-python names Python functions through the perf trampoline "
                              "instead" % exc)
            return None
        # Not started: it examines the processes as they are read from /proc
        # (proc_read), and a launched command once it execs.
        return PythonWalk(self.state, tgids, maps)

    def _oncpu_source(self, tgids: Optional[Set[int]], python) -> Optional[OnCpuSource]:
        """The BPF on-CPU source, started; None when the kernel refuses BPF (the
        perf ring buffer samples instead), with the line saying so in ``notes``
        (shown once the perf events opened: when they cannot either, their
        error is the one to show)."""
        from perfagent.bpf.syscall import BPFError
        opts = self.opts
        if opts.unwind == "fp":
            source: OnCpuSource = OnCpuCounts(self.state, tgids, opts.sample_rate, python)
        else:
            source = dwarf_oncpu_source(self.state, tgids, opts, python, self.notes)
        try:
            source.start()
        except (BPFError, OSError) as exc:
            self.notes.append("BPF sampling unavailable (%s); sampling through the perf ring buffer "
                              "(no Python frames from the interpreter's memory)" % exc)
            return None
        return source

    def _watch_exit(self) -> None:
        """A pidfd of the --pid target (or the command) in the sampler's
        poll set: its exit ends the wait at once, however long the wait
        (Capture.next_wait); without pidfds (Linux < 5.3) each drain
        reads /proc as before."""
        pid = self.opts.pid if self.launched is None else self.launched.pid
        if pid is None:
            return
        from perfagent.libc import pidfd_open
        try:
            self._exit_fd = pidfd_open(pid)
        except OSError:
            return
        self.sampler.watch(self._exit_fd)

    def _unwatch_exit(self) -> None:
        fd, self._exit_fd = self._exit_fd, -1
        if fd >= 0:
            if self.sampler is not None:
                self.sampler.unwatch(fd)
            os.close(fd)

    def watch(self, fd: int) -> None:
        """End each wait for data as soon as ``fd`` is readable too (the
        command line's signal wake-up pipe: a signal stops the capture at
        once even while a quiet capture waits longer)."""
        self.sampler.watch(fd)

    def _close_after_failure(self) -> None:
        self._unwatch_exit()
        if self.sampler is not None:
            self.sampler.close()
        self.sources.close()
        if self.injection is not None:
            self.injection.deactivate()
            self.injection = None
        self.binaries.close()

    # -- running ------------------------------------------------------------------

    def drain(self) -> None:
        """One drain: the side band first (mappings, processes), then the
        sources, then what the samples need resolved against those mappings."""
        state = self.state
        self.sampler.drain(state.on_sample, state.on_event)
        if state.new_processes or state.python_rechecks:
            self._born_at = time.monotonic()
        self.sources.feed(state)
        state.resolve_pending()

    def next_wait(self) -> float:
        """How long the next poll may wait for data: DRAIN_INTERVAL while
        anything flows -- a source that must be drained at the normal pace
        (stacks left to the agent's walker, stack copies, no BPF source at
        all), or a process born or exec'd in the last QUIET_AFTER seconds
        (its Python frames and tables wait for a drain) --, else twice the
        last wait, up to QUIET_INTERVAL and to what every source's kernel
        side can hold (Source.max_wait); the first time, FIRST_WAIT.  The
        perf rings wake the wait when a quarter full, and the target's exit
        and signals end it at once."""
        if not self._waited:
            self._waited = True
            return FIRST_WAIT
        allowed = min([src.max_wait() for src in self.sources] or [0.0])
        if allowed <= 0.0 or time.monotonic() - self._born_at < QUIET_AFTER:
            self._wait = DRAIN_INTERVAL
        else:
            self._wait = min(2 * self._wait, QUIET_INTERVAL)
        # A source's limit ends the wait early (names due, maps filling), but
        # never makes drains more frequent than the normal pace.
        return max(DRAIN_INTERVAL, min(self._wait, allowed))

    def poll(self, timeout: float = DRAIN_INTERVAL) -> Optional[str]:
        """Wait up to ``timeout`` for data, drain, and say whether the
        capture's target is gone: a stop reason, or None to go on."""
        ready = self.sampler.wait(max(1, int(timeout * 1000)))
        self.drain()
        if self.launched is not None and self.launched.poll():
            return "command %s" % self.launched.describe_status()
        if self.opts.pid is not None and self._target_gone(ready):
            return "process %d exited" % self.opts.pid
        return None

    def _target_gone(self, ready: List[int]) -> bool:
        """--pid: read /proc when the pidfd says the target exited, and once
        a second anyway (every drain without a pidfd)."""
        now = time.monotonic()
        exited = self._exit_fd >= 0 and self._exit_fd in ready
        if self._exit_fd >= 0 and not exited and now < self._alive_due:
            return False
        self._alive_due = now + ALIVE_CHECK_INTERVAL
        if process_alive(self.opts.pid):
            if exited:
                self._unwatch_exit()     # readable for good: it would end every wait at once
            return False
        return True

    @property
    def elapsed(self) -> float:
        return (self.mono_end or time.monotonic()) - self.mono_start

    @property
    def samples(self) -> int:
        return self.state.samples

    def lost_so_far(self) -> int:
        return (self.sampler.lost if self.sampler is not None else 0) + sum(s.dropped for s in self.sources)

    # -- stop ---------------------------------------------------------------------

    def stop(self, reason: str = "", on_finishing: Callable[[], None] = lambda: None) -> None:
        """End the capture: a launched command still running gets SIGTERM
        (then SIGKILL), the events are disabled and drained, the sources
        stopped, the injection undone.  ``on_finishing`` runs once sampling
        has stopped (the command line arms its signal handling there)."""
        if self._stopped:
            return
        self._stopped = True
        if reason:
            self.stop_reason = reason
        state = self.state
        try:
            if self.launched is not None and not self.launched.poll():
                self.terminated_by_us = True
                what = self.launched.terminate(TERM_GRACE_SECONDS, self.drain)
                self.stop_reason = (self.stop_reason + "; " if self.stop_reason else "") + "command %s" % what
        finally:
            self.mono_end = time.monotonic()
            on_finishing()
            self._unwatch_exit()
            self.sampler.disable()
            self.sampler.drain(state.on_sample, state.on_event)
            self.lost = self.sampler.lost
            self.sampler.close()
            self.sources.stop(state)
            state.resolve_pending()
            if self.injection is not None:
                self.injection.deactivate()
                self.injection = None

    def close(self) -> None:
        """Release what building profiles needed (pinned files)."""
        self._unwatch_exit()
        self.binaries.close()

    # -- results ------------------------------------------------------------------

    def build(self, offcpu: bool = False, comments=()):
        """The on-CPU (or off-CPU) profile as a perfagent.pprof ProfileBuilder."""
        builder, _table = build_profile(self.state, self.symbolizer, self.opts.sample_rate,
                                        int(self.wall_start * 1e9), int(self.elapsed * 1e9), comments,
                                        keep_native_frames=self.opts.keep_native_frames, offcpu=offcpu)
        return builder

    def summary_lines(self) -> List[str]:
        """The end-of-run lines about what the sources met (unwinding, Python,
        off-CPU copies), before the "wrote" lines."""
        lines = ["warning: %s" % w for w in self.symbolizer.warnings]
        if self.stop_reason:
            lines.append(self.stop_reason)
        if self.walker is not None:
            lines.append(self.walker.summary())
        for src in self.sources:
            line = src.summary()
            if line:
                lines.append(line)
        return lines

    def oncpu_losses(self) -> Tuple[int, str]:
        """(samples lost, details) of the on-CPU side."""
        oncpu = [s for s in self.sources if isinstance(s, OnCpuSource)]
        return (self.lost + sum(s.dropped for s in oncpu), "".join(s.losses("samples") for s in oncpu))

    def children_hint(self) -> str:
        """For --pid without --children: a line when the process's children
        used much more CPU than the process itself was sampled for."""
        if self.opts.pid is None or self.opts.children or not self.opts.profile:
            return ""
        kids = descendants(self.opts.pid) if process_alive(self.opts.pid) else []
        used = (cpu_ticks(kids) - self._children_cpu) / float(os.sysconf("SC_CLK_TCK") or 100)
        own = self.state.samples / float(self.opts.sample_rate)
        if used >= 0.5 and used > 2 * own:
            n = len(kids)
            return ("pid %d itself used little CPU, but its %d child process%s used %.1f CPU s: "
                    "add --children to profile them too" % (self.opts.pid, n, "" if n == 1 else "es", used))
        return ""

    @property
    def exit_code(self) -> int:
        """The launched command's own status when it ended by itself, else 0."""
        if self.launched is not None and self.launched.status is not None and not self.terminated_by_us:
            return self.launched.exit_code()
        return 0


__all__ = ["Capture", "CaptureOptions", "LaunchedCommand", "Source", "descendants"]
