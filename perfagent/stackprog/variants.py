"""Every form of the in-kernel walking program (KUNWIND), built standalone.

The agent builds its programs inside its sources, with maps sized for the
run; checking that the verifier accepts each form the agent can load
(tests/test_kunwind.py) and measuring what verifying each costs
(tools/bench_verifier.py) need the same programs built the same way on
small maps.  One builder for both, so the test checks what is measured.
"""

from __future__ import annotations

from typing import List

from perfagent.records import NamedTuple

#: (which, python, auto): on-CPU or off-CPU, with the Python walk or not,
#: --unwind dwarf or auto.
VARIANTS = [(which, python, auto) for which in ("oncpu", "offcpu")
            for python in (False, True) for auto in (False, True)]


class Variant(NamedTuple):
    name: str          # e.g. "oncpu-python-dwarf"
    prog: object       # the perfagent.bpf.asm.Program
    prog_type: int
    load_kw: dict      # keyword arguments of Program.load
    objs: List[object]  # the maps it references, to close afterwards


def variant_name(which: str, python: bool, auto: bool) -> str:
    return "%s-%s-%s" % (which, "python" if python else "native", "auto" if auto else "dwarf")


def build_variant(which: str, python: bool, auto: bool) -> Variant:
    """The walking program as the agent builds it for ``which`` (on small
    maps); the caller loads it (``prog.load(prog_type, **load_kw)``) and
    closes ``objs`` (perfagent.offcpu.common.close_all)."""
    from perfagent.bpf import syscall as sc
    from perfagent.bpf.maps import ArrayMap, HashMap, RingBuf, possible_cpus
    from perfagent.offcpu.collector import _sched_switch_args, copy_spec
    from perfagent.offcpu.common import close_all
    from perfagent.offcpu.inkernel import sample_period_offset
    from perfagent.stackprog import kunwind as KU, layout as L, store as S
    from perfagent.stackprog import python as pywalk
    from perfagent.stackprog.accounting import Stats
    from perfagent.stackprog.program import (
        BLOCKED, COUNT_KEY, KEY_TGID, KUNWIND, SUMS, TID_KEY, Maps, build_offcpu, build_oncpu,
    )
    copy = copy_spec(32768)
    ku = KU.make_maps(auto)
    stats = Stats()
    objs: List[object] = [ku.procs, ku.mappings, ku.tables, ku.rows, stats]
    try:
        scratch = ArrayMap(L.scratch_size(32768, copy.pages), possible_cpus(), name="t_scratch")
        counts = HashMap(COUNT_KEY.size, SUMS.size, 1024, name="t_counts")
        native, ring = S.native_store(1024), RingBuf(1 << 20, name="t_ring")
        objs += [scratch, counts, native, ring]
        walk = None
        python_store = None
        if python:
            py = pywalk.make_maps(pywalk.fsbase_offset())
            objs += [py.procs, py.threads]
            walk = pywalk.emit_python_walk(py, KEY_TGID)
            python_store = S.python_store(1024)
            objs.append(python_store)
        maps = Maps(scratch, stats, None, counts, native, python_store, ring, None, ku)
        name = variant_name(which, python, auto)
        if which == "oncpu":
            prog = build_oncpu(KUNWIND, maps, sample_period_offset(), copy, python_walk=walk)
            return Variant(name, prog, sc.BPF_PROG_TYPE_PERF_EVENT, {}, objs)
        args = _sched_switch_args()
        blocked = HashMap(TID_KEY.size, BLOCKED.size, 1024, name="t_blocked")
        objs.append(blocked)
        prog = build_offcpu(KUNWIND, maps, blocked, args, copy, python_walk=walk)
        return Variant(name, prog, sc.BPF_PROG_TYPE_TRACING,
                       dict(expected_attach_type=sc.BPF_TRACE_RAW_TP, attach_btf_id=args.attach_btf_id),
                       objs)
    except BaseException:
        close_all(objs)
        raise
