"""Checking profiles against Go's pprof, for any test that writes one.

    from pprof_check import check_with_go_pprof
    text = check_with_go_pprof(path)   # AssertionError with go's stderr if rejected

Go is optional on a developer's machine: without it the check skips the
calling test, unless PERFAGENT_REQUIRE_GO=1 (as CI should set), where a
missing go is a failure. Go runs offline, with HOME, GOCACHE and GOPATH in
a private temporary directory so tests neither read nor litter the user's.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest

GO_FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "go", "pprofgen")
# Generous: a first `go run` compiles the runtime into an empty GOCACHE.
GO_TIMEOUT_SECONDS = 600


@functools.lru_cache(maxsize=None)
def go_available() -> bool:
    """True when a working `go` command is on PATH."""
    go = shutil.which("go")
    if go is None:
        return False
    try:
        result = subprocess.run(
            [go, "version"], env=go_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=GO_TIMEOUT_SECONDS
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def require_go() -> None:
    """Skip the calling test without Go, or fail it if PERFAGENT_REQUIRE_GO=1."""
    if go_available():
        return
    if os.environ.get("PERFAGENT_REQUIRE_GO") == "1":
        pytest.fail("PERFAGENT_REQUIRE_GO=1 but no working `go` command on PATH")
    pytest.skip("go not installed (set PERFAGENT_REQUIRE_GO=1 to make this a failure)")


@functools.lru_cache(maxsize=None)
def _go_home() -> str:
    """One private directory per test session, so the build cache is shared between tests."""
    home = tempfile.mkdtemp(prefix="perfagent-go-")
    atexit.register(shutil.rmtree, home, True)
    return home


def go_env() -> Dict[str, str]:
    """The environment every go command runs with: private dirs, no network."""
    home = _go_home()
    env = dict(os.environ)
    env.update(
        HOME=home,
        GOCACHE=os.path.join(home, "cache"),
        GOPATH=os.path.join(home, "gopath"),
        GOTOOLCHAIN="local",
        GOFLAGS="-mod=mod",
        GOPROXY="off",
        GOSUMDB="off",
        GOTELEMETRY="off",
        CGO_ENABLED="0",
        PPROF_TMPDIR=os.path.join(home, "pprof"),
    )
    return env


def _run_go(args: List[str], cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["go"] + args,
        cwd=cwd,
        env=go_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        timeout=GO_TIMEOUT_SECONDS,
    )


def check_with_go_pprof(path: str) -> str:
    """Run `go tool pprof -raw PATH`; return its stdout, or fail with its stderr."""
    require_go()
    result = _run_go(["tool", "pprof", "-raw", path])
    if result.returncode != 0:
        raise AssertionError(
            "go tool pprof -raw %s failed (exit %d):\n%s" % (path, result.returncode, result.stderr)
        )
    return result.stdout


def generate_go_profile(kind: str, out_path: str) -> None:
    """Write a profile with Go's runtime/pprof (kind "heap" or "cpu") via tests/fixtures/go/pprofgen."""
    require_go()
    result = _run_go(["run", "-trimpath", ".", kind, out_path], cwd=GO_FIXTURE_DIR)
    if result.returncode != 0:
        raise AssertionError("go run pprofgen %s failed (exit %d):\n%s" % (kind, result.returncode, result.stderr))


# ---------------------------------------------------------------- -raw output


@dataclass
class RawSample:
    values: List[int]
    location_ids: List[int]
    labels: List[str] = field(default_factory=list)


@dataclass
class RawLocation:
    address: int
    function_names: List[str]


@dataclass
class RawProfile:
    """What `go tool pprof -raw` printed, parsed back. Go renumbers locations when it
    merges the input, so compare stacks by address or name, not by id."""

    sample_types: List[str]  # "type/unit"
    samples: List[RawSample]
    locations: Dict[int, RawLocation]
    default_sample_type: str = ""  # "type/unit" of the one Go marked [dflt]

    def totals(self) -> List[int]:
        totals = [0] * len(self.sample_types)
        for sample in self.samples:
            for index, value in enumerate(sample.values):
                totals[index] += value
        return totals

    def stack_addresses(self, sample: RawSample) -> Tuple[int, ...]:
        return tuple(self.locations[location_id].address for location_id in sample.location_ids)

    def function_names(self) -> List[str]:
        return sorted({name for location in self.locations.values() for name in location.function_names})


_DEFAULT_MARK = "[dflt]"
_SAMPLE_LINE = re.compile(r"^\s*(-?\d+(?:\s+-?\d+)*):((?:\s+\d+)*)\s*$")
_LOCATION_LINE = re.compile(r"^\s*(\d+): (0x[0-9a-f]+)(?: M=\d+)?(?: (\S+))?")
_INLINED_LINE = re.compile(r"^\s+(\S+) \S*:-?\d+ s=")


def parse_raw(text: str) -> RawProfile:
    """Parse the Samples and Locations sections of `go tool pprof -raw` output."""
    lines = text.splitlines()
    section = ""
    sample_types: List[str] = []
    default_sample_type = ""
    samples: List[RawSample] = []
    locations: Dict[int, RawLocation] = {}
    current_location: Optional[RawLocation] = None
    for line in lines:
        if line in ("Samples:", "Locations", "Mappings"):
            section = line
            continue
        if section == "Samples:":
            if not sample_types:
                for column in line.split():
                    if column.endswith(_DEFAULT_MARK):
                        column = default_sample_type = column[: -len(_DEFAULT_MARK)]
                    sample_types.append(column)
                continue
            match = _SAMPLE_LINE.match(line)
            if match:
                samples.append(RawSample([int(v) for v in match.group(1).split()],
                                         [int(v) for v in match.group(2).split()]))  # fmt: skip
            elif samples and line.strip():
                samples[-1].labels.append(line.strip())
        elif section == "Locations":
            match = _LOCATION_LINE.match(line)
            if match:
                names = [match.group(3)] if match.group(3) else []
                current_location = locations[int(match.group(1))] = RawLocation(int(match.group(2), 16), names)
                continue
            match = _INLINED_LINE.match(line)
            if match and current_location is not None:
                current_location.function_names.append(match.group(1))
    return RawProfile(sample_types, samples, locations, default_sample_type)
