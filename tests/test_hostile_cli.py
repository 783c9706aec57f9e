"""Hostile input, faults and losses, through the command line as a user meets them.

Each test is a regression test for a defect of issue 11: the capture must
end on time, write its profile, name the right file or nothing, and count
what it lost, whatever the target's files and other users do.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest

from conftest import PROGRAMS, agent_env, compile_c, run_agent, sample_stacks
from perfagent.pprof.decode import read_profile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")

# A bound on how long a capture may take before the test calls it hung (not
# a measurement: a 2 s capture takes a few seconds; a hang takes forever).
HANG = 60


def start(argv, **kw) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **kw)
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def set_debuglink(binary: str, name: bytes, crc: int = 0) -> None:
    """Replace the binary's .gnu_debuglink with ``name`` (any bytes) and ``crc``."""
    body = name + b"\0"
    body += b"\0" * (-len(body) % 4) + struct.pack("<I", crc)
    section = binary + ".debuglink"
    with open(section, "wb") as f:
        f.write(body)
    subprocess.run(["objcopy", "--remove-section", ".gnu_debuglink", binary], check=True)
    subprocess.run(["objcopy", "--add-section", ".gnu_debuglink=" + section, binary], check=True)


@pytest.fixture
def stripped_chain(tmp_path) -> str:
    """chain.c built without frame pointers, stripped of .symtab (names must
    come from a debug file, which the test plants)."""
    out = str(tmp_path / "bin" / "chain")
    os.makedirs(os.path.dirname(out))
    compile_c(os.path.join(PROGRAMS, "chain.c"), out, ["-O2", "-pthread", "-Wl,--build-id=none"])
    subprocess.run(["strip", "--strip-all", out], check=True)
    return out


def capture_pid(tmp_path, pid: int, *extra: str, duration: str = "2s"):
    out = str(tmp_path / "p.pb.gz")
    started = time.monotonic()
    r = run_agent(["--profile", "--pid", str(pid), "--duration", duration, "--quiet",
                   "--profile-output", out, *extra], cwd=str(tmp_path), timeout=HANG)
    return r, out, time.monotonic() - started


@pytest.mark.parametrize("plant", ["dev-zero-name", "fifo", "symlink-to-dev-zero"])
def test_hostile_debuglink_does_not_hang(tmp_path, stripped_chain, plant):
    """A debuglink name of ../../../../../../dev/zero, or a FIFO / a symlink
    to /dev/zero planted where the debug file would be: the capture ends on
    time and writes its profile (the binary's frames keep .dynsym names or
    addresses)."""
    if plant == "dev-zero-name":
        set_debuglink(stripped_chain, b"../../../../../../dev/zero")
    else:
        set_debuglink(stripped_chain, b"chain.debug")
        planted = os.path.join(os.path.dirname(stripped_chain), "chain.debug")
        if plant == "fifo":
            os.mkfifo(planted)
        else:
            os.symlink("/dev/zero", planted)
    target = start([stripped_chain, "30"])
    try:
        r, out, took = capture_pid(tmp_path, target.pid)
    finally:
        stop(target)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    stacks = sample_stacks(read_profile(out))
    assert sum(v[0] for _, _, v in stacks) >= 50, r.stderr


def write_big_debug_file(path: str, count: int) -> None:
    """A debug-only ELF64 file whose .symtab holds ``count`` functions: slow
    for any symbolizer to read in full (tens of MB of symbols)."""
    strtab = bytearray(b"\0")
    syms = bytearray(b"\0" * 24)
    sym = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
    for i in range(count):
        name_off = len(strtab)
        strtab += b"f%08d\0" % i
        syms += sym.pack(name_off, 0x12, 0, 1, 0x100000 + 16 * i, 16)  # GLOBAL FUNC
    shstrtab = b"\0.strtab\0.symtab\0.shstrtab\0"
    ehdr = struct.Struct("<16sHHIQQQIHHHHHH")
    shdr = struct.Struct("<IIQQQQIIQQ")
    data_off = ehdr.size
    strtab_off = data_off
    symtab_off = strtab_off + len(strtab)
    symtab_off += -symtab_off % 8
    shstr_off = symtab_off + len(syms)
    sh_off = shstr_off + len(shstrtab)
    sh_off += -sh_off % 8
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ehdr.pack(ident, 1, 62, 1, 0, 0, sh_off, 0, ehdr.size, 0, 0, shdr.size, 4, 3)
    sections = [
        shdr.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        shdr.pack(1, 3, 0, 0, strtab_off, len(strtab), 0, 0, 1, 0),          # .strtab
        shdr.pack(9, 2, 0, 0, symtab_off, len(syms), 1, 1, 8, 24),          # .symtab
        shdr.pack(17, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0),        # .shstrtab
    ]
    with open(path, "wb") as f:
        f.write(header)
        f.write(bytes(strtab))
        f.write(b"\0" * (symtab_off - strtab_off - len(strtab)))
        f.write(bytes(syms))
        f.write(shstrtab)
        f.write(b"\0" * (sh_off - shstr_off - len(shstrtab)))
        f.write(b"".join(sections))


def test_sigterm_during_long_symbolization_writes_within_a_second(tmp_path, stripped_chain):
    debug = os.path.join(os.path.dirname(stripped_chain), "chain.debug")
    write_big_debug_file(debug, 2_000_000)
    with open(debug, "rb") as f:
        set_debuglink(stripped_chain, b"chain.debug", zlib.crc32(f.read()))
    target = start([stripped_chain, "60"])
    out = str(tmp_path / "p.pb.gz")
    try:
        agent = subprocess.Popen([sys.executable, "-m", "perfagent", "--profile", "--pid", str(target.pid),
                                  "--duration", "1s", "--quiet", "--profile-output", out],
                                 cwd=str(tmp_path), env=agent_env(), stderr=subprocess.PIPE, text=True)
        # Sampling ends after 1 s; the debug file's 2 million symbols then keep
        # the symbolizer busy for many seconds.  SIGTERM in the middle of it:
        time.sleep(3.0)
        assert agent.poll() is None, "finished before the signal: the test proves nothing"
        agent.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = agent.communicate(timeout=HANG)
        took = time.monotonic() - sent
    finally:
        stop(target)
    assert agent.returncode == 0, stderr
    assert took < 5.0, "took %.1f s after SIGTERM to write the profile" % took
    assert "while finishing" in stderr, stderr
    stacks = sample_stacks(read_profile(out))
    assert sum(v[0] for _, _, v in stacks) >= 50, stderr


def test_second_signal_after_cancel_exits_at_once(tmp_path, stripped_chain):
    debug = os.path.join(os.path.dirname(stripped_chain), "chain.debug")
    write_big_debug_file(debug, 2_000_000)
    with open(debug, "rb") as f:
        set_debuglink(stripped_chain, b"chain.debug", zlib.crc32(f.read()))
    target = start([stripped_chain, "60"])
    try:
        agent = subprocess.Popen([sys.executable, "-m", "perfagent", "--profile", "--pid", str(target.pid),
                                  "--duration", "20s", "--quiet", "--profile-output", str(tmp_path / "p.pb.gz")],
                                 cwd=str(tmp_path), env=agent_env(), stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        agent.send_signal(signal.SIGINT)   # stop sampling: finishing starts
        time.sleep(1.0)
        agent.send_signal(signal.SIGINT)   # cancel the long symbolization
        time.sleep(0.2)
        if agent.poll() is None:
            agent.send_signal(signal.SIGINT)  # exit at once
        _, stderr = agent.communicate(timeout=HANG)
    finally:
        stop(target)
    assert "Traceback" not in stderr
    # 130, or killed by the SIGINT itself when it lands after the handlers are gone (exit path)
    assert agent.returncode in (0, 128 + signal.SIGINT, -signal.SIGINT), stderr
    with open("/proc/%d/status" % os.getpid()):
        pass


def test_two_captures_in_one_minute_do_not_overwrite(tmp_path, chain_bin):
    target = start([chain_bin, "30"])
    try:
        agents = [subprocess.Popen([sys.executable, "-m", "perfagent", "--profile", "--pid", str(target.pid),
                                    "--duration", "1s", "--quiet"], cwd=str(tmp_path), env=agent_env(),
                                   stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for a in agents:
            _, err = a.communicate(timeout=HANG)
            assert a.returncode == 0, err
    finally:
        stop(target)
    written = sorted(p for p in os.listdir(str(tmp_path)) if p.endswith(".pb.gz"))
    assert len(written) == 2, written
    for name in written:
        assert sample_stacks(read_profile(str(tmp_path / name))), name


FORKER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) _exit(0);
        if (pid > 0) waitpid(pid, NULL, 0);
    }
    volatile unsigned long x = 0;
    for (unsigned long i = 0; i < 300000000UL; i++) x += i;
    printf("forked %d\n", n);
    return 0;
}
"""


@pytest.mark.parametrize("mode", [["--offcpu"], ["--profile", "--unwind", "fp"]])
def test_launch_mode_survives_ten_thousand_children(tmp_path, mode):
    src = tmp_path / "forker.c"
    src.write_text(FORKER)
    prog = compile_c(str(src), str(tmp_path / "forker"), ["-O1"])
    r = run_agent([*mode, "--quiet", "--profile-output", str(tmp_path / "on.pb.gz"),
                   "--offcpu-output", str(tmp_path / "off.pb.gz"), "--", prog, "10000"],
                  cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "processes not followed" not in r.stderr, r.stderr
    out = tmp_path / ("off.pb.gz" if mode[0] == "--offcpu" else "on.pb.gz")
    assert sample_stacks(read_profile(str(out))), r.stderr


PERF_MAP_POISON = "0 7fffffffffff poisoned::name\n"


def _fork_with_pid(pid: int, argv, uid: int, **kw) -> subprocess.Popen:
    """Start ``argv`` as ``uid`` with process id ``pid`` (via ns_last_pid)."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(argv, preexec_fn=lambda: (os.setgid(uid), os.setuid(uid)), **kw)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.skip("could not get pid %d back (busy machine)" % pid)


def test_pid_reuse_is_a_new_process(tmp_path):
    """A process that gets a pid of one that exited during the capture is a
    new process: the old one's uid (which decides whose perf map is trusted),
    comm and mappings do not carry over."""
    import pythons
    py = pythons.require_python("static")  # readable by other users (pyenv's are under /root)
    import tempfile
    shared = tempfile.mkdtemp(prefix="perfagent-reuse-", dir="/tmp")  # readable by uid 2000
    os.chmod(shared, 0o755)
    script = __import__("pathlib").Path(shared) / "spin.py"
    script.write_text("import os, sys, time\nprint('ready', os.getpid(), flush=True)\n"
                      "def work():\n    x = 0\n    for i in range(10000): x += i\n    return x\n"
                      "end = time.monotonic() + float(sys.argv[1])\n"
                      "while time.monotonic() < end: work()\n")
    os.chmod(str(script), 0o644)
    out = str(tmp_path / "a.pb.gz")
    # The first process, uid 1000, leaves a perf map claiming every address;
    # it exists when the capture starts, so the agent knows it (and its uid).
    first = subprocess.Popen([py, "-c", "import os,time;open('/tmp/perf-%%d.map' %% os.getpid(), 'w')"
                              ".write(%r);print('ready',flush=True);time.sleep(2.5)" % PERF_MAP_POISON],
                             stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: (os.setgid(1000), os.setuid(1000)))
    assert first.stdout.readline().startswith("ready")
    pid = first.pid
    poison = "/tmp/perf-%d.map" % pid
    agent = subprocess.Popen([sys.executable, "-m", "perfagent", "--profile", "-a", "--duration", "8s",
                              "--quiet", "--profile-output", out], cwd=str(tmp_path), env=agent_env(),
                             stderr=subprocess.PIPE, text=True)
    try:
        first.wait()
        assert os.stat(poison).st_uid == 1000
        time.sleep(0.5)
        # The second process, uid 2000, gets the same pid and runs JIT code
        # (CPython's perf trampoline); its own map cannot be written (the
        # file is 1000's), so its JIT frames must stay unnamed, not "poisoned".
        second = _fork_with_pid(pid, [py, "-X", "perf", str(script), "3"], 2000,
                                stdout=subprocess.PIPE, text=True)
        assert second.stdout.readline().startswith("ready")
        second.wait()
        _, stderr = agent.communicate(timeout=HANG)
    finally:
        if agent.poll() is None:
            agent.kill()
        os.unlink(poison)
        shutil.rmtree(shared, ignore_errors=True)
    assert agent.returncode == 0, stderr
    stacks = sample_stacks(read_profile(out))
    mine = [(names, labels, v) for names, labels, v in stacks if labels["pid"] == pid]
    assert sum(v[0] for _, _, v in mine) >= 50, stderr
    assert not any("poisoned::name" in names for names, _, _ in mine)
    # and the second process is named as itself, not as the first
    assert {labels["process"] for _, labels, _ in mine} == {"python3.13"}
