"""perf-trampoline injection into real CPython processes (no mocks).

For each CPython 3.12+ available here, a target (tests/programs/py_target.py)
is started *without* -X perf in an awkward state with a second thread
running; the test activates the trampoline, checks that /tmp/perf-PID.map
fills with ``py::`` entries, deactivates, checks that it stops growing, and
that the target is alive, untraced, has no stopped thread, keeps making
progress in every thread, did not see a blocking call return early and
wrote nothing on stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from perfagent.ptrace import thread_states, tracer_pid  # noqa: E402
from perfagent.python import InjectionError, InjectionSkip, activate, deactivate, detect  # noqa: E402

TARGET = os.path.join(REPO, "tests", "programs", "py_target.py")
BLOCK = 4.0  # py_target.BLOCK

CACHE = "/var/cache/perfagent/pythons"
_CANDIDATES = [
    ("3.13-shared", os.path.join(CACHE, "3.13-shared/bin/python3.13")),
    ("3.13-static", os.path.join(CACHE, "3.13-static/bin/python3.13")),
    ("pyenv-3.13", "/root/.pyenv/versions/3.13.0/bin/python3.13"),
    ("pyenv-3.12", "/root/.pyenv/versions/3.12.1/bin/python3.12"),
]


def _works(python: str) -> bool:
    """Installed and runnable (a build in progress may have a half-made tree)."""
    if not os.access(python, os.X_OK):
        return False
    try:
        return subprocess.run([python, "-c", "import sys; assert sys.version_info >= (3, 12)"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def available_pythons() -> List[Tuple[str, str]]:
    found = [(n, p) for n, p in _CANDIDATES if _works(p)]
    if any(n.startswith("3.13-") for n, _ in found):
        # The purpose-built 3.13s cover 3.13; keep pyenv's 3.12.
        found = [(n, p) for n, p in found if n != "pyenv-3.13"]
    return found


PYTHONS = available_pythons()
OLD_PYTHON = "/usr/bin/python3.11"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of other processes needs root here")


class Target:
    """A running py_target.py whose stdout lines are collected with timestamps."""

    def __init__(self, python: str, mode: str, tmpdir: str, xopts: List[str] = (), env=None) -> None:
        self.err_path = os.path.join(tmpdir, "stderr-%s.txt" % mode)
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([python, *xopts, TARGET, mode], stdout=subprocess.PIPE,
                                     stderr=self.err, stdin=subprocess.DEVNULL, env=env)
        self.pid = self.proc.pid
        self.lines: List[Tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(lambda: self.find("ready"), 10, "ready")

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode().strip()))

    def find(self, prefix: str, since: float = 0.0) -> List[List[str]]:
        return [line.split() for t, line in list(self.lines) if t >= since and line.startswith(prefix)]

    def last_tick(self) -> int:
        ticks = self.find("tick")
        return int(ticks[-1][1]) if ticks else -1

    def wait_for(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError("target %s: no %s within %.1fs; stderr: %r; last lines %r"
                             % (self.pid, what, timeout, self.stderr(), self.lines[-5:]))

    def stderr(self) -> str:
        self.err.flush()
        with open(self.err_path, "rb") as f:
            return f.read().decode(errors="replace")

    @property
    def perf_map(self) -> str:
        return "/tmp/perf-%d.map" % self.pid

    def py_entries(self) -> List[str]:
        try:
            with open(self.perf_map) as f:
                return [line for line in f if " py::" in line]
        except FileNotFoundError:
            return []

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.err.close()
        try:
            os.unlink(self.perf_map)
        except FileNotFoundError:
            pass


def assert_released(pid: int) -> None:
    """Alive, untraced, and no thread in tracing/job-control stop."""
    assert os.path.exists("/proc/%d" % pid)
    assert tracer_pid(pid) == 0
    states = thread_states(pid)
    assert states and not any(s in "tT" for s in states.values()), states


@pytest.fixture
def target_factory(tmp_path):
    started: List[Target] = []

    def start(python: str, mode: str) -> Target:
        t = Target(python, mode, str(tmp_path))
        started.append(t)
        return t
    yield start
    for t in started:
        t.close()


def _activate_deactivate(t: Target) -> Tuple[float, float]:
    t.wait_for(lambda: t.last_tick() >= 3, 5, "worker ticks")
    assert t.py_entries() == [], "target writes a perf map before activation"
    up = activate(t.pid)
    assert_released(t.pid)
    entries = t.wait_for(lambda: [e for e in t.py_entries() if "fresh_" in e], 5,
                         "py:: entries after activation")
    assert any(e.split(None, 2)[2].startswith("py::") for e in entries)
    down = deactivate(t.pid)
    assert_released(t.pid)
    # Functions already compiled into trampolines may finish being written;
    # after that, calling new functions must add nothing.
    time.sleep(0.3)
    settled = len(t.py_entries())
    tick = t.last_tick()
    t.wait_for(lambda: t.last_tick() >= tick + 10, 5, "worker progress after deactivation")
    assert len(t.py_entries()) == settled, "perf map still growing after deactivation"
    return up, down


BLOCKING_MODES = ("sleep", "event", "select", "read")
PROGRESS_MODES = ("busy", "alloc", "subproc", "pipe", "sigalrm")


@needs_root
@pytest.mark.skipif(not PYTHONS, reason="no CPython 3.12+ available")
@pytest.mark.parametrize("python", [p for _, p in PYTHONS], ids=[n for n, _ in PYTHONS])
@pytest.mark.parametrize("mode", BLOCKING_MODES + PROGRESS_MODES)
def test_activate_deactivate(target_factory, python, mode):
    t = target_factory(python, mode)
    started = time.monotonic()
    if mode == "sigalrm":
        t.wait_for(lambda: len(t.find("main sigalrm")) >= 4, 5, "signal reports")
    t.wait_for(lambda: t.last_tick() >= 3, 5, "worker ticks")
    before_main = len(t.find("main"))
    _activate_deactivate(t)

    if mode in BLOCKING_MODES:
        # The first blocking call was under way during both injections: it
        # must complete normally, and not a moment early.
        first = t.wait_for(lambda: t.find("main"), BLOCK + 5, "main thread report")[0]
        elapsed = float(first[-1])
        assert elapsed >= BLOCK - 0.002, first
        if mode == "event":
            assert first[2] == "False"
        elif mode == "select":
            assert first[2] == "0"
        elif mode == "read":
            assert first[2] == "x"
        assert time.monotonic() - started >= BLOCK - 0.5
    else:
        # The main thread keeps going after the agent is gone.
        n = len(t.find("main"))
        t.wait_for(lambda: len(t.find("main")) >= n + 2, 10, "main thread progress")
        assert len(t.find("main")) > before_main
    if mode == "sigalrm":
        reports = t.find("main sigalrm")
        count, elapsed = int(reports[-1][2]), float(reports[-1][3])
        # 1 kHz for `elapsed` seconds; itimer overruns coalesce under load,
        # but a swallowed stream of signals would show as a large shortfall.
        assert count >= 0.5 * elapsed * 1000, (count, elapsed)
        # Counting never stalled across the injections.
        counts = [int(r[2]) for r in reports]
        assert counts == sorted(counts) and counts[-1] > counts[0]
    assert t.proc.poll() is None
    assert_released(t.pid)
    assert t.stderr() == ""


@needs_root
@pytest.mark.skipif(not PYTHONS, reason="no CPython 3.12+ available")
@pytest.mark.parametrize("python", [p for _, p in PYTHONS], ids=[n for n, _ in PYTHONS])
def test_detect(target_factory, python):
    t = target_factory(python, "sleep")
    target = detect(t.pid)
    out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2]);"
                          "import sysconfig; print(sysconfig.get_config_var('Py_ENABLE_SHARED'))"],
                         stdout=subprocess.PIPE, text=True, check=True).stdout.split()
    assert "%d.%d" % target.version == out[0]
    assert target.shared == (out[1] == "1")
    assert set(target.symbols) == {"PyGILState_Ensure", "PyRun_SimpleString", "PyGILState_Release"}
    assert_released(t.pid)


@needs_root
@pytest.mark.skipif(not PYTHONS, reason="no CPython 3.12+ available")
@pytest.mark.parametrize("python", [p for _, p in PYTHONS], ids=[n for n, _ in PYTHONS])
def test_gil_never_released_times_out(target_factory, python):
    """A thread holding the GIL in C forever: give up after `timeout`, restore, detach."""
    t = target_factory(python, "gilhog")
    time.sleep(0.3)
    start = time.monotonic()
    with pytest.raises(InjectionError) as info:
        activate(t.pid, timeout=1.0)
    took = time.monotonic() - start
    assert info.value.reason == "timeout"
    assert str(info.value).startswith("pid=%d reason=timeout" % t.pid)
    assert took < 4.0
    assert_released(t.pid)
    time.sleep(0.2)
    assert t.proc.poll() is None
    assert_released(t.pid)
    assert t.stderr() == ""


@needs_root
@pytest.mark.skipif(not PYTHONS, reason="no CPython 3.12+ available")
def test_repeated_activation_is_idempotent(target_factory):
    t = target_factory(PYTHONS[0][1], "busy")
    t.wait_for(lambda: t.last_tick() >= 3, 5, "worker ticks")
    for _ in range(5):
        activate(t.pid)
        activate(t.pid)
        deactivate(t.pid)
    assert_released(t.pid)
    n = len(t.find("main"))
    t.wait_for(lambda: len(t.find("main")) >= n + 2, 10, "main thread progress")
    assert t.stderr() == ""


# ------------------------------------------------------------------ refusals

def _spawn(argv: List[str]) -> subprocess.Popen:
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    return p


@pytest.mark.skipif(not os.access(OLD_PYTHON, os.X_OK), reason="no %s" % OLD_PYTHON)
def test_python_too_old():
    p = _spawn([OLD_PYTHON, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(InjectionSkip) as info:
            activate(p.pid)
        assert info.value.reason == "python_too_old"
        assert str(info.value).startswith("pid=%d reason=python_too_old" % p.pid)
        assert tracer_pid(p.pid) == 0
    finally:
        p.kill()
        p.wait()


def test_native_program_is_not_python():
    p = _spawn(["sleep", "30"])
    try:
        with pytest.raises(InjectionSkip) as info:
            activate(p.pid)
        assert info.value.reason == "not_python"
        assert tracer_pid(p.pid) == 0
    finally:
        p.kill()
        p.wait()


def test_process_gone():
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(InjectionSkip) as info:
        deactivate(p.pid)
    assert info.value.reason == "process_gone"


@needs_root
@pytest.mark.skipif(not PYTHONS, reason="no CPython 3.12+ available")
@pytest.mark.skipif(not os.access(OLD_PYTHON, os.X_OK), reason="no %s" % OLD_PYTHON)
def test_unprivileged_agent_gets_ptrace_eperm(target_factory):
    t = target_factory(PYTHONS[0][1], "sleep")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from perfagent.python import activate, InjectionSkip\n"
            "try:\n    activate(%d)\nexcept InjectionSkip as e:\n    print(e.reason); print(e)\n"
            % (REPO, t.pid))

    def drop():
        os.setgid(65534)
        os.setuid(65534)
    # The agent runs as nobody (with an interpreter nobody may execute).
    out = subprocess.run([OLD_PYTHON, "-c", code], stdout=subprocess.PIPE, text=True,
                         preexec_fn=drop, timeout=30)
    lines = out.stdout.splitlines()
    assert lines and lines[0] == "ptrace_eperm", out
    assert "CAP_SYS_PTRACE" in lines[1]
    assert_released(t.pid)


@needs_root
@pytest.mark.skipif(not PYTHONS, reason="no CPython 3.12+ available")
def test_deactivate_turns_off_x_perf(tmp_path):
    """A target started with -X perf: deactivate stops new perf-map entries."""
    python = PYTHONS[0][1]
    t = Target(python, "sleep", str(tmp_path), xopts=["-X", "perf"])
    try:
        t.wait_for(lambda: [e for e in t.py_entries() if "fresh_" in e], 5, "-X perf entries")
        deactivate(t.pid)
        assert_released(t.pid)
        time.sleep(0.3)
        settled = len(t.py_entries())
        tick = t.last_tick()
        t.wait_for(lambda: t.last_tick() >= tick + 10, 5, "worker progress")
        assert len(t.py_entries()) == settled
        assert t.stderr() == ""
    finally:
        t.close()


@needs_root
def test_deleted_libpython_is_read_through_map_files(tmp_path):
    """The mapped file is gone from disk: detection falls back to map_files."""
    shared = [p for n, p in PYTHONS if "shared" in n or n.startswith("pyenv")]
    if not shared:
        pytest.skip("no shared-libpython interpreter")
    python = shared[0]
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('LDLIBRARY'));"
                          "print(sysconfig.get_config_var('LIBDIR'))"],
                         stdout=subprocess.PIPE, text=True, check=True).stdout.split()
    libdir = tmp_path / "lib"
    libdir.mkdir()
    soname = [f for f in os.listdir(out[1]) if f.startswith(out[0]) and f != out[0]] or [out[0]]
    import shutil
    for name in set(soname + [out[0]]):
        shutil.copy(os.path.join(out[1], name), str(libdir / name))
    env = dict(os.environ, LD_LIBRARY_PATH=str(libdir))
    t = Target(python, "sleep", str(tmp_path), env=env)
    try:
        with open("/proc/%d/maps" % t.pid) as f:
            assert str(libdir) in f.read()
        shutil.rmtree(str(libdir))
        target = detect(t.pid)
        assert target.opened_as.startswith("/proc/%d/map_files/" % t.pid)
        _activate_deactivate(t)
        assert t.stderr() == ""
    finally:
        t.close()


@needs_root
@pytest.mark.skipif(not PYTHONS, reason="no CPython 3.12+ available")
def test_target_traced_by_someone_else(target_factory):
    t = target_factory(PYTHONS[0][1], "sleep")
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; sys.path.insert(0, %r)\n"
                               "from perfagent.ptrace import TracedThread\n"
                               "TracedThread(%d).seize(); print('seized', flush=True); time.sleep(30)"
                               % (REPO, t.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "seized"
        with pytest.raises(InjectionSkip) as info:
            activate(t.pid)
        assert info.value.reason == "ptrace_eperm"
        assert "already traced by pid %d" % holder.pid in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert_released(t.pid)


@needs_root
@pytest.mark.skipif(not PYTHONS, reason="no CPython 3.12+ available")
def test_stopped_process_is_left_stopped(target_factory):
    t = target_factory(PYTHONS[0][1], "busy")
    t.wait_for(lambda: t.last_tick() >= 3, 5, "worker ticks")
    os.kill(t.pid, signal.SIGSTOP)
    try:
        t.wait_for(lambda: all(s == "T" for s in thread_states(t.pid).values()), 5, "stopped state")
        with pytest.raises(InjectionSkip) as info:
            activate(t.pid)
        assert info.value.reason == "process_stopped"
        assert tracer_pid(t.pid) == 0
        # Detaching re-traps the thread into the group-stop.
        t.wait_for(lambda: all(s == "T" for s in thread_states(t.pid).values()), 2,
                   "stopped again after detach: %r" % thread_states(t.pid))
    finally:
        os.kill(t.pid, signal.SIGCONT)
    t.wait_for(lambda: not any(s in "tT" for s in thread_states(t.pid).values()), 5, "running again")
    tick = t.last_tick()
    t.wait_for(lambda: t.last_tick() >= tick + 5, 5, "worker progress")
    assert t.stderr() == ""


# -------------------------------------------------------- safe and sound
# Regression tests of the injection's safety (issue 11): calls never cut
# short, a return path that survives the agent, signals with their
# siginfo, detach that cannot complete, errors as skip reasons, safe points.

import ctypes  # noqa: E402
import shutil  # noqa: E402

from perfagent.ptrace.thread import thread_states as _states  # noqa: E402
from perfagent.python import inject  # noqa: E402

FIRST = PYTHONS[0][1] if PYTHONS else None
needs_python = pytest.mark.skipif(not PYTHONS, reason="no CPython 3.12+ available")


@pytest.fixture(scope="module")
def c_libs(programs_dir):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    from conftest import PROGRAMS, compile_c
    out = {}
    for name in ("sigrec", "vforker"):
        out[name] = compile_c(os.path.join(PROGRAMS, name + ".c"),
                              os.path.join(programs_dir, "lib%s.so" % name), ["-O2", "-shared", "-fPIC"])
    return out


@pytest.fixture
def hook():
    """Set perfagent.python.inject.TEST_HOOK for one test."""
    def set_hook(fn):
        inject.TEST_HOOK = fn
    yield set_hook
    inject.TEST_HOOK = None


def start_target(tmp_path, python: str, *argv: str) -> Target:
    return Target(python, argv[0], str(tmp_path), xopts=()) if len(argv) == 1 else \
        _TargetArgs(python, list(argv), str(tmp_path))


class _TargetArgs(Target):
    """A py_target.py with a mode argument (a library path)."""

    def __init__(self, python: str, argv: List[str], tmpdir: str) -> None:
        self.err_path = os.path.join(tmpdir, "stderr-%s.txt" % argv[0])
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([python, TARGET, *argv], stdout=subprocess.PIPE,
                                     stderr=self.err, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(lambda: self.find("ready"), 10, "ready")


def _main_sleep_completes(t: Target, since: float) -> None:
    """The main thread's current time.sleep(BLOCK) ends normally, not early."""
    first = t.wait_for(lambda: t.find("main sleep", since), BLOCK + 8, "main thread report")[0]
    assert float(first[-1]) >= BLOCK - 0.002, first


