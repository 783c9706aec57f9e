"""Python stacks read from the interpreter's memory: every CPython on the machine.

For each interpreter (pyenv 3.8-3.13, the project's 3.13 shared and static
builds, Debian's own stripped non-PIE static python3.11 on the host, and
Debian sid's python3.14 and python3.15 run with chroot in their own pid and
mount namespaces when /var/cache/perfagent/debian-sid exists), a target
with known stacks in known threads (tests/programs/py_stack_target.py) is
read repeatedly with perfagent.python.reader, and every name, file, line
and thread id is compared with what the script's source says.  The target
must never be stopped or traced and no perf map may appear.

Also: the line-table decoders against each interpreter's own answer for
every bytecode offset of ~800 stdlib code objects, the generated offset
table against the compiler and against 3.13's own _Py_DebugOffsets, the
3.14/3.15 debug-offsets layouts against their headers, a code object's
address reused by another, cycles and garbage in a frame chain, deleted
and namespaced interpreters, and the skip reasons.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest

from conftest import PROGRAMS, REPO
from pythons import test_pythons

from perfagent.python import debug_offsets as dbg
from perfagent.python import layouts
from perfagent.python.interpreter import Interpreter, InterpreterSkip, find_interpreter
from perfagent.python.layout import INTERPRETER_FRAME, LINETABLE_310, LNOTAB, LOCATIONS, layout_for
from perfagent.python.linetable import line_for
from perfagent.python.reader import FRAME_ENTRY, RawFrame, Reader, ReaderError
from perfagent.target import procfs

sys.path.insert(0, os.path.join(REPO, "tools"))
import gen_python_offsets  # noqa: E402

TARGET = os.path.join(PROGRAMS, "py_stack_target.py")
LINETABLE_DUMP = os.path.join(PROGRAMS, "py_linetable_dump.py")
PYENV = "/root/.pyenv/versions"
DEBIAN_ROOT = os.environ.get("PERFAGENT_DEBIAN_ROOT", "/var/cache/perfagent/debian-sid")
DEBIAN_HOST_PYTHON = "/usr/bin/python3.11"
FIXTURES = os.path.join(REPO, "tests", "fixtures", "python_debug_offsets")

#: Consecutive reads of each target that must all be right.
READS = 20


class PySpec(NamedTuple):
    label: str
    python: str                   # interpreter path (inside ``root`` when set)
    version: Tuple[int, int]
    shared: bool                  # libpython mapped (else the executable carries it)
    root: Optional[str] = None    # run with unshare --pid --mount --fork chroot ROOT


def _pyenv(minor: int) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(PYENV, "3.%d.*" % minor, "bin", "python3.%d" % minor)))
    return found[-1] if found else None


def _specs() -> List[Tuple[str, Optional[PySpec], str]]:
    """(label, spec or None, why missing) for every interpreter the tests know of."""
    out = []
    for minor in range(8, 14):
        path = _pyenv(minor)
        out.append(("pyenv-3.%d" % minor, PySpec("pyenv-3.%d" % minor, path, (3, minor), True) if path else None,
                    "no pyenv CPython 3.%d" % minor))
    built = test_pythons()
    for kind in ("shared", "static"):
        label = "project-3.13-%s" % kind
        path = built.get(kind)
        out.append((label, PySpec(label, path, (3, 13), kind == "shared") if path else None,
                    "the project's 3.13 %s build is not there yet (tools/build_test_pythons.sh)" % kind))
    label = "debian-host-3.11-static-nopie-stripped"
    out.append((label, PySpec(label, DEBIAN_HOST_PYTHON, (3, 11), False) if os.path.exists(DEBIAN_HOST_PYTHON)
                else None, "no %s" % DEBIAN_HOST_PYTHON))
    for minor in (14, 15):
        label = "debian-sid-3.%d-chroot" % minor
        inner = "/usr/bin/python3.%d" % minor
        ok = os.path.exists(DEBIAN_ROOT + inner) and shutil.which("unshare")
        out.append((label, PySpec(label, inner, (3, minor), False, DEBIAN_ROOT) if ok else None,
                    "no Debian sid root with python3.%d at %s" % (minor, DEBIAN_ROOT)))
    return out


SPECS = _specs()


def spec_param():
    return pytest.mark.parametrize("spec", [s for _, s, _ in SPECS], ids=[label for label, _, _ in SPECS])


def need(spec: Optional[PySpec]) -> PySpec:
    if spec is None:
        pytest.skip("interpreter not on this machine")
    return spec


@pytest.fixture(autouse=True)
def _skip_missing(request):
    """A spec parameter of None is an interpreter this machine lacks: skip, saying which."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "spec" in callspec.params and callspec.params["spec"] is None:
        label = callspec.id.split("-", 1)[-1] if callspec.id not in dict((l, 0) for l, _, _ in SPECS) \
            else callspec.id
        why = next((w for lab, _, w in SPECS if lab == label or callspec.id.endswith(lab)), "not here")
        pytest.skip(why)


