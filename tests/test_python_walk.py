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
    "spin": {MARKS["spin-start"], MARKS["spin-loop"], MARKS["spin-body"]},
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


def capture(tmp_path, pid: int, duration: str = "4s", extra=()):
    out = str(tmp_path / "walk.pb.gz")
    watch = Watch(pid)
    watch.start()
    try:
        r = run_agent(["--profile", "--pid", str(pid), "--duration", duration, "--quiet",
                       "--profile-output", out, *extra], cwd=str(tmp_path))
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
    assert "python: walked the stacks of 1 CPython process" in stderr, stderr


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
