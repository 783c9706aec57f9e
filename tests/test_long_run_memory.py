"""Bounded memory for unbounded runs (issue 14): many short-lived processes,
each mapping a different library, captured with DWARF unwinding.

Asserts on the capture's own bookkeeping counts (processes held, their
mappings and caches, thread names, perf maps, CFI cache bytes), not on
time: after 300 processes came and went, what is held is what the live
ones need plus a compact shell (labels) per process that had samples.
tools/bench_churn.py measures RSS and drain latency over minutes.
"""

from __future__ import annotations

import collections
import os
import select
import subprocess
import time

import pytest

from churn import build, go, spawner
from perfagent.capture import EXIT_COLLECT_DRAINS
from perfagent.oncpu import build_profile
from perfagent.pprof.decode import decode_profile
from perfagent.session import Capture, CaptureOptions, DRAIN_INTERVAL

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")

PROCESSES = 300
LIBRARIES = 40
CFI_BOUND = 256 << 10  # small, so that the LRU must evict during the run


@pytest.fixture(scope="module")
def churn_programs(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("churn")), LIBRARIES)


def drain_until_done(session, spawn, timeout: float = 120) -> None:
    """Drive the capture's drain loop until the spawner says it is done."""
    done = False
    deadline = time.monotonic() + timeout
    while not done and time.monotonic() < deadline:
        session.poll(DRAIN_INTERVAL)
        if select.select([spawn.stdout], [], [], 0)[0]:
            done = spawn.stdout.readline().startswith("done")
    assert done


@pytest.mark.parametrize("unwind", ["dwarf", "fp"])
def test_three_hundred_processes_come_and_go(churn_programs, unwind, monkeypatch):
    """dwarf: stacks unwound by the agent (CFI cache bounded, and swept of
    what only exited processes mapped); fp: counted in the kernel, so
    exited processes wait until the counts are collected."""
    import perfagent.capture
    monkeypatch.setattr(perfagent.capture, "CFI_SWEEP_DRAINS", 10)
    child, libs = churn_programs
    spawn = spawner(child, libs, every=0.02, ms=15, count=PROCESSES, wait=True)
    session = Capture(CaptureOptions(pid=spawn.pid, unwind=unwind, sample_rate=999), lambda line: None)
    try:
        session.start()
        go(spawn)  # the capture is running: no child is missed while it starts
        state = session.state
        if unwind == "dwarf":
            state.walker.cache.max_bytes = CFI_BOUND
        drain_until_done(session, spawn)
        # Exits of the last children are released a drain later -- and, where
        # stacks are counted in the kernel, once their counts are collected
        # (at the latest EXIT_COLLECT_DRAINS drains after the exit).
        for _ in range(EXIT_COLLECT_DRAINS + 3):
            session.poll(DRAIN_INTERVAL)
        held = state.bookkeeping()
        loaders = [src.loader for src in session.sources if getattr(src, "loader", None) is not None]
        biggest = max_binary_cfi_bytes(state.walker.cache) if unwind == "dwarf" else 0
        children = len(state.pids_seen) - 1
    finally:
        spawn.stdin.close()
        spawn.wait()
        session.stop()
    assert children >= 0.5 * PROCESSES, (children, held)  # sampled at all (a loaded machine samples fewer)
    assert held["released_processes"] >= children - 3, held  # every sampled child (but the last few)
    # Live: the spawner (and at most a child or two not yet released).
    assert held["processes_with_mappings"] <= 3, held
    assert held["unwind_closures"] <= 3 and held["perf_maps"] <= 3, held
    # Exited processes without samples are gone; those with samples keep a shell.
    assert held["processes"] <= len(state.pids_seen) + 3, held
    assert held["mapping_entries"] <= 60, held  # the spawner's executable mappings
    assert held["unwind_cache_entries"] + held["frame_cache_entries"] <= 2000, held
    assert held["thread_names"] <= len(state.sampled_tids) + 5, held
    assert held["forked_tids"] <= 3, held
    for loader in loaders:   # the kernel walk's: exited processes are not waiting to be loaded
        assert len(loader.waiting) + len(loader.since) + len(loader._asked) <= 9, (
            loader.waiting, loader.since, loader._asked)
    # One mapping record per file segment, not per (process, library): the
    # children's executable, libc, ld.so, the 40 libraries, the vDSO, and
    # the spawner's own.
    assert held["mappings"] <= 4 * LIBRARIES + 60, held
    if unwind == "dwarf":
        cache = state.walker.cache
        assert cache.evicted >= LIBRARIES, (cache.evicted, held)
        # The bound holds, but for the binary just loaded (never evicted itself).
        assert held["cfi_bytes"] <= CFI_BOUND + biggest, held
        # The spawner's binaries and the last children's (swept: not every
        # library that fits under the byte bound).
        assert held["cfi_binaries"] <= 30, held
    # The profile keeps every sampled process's labels (its shell): one
    # pid label per child with samples, with the child's comm.
    builder, _table = build_profile(state, session.symbolizer, 999, 0, 1)
    prof = decode_profile(builder.encode())
    pids, comms = set(), set()
    for s in prof.samples:
        labels = {label.key: (label.str or label.num) for label in s.labels}
        pids.add(labels["pid"])
        comms.add(labels["process"])
    assert len(pids) == len(state.pids_seen), (len(pids), len(state.pids_seen))
    assert "churn_child" in comms, comms