# ------------------------------------------------------------------ running targets

def _children(pid: int) -> List[int]:
    out = []
    for task in glob.glob("/proc/%d/task/*/children" % pid):
        try:
            with open(task) as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def _python_descendant(pid: int) -> Optional[int]:
    todo = [pid]
    while todo:
        p = todo.pop()
        if procfs.comm(p).startswith("python") or procfs.comm(p) == "py":
            return p
        todo.extend(_children(p))
    return None


class Target:
    """A target process started for one test; killed (whole process group) at exit."""

    def __init__(self, argv: List[str], stdin: bool = False, cwd: Optional[str] = None) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     start_new_session=True, cwd=cwd)
        self.pid = self.proc.pid
        self.cleanup = ""          # a directory removed when the target is killed
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = b""

    def line(self, timeout: float = 60.0) -> str:
        """The next line of the target's stdout (the test fails if none comes)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                self.kill()
                raise AssertionError("target printed nothing; stderr: %s" % self.proc.stderr.read()[-2000:])
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                self.kill()
                raise AssertionError("target exited; stderr: %s" % self.proc.stderr.read()[-2000:])
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        if self.cleanup:
            shutil.rmtree(self.cleanup, ignore_errors=True)

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        self._sel.close()


def start(spec: PySpec, script: str, stdin: bool = False) -> Tuple[Target, int, str]:
    """Start ``script`` under ``spec``: (target, pid of the interpreter, script path as it sees it)."""
    if spec.root is None:
        t = Target([spec.python, script], stdin=stdin)
        return t, t.pid, script
    inner_dir = "/tmp/perfagent-pyreader-%d" % os.getpid()
    os.makedirs(spec.root + inner_dir, exist_ok=True)
    inner = os.path.join(inner_dir, os.path.basename(script))
    shutil.copy(script, spec.root + inner)
    t = Target(["unshare", "--pid", "--mount", "--fork", "chroot", spec.root, spec.python, inner], stdin=stdin)
    t.cleanup = spec.root + inner_dir
    return t, 0, inner


def interpreter_pid(t: Target, pid: int) -> int:
    if pid:
        return pid
    found = _python_descendant(t.pid)
    assert found, "no python process under %d" % t.pid
    return found


def defs(path: str) -> Dict[str, int]:
    """{function name: line of its def} of a source file."""
    out = {}
    with open(path) as f:
        for n, text in enumerate(f, 1):
            m = re.match(r"def (\w+)\(", text)
            if m:
                out[m.group(1)] = n
    return out


def marks(path: str) -> Dict[str, int]:
    """{mark: line number} of the ``# @mark`` comments of a source file."""
    out = {}
    with open(path) as f:
        for n, text in enumerate(f, 1):
            m = re.search(r"# @([\w-]+)\s*$", text)
            if m:
                out[m.group(1)] = n
    return out


def not_disturbed(pid: int) -> None:
    """The target was never stopped or traced."""
    st = procfs.status(pid)
    assert st.get("TracerPid", "0").split()[0] == "0", st.get("TracerPid")
    assert not st.get("State", "").startswith(("t", "T")), st.get("State")


def perf_maps(pid: int) -> List[str]:
    ns = procfs.ns_pids(procfs.status(pid))
    inner = ns[-1] if ns else pid
    return [p for p in ("/tmp/perf-%d.map" % pid, "/proc/%d/root/tmp/perf-%d.map" % (pid, inner))
            if os.path.exists(p)]


def host_to_ns_tids(pid: int) -> Dict[int, int]:
    out = {}
    for tid in procfs.threads(pid):
        ids = procfs.ns_pids(procfs.status(pid, tid))
        out[tid] = ids[-1] if ids else tid
    return out


def qual(version: Tuple[int, int], cls: str, name: str) -> str:
    """co_qualname from 3.11, co_name before."""
    return "%s.%s" % (cls, name) if version >= (3, 11) else name


# ------------------------------------------------------------------ the stacks

