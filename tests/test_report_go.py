"""perf-agent report on profiles written by Go's runtime/pprof, against `go tool pprof -top`.

The committed heap fixture needs Go only for the comparison; a fresh CPU
profile needs Go to be generated. Both skip without Go (fail with
PERFAGENT_REQUIRE_GO=1, see pprof_check).
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

import pytest

import pprof_check
from conftest import REPO
from pprof_check import generate_go_profile, require_go
from test_report_profiles import run_report

FIXTURE_GO_HEAP = os.path.join(REPO, "tests", "fixtures", "pprof_go_heap.pb.gz")
ROW = re.compile(r"^\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.+?)\s*$")
UNIT_SIZES = {"": 1, "B": 1, "kB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3,
              "ns": 1, "us": 1e3, "\u00b5s": 1e3, "ms": 1e6, "s": 1e9}
VALUE = re.compile(r"^(-?[\d.]+)([a-zA-Z\u00b5]*)$")


def parse_top(text: str) -> Tuple[Dict[str, str], str]:
    """({function: flat column}, the "Showing nodes accounting for ..." line)."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["flat", "flat%", "sum%", "cum", "cum%"])
    rows = {}
    for line in lines[header + 1:]:
        match = ROW.match(line)
        if match:
            rows[match.group(6)] = match.group(1)
    showing = next(line for line in lines if line.startswith("Showing nodes accounting for"))
    return rows, showing


def to_base_units(text: str) -> float:
    number, unit = VALUE.match(text).groups()
    return float(number) * UNIT_SIZES[unit]


def go_top(path: str, sample_index: str) -> str:
    require_go()
    result = pprof_check._run_go(["tool", "pprof", "-top", "-sample_index=" + sample_index, path])
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_same_flat(path: str, sample_index: str, capsys) -> List[str]:
    expected, expected_showing = parse_top(go_top(path, sample_index))
    code, out, err = run_report([path, "--top", "0", "--sample-index", sample_index], capsys)
    assert code == 0, err
    ours, showing = parse_top(out)
    assert set(ours) == set(expected), (out, expected)
    for name, flat in expected.items():
        # Same unit choice as pprof, so the very strings agree; the numeric
        # check explains a mismatch better when they do not.
        assert to_base_units(ours[name]) == pytest.approx(to_base_units(flat), rel=0.001, abs=1), name
        assert ours[name] == flat, name
    assert showing == expected_showing
    return sorted(expected)


@pytest.mark.parametrize("sample_index", ["inuse_space", "alloc_space", "alloc_objects", "inuse_objects"])
def test_go_heap_fixture_matches_go_tool_pprof(capsys, sample_index):
    names = assert_same_flat(FIXTURE_GO_HEAP, sample_index, capsys)
    if sample_index.endswith("space"):
        assert "main.allocLarge" in names


def test_go_heap_default_is_the_last_sample_type(capsys):
    code, out, _ = run_report([FIXTURE_GO_HEAP], capsys)
    assert code == 0
    assert out.splitlines()[0] == "Type: inuse_space"


@pytest.fixture(scope="module")
def go_cpu_profile(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gocpu") / "cpu.pb.gz")
    generate_go_profile("cpu", path)
    return path


@pytest.mark.parametrize("sample_index", ["cpu", "samples"])
def test_fresh_go_cpu_profile_matches_go_tool_pprof(go_cpu_profile, capsys, sample_index):
    names = assert_same_flat(go_cpu_profile, sample_index, capsys)
    assert names


def test_go_cpu_profile_folded_total(go_cpu_profile, capsys):
    from perfagent.pprof.profile import read_profile
    from perfagent.report.folded import read_folded

    profile = read_profile(go_cpu_profile)
    code, out, _ = run_report([go_cpu_profile, "--folded", "--sample-index", "cpu"], capsys)
    assert code == 0
    assert sum(read_folded(out.splitlines()).values()) == profile.total_values()[profile.sample_type_index("cpu")]
    assert any("main.busy" in line for line in out.splitlines())
