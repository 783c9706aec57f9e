"""--offcpu end to end through the command line (the collector itself: test_offcpu.py)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import PROGRAMS, compile_c, contains_chain, run_agent, sample_stacks
from perfagent.pprof.decode import read_profile
from test_offcpu import TRUTH, read_truth

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs bpf() and perf_event_open as root")

BLOCKER_FLAGS = ["-O2", "-g", "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer",
                 "-fno-optimize-sibling-calls", "-pthread"]


@pytest.fixture(scope="module")
def blocker(programs_dir):
    return compile_c(os.path.join(PROGRAMS, "offcpu_blocker.c"), os.path.join(programs_dir, "blocker_cli"),
                     BLOCKER_FLAGS)


@pytest.fixture(scope="module")
def blocker_nofp(programs_dir):
    return compile_c(os.path.join(PROGRAMS, "offcpu_blocker.c"), os.path.join(programs_dir, "blocker_cli_nofp"),
                     ["-O2", "-fomit-frame-pointer", "-pthread"])


@pytest.mark.parametrize("build", ["frame pointers", "no frame pointers"])
def test_offcpu_pid_shares_stacks_and_total(build, blocker, blocker_nofp, tmp_path):
    # The default --unwind auto copies and unwinds the stacks: whole either way.
    blocker = blocker if build == "frame pointers" else blocker_nofp
    truth_file = str(tmp_path / "truth")
    with open(truth_file, "wb") as f:
        f.write(bytes(TRUTH.size))
    proc = subprocess.Popen([blocker, "30", truth_file], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = tmp_path / "off.pb.gz"
        before = read_truth(truth_file)
        r = run_agent(["--offcpu", "--pid", str(proc.pid), "--duration", "3s", "--offcpu-output", str(out)],
                      cwd=str(tmp_path))
        after = read_truth(truth_file)
    finally:
        proc.kill()
        proc.wait()
    assert r.returncode == 0, r.stderr
    assert "blocking episodes" in r.stderr
    prof = read_profile(str(out))
    assert [(t.type, t.unit) for t in prof.sample_type] == [("blocks", "count"), ("offcpu", "nanoseconds")]
    stacks = [s for s in sample_stacks(prof) if s[1]["tid"] == proc.pid]
    total = sum(v[1] for _, _, v in stacks)
    sleep_ns = sum(v[1] for n, _, v in stacks if contains_chain(n, ["main", "block_sleep"]))
    read_ns = sum(v[1] for n, _, v in stacks if contains_chain(n, ["main", "block_read"]))
    assert (sleep_ns + read_ns) / total >= 0.95  # the full stack from main
    truth = [b - a for a, b in zip(before, after)]
    want = truth[0] / sum(truth)  # 0.75 on an idle machine
    assert abs(sleep_ns / (sleep_ns + read_ns) - want) <= 0.03, (sleep_ns, read_ns, truth)
    wall = prof.duration_nanos
    assert abs(total - wall) <= 0.10 * wall, (total, wall)


def test_profile_and_offcpu_together_write_both(blocker, tmp_path):
    r = run_agent(["--profile", "--offcpu", "--duration", "2s", "--", blocker, "30"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(str(tmp_path)))
    assert any(n.endswith("-on-cpu.pb.gz") for n in names) and any(n.endswith("-off-cpu.pb.gz") for n in names)
    off = [n for n in names if n.endswith("-off-cpu.pb.gz")][0]
    stacks = sample_stacks(read_profile(str(tmp_path / off)))
    assert any("block_sleep" in n for n, _, _ in stacks)


def test_kernel_without_the_copy_helpers_gets_frame_pointer_stacks(blocker, tmp_path, monkeypatch, capsys):
    # As on a kernel before 5.15 (no bpf_task_pt_regs): the verifier refuses
    # the copying program; the run says so in one line and goes on with the
    # kernel's frame-pointer stacks (whole here: the fp build).
    from perfagent import cli
    from perfagent.bpf import asm
    monkeypatch.setitem(asm.HELPERS, "task_pt_regs", 99999)
    out = tmp_path / "off.pb.gz"
    proc = subprocess.Popen([blocker, "20"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        code = cli.main(["--offcpu", "--pid", str(proc.pid), "--duration", "1s", "--quiet",
                         "--offcpu-output", str(out)])
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    assert code == 0, err
    assert "off-CPU stack copies unavailable" in err and "frame pointers" in err, err
    assert "off-CPU: unwound" not in err
    stacks = sample_stacks(read_profile(str(out)))
    mine = [(n, v) for n, labels, v in stacks if labels["tid"] == proc.pid]
    assert sum(v[1] for n, v in mine if contains_chain(n, ["main", "block_sleep"])) > 0.5e9
