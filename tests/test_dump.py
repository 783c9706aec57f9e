"""``perf-agent dump`` through the command line, against real processes.

* A deadlocked two-thread Python program (tests/programs/py_deadlock.py) on
  every CPython here: pyenv 3.8-3.13, the project's 3.13 shared and static
  builds, Debian's stripped static 3.14 and 3.15 in a container (own pid and
  mount namespaces, docker-style cgroup).  Both lock waiters are shown at
  their acquire line, nobody holds the GIL; with ``--native`` the native
  frames sit under the Python ones (the lock and futex wait in libc down to
  the thread start), the Python frames keep their order and replace the
  eval loop.  The same program with a spinning main thread: it holds the GIL.
* A -O2 C program without frame pointers blocked in read() on pipes from two
  threads: native frames down to main / the thread start routine, kernel
  frames (pipe_read) as root.
* After every dump the target is as it was: TracerPid 0 in every thread,
  every thread in the state it had, and it still answers on stdin.  Signals
  sent while a thread is held stopped (PERFAGENT_DUMP_HOLD_MS widens the
  window), or while it is traced but not yet stopped (PERFAGENT_DUMP_SEIZE_MS:
  the signal-delivery-stop path), are handled exactly once; a SIGSTOP sent
  meanwhile leaves the whole process stopped, as it asked, and SIGCONT
  resumes it.  A SIGSTOPped process and a thread traced by someone else are
  dumped without ptrace, with the reason.
* ``--json`` validates against the documented schema and carries the same
  frames as the text.
* Errors: no such pid, a kernel thread (kernel frames only), another user's
  process: one line, the right exit status.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import pytest

from conftest import PROGRAMS, REPO, agent_env, compile_c, run_agent
from pythons import require_python, test_pythons

import containers

from perfagent.dump.command import frame_text
from perfagent.dump.model import JSON_SCHEMA, Frame

DEADLOCK = os.path.join(PROGRAMS, "py_deadlock.py")
PIPE_READERS = os.path.join(PROGRAMS, "pipe_readers.c")
VFORK_WAIT = os.path.join(PROGRAMS, "vfork_wait.c")
SPIN_CALLS = os.path.join(PROGRAMS, "spin_calls.c")
PYENV = "/root/.pyenv/versions"
#: Bound on waiting for a target's line (not a measurement).
LINE_TIMEOUT = 30.0
ROOT = os.geteuid() == 0

needs_root = pytest.mark.skipif(not ROOT, reason="dumping other processes' native stacks needs root here")


# ------------------------------------------------------------------ interpreters

def _pyenv(minor: int) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(PYENV, "3.%d.*" % minor, "bin", "python3.%d" % minor)))
    return found[-1] if found else None


def _interpreters() -> List[Tuple[str, Optional[str], Tuple[int, int]]]:
    out = [("pyenv-3.%d" % m, _pyenv(m), (3, m)) for m in range(8, 14)]
    built = test_pythons()
    out += [("project-3.13-%s" % k, built.get(k), (3, 13)) for k in ("shared", "static")]
    out += [("debian-%s-container" % v, "container:" + v, (3, int(v.split(".")[1])))
            for v in containers.VERSIONS]
    return out


INTERPRETERS = _interpreters()


# ------------------------------------------------------------------ targets

class Target:
    """A target process whose stdout lines are collected by a thread; stdin is a pipe."""

    def __init__(self, argv: List[str], container: Optional[str] = None, files=None) -> None:
        self.container = None
        if container is not None:
            self.container = containers.run_in_container(argv, files=files, stdin=subprocess.PIPE)
            self.popen = self.container.popen
            self.pid = self.container.host_pid
        else:
            self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True)
            self.pid = self.popen.pid
        self.lines: List[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.popen.stdout:
            with self._cv:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cv.notify_all()

    def wait_line(self, text: str, timeout: float = LINE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while text not in self.lines:
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None:
                    raise AssertionError("target %d: no line %r; got %r; stderr %s"
                                         % (self.pid, text, self.lines[-10:], self._stderr()))
                self._cv.wait(min(left, 0.2))

    def _stderr(self) -> str:
        if self.container is not None:
            return self.container.stderr_text()[-2000:]
        return "(see the test output)"

    def send(self, text: str) -> None:
        self.popen.stdin.write(text.encode())
        self.popen.stdin.flush()

    def count(self, text: str) -> int:
        with self._cv:
            return self.lines.count(text)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()


def start_deadlock(spec: str, mode: str = "") -> Tuple[Target, str]:
    """The deadlock program under interpreter ``spec``: (target, script path as it sees it)."""
    args = [mode] if mode else []
    if spec.startswith("container:"):
        containers.debian_root()  # skips (or fails, when required) without the root
        with open(DEADLOCK) as f:
            source = f.read()
        t = Target([containers.debian_python(spec.split(":", 1)[1]), "{workdir}/py_deadlock.py"] + args,
                   container=spec, files={"py_deadlock.py": source})
        script = t.container.workdir + "/py_deadlock.py"
    else:
        t = Target([spec, DEADLOCK] + args)
        script = DEADLOCK
    try:
        t.wait_line("ready")
    except BaseException:
        t.close()
        raise
    return t, script


@pytest.fixture
def targets():
    started: List[Target] = []
    yield started
    for t in started:
        t.close()


@pytest.fixture(scope="module")
def pipe_readers(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("dump") / "pipe_readers")
    return compile_c(PIPE_READERS, out, ["-O2", "-fomit-frame-pointer", "-pthread", "-Wall"])


@pytest.fixture(scope="module")
def vfork_wait(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("dump") / "vfork_wait")
    return compile_c(VFORK_WAIT, out, ["-O2", "-fomit-frame-pointer", "-pthread", "-Wall"])


@pytest.fixture(scope="module")
def spin_calls(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("dump") / "spin_calls")
    return compile_c(SPIN_CALLS, out, ["-O2", "-fomit-frame-pointer", "-Wall"])


# ------------------------------------------------------------------ ground truth from /proc

def task_states(pid: int) -> Dict[int, str]:
    out = {}
    for path in glob.glob("/proc/%d/task/*/stat" % pid):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        out[int(path.split("/")[4])] = text[text.rindex(")") + 2]
    return out


def tracer_pids(pid: int) -> Dict[int, int]:
    out = {}
    for path in glob.glob("/proc/%d/task/*/status" % pid):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("TracerPid:"):
                        out[int(path.split("/")[4])] = int(line.split()[1])
        except OSError:
            continue
    return out


def settled(pid: int, count: int) -> Dict[int, str]:
    """The thread states once all ``count`` threads are asleep (just started, one may still run)."""
    def asleep():
        states = task_states(pid)
        return states if len(states) == count and set(states.values()) == {"S"} else None
    return _wait_for(asleep, "%d sleeping threads" % count)


def marks(path: str) -> Dict[str, int]:
    out = {}
    with open(path) as f:
        for n, text in enumerate(f, 1):
            m = re.search(r"# @([\w-]+)\s*$", text)
            if m:
                out[m.group(1)] = n
    return out


def assert_unchanged(t: Target, before: Dict[int, str], probe: str) -> None:
    """Untraced, every thread in its state, and the target still answers."""
    assert set(tracer_pids(t.pid).values()) == {0}
    now = task_states(t.pid)
    assert now == before, (before, now)
    t.send(probe + "\n")
    t.wait_line("echo " + probe)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    nr = 234  # x86-64 tgkill
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(nr, tgid, tid, sig) == 0, os.strerror(ctypes.get_errno())


# ------------------------------------------------------------------ running the agent

def dump(pid: int, *args: str) -> subprocess.CompletedProcess:
    return run_agent(["dump", "--pid", str(pid), *args], cwd=REPO)


def dump_json(pid: int, *args: str) -> dict:
    r = dump(pid, "--json", *args)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    validate(doc, JSON_SCHEMA)
    return doc


def parse_text(out: str) -> Dict[Optional[int], List[Tuple[str, str]]]:
    """{tid: [(kind, frame text)]} of the text view."""
    threads: Dict[Optional[int], List[Tuple[str, str]]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"Thread (\d+)", line)
        if m:
            current = threads.setdefault(int(m.group(1)), [])
            continue
        m = re.match(r"    (python|native|kernel)  (.*)$", line)
        if m and current is not None:
            current.append((m.group(1), m.group(2)))
    return threads


def json_frames(doc: dict) -> Dict[Optional[int], List[Tuple[str, str]]]:
    return {t["tid"]: [(f["kind"], frame_text(Frame(**f))) for f in t["frames"]] for t in doc["threads"]}


def validate(value, schema, path: str = "$") -> None:
    """The JSON Schema keywords the documented schema uses, checked strictly."""
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        ok = {"object": isinstance(value, dict), "array": isinstance(value, list),
              "string": isinstance(value, str), "boolean": isinstance(value, bool),
              "integer": isinstance(value, int) and not isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool),
              "null": value is None}
        assert any(ok[n] for n in names), "%s: %r is not %s" % (path, value, names)
    if "const" in schema:
        assert value == schema["const"], path
    if "enum" in schema:
        assert value in schema["enum"], "%s: %r not in %r" % (path, value, schema["enum"])
    if "minimum" in schema and isinstance(value, (int, float)):
        assert value >= schema["minimum"], path
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, "%s: missing %s" % (path, key)
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), "%s: unexpected %s" % (path, set(value) - set(props))
        for key, sub in props.items():
            if key in value:
                validate(value[key], sub, path + "." + key)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], "%s[%d]" % (path, i))


# ------------------------------------------------------------------ checks of one dump

def by_first_python(doc: dict) -> Dict[str, dict]:
    """{name of the innermost Python frame: thread} of a dump."""
    out = {}
    for t in doc["threads"]:
        py = [f for f in t["frames"] if f["kind"] == "python"]
        if py:
            out[py[0]["name"]] = t
    return out


def python_names(t: dict) -> List[str]:
    return [f["name"] for f in t["frames"] if f["kind"] == "python"]


def check_python_view(doc: dict, script: str, version: Tuple[int, int], spin: bool = False,
                      state: str = "sleeping") -> None:
    m = marks(DEADLOCK)
    threads = by_first_python(doc)
    run = "Thread.run" if version >= (3, 11) else "run"
    for name, mark in (("one", "one-wait"), ("two", "two-wait")):
        t = threads[name]
        py = [f for f in t["frames"] if f["kind"] == "python"]
        assert python_names(t)[:2] == [name, run], python_names(t)
        assert (py[0]["file"], py[0]["line"]) == (script, m[mark])
        assert py[1]["file"].endswith("threading.py")
        assert t["holds_gil"] is False
        assert t["state"] == state
    main = threads["spin" if spin else "echo"]
    assert main["tid"] == doc["process"]["pid"]
    py = [f for f in main["frames"] if f["kind"] == "python"]
    if spin:
        assert [(f["name"], f["line"]) for f in py] == [("spin", m["spin-loop"]), ("main", m["spin-call"]),
                                                        ("<module>", m["module-call"])]
    else:
        assert [(f["name"], f["line"]) for f in py] == [("echo", m["echo-read"]), ("main", m["main-call"]),
                                                        ("<module>", m["module-call"])]
        assert main["holds_gil"] is False
    assert all(f["file"] == script for f in py)
    assert doc["process"]["python"]["version"].startswith("%d.%d" % version)


def check_native_view(doc: dict, version: Tuple[int, int]) -> None:
    """Native frames under the Python ones, in the right places."""
    threads = by_first_python(doc)
    for name in ("one", "two"):
        t = threads[name]
        kinds = [f["kind"] for f in t["frames"]]
        first_py = kinds.index("python")
        inner = t["frames"][:first_py]
        # Kernel frames first (root), the futex wait among them; then user frames.
        kernel = [f for f in inner if f["kind"] == "kernel"]
        assert kernel and any("futex" in f["name"] for f in kernel), inner
        assert kinds[:len(kernel)] == ["kernel"] * len(kernel)
        native = inner[len(kernel):]
        assert native and all(f["kind"] == "native" for f in native), inner
        # The wait is in libc, reached from the interpreter's lock code.
        assert os.path.basename(native[0]["module"]).startswith("libc"), native[0]
        names = [f["name"] or "" for f in native]
        interp_names = {"PyThread_acquire_lock_timed", "_PySemaphore_Wait", "_PyMutex_LockTimed",
                        "lock_PyThread_acquire_lock", "acquire_timed"}
        assert interp_names & set(names), names
        # Python frames keep their order; the eval loop is replaced by them.
        assert python_names(t)[0] == name
        assert "_PyEval_EvalFrameDefault" not in [f["name"] for f in t["frames"]], t["frames"]
        # Below the outermost Python frame: the thread's start, in libc.
        last_py = len(kinds) - 1 - kinds[::-1].index("python")
        outer = t["frames"][last_py + 1:]
        assert outer and all(f["kind"] == "native" for f in outer)
        assert os.path.basename(outer[-1]["module"]).startswith("libc"), outer[-1]
        assert t["stop_us"] is not None and t["stop_us"] > 0
        assert t["notes"] == [], t["notes"]
    assert doc["timing"]["threads_stopped"] == len(doc["threads"])


def text_equals_json(text: str, doc: dict) -> None:
    assert parse_text(text) == json_frames(doc)


# ------------------------------------------------------------------ Python deadlock

@needs_root
@pytest.mark.parametrize("label,spec,version", INTERPRETERS, ids=[i[0] for i in INTERPRETERS])
def test_python_deadlock(targets, label, spec, version):
    if spec is None and label.startswith("project-"):
        require_python(label.rsplit("-", 1)[1])  # skips, or fails under PERFAGENT_REQUIRE_PYTHONS=1
    if spec is None:
        pytest.skip("%s is not on this machine" % label)
    t, script = start_deadlock(spec)
    targets.append(t)
    before = settled(t.pid, 3)

    # Python view (the default): nothing is stopped.
    doc = dump_json(t.pid)
    check_python_view(doc, script, version)
    assert doc["native"] is False and doc["timing"]["threads_stopped"] == 0
    assert all(th["stop_us"] is None for th in doc["threads"])
    text = dump(t.pid)
    assert text.returncode == 0 and "GIL not held" in text.stdout
    text_equals_json(text.stdout, doc)
    assert_unchanged(t, before, "one")

    # Merged view: every thread stopped once, briefly.
    doc = dump_json(t.pid, "--native")
    check_python_view(doc, script, version)
    check_native_view(doc, version)
    if not label.startswith("debian"):  # the host's libc has its debug symbols
        for name in ("one", "two"):
            th = by_first_python(doc)[name]
            assert any("futex" in (f["name"] or "") for f in th["frames"] if f["kind"] == "native")
            assert [f["name"] for f in th["frames"]][-2:] == ["start_thread", "clone3"]
    assert_unchanged(t, before, "two")
    text = dump(t.pid, "--native")
    assert text.returncode == 0, text.stderr
    text_equals_json(text.stdout, doc)
    assert re.search(r"2 stopped one at a time|3 stopped one at a time", text.stderr), text.stderr
    assert_unchanged(t, before, "three")


@needs_root
@pytest.mark.parametrize("label,spec,version", [i for i in INTERPRETERS if i[2] in ((3, 8), (3, 11), (3, 14))],
                         ids=[i[0] for i in INTERPRETERS if i[2] in ((3, 8), (3, 11), (3, 14))])
def test_python_spinning_main_holds_the_gil(targets, label, spec, version):
    if spec is None:
        pytest.skip("%s is not on this machine" % label)
    t, script = start_deadlock(spec, "spin")
    targets.append(t)
    # The GIL is read in one snapshot: the spinning thread holds it nearly
    # always, but may be between two hold periods; a few reads settle it.
    for _ in range(5):
        doc = dump_json(t.pid)
        holders = [th["tid"] for th in doc["threads"] if th["holds_gil"]]
        if holders:
            break
    assert holders == [t.pid]
    check_python_view(doc, script, version, spin=True)
    doc = dump_json(t.pid, "--native")
    main = next(th for th in doc["threads"] if th["tid"] == t.pid)
    assert python_names(main) == ["spin", "main", "<module>"]
    kinds = [f["kind"] for f in main["frames"]]
    assert "native" in kinds[kinds.index("python"):], main  # the interpreter's start below
    assert set(tracer_pids(t.pid).values()) == {0}
    assert not any(s in "tT" for s in task_states(t.pid).values())
    t.send("spun\n")
    t.wait_line("echo spun")


# ------------------------------------------------------------------ native program

@needs_root
def test_native_program_blocked_in_read(targets, pipe_readers):
    t = Target([pipe_readers])
    targets.append(t)
    t.wait_line("ready")
    before = settled(t.pid, 2)
    doc = dump_json(t.pid)
    assert doc["native"] is True and doc["process"]["python"] is None
    assert len(doc["threads"]) == 2
    main, worker = doc["threads"]
    assert main["tid"] == t.pid
    for th, chain in ((main, ["read_line", "main_loop", "main", "__libc_start_call_main", "__libc_start_main",
                              "_start"]),
                      (worker, ["read_line", "worker_loop", "worker_start", "start_thread", "clone3"])):
        kernel = [f["name"] for f in th["frames"] if f["kind"] == "kernel"]
        assert any("pipe_read" in k for k in kernel), kernel
        native = [f for f in th["frames"] if f["kind"] == "native"]
        assert native[0]["name"] in ("read", "__libc_read", "__read"), native[0]
        names = [re.sub(r"\.(constprop|isra|part)\.\d+$", "", f["name"] or "?") for f in native[1:]]
        assert names == chain, names
        assert th["holds_gil"] is None and th["stop_us"] > 0 and th["notes"] == []
    text = dump(t.pid)
    assert text.returncode == 0
    text_equals_json(text.stdout, doc)
    assert set(tracer_pids(t.pid).values()) == {0} and task_states(t.pid) == before
    t.send("hello\n")
    t.wait_line("main hello")
    t.wait_line("worker hello")


@needs_root
def test_uninterruptible_thread_is_not_stopped(targets, vfork_wait):
    t = Target([vfork_wait])
    targets.append(t)
    t.wait_line("ready")
    def main_d():
        states = task_states(t.pid)
        return states if len(states) == 2 and sorted(states.values()) == ["D", "S"] else None
    before = _wait_for(main_d, "main thread in D, worker asleep")
    assert before[t.pid] == "D"
    doc = dump_json(t.pid)
    main, worker = doc["threads"]
    assert main["state"] == "uninterruptible" and main["stop_us"] is None
    assert any(n.startswith("not stopped: it is in an uninterruptible sleep") for n in main["notes"]), main["notes"]
    assert "__do_sys_vfork" in [f["name"] for f in main["frames"] if f["kind"] == "kernel"]
    # Its innermost native frame still comes from the saved pc: the vfork wrapper.
    assert [f["name"] for f in main["frames"] if f["kind"] == "native"][:1] in (["vfork"], ["__vfork"])
    assert worker["stop_us"] is not None
    assert [f["name"] for f in worker["frames"] if f["kind"] == "native"][1:] == [
        "worker_start", "start_thread", "clone3"]
    assert task_states(t.pid) == before and set(tracer_pids(t.pid).values()) == {0}
    t.send("still\n")
    t.wait_line("worker still")
    with open("/proc/%d/task/%d/children" % (t.pid, t.pid)) as f:
        child = int(f.read().split()[0])
    os.kill(child, signal.SIGKILL)
    t.wait_line("child gone")


def _after_pop_rbp(binary: str) -> int:
    """Link-time address of the instruction after step()'s ``pop %rbp`` (objdump)."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], stdout=subprocess.PIPE,
                         text=True, check=True).stdout
    body = out.split("<step>:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    addrs = [int(line.split(":")[0], 16) for line in body]
    i = next(i for i, line in enumerate(body) if re.search(r"\bpop\s+%rbp", line))
    return addrs[i + 1]


@needs_root
def test_leaf_past_its_epilogue_pops_unwinds_whole(targets, spin_calls):
    """A thread stopped after step()'s ``pop %rbp``: the rows still say rbp is
    saved, at a slot now below sp; the register holds the caller's value,
    which spin_loop's rbp-based CFA needs.  The state is made from a real
    snapshot taken in mix() (step's callee): pop step's saved rbx and rbp off
    that stack into the registers, as its epilogue does."""
    import struct
    from perfagent.dump.native import NativeUnwinder
    from perfagent.ptrace import snapshot as snap
    from perfagent.symbolize.procmaps import read_maps
    t = Target([spin_calls])
    targets.append(t)
    t.wait_line("ready")
    maps = read_maps(t.pid)
    text = next(m for m in maps if m.is_exec and m.path.endswith("/spin_calls"))
    bias = text.start - text.pgoff  # gcc's PIE output: the text segment's p_vaddr is its p_offset
    unwinder = NativeUnwinder(t.pid, maps)
    for _ in range(200):
        s = snap.snapshot(t.pid, t.pid, 4096)
        u = unwinder.unwind(s.regs, s.stack, 4096)
        if [f.name for f in u.frames[:2]] == ["mix", "step"]:
            break
    else:
        pytest.fail("never stopped in mix()")
    assert u.ending is None and [f.name for f in u.frames][2:4] == ["spin_loop", "main"]
    bx, bp, sp, pc, r12, r13, r14, r15 = s.regs
    # mix's frame is its return address; step's frame holds rbx, rbp, r12 (pushed
    # in reverse), then its return address.  Pop rbx and rbp as the epilogue does.
    saved_rbx, saved_rbp = struct.unpack_from("<QQ", s.stack, 8)
    state = (saved_rbx, saved_rbp, sp + 24, _after_pop_rbp(spin_calls) + bias, r12, r13, r14, r15)
    epilogue = unwinder.unwind(state, s.stack[24:], 4096)
    assert epilogue.ending is None, [f.name for f in epilogue.frames]
    assert [f.name for f in epilogue.frames] == [f.name for f in u.frames][1:]
    assert epilogue.ips[1:] == u.ips[2:]


# ------------------------------------------------------------------ signals and stops

def _first_host_python() -> Tuple[str, Tuple[int, int]]:
    for label, spec, version in INTERPRETERS:
        if spec is not None and not spec.startswith("container:") and version >= (3, 11):
            return spec, version
    pytest.skip("no CPython 3.11+ on this machine")
    raise AssertionError


def _wait_for(cond, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.002)
    raise AssertionError("no %s within %.0f s" % (what, timeout))


def _background_dump(pid: int, env: Dict[str, str]) -> subprocess.Popen:
    full = agent_env()
    full.update(env)
    return subprocess.Popen([sys.executable, "-m", "perfagent", "dump", "--pid", str(pid), "--native"],
                            cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _held_tid(pid: int) -> Optional[int]:
    """A thread in the agent's interrupt stop: state t, traced."""
    tracers = tracer_pids(pid)
    for tid, state in task_states(pid).items():
        if state == "t" and tracers.get(tid):
            return tid
    return None


@needs_root
@pytest.mark.parametrize("kind", ["python", "native"])
def test_signals_sent_while_a_thread_is_held_are_handled_once(targets, pipe_readers, kind):
    if kind == "python":
        spec, _ = _first_host_python()
        t, _ = start_deadlock(spec)
    else:
        t = Target([pipe_readers])
        t.wait_line("ready")
    targets.append(t)
    before = settled(t.pid, len(task_states(t.pid)))
    agent = _background_dump(t.pid, {"PERFAGENT_DUMP_HOLD_MS": "500"})
    held = _wait_for(lambda: _held_tid(t.pid), "held thread")
    os.kill(t.pid, signal.SIGUSR1)          # to the process: another thread takes it
    tgkill(t.pid, held, signal.SIGUSR2)     # to the held thread: pending until it runs
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err
    assert set(tracer_pids(t.pid).values()) == {0} and task_states(t.pid) == before
    t.send("after\n")
    t.wait_line("echo after" if kind == "python" else "worker after")
    t.wait_line("usr1")
    t.wait_line("usr2")
    assert (t.count("usr1"), t.count("usr2")) == (1, 1)
    # The held thread's stop was widened by the hook, and the output still has every thread.
    assert re.search(r"each held at most (\d+\.\d+) ms", err), err


@needs_root
def test_ctrl_c_while_a_thread_is_held_releases_it(targets, pipe_readers):
    t = Target([pipe_readers])
    targets.append(t)
    t.wait_line("ready")
    before = settled(t.pid, 2)
    agent = _background_dump(t.pid, {"PERFAGENT_DUMP_HOLD_MS": "500"})
    _wait_for(lambda: _held_tid(t.pid), "held thread")
    agent.send_signal(signal.SIGINT)
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 130 and err.splitlines()[-1] == "perf-agent: interrupted", err
    assert set(tracer_pids(t.pid).values()) == {0} and task_states(t.pid) == before
    t.send("on\n")
    t.wait_line("main on")
    t.wait_line("worker on")


@needs_root
def test_signal_delivery_stop_before_the_interrupt_is_passed_on_once(targets):
    spec, _ = _first_host_python()
    t, _ = start_deadlock(spec)
    targets.append(t)
    before = settled(t.pid, 3)
    agent = _background_dump(t.pid, {"PERFAGENT_DUMP_SEIZE_MS": "500"})

    def seized_running():
        tracers = tracer_pids(t.pid)
        states = task_states(t.pid)
        return next((tid for tid, tr in tracers.items() if tr and states.get(tid) == "S"), None)
    tid = _wait_for(seized_running, "seized thread")
    tgkill(t.pid, tid, signal.SIGUSR2)   # wakes it into a signal-delivery-stop
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err
    assert set(tracer_pids(t.pid).values()) == {0} and task_states(t.pid) == before
    t.send("x\n")
    t.wait_line("echo x")
    t.wait_line("usr2")
    assert t.count("usr2") == 1 and t.count("usr1") == 0
    # The thread was still dumped, with its native frames.
    assert "native  " in out


@needs_root
def test_sigstop_during_the_dump_leaves_the_process_stopped(targets, pipe_readers):
    t = Target([pipe_readers])
    t.wait_line("ready")
    targets.append(t)
    agent = _background_dump(t.pid, {"PERFAGENT_DUMP_HOLD_MS": "300"})
    _wait_for(lambda: _held_tid(t.pid), "held thread")
    os.kill(t.pid, signal.SIGSTOP)
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err
    # Stopped as SIGSTOP asked, by nobody's ptrace.
    states = _wait_for(lambda: (lambda s: s if set(s.values()) == {"T"} else None)(task_states(t.pid)),
                       "group-stop")
    assert len(states) == 2 and set(tracer_pids(t.pid).values()) == {0}
    os.kill(t.pid, signal.SIGCONT)
    _wait_for(lambda: set(task_states(t.pid).values()) == {"S"}, "resumed threads")
    t.send("cont\n")
    t.wait_line("main cont")
    t.wait_line("worker cont")


@needs_root
def test_stopped_process_is_dumped_without_ptrace(targets):
    spec, version = _first_host_python()
    t, script = start_deadlock(spec)
    targets.append(t)
    os.kill(t.pid, signal.SIGSTOP)
    _wait_for(lambda: set(task_states(t.pid).values()) == {"T"}, "stopped threads")
    doc = dump_json(t.pid, "--native")
    check_python_view(doc, script, version, state="stopped")
    assert doc["timing"]["threads_stopped"] == 0
    for th in doc["threads"]:
        assert th["state"] == "stopped" and th["stop_us"] is None
        assert any("stopped by SIGSTOP" in n for n in th["notes"]), th["notes"]
        assert any(f["kind"] == "kernel" for f in th["frames"])
    # Without ptrace, the saved sp and pc still unwind these blocked threads.
    one = by_first_python(doc)["one"]
    assert any(f["kind"] == "native" and os.path.basename(f["module"] or "").startswith("libc")
               for f in one["frames"])
    assert set(task_states(t.pid).values()) == {"T"} and set(tracer_pids(t.pid).values()) == {0}
    os.kill(t.pid, signal.SIGCONT)
    t.send("resumed\n")
    t.wait_line("echo resumed")


@needs_root
def test_thread_traced_by_someone_else_is_not_touched(targets):
    from perfagent.ptrace import TracedThread
    spec, version = _first_host_python()
    t, script = start_deadlock(spec)
    targets.append(t)
    doc = dump_json(t.pid)
    one_tid = by_first_python(doc)["one"]["tid"]
    debugger = TracedThread(t.pid, one_tid)
    debugger.seize()   # traced (by this test process), still running
    try:
        doc = dump_json(t.pid, "--native")
        check_python_view(doc, script, version)
        one = by_first_python(doc)["one"]
        assert one["stop_us"] is None
        assert any("traced by pid %d" % os.getpid() in n for n in one["notes"]), one["notes"]
        two = by_first_python(doc)["two"]
        assert two["stop_us"] is not None and two["notes"] == []
        assert tracer_pids(t.pid)[one_tid] == os.getpid()
    finally:
        debugger.detach()
    assert set(tracer_pids(t.pid).values()) == {0}
    t.send("free\n")
    t.wait_line("echo free")


# ------------------------------------------------------------------ errors

def test_no_such_pid():
    r = dump(4194303 + 1)  # above PID_MAX_LIMIT: never a process
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == ["perf-agent: error: no process with pid 4194304"]


def test_bad_pid_is_a_usage_error():
    r = run_agent(["dump", "--pid", "12x"], cwd=REPO)
    assert r.returncode == 2 and r.stderr.splitlines() == ["perf-agent: error: --pid: not a process id: '12x'"]


@needs_root
def test_kernel_thread_has_kernel_frames_only():
    doc = dump_json(2)
    assert doc["process"]["kernel_thread"] is True and doc["process"]["name"] == "kthreadd"
    (th,) = doc["threads"]
    assert th["tid"] == 2 and th["frames"]
    assert {f["kind"] for f in th["frames"]} == {"kernel"}
    assert "kthreadd" in [f["name"] for f in th["frames"]]
    assert "kernel thread: no user-space stack" in doc["notes"]


@needs_root
def test_another_users_process_is_refused_in_one_line(tmp_path):
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no system python to run the agent as another user")
    target = subprocess.Popen(["sleep", "60"])
    try:
        def drop() -> None:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        r = subprocess.run([python, "-m", "perfagent", "dump", "--pid", str(target.pid), "--native"],
                           cwd=REPO, env=agent_env(), preexec_fn=drop, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        target.kill()
        target.wait()
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "perf-agent: error: not allowed to read process %d of uid 0: run as root or with CAP_SYS_PTRACE"
        % target.pid]


# ------------------------------------------------------------------ parsers and merging (no process)

def test_kernel_stack_lines_as_the_kernel_prints_them():
    from perfagent.target.procfs import KernelFrame, parse_kernel_stack
    text = ("[<0>] futex_wait_queue+0x60/0x90\n"
            "[<0>] nfs_wait_bit_killable+0x1c/0x80 [nfs]\n"
            "[<ffffffff81234567>] do_syscall_64+0x5d/0x90\n"
            "[<0>] 0xffffffffc0a01234\n"
            "not a frame\n"
            "[<zz>] bad_address+0x1/0x2\n")
    assert parse_kernel_stack(text) == [
        KernelFrame(0, "futex_wait_queue", 0x60, 0x90, ""),
        KernelFrame(0, "nfs_wait_bit_killable", 0x1c, 0x80, "nfs"),
        KernelFrame(0xffffffff81234567, "do_syscall_64", 0x5d, 0x90, ""),
        KernelFrame(0, "0xffffffffc0a01234", 0, 0, ""),
    ]


def test_proc_syscall_lines():
    from perfagent.target.procfs import SyscallRegs, parse_syscall
    assert parse_syscall("running\n") is None
    assert parse_syscall("-1 0x7ffc1234 0x7f0011223344\n") == SyscallRegs(-1, 0x7ffc1234, 0x7f0011223344)
    assert parse_syscall("202 0x5 0x80 0x2 0x0 0x0 0x0 0x7ffd00 0x7f0100\n") == SyscallRegs(202, 0x7ffd00, 0x7f0100)
    assert parse_syscall("x 0x1 0x2") is None and parse_syscall("") is None


def _n(name: str) -> Frame:
    return Frame("native", name)


def _p(name: str) -> Frame:
    return Frame("python", name, "f.py", 1)


def test_runs_replace_their_hosts_in_order():
    from perfagent.dump.merge import merge, place_runs
    native = [_n("read"), _n("_PyEval_EvalFrameDefault"), _n("call"), _n("_PyEval_EvalFrameDefault"), _n("main")]
    runs = [(0x1000, [_p("inner"), _p("middle")]), (0x2000, [_p("outer")])]
    hosts = place_runs(runs, native, {0x1000: 1, 0x2000: 3}.get)
    assert hosts == [1, 3]
    merged, unplaced = merge(native, runs, hosts)
    assert [f.name for f in merged] == ["read", "inner", "middle", "call", "outer", "main"] and unplaced == 0


def test_runs_that_go_inwards_or_have_no_host_keep_their_order():
    from perfagent.dump.merge import merge, place_runs
    native = [_n("read"), _n("a"), _n("b"), _n("c")]
    runs = [(0x1000, [_p("p1")]), (0x2000, [_p("p2")]), (0x3000, [_p("p3")])]
    # p2's host is inside p1's: impossible, so p2 is not placed; p3 has none.
    hosts = place_runs(runs, native, {0x1000: 2, 0x2000: 1}.get)
    assert hosts == [2, None, None]
    merged, unplaced = merge(native, runs, hosts)
    assert [f.name for f in merged] == ["read", "a", "p1", "c", "p2", "p3"] and unplaced == 2
    # An unplaced inner run goes just inside the next placed one.
    hosts = place_runs(runs, native, {0x2000: 2}.get)
    merged, unplaced = merge(native, runs, hosts)
    assert [f.name for f in merged] == ["read", "a", "p1", "p2", "c", "p3"] and unplaced == 2


def test_runs_without_links_follow_the_eval_frames_in_order():
    from perfagent.dump.merge import merge, place_runs
    native = [_n("futex"), _n("_PyEval_EvalFrameDefault"), _n("function_code_fastcall"),
              _n("_PyEval_EvalFrameDefault"), _n("Py_RunMain")]
    runs = [(0, [_p("f")]), (0, [_p("g")]), (0, [_p("h")])]
    hosts = place_runs(runs, native, lambda a: None)
    assert hosts == [1, 3, None]
    merged, unplaced = merge(native, runs, hosts)
    assert [f.name for f in merged] == ["futex", "f", "function_code_fastcall", "g", "Py_RunMain", "h"]
    assert unplaced == 1


def test_json_schema_option_prints_the_documented_schema():
    r = run_agent(["dump", "--json-schema"], cwd=REPO)
    assert r.returncode == 0 and json.loads(r.stdout) == JSON_SCHEMA


def test_text_view_escapes_what_the_target_controls():
    from perfagent.dump.command import render_text
    from perfagent.dump.model import Dump, Process, Thread
    evil = "\x1b]0;owned\x07\x1b[2J"
    d = Dump(Process(10, 10, "x" + evil, "/bin/x", ["x", evil], False, None, None),
             [Thread(10, 10, "t" + evil, "sleeping", "S", None, False,
                     [Frame("python", "f" + evil, "/a" + evil + ".py", 3),
                      Frame("native", evil, module="/lib/" + evil)],
                     [], None, None)],
             True, [], 1.0, None, 0, None)
    out = render_text(d)
    assert "\x1b" not in out and "\x07" not in out
    assert "f\\x1b]0;owned\\x07\\x1b[2J (/a\\x1b]0;owned\\x07\\x1b[2J.py:3)" in out
