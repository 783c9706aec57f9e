"""``_Py_DebugOffsets``: the layout CPython 3.13+ publishes about itself.

Since 3.13 the first member of ``_PyRuntime`` (``_PyRuntimeState``) is a
``_Py_DebugOffsets`` struct, statically initialised by
``_Py_DebugOffsets_INIT``: an 8-byte cookie ``"xdebugpy"``, the
interpreter's ``PY_VERSION_HEX``, a free-threaded flag, then groups of
``uint64_t`` -- the sizes and member offsets of the structures an
out-of-process reader walks, as the compiler laid them out for *this*
build.  Reading them from the target replaces a per-version table.

The struct itself changes between minor versions (3.14 added sections and
fields in the middle, 3.15 more), so the reader must know its shape per
version: this module describes each known version's struct as data (the C
declaration quoted beside the field list) and picks it by the ``version``
read from the struct's fixed header.  A version newer than the newest
described, or an alpha/beta release (whose struct may still move), is
refused with reason ``unknown_version``; a free-threaded build with
``free_threaded``.  Nothing is guessed.

Sources of the C structs below: 3.13 -- pyenv's 3.13.0 and Debian's
3.13.5 ``Include/internal/pycore_runtime.h`` (identical); 3.14 -- Debian's
libpython3.14-dev 3.14.10 and 3.15 -- libpython3.15-dev 3.15.2,
``Include/internal/pycore_debug_offsets.h``.  ``tools/gen_python_offsets.py
--debug-offsets`` compiles ``_Py_DebugOffsets_INIT`` against those headers
and the tests check this module parses its bytes field by field.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Sequence, Tuple

from perfagent.errors import ParseError
from perfagent.python.layout import INTERPRETER_FRAME, LOCATIONS, Layout, LayoutError

COOKIE = b"xdebugpy"

# The fixed head of every version:
#   char cookie[8];
#   uint64_t version;        /* PY_VERSION_HEX */
#   uint64_t free_threaded;  /* _Py_Debug_Free_Threaded */
HEAD = struct.Struct("<8sQQ")

#: PY_RELEASE_LEVEL values (Include/patchlevel.h).
PY_RELEASE_LEVEL_ALPHA = 0xA
PY_RELEASE_LEVEL_BETA = 0xB
PY_RELEASE_LEVEL_GAMMA = 0xC   # release candidate
PY_RELEASE_LEVEL_FINAL = 0xF

#: Sections of the struct after the head, in order: (section, fields).
#: Every field is a uint64_t.
#
# 3.13 (Include/internal/pycore_runtime.h):
#   struct _runtime_state { uint64_t size, finalizing, interpreters_head; } runtime_state;
#   struct _interpreter_state { uint64_t size, id, next, threads_head, gc, imports_modules,
#       sysdict, builtins, ceval_gil, gil_runtime_state, gil_runtime_state_enabled,
#       gil_runtime_state_locked, gil_runtime_state_holder; } interpreter_state;
#   struct _thread_state { uint64_t size, prev, next, interp, current_frame, thread_id,
#       native_thread_id, datastack_chunk, status; } thread_state;
#   struct _interpreter_frame { uint64_t size, previous, executable, instr_ptr, localsplus,
#       owner; } interpreter_frame;
#   struct _code_object { uint64_t size, filename, name, qualname, linetable, firstlineno,
#       argcount, localsplusnames, localspluskinds, co_code_adaptive; } code_object;
#   struct _pyobject { uint64_t size, ob_type; } pyobject;
#   struct _type_object { uint64_t size, tp_name, tp_repr, tp_flags; } type_object;
#   struct _tuple_object { uint64_t size, ob_item, ob_size; } tuple_object;
#   struct _list_object { uint64_t size, ob_item, ob_size; } list_object;
#   struct _dict_object { uint64_t size, ma_keys, ma_values; } dict_object;
#   struct _float_object { uint64_t size, ob_fval; } float_object;
#   struct _long_object { uint64_t size, lv_tag, ob_digit; } long_object;
#   struct _bytes_object { uint64_t size, ob_size, ob_sval; } bytes_object;
#   struct _unicode_object { uint64_t size, state, length, asciiobject_size; } unicode_object;
#   struct _gc { uint64_t size, collecting; } gc;
SECTIONS_313: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("runtime_state", ("size", "finalizing", "interpreters_head")),
    ("interpreter_state", ("size", "id", "next", "threads_head", "gc", "imports_modules", "sysdict",
                           "builtins", "ceval_gil", "gil_runtime_state", "gil_runtime_state_enabled",
                           "gil_runtime_state_locked", "gil_runtime_state_holder")),
    ("thread_state", ("size", "prev", "next", "interp", "current_frame", "thread_id",
                      "native_thread_id", "datastack_chunk", "status")),
    ("interpreter_frame", ("size", "previous", "executable", "instr_ptr", "localsplus", "owner")),
    ("code_object", ("size", "filename", "name", "qualname", "linetable", "firstlineno", "argcount",
                     "localsplusnames", "localspluskinds", "co_code_adaptive")),
    ("pyobject", ("size", "ob_type")),
    ("type_object", ("size", "tp_name", "tp_repr", "tp_flags")),
    ("tuple_object", ("size", "ob_item", "ob_size")),
    ("list_object", ("size", "ob_item", "ob_size")),
    ("dict_object", ("size", "ma_keys", "ma_values")),
    ("float_object", ("size", "ob_fval")),
    ("long_object", ("size", "lv_tag", "ob_digit")),
    ("bytes_object", ("size", "ob_size", "ob_sval")),
    ("unicode_object", ("size", "state", "length", "asciiobject_size")),
    ("gc", ("size", "collecting")),
)

# 3.14 (Include/internal/pycore_debug_offsets.h), what changed from 3.13:
#   interpreter_state: + threads_main (after threads_head),
#                      + code_object_generation, tlbc_generation (at the end);
#   interpreter_frame: + stackpointer, tlbc_index;
#   code_object:       + co_tlbc;
#   + struct _set_object { uint64_t size, used, table, mask; } set_object;  (after list_object)
#   + struct _gen_object { uint64_t size, gi_name, gi_iframe, gi_frame_state; } gen_object;
#   + struct _llist_node { uint64_t next, prev; } llist_node;
#   + struct _debugger_support { uint64_t eval_breaker, remote_debugger_support,
#       remote_debugging_enabled, debugger_pending_call, debugger_script_path,
#       debugger_script_path_size; } debugger_support;
SECTIONS_314 = (
    ("runtime_state", ("size", "finalizing", "interpreters_head")),
    ("interpreter_state", ("size", "id", "next", "threads_head", "threads_main", "gc",
                           "imports_modules", "sysdict", "builtins", "ceval_gil", "gil_runtime_state",
                           "gil_runtime_state_enabled", "gil_runtime_state_locked",
                           "gil_runtime_state_holder", "code_object_generation", "tlbc_generation")),
    ("thread_state", ("size", "prev", "next", "interp", "current_frame", "thread_id",
                      "native_thread_id", "datastack_chunk", "status")),
    ("interpreter_frame", ("size", "previous", "executable", "instr_ptr", "localsplus", "owner",
                           "stackpointer", "tlbc_index")),
    ("code_object", ("size", "filename", "name", "qualname", "linetable", "firstlineno", "argcount",
                     "localsplusnames", "localspluskinds", "co_code_adaptive", "co_tlbc")),
    ("pyobject", ("size", "ob_type")),
    ("type_object", ("size", "tp_name", "tp_repr", "tp_flags")),
    ("tuple_object", ("size", "ob_item", "ob_size")),
    ("list_object", ("size", "ob_item", "ob_size")),
    ("set_object", ("size", "used", "table", "mask")),
    ("dict_object", ("size", "ma_keys", "ma_values")),
    ("float_object", ("size", "ob_fval")),
    ("long_object", ("size", "lv_tag", "ob_digit")),
    ("bytes_object", ("size", "ob_size", "ob_sval")),
    ("unicode_object", ("size", "state", "length", "asciiobject_size")),
    ("gc", ("size", "collecting")),
    ("gen_object", ("size", "gi_name", "gi_iframe", "gi_frame_state")),
    ("llist_node", ("next", "prev")),
    ("debugger_support", ("eval_breaker", "remote_debugger_support", "remote_debugging_enabled",
                          "debugger_pending_call", "debugger_script_path", "debugger_script_path_size")),
)

# 3.15 (Include/internal/pycore_debug_offsets.h), what changed from 3.14:
#   thread_state: + base_frame, last_profiled_frame, last_profiled_frame_seq (after current_frame),
#                 + holds_gil, gil_requested, current_exception, exc_state (at the end);
#   + struct { uint64_t exc_value; } err_stackitem;              (after thread_state)
#   type_object: + tp_basicsize, tp_dictoffset;
#   + struct _heap_type_object { uint64_t size, ht_cached_keys; } heap_type_object;
#   unicode_object: + compactunicodeobject_size;
#   gc: + frame, generation_stats_size, generation_stats.
SECTIONS_315 = (
    ("runtime_state", ("size", "finalizing", "interpreters_head")),
    ("interpreter_state", ("size", "id", "next", "threads_head", "threads_main", "gc",
                           "imports_modules", "sysdict", "builtins", "ceval_gil", "gil_runtime_state",
                           "gil_runtime_state_enabled", "gil_runtime_state_locked",
                           "gil_runtime_state_holder", "code_object_generation", "tlbc_generation")),
    ("thread_state", ("size", "prev", "next", "interp", "current_frame", "base_frame",
                      "last_profiled_frame", "last_profiled_frame_seq", "thread_id",
                      "native_thread_id", "datastack_chunk", "status", "holds_gil", "gil_requested",
                      "current_exception", "exc_state")),
    ("err_stackitem", ("exc_value",)),
    ("interpreter_frame", ("size", "previous", "executable", "instr_ptr", "localsplus", "owner",
                           "stackpointer", "tlbc_index")),
    ("code_object", ("size", "filename", "name", "qualname", "linetable", "firstlineno", "argcount",
                     "localsplusnames", "localspluskinds", "co_code_adaptive", "co_tlbc")),
    ("pyobject", ("size", "ob_type")),
    ("type_object", ("size", "tp_name", "tp_repr", "tp_flags", "tp_basicsize", "tp_dictoffset")),
    ("heap_type_object", ("size", "ht_cached_keys")),
    ("tuple_object", ("size", "ob_item", "ob_size")),
    ("list_object", ("size", "ob_item", "ob_size")),
    ("set_object", ("size", "used", "table", "mask")),
    ("dict_object", ("size", "ma_keys", "ma_values")),
    ("float_object", ("size", "ob_fval")),
    ("long_object", ("size", "lv_tag", "ob_digit")),
    ("bytes_object", ("size", "ob_size", "ob_sval")),
    ("unicode_object", ("size", "state", "length", "asciiobject_size", "compactunicodeobject_size")),
    ("gc", ("size", "collecting", "frame", "generation_stats_size", "generation_stats")),
    ("gen_object", ("size", "gi_name", "gi_iframe", "gi_frame_state")),
    ("llist_node", ("next", "prev")),
    ("debugger_support", ("eval_breaker", "remote_debugger_support", "remote_debugging_enabled",
                          "debugger_pending_call", "debugger_script_path", "debugger_script_path_size")),
)

#: Facts the walker needs that _Py_DebugOffsets does not carry, per minor
#: version, from the same headers (non-free-threaded builds):
#:
#: * PyASCIIObject.state (cpython/unicodeobject.h), little-endian word:
#:       unsigned int interned:2; unsigned int kind:3; unsigned int compact:1;
#:       unsigned int ascii:1; unsigned int statically_allocated:1; unsigned int :24;
#: * sizeof(PyCompactUnicodeObject) = sizeof(PyASCIIObject) + 16:
#:       PyASCIIObject _base; Py_ssize_t utf8_length; char *utf8;
#:   (3.15 also publishes it as unicode_object.compactunicodeobject_size);
#: * frame_owner_shim: frames whose ``owner`` is at least this are not Python
#:   frames but the C-stack markers of the eval loop -- 3.13: entry_frame,
#:   FRAME_OWNED_BY_CSTACK = 3; 3.14, 3.15: the entry frame is
#:   FRAME_OWNED_BY_INTERPRETER = 3 (3.14's FRAME_OWNED_BY_CSTACK = 4 is
#:   assigned nowhere), also the thread's base frame;
#: * code_tag_mask: f_executable is a PyObject* in 3.13 and a _PyStackRef
#:   from 3.14 (pycore_stackref.h): the low Py_TAG_BITS bits are flags,
#:   1 in 3.14, 3 in 3.15.
ABI_FACTS: Dict[Tuple[int, int], Dict[str, int]] = {
    (3, 13): {"kind_shift": 2, "compact_shift": 5, "ascii_shift": 6, "compact_extra": 16,
              "frame_owner_shim": 3, "code_tag_mask": 0},
    (3, 14): {"kind_shift": 2, "compact_shift": 5, "ascii_shift": 6, "compact_extra": 16,
              "frame_owner_shim": 3, "code_tag_mask": 1},
    (3, 15): {"kind_shift": 2, "compact_shift": 5, "ascii_shift": 6, "compact_extra": 16,
              "frame_owner_shim": 3, "code_tag_mask": 3},
}

SECTIONS: Dict[Tuple[int, int], Tuple[Tuple[str, Tuple[str, ...]], ...]] = {
    (3, 13): SECTIONS_313,
    (3, 14): SECTIONS_314,
    (3, 15): SECTIONS_315,
}


def _struct_for(sections) -> struct.Struct:
    return struct.Struct("<" + "Q" * sum(len(fields) for _, fields in sections))


#: Precompiled: the body (everything after HEAD) of each known version.
BODIES: Dict[Tuple[int, int], struct.Struct] = {v: _struct_for(s) for v, s in SECTIONS.items()}

#: The most bytes any known version needs (what to read from the target).
MAX_SIZE = HEAD.size + max(b.size for b in BODIES.values())

#: Sane bounds: no CPython structure the walker reads is anywhere near this.
MAX_STRUCT_SIZE = 16 << 20

#: (section, offset field) pairs that must lie inside their section's size.
_CHECKED = (
    ("interpreter_state", ("id", "next", "threads_head", "gil_runtime_state_locked",
                           "gil_runtime_state_holder")),
    ("thread_state", ("next", "interp", "current_frame", "thread_id", "native_thread_id")),
    ("interpreter_frame", ("previous", "executable", "instr_ptr", "owner")),
    ("code_object", ("filename", "name", "qualname", "linetable", "firstlineno", "co_code_adaptive")),
    ("bytes_object", ("ob_size", "ob_sval")),
    ("unicode_object", ("state", "length")),
)


class DebugOffsetsError(ParseError):
    """The bytes at _PyRuntime are not usable debug offsets.

    ``reason``: ``unknown_version`` (no cookie, a version this module does
    not describe, a pre-release, or values that fail validation) or
    ``free_threaded``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class DebugOffsets:
    """A parsed ``_Py_DebugOffsets``: ``offsets["section"]["field"]``."""

    __slots__ = ("hexversion", "free_threaded", "offsets")

    def __init__(self, hexversion: int, free_threaded: bool, offsets: Dict[str, Dict[str, int]]) -> None:
        self.hexversion = hexversion
        self.free_threaded = free_threaded
        self.offsets = offsets

    @property
    def version(self) -> Tuple[int, int]:
        return (self.hexversion >> 24, (self.hexversion >> 16) & 0xFF)

    def flat(self) -> Dict[str, int]:
        """{"section.field": value} for every field."""
        return {"%s.%s" % (s, f): v for s, fields in self.offsets.items() for f, v in fields.items()}

    def __repr__(self) -> str:
        return "<DebugOffsets %s free_threaded=%s>" % (version_string(self.hexversion), self.free_threaded)


