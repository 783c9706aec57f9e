"""perf-agent report: the top table, call tree, filters, units and error handling."""

from __future__ import annotations

import gzip
import os
import random
import re
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest

from conftest import REPO, agent_env
from test_report_profiles import (
    KNOWN_CUM, KNOWN_FLAT, KNOWN_TOTAL, PYTHON_FIRST_CUM, PYTHON_FIRST_FLAT, known_profile, run_report,
    write_profile_file,
)

from perfagent.report.units import ValueFormatter, format_percent

FIXTURE_GO_HEAP = os.path.join(REPO, "tests", "fixtures", "pprof_go_heap.pb.gz")
TREE_PATH_COLUMN = 39  # "%10s %7s %10s %7s  " before the call path
ROW = re.compile(r"^\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)  (.+)$")


@pytest.fixture
def known_path(tmp_path) -> str:
    return write_profile_file(known_profile(), str(tmp_path / "known.pb.gz"))


def top_rows(text: str) -> List[Tuple[str, str, str, str, str, str]]:
    """(flat, flat%, sum%, cum, cum%, name) per row, in printed order."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["flat", "flat%", "sum%", "cum", "cum%"])
    return [ROW.match(line).groups() for line in lines[header + 1:]]


def by_name(text: str) -> Dict[str, Tuple[str, ...]]:
    return {row[5]: row[:5] for row in top_rows(text)}


def ms(count: int) -> str:
    return "0" if count == 0 else "%dms" % count


# ------------------------------------------------------------------ top table


@pytest.mark.parametrize("flags, flats, cums", [
    ([], PYTHON_FIRST_FLAT, PYTHON_FIRST_CUM),  # the profile has a Python frame: Python first
    (["--native"], KNOWN_FLAT, KNOWN_CUM),
])
def test_top_table_matches_hand_computed_totals(known_path, capsys, flags, flats, cums):
    code, out, err = run_report([known_path, "--top", "0"] + flags, capsys)
    assert code == 0, err
    assert "Type: cpu" in out
    assert ("View: Python first" in out) == (not flags)
    assert "Showing nodes accounting for 32ms, 100% of 32ms total" in out
    rows = by_name(out)
    assert set(rows) == set(flats)
    for name, flat in flats.items():
        cum = cums[name]
        assert rows[name][0] == ms(flat), name
        assert rows[name][1] == format_percent(flat, KNOWN_TOTAL), name
        assert rows[name][3] == ms(cum), name
        assert rows[name][4] == format_percent(cum, KNOWN_TOTAL), name


def test_top_is_sorted_by_flat_with_running_sum(known_path, capsys):
    _, out, _ = run_report([known_path, "--top", "0", "--native"], capsys)
    rows = top_rows(out)
    flats = [KNOWN_FLAT[row[5]] for row in rows]
    assert flats == sorted(flats, reverse=True)
    assert rows[0][5] == "leaf_a" and rows[1][5] == "leaf_b"
    assert [row[2] for row in rows[:2]] == ["40.62%", "71.88%"]  # 13/32, 23/32
    assert rows[-1][2] == "100%"


def test_recursive_function_counts_once_per_sample(known_path, capsys):
    _, out, _ = run_report([known_path], capsys)
    assert by_name(out)["recurse"][3] == "4ms"  # three frames deep, 4 samples


def test_cum_sorts_by_cumulative(known_path, capsys):
    _, out, _ = run_report([known_path, "--cum", "--top", "3"], capsys)
    assert [row[5] for row in top_rows(out)] == ["main", "compute", "leaf_a"]
    assert "Showing top 3 nodes out of 9" in out


def test_top_limits_rows_and_header_counts_shown_flat(known_path, capsys):
    _, out, _ = run_report([known_path, "--top", "2", "--native"], capsys)
    assert [row[5] for row in top_rows(out)] == ["leaf_a", "leaf_b"]
    assert "Showing nodes accounting for 23ms, 71.88% of 32ms total" in out


def test_sample_index_picks_counts(known_path, capsys):
    _, out, _ = run_report([known_path, "--sample-index", "samples"], capsys)
    assert "Type: samples" in out
    assert by_name(out)["leaf_a"][0] == "13"
    assert "of 32 total" in out


def test_default_sample_type_is_honoured(tmp_path, capsys):
    profile = known_profile()
    profile.default_sample_type = "samples"
    path = write_profile_file(profile, str(tmp_path / "p.pb"), compressed=False)
    _, out, _ = run_report([path], capsys)
    assert "Type: samples" in out


# ------------------------------------------------------------------ filters


@pytest.mark.parametrize("flags, total, leaf_a_flat", [
    (["--focus", "^compute$"], 17, 10),
    (["--focus", "leaf_b|jitted"], 11, 0),
    (["--ignore", "compute"], 15, 3),
    (["--pid", "200"], 12, 0),
    (["--pid", "100"], 20, 13),
    (["--tag-filter", "comm=worker"], 7, 0),
    (["--tag-filter", "comm=app", "--tag-filter", "pid=100"], 20, 13),
    (["--tag-filter", "comm=worker", "--tag-filter", "pid=100"], 0, 0),
    (["--focus", "main", "--ignore", "recurse", "--pid", "200"], 3, 0),
])
def test_filters_change_totals(known_path, capsys, flags, total, leaf_a_flat):
    code, out, err = run_report([known_path, "--top", "0", "--sample-index", "samples"] + flags, capsys)
    assert code == 0, err
    assert re.search(r"of %d total$" % total, out, re.M), out
    rows = by_name(out)
    assert rows.get("leaf_a", ("0",))[0] == str(leaf_a_flat)


def test_focus_keeps_whole_stacks(known_path, capsys):
    _, out, _ = run_report([known_path, "--focus", "sys_write", "--sample-index", "samples"], capsys)
    rows = by_name(out)
    assert set(rows) == {"main", "compute", "sys_write"}
    assert rows["main"][3] == "2"


# ------------------------------------------------------------------ units


@pytest.mark.parametrize("unit, values, value, expected", [
    ("bytes", [1536], 1536, "1.50kB"),
    ("bytes", [35840, 1048576], 1048576, "1024kB"),
    ("bytes", [100, 10 * 1024 * 1024], 10 * 1024 * 1024, "10240kB"),  # 100x rule: unit of 100 x 100B
    ("bytes", [512], 512, "512B"),
    ("nanoseconds", [1500000000], 1500000000, "1.50s"),
    ("nanoseconds", [10000000, 3000000000], 3000000000, "3s"),
    ("nanoseconds", [50000000, 3000000000], 50000000, "50ms"),
    ("nanoseconds", [2500], 2500, "2.50us"),
    ("count", [32], 32, "32"),
    ("nanoseconds", [5], 0, "0"),
])
def test_value_formatting(unit, values, value, expected):
    assert ValueFormatter(unit, values).format(value) == expected


def test_percent_formatting():
    assert format_percent(0, 10) == "0%"
    assert format_percent(1, 3) == "33.33%"
    assert format_percent(5, 0) == "0%"


# ------------------------------------------------------------------ tree


def test_tree_indents_callees_under_callers(known_path, capsys):
    code, out, err = run_report([known_path, "--tree", "--sample-index", "samples", "--min-percent", "0",
                                 "--native"], capsys)
    assert code == 0, err
    paths = [line[TREE_PATH_COLUMN:] for line in out.splitlines()[3:]]
    assert paths[:4] == ["main", "  compute", "    leaf_a", "    leaf_b"]
    assert "      recurse" in paths  # recurse/recurse/recurse: one line per call path
    assert paths.index("py_handler") > paths.index("main")
    main_line = out.splitlines()[3]
    assert main_line.split()[:2] == ["27", "84.38%"]


def test_tree_prunes_below_min_percent(known_path, capsys):
    _, out, _ = run_report([known_path, "--tree", "--sample-index", "samples", "--min-percent", "10"], capsys)
    lines = out.splitlines()
    names = [line[TREE_PATH_COLUMN:].strip() for line in lines[3:]]
    assert "sys_write" not in names and "jitted" not in names
    assert "leaf_b" in names and "recurse" in names
    # main's pruned children: leaf_a (3) + jitted (1) + 0x1234 (2) = 6; compute's sys_write = 2
    pruned = sorted(int(line.split()[0]) for line in lines[3:] if line.rstrip().endswith("..."))
    assert pruned == [2, 6]


# ------------------------------------------------------------------ errors


def _assert_one_line_error(code: int, out: str, err: str, expected_code: int = 1) -> None:
    assert code == expected_code
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("perf-agent: error: ")
    assert "Traceback" not in err


def _bad_inputs(tmp_path) -> Dict[str, str]:
    paths = {"missing": str(tmp_path / "does-not-exist.pb.gz"), "directory": str(tmp_path)}
    empty = tmp_path / "empty.pb.gz"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(random.Random(7).getrandbits(8) for _ in range(4096)))
    with open(FIXTURE_GO_HEAP, "rb") as f:
        whole = f.read()
    truncated = tmp_path / "truncated.pb.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    raw_truncated = tmp_path / "truncated.pb"
    raw_truncated.write_bytes(gzip.decompress(whole)[:-7])
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a profile\n")
    paths.update(empty=str(empty), noise=str(noise), truncated=str(truncated),
                 raw_truncated=str(raw_truncated), text=str(text))
    return paths


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "noise", "truncated", "raw_truncated", "text"])
def test_bad_input_is_one_line_exit_1(tmp_path, capsys, kind):
    path = _bad_inputs(tmp_path)[kind]
    code, out, err = run_report([path], capsys)
    _assert_one_line_error(code, out, err)
    assert path in err


@pytest.mark.parametrize("flags", [
    ["--top", "many"], ["--top", "-1"], ["--focus", "("], ["--ignore", "[a"], ["--tag-filter", "novalue"],
    ["--sample-index", "bogus"], ["--no-such-flag"], ["--pid", "0"], ["--min-percent", "200"], ["--svg", ""],
])
def test_bad_flags_are_one_line_exit_2(known_path, capsys, flags):
    code, out, err = run_report([known_path] + flags, capsys)
    _assert_one_line_error(code, out, err, expected_code=2)


def test_no_file_argument_is_a_usage_error(capsys):
    code, out, err = run_report([], capsys)
    _assert_one_line_error(code, out, err, expected_code=2)


def test_unwritable_output_is_exit_1(known_path, tmp_path, capsys):
    code, out, err = run_report([known_path, "--svg", str(tmp_path / "no" / "such" / "dir.svg")], capsys)
    _assert_one_line_error(code, out, err)


def test_module_entry_point_errors_without_traceback(tmp_path):
    path = _bad_inputs(tmp_path)["truncated"]
    result = subprocess.run([sys.executable, "-m", "perfagent.report", path], env=agent_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    _assert_one_line_error(result.returncode, result.stdout, result.stderr)


def test_module_entry_point_reads_uncompressed_profile(tmp_path):
    path = write_profile_file(known_profile(), str(tmp_path / "raw.pb"), compressed=False)
    result = subprocess.run([sys.executable, "-m", "perfagent.report", path], env=agent_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert result.returncode == 0, result.stderr
    assert "leaf_a" in result.stdout


def test_percent_formatting_follows_pprof():
    assert format_percent(1, 1) == "100%"
    assert format_percent(9996, 10000) == "100%"
    assert format_percent(11, 10000) == "0.11%"
    assert format_percent(74, 1000000) == "0.0074%"


def test_help_returns_zero(capsys):
    code, out, _ = run_report(["--help"], capsys)
    assert code == 0
    assert "--focus" in out and "--svg" in out and "--folded" in out


def test_folded_stdout_and_tree_conflict(known_path, capsys):
    code, out, err = run_report([known_path, "--folded", "--tree"], capsys)
    _assert_one_line_error(code, out, err, expected_code=2)


def test_very_deep_stack_needs_no_recursion(tmp_path, capsys):
    from perfagent.pprof.profile import ProfileBuilder

    builder = ProfileBuilder([("samples", "count")])
    exe = builder.add_mapping(0x1000, 0x100000, 0, "/bin/deep")
    frames = [builder.location_id(exe, 0x1000 + i, ((builder.function_id("f%d" % i), 0),)) for i in range(3000)]
    builder.add_sample(tuple(reversed(frames)), (7,))
    path = write_profile_file(builder.to_profile(), str(tmp_path / "deep.pb.gz"))
    code, out, err = run_report([path, "--tree"], capsys)
    assert code == 0, err
    assert out.splitlines()[-1].strip().endswith("f2999")
    assert run_report([path, "--svg", str(tmp_path / "deep.svg")], capsys)[0] == 0
    code, out, _ = run_report([path, "--folded"], capsys)
    assert out.count(";") == 2999 and out.endswith(" 7\n")
