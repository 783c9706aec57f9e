#!/usr/bin/env python3
"""Generate perfagent/python/layouts.py: the CPython 3.8-3.13 struct offsets
the Python stack reader (and the in-kernel walker) needs, measured by the C
compiler against each version's installed headers.

For every interpreter found (pyenv's /root/.pyenv/versions/3.X.Y by
default, or --include 3.X=INCLUDE_DIR[:PYCONFIG_DIR] for other header
trees such as Debian's libpython3.X-dev) it writes a small C program of
``offsetof``/``sizeof`` probes with ``Py_BUILD_CORE`` defined (the internal
headers, ``include/python3.X/internal``, need it), compiles it with gcc,
runs it, and collects ``name value`` lines.  Names are the C members as
the headers spell them (``PyThreadState.cframe``,
``_PyInterpreterFrame.prev_instr``); a member a version does not have is
simply not probed for it, so a missing key means "this version has no
such field".

Bit-fields cannot be ``offsetof``'d: the PyUnicode ``state`` bits are
measured by setting one field of a zeroed object and reading back the
32-bit word (``PyASCIIObject.state.kind.shift`` / ``.width``).

For 3.13 and later the same run also probes every expression of
``_Py_DebugOffsets_INIT`` (the offsets the interpreter itself publishes at
the start of ``_PyRuntime``), written as DEBUG_OFFSETS, so the tests can
compare the compiler's answer with a live interpreter's, field by field.

    python3 tools/gen_python_offsets.py            # write perfagent/python/layouts.py
    python3 tools/gen_python_offsets.py --check    # exit 1 if the committed file differs
    python3 tools/gen_python_offsets.py --print 3.13
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
OUTPUT = os.path.join(REPO, "perfagent", "python", "layouts.py")
PYENV = "/root/.pyenv/versions"
MINORS = ((3, 8), (3, 9), (3, 10), (3, 11), (3, 12), (3, 13))

Version = Tuple[int, int]


def _between(lo: Version, hi: Version):
    return lambda v: lo <= v <= hi


ALL = _between((3, 8), (3, 99))
UPTO_310 = _between((3, 8), (3, 10))
UPTO_311 = _between((3, 8), (3, 11))
FROM_311 = _between((3, 11), (3, 99))
FROM_312 = _between((3, 12), (3, 99))
FROM_313 = _between((3, 13), (3, 99))
ONLY_311_312 = _between((3, 11), (3, 12))
ONLY_311 = _between((3, 11), (3, 11))

#: (name, C expression, versions).  The name is what layouts.py calls it.
PROBES = [
    # _PyRuntimeState: the list of interpreters; the GIL until 3.11.
    ("_PyRuntimeState.interpreters.head", "offsetof(_PyRuntimeState, interpreters.head)", ALL),
    ("_PyRuntimeState.interpreters.main", "offsetof(_PyRuntimeState, interpreters.main)", ALL),
    ("_PyRuntimeState.ceval.gil.locked", "offsetof(_PyRuntimeState, ceval.gil.locked)", UPTO_311),
    ("_PyRuntimeState.ceval.gil.last_holder", "offsetof(_PyRuntimeState, ceval.gil.last_holder)", UPTO_311),
    # PyInterpreterState (struct _is)
    ("PyInterpreterState.next", "offsetof(PyInterpreterState, next)", ALL),
    ("PyInterpreterState.id", "offsetof(PyInterpreterState, id)", ALL),
    ("PyInterpreterState.tstate_head", "offsetof(PyInterpreterState, tstate_head)", UPTO_310),
    ("PyInterpreterState.threads.head", "offsetof(PyInterpreterState, threads.head)", FROM_311),
    ("PyInterpreterState.ceval.gil", "offsetof(PyInterpreterState, ceval.gil)", FROM_312),
    ("PyInterpreterState._gil.locked", "offsetof(PyInterpreterState, _gil.locked)", FROM_312),
    ("PyInterpreterState._gil.last_holder", "offsetof(PyInterpreterState, _gil.last_holder)", FROM_312),
    # PyThreadState (struct _ts)
    ("PyThreadState.prev", "offsetof(PyThreadState, prev)", ALL),
    ("PyThreadState.next", "offsetof(PyThreadState, next)", ALL),
    ("PyThreadState.interp", "offsetof(PyThreadState, interp)", ALL),
    ("PyThreadState.frame", "offsetof(PyThreadState, frame)", UPTO_310),
    ("PyThreadState.cframe", "offsetof(PyThreadState, cframe)", ONLY_311_312),
    ("PyThreadState.root_cframe", "offsetof(PyThreadState, root_cframe)", ONLY_311_312),
    ("PyThreadState.current_frame", "offsetof(PyThreadState, current_frame)", FROM_313),
    ("PyThreadState.thread_id", "offsetof(PyThreadState, thread_id)", ALL),
    ("PyThreadState.native_thread_id", "offsetof(PyThreadState, native_thread_id)", FROM_311),
    ("sizeof(PyThreadState)", "sizeof(PyThreadState)", ALL),
    # _PyCFrame: one per C-level call of the eval loop (3.11, 3.12).
    ("_PyCFrame.current_frame", "offsetof(_PyCFrame, current_frame)", ONLY_311_312),
    ("_PyCFrame.previous", "offsetof(_PyCFrame, previous)", ONLY_311_312),
    ("sizeof(_PyCFrame)", "sizeof(_PyCFrame)", ONLY_311_312),
    # PyFrameObject: the frame itself until 3.10.
    ("PyFrameObject.f_back", "offsetof(PyFrameObject, f_back)", UPTO_310),
    ("PyFrameObject.f_code", "offsetof(PyFrameObject, f_code)", UPTO_310),
    ("PyFrameObject.f_lasti", "offsetof(PyFrameObject, f_lasti)", UPTO_310),
    ("PyFrameObject.f_lineno", "offsetof(PyFrameObject, f_lineno)", UPTO_310),
    # _PyInterpreterFrame: 3.11+.
    ("_PyInterpreterFrame.f_code", "offsetof(_PyInterpreterFrame, f_code)", ONLY_311_312),
    ("_PyInterpreterFrame.f_executable", "offsetof(_PyInterpreterFrame, f_executable)", FROM_313),
    ("_PyInterpreterFrame.previous", "offsetof(_PyInterpreterFrame, previous)", FROM_311),
    ("_PyInterpreterFrame.prev_instr", "offsetof(_PyInterpreterFrame, prev_instr)", ONLY_311_312),
    ("_PyInterpreterFrame.instr_ptr", "offsetof(_PyInterpreterFrame, instr_ptr)", FROM_313),
    ("_PyInterpreterFrame.is_entry", "offsetof(_PyInterpreterFrame, is_entry)", ONLY_311),
    ("_PyInterpreterFrame.owner", "offsetof(_PyInterpreterFrame, owner)", FROM_311),
    ("_PyInterpreterFrame.localsplus", "offsetof(_PyInterpreterFrame, localsplus)", FROM_311),
    ("sizeof(_PyInterpreterFrame)", "sizeof(_PyInterpreterFrame)", FROM_311),
    ("FRAME_OWNED_BY_THREAD", "FRAME_OWNED_BY_THREAD", FROM_311),
    ("FRAME_OWNED_BY_GENERATOR", "FRAME_OWNED_BY_GENERATOR", FROM_311),
    ("FRAME_OWNED_BY_FRAME_OBJECT", "FRAME_OWNED_BY_FRAME_OBJECT", FROM_311),
    ("FRAME_OWNED_BY_CSTACK", "FRAME_OWNED_BY_CSTACK", _between((3, 12), (3, 14))),
    ("FRAME_OWNED_BY_INTERPRETER", "FRAME_OWNED_BY_INTERPRETER", _between((3, 14), (3, 99))),
    # PyCodeObject
    ("PyCodeObject.co_name", "offsetof(PyCodeObject, co_name)", ALL),
    ("PyCodeObject.co_qualname", "offsetof(PyCodeObject, co_qualname)", FROM_311),
    ("PyCodeObject.co_filename", "offsetof(PyCodeObject, co_filename)", ALL),
    ("PyCodeObject.co_firstlineno", "offsetof(PyCodeObject, co_firstlineno)", ALL),
    ("PyCodeObject.co_lnotab", "offsetof(PyCodeObject, co_lnotab)", _between((3, 8), (3, 9))),
    ("PyCodeObject.co_linetable", "offsetof(PyCodeObject, co_linetable)", _between((3, 10), (3, 99))),
    ("PyCodeObject.co_code", "offsetof(PyCodeObject, co_code)", UPTO_310),
    ("PyCodeObject.co_code_adaptive", "offsetof(PyCodeObject, co_code_adaptive)", FROM_311),
    ("sizeof(PyCodeObject)", "sizeof(PyCodeObject)", ALL),
    # Objects
    ("sizeof(PyObject)", "sizeof(PyObject)", ALL),
    ("PyObject.ob_type", "offsetof(PyObject, ob_type)", ALL),
    ("PyVarObject.ob_size", "offsetof(PyVarObject, ob_size)", ALL),
    ("PyBytesObject.ob_size", "offsetof(PyBytesObject, ob_base.ob_size)", ALL),
    ("PyBytesObject.ob_sval", "offsetof(PyBytesObject, ob_sval)", ALL),
    ("PyASCIIObject.length", "offsetof(PyASCIIObject, length)", ALL),
    ("PyASCIIObject.state", "offsetof(PyASCIIObject, state)", ALL),
    ("sizeof(PyASCIIObject)", "sizeof(PyASCIIObject)", ALL),
    ("sizeof(PyCompactUnicodeObject)", "sizeof(PyCompactUnicodeObject)", ALL),
    ("PyUnicodeObject.data", "offsetof(PyUnicodeObject, data)", ALL),
    ("PY_VERSION_HEX", "PY_VERSION_HEX", ALL),
]

#: Bit-fields of PyASCIIObject.state measured by setting them (name, value set).
STATE_BITS = (("kind", 7), ("compact", 1), ("ascii", 1))

#: The expressions of _Py_DebugOffsets_INIT (Include/internal/pycore_runtime.h
#: in 3.13), keyed by the debug-offsets field they fill.
DEBUG_OFFSETS_313 = [
    ("runtime_state.size", "sizeof(_PyRuntimeState)"),
    ("runtime_state.finalizing", "offsetof(_PyRuntimeState, _finalizing)"),
    ("runtime_state.interpreters_head", "offsetof(_PyRuntimeState, interpreters.head)"),
    ("interpreter_state.size", "sizeof(PyInterpreterState)"),
    ("interpreter_state.id", "offsetof(PyInterpreterState, id)"),
    ("interpreter_state.next", "offsetof(PyInterpreterState, next)"),
    ("interpreter_state.threads_head", "offsetof(PyInterpreterState, threads.head)"),
    ("interpreter_state.gc", "offsetof(PyInterpreterState, gc)"),
    ("interpreter_state.imports_modules", "offsetof(PyInterpreterState, imports.modules)"),
    ("interpreter_state.sysdict", "offsetof(PyInterpreterState, sysdict)"),
    ("interpreter_state.builtins", "offsetof(PyInterpreterState, builtins)"),
    ("interpreter_state.ceval_gil", "offsetof(PyInterpreterState, ceval.gil)"),
    ("interpreter_state.gil_runtime_state", "offsetof(PyInterpreterState, _gil)"),
    ("interpreter_state.gil_runtime_state_locked", "offsetof(PyInterpreterState, _gil.locked)"),
    ("interpreter_state.gil_runtime_state_holder", "offsetof(PyInterpreterState, _gil.last_holder)"),
    ("thread_state.size", "sizeof(PyThreadState)"),
    ("thread_state.prev", "offsetof(PyThreadState, prev)"),
    ("thread_state.next", "offsetof(PyThreadState, next)"),
    ("thread_state.interp", "offsetof(PyThreadState, interp)"),
    ("thread_state.current_frame", "offsetof(PyThreadState, current_frame)"),
    ("thread_state.thread_id", "offsetof(PyThreadState, thread_id)"),
    ("thread_state.native_thread_id", "offsetof(PyThreadState, native_thread_id)"),
    ("thread_state.datastack_chunk", "offsetof(PyThreadState, datastack_chunk)"),
    ("thread_state.status", "offsetof(PyThreadState, _status)"),
    ("interpreter_frame.size", "sizeof(_PyInterpreterFrame)"),
    ("interpreter_frame.previous", "offsetof(_PyInterpreterFrame, previous)"),
    ("interpreter_frame.executable", "offsetof(_PyInterpreterFrame, f_executable)"),
    ("interpreter_frame.instr_ptr", "offsetof(_PyInterpreterFrame, instr_ptr)"),
    ("interpreter_frame.localsplus", "offsetof(_PyInterpreterFrame, localsplus)"),
    ("interpreter_frame.owner", "offsetof(_PyInterpreterFrame, owner)"),
    ("code_object.size", "sizeof(PyCodeObject)"),
    ("code_object.filename", "offsetof(PyCodeObject, co_filename)"),
    ("code_object.name", "offsetof(PyCodeObject, co_name)"),
    ("code_object.qualname", "offsetof(PyCodeObject, co_qualname)"),
    ("code_object.linetable", "offsetof(PyCodeObject, co_linetable)"),
    ("code_object.firstlineno", "offsetof(PyCodeObject, co_firstlineno)"),
    ("code_object.argcount", "offsetof(PyCodeObject, co_argcount)"),
    ("code_object.localsplusnames", "offsetof(PyCodeObject, co_localsplusnames)"),
    ("code_object.localspluskinds", "offsetof(PyCodeObject, co_localspluskinds)"),
    ("code_object.co_code_adaptive", "offsetof(PyCodeObject, co_code_adaptive)"),
    ("pyobject.size", "sizeof(PyObject)"),
    ("pyobject.ob_type", "offsetof(PyObject, ob_type)"),
    ("type_object.size", "sizeof(PyTypeObject)"),
    ("type_object.tp_name", "offsetof(PyTypeObject, tp_name)"),
    ("type_object.tp_repr", "offsetof(PyTypeObject, tp_repr)"),
    ("type_object.tp_flags", "offsetof(PyTypeObject, tp_flags)"),
    ("tuple_object.size", "sizeof(PyTupleObject)"),
    ("tuple_object.ob_item", "offsetof(PyTupleObject, ob_item)"),
    ("tuple_object.ob_size", "offsetof(PyTupleObject, ob_base.ob_size)"),
    ("list_object.size", "sizeof(PyListObject)"),
    ("list_object.ob_item", "offsetof(PyListObject, ob_item)"),
    ("list_object.ob_size", "offsetof(PyListObject, ob_base.ob_size)"),
    ("dict_object.size", "sizeof(PyDictObject)"),
    ("dict_object.ma_keys", "offsetof(PyDictObject, ma_keys)"),
    ("dict_object.ma_values", "offsetof(PyDictObject, ma_values)"),
    ("float_object.size", "sizeof(PyFloatObject)"),
    ("float_object.ob_fval", "offsetof(PyFloatObject, ob_fval)"),
    ("long_object.size", "sizeof(PyLongObject)"),
    ("long_object.lv_tag", "offsetof(PyLongObject, long_value.lv_tag)"),
    ("long_object.ob_digit", "offsetof(PyLongObject, long_value.ob_digit)"),
    ("bytes_object.size", "sizeof(PyBytesObject)"),
    ("bytes_object.ob_size", "offsetof(PyBytesObject, ob_base.ob_size)"),
    ("bytes_object.ob_sval", "offsetof(PyBytesObject, ob_sval)"),
    ("unicode_object.size", "sizeof(PyUnicodeObject)"),
    ("unicode_object.state", "offsetof(PyUnicodeObject, _base._base.state)"),
    ("unicode_object.length", "offsetof(PyUnicodeObject, _base._base.length)"),
    ("unicode_object.asciiobject_size", "sizeof(PyASCIIObject)"),
    ("gc.size", "sizeof(struct _gc_runtime_state)"),
    ("gc.collecting", "offsetof(struct _gc_runtime_state, collecting)"),
]

def debug_offset_probes(version: Version):
    """The 3.13 expressions, probed one by one (3.14+ use the header's own macro)."""
    return DEBUG_OFFSETS_313 if version == (3, 13) else []


def _includes(version: Version) -> List[str]:
    """The headers that declare what PROBES reads, per version."""
    heads = ["Python.h", "frameobject.h"]
    if version == (3, 8):
        return heads + ["internal/pycore_pystate.h"]
    heads += ["internal/pycore_runtime.h", "internal/pycore_interp.h"]
    if version >= (3, 11):
        heads += ["internal/pycore_frame.h", "internal/pycore_code.h"]
    if version >= (3, 13):
        heads += ["internal/pycore_gc.h", "internal/pycore_long.h", "internal/pycore_tstate.h"]
    if version >= (3, 14):
        heads += ["internal/pycore_interpframe_structs.h", "internal/pycore_debug_offsets.h"]
    return heads


def probe_source(version: Version, with_debug_offsets: bool = True) -> str:
    lines = ["#define Py_BUILD_CORE 1"]
    lines += ['#include "%s"' % h for h in _includes(version)]
    lines += ["#include <stdio.h>", "#include <stddef.h>", "#include <string.h>", "#include <stdint.h>",
              "#define P(name, expr) printf(\"%s %lld\\n\", name, (long long)(expr))",
              "static void bits(const char *name, PyASCIIObject *o) {",
              "    uint32_t w; memcpy(&w, (char *)o + offsetof(PyASCIIObject, state), 4);",
              "    int shift = __builtin_ctz(w), width = __builtin_popcount(w);",
              "    printf(\"PyASCIIObject.state.%s.shift %d\\n\", name, shift);",
              "    printf(\"PyASCIIObject.state.%s.width %d\\n\", name, width);",
              "}",
              "int main(void) {",
              "    PyASCIIObject o;"]
    for name, expr, applies in PROBES:
        if applies(version):
            lines.append('    P("%s", %s);' % (name, expr))
    for field, value in STATE_BITS:
        lines.append("    memset(&o, 0, sizeof o); o.state.%s = %d; bits(\"%s\", &o);" % (field, value, field))
    if with_debug_offsets:
        for name, expr in debug_offset_probes(version):
            lines.append('    P("debug:%s", %s);' % (name, expr))
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def _include_flags(include_dirs: Sequence[str]) -> List[str]:
    """-I for header directories; -idirafter for a whole system include root (one holding
    stdint.h, e.g. a Debian root's /usr/include for its pyconfig.h), so the host's own libc
    headers still come first."""
    return [("-idirafter" if os.path.exists(os.path.join(d, "stdint.h")) else "-I") + d for d in include_dirs]


def run_probe(version: Version, include_dirs: Sequence[str], with_debug_offsets: bool = True,
              cc: str = "gcc") -> Dict[str, int]:
    """Compile and run the probe for ``version`` against ``include_dirs``; {name: value}."""
    src = probe_source(version, with_debug_offsets)
    with tempfile.TemporaryDirectory(prefix="pyoffsets-") as tmp:
        c_path = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(c_path, "w") as f:
            f.write(src)
        cmd = [cc, "-w", "-O0"] + _include_flags(include_dirs) + [c_path, "-o", exe]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError("probe for %d.%d does not compile:\n%s" % (version + (proc.stderr[-3000:],)))
        out = subprocess.run([exe], check=True, stdout=subprocess.PIPE, text=True).stdout
    values: Dict[str, int] = {}
    for line in out.splitlines():
        name, value = line.rsplit(" ", 1)
        values[name] = int(value)
    return values


def debug_offsets_struct_probe(version: Version, include_dirs: Sequence[str],
                               cc: str = "gcc") -> Tuple[Dict[str, int], bytes]:
    """Instantiate the header's own ``_Py_DebugOffsets_INIT`` (3.14+).

    Returns ({"section.field": value} for the fields perfagent.python.debug_offsets
    describes for ``version``, the struct's raw bytes as a live interpreter
    holds them at the start of _PyRuntime).  A field the description names
    that the header lacks fails to compile; a wrong order shows as a
    mismatch between the named values and the parse of the raw bytes.
    """
    sys.path.insert(0, REPO)
    from perfagent.python import debug_offsets as dbg

    names = dbg.field_names(version)
    lines = ["#define Py_BUILD_CORE 1"] + ['#include "%s"' % h for h in _includes(version)]
    lines += ["#include <stdio.h>", "#include <stddef.h>",
              "static _Py_DebugOffsets d = _Py_DebugOffsets_INIT(_Py_Debug_Cookie);",
              "int main(void) {",
              '    const unsigned char *p = (const unsigned char *)&d;',
              '    printf("raw ");',
              '    for (size_t i = 0; i < sizeof d; i++) printf("%02x", p[i]);',
              '    printf("\\n");']
    for name in names:
        lines.append('    printf("%s %%llu\\n", (unsigned long long)d.%s);' % (name, name))
    lines += ["    return 0;", "}", ""]
    with tempfile.TemporaryDirectory(prefix="pydebugoffsets-") as tmp:
        c_path = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(c_path, "w") as f:
            f.write("\n".join(lines))
        cmd = [cc, "-w", "-O0"] + _include_flags(include_dirs) + [c_path, "-o", exe]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError("_Py_DebugOffsets probe for %d.%d does not compile:\n%s"
                               % (version + (proc.stderr[-3000:],)))
        out = subprocess.run([exe], check=True, stdout=subprocess.PIPE, text=True).stdout
    values: Dict[str, int] = {}
    raw = b""
    for line in out.splitlines():
        name, value = line.rsplit(" ", 1)
        if name == "raw":
            raw = bytes.fromhex(value)
        else:
            values[name] = int(value)
    return values, raw


def pyenv_installs(root: str = PYENV) -> Dict[Version, Tuple[str, List[str]]]:
    """{(3, X): ("3.X.Y", [include dirs])} for the newest pyenv install of each minor."""
    found: Dict[Version, Tuple[Tuple[int, ...], str, List[str]]] = {}
    for path in glob.glob(os.path.join(root, "3.*")):
        m = re.match(r"^(\d+)\.(\d+)\.(\d+)$", os.path.basename(path))
        if not m:
            continue
        full = tuple(int(x) for x in m.groups())
        minor = full[:2]
        inc = os.path.join(path, "include", "python%d.%d" % minor)
        if minor not in MINORS or not os.path.isdir(os.path.join(inc, "internal")):
            continue
        if minor not in found or full > found[minor][0]:
            found[minor] = (full, os.path.basename(path), [inc, os.path.join(inc, "internal")])
    return {k: (v[1], v[2]) for k, v in sorted(found.items())}


def split_values(values: Dict[str, int]) -> Tuple[Dict[str, int], Dict[str, int]]:
    layout = {k: v for k, v in values.items() if not k.startswith("debug:")}
    debug = {k[len("debug:"):]: v for k, v in values.items() if k.startswith("debug:")}
    return layout, debug


def _version_string(hexversion: int) -> str:
    level = {0xA: "a", 0xB: "b", 0xC: "rc", 0xF: ""}.get((hexversion >> 4) & 0xF, "?")
    serial = hexversion & 0xF
    s = "%d.%d.%d" % (hexversion >> 24, (hexversion >> 16) & 0xFF, (hexversion >> 8) & 0xFF)
    return s + (level + str(serial) if level else "")


def render(layouts: Dict[Version, Dict[str, int]], debug: Dict[Version, Dict[str, int]]) -> str:
    versions = ", ".join(_version_string(layouts[v]["PY_VERSION_HEX"]) for v in sorted(layouts))
    out = ["# generated by tools/gen_python_offsets.py from CPython %s; do not edit" % versions,
           '"""Offsets of the CPython structures the Python stack reader walks, per minor version.',
           "",
           "Measured with offsetof/sizeof by a C compiler against each version's installed",
           "headers (internal ones included).  Keys are the C members as the headers spell",
           "them; a key a version lacks is a member that version does not have.  Values are",
           "bytes (offsets, sizes), enum values, or bit positions (``.shift``/``.width`` of",
           "the PyASCIIObject.state bit-fields, in its 32-bit little-endian word).",
           "",
           "DEBUG_OFFSETS holds, for 3.13+, what ``_Py_DebugOffsets_INIT`` evaluates to for",
           "the same headers: the tests compare it with a live interpreter's own copy.",
           '"""',
           "",
           "LAYOUTS = {"]
    for v in sorted(layouts):
        out.append("    (%d, %d): {" % v)
        for k, val in layouts[v].items():
            out.append("        %r: %s," % (k, ("%#010x" % val) if k == "PY_VERSION_HEX" else val))
        out.append("    },")
    out.append("}")
    out.append("")
    out.append("DEBUG_OFFSETS = {")
    for v in sorted(debug):
        if not debug[v]:
            continue
        out.append("    (%d, %d): {" % v)
        for k, val in debug[v].items():
            out.append("        %r: %s," % (k, val))
        out.append("    },")
    out.append("}")
    out.append("")
    return "\n".join(out)


def generate(extra: Dict[Version, List[str]]) -> Tuple[str, Dict[Version, Dict[str, int]], Dict[Version, Dict[str, int]]]:
    layouts: Dict[Version, Dict[str, int]] = {}
    debug: Dict[Version, Dict[str, int]] = {}
    sources = {v: inc for v, (_, inc) in pyenv_installs().items()}
    sources.update(extra)
    for v in sorted(sources):
        layouts[v], debug[v] = split_values(run_probe(v, sources[v]))
    missing = [v for v in MINORS if v not in layouts]
    if missing:
        raise SystemExit("no headers for CPython %s" % ", ".join("%d.%d" % m for m in missing))
    # Only the minors the generated module is for; the rest is cross-check material.
    table = {v: layouts[v] for v in MINORS}
    return render(table, {v: debug[v] for v in MINORS}), layouts, debug


def _parse_include(spec: str) -> Tuple[Version, List[str]]:
    version, _, dirs = spec.partition("=")
    major, minor = (int(x) for x in version.split("."))
    incs = [d for d in dirs.split(":") if d]
    extra = []
    for d in incs:
        if os.path.isdir(os.path.join(d, "internal")):
            extra.append(os.path.join(d, "internal"))
    return (major, minor), incs + extra


def _check_debug_offsets(v: Version, extra: Dict[Version, List[str]], fixture: Optional[str] = None) -> int:
    """Print the header's _Py_DebugOffsets and compare with the module's parse of its bytes."""
    from perfagent.python import debug_offsets as dbg

    incs = extra.get(v)
    if not incs:
        print("--debug-offsets %d.%d needs --include %d.%d=DIR" % (v + v), file=sys.stderr)
        return 2
    named, raw = debug_offsets_struct_probe(v, incs)
    parsed = dbg.parse(raw + bytes(max(0, dbg.MAX_SIZE - len(raw)))).flat()
    bad = 0
    if len(raw) != dbg.struct_size(v):
        print("sizeof(_Py_DebugOffsets) %d, described %d" % (len(raw), dbg.struct_size(v)))
        bad += 1
    for name, value in named.items():
        mark = "" if parsed.get(name) == value else "   <-- parsed %r" % parsed.get(name)
        bad += bool(mark)
        print("%-50s %d%s" % (name, value, mark))
    values, _ = split_values(run_probe(v, incs, with_debug_offsets=False))
    facts = dbg.ABI_FACTS[v]
    checks = {"kind_shift": values["PyASCIIObject.state.kind.shift"],
              "compact_shift": values["PyASCIIObject.state.compact.shift"],
              "ascii_shift": values["PyASCIIObject.state.ascii.shift"],
              "compact_extra": values["sizeof(PyCompactUnicodeObject)"] - values["sizeof(PyASCIIObject)"],
              "frame_owner_shim": values.get("FRAME_OWNED_BY_INTERPRETER", values.get("FRAME_OWNED_BY_CSTACK"))}
    for k, measured in checks.items():
        mark = "" if facts[k] == measured else "   <-- ABI_FACTS says %d" % facts[k]
        bad += bool(mark)
        print("ABI_FACTS %-40s %d%s" % (k, measured, mark))
    vstr = dbg.version_string(values["PY_VERSION_HEX"])
    print("%s: %d mismatch(es)" % (vstr, bad))
    if fixture and not bad:
        import json
        with open(fixture, "w") as f:
            json.dump({"generated_by": "tools/gen_python_offsets.py --debug-offsets %d.%d" % v,
                       "headers": vstr, "raw": raw.hex(), "fields": named,
                       "abi": {k: int(x) for k, x in checks.items()}}, f, indent=1)
            f.write("\n")
        print("wrote %s" % fixture)
    return 1 if bad else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--include", action="append", default=[], metavar="3.X=DIR[:DIR...]",
                    help="header directories of another CPython (e.g. Debian's libpython3.14-dev)")
    ap.add_argument("--check", action="store_true", help="compare with the committed file, do not write")
    ap.add_argument("--print", dest="print_version", metavar="3.X",
                    help="print the probe values of one version instead of writing")
    ap.add_argument("--debug-offsets", metavar="3.X",
                    help="instantiate _Py_DebugOffsets_INIT of a 3.14+ header tree (--include) and "
                         "check perfagent.python.debug_offsets parses it; prints the fields")
    ap.add_argument("--fixture", metavar="PATH",
                    help="with --debug-offsets: also write the struct's bytes and fields as JSON "
                         "(tests/fixtures/python_debug_offsets/3.X.json)")
    ap.add_argument("-o", "--output", default=OUTPUT)
    args = ap.parse_args(argv)
    extra = dict(_parse_include(s) for s in args.include)
    if args.print_version:
        v = tuple(int(x) for x in args.print_version.split("."))
        incs = extra.get(v) or pyenv_installs().get(v, (None, None))[1]
        if not incs:
            print("no headers for %s" % args.print_version, file=sys.stderr)
            return 1
        for k, val in sorted(run_probe(v, incs).items()):
            print(k, val)
        return 0
    if args.debug_offsets:
        return _check_debug_offsets(tuple(int(x) for x in args.debug_offsets.split(".")), extra,
                                    args.fixture)
    text, _, _ = generate(extra)
    if args.check:
        with open(args.output) as f:
            same = f.read() == text
        print("%s is %s" % (args.output, "up to date" if same else "OUT OF DATE"))
        return 0 if same else 1
    with open(args.output, "w") as f:
        f.write(text)
    print("wrote %s" % args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
