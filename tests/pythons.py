"""Where the CPython 3.13 test interpreters are, for tests that need them.

``tools/build_test_pythons.sh`` builds them once per machine into
``${PERFAGENT_PYTHON_CACHE:-/var/cache/perfagent/pythons}/3.13-shared`` (an
``--enable-shared`` build: ``bin/python3.13`` links ``libpython3.13.so.1.0``)
and ``.../3.13-static`` (``--disable-shared``: the binary carries the runtime).
Both have the perf trampoline and no frame pointers.

``test_pythons()`` maps the kinds that exist to their interpreter;
``require_python(kind)`` returns one or skips the test, or fails it when
``PERFAGENT_REQUIRE_PYTHONS=1`` (CI, after running the build script).
"""

from __future__ import annotations

import os
from typing import Dict

KINDS = ("shared", "static")
DEFAULT_CACHE = "/var/cache/perfagent/pythons"
VERSION = "3.13"


def cache_dir() -> str:
    return os.environ.get("PERFAGENT_PYTHON_CACHE") or DEFAULT_CACHE


def python_path(kind: str) -> str:
    """Where the ``kind`` interpreter is (whether or not it was built)."""
    if kind not in KINDS:
        raise ValueError("unknown interpreter kind %r (one of %s)" % (kind, ", ".join(KINDS)))
    return os.path.join(cache_dir(), "%s-%s" % (VERSION, kind), "bin", "python" + VERSION)


def test_pythons() -> Dict[str, str]:
    """{"shared": path, "static": path} for the interpreters that exist."""
    found = {}
    for kind in KINDS:
        path = python_path(kind)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            found[kind] = path
    return found


# Not a test, although pytest would collect the name if this module were
# imported into a test module's namespace.
test_pythons.__test__ = False  # type: ignore[attr-defined]


def require_python(kind: str) -> str:
    """The ``kind`` interpreter's path; skip (or fail, when
    ``PERFAGENT_REQUIRE_PYTHONS=1``) the calling test when it is absent."""
    import pytest

    path = test_pythons().get(kind)
    if path is not None:
        return path
    message = ("no %s CPython %s at %s: run tools/build_test_pythons.sh"
               % (kind, VERSION, python_path(kind)))
    if os.environ.get("PERFAGENT_REQUIRE_PYTHONS") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")