def version_string(hexversion: int) -> str:
    """PY_VERSION_HEX as CPython writes it: 0x030d05f0 -> "3.13.5", 0x030e00a1 -> "3.14.0a1"."""
    level = (hexversion >> 4) & 0xF
    s = "%d.%d.%d" % (hexversion >> 24, (hexversion >> 16) & 0xFF, (hexversion >> 8) & 0xFF)
    if level == PY_RELEASE_LEVEL_FINAL:
        return s
    return s + {PY_RELEASE_LEVEL_ALPHA: "a", PY_RELEASE_LEVEL_BETA: "b",
                PY_RELEASE_LEVEL_GAMMA: "rc"}.get(level, "?") + str(hexversion & 0xF)


def has_cookie(data: bytes) -> bool:
    return data[:len(COOKIE)] == COOKIE


def parse_head(data: bytes) -> Tuple[int, bool]:
    """(PY_VERSION_HEX, free_threaded) from the first HEAD.size bytes; DebugOffsetsError if no cookie."""
    if len(data) < HEAD.size or not has_cookie(data):
        raise DebugOffsetsError("unknown_version", "no _Py_DebugOffsets cookie %r at _PyRuntime" % COOKIE)
    _, hexversion, free_threaded = HEAD.unpack_from(data, 0)
    return hexversion, bool(free_threaded)


