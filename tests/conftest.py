"""Shared fixtures: test programs compiled once per session, running the agent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Sequence, Tuple

import pytest

# A shell without job control starts background commands with SIGINT
# ignored (`tools/test.sh &`), and an ignored signal stays ignored across
# exec: every agent the tests start would then ignore the Ctrl-C they send
# it.  The tests stand for a user at a terminal, where SIGINT has its default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = os.path.join(REPO, "tests", "programs")
sys.path.insert(0, os.path.join(REPO, "tests"))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Frame pointers and no sibling calls: every level of the chain is a frame the
# kernel's frame-pointer callchain can walk.
FP_CFLAGS = ["-O2", "-g", "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer",
             "-fno-optimize-sibling-calls",
             "-pthread", "-Wl,--build-id=sha1"]


def compile_c(source: str, out: str, flags: Sequence[str] = FP_CFLAGS) -> str:
    subprocess.run(["gcc", *flags, "-o", out, source], check=True)
    return out


@pytest.fixture(scope="session")
def programs_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("programs"))


@pytest.fixture(scope="session")
def chain_bin(programs_dir) -> str:
    return compile_c(os.path.join(PROGRAMS, "chain.c"), os.path.join(programs_dir, "chain"))


#: C flags of the FP-less test programs (the DWARF walkers' cases).
NOFP = ["-O2", "-g", "-fomit-frame-pointer"]


@pytest.fixture(scope="session")
def unwind_bin(programs_dir) -> str:
    """tests/programs/unwind.c without frame pointers, calling through the
    PLT into libunwhop.so (alloca, PLT, qsort callback chains)."""
    lib = os.path.join(programs_dir, "libunwhop.so")
    subprocess.run(["gcc", *NOFP, "-shared", "-fPIC", "-o", lib, os.path.join(PROGRAMS, "unwhop.c")], check=True)
    out = os.path.join(programs_dir, "unwind")
    subprocess.run(["gcc", *NOFP, "-o", out, os.path.join(PROGRAMS, "unwind.c"), "-L", programs_dir,
                    "-lunwhop", "-Wl,-rpath," + programs_dir], check=True)
    return out


def agent_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_agent(args: Sequence[str], cwd: str, timeout: float = 120,
              python: str = sys.executable, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m perfagent ARGS`` and capture its output."""
    return subprocess.run([python, "-m", "perfagent", *args], cwd=cwd, env=agent_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, **kw)


def sample_stacks(profile, kernel: bool = True) -> List[Tuple[List[str], Dict[str, str], List[int]]]:
    """(function names root-first, labels, values) for every sample of a
    decoded profile; without ``kernel``, the user-space frames only: a frame
    is the kernel's by its Location's mapping ("[kernel]"), not by its
    name, since the kernel part of a stack may start anywhere (a sample
    taken at syscall entry has no entry_SYSCALL frame)."""
    locs = {loc.id: loc for loc in profile.locations}
    funcs = {f.id: f for f in profile.functions}
    skip = set() if kernel else {m.id for m in profile.mappings
                                 if m.filename in ("[kernel]", "[kernel.kallsyms]")}
    out = []
    for s in profile.samples:
        names: List[str] = []
        for lid in s.location_ids:  # leaf first
            loc = locs[lid]
            if loc.mapping_id in skip:
                continue
            if loc.lines:
                names.extend(funcs[line.function_id].name for line in loc.lines)
            else:
                names.append("0x%x" % loc.address)
        labels = {lab.key: (lab.str if lab.str else lab.num) for lab in s.labels}
        out.append((names[::-1], labels, list(s.values)))
    return out


def user_stacks(profile) -> List[Tuple[List[str], Dict[str, str], List[int]]]:
    """sample_stacks with the user-space frames only."""
    return sample_stacks(profile, kernel=False)


def contains_chain(names: Sequence[str], chain: Sequence[str]) -> bool:
    """True when ``chain`` appears as consecutive frames of ``names`` (both root-first)."""
    n = len(chain)
    return any(list(names[i:i + n]) == list(chain) for i in range(len(names) - n + 1))


def sleeper_kernel_stack() -> List[str]:
    """The kernel's own lines for a blocked task's stack (/proc/PID/stack,
    "[<0>] NAME+0xOFF/0xSIZE"): a `sleep 30` caught in nanosleep; skips
    where the file needs a privilege the tests lack."""
    child = subprocess.Popen(["sleep", "30"])
    frames: List[str] = []
    try:
        for _ in range(200):
            try:
                with open("/proc/%d/stack" % child.pid) as f:
                    frames = f.read().splitlines()
            except PermissionError:
                pytest.skip("/proc/PID/stack needs root")
            if any("nanosleep" in f for f in frames):
                break
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    return frames
