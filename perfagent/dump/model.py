"""What ``perf-agent dump`` reports, and its JSON form (a documented, stable schema).

A dump is one process, its threads and each thread's frames, innermost
first.  The JSON output is :func:`to_json` of a :class:`Dump`; its shape is
:data:`JSON_SCHEMA` (a JSON Schema, draft 2020-12), which README.md quotes.
Changes to it are additive only; ``schema`` names the version.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional

from perfagent.records import NamedTuple

SCHEMA_NAME = "perf-agent-dump/1"

KIND_PYTHON = "python"
KIND_NATIVE = "native"
KIND_KERNEL = "kernel"
KINDS = (KIND_PYTHON, KIND_NATIVE, KIND_KERNEL)

#: Module of a core-kernel frame (module frames carry ``[name]``).
KERNEL_MODULE = "[kernel.kallsyms]"


class Frame(NamedTuple):
    """One frame.  Fields that do not apply to the kind are None.

    * python: name (co_qualname, co_name before 3.11), file, line (0 when
      the code object has no line for the instruction);
    * native: name (None when no symbol covers it), module (the mapped file
      as the process names it, or ``[vdso]``, ``[jit]``, ``[anon]``),
      address (the pc for the innermost frame, return address - 1 for
      callers, i.e. inside the call instruction), offset (that address as
      an offset into the mapped file, for addr2line / a debugger);
    * kernel: name, module, offset (from the function's start), address
      (None unless the kernel shows it).
    """

    kind: str
    name: Optional[str]
    file: Optional[str] = None
    line: Optional[int] = None
    module: Optional[str] = None
    address: Optional[int] = None
    offset: Optional[int] = None


class Thread(NamedTuple):
    tid: Optional[int]           # None: a Python thread state whose kernel thread is unknown
    ns_tid: Optional[int]        # the tid inside the process's own pid namespace
    name: str                    # comm
    state: str                   # a word of procfs.STATE_WORDS ("" when unknown)
    state_code: str              # the /proc letter
    holds_gil: Optional[bool]    # None for a process that is not (readable) Python
    python: bool                 # has a Python thread state
    frames: List[Frame]
    notes: List[str]             # why frames are missing or partial, one reason each
    stop_us: Optional[float]     # how long the thread was held stopped (None: it was not)
    stop_wait_us: Optional[float]  # from asking for the stop to seeing it (the thread getting there)


class Process(NamedTuple):
    pid: int
    ns_pid: int
    name: str                    # comm
    exe: str
    cmdline: List[str]
    kernel_thread: bool
    python: Optional[Dict[str, object]]   # {"version", "path", "shared"} or None
    python_missing: Optional[str]         # why no Python frames (a skip reason and message), None if read


class Dump(NamedTuple):
    process: Process
    threads: List[Thread]
    native: bool                 # native frames were asked for (threads were stopped)
    notes: List[str]
    total_ms: float
    max_stop_us: Optional[float]
    threads_stopped: int
    max_stop_wait_us: Optional[float]


def _frame_json(f: Frame) -> Dict[str, object]:
    return {"kind": f.kind, "name": f.name, "file": f.file, "line": f.line,
            "module": f.module, "address": f.address, "offset": f.offset}


def to_dict(d: Dump) -> Dict[str, object]:
    p = d.process
    return {
        "schema": SCHEMA_NAME,
        "process": {"pid": p.pid, "ns_pid": p.ns_pid, "name": p.name, "exe": p.exe,
                    "cmdline": list(p.cmdline), "kernel_thread": p.kernel_thread,
                    "python": p.python, "python_missing": p.python_missing},
        "native": d.native,
        "threads": [{"tid": t.tid, "ns_tid": t.ns_tid, "name": t.name, "state": t.state,
                     "state_code": t.state_code, "holds_gil": t.holds_gil, "python": t.python,
                     "frames": [_frame_json(f) for f in t.frames], "notes": list(t.notes),
                     "stop_us": _us(t.stop_us), "stop_wait_us": _us(t.stop_wait_us)}
                    for t in d.threads],
        "notes": list(d.notes),
        "timing": {"total_ms": round(d.total_ms, 3),
                   "max_stop_us": _us(d.max_stop_us), "max_stop_wait_us": _us(d.max_stop_wait_us),
                   "threads_stopped": d.threads_stopped},
    }


def _us(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def to_json(d: Dump) -> str:
    return json.dumps(to_dict(d), indent=2) + "\n"


_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}

#: The JSON output's schema (JSON Schema draft 2020-12).
JSON_SCHEMA: Dict[str, object] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "perf-agent dump",
    "type": "object",
    "required": ["schema", "process", "native", "threads", "notes", "timing"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "process": {
            "type": "object",
            "required": ["pid", "ns_pid", "name", "exe", "cmdline", "kernel_thread", "python",
                         "python_missing"],
            "additionalProperties": False,
            "properties": {
                "pid": {"type": "integer", "minimum": 1},
                "ns_pid": {"type": "integer", "minimum": 1},
                "name": {"type": "string"},
                "exe": {"type": "string"},
                "cmdline": {"type": "array", "items": {"type": "string"}},
                "kernel_thread": {"type": "boolean"},
                "python": {
                    "type": ["object", "null"],
                    "required": ["version", "path", "shared"],
                    "additionalProperties": False,
                    "properties": {"version": {"type": "string"}, "path": {"type": "string"},
                                   "shared": {"type": "boolean"}},
                },
                "python_missing": _NULLABLE_STR,
            },
        },
        "native": {"type": "boolean"},
        "threads": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["tid", "ns_tid", "name", "state", "state_code", "holds_gil", "python",
                             "frames", "notes", "stop_us", "stop_wait_us"],
                "additionalProperties": False,
                "properties": {
                    "tid": _NULLABLE_INT,
                    "ns_tid": _NULLABLE_INT,
                    "name": {"type": "string"},
                    "state": {"enum": [""] + ["running", "sleeping", "uninterruptible", "stopped",
                                              "tracing-stop", "zombie", "dead", "idle", "parked",
                                              "waking", "wakekill"]},
                    "state_code": {"type": "string"},
                    "holds_gil": {"type": ["boolean", "null"]},
                    "python": {"type": "boolean"},
                    "frames": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["kind", "name", "file", "line", "module", "address", "offset"],
                            "additionalProperties": False,
                            "properties": {
                                "kind": {"enum": list(KINDS)},
                                "name": _NULLABLE_STR,
                                "file": _NULLABLE_STR,
                                "line": _NULLABLE_INT,
                                "module": _NULLABLE_STR,
                                "address": _NULLABLE_INT,
                                "offset": _NULLABLE_INT,
                            },
                        },
                    },
                    "notes": {"type": "array", "items": {"type": "string"}},
                    "stop_us": {"type": ["number", "null"]},
                    "stop_wait_us": {"type": ["number", "null"]},
                },
            },
        },
        "notes": {"type": "array", "items": {"type": "string"}},
        "timing": {
            "type": "object",
            "required": ["total_ms", "max_stop_us", "max_stop_wait_us", "threads_stopped"],
            "additionalProperties": False,
            "properties": {"total_ms": {"type": "number"},
                           "max_stop_us": {"type": ["number", "null"]},
                           "max_stop_wait_us": {"type": ["number", "null"]},
                           "threads_stopped": {"type": "integer", "minimum": 0}},
        },
    },
}