def check_stacks(reader: Reader, pid: int, version: Tuple[int, int], script: str, sub: bool) -> Optional[str]:
    """Why one read of the target's stacks is wrong, or None when it is all right."""
    m = marks(TARGET)
    stacks = reader.stacks()
    main_interp = reader.interpreters()[-1][0]
    by_interp: Dict[bool, list] = {True: [], False: []}
    for st in stacks:
        by_interp[st.thread.interp == main_interp].append(st)
    names = lambda st: [f.qualname for f in st.frames]  # noqa: E731

    main = [st for st in by_interp[True] if st.thread.tid == pid]
    if len(main) != 1:
        return "main thread (tid %d) not found once: %r" % (pid, [st.thread for st in stacks])
    main = main[0]
    want = ["fn_a", "round_robin", "main", "<module>"]
    if names(main) != want:
        return "main stack %r" % names(main)
    if [f.line for f in main.frames] != [m["a-loop"], m["rr-call"], m["main-call"], m["module-call"]]:
        return "main lines %r" % [f.line for f in main.frames]
    assert all(f.filename == script for f in main.frames), [f.filename for f in main.frames]
    d = defs(TARGET)
    assert [f.firstlineno for f in main.frames] == [d["fn_a"], d["round_robin"], d["main"], 1]
    assert main.truncated == ""

    sleepers = [st for st in by_interp[True] if st.frames and st.frames[0].qualname == "sleeper"]
    if len(sleepers) != 1:
        return "sleeper thread: %r" % [names(st) for st in by_interp[True]]
    sl = sleepers[0]
    if sl.frames[0].line != m["sleep-loop"]:
        return "sleeper line %d" % sl.frames[0].line
    assert names(sl) == ["sleeper", qual(version, "Thread", "run"), qual(version, "Thread", "_bootstrap_inner"),
                         qual(version, "Thread", "_bootstrap")], names(sl)
    assert sl.frames[0].filename == script and all(f.filename.endswith("threading.py") for f in sl.frames[1:])

    tids = {st.thread.tid for st in stacks}
    ns_tids = host_to_ns_tids(pid)
    assert tids == set(ns_tids), (tids, ns_tids)
    for st in stacks:
        assert ns_tids[st.thread.tid] == st.thread.native_thread_id
    if sub:
        runs = [st for st in by_interp[True] if st.frames and st.frames[0].qualname == "run_sub"]
        subs = by_interp[False]
        if len(runs) != 1 or len(subs) != 1 or names(subs[0]) != ["sub_sleeper", "<module>"]:
            return "subinterpreter: %r / %r" % ([names(s) for s in runs], [names(s) for s in subs])
        assert runs[0].frames[0].line == m["run-call"]
        assert [f.line for f in subs[0].frames] == [3, 4]
        assert subs[0].frames[0].filename in ("<string>", "<script>")
        # Up to 3.12, run_string borrows the thread state create() made in
        # the creating (main) thread, whose ids stay the creator's: that is
        # what the interpreter itself records.  3.13+ make one per thread.
        assert subs[0].thread.tid == (pid if version <= (3, 12) else runs[0].thread.tid)
        assert subs[0].thread.interp_id != 0 and main.thread.interp_id == 0
    else:
        assert not by_interp[False]
        assert len(stacks) == 2
    assert reader.gil_holders() == {main.thread.addr}
    # The eval-loop entries: every frame before 3.11; from 3.11 the
    # outermost frame of the main thread's run, linked to the C stack.
    if reader.layout.frame_model == INTERPRETER_FRAME:
        outer = main.frames[-1].raw
        assert outer.flags & FRAME_ENTRY and outer.link, outer
        stack = [e for e in _maps(pid) if e[2] == "[stack]"]
        assert stack and stack[0][0] <= outer.link < stack[0][1], (hex(outer.link), stack)
        assert all(not f.raw.flags & FRAME_ENTRY for f in main.frames[:-1])
    else:
        assert all(f.raw.flags & FRAME_ENTRY and f.raw.link == 0 for f in main.frames)
    return None


def _maps(pid: int):
    out = []
    for line in procfs.maps_bytes(pid).decode("utf-8", "replace").splitlines():
        parts = line.split(None, 5)
        a, b = parts[0].split("-")
        out.append((int(a, 16), int(b, 16), parts[5] if len(parts) > 5 else ""))
    return out


def read_and_check(pid: int, spec_version: Tuple[int, int], script: str, sub: bool,
                   shared: Optional[bool] = None) -> Interpreter:
    interp = find_interpreter(pid)
    assert interp.version == spec_version
    if shared is not None:
        assert interp.shared == shared
    reader = Reader(interp)
    # Threads start asynchronously: wait (bounded) for the first complete
    # picture, then every one of READS reads must be complete and right.
    why = "never read"
    for _ in range(400):
        why = check_stacks(reader, pid, spec_version, script, sub)
        not_disturbed(pid)
        if why is None:
            break
        time.sleep(0.05)
    assert why is None, why
    for _ in range(READS):
        assert check_stacks(reader, pid, spec_version, script, sub) is None
        not_disturbed(pid)
    assert perf_maps(pid) == []
    return interp


@spec_param()
def test_stacks(spec):
    t, pid, script = start(spec, TARGET)
    with t:
        ready = t.line()
        pid = interpreter_pid(t, pid)
        assert ready in ("ready 0", "ready 1")
        read_and_check(pid, spec.version, script, ready == "ready 1", spec.shared)


# ------------------------------------------------------------------ line tables

