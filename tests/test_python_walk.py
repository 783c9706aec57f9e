"""Python stacks read from the interpreter's memory by the BPF programs (issue 12).

Every CPython the machine has -- pyenv's 3.8 to 3.13 (shared libpython),
the project's 3.13 shared and static builds, and Debian's own python3.14
and python3.15 (stripped, static libpython, non-PIE) run in their own pid
and mount namespaces from the Debian sid root -- is profiled with nothing
but ``--profile --pid N``: no injection, no perf trampoline.  What must
hold, with numbers:

* the 1:2:3 CPU split of fn1/fn2/fn3 within 3 points;
* the whole chain ``<module> > main > round_robin > fnX > spin`` in at
  least 95% of the samples, although <module> and main were entered before
  the capture began;
* every Python frame's line is the source line the test program marks;
* the target is never traced or stopped, no perf map is created, and its
  own output is unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from typing import Dict, List, Tuple

import pytest

import containers
import pythons
from conftest import PROGRAMS, agent_env, run_agent
from perfagent.pprof.decode import read_profile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")

PY_WALK = os.path.join(PROGRAMS, "py_walk.py")
PYENV = "/root/.pyenv/versions"
PYENV_VERSIONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")


def marks(path: str) -> Dict[str, int]:
    """'# @name' comments of a source file -> line number."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            m = re.search(r"# @([\w-]+)", line)
            if m:
                out[m.group(1)] = n
    return out


MARKS = marks(PY_WALK)
# The line each frame of the chain must show.
EXPECTED_LINES = {
    "<module>": {MARKS["module"]},
    "main": {MARKS["main"]},
    "round_robin": {MARKS["rr1"], MARKS["rr2"], MARKS["rr3"]},
    "fn1": {MARKS["fn1"]}, "fn2": {MARKS["fn2"]}, "fn3": {MARKS["fn3"]},
    # Also, rarely, the two lines each call passes once: the def line (a
    # frame entered, no instruction run yet: 3.8-3.10 show its f_lasti -1
    # as co_firstlineno) and ``x = 0``.
    "spin": {MARKS["spin-start"], MARKS["spin-loop"], MARKS["spin-body"], MARKS["spin-return"],
             MARKS["spin-def"], MARKS["spin-init"]},
}
RR_LINE = {"fn1": MARKS["rr1"], "fn2": MARKS["rr2"], "fn3": MARKS["rr3"]}


def pyenv_python(minor: str) -> str:
    for name in sorted(os.listdir(PYENV)) if os.path.isdir(PYENV) else ():
        if name.startswith(minor + "."):
            path = os.path.join(PYENV, name, "bin", "python" + minor)
            if os.path.exists(path):
                return path
    pytest.skip("no pyenv CPython %s" % minor)
    return ""


def python_frames(profile) -> List[Tuple[List[Tuple[str, str, int]], dict, List[int]]]:
    """Per sample: its Python frames root first as (name, file, line), labels, values."""
    funcs = {f.id: f for f in profile.functions}
    locs = {loc.id: loc for loc in profile.locations}
    out = []
    for s in profile.samples:
        frames = []
        for lid in reversed(s.location_ids):
            for line in reversed(locs[lid].lines):
                f = funcs[line.function_id]
                if f.filename.endswith(".py"):
                    frames.append((f.name, f.filename, line.line))
        labels = {lab.key: (lab.str if lab.str else lab.num) for lab in s.labels}
        out.append((frames, labels, list(s.values)))
    return out


class Watch(threading.Thread):
    """Polls a target while the agent runs: was it ever traced or stopped?"""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.done = threading.Event()
        self.tracer = 0
        self.states = set()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with open("/proc/%d/status" % self.pid) as f:
                    for line in f:
                        if line.startswith("TracerPid:"):
                            self.tracer = max(self.tracer, int(line.split()[1]))
                        elif line.startswith("State:"):
                            self.states.add(line.split()[1])
            except OSError:
                return
            time.sleep(0.01)


#: The agent as on a kernel without bpf_loop (before 5.17): the Python walk
#: as the bounded loop the verifier walks iteration by iteration.
WITHOUT_BPF_LOOP = ("import sys; import perfagent.stackprog.capture as C; C._loop_support.append(False); "
                    "from perfagent.cli import main; sys.argv[0] = 'perf-agent'; sys.exit(main())")


