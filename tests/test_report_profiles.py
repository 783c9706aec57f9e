"""Hand-built profiles shared by the report tests (no tests of its own).

``known_profile()`` has totals worked out by hand below, so the tests can
assert exact numbers rather than compare the report with itself.
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

from perfagent.pprof.profile import Profile, ProfileBuilder

MS = 1000000  # each sample count stands for 1ms of CPU

# (root-first stack, count, pid, comm). Frame names carry their kind via
# the mapping chosen in known_profile(): sys_write is kernel, jitted is JIT,
# py_handler is a Python function (filename handler.py), "0x1234" an
# unsymbolized address.
KNOWN_STACKS: List[Tuple[Tuple[str, ...], int, str, str]] = [
    (("main", "compute", "leaf_a"), 10, "100", "app"),
    (("main", "compute", "leaf_b"), 5, "100", "app"),
    (("main", "leaf_a"), 3, "100", "app"),
    (("main", "compute", "sys_write"), 2, "100", "app"),
    (("main", "recurse", "recurse", "recurse"), 4, "200", "worker"),
    (("main", "jitted"), 1, "200", "worker"),
    (("py_handler", "leaf_b"), 5, "200", "python3"),
    (("main", "0x1234"), 2, "200", "worker"),
]
KNOWN_TOTAL = 32
# flat and cum (in counts) per function, worked out from KNOWN_STACKS.
KNOWN_FLAT = {"leaf_a": 13, "leaf_b": 10, "recurse": 4, "sys_write": 2, "0x1234": 2, "jitted": 1,
              "main": 0, "compute": 0, "py_handler": 0}
KNOWN_CUM = {"main": 27, "compute": 17, "leaf_a": 13, "leaf_b": 10, "recurse": 4, "sys_write": 2,
             "0x1234": 2, "jitted": 1, "py_handler": 5}
# The same in the Python-first view (the default: the profile has a Python
# frame): py_handler -> leaf_b becomes py_handler alone, leaf_b's 5 its self time.
PYTHON_FIRST_FLAT = dict(KNOWN_FLAT, leaf_b=5, py_handler=5)
PYTHON_FIRST_CUM = dict(KNOWN_CUM, leaf_b=5)


def known_profile() -> Profile:
    """KNOWN_STACKS as a capture would write them: [samples/count, cpu/nanoseconds]."""
    builder = ProfileBuilder([("samples", "count"), ("cpu", "nanoseconds")],
                             period_type=("cpu", "nanoseconds"), period=MS)
    exe = builder.add_mapping(0x400000, 0x500000, 0, "/usr/bin/app")
    kernel = builder.add_mapping(0xffffffff81000000, 0xffffffff82000000, 0, "[kernel]")
    jit = builder.add_mapping(0x7f0000000000, 0x7f0000100000, 0, "[jit]")
    python = builder.add_mapping(0x600000, 0x700000, 0, "/usr/bin/python3")
    locations: Dict[str, int] = {}
    for index, name in enumerate(["main", "compute", "leaf_a", "leaf_b", "recurse"], 1):
        function = builder.function_id(name, name, "app.c")
        locations[name] = builder.location_id(exe, 0x400000 + 0x100 * index, ((function, 10),))
    locations["sys_write"] = builder.location_id(kernel, 0xffffffff81000100, ((builder.function_id("sys_write"), 0),))
    locations["jitted"] = builder.location_id(jit, 0x7f0000000100, ((builder.function_id("jitted"), 0),))
    locations["py_handler"] = builder.location_id(
        python, 0x600100, ((builder.function_id("py_handler", "", "/srv/handler.py"), 12),))
    locations["0x1234"] = builder.location_id(exe, 0x1234, ())
    for stack, count, pid, comm in KNOWN_STACKS:
        leaf_first = tuple(locations[name] for name in reversed(stack))
        labels = (("pid", pid), ("tid", pid), ("comm", comm), ("process", comm))
        builder.add_sample(leaf_first, (count, count * MS), labels)
    return builder.to_profile()


def known_folded_stacks(native: bool = False) -> Dict[Tuple[str, ...], int]:
    """What the folded output of known_profile() must hold (cpu values, suffixes applied);
    by default in the Python-first view, where py_handler's native callee is cut."""
    suffix = {"sys_write": "_[k]", "jitted": "_[j]"}
    out: Dict[Tuple[str, ...], int] = {}
    for stack, count, _, _ in KNOWN_STACKS:
        if not native and stack[0] == "py_handler":
            stack = stack[:1]
        key = tuple(name + suffix.get(name, "") for name in stack)
        out[key] = out.get(key, 0) + count * MS
    return out


def random_profile(distinct_stacks: int, function_count: int = 400, max_depth: int = 24,
                   seed: int = 1) -> Profile:
    """A profile with ``distinct_stacks`` different stacks over a small set of functions."""
    rng = random.Random(seed)
    builder = ProfileBuilder([("samples", "count"), ("cpu", "nanoseconds")])
    exe = builder.add_mapping(0x400000, 0x900000, 0, "/usr/bin/big")
    location_ids = [
        builder.location_id(exe, 0x400000 + 16 * (i + 1), ((builder.function_id("fn_%d" % i), 1),))
        for i in range(function_count)
    ]
    seen = set()
    while len(seen) < distinct_stacks:
        # Skewed choices (small indexes are likelier) give a realistic shape:
        # a few hot paths that draw wide frames, and a long tail of narrow ones.
        depth = rng.randint(2, max_depth)
        stack = tuple(location_ids[(level * 16 + min(int(rng.expovariate(0.6)), 15)) % function_count]
                      for level in range(depth))
        if stack in seen:
            continue
        seen.add(stack)
        count = rng.randint(1, 5)
        builder.add_sample(tuple(reversed(stack)), (count, count * 10000000))
    return builder.to_profile()


