"""What the benchmark scripts share (they run as ``python3 tools/bench_*.py``,
so this directory is on sys.path)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from typing import List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_python() -> str:
    """The host's own python3 (/usr/bin, /bin), as a user dropping the agent
    onto a machine runs it; this interpreter when the host has none.  A
    distribution's build (Debian's: PGO, LTO, libpython linked in) runs the
    agent's Python code about a quarter faster than pyenv's shared build."""
    return shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def agent(args, cwd, installed: str = "", python: str = ""):
    """The agent's command line and environment.  ``installed``: a directory
    holding a copy of the package with its modules compiled, as an
    installed copy has them; without it the repository's package runs with
    PYTHONDONTWRITEBYTECODE=1 and every import compiles its source (as a
    read-only copy without __pycache__ does).  ``python``: the interpreter
    (default: this one)."""
    env = dict(os.environ, PYTHONPATH=installed or REPO)
    if installed:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONPYCACHEPREFIX", None)
    return [python or sys.executable, "-S", "-m", "perfagent", *args], env


def install_agent(directory: str, python: str = "") -> str:
    """A copy of the package under ``directory``, compiled in place (its own
    __pycache__, never the repository's) by ``python`` (default: this
    interpreter); returns what goes on PYTHONPATH."""
    shutil.copytree(os.path.join(REPO, "perfagent"), os.path.join(directory, "perfagent"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPYCACHEPREFIX", None)
    subprocess.run([python or sys.executable, "-m", "compileall", "-q", os.path.join(directory, "perfagent")],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return directory


def children_cpu() -> float:
    """CPU seconds (user + sys) of every child waited for so far: the profiler
    runs measured as subprocesses."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


# The start of every agent driver: a child Python that imports the agent
# from this checkout and drives a Capture's drain loop itself, timing each
# cycle's work (without the wait for data); it reports one "STATS {json}"
# line on stderr (report()).
AGENT_PRELUDE = r'''
import json, os, resource, sys, time
sys.path.insert(0, %(repo)r)
from perfagent.session import Capture, CaptureOptions, DRAIN_INTERVAL

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

def maxrss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def drain_cycles(session, seconds, each=None):
    """Drain ``session`` for ``seconds``: each cycle's work in seconds;
    ``each(took)`` is called after every cycle."""
    cycles = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        session.sampler.wait(int(DRAIN_INTERVAL * 1000))
        t0 = time.perf_counter()
        session.drain()
        took = time.perf_counter() - t0
        cycles.append(took)
        if each is not None:
            each(took)
    return cycles

def report(stats):
    print("STATS " + json.dumps(stats), file=sys.stderr)
'''


def run_agent(script: str, args: List[str]) -> dict:
    """Run AGENT_PRELUDE + ``script`` (already formatted) with ``args``;
    the stats it reported (exits with its stderr when there are none)."""
    r = subprocess.run([sys.executable, "-c", AGENT_PRELUDE % {"repo": REPO} + script] + [str(a) for a in args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = [x for x in r.stderr.splitlines() if x.startswith("STATS ")]
    if not line:
        sys.exit("agent failed:\n" + r.stderr[-3000:])
    return json.loads(line[-1][6:])


def run_measured(cmd: List[str]) -> tuple:
    """Run ``cmd`` (output discarded, must succeed): (its CPU seconds, its
    peak RSS in KiB), from its own rusage (wait4), not every child's."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
    if p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, cmd)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss
