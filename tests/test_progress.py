"""The live progress line: on a terminal only, never on stdout, gone with --quiet."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

import pytest

from conftest import agent_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs perf_event_open as root")


def run_on_tty(args, cwd):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "perfagent", *args], cwd=cwd, env=agent_env(),
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=60)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode("utf-8", "replace")


def test_progress_line_on_a_terminal(tmp_path):
    rc, out, tty = run_on_tty(["--profile", "-a", "--duration", "2500ms", "--profile-output",
                               str(tmp_path / "p.pb.gz")], str(tmp_path))
    assert rc == 0, tty
    assert out == b""  # nothing on stdout
    assert "\r\x1b[Kperf-agent: 1s/2s" in tty or "\r\x1b[Kperf-agent: 2s/2s" in tty or "/2s  " in tty, tty
    assert re.search(r"\d+ samples?", tty) and "lost" in tty
    assert "wrote " in tty.splitlines()[-1] or any("wrote " in l for l in tty.splitlines())


def test_quiet_and_pipes_have_no_progress(tmp_path):
    rc, out, tty = run_on_tty(["--profile", "-a", "--quiet", "--duration", "1500ms", "--profile-output",
                               str(tmp_path / "q.pb.gz")], str(tmp_path))
    assert rc == 0 and "\x1b[K" not in tty and "wrote " in tty, tty  # (the pty itself turns \n into \r\n)
    r = subprocess.run([sys.executable, "-m", "perfagent", "--profile", "-a", "--duration", "1500ms",
                        "--profile-output", str(tmp_path / "r.pb.gz")], cwd=str(tmp_path), env=agent_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0 and "\r" not in r.stderr and r.stdout == ""
    # An idle machine may give a 1.5 s -a capture a single sample ("1 sample").
    assert "wrote " in r.stderr and re.search(r"\d+ samples?, \d+ lost", r.stderr), r.stderr