@spec_param()
def test_line_tables_match_the_interpreter(spec):
    """Every bytecode offset of ~800 stdlib code objects: our line == the interpreter's own."""
    if spec.root is None:
        out = subprocess.run([spec.python, LINETABLE_DUMP], check=True, stdout=subprocess.PIPE).stdout
    else:
        inner = "/tmp/perfagent-pyreader-%d-dump.py" % os.getpid()
        shutil.copy(LINETABLE_DUMP, spec.root + inner)
        try:
            out = subprocess.run(["chroot", spec.root, spec.python, inner], check=True,
                                 stdout=subprocess.PIPE).stdout
        finally:
            os.unlink(spec.root + inner)
    data = json.loads(out)
    v = tuple(data["version"])
    assert v == spec.version
    fmt = LNOTAB if v < (3, 10) else LINETABLE_310 if v == (3, 10) else LOCATIONS
    offsets = bad = 0
    for code in data["codes"]:
        table = bytes.fromhex(code["table"])
        for addrq, line in code["lines"]:
            offsets += 1
            bad += line_for(fmt, table, code["firstlineno"], addrq) != line
    assert len(data["codes"]) > 500 and offsets > 20000
    assert bad == 0


def test_line_tables_refuse_garbage():
    junk = bytes(range(256)) * 4
    for fmt in (LNOTAB, LINETABLE_310, LOCATIONS):
        for addrq in (-2, 0, 7, 100, 5000):
            line = line_for(fmt, junk, 10, addrq)
            assert line is None or isinstance(line, int)
    assert line_for(LOCATIONS, b"\x00\x01", 5, 0) is None          # not an entry head
    assert line_for(LOCATIONS, b"\xf0", 5, 0) is None              # long form cut short
    assert line_for(LOCATIONS, b"\xe8\x7f\x7f", 5, 0) is None      # varint cut short
    assert line_for(LINETABLE_310, b"", 5, 0) is None
    assert line_for(LNOTAB, b"", 5, 0) == 5


# ------------------------------------------------------------------ generated offsets

def test_generated_table_is_up_to_date():
    if not shutil.which("gcc"):
        pytest.skip("no gcc")
    installs = gen_python_offsets.pyenv_installs()
    missing = [v for v in gen_python_offsets.MINORS if v not in installs]
    if missing:
        pytest.skip("pyenv lacks %s" % missing)
    text, _, _ = gen_python_offsets.generate({})
    with open(os.path.join(REPO, "perfagent", "python", "layouts.py")) as f:
        assert f.read() == text


def test_table_layouts_are_complete():
    for minor in range(8, 13):
        layout = layout_for((3, minor))
        d = layout.as_dict()
        for name in ("runtime_interpreters_head", "interp_next", "interp_threads_head", "tstate_next",
                     "tstate_thread_id", "frame_back", "frame_code", "frame_instr", "code_name",
                     "code_filename", "code_firstlineno", "code_linetable", "unicode_state"):
            assert isinstance(d[name], int), (minor, name)
        assert (d["tstate_frame"] is None) == (minor >= 11)
        assert (d["tstate_cframe"] is None) == (minor < 11)
        assert (d["tstate_native_thread_id"] is None) == (minor < 11)
        assert (d["code_qualname"] is None) == (minor < 11)
        assert (d["frame_is_entry"] is None) == (minor != 11)
        assert (d["frame_owner_shim"] is None) == (minor != 12)
        assert (d["runtime_gil_locked"] is None) == (minor >= 12)
        assert (d["interp_gil_locked"] is None) == (minor < 12)
    for v in ((3, 7), (3, 13), (3, 14), (4, 0)):
        with pytest.raises(Exception) as exc:
            layout_for(v)
        assert exc.value.reason == "unknown_version"


def _live_313(spec: PySpec) -> Tuple[Interpreter, Dict[str, int]]:
    t, pid, script = start(spec, TARGET)
    with t:
        t.line()
        interp = find_interpreter(interpreter_pid(t, pid))
    assert interp.debug_offsets is not None and interp.layout.source == "debug_offsets"
    return interp, interp.debug_offsets.flat()


def test_313_probes_agree_with_its_own_debug_offsets():
    """The generator's offsetof probes on pyenv's 3.13 headers == a live 3.13's _Py_DebugOffsets."""
    spec = dict((label, s) for label, s, _ in SPECS).get("pyenv-3.13")
    need(spec)
    installs = gen_python_offsets.pyenv_installs()
    if (3, 13) not in installs or not shutil.which("gcc"):
        pytest.skip("no pyenv 3.13 headers or no gcc")
    _, probed = gen_python_offsets.split_values(gen_python_offsets.run_probe((3, 13), installs[(3, 13)][1]))
    interp, live = _live_313(spec)
    names = [name for name, _ in gen_python_offsets.DEBUG_OFFSETS_313]
    assert sorted(names) == sorted(n for n in live if n != "interpreter_state.gil_runtime_state_enabled")
    for name in names:
        assert probed[name] == live[name], name
        assert layouts.DEBUG_OFFSETS[(3, 13)][name] == live[name], name
    assert live["interpreter_state.gil_runtime_state_enabled"] == 0
    # The walker's own table entries for 3.13 agree too.
    t = layouts.LAYOUTS[(3, 13)]
    L = interp.layout
    assert (L.runtime_interpreters_head, L.interp_next, L.interp_threads_head, L.tstate_next, L.tstate_interp,
            L.tstate_frame, L.tstate_thread_id, L.tstate_native_thread_id, L.frame_back, L.frame_code,
            L.frame_instr, L.frame_owner, L.code_name, L.code_qualname, L.code_filename,
            L.code_firstlineno, L.code_linetable, L.code_adaptive, L.bytes_ob_size, L.bytes_ob_sval,
            L.unicode_length, L.unicode_state, L.unicode_ascii_data, L.unicode_compact_data,
            L.unicode_kind_shift, L.unicode_compact_shift, L.unicode_ascii_shift, L.frame_owner_shim,
            L.interp_gil_locked, L.interp_gil_last_holder) == (
        t["_PyRuntimeState.interpreters.head"], t["PyInterpreterState.next"],
        t["PyInterpreterState.threads.head"], t["PyThreadState.next"], t["PyThreadState.interp"],
        t["PyThreadState.current_frame"], t["PyThreadState.thread_id"], t["PyThreadState.native_thread_id"],
        t["_PyInterpreterFrame.previous"], t["_PyInterpreterFrame.f_executable"],
        t["_PyInterpreterFrame.instr_ptr"], t["_PyInterpreterFrame.owner"], t["PyCodeObject.co_name"],
        t["PyCodeObject.co_qualname"], t["PyCodeObject.co_filename"], t["PyCodeObject.co_firstlineno"],
        t["PyCodeObject.co_linetable"], t["PyCodeObject.co_code_adaptive"], t["PyBytesObject.ob_size"],
        t["PyBytesObject.ob_sval"], t["PyASCIIObject.length"], t["PyASCIIObject.state"],
        t["sizeof(PyASCIIObject)"], t["sizeof(PyCompactUnicodeObject)"],
        t["PyASCIIObject.state.kind.shift"], t["PyASCIIObject.state.compact.shift"],
        t["PyASCIIObject.state.ascii.shift"], t["FRAME_OWNED_BY_CSTACK"],
        t["PyInterpreterState._gil.locked"], t["PyInterpreterState._gil.last_holder"])


@pytest.mark.parametrize("kind", ["shared", "static"])
def test_project_313_debug_offsets_match_its_headers(kind):
    """The project's 3.13 builds: the probes compiled against the build's own installed
    headers == what the running build publishes, field by field."""
    spec = dict((label, s) for label, s, _ in SPECS).get("project-3.13-%s" % kind)
    need(spec)
    inc = os.path.join(os.path.dirname(os.path.dirname(spec.python)), "include", "python3.13")
    if not os.path.isdir(os.path.join(inc, "internal")) or not shutil.which("gcc"):
        pytest.skip("no internal headers installed with %s, or no gcc" % spec.python)
    _, probed = gen_python_offsets.split_values(gen_python_offsets.run_probe((3, 13), [inc, inc + "/internal"]))
    _, live = _live_313(spec)
    for name, _ in gen_python_offsets.DEBUG_OFFSETS_313:
        assert probed[name] == live[name], name
    # 3.13.0's table differs from 3.13.5 only in the sizes of whole states,
    # which the walker does not use.
    differ = sorted(n for n, v in layouts.DEBUG_OFFSETS[(3, 13)].items() if live[n] != v)
    assert set(differ) <= {"runtime_state.size", "interpreter_state.size", "thread_state.size"}, differ


@pytest.mark.parametrize("minor", [14, 15])
def test_debug_offsets_layouts_from_headers(minor):
    """3.14/3.15: the struct this module describes == the header's _Py_DebugOffsets_INIT, byte for byte."""
    with open(os.path.join(FIXTURES, "3.%d.json" % minor)) as f:
        fx = json.load(f)
    raw = bytes.fromhex(fx["raw"])
    assert len(raw) == dbg.struct_size((3, minor))
    parsed = dbg.parse(raw)
    assert parsed.version == (3, minor) and not parsed.free_threaded
    assert parsed.flat() == fx["fields"]
    assert list(fx["fields"]) == dbg.field_names((3, minor))
    layout = dbg.layout_from_debug_offsets(parsed)
    assert layout.frame_owner_shim == fx["abi"]["frame_owner_shim"]
    assert layout.unicode_kind_shift == fx["abi"]["kind_shift"]
    assert layout.unicode_compact_data - layout.unicode_ascii_data == fx["abi"]["compact_extra"]
    assert layout.code_tag_mask == {14: 1, 15: 3}[minor]
    # With the Debian root's own headers, the same again from a fresh compile.
    inc = os.path.join(DEBIAN_ROOT, "usr", "include")
    if os.path.isdir(os.path.join(inc, "python3.%d" % minor, "internal")) and shutil.which("gcc"):
        incs = [os.path.join(inc, "python3.%d" % minor), os.path.join(inc, "python3.%d" % minor, "internal"), inc]
        named, raw2 = gen_python_offsets.debug_offsets_struct_probe((3, minor), incs)
        assert named == fx["fields"] and raw2 == raw


