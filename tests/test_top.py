"""``perf-agent top``: the live view, driven as a user drives it.

The agent runs in a pseudo-terminal (the ``pty`` module) that is its
controlling terminal, so keys, Ctrl-C and Ctrl-Z reach it as they do from a
real one; the test reads the screen it draws.  What must hold:

* the target's hot function (``spin`` of a CPython, ``leaf`` of a native
  program) is on screen within 3 s of the first frame (sampling runs);
* the screen is redrawn; ``t`` and ``s`` sort by total and self time (the
  rows shown are in that order), ``n`` by name;
* ``q`` and Ctrl-C quit with status 0, and the terminal's modes are the
  ones it had before (termios.tcgetattr before and after); Ctrl-Z gives
  the terminal back while stopped;
* on a pipe: plain tables, no escape sequences, exit at --duration;
* ``--profile-output`` writes a pprof holding the hot function; without it
  nothing is written in the working directory;
* errors are one line: no such pid (1), a bad flag (2).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import List, Optional

import pytest

from conftest import PROGRAMS, agent_env, sample_stacks
from perfagent.pprof.decode import read_profile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")

PY_WALK = os.path.join(PROGRAMS, "py_walk.py")
PY_TOP = os.path.join(PROGRAMS, "py_top.py")
ROWS, COLUMNS = 40, 160
HOME = "\x1b[H"
ROW = re.compile(r"^\s*([\d.]+)%\s+([\d.]+)%\s+([\d.]+)s\s+([\d.]+)s  (.+?)\s*$")
SHOW_WITHIN = 3.0      # seconds from the first frame to the hot function on screen


def marks(path: str) -> dict:
    """'# @name' comments of a source file -> line number."""
    with open(path) as f:
        return {m.group(1): n for n, line in enumerate(f, 1) for m in [re.search(r"# @([\w-]+)", line)] if m}


MARKS = marks(PY_WALK)


class Screen:
    """One frame the agent drew."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = [line.replace("\x1b[K", "").replace("\x1b[J", "") for line in text.split("\r\n")]
        # (self %, total %, self s, total s, name) of each row
        self.rows = [(float(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4)), m.group(5))
                     for m in (ROW.match(line) for line in self.lines) if m]

    @property
    def sorted_by(self) -> str:
        for line in self.lines:
            m = re.match(r"Sorted by (self time|total time|name)", line)
            if m:
                return m.group(1)
        return ""

    @property
    def samples(self) -> int:
        m = re.search(r"window \d+s: (\d+) samples", self.text)
        return int(m.group(1)) if m else 0

    def names(self) -> List[str]:
        return [row[4] for row in self.rows]


# What a shell does for a foreground job: the command in its own process
# group, the terminal's foreground group, its parent in the same session (so
# Ctrl-Z stops it: the kernel ignores terminal stops of orphaned groups).
JOB_CONTROL = r"""
import os, signal, sys
report, argv = int(sys.argv[1]), sys.argv[2:]
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    os.tcsetpgrp(0, os.getpgrp())
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    os.execv(argv[0], argv)
try:
    os.setpgid(pid, pid)
    os.tcsetpgrp(0, pid)
except OSError:
    pass
os.write(report, b"%d\n" % pid)
os.close(report)
while True:
    _, status = os.waitpid(pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        break
os.tcsetpgrp(0, os.getpgrp())
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


class PtyTop:
    """``perf-agent top ARGS`` with a pseudo-terminal as its controlling terminal."""

    def __init__(self, args, cwd: str) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.modes_before = termios.tcgetattr(self.slave)
        self.buffer = bytearray()
        self.lock = threading.Lock()
        self.closed = threading.Event()
        pid_r, pid_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", JOB_CONTROL, str(pid_w), sys.executable, "-m", "perfagent", "top", *args],
            cwd=cwd, env=agent_env(), stdin=self.slave, stdout=self.slave, stderr=self.slave,
            start_new_session=True, pass_fds=(pid_w,),
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(pid_w)
        with os.fdopen(pid_r) as f:
            self.pid = int(f.readline())              # the agent (the shell's job)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while not self.closed.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            with self.lock:
                self.buffer += data

    def output(self) -> str:
        with self.lock:
            return self.buffer.decode("utf-8", "replace")

    def screens(self) -> List[Screen]:
        return [Screen(part) for part in self.output().split(HOME)[1:]]

    def wait_screen(self, predicate, timeout: float, after: int = 0) -> Optional[Screen]:
        """The first frame (from index ``after``) satisfying ``predicate``."""
        end = time.monotonic() + timeout
        while True:
            for screen in self.screens()[after:]:
                if predicate(screen):
                    return screen
            if time.monotonic() >= end or self.proc.poll() is not None:
                return None
            time.sleep(0.05)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            time.sleep(0.1)
            self.closed.set()
            self.reader.join(2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.closed.set()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def py_target():
    target = subprocess.Popen([sys.executable, PY_WALK, "120"], stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline().startswith("ready")
        yield target.pid
    finally:
        target.kill()
        target.wait()


@pytest.fixture
def native_target(chain_bin):
    target = subprocess.Popen([chain_bin, "120"], stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline().startswith("ready")
        yield target.pid
    finally:
        target.kill()
        target.wait()


def first_frame(top: PtyTop) -> Screen:
    screen = top.wait_screen(lambda s: "perf-agent top: pid" in s.text, 60)
    assert screen is not None, top.output()
    return screen


def check_sorted(screen: Screen, column: int) -> None:
    values = [row[column] for row in screen.rows]
    assert values == sorted(values, reverse=True), screen.text


def drive(top: PtyTop, hot: str, first_by_total: str = "", enough: int = 0) -> None:
    """The hot function shows; frames are redrawn; t/n/s sort as they say
    (every row in that column's order); ``first_by_total`` ranks above
    ``hot`` by total, in nearly every sample (and ``hot`` leads by self
    time) once the window has ``enough`` samples."""
    first_frame(top)
    shown_at = time.monotonic()
    screen = top.wait_screen(lambda s: hot in s.names(), SHOW_WITHIN)
    assert screen is not None, "%s not on screen within %.0f s:\n%s" % (hot, SHOW_WITHIN, top.output()[-3000:])
    assert time.monotonic() - shown_at <= SHOW_WITHIN + 0.5
    assert screen.sorted_by == "self time"
    check_sorted(screen, 0)
    count = len(top.screens())
    again = top.wait_screen(lambda s: hot in s.names() and s.samples >= enough, 10, after=count)
    assert again is not None, "no second frame"
    assert again.names()[0] == hot, again.text    # by self time
    top.type(b"t")
    by_total = top.wait_screen(lambda s: s.sorted_by == "total time" and s.rows, 5)
    assert by_total is not None, top.output()[-3000:]
    check_sorted(by_total, 1)
    assert by_total.rows[0][1] >= 99.0             # in every sample
    if first_by_total:
        # Above the hot function, in (nearly) every sample: <module> and the
        # interpreter's frames tie with it or lead by the odd sample taken
        # in <module>'s own loop, so its rank among them is not fixed.
        names = by_total.names()
        assert names.index(first_by_total) < names.index(hot), by_total.text
        assert by_total.rows[names.index(first_by_total)][1] >= 99.0, by_total.text
    top.type(b"n")
    by_name = top.wait_screen(lambda s: s.sorted_by == "name" and s.rows, 5)
    assert by_name is not None
    assert by_name.names() == sorted(by_name.names())
    top.type(b"s")
    by_self = top.wait_screen(lambda s: s.sorted_by == "self time" and s.rows, 5,
                              after=len(top.screens()) - 1)
    assert by_self is not None
    check_sorted(by_self, 0)
    assert by_self.names()[0] == hot


def quit_and_check(top: PtyTop, keys: bytes) -> None:
    top.type(keys)
    status = top.wait(10)
    out = top.output()
    assert status == 0, out[-2000:]
    assert termios.tcgetattr(top.slave) == top.modes_before
    assert out.rstrip().endswith("\x1b[?1049l") or "\x1b[?1049l" in out[-200:]   # the normal screen back
    assert "Traceback" not in out


def test_python_target(tmp_path, py_target):
    top = PtyTop(["--pid", str(py_target)], str(tmp_path))
    try:
        drive(top, "spin")
        quit_and_check(top, b"q")
    finally:
        top.close()
    assert os.listdir(str(tmp_path)) == []             # nothing written


def test_native_target_and_ctrl_c(tmp_path, native_target):
    top = PtyTop(["--pid", str(native_target)], str(tmp_path))
    try:
        drive(top, "leaf")
        quit_and_check(top, b"\x03")
    finally:
        top.close()
    assert os.listdir(str(tmp_path)) == []


def test_order_changes(tmp_path):
    """outer() burns 40% itself and calls inner() for 60%: by self time
    inner leads, by total time outer."""
    target = subprocess.Popen([sys.executable, PY_TOP, "120"], stdout=subprocess.PIPE, text=True)
    top = None
    try:
        assert target.stdout.readline().startswith("ready")
        top = PtyTop(["--pid", str(target.pid), "--sample-rate", "499"], str(tmp_path))
        # 500 samples: 60% against 40% is then 4.6 standard deviations apart
        drive(top, "inner", first_by_total="outer", enough=500)
        quit_and_check(top, b"q")
    finally:
        if top is not None:
            top.close()
        target.kill()
        target.wait()


def test_lines(tmp_path, py_target):
    """--lines: Python rows are qualname (file:line), at the lines py_walk marks."""
    top = PtyTop(["--pid", str(py_target), "--lines"], str(tmp_path))
    try:
        first_frame(top)
        screen = top.wait_screen(lambda s: any(n.startswith("spin (") for n in s.names()), SHOW_WITHIN + 2)
        assert screen is not None, top.output()[-3000:]
        spin_lines = {int(m.group(1)) for m in (re.match(r"spin \(%s:(\d+)\)$" % re.escape(PY_WALK), n)
                                                for n in screen.names()) if m}
        assert spin_lines and spin_lines <= {MARKS["spin-start"], MARKS["spin-loop"], MARKS["spin-body"], MARKS["spin-return"],
                                             MARKS["spin-def"], MARKS["spin-init"]}   # (see test_python_walk)
        assert "main (%s:%d)" % (PY_WALK, MARKS["main"]) in screen.names(), screen.text
        quit_and_check(top, b"q")
    finally:
        top.close()


def test_suspend_gives_the_terminal_back(tmp_path, py_target):
    top = PtyTop(["--pid", str(py_target)], str(tmp_path))
    try:
        first_frame(top)
        top.type(b"\x1a")                                   # Ctrl-Z
        for _ in range(100):
            if _state(top.pid) == "T":
                break
            time.sleep(0.05)
        assert _state(top.pid) == "T"                       # stopped, as by a shell's job control
        assert termios.tcgetattr(top.slave) == top.modes_before
        count = len(top.screens())
        os.kill(top.pid, signal.SIGCONT)
        assert top.wait_screen(lambda s: "perf-agent top" in s.text, 5, after=count) is not None
        assert termios.tcgetattr(top.slave)[3] & termios.ICANON == 0   # cbreak again
        quit_and_check(top, b"q")
    finally:
        top.close()


def test_sigterm_restores_the_terminal(tmp_path, py_target):
    top = PtyTop(["--pid", str(py_target)], str(tmp_path))
    try:
        first_frame(top)
        os.kill(top.pid, signal.SIGTERM)
        assert top.wait(10) == 0
        assert termios.tcgetattr(top.slave) == top.modes_before
    finally:
        top.close()


def run_top(args, cwd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perfagent", "top", *args], cwd=cwd, env=agent_env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)


def tables(text: str) -> List[List[str]]:
    """The plain tables of the output, each from its title line on."""
    out: List[List[str]] = []
    for line in text.split("\n"):
        if line.startswith("perf-agent top: "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def test_plain_mode_on_a_pipe(tmp_path, py_target):
    start = time.monotonic()
    r = run_top(["--pid", str(py_target), "--duration", "3", "--rows", "5"], str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - start < 30
    assert "\x1b" not in r.stdout and "\r" not in r.stdout
    found = tables(r.stdout)
    assert len(found) >= 2, r.stdout
    assert len(found) <= 4, r.stdout                 # one per second of 3 s, plus the last bit
    for table in found:
        rows = [ROW.match(line) for line in table]
        rows = [m for m in rows if m]
        assert len(rows) == 5, table
        assert rows[0].group(5) == "spin"
        assert table[2] == "Sorted by self time"
    assert os.listdir(str(tmp_path)) == []
    assert r.stderr == ""


def test_profile_output(tmp_path, native_target):
    out = tmp_path / "top.pb.gz"
    r = run_top(["--pid", str(native_target), "--duration", "2", "--profile-output", str(out)], str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert os.listdir(str(tmp_path)) == ["top.pb.gz"]
    prof = read_profile(str(out))
    stacks = sample_stacks(prof)
    total = sum(values[0] for _, _, values in stacks)
    with_leaf = sum(values[0] for names, _, values in stacks if "leaf" in names)
    assert total >= 50
    assert with_leaf >= 0.9 * total
    m = re.search(r"wrote %s: (\d+) samples" % re.escape(str(out)), r.stderr)
    assert m and int(m.group(1)) == total, r.stderr


def test_errors(tmp_path):
    r = run_top(["--pid", "4194000"], str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["perf-agent: error: --pid 4194000: no such process"]
    for args, message in ((["--pid", "1", "--window", "0"], "--window"),
                          (["--pid", "x"], "--pid: not a process id"),
                          (["--pid", "1", "--bogus"], "unrecognized arguments: --bogus"),
                          ([], "nothing to watch"),
                          (["-a", "--rows", "0"], "--rows")):
        r = run_top(args, str(tmp_path))
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("perf-agent: error: ") and message in lines[0], r.stderr
    assert os.listdir(str(tmp_path)) == []


def test_target_exit_leaves_the_last_table(tmp_path):
    """The process exits: the view ends by itself (status 0), its last
    table stays on the normal screen with the reason."""
    target = subprocess.Popen([sys.executable, PY_WALK, "4"], stdout=subprocess.PIPE, text=True)
    top = None
    try:
        assert target.stdout.readline().startswith("ready")
        top = PtyTop(["--pid", str(target.pid)], str(tmp_path))
        assert top.wait_screen(lambda s: "spin" in s.names(), 30) is not None, top.output()[-3000:]
        assert top.wait(30) == 0
        assert termios.tcgetattr(top.slave) == top.modes_before
        after = top.output().rsplit("\x1b[?1049l", 1)[1]
        assert "\x1b" not in after
        lines = after.replace("\r\n", "\n").split("\n")
        assert any(ROW.match(line) and line.endswith("  spin") for line in lines), after
        assert "perf-agent: process %d exited" % target.pid in lines, after
    finally:
        if top is not None:
            top.close()
        target.kill()
        target.wait()


def test_all_processes_plain(tmp_path, native_target):
    r = run_top(["-a", "--duration", "3", "--rows", "400", "--native"], str(tmp_path))
    assert r.returncode == 0, r.stderr
    found = tables(r.stdout)
    assert len(found) >= 2, r.stdout[:3000]
    assert found[-1][0].startswith("perf-agent top: all processes")
    assert found[-1][1] == "View: native (every frame as recorded)"
    rows = [ROW.match(line) for line in found[-1]]
    leaf = [m for m in rows if m and m.group(5) == "leaf"]
    assert leaf and float(leaf[0].group(1)) > 0, found[-1]       # the native program's self time
    assert os.listdir(str(tmp_path)) == []


NOBODY = 65534


def _as_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_permission_error_is_one_line(tmp_path, native_target):
    python = "/usr/bin/python3.11"
    if not os.path.exists(python):
        pytest.skip("no system python readable by an unprivileged user")
    os.chmod(str(tmp_path), 0o777)
    r = subprocess.run([python, "-m", "perfagent", "top", "--pid", str(native_target)], cwd=str(tmp_path),
                       env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                       preexec_fn=_as_nobody)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "perf-agent: error: --pid %d: permission denied reading /proc/%d/maps; run as root or grant "
        "CAP_SYS_PTRACE (and CAP_PERFMON)" % (native_target, native_target)]
    assert r.stdout == ""


def test_hangup_stops_the_view(tmp_path, py_target):
    """The terminal goes away (ssh dropped): SIGHUP ends the agent, nothing stays behind."""
    top = PtyTop(["--pid", str(py_target)], str(tmp_path))
    try:
        first_frame(top)
        agent = top.pid
        top.closed.set()
        top.reader.join(2)
        os.close(top.master)
        os.close(top.slave)
        top.master = top.slave = -1
        for _ in range(200):
            if not os.path.exists("/proc/%d" % agent) or _state(agent) == "Z":
                break
            time.sleep(0.05)
        assert not os.path.exists("/proc/%d" % agent) or _state(agent) == "Z"
        assert _state(py_target) in ("R", "S")            # the target runs on
    finally:
        if top.proc.poll() is None:
            top.proc.kill()
        top.proc.wait()


def _state(pid: int) -> str:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_window_keeps_the_last_intervals():
    from perfagent.top.window import SlidingWindow
    window = SlidingWindow(10.0, 1.0)
    for second in range(12):   # stack (second % 3,) gets second+1 samples of 1 ms each
        window.push(float(second), second + 1.0, {(second % 3,): [second + 1, (second + 1) * 10 ** 6]})
    kept = range(2, 12)        # the last 10 one-second buckets
    assert window.span == 10.0
    assert window.samples == sum(s + 1 for s in kept)
    assert window.nanoseconds == window.samples * 10 ** 6
    assert window.counts == {(k,): [sum(s + 1 for s in kept if s % 3 == k),
                                    sum(s + 1 for s in kept if s % 3 == k) * 10 ** 6] for k in range(3)}
    for second in range(12, 30):
        window.push(float(second), second + 1.0, {})
    assert window.counts == {} and window.samples == 0 and window.nanoseconds == 0


@pytest.mark.parametrize("lines", [False, True])
def test_live_totals_equal_the_reports(py_target, lines):
    """The live view's names and numbers are report's on the written profile:
    every increment of a capture through LiveNames and a window that keeps
    everything gives exactly the function totals `perf-agent report`
    computes from the profile the capture writes (Python first and native)."""
    from perfagent.pprof.decode import decode_profile
    from perfagent.report.stacks import choose_sample_index, load_stacks, python_first
    from perfagent.report.top import function_totals
    from perfagent.session import Capture, CaptureOptions
    from perfagent.top.window import LiveNames, SlidingWindow, bucket_of, window_view
    cap = Capture(CaptureOptions(pid=py_target, sample_rate=199))
    cap.state.take_increments()
    cap.start()
    names = LiveNames(cap.state, cap.symbolizer, lines=lines)
    window = SlidingWindow(3600.0, 1.0)
    try:
        for second in range(3):
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                cap.poll()
            window.push(float(second), second + 1.0, bucket_of(cap.state.take_increments(), names))
            names.new_generation()
    finally:
        cap.stop()
    window.push(3.0, 4.0, bucket_of(cap.state.take_increments(), names))   # the last drain
    profile = decode_profile(cap.build().encode())
    cap.close()
    assert window.samples == cap.samples >= 100
    stacks = load_stacks(profile, choose_sample_index(profile, None), lines=lines)
    for native in (False, True):
        live = window_view(window, names, native)
        expected = function_totals(stacks if native else python_first(stacks))
        assert sorted(live.rows) == sorted(expected)
        assert live.python_first == (not native)
        assert any(row.name.startswith("spin") and row.flat > 0 for row in live.rows)