def known_versions() -> List[Tuple[int, int]]:
    return sorted(SECTIONS)


def parse(data: bytes, allow_free_threaded: bool = False) -> DebugOffsets:
    """Parse and validate ``_Py_DebugOffsets`` bytes (at least :data:`MAX_SIZE` for safety).

    Refuses (DebugOffsetsError): no cookie, an unknown minor version or a
    pre-release (``unknown_version``), a free-threaded build
    (``free_threaded``, unless allowed), offsets outside their structure.
    """
    hexversion, free_threaded = parse_head(data)
    vstr = version_string(hexversion)
    version = (hexversion >> 24, (hexversion >> 16) & 0xFF)
    sections = SECTIONS.get(version)
    if sections is None:
        newest = known_versions()[-1]
        raise DebugOffsetsError("unknown_version", "CPython %s: _Py_DebugOffsets layout not known "
                                "(this agent knows 3.13 to %d.%d)" % ((vstr,) + newest))
    if (hexversion >> 4) & 0xF in (PY_RELEASE_LEVEL_ALPHA, PY_RELEASE_LEVEL_BETA):
        raise DebugOffsetsError("unknown_version", "CPython %s is a pre-release: its _Py_DebugOffsets "
                                "may differ from the release's" % vstr)
    if free_threaded and not allow_free_threaded:
        raise DebugOffsetsError("free_threaded", "CPython %s is a free-threaded build" % vstr)
    body = BODIES[version]
    if len(data) < HEAD.size + body.size:
        raise DebugOffsetsError("unknown_version", "_Py_DebugOffsets of %s truncated: %d of %d bytes"
                                % (vstr, len(data), HEAD.size + body.size))
    values = iter(body.unpack_from(data, HEAD.size))
    offsets = {section: {f: next(values) for f in fields} for section, fields in sections}
    _validate(offsets, vstr)
    return DebugOffsets(hexversion, free_threaded, offsets)