@pytest.mark.parametrize("minor", [14, 15])
def test_debian_live_debug_offsets_equal_headers(minor):
    """Debian sid's running python3.14/3.15 hold exactly the bytes its headers describe."""
    spec = dict((label, s) for label, s, _ in SPECS).get("debian-sid-3.%d-chroot" % minor)
    need(spec)
    with open(os.path.join(FIXTURES, "3.%d.json" % minor)) as f:
        fx = json.load(f)
    t, pid, script = start(spec, TARGET)
    with t:
        t.line()
        interp = find_interpreter(interpreter_pid(t, pid))
    live = interp.debug_offsets.flat()
    assert set(live) == set(fx["fields"])
    differ = sorted(n for n in live if live[n] != fx["fields"][n])
    # Debian's static python3.X is configured apart from the shared build the
    # -dev headers describe: whole-state sizes may differ, no member offset does.
    assert set(differ) <= {"runtime_state.size", "interpreter_state.size"}, differ


def _with_head(data: bytes, version: int, free_threaded: int = 0) -> bytes:
    return dbg.HEAD.pack(dbg.COOKIE, version, free_threaded) + data[dbg.HEAD.size:]


def test_debug_offsets_refusals():
    with open(os.path.join(FIXTURES, "3.14.json")) as f:
        raw = bytes.fromhex(json.load(f)["raw"])
    for version, reason in ((0x031000F0, "unknown_version"),    # 3.16: newer than known
                            (0x030E00A1, "unknown_version"),    # 3.14.0a1: pre-release
                            (0x030E00B2, "unknown_version"),    # 3.14.0b2
                            (0x030C00F0, "unknown_version")):   # 3.12 has no debug offsets
        with pytest.raises(dbg.DebugOffsetsError) as exc:
            dbg.parse(_with_head(raw, version))
        assert exc.value.reason == reason, hex(version)
    assert dbg.parse(_with_head(raw, 0x030E00C1)).version == (3, 14)   # 3.14.0rc1 accepted
    with pytest.raises(dbg.DebugOffsetsError) as exc:
        dbg.parse(_with_head(raw, 0x030E0AF0, 1))
    assert exc.value.reason == "free_threaded"
    with pytest.raises(dbg.DebugOffsetsError) as exc:
        dbg.parse(b"ydebugpy" + raw[8:])
    assert exc.value.reason == "unknown_version"
    with pytest.raises(dbg.DebugOffsetsError):
        dbg.parse(raw[:100])
    bad = bytearray(raw)
    # thread_state.current_frame beyond sizeof(PyThreadState)
    idx = dbg.field_names((3, 14)).index("thread_state.current_frame")
    struct.pack_into("<Q", bad, dbg.HEAD.size + 8 * idx, 1 << 30)
    with pytest.raises(dbg.DebugOffsetsError):
        dbg.parse(bytes(bad))
    assert dbg.version_string(0x030D05F0) == "3.13.5" and dbg.version_string(0x030E00A1) == "3.14.0a1"


# ------------------------------------------------------------------ where the interpreter is

def _static_pythons() -> List[Tuple[str, str]]:
    out = []
    built = test_pythons().get("static")
    if built:
        out.append(("project-3.13-static-pie", built))
    if os.path.exists(DEBIAN_HOST_PYTHON):
        out.append(("debian-3.11-static-nopie-stripped", DEBIAN_HOST_PYTHON))
    return out


def _version_of(python: str) -> Tuple[int, int]:
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.parametrize("name,python", _static_pythons(), ids=[n for n, _ in _static_pythons()])
def test_deleted_interpreter(tmp_path, name, python):
    """An interpreter file deleted after it started is read through map_files."""
    copy = str(tmp_path / "python-copy")
    shutil.copy(python, copy)
    version = _version_of(python)
    t, pid, script = start(PySpec(name, copy, version, False), TARGET)
    with t:
        ready = t.line()
        os.unlink(copy)
        interp = read_and_check(pid, version, script, ready == "ready 1", shared=False)
        assert interp.mapping.deleted and interp.opened_as.startswith("/proc/%d/map_files/" % pid)


