"""JIT (perf map) and vDSO frames in real captures, and bad ELF fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import PROGRAMS, agent_env, compile_c, run_agent, sample_stacks
from perfagent.capture import CaptureState
from perfagent.oncpu import build_profile
from perfagent.pprof.decode import decode_profile
from perfagent.symbolize.procmaps import MapEntry
from perfagent.symbolize.symbolizer import Symbolizer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")


@pytest.fixture(scope="module")
def special_bin(programs_dir):
    return compile_c(os.path.join(PROGRAMS, "special.c"), os.path.join(programs_dir, "special"), ["-O2"])


def capture(special_bin, mode, tmp_path, before=None):
    proc = subprocess.Popen([special_bin, mode, "6"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "ready"
        if before:
            before(proc.pid)
        out = tmp_path / ("%s.pb.gz" % mode)
        r = run_agent(["--profile", "--pid", str(proc.pid), "--duration", "1500ms",
                       "--profile-output", str(out)], cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        with open(str(out), "rb") as f:
            return decode_profile(f.read()), int(line[2], 16)
    finally:
        proc.kill()
        proc.wait()
        remove_perf_map(proc.pid)


def remove_perf_map(pid: int) -> None:
    """Killed targets leave their perf map; pids are reused, so a stale (or
    chowned, untrusted) map would poison a later test's process."""
    try:
        os.unlink("/tmp/perf-%d.map" % pid)
    except FileNotFoundError:
        pass


def leaf_share(profile, name):
    stacks = sample_stacks(profile)
    total = sum(v[0] for _, _, v in stacks)
    return sum(v[0] for names, _, v in stacks if names[-1] == name) / total


def test_jit_frames_named_from_perf_map(special_bin, tmp_path):
    prof, jit_addr = capture(special_bin, "jit", tmp_path)
    assert leaf_share(prof, "jit_spin_loop") >= 0.9
    jit_maps = [m for m in prof.mappings if m.filename == "[jit]"]
    assert len(jit_maps) == 1 and jit_maps[0].memory_start <= jit_addr < jit_maps[0].memory_limit


def test_untrusted_perf_map_is_ignored(special_bin, tmp_path):
    prof, jit_addr = capture(special_bin, "jit", tmp_path,
                             before=lambda pid: os.chown("/tmp/perf-%d.map" % pid, 12345, 12345))
    assert leaf_share(prof, "jit_spin_loop") == 0
    stacks = sample_stacks(prof)
    leaves = {names[-1] for names, _, _ in stacks}
    assert any(l.startswith("0x") and jit_addr <= int(l, 16) < jit_addr + 16 for l in leaves), leaves


def test_vdso_frames_named(special_bin, tmp_path):
    prof, _ = capture(special_bin, "vdso", tmp_path)
    stacks = sample_stacks(prof)
    vdso_ids = {m.id for m in prof.mappings if m.filename == "[vdso]"}
    if not vdso_ids:
        pytest.skip("clock_gettime does not run in the vDSO here (clocksource without vDSO support)")
    names = [n for n, _, _ in stacks]
    assert leaf_share(prof, "__vdso_clock_gettime") >= 0.5, names[:5]


def test_bad_elf_frames_keep_addresses_in_their_mapping(tmp_path):
    """A mapping whose file is not a valid ELF: the profile is written, frames are addresses."""
    bad = tmp_path / "libbroken.so"
    bad.write_bytes(b"\x7fELF" + b"\x02\x01\x01" + b"\xff" * 200)
    st = os.stat(str(bad))
    state = CaptureState()
    proc = state.process(4242)
    proc.maps_known = True
    proc.space.add_entry(MapEntry(0x10000, 0x20000, "r-xp", 0x1000, os.major(st.st_dev),
                                  os.minor(st.st_dev), st.st_ino, str(bad)))
    state.on_sample((4242, 4242, 0, 0, 10_000_000, 0x10010, (), (0x10010, 0x10100), None, None))
    state.resolve_pending()
    builder, table = build_profile(state, Symbolizer(), 99, 0, 1)
    prof = decode_profile(builder.encode())
    assert len(prof.samples) == 1
    (m,) = [m for m in prof.mappings if m.filename == str(bad)]
    addrs = [prof.location_by_id[l].address for l in prof.samples[0].location_ids]
    assert addrs == [0x10010, 0x100FF]  # leaf exact, caller return address - 1
    assert all(m.memory_start <= a < m.memory_limit for a in addrs)
    assert all(not prof.location_by_id[l].lines for l in prof.samples[0].location_ids)
    assert table.unsymbolized == 2


def _sampling(pid: int) -> bool:
    """Has the agent process opened its perf events yet?"""
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return False
    for fd in fds:
        try:
            if "perf_event" in os.readlink("/proc/%d/fd/%s" % (pid, fd)):
                return True
        except OSError:
            pass
    return False


def test_reused_jit_address_keeps_both_names(special_bin, tmp_path):
    """The perf map is re-read during the capture; each sample gets the name current when it was taken."""
    proc = subprocess.Popen([special_bin, "jitreuse", "30"], stdout=subprocess.PIPE, text=True)
    agent = None
    try:
        assert proc.stdout.readline().startswith("ready")
        out = tmp_path / "reuse.pb.gz"
        agent = subprocess.Popen([sys.executable, "-m", "perfagent", "--profile", "--pid", str(proc.pid),
                                  "--duration", "4s", "--profile-output", str(out)], cwd=str(tmp_path),
                                 env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The renaming happens 2 s into the sampling, however long the
        # agent took to start on a loaded machine.
        deadline = time.monotonic() + 60
        while not _sampling(agent.pid) and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(2.0)
        proc.send_signal(signal.SIGUSR1)
        _, err = agent.communicate(timeout=120)
        assert agent.returncode == 0, err
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        proc.kill()
        proc.wait()
        remove_perf_map(proc.pid)
    with open(str(out), "rb") as f:
        prof = decode_profile(f.read())
    first, second = leaf_share(prof, "jit_spin_loop"), leaf_share(prof, "jit_second")
    # Each phase lasts about half the capture; a loaded machine shifts the split.
    assert first > 0.1 and second > 0.1 and first + second > 0.9, (first, second)