def profile_content(state, symbolizer) -> collections.Counter:
    """The on-CPU profile as pprof content, independent of ids and order:
    each sample's stack (mapping file, address, function names and lines
    per location), its labels and its values."""
    builder, _table = build_profile(state, symbolizer, 999, 0, 1)
    prof = decode_profile(builder.encode())
    mappings = {m.id: m.filename for m in prof.mappings}
    functions = {f.id: (f.name, f.filename) for f in prof.functions}
    locations = {loc.id: (mappings.get(loc.mapping_id, ""), loc.address,
                          tuple((functions[ln.function_id], ln.line) for ln in loc.lines))
                 for loc in prof.locations}
    content = collections.Counter()
    for s in prof.samples:
        labels = tuple(sorted((label.key, label.str, label.num) for label in s.labels))
        content[(tuple(locations[i] for i in s.location_ids), labels, tuple(s.values))] += 1
    return content


# Bytes the capture holds per released process with samples, packed (its
# shell and some 6 rows of 32 bytes: about 0.35 KB); a dict entry per
# counted stack with its key and count list, and the ProcessInfo shell,
# were some 1.5 KB.
PACKED_BYTES_PER_PROCESS = 600


def test_released_processes_are_packed_and_profile_the_same(churn_programs, monkeypatch):
    """What a released process leaves (its counted stacks and labels) moves
    into the packed store; the profile written is the same before and after
    (samples, counts, labels, frames), and the bytes held per released
    process stay under a bound.  Packing is held back during the run, so
    the same capture gives the profile before and after it."""
    import perfagent.capture
    monkeypatch.setattr(perfagent.capture, "COMPACT_DRAINS", 1 << 30)
    child, libs = churn_programs
    spawn = spawner(child, libs, every=0.02, ms=15, count=PACKED_CHILDREN, wait=True)
    session = Capture(CaptureOptions(pid=spawn.pid, unwind="dwarf", sample_rate=999), lambda line: None)
    try:
        session.start()
        state = session.state
        state._next_compact = 1 << 30
        go(spawn)
        drain_until_done(session, spawn)
        for _ in range(3):
            session.poll(DRAIN_INTERVAL)
        released = [pid for pid, p in state.processes.items() if p.released]
        before = profile_content(state, session.symbolizer)
        held_before = state.bookkeeping()
        state._compact_released()
        after = profile_content(state, session.symbolizer)
        held = state.bookkeeping()
    finally:
        spawn.stdin.close()
        spawn.wait()
        session.stop()
    assert len(released) >= 0.5 * PACKED_CHILDREN, (len(released), held)
    assert held_before["process_shells"] == 0 and held_before["released_counts"] == 0, held_before
    assert after == before
    # Every released process left: its shell, not its ProcessInfo; its
    # counts are rows, none is still a live count.
    assert held["process_shells"] == len(released), held
    assert not any(state.processes.get(pid) for pid in released)
    assert not any(key[0] in set(released) for key in state.stacks)
    moved = held_before["live_counts"] - held["live_counts"]
    assert held["released_counts"] == moved and moved >= len(released), (held_before, held)
    assert held["distinct_stacks"] == held_before["distinct_stacks"], held
    # The threads' names are in the rows: only live threads' are kept.
    assert held["thread_names"] <= 3, held
    assert held["released_bytes"] <= PACKED_BYTES_PER_PROCESS * len(released), held


PACKED_CHILDREN = 100


def max_binary_cfi_bytes(cache) -> int:
    return max((cfi.table.nbytes() for cfi in cache._by_inode.values() if cfi.table is not None), default=0)


IDLE = 4


