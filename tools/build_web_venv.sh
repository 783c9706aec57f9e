#!/usr/bin/env bash
# The virtual environment with Flask and gunicorn that the web-service test
# profiles (tests/test_web_app.py), built once per machine from the package
# index pip is configured with, cached outside the repository.
#   usage: tools/build_web_venv.sh [PYTHON]     (default: python3)
# Prints nothing when the environment is already there.
set -euo pipefail
PY=${1:-python3}
VENV=${PERFAGENT_WEB_VENV:-/var/cache/perfagent/venv-web}
if [ -x "$VENV/bin/gunicorn" ] && "$VENV/bin/python" -c "import flask" >/dev/null 2>&1; then
    exit 0
fi
echo "tools/build_web_venv.sh: creating $VENV with flask and gunicorn" >&2
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
# A venv's scripts name their interpreter by path, so it is built where it
# stays; one that fails half-way is removed (the check above would reject it).
if ! { "$PY" -m venv "$VENV" &&
       "$VENV/bin/python" -m pip install -q --disable-pip-version-check flask gunicorn &&
       "$VENV/bin/python" -c "import flask, gunicorn"; }; then
    rm -rf "$VENV"
    exit 1
fi