def write_profile_file(profile: Profile, path: str, compressed: bool = True) -> str:
    from perfagent.pprof.profile import encode_profile, write_profile

    if compressed:
        write_profile(profile, path)
    else:
        with open(path, "wb") as f:
            f.write(encode_profile(profile))
    return path


def run_report(args: Sequence[str], capsys) -> Tuple[int, str, str]:
    """perfagent.report.command.main(args) -> (exit code, stdout, stderr)."""
    from perfagent.report.command import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ a Python profile

# Python functions: qualname -> (file, first line). Their frames carry the
# sampled line, as the in-kernel walker will write them (Line.line, and
# Function.start_line = co_firstlineno).
PY_FUNCTIONS = {
    "<module>": ("/srv/app.py", 1),
    "handle": ("/srv/app.py", 10),
    "dumps": ("/usr/lib/python3.13/json/__init__.py", 183),
    "JSONEncoder.encode": ("/usr/lib/python3.13/json/encoder.py", 183),
    "render": ("/venv/lib/python3.13/site-packages/jinja2/environment.py", 1280),
}
EVAL = "_PyEval_EvalFrameDefault"
# (root-first stack of "name" or "name@line" for Python frames, count). The
# interpreter's frames sit between Python frames as in a --keep-native-frames
# capture (the eval loop running a function just leafward of its frame, as
# with CPython's perf trampolines); the kernel frame is clear_page_erms, the
# C extension _json's.
PYTHON_STACKS: List[Tuple[Tuple[str, ...], int]] = [
    (("main", "Py_RunMain", "PyEval_EvalCode", "<module>@40", EVAL, "handle@12", EVAL), 7),
    (("main", "Py_RunMain", "PyEval_EvalCode", "<module>@40", EVAL, "handle@14", EVAL, "PyObject_Vectorcall",
      "dumps@231", EVAL, "JSONEncoder.encode@200", EVAL, "encoder_listencode_obj", "clear_page_erms"), 5),
    (("main", "Py_RunMain", "PyEval_EvalCode", "<module>@40", EVAL, "handle@14", EVAL, "render@1295", EVAL), 3),
    (("start_thread", "worker_loop", "memcpy"), 4),  # a native thread: no Python frame
    (("main", "Py_RunMain", "PyEval_EvalCode", "<module>@40"), 1),
]
PYTHON_TOTAL = 20
# The Python-first view of PYTHON_STACKS, worked out by hand: frames rootward
# of <module> stay, the interpreter between Python frames goes, and
# everything under the innermost Python frame is its self time.
PYTHON_FIRST_STACKS = {
    ("main", "Py_RunMain", "PyEval_EvalCode", "<module>", "handle"): 7,
    ("main", "Py_RunMain", "PyEval_EvalCode", "<module>", "handle", "dumps", "JSONEncoder.encode"): 5,
    ("main", "Py_RunMain", "PyEval_EvalCode", "<module>", "handle", "render"): 3,
    ("start_thread", "worker_loop", "memcpy"): 4,
    ("main", "Py_RunMain", "PyEval_EvalCode", "<module>"): 1,
}


def python_profile() -> Profile:
    """PYTHON_STACKS as a profile: [samples/count, cpu/nanoseconds], 1ms per count."""
    builder = ProfileBuilder([("samples", "count"), ("cpu", "nanoseconds")],
                             period_type=("cpu", "nanoseconds"), period=MS)
    exe = builder.add_mapping(0x400000, 0x800000, 0, "/usr/bin/python3.13")
    json_so = builder.add_mapping(0x7f1000000000, 0x7f1000100000, 0,
                                  "/usr/lib/python3.13/lib-dynload/_json.cpython-313-x86_64-linux-gnu.so")
    kernel = builder.add_mapping(0xffffffff81000000, 0xffffffff82000000, 0, "[kernel]")
    native = {"encoder_listencode_obj": json_so, "clear_page_erms": kernel}
    locations: Dict[str, int] = {}
    address = 0x1000
    for stack, _ in PYTHON_STACKS:
        for frame in stack:
            if frame in locations:
                continue
            address += 0x10
            name, _, line = frame.partition("@")
            if line:  # a Python frame: no mapping, the line recorded
                filename, first_line = PY_FUNCTIONS[name]
                function = builder.function_id(name, "", filename, first_line)
                locations[frame] = builder.location_id(0, 0, ((function, int(line)),))
            else:
                mapping = native.get(name, exe)
                base = {exe: 0x400000, json_so: 0x7f1000000000, kernel: 0xffffffff81000000}[mapping]
                locations[frame] = builder.location_id(mapping, base + address, ((builder.function_id(name, name), 0),))
    for stack, count in PYTHON_STACKS:
        builder.add_sample(tuple(locations[frame] for frame in reversed(stack)), (count, count * MS))
    return builder.to_profile()
