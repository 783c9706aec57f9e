"""Python function names in real profiles of CPython 3.13 (and any 3.12+ at hand).

Interpreters: the two 3.13 builds of tools/build_test_pythons.sh (shared and
static libpython, no frame pointers), and pyenv's 3.13 when present.
"""

from __future__ import annotations

import os
import subprocess

import pytest

import pythons
from conftest import PROGRAMS, run_agent, sample_stacks
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
    for py, n in stacks:
        for fn in per_fn:
            if fn in py:
                per_fn[fn] += n
                # the chain main > round_robin > fn, in order
                i = py.index(fn)
                assert py[i - 2: i] == ["main", "round_robin"], py
    fn_total = sum(per_fn.values())
    assert fn_total / total >= 0.85
    for fn, want in (("fn1", 1 / 6), ("fn2", 2 / 6), ("fn3", 3 / 6)):
        share = per_fn[fn] / fn_total
        assert abs(share - want) <= 0.03, (fn, share, per_fn)


@pytest.mark.parametrize("kind", KINDS)
def test_launch_mode_names_python_functions(kind, tmp_path):
    python = interpreter(kind)
    out = tmp_path / "launch.pb.gz"
    r = run_agent(["--profile", "--inject-python", "--duration", "6s", "--profile-output", str(out), "--",
                   python, PY_RATIO, "30"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    check_ratio_profile(str(out))


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
