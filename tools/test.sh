#!/usr/bin/env bash
# The whole test suite on a fresh machine.  Installs what the tests need
# (gcc and binutils for test programs and readelf, Debian's golang-go for
# `go tool pprof`, pytest, a virtual environment with flask and gunicorn)
# when missing, builds the cached test interpreters and the Debian sid root
# when missing, then runs pytest as root, which the
# integration tests need for perf_event_open, ptrace, bpf and namespaces.
# Extra arguments go to pytest:  tools/test.sh -k capture
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    exec sudo -E "$0" "$@"
fi

missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v readelf >/dev/null 2>&1 || missing+=(binutils)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
if [ ${#missing[@]} -gt 0 ]; then
    echo "tools/test.sh: installing ${missing[*]}" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" -c "import pytest" >/dev/null 2>&1; then
    echo "tools/test.sh: installing pytest" >&2
    "$PY" -m pip install -q pytest
fi

# The CPython 3.13 interpreters the Python tests run against, built once per
# machine from Debian's source package (cached outside the repository).
if [ -x tools/build_test_pythons.sh ]; then
    if bash tools/build_test_pythons.sh >&2; then
        export PERFAGENT_REQUIRE_PYTHONS=1
    else
        echo "tools/test.sh: warning: building the test interpreters failed; Python tests that need them are skipped" >&2
    fi
fi

# The minimal Debian sid root with Debian's own python3.14 and python3.15, in
# which the container tests run their targets (tests/containers.py), built
# once per machine with debootstrap (cached outside the repository).
if [ -x tools/build_debian_root.sh ]; then
    if bash tools/build_debian_root.sh >&2; then
        export PERFAGENT_REQUIRE_DEBIAN_ROOT=1
    else
        echo "tools/test.sh: warning: building the Debian sid root failed; container tests are skipped" >&2
    fi
fi

# Flask and gunicorn in a virtual environment, for the test that profiles a
# web service as a user would (cached outside the repository).
if bash tools/build_web_venv.sh "$PY" >&2; then
    export PERFAGENT_REQUIRE_WEB_VENV=1
else
    echo "tools/test.sh: warning: installing flask and gunicorn failed; the web-service test is skipped" >&2
fi

# Go's pprof must accept every profile the tests write: its absence is a failure here.
export PERFAGENT_REQUIRE_GO=1
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
