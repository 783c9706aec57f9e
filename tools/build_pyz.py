#!/usr/bin/env python3
"""Build perf-agent as one executable file: a zipapp of the perfagent package.

    python3 tools/build_pyz.py -o perf-agent.pyz
    python3 perf-agent.pyz --version

Only .py sources go in by default (no __pycache__: bytecode is specific to
one Python minor version, and the archive must run on any CPython 3.8+).
Then every start compiles the modules it imports (about 0.2 CPU s of a
capture).  ``--compile-with PYTHON`` adds bytecode made by that
interpreter beside each source (``mod.pyc`` next to ``mod.py``, where
zipimport looks first; unchecked-hash pycs, PEP 552, so that no timestamp
has to match): a host whose python3 is the same minor version runs the
bytecode, any other loads the sources as before (zipimport skips a .pyc of
another version's magic number).

    python3 tools/build_pyz.py -o perf-agent.pyz --compile-with /usr/bin/python3.11

The archive's __main__ runs the perfagent command line; it sends ``report``
straight to perfagent.report.command, so the subcommand works whether or
not the installed cli.py dispatches it yet.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipapp
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "perfagent"
INTERPRETER = "/usr/bin/env python3"

MAIN_SOURCE = '''"""perf-agent, packaged as a zipapp by tools/build_pyz.py."""

import sys

if sys.version_info < (3, 8):
    sys.exit("perf-agent: error: needs Python 3.8 or newer, this is %d.%d" % sys.version_info[:2])


def _main():
    argv = sys.argv[1:]
    if argv and argv[0] == "report":
        from perfagent.report.command import main as report_main
        return report_main(argv[1:])
    import gc
    gc.disable()  # while the command line loads, as python -m perfagent does
    from perfagent.cli import entry
    entry()


sys.exit(_main())
'''


def copy_sources(package_dir: str, staging_dir: str) -> List[str]:
    """Copy the package's .py files into ``staging_dir``; returns their relative paths."""
    copied = []
    root_parent = os.path.dirname(package_dir)
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            source = os.path.join(dirpath, filename)
            relative = os.path.relpath(source, root_parent)
            target = os.path.join(staging_dir, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)
            copied.append(relative)
    return copied


COMPILE_SOURCE = r'''
import os, py_compile, sys
root = sys.argv[1]
for rel in sys.argv[2:]:
    py_compile.compile(os.path.join(root, rel), cfile=os.path.join(root, rel[:-3] + ".pyc"), dfile=rel,
                       doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
'''


def compile_with(python: str, staging: str, sources: List[str]) -> None:
    """Bytecode of ``sources`` (paths relative to ``staging``) by ``python``,
    as ``mod.pyc`` beside each ``mod.py``."""
    try:
        subprocess.run([python, "-c", COMPILE_SOURCE, staging] + sources, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True)
    except OSError as exc:
        raise SystemExit("build_pyz: cannot run %s: %s" % (python, exc.strerror or exc))
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or ["exit status %d" % exc.returncode]
        raise SystemExit("build_pyz: %s could not compile the package (it needs CPython 3.8+): %s"
                         % (python, last[0]))


def build(output: str, package_dir: Optional[str] = None, compile_python: Optional[str] = None) -> str:
    """Write the zipapp to ``output`` (made executable); returns its path.
    ``compile_python``: an interpreter whose bytecode goes in too."""
    package_dir = package_dir or os.path.join(REPO, PACKAGE)
    if not os.path.isfile(os.path.join(package_dir, "__init__.py")):
        raise SystemExit("build_pyz: %s is not the perfagent package" % package_dir)
    staging = tempfile.mkdtemp(prefix="perfagent-pyz-")
    try:
        sources = copy_sources(package_dir, staging)
        if compile_python:
            compile_with(compile_python, staging, sources)
        with open(os.path.join(staging, "__main__.py"), "w") as f:
            f.write(MAIN_SOURCE)
        # Written beside the target then renamed, so a failed build never
        # leaves a half-written archive under the final name.
        partial = output + ".partial"
        zipapp.create_archive(staging, partial, interpreter=INTERPRETER, compressed=True)
        os.chmod(partial, 0o755)
        os.replace(partial, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build perf-agent as a single-file zipapp.")
    parser.add_argument("-o", "--output", default="perf-agent.pyz", help="archive path (default: perf-agent.pyz)")
    parser.add_argument("--compile-with", metavar="PYTHON",
                        help="also add bytecode made by this interpreter: hosts running the same Python "
                             "minor version skip compiling the package at every start")
    args = parser.parse_args(argv)
    path = build(args.output, compile_python=args.compile_with)
    print("wrote %s (%d bytes)" % (path, os.path.getsize(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
