"""The CPython 3.13 interpreters from tools/build_test_pythons.sh are what the
Python-support tests expect: 3.13, perf trampoline, the shared one on
libpython3.13.so, the static one carrying the C API in its own symbol tables,
and neither built with frame pointers (the profiler must unwind them by CFI).

Skipped when the interpreters were not built, failed then instead with
PERFAGENT_REQUIRE_PYTHONS=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Dict, List, Optional

import pytest

from perfagent.elf import ELFFile
from pythons import KINDS, require_python

PROBE = r"""
import json, sys
with open("/proc/self/maps") as f:
    maps = sorted({line.split()[5] for line in f if len(line.split()) >= 6})
print(json.dumps({
    "version": list(sys.version_info[:2]),
    "trampoline": hasattr(sys, "activate_stack_trampoline"),
    "executable": sys.executable,
    "maps": maps,
}))
"""

# The modules the Python-support tests lean on.
NEEDED_MODULES = ("threading", "subprocess", "signal", "select", "time")

C_API = ("PyGILState_Ensure", "PyRun_SimpleString", "PyGILState_Release")

EVAL = "_PyEval_EvalFrameDefault"
ENDBR64 = bytes.fromhex("f30f1efa")
FP_PROLOGUE = bytes.fromhex("55" "4889e5")   # push %rbp; mov %rsp,%rbp


def probe(python: str) -> Dict:
    out = subprocess.run([python, "-c", PROBE], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    return json.loads(out)


def libpythons(info: Dict) -> List[str]:
    return [p for p in info["maps"] if os.path.basename(p).startswith("libpython")]


def defined(elf: ELFFile, table: str, name: str) -> bool:
    return any(s.name == name and s.st_shndx != 0 for s in elf.iter_symbols(table))


def eval_frame_object(kind: str, python: str) -> str:
    """The file that holds _PyEval_EvalFrameDefault's code."""
    if kind == "static":
        return python
    libs = [p for p in libpythons(probe(python)) if "libpython3.13.so" in os.path.basename(p)]
    assert libs, "shared interpreter maps no libpython3.13.so"
    return libs[0]


def function_start(path: str, name: str, size: int = 16) -> Optional[bytes]:
    with ELFFile.from_path(path) as elf:
        for table in (".symtab", ".dynsym"):
            for sym in elf.iter_symbols(table):
                if sym.name == name and sym.st_shndx != 0 and sym.st_value:
                    offset = elf.vaddr_to_offset(sym.st_value)
                    assert offset is not None, "%s at %#x is not in a loaded segment" % (name, sym.st_value)
                    with open(path, "rb") as f:
                        f.seek(offset)
                        return f.read(size)
    return None


@pytest.fixture(params=KINDS)
def built(request):
    return request.param, require_python(request.param)


def test_version_and_trampoline(built):
    kind, python = built
    info = probe(python)
    assert info["version"] == [3, 13]
    assert info["trampoline"], "%s: no sys.activate_stack_trampoline" % python


def test_modules_the_tests_need(built):
    kind, python = built
    subprocess.run([python, "-c", "import " + ", ".join(NEEDED_MODULES)], check=True, timeout=60)


def test_trampoline_activates(built):
    kind, python = built
    code = ("import sys; sys.activate_stack_trampoline('perf'); "
            "assert sys.is_stack_trampoline_active(); sys.deactivate_stack_trampoline()")
    subprocess.run([python, "-c", code], check=True, timeout=60)


def test_libpython_mapping(built):
    kind, python = built
    libs = libpythons(probe(python))
    if kind == "shared":
        assert any(os.path.basename(p).startswith("libpython3.13.so") for p in libs), libs
    else:
        assert libs == [], "static interpreter maps %s" % libs


def test_static_binary_exports_the_c_api():
    python = require_python("static")
    with ELFFile.from_path(os.path.realpath(python)) as elf:
        for name in C_API:
            assert defined(elf, ".dynsym", name), "%s not in %s's .dynsym" % (name, python)
        if elf.section(".symtab") is not None:
            for name in C_API:
                assert defined(elf, ".symtab", name), "%s not in %s's .symtab" % (name, python)


def test_shared_binary_leaves_the_c_api_to_libpython():
    python = require_python("shared")
    with ELFFile.from_path(os.path.realpath(python)) as elf:
        assert not defined(elf, ".dynsym", "PyGILState_Ensure")
    lib = eval_frame_object("shared", python)
    with ELFFile.from_path(lib) as elf:
        for name in C_API:
            assert defined(elf, ".dynsym", name), "%s not in %s's .dynsym" % (name, lib)


def test_no_frame_pointer_prologue(built):
    kind, python = built
    path = eval_frame_object(kind, os.path.realpath(python))
    start = function_start(path, EVAL)
    assert start is not None, "no %s in %s" % (EVAL, path)
    if start.startswith(ENDBR64):
        start = start[len(ENDBR64):]
    assert not start.startswith(FP_PROLOGUE), \
        "%s in %s starts with push %%rbp; mov %%rsp,%%rbp: %s" % (EVAL, path, start.hex())


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump")
def test_no_frame_pointer_prologue_objdump(built):
    kind, python = built
    path = eval_frame_object(kind, os.path.realpath(python))
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "--disassemble=" + EVAL, path],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    insns = []
    for line in out.splitlines():
        head, sep, rest = line.partition(":")
        if sep and head.strip() and all(c in "0123456789abcdef" for c in head.strip()) and line[:1].isspace():
            insn = " ".join(rest.split())
            if insn and insn != "endbr64":
                insns.append(insn)
        if len(insns) >= 2:
            break
    assert insns, "objdump shows no %s in %s" % (EVAL, path)
    assert insns[:2] != ["push %rbp", "mov %rsp,%rbp"], insns