def test_kernel_tables_evicted_as_processes_come_and_go(churn_programs, monkeypatch):
    """The in-kernel walk's tables (perfagent.unwind.kernel.KernelTables):
    processes each mapping a different library are loaded and exit, twice
    over the 40 libraries; the binaries no loaded process maps are evicted
    beyond the idle bound and their table ids and rows reused, so what is
    held (binaries, rows, table ids, and the highest id and row ever
    used) stays what one process and the idle ones need -- 80 distinct
    loads would have taken 80 tables without eviction."""
    from perfagent.capture import CaptureState
    from perfagent.elf import ELFFile
    from perfagent.unwind import kernel as KT
    from perfagent.unwind.walker import Walker
    why = KT.kernel_walk_supported()
    if why is not None:
        pytest.skip(why)
    monkeypatch.setattr(KT, "REUSE_AFTER", 0.0)  # reuse at the next refresh: counts, not time
    child, libs = churn_programs
    state = CaptureState(walker=Walker("dwarf"))
    tables = KT.KernelTables(state.walker.cache, auto=False, max_procs=8)
    tables.idle_binaries = IDLE
    highest_row = 0
    try:
        for lib in libs * 2:
            p = subprocess.Popen([child, lib, "5000"])
            try:
                proc = wait_mapped(state, p.pid, lib)
                decode_text(state, proc, lib, ELFFile)
                tables.refresh(state, [p.pid])
                assert tables.loaded(p.pid), tables.counts()
                highest_row = max(highest_row, max(b.first + b.count for b in tables._binaries.values()))
            finally:
                p.kill()
                p.wait()
            tables.forget(p.pid)
            held = tables.counts()
            # The child's executable, libc, ld.so, the vDSO and its library
            # (all idle now), at most IDLE of them kept after the next refresh.
            assert held["binaries"] <= IDLE + 6, held
            assert held["refused"] == 0 and held["no_room"] == 0, held
            assert held["rows"] == sum(b.count for b in tables._binaries.values()), held
        tables.refresh(state, [])
        held = tables.counts()
    finally:
        tables.acquire().release()
    assert held["binaries"] <= IDLE and held["processes"] == 0, held
    assert held["evicted"] >= 2 * len(libs) - IDLE, held
    assert tables._next_table <= IDLE + 10, (tables._next_table, held)   # ids reused
    assert highest_row * 4 <= tables.rows_written, (highest_row, tables.rows_written)   # rows reused


def wait_mapped(state, pid: int, lib: str):
    """The process's state once its maps show ``lib`` (dlopen done)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open("/proc/%d/maps" % pid) as f:
            if lib in f.read():
                return state.load_from_proc(pid)
        time.sleep(0.005)
    raise AssertionError("%s never mapped %s" % (pid, lib))


def decode_text(state, proc, lib: str, ELFFile) -> None:
    """Have the walker decode the library's FDEs (as fallback samples
    would), so its kernel table has rows."""
    from perfagent.capture import mapped_file
    entry = next(e for e in proc.space.entries() if e.path == lib)
    cfi = state.walker.cache.get(mapped_file(proc.pid, entry))
    with ELFFile.from_path(lib) as elf:
        text = elf.section(".text")
        for pc in range(text.sh_addr, text.sh_addr + text.sh_size, 4):
            cfi.table.lookup(pc)


def test_stored_stacks_are_dropped_as_counts_are_collected():
    """The in-kernel counts' stack cache (perfagent.stackprog.store) keeps
    two collections' stacks, not every stack ever drained."""
    from perfagent.stackprog.layout import PERF_MAX_STACK_DEPTH, STACK, STACK_SIZE
    from perfagent.stackprog.store import HASH_KEY, StoreCache
    cache = StoreCache()

    def stack(h):
        raw = STACK.pack(2, 0, h, h + 1, *([0] * (PERF_MAX_STACK_DEPTH - 2)))
        cache.add_native(HASH_KEY.pack(h), raw[:STACK_SIZE])

    for h in range(1, 101):
        stack(h)
    assert cache.native(7) == (7, 8)
    cache.rotate()                       # collection N read its counts
    stack(1000)
    assert cache.native(7) == (7, 8) and cache.native(1000) == (1000, 1001)   # N+1 may still ask
    cache.rotate()
    assert cache.native(7) is None and cache.lost == 1   # drained before N-1: never asked again
    assert cache.native(1000) == (1000, 1001) and len(cache) == 1
    # A stack drained again is taken as decoded the time before (same hash,
    # same contents): the very tuple, not a new one.
    first = cache.native(1000)
    stack(1000)
    assert cache.native(1000) is first