@pytest.mark.parametrize("name,python", _static_pythons(), ids=[n for n, _ in _static_pythons()])
def test_interpreter_in_other_mount_and_pid_namespace(tmp_path, name, python):
    """An interpreter only visible inside the target's own mount namespace, in its own pid namespace."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    mnt = "/mnt/perfagent-pyreader-%d" % os.getpid()
    os.makedirs(mnt, exist_ok=True)
    version = _version_of(python)
    shell = ("mount -t tmpfs tmpfs %s && cp %s %s/python && cp %s %s/target.py && exec %s/python %s/target.py"
             % (mnt, python, mnt, TARGET, mnt, mnt, mnt))
    t = Target(["unshare", "--mount", "--pid", "--fork", "sh", "-c", shell])
    with t:
        ready = t.line()
        pid = interpreter_pid(t, 0)
        assert not os.path.exists(mnt + "/python")          # not in our mount namespace
        assert len(procfs.ns_pids(procfs.status(pid))) == 2  # its own pid namespace
        interp = read_and_check(pid, version, mnt + "/target.py", ready == "ready 1", shared=False)
        assert interp.opened_as.startswith("/proc/%d/" % pid)
    os.rmdir(mnt)


def test_skip_reasons(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(InterpreterSkip) as exc:
            find_interpreter(sleeper.pid)
        assert exc.value.reason == "not_python"
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(InterpreterSkip) as exc:
        find_interpreter(sleeper.pid)
    assert exc.value.reason == "process_gone"
    old = _pyenv(7)
    if old:
        t = Target([old, "-c", "import time; print('ready', flush=True); time.sleep(60)"])
        with t:
            t.line()
            with pytest.raises(InterpreterSkip) as exc:
                find_interpreter(t.pid)
            assert exc.value.reason == "unknown_version"
            assert "older than 3.8" in str(exc.value)


def test_interpreter_file_info_is_cached():
    from perfagent.python import interpreter as mod

    spec = next((s for _, s, _ in SPECS if s is not None and s.root is None), None)
    need(spec)
    t, pid, script = start(spec, TARGET)
    with t:
        t.line()
        first = find_interpreter(pid)
        n = len(mod._FILE_CACHE)
        second = find_interpreter(pid)
        assert len(mod._FILE_CACHE) == n
        assert (first.runtime, first.bias, first.version) == (second.runtime, second.bias, second.version)


# ------------------------------------------------------------------ code objects and hostile memory

REUSE_TARGET = r'''
import gc, sys
def make(i):
    ns = {}
    exec("def f%d():\n    return %d\n" % (i, i), ns)
    return ns["f%d" % i]
def code_of(f):
    return f.__code__
f = make(0)
print(id(code_of(f)), flush=True)
sys.stdin.readline()
old = id(code_of(f))
del f
gc.collect()
for i in range(1, 200000):
    g = make(i)
    if id(code_of(g)) == old:
        print("reused %d" % i, flush=True)
        break
    del g
else:
    print("none", flush=True)
sys.stdin.readline()
'''


@spec_param()
def test_code_object_address_reuse_is_detected(spec, tmp_path):
    script = tmp_path / "reuse.py"
    script.write_text(REUSE_TARGET)
    t, pid, inner = start(spec, str(script), stdin=True)
    with t:
        addr = int(t.line())
        pid = interpreter_pid(t, pid)
        reader = Reader(find_interpreter(pid))
        first = reader.code(addr)
        assert first.name == "f0" and reader.code_decodes == 1
        assert reader.code(addr) is first and reader.code_decodes == 1     # revalidated, cached
        t.send("\n")
        answer = t.line()
        assert answer.startswith("reused "), answer
        second = reader.code(addr)
        assert second.name == "f%s" % answer.split()[1] and reader.code_decodes == 2
        assert second.fingerprint != first.fingerprint
        # A cached code object whose memory reads short now (freed, or the pid
        # is another process) is gone: None and an unknown frame, no struct.error.
        unmapped = 0x20000
        reader._codes[unmapped] = first
        assert reader.code(unmapped) is None and unmapped not in reader._codes
        reader._codes[unmapped] = first
        assert reader.frame(RawFrame(0, unmapped, 0, 0, 0)).filename == "?"
        t.send("\n")


class _Mem:
    """Structures laid out in this process's memory (read back through process_vm_readv)."""

    def __init__(self, size: int = 1 << 16) -> None:
        self.buf = ctypes.create_string_buffer(size)
        self.base = (ctypes.addressof(self.buf) + 15) & ~15

    def put(self, offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, self.buf, self.base - ctypes.addressof(self.buf) + offset, *values)

    def addr(self, offset: int) -> int:
        return self.base + offset