def _validate(offsets: Dict[str, Dict[str, int]], vstr: str) -> None:
    for section, fields in _CHECKED:
        sec = offsets[section]
        size = sec["size"]
        if not 0 < size <= MAX_STRUCT_SIZE:
            raise DebugOffsetsError("unknown_version", "CPython %s: implausible %s.size %d" % (vstr, section, size))
        for f in fields:
            if sec[f] >= size:
                raise DebugOffsetsError("unknown_version", "CPython %s: %s.%s = %d is outside the %d-byte "
                                        "structure" % (vstr, section, f, sec[f], size))
    if offsets["runtime_state"]["interpreters_head"] >= offsets["runtime_state"]["size"]:
        raise DebugOffsetsError("unknown_version", "CPython %s: runtime_state.interpreters_head "
                                "outside _PyRuntimeState" % vstr)


def layout_from_debug_offsets(d: DebugOffsets) -> Layout:
    """The uniform :class:`Layout` of a 3.13+ interpreter from its own debug offsets."""
    facts = ABI_FACTS.get(d.version)
    if facts is None:
        raise LayoutError("unknown_version", "CPython %s: no ABI facts" % version_string(d.hexversion))
    if d.free_threaded:
        raise LayoutError("free_threaded", "CPython %s is a free-threaded build" % version_string(d.hexversion))
    o = d.offsets
    rt, it, ts, fr, co = (o["runtime_state"], o["interpreter_state"], o["thread_state"],
                          o["interpreter_frame"], o["code_object"])
    uni, byt = o["unicode_object"], o["bytes_object"]
    ascii_size = uni["asciiobject_size"]
    compact_size = uni.get("compactunicodeobject_size", ascii_size + facts["compact_extra"])
    return Layout(
        version=d.version, hexversion=d.hexversion, free_threaded=False, source="debug_offsets",
        runtime_interpreters_head=rt["interpreters_head"],
        interp_next=it["next"], interp_id=it["id"], interp_threads_head=it["threads_head"],
        interp_gil_locked=it["gil_runtime_state_locked"],
        interp_gil_last_holder=it["gil_runtime_state_holder"],
        tstate_prev=ts["prev"], tstate_next=ts["next"], tstate_interp=ts["interp"],
        tstate_thread_id=ts["thread_id"],
        tstate_native_thread_id=ts["native_thread_id"], tstate_frame=ts["current_frame"],
        frame_model=INTERPRETER_FRAME,
        frame_back=fr["previous"], frame_code=fr["executable"], frame_instr=fr["instr_ptr"],
        frame_owner=fr["owner"], frame_owner_shim=facts["frame_owner_shim"], frame_size=fr["size"],
        code_tag_mask=facts["code_tag_mask"], lasti_unit=1,
        code_size=co["size"], code_name=co["name"], code_qualname=co["qualname"],
        code_filename=co["filename"], code_firstlineno=co["firstlineno"],
        code_linetable=co["linetable"], code_adaptive=co["co_code_adaptive"],
        linetable_format=LOCATIONS,
        ob_type=o["pyobject"]["ob_type"],
        bytes_ob_size=byt["ob_size"], bytes_ob_sval=byt["ob_sval"],
        unicode_length=uni["length"], unicode_state=uni["state"],
        unicode_ascii_data=ascii_size, unicode_compact_data=compact_size,
        # PyUnicodeObject: PyCompactUnicodeObject _base; union { void *any; ... } data;
        unicode_legacy_data=compact_size,
        unicode_kind_shift=facts["kind_shift"], unicode_compact_shift=facts["compact_shift"],
        unicode_ascii_shift=facts["ascii_shift"],
    )


def field_names(version: Tuple[int, int]) -> Sequence[str]:
    """"section.field" for every field of ``version``'s struct, in order."""
    return ["%s.%s" % (s, f) for s, fields in SECTIONS[version] for f in fields]


def struct_size(version: Tuple[int, int]) -> Optional[int]:
    body = BODIES.get(version)
    return HEAD.size + body.size if body is not None else None
