"""Messages a user can act on (issue 13 item 6), as the command line prints them."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import PROGRAMS, run_agent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")

PY_WALK = os.path.join(PROGRAMS, "py_walk.py")
PY311 = "/root/.pyenv/versions/3.11.7/bin/python3.11"


def start(argv):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("ready")
    return proc


def test_pid_mode_says_how_python_frames_were_obtained(tmp_path, chain_bin):
    if not os.path.exists(PY311):
        pytest.skip("needs pyenv's 3.11")
    py = start([PY311, PY_WALK, "20"])
    native = start([chain_bin, "20"])
    try:
        r = run_agent(["--profile", "--pid", str(py.pid), "--duration", "1s", "--quiet",
                       "--profile-output", str(tmp_path / "p.pb.gz")], cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert ("python: pid %d is CPython 3.11; its Python frames were read from the interpreter's memory"
                % py.pid) in r.stderr, r.stderr
        assert "1 process\n" in r.stderr or "1 process," in r.stderr or r.stderr.rstrip().endswith("1 process")
        r = run_agent(["--profile", "--pid", str(native.pid), "--duration", "1s", "--quiet",
                       "--profile-output", str(tmp_path / "n.pb.gz")], cwd=str(tmp_path))
        assert r.returncode == 0 and "python:" not in r.stderr, r.stderr
        # strict injection into a target that cannot have it names the alternative
        r = run_agent(["--profile", "--pid", str(py.pid), "--duration", "1s", "--quiet", "--inject-python",
                       "--profile-output", str(tmp_path / "i.pb.gz")], cwd=str(tmp_path))
        assert r.returncode == 1, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
        assert len(lines) == 1 and "python_too_old" in lines[0], r.stderr
        assert "without --inject-python, Python frames of CPython 3.8+ are read" in lines[0], r.stderr
    finally:
        for p in (py, native):
            p.kill()
            p.wait()


def test_children_flag_needs_pid(tmp_path):
    r = run_agent(["--profile", "-a", "--children"], cwd=str(tmp_path))
    assert r.returncode == 2 and "--children goes with --pid" in r.stderr
