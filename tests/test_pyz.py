"""The single-file build: tools/build_pyz.py makes a zipapp that runs on any CPython 3.8+."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from typing import List

import pytest

from conftest import REPO
from test_report_profiles import known_profile, write_profile_file

from perfagent import __version__

FIXTURE_GO_HEAP = os.path.join(REPO, "tests", "fixtures", "pprof_go_heap.pb.gz")
BUILD_SCRIPT = os.path.join(REPO, "tools", "build_pyz.py")


def interpreters() -> List[str]:
    """This Python plus every pyenv CPython 3.8+ on the machine (3.8 and 3.13 at least, where present)."""
    found = [sys.executable]
    for candidate in sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3.*")):
        name = os.path.basename(candidate)
        if name.count(".") == 1 and name[len("python3."):].isdigit() and int(name[len("python3."):]) >= 8:
            found.append(candidate)
    return found


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("pyz") / "perf-agent.pyz")
    result = subprocess.run([sys.executable, BUILD_SCRIPT, "-o", out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


def run_pyz(python: str, pyz: str, args: List[str], cwd: str) -> subprocess.CompletedProcess:
    """Run the archive from an unrelated directory with no PYTHONPATH: only the archive's code runs."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    return subprocess.run([python, pyz] + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)


def test_archive_holds_sources_only(pyz):
    with open(pyz, "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"
    names = zipfile.ZipFile(pyz).namelist()
    assert "__main__.py" in names
    assert "perfagent/__init__.py" in names and "perfagent/cli.py" in names
    assert "perfagent/report/command.py" in names and "perfagent/pprof/decode.py" in names
    files = [n for n in names if not n.endswith("/")]
    assert not [n for n in files if "__pycache__" in n or not n.endswith(".py")]
    assert os.access(pyz, os.X_OK)


@pytest.mark.parametrize("python", interpreters())
def test_pyz_runs_report_and_version(pyz, tmp_path, python):
    version = run_pyz(python, pyz, ["--version"], str(tmp_path))
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "perf-agent " + __version__

    top = run_pyz(python, pyz, ["report", FIXTURE_GO_HEAP, "--top", "3"], str(tmp_path))
    assert top.returncode == 0, top.stderr
    assert "main.allocLarge" in top.stdout and "Type: inuse_space" in top.stdout

    known = write_profile_file(known_profile(), str(tmp_path / "known.pb.gz"))
    svg = tmp_path / "flame.svg"
    folded = tmp_path / "out.folded"
    views = run_pyz(python, pyz, ["report", known, "--svg", str(svg), "--folded", str(folded)], str(tmp_path))
    assert views.returncode == 0, views.stderr
    ET.parse(str(svg))
    assert "main;compute;sys_write_[k] 2000000" in folded.read_text().splitlines()

    tree = run_pyz(python, pyz, ["report", known, "--tree", "--pid", "200"], str(tmp_path))
    assert tree.returncode == 0, tree.stderr
    assert "recurse" in tree.stdout


@pytest.mark.parametrize("python", interpreters())
def test_pyz_errors_are_one_line(pyz, tmp_path, python):
    bad = tmp_path / "bad.pb.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00truncated")
    result = run_pyz(python, pyz, ["report", str(bad)], str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("perf-agent: error: ") and len(result.stderr.splitlines()) == 1
    usage = run_pyz(python, pyz, ["report", str(bad), "--top", "x"], str(tmp_path))
    assert usage.returncode == 2 and len(usage.stderr.splitlines()) == 1


def test_build_replaces_an_existing_archive(pyz, tmp_path):
    out = str(tmp_path / "again.pyz")
    with open(out, "w") as f:
        f.write("stale")
    result = subprocess.run([sys.executable, BUILD_SCRIPT, "-o", out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert zipfile.is_zipfile(out) and not os.path.exists(out + ".partial")


@pytest.mark.parametrize("python", sorted(glob.glob("/root/.pyenv/versions/3.[67].*/bin/python3.[67]")))
def test_pyz_refuses_old_pythons_in_one_line(pyz, tmp_path, python):
    result = run_pyz(python, pyz, ["--version"], str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("perf-agent: error: needs Python 3.8 or newer")
    assert "Traceback" not in result.stderr


def test_package_never_reads_its_own_files():
    """Inside a zipapp __file__ is not a real path: no module may open files beside itself."""
    offenders = []
    for dirpath, _, filenames in os.walk(os.path.join(REPO, "perfagent")):
        for filename in filenames:
            if filename.endswith(".py"):
                path = os.path.join(dirpath, filename)
                with open(path) as f:
                    if "__file__" in f.read():
                        offenders.append(os.path.relpath(path, REPO))
    assert offenders == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a capture needs perf_event_open as root")
def _capture_interpreters() -> List[str]:
    import pythons  # the CPython 3.13 builds of tools/build_test_pythons.sh, where present
    found = [p for p in interpreters() if "3.8" in p or "3.13" in p or p == sys.executable]
    return found + sorted(pythons.test_pythons().values())


@pytest.mark.parametrize("python", _capture_interpreters())
def test_pyz_runs_a_real_capture_and_report(pyz, tmp_path, python, chain_bin):
    """Copy one file, run it: capture a launched target, then report on the spot."""
    out = str(tmp_path / "cap.pb.gz")
    r = run_pyz(python, pyz, ["--profile", "--duration", "1500ms", "--profile-output", out, "--",
                              chain_bin, "10"], str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "wrote %s" % out in r.stderr
    r = run_pyz(python, pyz, ["report", out, "--top", "5"], str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "leaf" in r.stdout
    r = run_pyz(python, pyz, ["report", out, "--folded"], str(tmp_path))
    assert any(line.rsplit(" ", 1)[0].endswith("main;a;b;c;leaf") for line in r.stdout.splitlines()), r.stdout[:500]


def minor_version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          stdout=subprocess.PIPE, universal_newlines=True, timeout=60).stdout.strip()


def test_pyz_with_bytecode_runs_it_on_its_version_and_sources_elsewhere(tmp_path):
    """--compile-with: the archive's bytecode is what the same minor version
    imports; another version loads the sources (and runs the same)."""
    out = str(tmp_path / "compiled.pyz")
    r = subprocess.run([sys.executable, BUILD_SCRIPT, "-o", out, "--compile-with", sys.executable],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = zipfile.ZipFile(out).namelist()
    assert "perfagent/cli.pyc" in names and "perfagent/cli.py" in names
    mine = minor_version(sys.executable)
    other = next((p for p in interpreters()[1:] if minor_version(p) != mine), None)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import perfagent.cli, perfagent.report.command; "
             "print(perfagent.cli.__file__.rsplit('.', 1)[1], perfagent.report.command.__file__.rsplit('.', 1)[1])")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    for python, loaded in ((sys.executable, "pyc"), (other, "py")):
        if python is None:
            continue
        got = subprocess.run([python, "-S", "-c", probe, out], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        assert got.returncode == 0, got.stderr
        assert got.stdout.split() == [loaded, loaded], (python, got.stdout)
        version = run_pyz(python, out, ["--version"], str(tmp_path))
        assert version.returncode == 0 and version.stdout.strip() == "perf-agent " + __version__, version.stderr