@needs_root
@needs_python
def test_call_waiting_for_the_gil_runs_to_completion(tmp_path):
    """Item 1: a thread holds the GIL for 1.5 s, longer than the 1 s timeout,
    while PyGILState_Ensure waits for it.  The call is not abandoned: it
    completes once the GIL is free and the trampoline is on."""
    t = start_target(tmp_path, FIRST, "gilwait")
    try:
        t.wait_for(lambda: t.last_tick() >= 2, 10, "worker ticks")
        n = len(t.find("hold start"))
        t.wait_for(lambda: len(t.find("hold start")) > n, 5, "a GIL hold starting")
        since = time.monotonic()
        # A 1.5 s hold is in progress: longer than the 1 s timeout, which
        # used to abandon PyGILState_Ensure; the call now waits it out.
        holds = [line for _, line in t.lines if line.startswith("hold ")]
        assert holds[-1] == "hold start", holds[-3:]
        activate(t.pid, timeout=1.0, call_timeout=10.0)
        t.wait_for(lambda: t.find("hold end", since), 5, "the hold ending")
        assert_released(t.pid)
        t.wait_for(lambda: [e for e in t.py_entries() if "fresh_" in e], 5, "py:: entries")
        deactivate(t.pid, timeout=1.0, call_timeout=10.0)
        assert_released(t.pid)
        _main_sleep_completes(t, since)
        assert t.proc.poll() is None and t.stderr() == ""
    finally:
        t.close()