def capture(tmp_path, pid: int, duration: str = "4s", extra=("--sample-rate", "499"), bpf_loop: bool = True):
    out = str(tmp_path / "walk.pb.gz")
    watch = Watch(pid)
    watch.start()
    try:
        args = ["--profile", "--pid", str(pid), "--duration", duration, "--quiet", "--profile-output", out, *extra]
        if bpf_loop:
            r = run_agent(args, cwd=str(tmp_path))
        else:
            r = subprocess.run([sys.executable, "-c", WITHOUT_BPF_LOOP, *args], cwd=str(tmp_path), env=agent_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        watch.done.set()
        watch.join()
    assert r.returncode == 0, r.stderr
    assert watch.tracer == 0, "the target was traced"
    assert not watch.states & {"t", "T"}, watch.states
    return python_frames(read_profile(out)), r.stderr


def check_walk(stacks, pid: int, stderr: str, filename: str) -> None:
    mine = [(frames, v) for frames, labels, v in stacks if str(labels["tid"]) == str(pid)]
    total = sum(v[0] for _, v in mine)
    assert total >= 100, stderr
    chain_ok = 0
    per_fn = {"fn1": 0, "fn2": 0, "fn3": 0}
    for frames, v in mine:
        names = [n for n, _, _ in frames]
        files = {f for _, f, _ in frames}
        if len(names) == 5 and names[:3] == ["<module>", "main", "round_robin"] \
                and names[3] in per_fn and names[4] == "spin":
            assert files == {filename}, files
            chain_ok += v[0]
            per_fn[names[3]] += v[0]
            for name, _, line in frames:
                assert line in EXPECTED_LINES[name], (name, line, frames)
            assert frames[2][2] == RR_LINE[names[3]], frames
    assert chain_ok >= 0.95 * total, (chain_ok, total, stderr)
    fn_total = sum(per_fn.values())
    for fn, want in (("fn1", 1 / 6), ("fn2", 2 / 6), ("fn3", 3 / 6)):
        share = per_fn[fn] / fn_total
        assert abs(share - want) <= 0.03, (fn, share, per_fn)
    assert "its Python frames were read from the interpreter's memory" in stderr, stderr


def run_host_target(python: str, tmp_path):
    proc = subprocess.Popen([python, PY_WALK, "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line.startswith("ready"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line


def finish_host_target(proc, first_line: str) -> None:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert first_line + out == "ready %d\ndone\n" % proc.pid, out   # its own output, unchanged
    assert err == ""
    assert not os.path.exists("/tmp/perf-%d.map" % proc.pid)


@pytest.mark.parametrize("minor", PYENV_VERSIONS)
def test_pyenv_pythons(tmp_path, minor):
    proc, first = run_host_target(pyenv_python(minor), tmp_path)
    try:
        stacks, stderr = capture(tmp_path, proc.pid)
    except BaseException:
        proc.kill()
        raise
    finish_host_target(proc, first)
    check_walk(stacks, proc.pid, stderr, PY_WALK)


@pytest.mark.parametrize("minor", ("3.10", "3.11", "3.12"))
def test_bounded_loop_walk_without_bpf_loop(tmp_path, minor):
    """The walk kernels before 5.17 load (no bpf_loop): the same stacks, for
    each frame model (3.10 frame objects, 3.11 cframe links, 3.12 links)."""
    proc, first = run_host_target(pyenv_python(minor), tmp_path)
    try:
        stacks, stderr = capture(tmp_path, proc.pid, bpf_loop=False)
    except BaseException:
        proc.kill()
        raise
    finish_host_target(proc, first)
    check_walk(stacks, proc.pid, stderr, PY_WALK)


@pytest.mark.parametrize("kind", pythons.KINDS)
def test_project_pythons(tmp_path, kind):
    proc, first = run_host_target(pythons.require_python(kind), tmp_path)
    try:
        stacks, stderr = capture(tmp_path, proc.pid)
    except BaseException:
        proc.kill()
        raise
    finish_host_target(proc, first)
    check_walk(stacks, proc.pid, stderr, PY_WALK)


@pytest.mark.parametrize("version", containers.VERSIONS)
def test_debian_pythons_in_a_container(tmp_path, version):
    python = containers.debian_python(version)
    with containers.run_in_container([python, "{workdir}/py_walk.py", "8"], copy=[PY_WALK]) as c:
        assert c.readline().startswith("ready")
        stacks, stderr = capture(tmp_path, c.host_pid)
        assert c.readline() == "done\n"
        assert c.wait(timeout=30) == 0
        assert not os.path.exists(c.host_path("/tmp/perf-%d.map" % c.ns_pid))
    check_walk(stacks, c.host_pid, stderr, c.workdir + "/py_walk.py")


# -- beyond one thread in one process ---------------------------------------------

HTTP_SERVICE = r'''
import http.server, os, socketserver, sys, threading, time, urllib.request

def busy(n):
    x = 0
    for i in range(n):
        x += i * i
    return x

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(busy(20000)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

def serve(server):
    server.serve_forever(poll_interval=0.05)

def client_loop(url, stop):
    while time.monotonic() < stop:
        with urllib.request.urlopen(url) as r:
            r.read()
        busy(5000)

server = Server(("127.0.0.1", 0), Handler)
stop = time.monotonic() + float(sys.argv[1])
threading.Thread(target=serve, args=(server,), name="server", daemon=True).start()
url = "http://127.0.0.1:%d/" % server.server_address[1]
clients = [threading.Thread(target=client_loop, args=(url, stop), name="client%d" % i) for i in range(3)]
for t in clients:
    t.start()
time.sleep(0.3)
print("ready", os.getpid(), " ".join(str(t.native_id) for t in clients), flush=True)
for t in clients:
    t.join()
'''


def test_threaded_http_service_every_thread_named(tmp_path):
    """Client threads started before the capture, handler threads started
    during it: each one's samples show its own loop function."""
    script = tmp_path / "service.py"
    script.write_text(HTTP_SERVICE)
    proc = subprocess.Popen([pythons.require_python("shared"), str(script), "10"], stdout=subprocess.PIPE,
                            text=True)
    try:
        fields = proc.stdout.readline().split()
        assert fields[0] == "ready", fields
        clients = set(fields[2:])
        stacks, stderr = capture(tmp_path, proc.pid, "3s")
    finally:
        proc.kill()
        proc.wait()
    by_tid: Dict[str, List[Tuple[List[str], int]]] = {}
    for frames, labels, v in stacks:
        by_tid.setdefault(str(labels["tid"]), []).append(([n for n, _, _ in frames], v[0]))
    assert clients <= set(by_tid), (clients, set(by_tid))
    for tid in clients:
        total = sum(n for _, n in by_tid[tid])
        named = sum(n for names, n in by_tid[tid] if "client_loop" in names)
        assert named >= 0.9 * total, (tid, named, total)
    handlers = [t for t in by_tid if t not in clients and t != str(proc.pid)]
    def handler(names):
        return any(n.split(".")[-1] in ("process_request_thread", "serve") for n in names)
    everything = sum(n for t in handlers for _, n in by_tid[t])
    with_python = [(names, n) for t in handlers for names, n in by_tid[t] if names]
    handled = sum(n for names, n in with_python if handler(names))
    in_do_get = sum(n for names, n in with_python if any(x.endswith("do_GET") for x in names))
    # Handler threads live for one request (started during the capture,
    # most for less than a sampling period): together they are sampled,
    # named after their own loop; what has no Python frame is the thread's
    # start and exit in C.
    assert in_do_get >= 20, stderr
    assert handled >= 0.95 * sum(n for _, n in with_python), (handled, with_python[:3])
    assert sum(n for _, n in with_python) >= 0.85 * everything, (with_python[:3], everything)


def test_offcpu_python_names_without_injection(tmp_path):
    """--offcpu: where a Python thread blocks (time.sleep in two functions,
    10 ms and 30 ms), with Python names, read in the kernel at switch-out."""
    proc = subprocess.Popen([pythons.require_python("static"), os.path.join(PROGRAMS, "py_naps.py"), "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "off.pb.gz"
    try:
        assert proc.stdout.readline().startswith("ready")
        r = run_agent(["--offcpu", "--pid", str(proc.pid), "--duration", "4s", "--quiet",
                       "--offcpu-output", str(out)], cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
    finally:
        proc.kill()
        proc.wait()
    assert not os.path.exists("/tmp/perf-%d.map" % proc.pid)
    per = {"nap_short": 0, "nap_long": 0}
    total = 0
    for frames, labels, v in python_frames(read_profile(str(out))):
        if str(labels["tid"]) != str(proc.pid):
            continue
        total += v[1]
        names = [n for n, _, _ in frames]
        for fn in per:
            if names[-3:-1] == ["main", fn] or names[-2:] == ["main", fn] or fn in names:
                per[fn] += v[1]
    named = sum(per.values())
    assert named >= 0.9 * total, (per, total, r.stderr)
    share = per["nap_long"] / named
    # 30 of every 40 ms asleep; the wake-ups add a little to both.
    assert abs(share - 0.75) <= 0.03, (share, per)


DEEP = r'''
import os, sys, time
def down(n, stop):
    if n:
        return down(n - 1, stop)
    x = 0
    while time.monotonic() < stop:
        x += 1
sys.setrecursionlimit(10000)
stop = time.monotonic() + float(sys.argv[1])
print("ready", os.getpid(), flush=True)
down(300, stop)
'''


def test_deep_recursion_is_truncated_and_counted(tmp_path):
    script = tmp_path / "deep.py"
    script.write_text(DEEP)
    proc = subprocess.Popen([pyenv_python("3.12"), str(script), "8"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        stacks, stderr = capture(tmp_path, proc.pid, "2s")
    finally:
        proc.kill()
        proc.wait()
    total = sum(v[0] for _, _, v in stacks)
    profile = read_profile(str(tmp_path / "walk.pb.gz"))
    mark = {f.id for f in profile.functions if f.name == "[more Python frames]"}
    locs = {loc.id: [line.function_id for line in loc.lines] for loc in profile.locations}
    funcs = {f.id: f.name for f in profile.functions}
    cut = 0
    for s in profile.samples:
        names = [funcs[fid] for lid in reversed(s.location_ids) for fid in reversed(locs[lid])]
        if mark & {fid for lid in s.location_ids for fid in locs[lid]}:
            cut += s.values[0]
            i = names.index("[more Python frames]")
            python = names[i + 1:]
            # the innermost frames, down to the spinning one, all there
            downs = [n for n in python if n == "down"]
            assert len(downs) >= 128 and "<module>" not in python, names
    assert cut >= 0.95 * total, (cut, total)
    assert re.search(r"(\d+) samples with more than \d+ Python frames", stderr), stderr


MANY = r'''
import os, sys, threading, time
def sleeper(stop):
    while time.monotonic() < stop:
        time.sleep(0.05)
def burner(stop):
    x = 0
    while time.monotonic() < stop:
        x += 1
stop = time.monotonic() + float(sys.argv[1])
ts = [threading.Thread(target=sleeper, args=(stop,), daemon=True) for _ in range(995)]
ts += [threading.Thread(target=burner, args=(stop,), daemon=True) for _ in range(4)]
for t in ts:
    t.start()
print("ready", os.getpid(), flush=True)
for t in ts:
    t.join()
'''


def test_a_thousand_threads(tmp_path):
    script = tmp_path / "many.py"
    script.write_text(MANY)
    proc = subprocess.Popen([pyenv_python("3.11"), str(script), "12"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        stacks, stderr = capture(tmp_path, proc.pid, "3s")
    finally:
        proc.kill()
        proc.wait()
    # 995 threads wake up every 50 ms (their own CPU), 4 burn: every sample
    # of any of the thousand threads is named after its own function.
    total = sum(v[0] for _, _, v in stacks)
    named = sum(v[0] for frames, _, v in stacks if {"burner", "sleeper"} & {n for n, _, _ in frames})
    burning = sum(v[0] for frames, _, v in stacks if any(n == "burner" for n, _, _ in frames))
    # (Their share of the CPU depends on the GIL and the machine's load: seen 2% to 60%.)
    assert total >= 100 and burning >= 20, (burning, total, stderr)
    assert named >= 0.95 * total, (named, total, stderr)


REUSE = r'''
import os, sys, time
stop = time.monotonic() + float(sys.argv[1])
print("ready", os.getpid(), flush=True)
k = 0
while time.monotonic() < stop:
    # A new code object per round, named after k, its first line k: freed at
    # the end of the round, so the next one often takes the same address.
    src = "\n" * (k % 500) + "def f_%d():\n    end = time.monotonic() + 0.003\n    while time.monotonic() < end:\n        pass\n" % k
    ns = {"time": time}
    exec(compile(src, "<gen>", "exec"), ns)
    ns["f_%d" % k]()
    del ns
    k += 1
'''


def test_reused_code_object_addresses_are_never_misnamed(tmp_path):
    script = tmp_path / "reuse.py"
    script.write_text(REUSE)
    proc = subprocess.Popen([pyenv_python("3.12"), str(script), "10"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        out = str(tmp_path / "r.pb.gz")
        r = run_agent(["--profile", "--pid", str(proc.pid), "--duration", "4s", "--quiet",
                       "--profile-output", out], cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
    finally:
        proc.kill()
        proc.wait()
    profile = read_profile(out)
    named = 0
    for f in profile.functions:
        m = re.match(r"f_(\d+)$", f.name)
        if m:
            named += 1
            # its own first line (k % 500 + 1): never another f_k's name on it
            assert f.start_line == int(m.group(1)) % 500 + 1, (f.name, f.start_line)
    assert named >= 20, named


def test_a_process_that_execs_into_python(tmp_path):
    """A shell that execs CPython during the capture: examined at the exec."""
    py = pyenv_python("3.12")
    proc = subprocess.Popen(["/bin/sh", "-c", "echo ready $$; sleep 1.5; exec %s %s 6" % (py, PY_WALK)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        stacks, stderr = capture(tmp_path, proc.pid, "4s")
    finally:
        proc.kill()
        proc.wait()
    names = [n for frames, _, v in stacks for n, _, _ in frames]
    assert "round_robin" in names and "spin" in names, stderr


def test_a_target_killed_mid_capture(tmp_path):
    proc, _ = run_host_target(pyenv_python("3.13"), tmp_path)
    killer = threading.Timer(1.5, proc.kill)
    killer.start()
    try:
        stacks, stderr = capture(tmp_path, proc.pid, "6s")
    finally:
        killer.cancel()
        proc.wait()
    assert "exited" in stderr, stderr
    total = sum(v[0] for _, _, v in stacks)
    named = sum(v[0] for frames, _, v in stacks if any(n == "spin" for n, _, _ in frames))
    # (78-100% seen: on a loaded machine more of the short capture is start-up.)
    assert total >= 30 and named >= 0.7 * total, (named, total, stderr)


def test_all_processes_and_launch_mode(tmp_path):
    """-a names a Python process found at the start; launch mode names the
    command it starts (examined at its exec)."""
    proc, _ = run_host_target(pyenv_python("3.10"), tmp_path)
    try:
        out = str(tmp_path / "all.pb.gz")
        r = run_agent(["--profile", "-a", "--duration", "3s", "--quiet", "--profile-output", out],
                      cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
    finally:
        proc.kill()
        proc.wait()
    mine = [(frames, v) for frames, labels, v in python_frames(read_profile(out))
            if str(labels["pid"]) == str(proc.pid)]
    total = sum(v[0] for _, v in mine)
    chained = sum(v[0] for frames, v in mine
                  if [n for n, _, _ in frames][:3] == ["<module>", "main", "round_robin"])
    assert total >= 50 and chained >= 0.95 * total, (chained, total, r.stderr)

    out = str(tmp_path / "launch.pb.gz")
    r = run_agent(["--profile", "--quiet", "--profile-output", out, "--", pyenv_python("3.9"), PY_WALK, "3"],
                  cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    stacks = python_frames(read_profile(out))
    total = sum(v[0] for _, _, v in stacks)
    chained = sum(v[0] for frames, _, v in stacks
                  if [n for n, _, _ in frames][:3] == ["<module>", "main", "round_robin"])
    assert total >= 150 and chained >= 0.9 * total, (chained, total, r.stderr)


EMBED_SCRIPT = r'''
import embedmod, os, time
def g():
    end = time.monotonic() + 0.05
    x = 0
    while time.monotonic() < end:
        x += 1
def f():
    embedmod.native_cb(g)
print("ready", os.getpid(), flush=True)
stop = time.monotonic() + 8
while time.monotonic() < stop:
    f()
'''


def start_embed(tmp_path, minor: str, seconds: int = 8):
    """py_embed (a C program running EMBED_SCRIPT, which calls back into C
    and on into Python) built against pyenv's CPython ``minor``, started."""
    python = pyenv_python(minor)
    prefix = os.path.dirname(os.path.dirname(python))
    config = os.path.join(prefix, "bin", "python%s-config" % minor)
    cflags = subprocess.run([config, "--includes"], stdout=subprocess.PIPE, text=True, check=True).stdout.split()
    prog = str(tmp_path / "py_embed")
    subprocess.run(["gcc", "-O1", "-g", *cflags, "-o", prog, os.path.join(PROGRAMS, "py_embed.c"),
                    "-L%s/lib" % prefix, "-lpython%s" % minor, "-Wl,-rpath,%s/lib" % prefix], check=True)
    script = tmp_path / "embed.py"
    script.write_text(EMBED_SCRIPT.replace("+ 8\n", "+ %d\n" % seconds))
    return subprocess.Popen([prog, str(script)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONHOME=prefix))


@pytest.mark.parametrize("minor", ["3.10", "3.12", "3.13"])
def test_python_frames_sit_at_their_depth_among_native_frames(tmp_path, minor):
    """3.10: runs placed by eval-frame order; 3.12/3.13: by C-stack link."""
    proc = start_embed(tmp_path, minor)
    out = str(tmp_path / "embed.pb.gz")
    try:
        assert proc.stdout.readline().startswith("ready")
        r = run_agent(["--profile", "--pid", str(proc.pid), "--duration", "3s", "--quiet",
                       "--profile-output", out], cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
    finally:
        proc.kill()
        proc.wait()
    from conftest import sample_stacks
    total = good = 0
    order = ["main", "c_outer", "<module>", "f", "native_cb", "native_middle", "g"]
    for names, labels, v in sample_stacks(read_profile(out)):
        if "g" not in names:
            continue
        total += v[0]
        positions = [names.index(n) if n in names else -1 for n in order]
        if -1 not in positions and positions == sorted(positions) \
                and names.index("g") > names.index("native_middle"):
            # nothing Python between native_cb and g but g itself
            between = names[names.index("native_cb"):names.index("g")]
            if "f" not in between and "<module>" not in between:
                good += v[0]
    assert total >= 100, r.stderr
    assert good >= 0.95 * total, (good, total, r.stderr)


EMBED_PYTHON = {"<module>", "f", "g"}


def _to_python_leaf(names):
    """Root-first user frames (user_stacks) down to the innermost Python
    frame: the interpreter's leaves below it are many, each sampled a few
    times."""
    cut = max((i for i, n in enumerate(names) if n in EMBED_PYTHON), default=-1)
    return tuple(names[:cut + 1])


@pytest.mark.parametrize("minor", ["3.8", "3.10", "3.11", "3.12", "3.13"])
def test_kernel_and_user_walks_merge_python_frames_alike(tmp_path, minor):
    """The user stack walked in the kernel (Python links placed there,
    3.11+; by eval-frame order, 3.8-3.10) and in the agent (by each frame's
    stack pointer): the same merged Python and native stacks, frame for
    frame, through C into Python and back, and most stacks walked in the
    kernel."""
    from collections import Counter
    from conftest import user_stacks
    proc = start_embed(tmp_path, minor, 40)
    got, errs = {}, {}
    try:
        assert proc.stdout.readline().startswith("ready")
        for where in ("kernel", "user"):
            out = str(tmp_path / ("%s.pb.gz" % where))
            r = run_agent(["--profile", "--pid", str(proc.pid), "--duration", "3s", "--unwind", "dwarf",
                           "--unwind-in", where, "--sample-rate", "499", "--profile-output", out],
                          cwd=str(tmp_path))
            assert r.returncode == 0, r.stderr
            errs[where] = r.stderr
            c = got[where] = Counter()
            for names, _labels, v in user_stacks(read_profile(out)):
                c[_to_python_leaf(names)] += v[0]
    finally:
        proc.kill()
        proc.wait()
    order = ["main", "c_outer", "<module>", "f", "native_cb", "native_middle", "g"]
    for where, c in got.items():
        total = sum(c.values())
        assert total >= 100, errs[where]
        whole = sum(n for chain, n in c.items() if chain and chain[-1] == "g"
                    and [x for x in chain if x in order] == order)
        assert whole >= 0.9 * total, (where, whole, total, c.most_common(3))
    for a, b in ((got["kernel"], got["user"]), (got["user"], got["kernel"])):
        same = sum(n for chain, n in a.items() if chain in b)
        assert same >= 0.95 * sum(a.values()), (same, a.most_common(3), b.most_common(3))
    m = re.search(r"unwound (\d+) user stacks in the kernel: .*?(\d+) fell back", errs["kernel"])
    assert m, errs["kernel"]
    walked, fell_back = int(m.group(1)), int(m.group(2))
    assert walked >= 0.5 * (walked + fell_back), errs["kernel"]
