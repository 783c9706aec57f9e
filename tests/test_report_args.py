"""perf-agent report: every flag works before or after the profile's file name."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Tuple

import pytest

from conftest import agent_env
from test_report_profiles import known_profile, run_report, write_profile_file

from perfagent.cli import main as cli_main

OUT = "@OUT@"  # replaced by an output path in the test's directory

# Every flag of `report` (with a value where it takes one). Each runs with
# the flags after FILE (the form that always worked) and before it; the
# outputs must be identical.
FLAG_SETS: List[List[str]] = [
    ["--top", "3"],
    ["--cum"],
    ["--cum", "--top", "2"],
    ["--tree"],
    ["--tree", "--min-percent", "10"],
    ["--folded"],
    ["--folded", "-"],
    ["--folded", OUT],
    ["--svg", OUT],
    ["--svg", "-"],
    ["--svg", OUT, "--title", "T"],
    ["--sample-index", "samples"],
    ["--native"],
    ["--lines"],
    ["--lines", "--folded"],
    ["--native", "--tree"],
    ["--focus", "compute"],
    ["--ignore", "recurse"],
    ["--pid", "100"],
    ["--tag-filter", "comm=app"],
    ["--tag-filter", "comm=app", "--tag-filter", "pid=100"],
    ["--folded", "--pid", "200", "--native"],
]


@pytest.fixture
def known_path(tmp_path) -> str:
    return write_profile_file(known_profile(), str(tmp_path / "known.pb.gz"))


def _run(argv: List[str], out_path: str, capsys) -> Tuple[int, str, str, str]:
    if os.path.exists(out_path):
        os.unlink(out_path)
    code, out, err = run_report([out_path if arg == OUT else arg for arg in argv], capsys)
    written = ""
    if os.path.exists(out_path):
        with open(out_path) as f:
            written = f.read()
    return code, out, err, written


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda flags: " ".join(flags))
def test_flags_before_and_after_the_file(known_path, tmp_path, capsys, flags):
    out_path = str(tmp_path / "out")
    after = _run([known_path] + flags, out_path, capsys)
    before = _run(flags + [known_path], out_path, capsys)
    assert after[0] == 0, after[2]
    assert before == after
    assert after[1] or after[3]  # something was shown or written
    if OUT in flags:
        assert after[3] and not after[1]


def test_folded_swallowing_the_file_name_means_stdout(known_path, capsys):
    """`report --folded cpu.pb.gz`: the word after --folded is the profile, folded to stdout."""
    code, out, err = run_report(["--folded", known_path], capsys)
    assert code == 0, err
    assert out == run_report([known_path, "--folded"], capsys)[1]
    assert "main;compute;leaf_a 10000000" in out.splitlines()


def test_folded_path_before_the_file_is_still_a_path(known_path, tmp_path, capsys):
    target = str(tmp_path / "out.folded")
    code, out, err = run_report(["--folded", target, known_path], capsys)
    assert code == 0, err
    assert out == ""
    with open(target) as f:
        assert f.read() == run_report([known_path, "--folded"], capsys)[1]


def test_middle_position(known_path, capsys):
    expected = run_report([known_path, "--native", "--top", "2", "--cum"], capsys)
    assert run_report(["--native", known_path, "--top", "2", "--cum"], capsys) == expected
    assert run_report(["--top", "2", known_path, "--cum", "--native"], capsys) == expected


def test_top_level_cli_dispatch(known_path, capsys):
    """`perf-agent report --folded FILE` through the top-level command."""
    assert cli_main(["report", "--folded", known_path]) == 0
    out = capsys.readouterr().out
    assert "main;compute;leaf_a 10000000" in out.splitlines()


def test_module_entry_point_with_flags_first(known_path):
    result = subprocess.run([sys.executable, "-m", "perfagent", "report", "--folded", "--native", known_path],
                            env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 0, result.stderr
    assert "py_handler;leaf_b 5000000" in result.stdout.splitlines()


def test_module_entry_point_writes_everything_before_its_fast_exit(known_path, tmp_path):
    """`python -m perfagent` ends through cli.exit_now (no interpreter
    teardown): what the command wrote to the buffered streams and files is
    all there, with its exit code."""
    svg = str(tmp_path / "f.svg")
    result = subprocess.run([sys.executable, "-m", "perfagent", "report", "--svg", svg, "--tree", known_path],
                            env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == subprocess.run(
        [sys.executable, "-c", "import sys; from perfagent.cli import main; sys.exit(main(sys.argv[1:]))",
         "report", "--tree", known_path], env=agent_env(), stdout=subprocess.PIPE,
        universal_newlines=True).stdout
    with open(svg) as f:
        assert f.read().rstrip().endswith("</svg>")
    code = ("import sys; from perfagent.cli import exit_now; sys.stdout.write('x' * 100000 + 'end'); "
            "sys.stderr.write('said'); exit_now(3)")
    result = subprocess.run([sys.executable, "-c", code], env=agent_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    assert (result.returncode, result.stdout, result.stderr) == (3, "x" * 100000 + "end", "said")


def test_fast_exit_into_a_closed_pipe_keeps_the_exit_code():
    """A stdout that cannot be flushed (the reader went away) leaves the
    exit to the interpreter, which reports the broken pipe; no hang, and
    no success claimed."""
    code = ("import os, sys; from perfagent.cli import exit_now; r, w = os.pipe(); os.close(r); "
            "os.dup2(w, 1); sys.stdout.write('x' * 100); exit_now(4)")
    result = subprocess.run([sys.executable, "-c", code], env=agent_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert result.returncode != 0
    assert "BrokenPipeError" in result.stderr


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: FILE"),
    (["--folded"], "the following arguments are required: FILE"),
    (["--tree", "--native"], "the following arguments are required: FILE"),
])
def test_missing_file_is_a_usage_error(capsys, argv, message):
    code, out, err = run_report(argv, capsys)
    assert code == 2 and out == ""
    assert err == "perf-agent: error: %s\n" % message


@pytest.mark.parametrize("flags", [["--folded", "--tree"], ["--svg", "-", "--tree"], ["--svg", "-", "--folded"]])
def test_two_views_on_stdout_is_a_usage_error(known_path, capsys, flags):
    code, out, err = run_report(flags + [known_path], capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "both print to stdout" in err