@needs_root
@needs_python
def test_call_left_waiting_finishes_alone_without_the_statement(tmp_path):
    """Item 1: the agent stops watching a call still waiting for the GIL
    (call_timeout): it reports timeout, sets the slot's cancel word and lets
    the thread go; the call finishes by itself once the GIL is free,
    without running the statement, the thread returns to its sleep (not cut
    short), no GIL waiter is left behind (a new injection works), and the
    stub stays mapped only until then."""
    t = start_target(tmp_path, FIRST, "gilwait")
    try:
        t.wait_for(lambda: t.last_tick() >= 2, 10, "worker ticks")
        n = len(t.find("hold start"))
        t.wait_for(lambda: len(t.find("hold start")) > n, 5, "a GIL hold starting")
        since = time.monotonic()
        with pytest.raises(InjectionError) as info:
            activate(t.pid, timeout=1.0, call_timeout=0.3)
        assert info.value.reason == "timeout" and not info.value.may_have_run
        assert "without running the statement" in str(info.value)
        assert_released(t.pid)
        m = len(t.find("hold end"))
        t.wait_for(lambda: len(t.find("hold end")) > m, 5, "the hold ending")
        time.sleep(0.5)
        assert t.py_entries() == [], "the cancelled statement ran"
        _main_sleep_completes(t, since)
        activate(t.pid, timeout=1.0, call_timeout=10.0)
        t.wait_for(lambda: [e for e in t.py_entries() if "fresh_" in e], 5, "py:: entries")
        deactivate(t.pid, timeout=1.0, call_timeout=10.0)
        assert_released(t.pid)
        assert t.proc.poll() is None and t.stderr() == ""
    finally:
        t.close()