def _own_reader(version: Tuple[int, int]) -> Reader:
    interp = Interpreter(pid=os.getpid(), start_time=0, path="", opened_as="", shared=True, mapping=None,
                         bias=0, runtime=0, version=version, hexversion=0, abiflags="",
                         layout=layout_for(version), code_type=0, pthread_tid_offset=None, debug_offsets=None)
    return Reader(interp, max_frames=64)


@pytest.mark.parametrize("minor", [8, 10, 11, 12])
def test_frame_chain_cycle_and_garbage_end_the_walk(minor):
    reader = _own_reader((3, minor))
    L = reader.layout
    mem = _Mem()
    step = 256
    frames = [mem.addr(i * step) for i in range(4)]

    def link(chain_end):
        for i, f in enumerate(frames):
            nxt = frames[i + 1] if i + 1 < len(frames) else chain_end
            mem.put(i * step + L.frame_back, "<Q", nxt)
            mem.put(i * step + L.frame_code, "<Q", 0x1000 + i * 16)

    walk = reader._walk_frame_objects if minor <= 10 else (lambda top: reader._walk_interpreter_frames(top, []))
    link(0)
    out, why = walk(frames[0])
    assert len(out) == 4 and why == ""
    link(frames[1])                                  # a cycle
    out, why = walk(frames[0])
    assert len(out) == 4 and why.startswith("frame chain cycle")
    link(0xDEADBEEF)                                 # unaligned garbage
    out, why = walk(frames[0])
    assert len(out) == 4 and why.startswith("bad frame pointer")
    link(0x10000)                                    # aligned, unmapped
    out, why = walk(frames[0])
    assert len(out) == 4 and why.startswith("unreadable frame")
    for i in range(len(frames)):                     # every frame points to itself +1 ... a long chain
        mem.put(i * step + L.frame_back, "<Q", frames[0])
    mem.put(L.frame_back, "<Q", frames[0])
    out, why = walk(frames[0])
    assert len(out) == 1 and why.startswith("frame chain cycle")
    # Longer than the bound: 100 distinct frames.
    long = _Mem(200 * 128)
    for i in range(100):
        long.put(i * 128 + L.frame_back, "<Q", long.addr((i + 1) * 128) if i < 99 else 0)
    out, why = walk(long.addr(0))
    assert len(out) == 64 and why == "more than 64 frames"
    # Garbage code objects and strings name nothing, and raise nothing.
    assert reader.code(0) is None and reader.code(0xDEADBEEF) is None
    assert reader.frame(out[0]).qualname.startswith("<unknown code")
    assert reader.string(0x10000) == "" and isinstance(reader.string(mem.addr(0)), str)


def test_strings_of_every_kind():
    """Compact ASCII, latin-1, UCS-2, UCS-4 str objects of a live interpreter."""
    spec = next((s for _, s, _ in SPECS if s is not None and s.root is None and s.version >= (3, 8)), None)
    need(spec)
    src = ("import sys\nS = ['plain_ascii', 'caf\\xe9 latin', '\\u0416\\u0436 cyrillic', "
           "'\\U0001F600 emoji', 'x' * 5000]\nprint(*[id(s) for s in S], flush=True)\nsys.stdin.readline()\n")
    t = Target([spec.python, "-c", src], stdin=True)
    with t:
        ids = [int(x) for x in t.line().split()]
        reader = Reader(find_interpreter(t.pid))
        assert [reader.string(a) for a in ids[:4]] == ["plain_ascii", "caf\xe9 latin", "\u0416\u0436 cyrillic",
                                                       "\U0001F600 emoji"]
        assert reader.string(ids[4]) == "x" * 4096           # bounded
        assert reader.string(ids[4], limit=10) == "x" * 10
        t.send("\n")


def test_reader_error_when_the_process_is_gone():
    spec = next((s for _, s, _ in SPECS if s is not None and s.root is None), None)
    need(spec)
    t, pid, script = start(spec, TARGET)
    with t:
        t.line()
        reader = Reader(find_interpreter(pid))
        assert reader.stacks()
    with pytest.raises(ReaderError) as exc:
        reader.stacks()
    assert exc.value.reason == "process_gone"


def test_permission_reason():
    """An unprivileged reader of a root process: reason permission, one line, no traceback."""
    spec = next((s for _, s, _ in SPECS if s is not None and s.root is None), None)
    need(spec)
    t, pid, script = start(spec, TARGET)
    with t:
        t.line()
        # Everything imported first: root's pyenv is not readable by nobody.
        code = ("import os, sys; sys.path.insert(0, %r)\n"
                "from perfagent.python.interpreter import find_interpreter, InterpreterSkip\n"
                "import perfagent.python.reader, encodings.latin_1, encodings.utf_16_le\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "try:\n    find_interpreter(%d)\nexcept InterpreterSkip as exc:\n    print(exc.reason)\n"
                % (REPO, pid))
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, timeout=60)
        assert out.stdout.strip() == "permission", (out.stdout, out.stderr)
        assert out.stderr == ""
