"""End to end against the real kernel: capture real processes, decode, assert numbers.

Every test runs ``python -m perfagent`` as a user would and checks the
written profile with the package's decoder and with Go's pprof.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import contains_chain, run_agent, sample_stacks
from perfagent.pprof.decode import read_profile
from pprof_check import check_with_go_pprof

CHAIN = ["main", "a", "b", "c", "leaf"]
THREAD_CHAIN = ["worker", "spin", "a", "b", "c", "leaf"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")


def start_target(argv, **kw) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **kw)
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    return proc


def stop_target(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def readelf_build_id(path: str) -> str:
    out = subprocess.run(["readelf", "-n", path], stdout=subprocess.PIPE, text=True, check=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", out).group(1)


def chain_share(stacks, pid: int, chain=CHAIN) -> float:
    mine = [s for s in stacks if s[1]["pid"] == pid]
    assert mine, "no samples for pid %d" % pid
    total = sum(v[0] for _, _, v in mine)
    good = sum(v[0] for names, _, v in mine if contains_chain(names, chain[-5:]) and
               (chain[0] != "main" or contains_chain(names, chain)))
    return good / total


def test_pid_mode_chain_and_build_id(chain_bin, tmp_path):
    target = start_target([chain_bin, "8"])
    try:
        out = tmp_path / "p.pb.gz"
        r = run_agent(["--profile", "--pid", str(target.pid), "--duration", "2s",
                       "--profile-output", str(out), "--tag", "env=test"], cwd=str(tmp_path))
    finally:
        stop_target(target)
    assert r.returncode == 0, r.stderr
    prof = read_profile(str(out))
    stacks = sample_stacks(prof)
    samples = sum(v[0] for _, _, v in stacks)
    assert samples >= 150, (samples, r.stderr)  # 2 s at 99 Hz on one busy thread
    assert chain_share(stacks, target.pid) >= 0.90
    labels = stacks[0][1]
    assert labels["process"] == "chain" and labels["comm"] == "chain"
    assert labels["tid"] == target.pid
    maps = [m for m in prof.mappings if m.filename == chain_bin]
    assert maps and all(m.build_id == readelf_build_id(chain_bin) for m in maps)
    assert "env=test" in prof.comments
    assert [(t.type, t.unit) for t in prof.sample_type] == [("samples", "count"), ("cpu", "nanoseconds")]
    assert prof.period == 1_000_000_000 // 99
    # cpu nanoseconds: about 10 ms per sample at 99 Hz
    cpu_ns = sum(v[1] for _, _, v in stacks)
    assert 0.8e7 < cpu_ns / samples < 1.2e7
    # Locations lie inside their mapping.
    mappings = {m.id: m for m in prof.mappings}
    for loc in prof.locations:
        if loc.mapping_id:
            m = mappings[loc.mapping_id]
            assert m.memory_start <= loc.address < m.memory_limit
    check_with_go_pprof(str(out))


def test_launch_mode_chain_and_exit_status(chain_bin, tmp_path):
    out = tmp_path / "l.pb.gz"
    r = run_agent(["--profile", "--profile-output", str(out), "--", chain_bin, "1.5"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "exited with status 0" in r.stderr
    stacks = sample_stacks(read_profile(str(out)))
    pids = {s[1]["pid"] for s in stacks}
    assert len(pids) == 1
    assert chain_share(stacks, int(pids.pop())) >= 0.90
    check_with_go_pprof(str(out))


def test_launch_mode_reports_failing_status_and_duration_kill(chain_bin, tmp_path):
    r = run_agent(["--profile", "--", "sh", "-c", "exit 3"], cwd=str(tmp_path))
    assert r.returncode == 3 and "exited with status 3" in r.stderr, r.stderr
    t0 = time.monotonic()
    r = run_agent(["--profile", "--duration", "1s", "--", chain_bin, "30"], cwd=str(tmp_path))
    assert time.monotonic() - t0 < 20
    assert "terminated with SIGTERM" in r.stderr, r.stderr
    assert r.returncode == 0  # stopped by --duration, not a failure of the command
    files = sorted(os.listdir(str(tmp_path)))
    assert any(f.startswith("sh-") and f.endswith("-on-cpu.pb.gz") for f in files), files
    assert any(f.startswith("chain-") and f.endswith("-on-cpu.pb.gz") for f in files), files


def test_thread_no_record_named_is_named_from_proc_at_its_first_sample(chain_bin):
    """A thread created while the events were being opened (after /proc was
    read) has neither its FORK nor its rename in any ring: its first sample
    names it from /proc (it was labeled with the process's name, "chain"
    for "late", once in the full suite)."""
    from perfagent.capture import CaptureState
    target = start_target([chain_bin, "6", "1", "0.5"])
    try:
        state = CaptureState()
        assert state.load_from_proc(target.pid) is not None     # before "late" exists
        assert "late" not in state.thread_comm.values()
        deadline = time.monotonic() + 5
        late = None
        while late is None and time.monotonic() < deadline:
            for tid in os.listdir("/proc/%d/task" % target.pid):
                with open("/proc/%d/task/%s/comm" % (target.pid, tid)) as f:
                    if f.read().strip() == "late":
                        late = int(tid)
            time.sleep(0.01)
        assert late is not None
        state.add_counted(target.pid, late, (), (0x1000,), 1, 1000)
        assert state.thread_comm.get(late) == "late"
    finally:
        stop_target(target)


def test_multithreaded_and_late_thread(chain_bin, tmp_path):
    # One worker thread from the start and one "late" thread started 1 s in.
    target = start_target([chain_bin, "6", "1", "1.0"])
    try:
        out = tmp_path / "t.pb.gz"
        r = run_agent(["--profile", "--pid", str(target.pid), "--duration", "3s",
                       "--profile-output", str(out)], cwd=str(tmp_path))
    finally:
        stop_target(target)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\b0 lost\b", r.stderr), r.stderr
    stacks = sample_stacks(read_profile(str(out)))
    by_comm = {}
    for names, labels, values in stacks:
        by_comm.setdefault(labels["comm"], set()).add(labels["tid"])
    assert set(by_comm) >= {"chain", "worker", "late"}, by_comm
    late = [s for s in stacks if s[1]["comm"] == "late"]
    assert sum(v[0] for _, _, v in late) >= 50  # ~2 s of a busy thread sharing 2 CPUs
    assert all(l[1]["tid"] != target.pid and l[1]["pid"] == target.pid for l in late)
    total = sum(v[0] for _, _, v in late)
    good = sum(v[0] for names, _, v in late if contains_chain(names, ["a", "b", "c", "leaf"]))
    assert good / total >= 0.9


def test_system_wide_sees_two_processes(chain_bin, tmp_path):
    a_bin = str(tmp_path / "chainA")
    b_bin = str(tmp_path / "chainB")
    for p in (a_bin, b_bin):
        subprocess.run(["cp", chain_bin, p], check=True)
    ta, tb = start_target([a_bin, "6"]), start_target([b_bin, "6"])
    try:
        r = run_agent(["--profile", "-a", "--duration", "3s"], cwd=str(tmp_path))
    finally:
        stop_target(ta)
        stop_target(tb)
    assert r.returncode == 0, r.stderr
    outs = [f for f in os.listdir(str(tmp_path)) if re.fullmatch(r"\d{12}-on-cpu(-\d+)?\.pb\.gz", f)]
    assert len(outs) == 1, os.listdir(str(tmp_path))
    path = str(tmp_path / outs[0])
    stacks = sample_stacks(read_profile(path))
    for proc, comm in ((ta, "chainA"), (tb, "chainB")):
        mine = [s for s in stacks if s[1]["pid"] == proc.pid]
        assert mine, comm
        assert all(s[1]["process"] == comm for s in mine)
        assert sum(v[0] for _, _, v in mine) >= 60  # two busy processes on a shared 2-CPU machine
        assert chain_share(stacks, proc.pid) >= 0.9
    check_with_go_pprof(path)


def test_sigint_and_sigterm_still_write(chain_bin, tmp_path):
    target = start_target([chain_bin, "30"])
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            out = tmp_path / ("s%d.pb.gz" % sig)
            env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
            agent = subprocess.Popen([sys.executable, "-m", "perfagent", "--profile", "--pid",
                                      str(target.pid), "--duration", "60s", "--profile-output", str(out)],
                                     env=env, stderr=subprocess.PIPE, text=True)
            time.sleep(3.0)  # start-up on a loaded machine can take a second
            agent.send_signal(sig)
            _, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err
            assert "stopped by %s" % signal.Signals(sig).name in err
            stacks = sample_stacks(read_profile(str(out)))
            assert sum(v[0] for _, _, v in stacks) >= 50
            assert target.poll() is None  # the target never noticed
    finally:
        stop_target(target)


def test_target_exiting_mid_capture(chain_bin, tmp_path):
    target = start_target([chain_bin, "3"])  # outlives the agent's start-up (the kernel walk's verifier: ~1 s on a loaded VM)
    out = tmp_path / "e.pb.gz"
    t0 = time.monotonic()
    r = run_agent(["--profile", "--pid", str(target.pid), "--duration", "20s",
                   "--profile-output", str(out)], cwd=str(tmp_path))
    target.wait()
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 10
    assert "exited" in r.stderr
    stacks = sample_stacks(read_profile(str(out)))
    assert sum(v[0] for _, _, v in stacks) >= 50


def test_no_samples_still_writes_valid_profile(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        out = tmp_path / "z.pb.gz"
        r = run_agent(["--profile", "--pid", str(sleeper.pid), "--duration", "500ms",
                       "--profile-output", str(out)], cwd=str(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert r.returncode == 0, r.stderr
    assert "no samples" in r.stderr
    prof = read_profile(str(out))
    assert prof.samples == []
    check_with_go_pprof(str(out))


def test_default_name_never_overwrites(chain_bin, tmp_path):
    for _ in range(2):
        r = run_agent(["--profile", "--duration", "200ms", "--", chain_bin, "5"], cwd=str(tmp_path))
        assert "terminated" in r.stderr, r.stderr
    names = sorted(f for f in os.listdir(str(tmp_path)) if f.endswith(".pb.gz"))
    assert len(names) == 2
    # Same minute: the second gets "-1"; across a minute boundary the stamps differ.
    assert names[0] != names[1]


@pytest.mark.parametrize("args, exit_code, pattern", [
    (["--profile", "--pid", "999999999"], 1, r"--pid 999999999: no such process"),
    (["--profile", "--pid", "abc"], 2, r"--pid: not a process id"),
    (["--profile"], 2, r"nothing to profile"),
    (["-a"], 2, r"no mode selected: add --profile \(on-CPU sampling\) and/or --offcpu"),
    (["--profile", "-a", "--pid", "1"], 2, r"mutually exclusive"),
    (["--profile", "-a", "--sample-rate", "0"], 2, r"--sample-rate: must be a positive"),
    (["--profile", "-a", "--sample-rate", "x"], 2, r"--sample-rate: not an integer"),
    (["--profile", "-a", "--unwind", "lbr"], 2, r"--unwind: unknown mode 'lbr'"),
    (["--profile", "-a", "--duration", "ten"], 2, r"--duration: not a duration"),
    (["--profile", "-a", "--duration", "0s"], 2, r"--duration: duration must be positive"),
    (["--profile", "-a", "--tag", "novalue"], 2, r"--tag: tag must be key=value"),
    (["--profile", "-a", "--profile-output", "/nonexistent-dir/x.pb.gz"], 1,
     r"--profile-output: directory /nonexistent-dir does not exist"),
    (["--profile", "--", "/nonexistent/cmd"], 1, r"command not found: /nonexistent/cmd"),
    (["--profile", "--bogus"], 2, r"unrecognized arguments: --bogus"),
])
def test_error_messages(tmp_path, args, exit_code, pattern):
    r = run_agent(args, cwd=str(tmp_path), timeout=30)
    assert r.returncode == exit_code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in r.stderr


def test_unwritable_output_fails_before_capture(tmp_path):
    t0 = time.monotonic()
    r = run_agent(["--profile", "-a", "--duration", "30s", "--profile-output", "/proc/x.pb.gz"],
                  cwd=str(tmp_path), timeout=30)
    assert r.returncode == 1 and "not writable" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10  # refused before the 30 s capture
    r = run_agent(["--profile", "-a", "--duration", "30s", "--profile-output", str(tmp_path)],
                  cwd=str(tmp_path), timeout=30)
    assert r.returncode == 1 and "is a directory" in r.stderr, r.stderr


NOBODY = 65534


def _as_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_permission_errors_name_the_fix(tmp_path, chain_bin):
    """Unprivileged: reading another user's process and system-wide sampling are refused clearly."""
    python = "/usr/bin/python3.11" if os.path.exists("/usr/bin/python3.11") else None
    if python is None:
        pytest.skip("no system python readable by an unprivileged user")
    import tempfile
    shared = tempfile.mkdtemp(prefix="perfagent-nobody-", dir="/tmp")
    os.chmod(shared, 0o777)
    tmp_path = shared
    target = start_target([chain_bin, "10"])
    try:
        r = run_agent(["--profile", "--pid", str(target.pid), "--duration", "1s"], cwd=str(tmp_path),
                      python=python, preexec_fn=_as_nobody, timeout=30)
    finally:
        stop_target(target)
    assert r.returncode == 1, r.stderr
    assert "permission denied" in r.stderr and "CAP_SYS_PTRACE" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = run_agent(["--profile", "--pid", "1", "--duration", "1s", "--profile-output", "/root/x.pb.gz"],
                  cwd=str(tmp_path), python=python, preexec_fn=_as_nobody, timeout=30)
    assert r.returncode == 1 and "permission denied" in r.stderr, r.stderr
    with open("/proc/sys/kernel/perf_event_paranoid") as f:
        paranoid = int(f.read())
    if paranoid <= 0:
        pytest.skip("kernel.perf_event_paranoid <= 0 lets unprivileged users sample everything")
    r = run_agent(["--profile", "-a", "--duration", "1s"], cwd=str(tmp_path), python=python,
                  preexec_fn=_as_nobody, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "CAP_PERFMON" in r.stderr and "perf_event_paranoid" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_process_started_and_exited_during_capture_symbolizes(chain_bin, tmp_path):
    """Its mappings come only from MMAP2 records; it is gone before symbolization."""
    out = tmp_path / "short.pb.gz"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    agent = subprocess.Popen([sys.executable, "-m", "perfagent", "--profile", "-a", "--duration", "4s",
                              "--profile-output", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    short = subprocess.run([chain_bin, "1.5"], stdout=subprocess.PIPE, text=True, check=True)
    pid = int(short.stdout.split()[1])
    _, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    stacks = sample_stacks(read_profile(str(out)))
    mine = [s for s in stacks if s[1]["pid"] == pid]
    assert sum(v[0] for _, _, v in mine) >= 50, err  # ~150 when the machine is idle (1.5 s at 99 Hz)
    assert all(s[1]["process"] == "chain" for s in mine), sorted({s[1]["process"] for s in mine})
    assert chain_share(stacks, pid) >= 0.9


@pytest.mark.parametrize("flags", [[], ["--no-in-kernel"]])
def test_fp_in_kernel_aggregation_and_ring_buffer(chain_bin, tmp_path, flags):
    """--unwind fp counts stacks in the kernel by default; --no-in-kernel reads every sample."""
    target = start_target([chain_bin, "8", "1"])
    try:
        out = tmp_path / "fp.pb.gz"
        r = run_agent(["--profile", "--unwind", "fp", "--pid", str(target.pid), "--duration", "2s",
                       "--profile-output", str(out), *flags], cwd=str(tmp_path))
    finally:
        stop_target(target)
    assert r.returncode == 0, r.stderr
    assert "in-kernel aggregation unavailable" not in r.stderr
    stacks = sample_stacks(read_profile(str(out)))
    assert {s[1]["pid"] for s in stacks} == {target.pid}
    assert {s[1]["comm"] for s in stacks} >= {"chain", "worker"}
    assert chain_share(stacks, target.pid, chain=["a", "b", "c", "leaf"]) >= 0.9
    assert sum(v[0] for _, _, v in stacks) >= 100
    check_with_go_pprof(str(out))