@needs_root
@needs_python
def test_thread_that_never_stops_is_never_left_traced(tmp_path, c_libs):
    """Item 2: the main thread sits in a vfork wait (killable sleep) that
    PTRACE_INTERRUPT cannot end: no safe point (timeout), and no detach is
    possible; the tracing thread ends instead, so the kernel detaches it and
    cancels the interrupt.  When the child exits the thread runs on, never
    stopped, untraced."""
    t = start_target(tmp_path, FIRST, "vfork", c_libs["vforker"], "6000")
    try:
        t.wait_for(lambda: t.find("main vfork start"), 5, "a vfork round")
        time.sleep(0.3)
        assert _states(t.pid)[t.pid] == "D"
        with pytest.raises(InjectionError) as info:
            activate(t.pid, timeout=1.0)
        assert info.value.reason == "timeout"
        assert "did not stop to be detached" in str(info.value)
        assert "ended the tracing thread" in str(info.value)
        assert tracer_pid(t.pid) == 0
        t.wait_for(lambda: t.find("main vfork 1"), 10, "the thread running on after the vfork")
        assert_released(t.pid)
        assert _states(t.pid)[t.pid] in "DSR"
        assert_released(t.pid)
        assert t.stderr() == ""
    finally:
        t.close()


AGENT = r"""
import sys, time
sys.path.insert(0, %(repo)r)
from perfagent.python import inject
point = sys.argv[2]
def hook(name):
    if name == point:
        print("paused", name, flush=True)
        time.sleep(600)
inject.TEST_HOOK = hook
inject.activate(int(sys.argv[1]), timeout=5.0)
print("not paused", flush=True)
time.sleep(600)
"""

