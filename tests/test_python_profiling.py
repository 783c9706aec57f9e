"""Python function names in real profiles of CPython 3.13 (and any 3.12+ at hand).

Interpreters: the two 3.13 builds of tools/build_test_pythons.sh (shared and
static libpython, no frame pointers), and pyenv's 3.13 when present.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import pythons
from conftest import PROGRAMS, agent_env, run_agent, sample_stacks
from perfagent.pprof.decode import read_profile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")

PY_RATIO = os.path.join(PROGRAMS, "py_ratio.py")
PYENV_313 = "/root/.pyenv/versions/3.13.0/bin/python3.13"


def interpreter(kind: str) -> str:
    if kind == "pyenv":
        if not os.path.exists(PYENV_313):
            pytest.skip("no pyenv 3.13")
        return PYENV_313
    return pythons.require_python(kind)


KINDS = ["shared", "static", "pyenv"]


def python_stacks(profile):
    """Per sample: (Python function names root-first, all names, labels, values)."""
    funcs = {f.id: f for f in profile.functions}
    locs = {l.id: l for l in profile.locations}
    out = []
    for s in profile.samples:
        py = []
        for lid in reversed(s.location_ids):
            for line in reversed(locs[lid].lines):
                f = funcs[line.function_id]
                if f.filename.endswith(".py"):
                    py.append(f.name)
        out.append((py, s.values[0]))
    return out


def check_ratio_profile(path: str) -> None:
    stacks = python_stacks(read_profile(path))
    total = sum(n for _, n in stacks)
    assert total >= 100, total
    named = sum(n for py, n in stacks if py)
    assert named / total >= 0.90, (named, total)
    per_fn = {"fn1": 0, "fn2": 0, "fn3": 0}
    chained = 0
    for py, n in stacks:
        for fn in per_fn:
            if fn in py:
                per_fn[fn] += n
                # the chain main > round_robin > fn, in order
                i = py.index(fn)
                chained += n * (py[i - 2: i] == ["main", "round_robin"])
    fn_total = sum(per_fn.values())
    # (with injection, the one main() running when the trampoline went on
    # has no trampoline frame: at most its 100 ms lack "main")
    assert chained / fn_total >= 0.95, (chained, fn_total)
    assert fn_total / total >= 0.85
    for fn, want in (("fn1", 1 / 6), ("fn2", 2 / 6), ("fn3", 3 / 6)):
        share = per_fn[fn] / fn_total
        assert abs(share - want) <= 0.03, (fn, share, per_fn)


@pytest.mark.parametrize("kind", KINDS)
def test_launch_mode_names_python_functions(kind, tmp_path):
    python = interpreter(kind)
    out = tmp_path / "launch.pb.gz"
    r = run_agent(["--profile", "--inject-python", "--duration", "6s", "--sample-rate", "499",
                   "--profile-output", str(out), "--",
                   python, PY_RATIO, "30"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    try:
        check_ratio_profile(str(out))
    finally:
        for s in read_profile(str(out)).samples:
            for label in s.labels:
                if label.key == "pid":
                    remove_perf_map(int(label.num))


@pytest.mark.parametrize("kind", KINDS)
def test_plumbing_hidden_unless_asked(kind, tmp_path):
    python = interpreter(kind)
    outs = {}
    for flag in ([], ["--keep-native-frames"]):
        out = tmp_path / ("k%d.pb.gz" % len(flag))
        r = run_agent(["--profile", "--inject-python", "--duration", "2s", "--profile-output", str(out),
                       *flag, "--", python, PY_RATIO, "30"], cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        outs[bool(flag)] = sample_stacks(read_profile(str(out)))
    for keep, stacks in outs.items():
        between = 0
        for names, _, v in stacks:
            if "round_robin" in names and "main" in names:
                seg = names[names.index("main"): names.index("round_robin")]
                between += v[0] * ("_PyEval_EvalFrameDefault" in seg)
        assert (between > 0) == keep, (keep, between)
    # native code called by Python stays: time.thread_time's C function
    assert any("time_thread_time" in names for names, _, _ in outs[False])


def start_ready(argv):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    return proc


def stop_target(proc):
    proc.kill()
    _, err = proc.communicate()
    remove_perf_map(proc.pid)
    return err


def remove_perf_map(pid):
    """pids are reused: a map left behind would be appended to by a later process."""
    try:
        os.unlink("/tmp/perf-%d.map" % pid)
    except FileNotFoundError:
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_pid_injection_names_python_functions(kind, tmp_path):
    """No -X perf, no environment: the trampoline is switched on through ptrace."""
    python = interpreter(kind)
    proc = start_ready([python, PY_RATIO, "60"])
    try:
        out = tmp_path / "pid.pb.gz"
        r = run_agent(["--profile", "--inject-python", "--pid", str(proc.pid), "--duration", "6s",
                       "--sample-rate", "499",
                       "--profile-output", str(out)], cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert proc.poll() is None
    finally:
        err = stop_target(proc)
    assert err == ""
    check_ratio_profile(str(out))


def test_strict_refusals(chain_bin, tmp_path):
    old = "/usr/bin/python3.11"
    targets = [([chain_bin, "30"], "not_python")]
    if os.path.exists(old):
        targets.append(([old, PY_RATIO, "30"], "python_too_old"))
    for argv, reason in targets:
        proc = start_ready(argv)
        try:
            r = run_agent(["--profile", "--inject-python", "--pid", str(proc.pid), "--duration", "1s"],
                          cwd=str(tmp_path), timeout=60)
        finally:
            stop_target(proc)
        assert r.returncode == 1, r.stderr
        assert "pid=%d reason=%s" % (proc.pid, reason) in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_system_wide_mix_is_lenient(chain_bin, tmp_path):
    kinds = [k for k in ("shared", "static") if k in pythons.test_pythons()]
    if not kinds and not os.path.exists(PYENV_313):
        pytest.skip("no CPython 3.12+ here")
    new = [start_ready([pythons.test_pythons()[k], PY_RATIO, "60"]) for k in kinds]
    if not kinds:
        new.append(start_ready([PYENV_313, PY_RATIO, "60"]))
    others = [start_ready([chain_bin, "60"])]
    if os.path.exists("/usr/bin/python3.11"):
        others.append(start_ready(["/usr/bin/python3.11", PY_RATIO, "60"]))
    try:
        out = tmp_path / "all.pb.gz"
        r = run_agent(["--profile", "--inject-python", "-a", "--duration", "4s", "--profile-output", str(out)],
                      cwd=str(tmp_path), timeout=300)
    finally:
        errs = [stop_target(p) for p in new + others]
    assert r.returncode == 0, r.stderr
    assert all(e == "" for e in errs), errs
    if os.path.exists("/usr/bin/python3.11"):
        assert "pid=%d reason=python_too_old" % others[1].pid in r.stderr, r.stderr
    assert "inject-python: activated" in r.stderr and "not_python=" in r.stderr
    prof = read_profile(str(out))
    funcs = {f.id: f for f in prof.functions}
    locs = {l.id: l for l in prof.locations}
    for p in new:
        py = set()
        for s in prof.samples:
            labels = {l.key: (l.str or l.num) for l in s.labels}
            if labels.get("pid") == p.pid:
                for lid in s.location_ids:
                    py.update(funcs[ln.function_id].name for ln in locs[lid].lines
                              if funcs[ln.function_id].filename.endswith(".py"))
        assert {"fn1", "fn2", "fn3", "round_robin"} <= py, (p.args, sorted(py)[:10])


@pytest.mark.parametrize("kind", KINDS)
def test_deactivation_is_real(kind, tmp_path):
    python = interpreter(kind)
    proc = start_ready([python, os.path.join(PROGRAMS, "py_newfuncs.py"), "60"])
    perf_map = "/tmp/perf-%d.map" % proc.pid
    try:
        r = run_agent(["--profile", "--inject-python", "--pid", str(proc.pid), "--duration", "2s",
                       "--profile-output", str(tmp_path / "d.pb.gz")], cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        with open(perf_map) as f:
            grown = f.read()
        assert "fresh_" in grown  # it was on during the capture
        time.sleep(1.0)
        with open(perf_map) as f:
            later = f.read()
        assert later == grown  # and off afterwards: new functions add nothing
        assert proc.poll() is None
        with open("/proc/%d/status" % proc.pid) as f:
            assert "TracerPid:\t0" in f.read()
    finally:
        err = stop_target(proc)
        if os.path.exists(perf_map):
            os.unlink(perf_map)
    assert err == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_deactivation_on_signal(sig, tmp_path):
    python = pythons.test_pythons().get("shared") or (PYENV_313 if os.path.exists(PYENV_313) else None)
    if python is None:
        pytest.skip("no CPython 3.12+ here")
    proc = start_ready([python, os.path.join(PROGRAMS, "py_newfuncs.py"), "60"])
    perf_map = "/tmp/perf-%d.map" % proc.pid
    try:
        agent = subprocess.Popen([sys.executable, "-m", "perfagent", "--profile", "--inject-python", "--pid",
                                  str(proc.pid), "--duration", "60s", "--profile-output", str(tmp_path / "s.pb.gz")],
                                 env=agent_env(), stderr=subprocess.PIPE, text=True)
        time.sleep(3.0)
        agent.send_signal(sig)
        _, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err
        assert os.path.exists(str(tmp_path / "s.pb.gz"))
        with open(perf_map) as f:
            grown = f.read()
        assert "fresh_" in grown
        time.sleep(1.0)
        with open(perf_map) as f:
            assert f.read() == grown
    finally:
        err = stop_target(proc)
        if os.path.exists(perf_map):
            os.unlink(perf_map)
    assert err == ""
