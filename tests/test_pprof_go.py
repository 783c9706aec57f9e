"""Interoperability with Go: Go's pprof reads what we write, we read what Go writes.

Tests that need the go command skip without it (fail with
PERFAGENT_REQUIRE_GO=1); the committed fixture tests run everywhere.
"""

import os
from collections import defaultdict
from typing import Dict, List, Tuple

import pytest

import pprof_check
from pprof_check import RawProfile, check_with_go_pprof, generate_go_profile, parse_raw
from perfagent.pprof.profile import Profile, ProfileBuilder, encode_profile, read_profile, write_profile
from test_pprof import rich_builder

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
GO_HEAP_FIXTURE = os.path.join(FIXTURES, "pprof_go_heap.pb.gz")
# `go tool pprof -raw` of the fixture, recorded when the fixture was made.
GO_HEAP_FIXTURE_RAW = os.path.join(FIXTURES, "pprof_go_heap.raw.txt")

Stacks = Dict[Tuple[int, ...], List[int]]


def stacks_by_address(profile: Profile) -> Stacks:
    """Summed values per stack of addresses, leaving out all-zero samples as Go's merge does."""
    stacks: Stacks = defaultdict(lambda: [0] * len(profile.sample_type))
    for sample in profile.samples:
        if not any(sample.values):
            continue
        key = tuple(profile.location_by_id[location_id].address for location_id in sample.location_ids)
        for index, value in enumerate(sample.values):
            stacks[key][index] += value
    return dict(stacks)


def raw_stacks_by_address(raw: RawProfile) -> Stacks:
    stacks: Stacks = defaultdict(lambda: [0] * len(raw.sample_types))
    for sample in raw.samples:
        key = raw.stack_addresses(sample)
        for index, value in enumerate(sample.values):
            stacks[key][index] += value
    return dict(stacks)


def function_names(profile: Profile) -> List[str]:
    """Names of the functions in the stacks of nonzero samples (those Go's -raw shows)."""
    used = {
        line.function_id
        for sample in profile.samples
        if any(sample.values)
        for location_id in sample.location_ids
        for line in profile.location_by_id[location_id].lines
    }
    return sorted(profile.function_by_id[function_id].name for function_id in used)


def assert_matches_go_view(profile: Profile, raw: RawProfile) -> None:
    """Our decode of a profile says what Go's pprof printed for it."""
    assert ["%s/%s" % (vt.type, vt.unit) for vt in profile.sample_type] == raw.sample_types
    assert profile.total_values() == raw.totals()
    assert stacks_by_address(profile) == raw_stacks_by_address(raw)
    assert function_names(profile) == raw.function_names()


# ---------------------------------------------------------------- committed fixture (no Go needed)


def test_go_heap_fixture_matches_recorded_go_output():
    profile = read_profile(GO_HEAP_FIXTURE)
    with open(GO_HEAP_FIXTURE_RAW) as f:
        raw = parse_raw(f.read())
    assert raw.samples, "the recorded -raw output should have samples"
    assert_matches_go_view(profile, raw)


def test_go_heap_fixture_contents():
    profile = read_profile(GO_HEAP_FIXTURE)
    assert [vt.type for vt in profile.sample_type] == ["alloc_objects", "alloc_space", "inuse_objects", "inuse_space"]
    assert profile.period_type is not None and (profile.period_type.type, profile.period) == ("space", 1)
    assert profile.mappings[0].has_functions
    by_leaf = {}
    for sample in profile.samples:
        leaf = profile.location_by_id[sample.location_ids[0]]
        by_leaf.setdefault(profile.function_by_id[leaf.lines[0].function_id].name, []).append(sample)
    # pprofgen keeps 16 blocks of 64 KiB from allocLarge and 64 of 512 bytes from allocSmall.
    (large,) = [s for s in by_leaf["main.allocLarge"] if profile.sample_labels(s) == {"bytes": 65536}]
    assert large.values == [16, 16 * 65536, 16, 16 * 65536]
    (small,) = [s for s in by_leaf["main.allocSmall"] if profile.sample_labels(s) == {"bytes": 512}]
    assert small.values == [64, 64 * 512, 64, 64 * 512]


