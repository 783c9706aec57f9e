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


def known_folded_stacks() -> Dict[Tuple[str, ...], int]:
    """What the folded output of known_profile() must hold (cpu values, suffixes applied)."""
    suffix = {"sys_write": "_[k]", "jitted": "_[j]"}
    out: Dict[Tuple[str, ...], int] = {}
    for stack, count, _, _ in KNOWN_STACKS:
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
