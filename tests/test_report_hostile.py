"""perf-agent report on hostile profiles and paths: any profile that decodes renders.

* strings that are not UTF-8, or hold control characters, come out escaped
  in every view (and the SVG stays XML);
* very deep stacks take memory linear in the profile's size;
* outputs are never written through a symbolic link or over the profile;
* byte mutants of real profiles that still decode render in every view
  (fixed seed), or fail with one line.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import random
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import List, Sequence

import pytest

from conftest import REPO, agent_env
from test_report_profiles import known_profile, python_profile, run_report, write_profile_file

from perfagent.pprof.profile import ProfileBuilder, decode_profile, encode_profile
from perfagent.report.command import main
from perfagent.report.text import display

SVG = "{http://www.w3.org/2000/svg}"
FIXTURE_GO_HEAP = os.path.join(REPO, "tests", "fixtures", "pprof_go_heap.pb.gz")
# Every view, grouped so one run of main() shows several (the profile is decoded once per run).
VIEW_RUNS: List[List[str]] = [
    [],
    ["--cum", "--lines"],
    ["--tree", "--min-percent", "0", "--svg", "@SVG@", "--folded", "@FOLDED@"],
    ["--native", "--lines", "--folded"],
    ["--native", "--tree", "--svg", "@SVG@"],
]


# ------------------------------------------------------------------ strings


def hostile_profile() -> bytes:
    """Invalid UTF-8 and control characters in every string a view can show.

    The builder writes str with surrogateescape, so "\\udcff" is the byte
    0xff on the wire: exactly what a producer's raw bytes decode to.
    """
    builder = ProfileBuilder([("cpu\udcff", "nano\x1bseconds")])
    exe = builder.add_mapping(0x1000, 0x2000, 0, "/bin/\udc80app\x07", build_id="\udcfe")
    kernel = builder.add_mapping(0xffff0000, 0xffff1000, 0, "[kernel]")
    py = builder.function_id("handler\udcff\x1b[31mRED\x00", "py::x", "/srv/caf\udce9.py", 3)
    c = builder.function_id("leaf\x07\n;x\udcc3\udca9<&>", "", "x.c\udcff")  # c3 a9: valid, é
    k = builder.function_id("\udced\udca0\udc80lone\ufffe\x9b2J")  # an encoded surrogate: not UTF-8
    locations = (builder.location_id(kernel, 0xffff0100, ((k, 0),)),
                 builder.location_id(exe, 0x1200, ((c, 4),)),
                 builder.location_id(exe, 0x1100, ((py, 7),)))
    builder.add_sample(locations, (5,), (("comm", "a\udcffb"), ("pid", "7")))
    builder.add_sample(locations[1:], (2,), (("comm", "a\udcffb"), ("pid", "7")))
    return encode_profile(builder.to_profile())


def test_display_escapes():
    assert display("caf\udce9") == "caf\\xe9"  # the undecodable byte
    assert display("a\x1b[31m\x00\t\n\x7f\x9b") == "a\\x1b[31m\\x00\\x09\\x0a\\x7f\\x9b"
    assert display("\ud800\ufffe\uffff") == "\\ud800\\ufffe\\uffff"
    assert display("é ✓ 中 \U0001f600 \\x") == "é ✓ 中 \U0001f600 \\x"  # printable text untouched
    plain = "just_a_name"
    assert display(plain) is plain


@pytest.mark.parametrize("run", VIEW_RUNS + [["--svg", "-"], ["--folded", "--lines"]],
                         ids=lambda flags: " ".join(flags) or "top")
def test_non_utf8_strings_render_escaped(tmp_path, capsys, run):
    path = tmp_path / "hostile.pb"
    path.write_bytes(hostile_profile())
    svg, folded = str(tmp_path / "f.svg"), str(tmp_path / "f.folded")
    argv = [str(path)] + [svg if a == "@SVG@" else folded if a == "@FOLDED@" else a for a in run]
    code, out, err = run_report(argv, capsys)
    assert code == 0, err
    assert err == ""
    texts = [out]
    if "@SVG@" in run or "-" in run:
        document = open(svg, encoding="utf-8").read() if "@SVG@" in run else out
        root = ET.fromstring(document)  # still XML
        titles = [t.text for t in root.iter(SVG + "title")]
        assert any(t.startswith("handler\\xff\\x1b[31mRED\\x00") for t in titles), titles
        texts.append(document)
    if "@FOLDED@" in run:
        with open(folded, encoding="utf-8") as f:  # strict UTF-8
            texts.append(f.read())
    for text in texts:
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]", text)
    everything = "\n".join(texts)
    if "--native" in run:
        assert re.search(r"leaf\\x07\\x0a[;:]x\u00e9", everything)  # c3 a9 is UTF-8: é
        assert "\\xed\\xa0\\x80lone\\ufffe\\x9b2J" in everything
    if run and run[0] == "--tree":
        assert "Type: cpu\\xff" in out


def test_undecodable_profile_file_name_and_ascii_stdout(tmp_path):
    """A file name that is not UTF-8 (the SVG title) and a stdout that only takes ASCII."""
    name = os.fsdecode(b"prof\xff\x1b.pb")
    path = os.path.join(str(tmp_path), name)
    with open(path, "wb") as f:
        f.write(hostile_profile())
    svg = str(tmp_path / "f.svg")
    env = dict(agent_env(), PYTHONIOENCODING="ascii")
    for flags in ([], ["--svg", svg], ["--tree"], ["--folded"]):
        result = subprocess.run([sys.executable, "-m", "perfagent.report", os.fsencode(path)] + flags, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
        result.stdout.decode("ascii")
    root = ET.parse(svg).getroot()
    assert root.find(SVG + "text").text == "prof\\xff\\x1b.pb"


def test_tag_filter_matches_undecodable_label(tmp_path, capsys):
    path = tmp_path / "hostile.pb"
    path.write_bytes(hostile_profile())
    code, out, err = run_report([str(path), "--tag-filter", "comm=a\udcffb", "--native"], capsys)
    assert code == 0, err
    assert "of 7 total" in out


# ------------------------------------------------------------------ deep stacks


def deep_profile(depth: int, copies: int, shallow: int) -> bytes:
    """Three stacks ``depth`` frames deep (sharing two thirds), each in
    ``copies`` samples (one per tid label), plus ``shallow`` short samples."""
    builder = ProfileBuilder([("samples", "count"), ("cpu", "nanoseconds")])
    exe = builder.add_mapping(0x1000, 0x100000000, 0, "/bin/deep")
    locations = [builder.location_id(exe, 0x1000 + i, ((builder.function_id("fn_%d" % i, "", "deep.c"), i),))
                 for i in range(depth + 3)]
    shared = depth * 2 // 3
    for tid in range(copies):
        for k in range(3):
            root_first = locations[:shared] + locations[shared + k:depth + k]
            builder.add_sample(tuple(reversed(root_first)), (1, 1000), (("tid", str(tid)),))
    for i in range(shallow):
        stack = locations[:1 + i % 7] + [locations[100 + i % 50]]
        builder.add_sample(tuple(reversed(stack)), (1, 1000), (("tid", str(i)),))
    return encode_profile(builder.to_profile())


# Peak memory (maximum RSS) of one report run beyond the interpreter's own,
# per byte of the (uncompressed) profile. Decoding alone takes ~35 (a
# location id of 2-3 bytes becomes a Python int in a list); the views add
# little. Before the fix --tree alone needed ~1900x (quadratic
# indentation), so the bound is generous and still catches that.
MEMORY_PER_PROFILE_BYTE = 80
_MEASURE = ("import resource, sys\n"
            "from perfagent.report.command import main\n"
            "code = main(sys.argv[1:])\n"
            "sys.stderr.write('maxrss_kb=%d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "sys.exit(code)\n")


def _max_rss(argv: Sequence[str]) -> int:
    """Bytes of maximum RSS of `report argv` in a fresh interpreter (stdout discarded)."""
    result = subprocess.run([sys.executable, "-c", _MEASURE] + list(argv), env=agent_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True)
    assert result.returncode == 0, result.stderr
    match = re.search(r"^maxrss_kb=(\d+)$", result.stderr, re.M)
    assert match, result.stderr
    return int(match.group(1)) * 1024


def test_deep_stacks_take_memory_linear_in_the_profile(tmp_path):
    data = deep_profile(depth=20000, copies=4, shallow=3000)
    path = str(tmp_path / "deep.pb")
    with open(path, "wb") as f:
        f.write(data)
    tiny = write_profile_file(known_profile(), str(tmp_path / "tiny.pb"), compressed=False)
    svg, folded = str(tmp_path / "deep.svg"), str(tmp_path / "deep.folded")
    runs = ([], ["--tree", "--min-percent", "0", "--svg", svg, "--folded", folded],
            ["--native", "--lines", "--tree", "--min-percent", "0"], ["--svg", "-"], ["--folded", "--lines"])
    for flags in runs:
        baseline = _max_rss([tiny] + flags)
        peak = _max_rss([path] + flags)
        assert peak - baseline < MEMORY_PER_PROFILE_BYTE * len(data), \
            "%s: %d bytes above the interpreter's for a %d-byte profile" % (flags, peak - baseline, len(data))
    # Every frame of the deep stacks was drawn and written.
    with open(folded) as f:
        lines = f.read().splitlines()
    assert sorted(line.count(";") for line in lines)[-3:] == [19999] * 3
    with open(svg) as f:
        depths = [int(d) for d in re.findall(r'data-d="(\d+)"', f.read())]
    assert max(depths) == 20000


def test_deep_tree_lines_have_bounded_prefix(tmp_path, capsys):
    data = deep_profile(depth=3000, copies=1, shallow=0)
    path = str(tmp_path / "deep.pb")
    with open(path, "wb") as f:
        f.write(data)
    code, out, err = run_report([path, "--tree", "--min-percent", "0"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) < 200
    assert lines[-1].rstrip().endswith("[2999] fn_3001")  # depth shown once indentation stops


# ------------------------------------------------------------------ output paths


@pytest.mark.parametrize("flag", ["--svg", "--folded"])
def test_output_through_a_symlink_is_refused(tmp_path, capsys, flag):
    profile = write_profile_file(known_profile(), str(tmp_path / "p.pb.gz"))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "out"
    link.symlink_to(victim)
    code, out, err = run_report([profile, flag, str(link)], capsys)
    assert code == 1 and out == ""
    assert err == "perf-agent: error: %s: refusing to write %s: it is a symbolic link\n" % (flag, link)
    assert victim.read_text() == "precious\n"
    assert os.path.islink(str(link))


@pytest.mark.parametrize("flag", ["--svg", "--folded"])
def test_dangling_symlink_is_not_followed_to_create_its_target(tmp_path, capsys, flag):
    profile = write_profile_file(known_profile(), str(tmp_path / "p.pb.gz"))
    target = tmp_path / "created-through-link"
    link = tmp_path / "out"
    link.symlink_to(target)
    code, _, err = run_report([profile, flag, str(link)], capsys)
    assert code == 1 and "symbolic link" in err
    assert not target.exists()


def test_output_over_the_profile_is_refused(tmp_path, capsys):
    profile = write_profile_file(known_profile(), str(tmp_path / "p.pb.gz"))
    with open(profile, "rb") as f:
        before = f.read()
    code, out, err = run_report([profile, "--svg", profile], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "is the profile being read" in err
    with open(profile, "rb") as f:
        assert f.read() == before


def test_fifo_output_does_not_hang(tmp_path, capsys):
    profile = write_profile_file(known_profile(), str(tmp_path / "p.pb.gz"))
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    code, _, err = run_report([profile, "--folded", fifo], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and fifo in err


def test_output_replaces_a_longer_file_and_writes_to_dev_null(tmp_path, capsys):
    profile = write_profile_file(known_profile(), str(tmp_path / "p.pb.gz"))
    target = tmp_path / "out.folded"
    target.write_text("x" * 100000)
    assert run_report([profile, "--folded", str(target)], capsys)[0] == 0
    assert target.read_text() == run_report([profile, "--folded"], capsys)[1]
    assert run_report([profile, "--svg", os.devnull], capsys)[0] == 0


def test_device_as_input_is_refused(capsys):
    code, out, err = run_report(["/dev/zero"], capsys)
    assert code == 1 and err == "perf-agent: error: /dev/zero: not a regular file\n"


# ------------------------------------------------------------------ mutants


MUTANT_SEED = 20240611
MUTANT_COUNT = 2500
_STRING_BYTES = (0x00, 0x0A, 0x1B, 0x3B, 0x3C, 0x26, 0x80, 0xC3, 0xED, 0xFF)


def _seed_profiles() -> List[bytes]:
    with open(FIXTURE_GO_HEAP, "rb") as f:
        go_heap = gzip.decompress(f.read())
    return [encode_profile(known_profile()), encode_profile(python_profile()), go_heap, hostile_profile()]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """1-4 byte edits: flips, overwrites, inserts, deletes, copies, and (most
    likely to still decode) bytes inside the strings replaced by bytes that
    are invalid UTF-8, control characters or XML/folded metacharacters."""
    out = bytearray(data)
    runs = [m.span() for m in re.finditer(rb"[ -~]{3,}", data)]
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        i = rng.randrange(len(out))
        if op == 0:
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[i] = rng.randrange(256)
        elif op == 2:
            out.insert(i, rng.randrange(256))
        elif op == 3:
            del out[i]
        elif op == 4:
            j = rng.randrange(len(out))
            out[i:i] = out[j:j + rng.randint(1, 16)]
        elif runs:
            start, end = rng.choice(runs)
            out[rng.randrange(start, min(end, len(out)))] = rng.choice(_STRING_BYTES)
    return bytes(out)


def test_mutants_that_decode_render_in_every_view(tmp_path):
    rng = random.Random(MUTANT_SEED)
    seeds = _seed_profiles()
    path, svg, folded = str(tmp_path / "m.pb"), str(tmp_path / "m.svg"), str(tmp_path / "m.folded")
    decoded = 0
    for _ in range(MUTANT_COUNT):
        mutant = _mutate(rng, rng.choice(seeds))
        try:
            decode_profile(mutant)
        except Exception:  # the decoder's contract (one ProfileFormatError) is tested with the decoder
            continue
        decoded += 1
        with open(path, "wb") as f:
            f.write(mutant)
        for run in VIEW_RUNS:
            argv = [path] + [svg if a == "@SVG@" else folded if a == "@FOLDED@" else a for a in run]
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)  # an exception here is the failure this test is for
            if code != 0:
                assert code in (1, 2) and len(err.getvalue().splitlines()) == 1, (run, err.getvalue())
                continue
            if "@SVG@" in run:
                ET.parse(svg)
            if "@FOLDED@" in run:
                with open(folded, encoding="utf-8") as f:
                    f.read()
    assert decoded >= 200  # enough mutants got through the decoder to mean something