def test_go_heap_fixture_reencodes_stably():
    profile = read_profile(GO_HEAP_FIXTURE)
    from perfagent.pprof.profile import decode_profile

    again = decode_profile(encode_profile(profile))
    assert again == profile


# ---------------------------------------------------------------- with Go


def test_go_pprof_reads_builder_output(tmp_path):
    builder = rich_builder()
    path = str(tmp_path / "cpu.pb.gz")
    builder.write(path)
    text = check_with_go_pprof(path)
    raw = parse_raw(text)
    assert raw.sample_types == ["samples/count", "cpu/nanoseconds"]
    assert raw.default_sample_type == "cpu/nanoseconds"
    assert raw.totals() == builder.total_values()
    assert sorted(tuple(s.values) for s in raw.samples) == [(1, 10101010), (2, -5), (3, 30303030)]
    assert raw.function_names() == ["inlined_helper", "main", "memcpy", "work"]
    assert "pid:[42]" in text and "comm:[app]" in text
    assert "bytes:[64 bytes]" in text or "bytes:[64B]" in text
    assert "Comment: perfagent" in text
    assert "/usr/bin/app" in text and "abcdef" in text
    assert_matches_go_view(builder.to_profile(), raw)


def test_go_pprof_reads_minimal_builder_output(tmp_path):
    builder = ProfileBuilder(sample_types=[("samples", "count")])
    builder.add_sample((builder.location_id(0, 0x1000, ((builder.function_id("only"), 1),)),), (7,))
    path = str(tmp_path / "min.pb.gz")
    builder.write(path)
    raw = parse_raw(check_with_go_pprof(path))
    assert raw.totals() == [7]
    assert raw.function_names() == ["only"]


def test_go_pprof_rejects_garbage(tmp_path):
    pprof_check.require_go()
    path = tmp_path / "bad.pb.gz"
    path.write_bytes(b"\x1f\x8bnot a profile")
    with pytest.raises(AssertionError, match="go tool pprof -raw"):
        check_with_go_pprof(str(path))


@pytest.mark.parametrize("kind", ["heap", "cpu"])
def test_go_runtime_profile_decodes_like_go_reads_it(tmp_path, kind):
    path = str(tmp_path / (kind + ".pb.gz"))
    generate_go_profile(kind, path)
    profile = read_profile(path)
    raw = parse_raw(check_with_go_pprof(path))
    assert_matches_go_view(profile, raw)
    if kind == "cpu":
        assert profile.period_type is not None and profile.period_type.unit == "nanoseconds"
        assert profile.duration_nanos > 0
    else:
        assert "main.allocLarge" in function_names(profile)


def test_go_reads_our_reencoding_of_a_go_profile_identically(tmp_path):
    original = str(tmp_path / "heap.pb.gz")
    generate_go_profile("heap", original)
    reencoded = str(tmp_path / "heap-reencoded.pb.gz")
    write_profile(read_profile(original), reencoded)
    assert check_with_go_pprof(reencoded) == check_with_go_pprof(original)


def test_go_still_reads_the_committed_fixture():
    raw = parse_raw(check_with_go_pprof(GO_HEAP_FIXTURE))
    assert_matches_go_view(read_profile(GO_HEAP_FIXTURE), raw)


# ---------------------------------------------------------------- the helper itself


def test_missing_go_skips_or_fails(monkeypatch):
    monkeypatch.setattr(pprof_check, "go_available", lambda: False)
    monkeypatch.delenv("PERFAGENT_REQUIRE_GO", raising=False)
    with pytest.raises(pytest.skip.Exception):
        check_with_go_pprof("/nonexistent.pb.gz")
    monkeypatch.setenv("PERFAGENT_REQUIRE_GO", "1")
    with pytest.raises(pytest.fail.Exception, match="PERFAGENT_REQUIRE_GO"):
        check_with_go_pprof("/nonexistent.pb.gz")