DIRECT_KILL_POINTS = ("safe_point", "held", "syscall_set", "syscall_exit", "stub_set", "in_call", "marker",
                      "release_stop", "restored", "released")
PENDING_KILL_POINTS = ("held", "stub_set", "marker", "restored", "pending_wait")


def _kill_agent_at(tmp_path, t: Target, point: str) -> None:
    script = tmp_path / "agent.py"
    script.write_text(AGENT % {"repo": REPO})
    agent = subprocess.Popen([sys.executable, str(script), str(t.pid), point], stdout=subprocess.PIPE,
                             text=True)
    try:
        line = agent.stdout.readline().strip()
        assert line == "paused " + point, line
    finally:
        agent.kill()
        agent.wait()
    deadline = time.monotonic() + 5
    while tracer_pid(t.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


@needs_root
@needs_python
@pytest.mark.parametrize("point", DIRECT_KILL_POINTS)
def test_agent_killed_during_direct_call(tmp_path, point):
    """Item 3: SIGKILL the agent at each step of a call into a sleeping main
    thread: the thread finishes the call alone (the statement runs if the
    stub had been reached) and returns to its sleep, which ends normally."""
    t = start_target(tmp_path, FIRST, "sleep")
    try:
        t.wait_for(lambda: t.last_tick() >= 3, 5, "worker ticks")
        since = time.monotonic()
        _kill_agent_at(tmp_path, t, point)
        assert_released(t.pid)
        if point in ("stub_set", "in_call", "marker", "release_stop", "restored", "released"):
            t.wait_for(lambda: [e for e in t.py_entries() if "fresh_" in e], 5, "py:: entries")
        _main_sleep_completes(t, since)
        tick = t.last_tick()
        t.wait_for(lambda: t.last_tick() >= tick + 10, 5, "worker progress")
        assert t.proc.poll() is None and t.stderr() == ""
        status = open("/proc/%d/task/%d/status" % (t.pid, t.pid)).read()
        assert "SigBlk:\t0000000000000000" in status
        activate(t.pid)   # and the next agent finds it as it was
        deactivate(t.pid)
        assert_released(t.pid)
    finally:
        t.close()


@needs_root
@needs_python
def test_agent_killed_while_the_call_waits_for_the_gil(tmp_path):
    """Item 3 with item 1: the agent dies while PyGILState_Ensure waits for a
    GIL another thread holds; once it is free the thread runs the statement,
    releases the GIL and returns to its sleep by itself."""
    t = start_target(tmp_path, FIRST, "gilwait")
    try:
        t.wait_for(lambda: t.last_tick() >= 2, 10, "worker ticks")
        n = len(t.find("hold start"))
        t.wait_for(lambda: len(t.find("hold start")) > n, 5, "a GIL hold starting")
        since = time.monotonic()
        _kill_agent_at(tmp_path, t, "in_call")
        assert_released(t.pid)
        t.wait_for(lambda: [e for e in t.py_entries() if "fresh_" in e], 8, "py:: entries")
        _main_sleep_completes(t, since)
        m = len(t.find("hold end"))
        t.wait_for(lambda: len(t.find("hold end")) >= m + 2, 10, "GIL holds going on")
        assert t.proc.poll() is None and t.stderr() == ""
    finally:
        t.close()


@needs_root
@needs_python
@pytest.mark.parametrize("point", PENDING_KILL_POINTS)
def test_agent_killed_during_pending_call(tmp_path, point):
    """Item 3, the pending path: a main thread spinning in Python."""
    t = start_target(tmp_path, FIRST, "spin")
    try:
        t.wait_for(lambda: len(t.find("main spin")) >= 1, 10, "main spinning")
        _kill_agent_at(tmp_path, t, point)
        assert_released(t.pid)
        if point != "held":
            t.wait_for(lambda: [e for e in t.py_entries() if "fresh_" in e], 5, "py:: entries")
        n = len(t.find("main spin"))
        t.wait_for(lambda: len(t.find("main spin")) >= n + 2, 10, "main progress")
        assert t.proc.poll() is None and t.stderr() == ""
    finally:
        t.close()


def _sigqueue(pid: int, sig: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sigqueue.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    if libc.sigqueue(pid, sig, value) != 0:
        raise OSError(ctypes.get_errno(), "sigqueue")


@needs_root
@needs_python
def test_signals_during_injection_keep_their_siginfo(tmp_path, c_libs, hook):
    """Item 4: signals sigqueue'd (with a value) and kill()ed at the target
    while our call runs reach its SA_SIGINFO handler afterwards, exactly
    once each, with the sender's pid, si_code and value."""
    t = start_target(tmp_path, FIRST, "sigrec", c_libs["sigrec"])
    try:
        t.wait_for(lambda: t.find("installed"), 5, "handlers installed")
        time.sleep(0.2)
        rt = int(signal.SIGRTMIN) + 1
        seen = []

        def send(point):
            if point == "marker" and not seen:
                seen.append(point)
                _sigqueue(t.pid, rt, 4242)
                _sigqueue(t.pid, rt, 4343)
                os.kill(t.pid, signal.SIGUSR1)
                time.sleep(0.1)
                seen.append(list(t.find("siginfo")))
        hook(send)
        activate(t.pid)
        assert seen and seen[1] == [], "a handler ran during the call"
        got = t.wait_for(lambda: len(t.find("siginfo")) >= 3 and t.find("siginfo"), 5, "the signals")
        time.sleep(0.3)
        got = sorted(tuple(x[1:6]) for x in t.find("siginfo"))
        me = str(os.getpid())
        main = str(t.pid)
        assert got == sorted([(str(rt), me, "-1", "4242", main), (str(rt), me, "-1", "4343", main),
                              (str(int(signal.SIGUSR1)), me, "0", "0", main)])
        deactivate(t.pid)
        assert_released(t.pid)
        assert t.proc.poll() is None and t.stderr() == ""
    finally:
        t.close()


@needs_root
@needs_python
def test_error_in_one_process_is_one_skip_reason(tmp_path, hook, capsys):
    """Item 5: an OSError inside one process's injection (and a target that
    dies mid-injection) are logged as pid=N reason=... in -a mode; the other
    targets are activated, no traceback."""
    from perfagent.python.injection import PythonInjection
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    bad = start_target(tmp_path / "a", FIRST, "sleep")
    gone = start_target(tmp_path / "b", FIRST, "sleep")
    good = start_target(tmp_path / "c", FIRST, "sleep")
    try:
        def fail(point):
            me = threading.current_thread().name
            if point == "safe_point" and me.endswith("-%d" % bad.pid):
                raise OSError(5, "Input/output error (test)")
            if point == "safe_point" and me.endswith("-%d" % gone.pid):
                gone.proc.kill()
                gone.proc.wait()
        hook(fail)
        lines = []
        inj = PythonInjection(strict=False, log=lines.append)
        inj.activate([bad.pid, gone.pid, good.pid])
        err = "\n".join(lines) + capsys.readouterr().err
        assert "pid=%d reason=ptrace_failed: OSError: [Errno 5] Input/output error (test)" % bad.pid in err
        assert "Traceback" not in err
        assert inj.active == [good.pid]
        assert "activated 1 process; skipped process_gone=1 ptrace_failed=1" in err
        hook(None)
        good.wait_for(lambda: [e for e in good.py_entries() if "fresh_" in e], 5, "py:: entries")
        inj.deactivate()
        assert_released(bad.pid)
        assert_released(good.pid)
        assert bad.stderr() == "" and good.stderr() == ""
    finally:
        bad.close()
        gone.close()
        good.close()


@needs_root
@needs_python
@pytest.mark.parametrize("python", [p for _, p in PYTHONS], ids=[n for n, _ in PYTHONS])
@pytest.mark.parametrize("mode", ["spin", "cspin"])
def test_spinning_main_thread_is_reached_between_bytecodes(tmp_path, hook, python, mode):
    """Item 6: a main thread spinning in pure Python (no system calls) or in
    C (sum over a range) is never called into at the instruction where it was
    interrupted: the pending-call path queues the statement, which CPython's
    eval breaker runs between two bytecodes."""
    t = start_target(tmp_path, python, mode)
    try:
        t.wait_for(lambda: t.find("main " + mode), 20, "main thread running")
        points = []
        hook(points.append)
        session = inject.open_session(t.pid)
        activate(t.pid, timeout=5.0, call_timeout=30.0, session=session)
        page = session.page
        t.wait_for(lambda: [e for e in t.py_entries() if "fresh_" in e], 5, "py:: entries")
        deactivate(t.pid, timeout=5.0, call_timeout=30.0, session=session)
        # Both through the eval breaker (a direct call is possible only if
        # the thread was caught in the rare write of its progress report).
        assert points.count("pending_queued") + points.count("direct_call") == 2, points
        assert points.count("pending_queued") >= 1, points
        assert session.finish(timeout=5.0) and session.page is None
        assert "%x-" % page not in open("/proc/%d/maps" % t.pid).read()
        assert_released(t.pid)
        n = len(t.find("main " + mode))
        t.wait_for(lambda: len(t.find("main " + mode)) >= n + 2, 20, "main thread progress")
        assert t.stderr() == ""
    finally:
        t.close()


# ------------------------------------------------------------- PEP 768
# Debian's python3.14 / python3.15 (stripped, static) in the Debian sid root,
# run in their own pid and mount namespaces (tests/containers.py): the
# script goes into the container's own /tmp, the perf map is written under
# the namespace pid.

def _containers():
    try:
        import containers
    except ImportError:
        return None
    return containers if containers.root_built() else None


CONTAINERS = _containers()
needs_debian_root = pytest.mark.skipif(CONTAINERS is None, reason="no Debian root (tools/build_debian_root.sh)")
VERSIONS_314 = CONTAINERS.VERSIONS if CONTAINERS is not None else ("3.14", "3.15")


class _InContainer:
    """py_target.py run in the Debian root; lines like Target's."""

    def __init__(self, version: str, mode: str, xopts=(), env=None) -> None:
        python = CONTAINERS.debian_python(version)
        self.c = CONTAINERS.run_in_container([python, *xopts, "{workdir}/py_target.py", mode], copy=[TARGET],
                                             env=env)
        self.pid = self.c.host_pid
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 20
        while not any(l.startswith("ready") for _, l in self.lines):
            assert time.monotonic() < deadline, "no ready line"
            time.sleep(0.02)

    def _read(self) -> None:
        while True:
            line = self.c.readline()
            if not line:
                return
            self.lines.append((time.monotonic(), line.strip()))

    def count(self, prefix: str) -> int:
        return sum(1 for _, l in list(self.lines) if l.startswith(prefix))

    def perf_map(self) -> List[str]:
        try:
            with open("/proc/%d/root/tmp/perf-%d.map" % (self.pid, self.c.ns_pid)) as f:
                return [l for l in f if " py::" in l and "fresh_" in l]
        except FileNotFoundError:
            return []

    def tmp_files(self) -> List[str]:
        return sorted(os.listdir("/proc/%d/root/tmp" % self.pid))

    def wait(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(0.02)
        raise AssertionError("%s: not within %.0fs; stderr %r" % (what, timeout, self.c.stderr_text()))

    def close(self) -> None:
        self.c.close()


@needs_root
@needs_debian_root
@pytest.mark.parametrize("version", VERSIONS_314)
@pytest.mark.parametrize("mode", ["spin", "busy"])
def test_pep768_runs_the_statement_without_ptrace(hook, version, mode):
    """Item 7: on 3.14+ a running main thread gets the statement through its
    own remote-debugger fields (found with _Py_DebugOffsets): no ptrace at
    all, the script placed in the container's /tmp as the target's user and
    gone afterwards, the perf map written under the namespace pid."""
    t = _InContainer(version, mode)
    try:
        t.wait(lambda: t.count("main " + mode) or t.count("tick"), 10, "running")
        points = []
        hook(points.append)
        activate(t.pid, timeout=5.0)
        assert points == ["pep768_submitted", "pep768_taken", "pep768_done"], points
        t.wait(t.perf_map, 5, "py:: entries")
        del points[:]
        deactivate(t.pid, timeout=5.0)
        assert points == ["pep768_submitted", "pep768_taken", "pep768_done"], points
        assert [f for f in t.tmp_files() if f.startswith("perfagent-")] == []
        assert tracer_pid(t.pid) == 0
        time.sleep(0.3)
        settled = len(t.perf_map())
        n = t.count("tick")
        t.wait(lambda: t.count("tick") >= n + 10, 5, "worker progress")
        assert len(t.perf_map()) == settled, "perf map still growing after deactivation"
        assert t.c.stderr_text() == ""
    finally:
        t.close()


@needs_root
@needs_debian_root
@pytest.mark.parametrize("version", VERSIONS_314)
@pytest.mark.parametrize("how", ["xoption", "env"])
def test_pep768_disabled_falls_back_to_ptrace(hook, version, how):
    """Item 7: with remote debugging disabled (-X disable-remote-debug or
    PYTHON_DISABLE_REMOTE_DEBUG) nothing is written to the target's fields
    or /tmp, and the ptrace path does the work."""
    xopts = ("-X", "disable-remote-debug") if how == "xoption" else ()
    env = {"PYTHON_DISABLE_REMOTE_DEBUG": "1"} if how == "env" else None
    t = _InContainer(version, "spin", xopts=xopts, env=env)
    try:
        t.wait(lambda: t.count("main spin"), 10, "running")
        points = []
        hook(points.append)
        activate(t.pid, timeout=5.0)
        assert points[0] == "pep768_unavailable" and "pending_queued" in points, points
        t.wait(t.perf_map, 5, "py:: entries")
        deactivate(t.pid, timeout=5.0)
        assert [f for f in t.tmp_files() if f.startswith("perfagent-")] == []
        assert tracer_pid(t.pid) == 0
        assert t.c.stderr_text() == ""
    finally:
        t.close()


@needs_root
@needs_debian_root
@pytest.mark.parametrize("version", VERSIONS_314)
def test_pep768_blocked_main_thread_falls_back_to_ptrace(hook, version):
    """A main thread asleep in a system call does not reach the eval breaker:
    the script is withdrawn (removed, the request cleared) and ptrace's
    direct call runs the statement; the sleep is not cut short."""
    t = _InContainer(version, "sleep")
    try:
        t.wait(lambda: t.count("tick") >= 3, 10, "ticks")
        since = time.monotonic()
        points = []
        hook(points.append)
        activate(t.pid, timeout=5.0)
        assert points[:2] == ["pep768_submitted", "pep768_fallback"] and "direct_call" in points, points
        t.wait(t.perf_map, 5, "py:: entries")
        deactivate(t.pid, timeout=5.0)
        assert [f for f in t.tmp_files() if f.startswith("perfagent-")] == []
        first = t.wait(lambda: [l for w, l in t.lines if w >= since and l.startswith("main sleep")], BLOCK + 8,
                       "main sleep report")[0]
        assert float(first.split()[-1]) >= BLOCK - 0.002, first
        assert tracer_pid(t.pid) == 0
        assert t.c.stderr_text() == ""
    finally:
        t.close()


@needs_root
def test_pep768_script_placement_is_safe(tmp_path):
    """The one file the agent puts in a target's root: exclusive, owned by
    the target's user, never through a symlink, never in a directory another
    user could tamper with (perfagent.target.files.create_in_root)."""
    import errno
    from perfagent.target import files
    p = subprocess.Popen(["sleep", "30"])
    try:
        base = tmp_path / "place"
        base.mkdir()
        os.chmod(str(base), 0o1777)
        d = str(base)
        path = files.create_in_root(p.pid, d, "s.py", b"print(1)\n", 65534, 65534)
        assert path == d + "/s.py"
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)
        assert open(path, "rb").read() == b"print(1)\n"
        with pytest.raises(FileExistsError):
            files.create_in_root(p.pid, d, "s.py", b"x", 65534, 65534)
        assert files.exists_in_root(p.pid, d, "s.py", 65534)
        assert files.remove_in_root(p.pid, d, "s.py", 65534)
        assert not files.remove_in_root(p.pid, d, "s.py", 65534)
        # A symlink on the way (it could lead out of a container's root).
        os.symlink(d, str(tmp_path / "link"))
        with pytest.raises(OSError) as info:
            files.create_in_root(p.pid, str(tmp_path / "link"), "s.py", b"x", 65534, 65534)
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
        # Writable by others without the sticky bit, or owned by a third user.
        os.chmod(d, 0o777)
        with pytest.raises(PermissionError):
            files.create_in_root(p.pid, d, "s.py", b"x", 65534, 65534)
        os.chmod(d, 0o1777)
        os.chown(d, 1234, 1234)
        with pytest.raises(PermissionError):
            files.create_in_root(p.pid, d, "s.py", b"x", 65534, 65534)
        assert os.listdir(d) == []
    finally:
        p.kill()
        p.wait()
