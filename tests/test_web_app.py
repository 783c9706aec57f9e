"""A Flask app under gunicorn, profiled as a user would (issue 13's test).

``perf-agent --profile --pid MASTER --children`` on a gunicorn master with
two sync workers serving two routes under load, then ``perf-agent report``:
the default (Python-first) table names the routes' hot functions, not
``_PyEval_EvalFrameDefault``; ``--cum`` shows the route functions; ``--lines``
gives file:line.  Flask and gunicorn come from a virtual environment that
tools/test.sh builds once per machine (tools/build_web_venv.sh): absent, the
test is skipped, or fails under ``PERFAGENT_REQUIRE_WEB_VENV=1`` (CI).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from typing import Dict, List, Tuple

import pytest

from conftest import PROGRAMS, run_agent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")

VENV = os.environ.get("PERFAGENT_WEB_VENV", "/var/cache/perfagent/venv-web")


@pytest.fixture(scope="module")
def gunicorn() -> str:
    exe = os.path.join(VENV, "bin", "gunicorn")
    if not os.access(exe, os.X_OK):
        if os.environ.get("PERFAGENT_REQUIRE_WEB_VENV") == "1":
            pytest.fail("PERFAGENT_REQUIRE_WEB_VENV=1 but %s is missing" % exe)
        pytest.skip("no flask/gunicorn virtual environment (run tools/build_web_venv.sh)")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """gunicorn with two workers, and two client threads keeping both routes busy."""

    def __init__(self, gunicorn: str, tmp_path) -> None:
        self.port = free_port()
        self.log = open(str(tmp_path / "gunicorn.log"), "w")
        self.proc = subprocess.Popen(
            [gunicorn, "-w", "2", "-b", "127.0.0.1:%d" % self.port, "--chdir", PROGRAMS, "web_app:app"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.stop = threading.Event()
        self.served: Dict[str, int] = {"/primes": 0, "/fib": 0}
        self._wait_ready()
        self.clients = [threading.Thread(target=self._hit, args=(path,), daemon=True) for path in self.served]
        for c in self.clients:
            c.start()

    def _get(self, path: str) -> str:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.port, path), timeout=30) as r:
            return r.read().decode()

    def workers(self) -> List[int]:
        return [int(p) for p in subprocess.run(["pgrep", "-P", str(self.proc.pid)], stdout=subprocess.PIPE,
                                               text=True).stdout.split()]

    def _wait_ready(self) -> None:
        """Both workers forked and one answering (gunicorn starts them in turn)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                if len(self.workers()) == 2:
                    self._get("/fib")
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("gunicorn did not start: %s" % open(self.log.name).read())
            time.sleep(0.1)

    def _hit(self, path: str) -> None:
        while not self.stop.is_set():
            self._get(path)
            self.served[path] += 1

    def close(self) -> None:
        self.stop.set()
        for c in self.clients:
            c.join(timeout=30)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def table(text: str) -> List[Tuple[float, float, str]]:
    """(flat%, cum%, name) of every row of a report table."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*\S+\s+([\d.]+)%\s+[\d.]+%\s+\S+\s+([\d.]+)%\s+(.+)$", line)
        if m:
            rows.append((float(m.group(1)), float(m.group(2)), m.group(3).strip()))
    return rows


def test_python_first_table_of_a_gunicorn_service(gunicorn, tmp_path):
    service = Service(gunicorn, tmp_path)
    try:
        assert len(service.workers()) == 2
        out = str(tmp_path / "cpu.pb.gz")
        r = run_agent(["--profile", "--pid", str(service.proc.pid), "--children", "--duration", "4",
                       "--profile-output", out], cwd=str(tmp_path))
    finally:
        service.close()
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "walked the stacks of 3 CPython processes" in r.stderr, r.stderr
    assert service.served["/primes"] > 0 and service.served["/fib"] > 0

    # The default table: Python first.  The two hot functions lead it and
    # hold nearly all the time (the rest is gunicorn, werkzeug, sockets).
    top = run_agent(["report", out], cwd=str(tmp_path))
    assert top.returncode == 0, top.stderr
    assert "View: Python first" in top.stdout
    rows = table(top.stdout)
    assert {name for _, _, name in rows[:2]} == {"count_primes", "fib"}, top.stdout
    assert rows[0][0] + rows[1][0] >= 70, top.stdout
    assert not any(name.startswith("_PyEval") for _, _, name in rows[:5]), top.stdout

    # The route functions with their cumulative share: each route's client
    # waits for its answer, so both are served all along.
    cum = {name: c for _, c, name in table(run_agent(["report", out, "--cum", "--top", "60"],
                                                      cwd=str(tmp_path)).stdout)}
    assert cum.get("primes_route", 0) >= 15 and cum.get("fib_route", 0) >= 15, cum
    assert cum.get("SyncWorker.handle_request", 0) >= 80, cum

    # file:line of the hot lines, as in the source.
    lines = run_agent(["report", "--lines", out], cwd=str(tmp_path)).stdout
    source = open(os.path.join(PROGRAMS, "web_app.py")).read().splitlines()
    named = re.findall(r"count_primes \(.*web_app\.py:(\d+)\)", lines)
    assert named, lines
    first, last = (i + 1 for i in (source.index("def count_primes(limit):"),
                                   source.index("    return found")))
    assert all(first < int(n) <= last for n in named), (named, lines)

    # The native view stays one flag away: the interpreter's own functions
    # (integer arithmetic, frame pushes) take back their time.
    native = table(run_agent(["report", out, "--native"], cwd=str(tmp_path)).stdout)
    flat = {name: f for f, _, name in native}
    assert flat["count_primes"] + flat["fib"] <= rows[0][0] + rows[1][0] - 10, native
    assert any(name.startswith(("PyLong_", "_PyLong_", "PyNumber_", "_PyFrame_")) for _, _, name in native[:8]), native
