"""The library API (perfagent.api), used as a vendoring program would.

The README's example is run as it is written; the command line's
behaviours the API shares (targets, errors) are checked through it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, agent_env
from perfagent.pprof.decode import read_profile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")


def readme_example() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    m = re.search(r"<!-- api-example:[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "the README's API example is missing"
    return m.group(1)


def test_readme_example_runs(tmp_path, chain_bin):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    target = subprocess.Popen([chain_bin, "20"], stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline().startswith("ready")
        r = subprocess.run([sys.executable, str(script), str(target.pid)], cwd=str(tmp_path), env=agent_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        target.kill()
        target.wait()
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""                           # a library prints nothing of its own
    assert "leaf" in r.stdout and "flat%" in r.stdout
    n = int(re.search(r"(\d+) samples", r.stdout).group(1))
    assert n >= 200, r.stdout                       # 2 s of a busy thread at 199 Hz
    prof = read_profile(str(tmp_path / "cpu.pb.gz"))
    assert sum(s.values[0] for s in prof.samples) == n
    folded = (tmp_path / "cpu.folded").read_text().splitlines()
    assert any(";a;b;c;leaf " in line for line in folded), folded[:3]
    svg = (tmp_path / "flame.svg").read_text()
    assert svg.startswith("<?xml") and "leaf" in svg


def test_command_and_offcpu_and_errors(tmp_path, chain_bin):
    import perfagent
    from perfagent.errors import CaptureError, PerfAgentError
    prof = perfagent.profile(command=[chain_bin, "1"])
    assert prof.samples >= 50
    assert "leaf" in prof.top(10)
    off = perfagent.profile(command=["sh", "-c", "sleep 0.3; sleep 0.3"], offcpu=True)
    assert off.samples >= 2
    assert "nanosleep" in off.folded() or "sleep" in off.folded()
    with pytest.raises(CaptureError, match="no such process"):
        perfagent.Capture(pid=0x3FFFFFF0).start()
    with pytest.raises(PerfAgentError):
        perfagent.Capture()
    with pytest.raises(PerfAgentError, match="unexpected keyword"):
        perfagent.Capture(pid=1, sampel_rate=3)


def test_command_line_is_built_on_the_same_capture():
    """run.py drives perfagent.session.Capture, which perfagent.api wraps:
    no second capture path beside the API."""
    import perfagent.api as api
    import perfagent.run as run
    import perfagent.session as session
    assert api._Session is session.Capture
    assert run.Capture is session.Capture


MASTER = r'''
import os, sys, time
def worker_loop(stop):
    x = 0
    while time.monotonic() < stop:
        x += 1
stop = time.monotonic() + float(sys.argv[1])
pids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        worker_loop(stop)
        os._exit(0)
    pids.append(pid)
print("ready", os.getpid(), *pids, flush=True)
while time.monotonic() < stop:   # the master idles, like gunicorn's arbiter
    time.sleep(0.2)
for p in pids:
    os.waitpid(p, 0)
'''


def test_children_of_a_master_and_the_hint(tmp_path):
    from conftest import run_agent, sample_stacks
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    py = "/root/.pyenv/versions/3.12.1/bin/python3.12"
    if not os.path.exists(py):
        pytest.skip("needs pyenv's 3.12")
    master = subprocess.Popen([py, str(script), "15"], stdout=subprocess.PIPE, text=True)
    try:
        fields = master.stdout.readline().split()
        assert fields[0] == "ready"
        workers = {int(p) for p in fields[2:]}
        plain = run_agent(["--profile", "--pid", str(master.pid), "--duration", "2s", "--quiet",
                           "--profile-output", str(tmp_path / "plain.pb.gz")], cwd=str(tmp_path))
        kids = run_agent(["--profile", "--pid", str(master.pid), "--children", "--duration", "2s", "--quiet",
                          "--profile-output", str(tmp_path / "kids.pb.gz")], cwd=str(tmp_path))
    finally:
        master.kill()
        for p in (workers if 'workers' in dir() else ()):
            try:
                os.kill(p, 9)
            except OSError:
                pass
        master.wait()
    assert plain.returncode == 0 and kids.returncode == 0, (plain.stderr, kids.stderr)
    assert "add --children" in plain.stderr, plain.stderr
    assert "add --children" not in kids.stderr
    stacks = sample_stacks(read_profile(str(tmp_path / "kids.pb.gz")))
    by_pid = {}
    for names, labels, v in stacks:
        by_pid[labels["pid"]] = by_pid.get(labels["pid"], 0) + v[0]
    for w in workers:
        assert by_pid.get(w, 0) >= 10, by_pid   # each worker is profiled (busy: ~200 on an idle machine)
    named = sum(v[0] for names, labels, v in stacks if labels["pid"] in workers and "worker_loop" in names)
    assert named >= 0.9 * sum(by_pid.get(w, 0) for w in workers)
