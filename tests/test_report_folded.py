"""perf-agent report --folded: Brendan Gregg's folded stacks."""

from __future__ import annotations

import re

import pytest

from test_report_profiles import KNOWN_TOTAL, MS, known_folded_stacks, known_profile, run_report, write_profile_file

from perfagent.errors import ParseError
from perfagent.pprof.profile import ProfileBuilder
from perfagent.report.folded import folded_frame_label, folded_lines, read_folded
from perfagent.report.stacks import load_stacks

LINE = re.compile(r"^(\S.*) (-?\d+)$")


@pytest.fixture
def known_path(tmp_path) -> str:
    return write_profile_file(known_profile(), str(tmp_path / "known.pb.gz"))


def test_every_line_parses_and_counts_sum_to_total(known_path, capsys):
    code, out, err = run_report([known_path, "--folded"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines and all(LINE.match(line) for line in lines)
    assert sum(int(LINE.match(line).group(2)) for line in lines) == KNOWN_TOTAL * MS


@pytest.mark.parametrize("native", [False, True])
def test_round_trip_gives_the_profiles_stacks(known_path, capsys, native):
    _, out, _ = run_report([known_path, "--folded"] + (["--native"] if native else []), capsys)
    assert read_folded(out.splitlines()) == known_folded_stacks(native)


def test_kernel_jit_and_unsymbolized_frames(known_path, capsys):
    _, out, _ = run_report([known_path, "--folded", "--sample-index", "samples", "--native"], capsys)
    lines = set(out.splitlines())
    assert "main;compute;sys_write_[k] 2" in lines
    assert "main;jitted_[j] 1" in lines
    assert "main;0x1234 2" in lines
    assert "py_handler;leaf_b 5" in lines  # Python frames get no suffix


def test_folded_to_a_file_with_filters(known_path, tmp_path, capsys):
    target = tmp_path / "out.folded"
    code, out, err = run_report([known_path, "--folded", str(target), "--pid", "100"], capsys)
    assert code == 0, err
    assert out == ""  # only the file was asked for
    stacks = read_folded(target.read_text().splitlines())
    assert sum(stacks.values()) == 20 * MS
    assert all(stack[0] == "main" for stack in stacks)


def test_output_is_sorted_and_deterministic(known_path, capsys):
    _, first, _ = run_report([known_path, "--folded"], capsys)
    _, second, _ = run_report([known_path, "--folded"], capsys)
    assert first == second
    assert first.splitlines() == sorted(first.splitlines())


def test_inlined_frames_and_kernel_mapping_alias():
    builder = ProfileBuilder([("samples", "count")])
    exe = builder.add_mapping(0x1000, 0x2000, 0, "/bin/x")
    kallsyms = builder.add_mapping(0xffff0000, 0xffff1000, 0, "[kernel.kallsyms]")
    inner, outer, root = (builder.function_id(n) for n in ("inner", "outer", "root"))
    inlined = builder.location_id(exe, 0x1100, ((inner, 1), (outer, 2)))  # leaf first
    caller = builder.location_id(exe, 0x1200, ((root, 3),))
    kernel = builder.location_id(kallsyms, 0xffff0100, ((builder.function_id("do_syscall"), 0),))
    builder.add_sample((kernel, inlined, caller), (3,))
    lines = folded_lines(load_stacks(builder.to_profile(), 0))
    assert lines == ["root;outer;inner;do_syscall_[k] 3"]


def test_separator_in_a_name_is_replaced():
    assert folded_frame_label("operator;weird", "native") == "operator:weird"
    assert folded_frame_label("a b", "kernel") == "a b_[k]"


def test_reader_sums_repeats_and_rejects_garbage():
    assert read_folded(["a;b 1", "", "a;b 2", "c d;e 4"]) == {("a", "b"): 3, ("c d", "e"): 4}
    with pytest.raises(ParseError):
        read_folded(["a;b"])
    with pytest.raises(ParseError):
        read_folded([" 5"])
