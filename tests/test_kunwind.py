"""In-kernel DWARF unwinding: the compact tables, the BPF walk, and its
agreement with the user-space walker (the reference)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import NOFP

from perfagent.dwarf.rules import (
    CFA_DEREF, CFA_PLT, CFA_REG_OFFSET, CFA_UNSUPPORTED, RULE_EXPRESSION, RULE_OFFSET, RULE_REGISTER,
    RULE_SAME_VALUE, RULE_UNDEFINED,
)
from perfagent.dwarf.table import CFITable
from perfagent.elf import ELFFile
from perfagent.unwind import compact as K

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


def row(cfa=(CFA_REG_OFFSET, 7, 16, 0), signal=0, ra=(RULE_OFFSET, -8, 0), rbp=(RULE_SAME_VALUE, 0, 0)):
    rest = (RULE_SAME_VALUE, 0, 0) * 5
    return tuple(cfa) + (signal,) + tuple(ra) + tuple(rbp) + rest


# -- the table compiler -----------------------------------------------------------

def test_rows_the_kernel_can_follow():
    assert K.compact_fields(row()) == (K.UW_CFA_RSP, K.UW_RBP_SAME, 0, 0, 16, -8, 0)
    assert K.compact_fields(row(cfa=(CFA_REG_OFFSET, 6, 16, 0), rbp=(RULE_OFFSET, -16, 0))) == \
        (K.UW_CFA_RBP, K.UW_RBP_OFFSET, 0, 0, 16, -8, -16)
    assert K.compact_fields(row(cfa=(CFA_PLT, 7, 8, 11))) == (K.UW_CFA_PLT, K.UW_RBP_SAME, 0, 11, 8, -8, 0)
    # glibc's __restore_rt: CFA = *(rsp + 160), rip and rbp saved in the ucontext
    sig = row(cfa=(CFA_DEREF, 7, 160, 0), signal=1, ra=(RULE_EXPRESSION, 168, 7),
              rbp=(RULE_EXPRESSION, 120, 7))
    assert K.compact_fields(sig) == (K.UW_CFA_DEREF_RSP, K.UW_RBP_EXPR_RSP,
                                     K.UW_ROW_SIGNAL | K.UW_ROW_RA_RSP, 0, 160, 168, 120)
    # _start: the return address is undefined
    assert K.compact_fields(row(ra=(RULE_UNDEFINED, 0, 0)))[0] == K.UW_CFA_END


def test_rows_the_kernel_refuses_or_leaves_to_the_frame_pointer():
    # What the walker has no row for (an unsupported CFA expression): "no CFI here".
    assert K.compact_fields(row(cfa=(CFA_UNSUPPORTED, 7, 8, 0))) == K.NONE_ROW
    refused = [
        row(cfa=(CFA_REG_OFFSET, 10, 8, 0)),                  # CFA on r10 (stack realignment)
        row(cfa=(CFA_DEREF, 3, 8, 0)),                        # *(rbx + 8)
        row(ra=(RULE_REGISTER, 0, 0)),                        # return address in a register
        row(ra=(RULE_EXPRESSION, 8, 3)),                      # ... saved relative to rbx
        row(rbp=(RULE_REGISTER, 12, 0)),                      # rbp kept in r12
        row(cfa=(CFA_REG_OFFSET, 7, 1 << 40, 0)),             # offsets beyond the fields
        row(rbp=(RULE_OFFSET, -(1 << 20), 0)),
    ]
    for r in refused:
        assert K.compact_fields(r) == K.FALLBACK_ROW, r


def test_gaps_merges_and_the_end_are_explicit():
    a = row()
    b = row(cfa=(CFA_REG_OFFSET, 7, 24, 0))
    c = b[:11] + (RULE_OFFSET, -24, 0) + (RULE_SAME_VALUE, 0, 0) * 4  # b, and rbx saved
    table = CFITable.from_spans([(0x1000, 0x1004, a), (0x1004, 0x1010, b), (0x1010, 0x1020, c),
                                 (0x1040, 0x1050, a)])
    t = K.compile_rows(table)
    assert t.base == 0x1000
    got = [(r.pc, r.cfa_kind, r.cfa_off) for r in t.rows]
    # b and c differ only in rbx: one compact row; the gap and the end are NONE rows.
    assert got == [(0, K.UW_CFA_RSP, 16), (4, K.UW_CFA_RSP, 24), (0x20, K.UW_CFA_NONE, 0),
                   (0x40, K.UW_CFA_RSP, 16), (0x50, K.UW_CFA_NONE, 0)]
    assert t.lookup(0x1030).cfa_kind == K.UW_CFA_NONE and t.lookup(0x100).cfa_kind == K.UW_CFA_NONE
    assert len(t.pack()) == 16 * len(t.rows)
    with pytest.raises(K.TableRefused):
        K.compile_rows(table, max_rows=3)
    with pytest.raises(K.TableRefused):
        K.compile_rows(CFITable.from_spans([(0x1000, 0x1004, a), (0x1000 + (1 << 33), 0x1001 + (1 << 33), a)]))


_FDE = re.compile(r"^[0-9a-f]+ [0-9a-f]+ [0-9a-f]+ FDE cie=[0-9a-f]+ pc=([0-9a-f]+)\.\.([0-9a-f]+)")


def readelf_rows(path):
    """(loc, cfa text, {column: rule text}) of every row readelf interprets."""
    out = subprocess.run(["readelf", "--debug-dump=frames-interp", path], stdout=subprocess.PIPE,
                         text=True).stdout  # exit status 1 on notes it cannot decode
    rows, columns, in_fde = [], None, False
    for line in out.splitlines():
        if " CIE " in line or _FDE.match(line):
            columns, in_fde = None, " FDE " in line
            continue
        parts = line.split()
        if parts[:2] == ["LOC", "CFA"] and in_fde:
            columns = parts[2:]
            continue
        if columns and len(parts) == len(columns) + 2 and re.fullmatch(r"[0-9a-f]{16}", parts[0]):
            rows.append((int(parts[0], 16), parts[1], dict(zip(columns, parts[2:]))))
        elif not parts:
            columns = None
    return rows


@pytest.mark.parametrize("path", [LIBC, "/usr/bin/python3.11"])
def test_compiler_matches_readelf_frames_interp(path):
    if not os.path.exists(path):
        pytest.skip("no " + path)
    with ELFFile.from_path(path) as elf:
        table = CFITable.from_elf(elf)
        t = K.compile_rows(table)
    rows = readelf_rows(path)
    assert len(rows) > 1000
    checked = 0
    for loc, cfa, regs in rows:
        r = t.lookup(loc)
        m = re.fullmatch(r"(rsp|rbp)\+(\d+)", cfa)
        if re.fullmatch(r"r(ax|bx|cx|dx|si|di|[0-9]+)[+-]\d+", cfa):   # CFA on another register
            assert r.cfa_kind == K.UW_CFA_FALLBACK, (hex(loc), cfa, r)
            continue
        if m is None:
            assert cfa == "exp" and r.cfa_kind in (K.UW_CFA_PLT, K.UW_CFA_DEREF_RSP, K.UW_CFA_NONE,
                                                   K.UW_CFA_FALLBACK), (hex(loc), cfa, r)
            continue
        ra = regs.get("ra")
        if ra == "u":
            assert r.cfa_kind in (K.UW_CFA_END, K.UW_CFA_FALLBACK), (hex(loc), r)
            continue
        want_kind = K.UW_CFA_RSP if m.group(1) == "rsp" else K.UW_CFA_RBP
        assert (r.cfa_kind, r.cfa_off) == (want_kind, int(m.group(2))), (hex(loc), cfa, r)
        assert ra == "c%+d" % r.ra_off, (hex(loc), regs, r)
        rbp = regs.get("rbp", "u")
        if rbp == "u":
            assert r.rbp_kind == K.UW_RBP_SAME, (hex(loc), regs, r)
        elif rbp.startswith("c"):
            assert (r.rbp_kind, "c%+d" % r.rbp_off) == (K.UW_RBP_OFFSET, rbp), (hex(loc), regs, r)
        checked += 1
    assert checked > 0.9 * len(rows), (checked, len(rows))
    assert t.fallback_rows < 0.01 * len(t.rows), (t.fallback_rows, len(t.rows))


# -- the BPF programs -----------------------------------------------------------------

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, perf events)")


@root
@pytest.mark.parametrize("auto", [False, True], ids=["dwarf", "auto"])
@pytest.mark.parametrize("python", [False, True], ids=["native", "python"])
@pytest.mark.parametrize("which", ["oncpu", "offcpu"])
def test_verifier_accepts_every_variant(which, python, auto):
    """The walking program in each form the agent loads: on-CPU and off-CPU,
    with and without the Python walk, --unwind dwarf and auto."""
    from perfagent.offcpu.common import close_all
    from perfagent.stackprog.variants import build_variant
    from perfagent.unwind.kernel import kernel_walk_supported
    why = kernel_walk_supported()
    if why is not None:
        pytest.skip(why)
    v = build_variant(which, python, auto)
    try:
        loaded = v.prog.load(v.prog_type, **v.load_kw)
        v.objs.append(loaded)
        assert loaded.fd >= 0
    finally:
        close_all(v.objs)


# -- agreement with the user-space walker ----------------------------------------------

KERNEL_LINE = re.compile(r"unwound (\d+) user stacks in the kernel: (\d+) complete, (\d+) truncated, "
                         r"(\d+) stopped; (\d+) fell back to user space")


def chains(path):
    """Samples per user chain (user frames by their mapping, not by name)."""
    from collections import Counter
    from conftest import user_stacks
    from perfagent.pprof.decode import read_profile
    c = Counter()
    for names, _labels, values in user_stacks(read_profile(str(path))):
        c[tuple(names)] += values[0]
    return c


def profile_pid(pid, where, tmp_path, unwind="dwarf", duration="3s", extra=()):
    from conftest import run_agent
    out = tmp_path / ("%s-%s.pb.gz" % (where, unwind))
    r = run_agent(["--profile", "--pid", str(pid), "--duration", duration, "--unwind", unwind,
                   "--unwind-in", where, "--profile-output", str(out), *extra], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    return chains(out), r.stderr


def agree(kernel, user, share=0.95):
    """Each mode's samples fall on chains the other mode also found."""
    for a, b in ((kernel, user), (user, kernel)):
        total = sum(a.values())
        assert total >= 50, a
        same = sum(n for chain, n in a.items() if chain in b)
        assert same >= share * total, (same, total, a.most_common(4), b.most_common(4))


def walked_in_kernel(stderr):
    m = KERNEL_LINE.search(stderr)
    assert m, stderr
    return [int(x) for x in m.groups()]


@root
@pytest.mark.parametrize("mode", ["chain", "qsort"])
@pytest.mark.parametrize("unwind", ["dwarf", "auto"])
def test_kernel_and_user_walks_agree_on_fp_less_chains(unwind_bin, tmp_path, mode, unwind):
    """alloca (CFA on rbp), a PLT call into a library and back, qsort's
    callback out of libc: the same chains from both walkers, and most
    stacks walked in the kernel once the tables are loaded."""
    proc = subprocess.Popen([unwind_bin, mode, "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        kernel, err = profile_pid(proc.pid, "kernel", tmp_path, unwind)
        user, _ = profile_pid(proc.pid, "user", tmp_path, unwind)
    finally:
        proc.kill()
        proc.wait()
    agree(kernel, user)
    walked, complete, truncated, stopped, fell_back = walked_in_kernel(err)
    assert walked >= 0.5 * (walked + fell_back), err
    assert complete >= 0.98 * walked, err
    top = kernel.most_common(1)[0][0]
    assert top[-1] == "leaf" and ("c" in top or "compare" in top), top


@root
def test_kernel_and_user_walks_agree_through_a_signal_frame(programs_dir, tmp_path):
    """glibc's __restore_rt (a CFA read from the ucontext, rip and rbp saved
    there) and on into the interrupted function at its exact pc."""
    from conftest import PROGRAMS, run_agent
    exe = os.path.join(programs_dir, "sigframe")
    if not os.path.exists(exe):
        subprocess.run(["gcc", *NOFP, "-o", exe, os.path.join(PROGRAMS, "sigframe.c")], check=True)
    got = {}
    for where in ("kernel", "user"):
        out = tmp_path / ("sig-%s.pb.gz" % where)
        r = run_agent(["--profile", "--unwind", "dwarf", "--unwind-in", where, "--sample-rate", "299",
                       "--profile-output", str(out), "--", exe], cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        got[where] = (chains(out), r.stderr)
    kernel = {c: n for c, n in got["kernel"][0].items() if "on_alarm" in c}
    user = {c: n for c, n in got["user"][0].items() if "on_alarm" in c}
    from collections import Counter
    agree(Counter(kernel), Counter(user))
    through = sum(n for c, n in kernel.items() if "__restore_rt" in c and "interrupted" in c and "main" in c)
    assert through >= 0.95 * sum(kernel.values()), kernel
    walked, *_rest, fell_back = walked_in_kernel(got["kernel"][1])
    assert walked > 0, got["kernel"][1]


@root
def test_kernel_and_user_walks_agree_on_cpython(tmp_path):
    python = "/usr/bin/python3.11"
    if not os.path.exists(python):
        pytest.skip("no /usr/bin/python3.11")
    loop = "def f(n):\n    return sum(i * i for i in range(n))\nwhile True:\n    f(10000)\n"
    proc = subprocess.Popen([python, "-c", "print('ready', flush=True)\n" + loop], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        extra = ("--no-python-walk",)   # native frames only: the interpreter's own chain
        kernel, err = profile_pid(proc.pid, "kernel", tmp_path, extra=extra)
        user, _ = profile_pid(proc.pid, "user", tmp_path, extra=extra)
    finally:
        proc.kill()
        proc.wait()
    assert sum(n for c, n in kernel.items() if "Py_RunMain" in c) >= 0.9 * sum(kernel.values())
    # The interpreter's leaves are many and each is sampled a few times:
    # compare the chains from the root to the innermost eval loop, and
    # the leaf functions as a set.
    agree(_to_eval(kernel), _to_eval(user), 0.95)
    leaves_k = {c[-1] for c in kernel}
    leaves_u = {c[-1] for c in user}
    assert len(leaves_k & leaves_u) >= 0.5 * min(len(leaves_k), len(leaves_u)), (leaves_k, leaves_u)


@root
def test_kernel_and_user_walks_agree_through_libllvm(programs_dir, tmp_path):
    """A program spending its time in Debian's libLLVM-14 (110 MB, no frame
    pointers, ~100k FDEs, read lazily): the kernel learns the FDEs the
    user-space walker decoded, and both give the same chains from _start
    through main and round_trip into libLLVM, frame for frame (cut a few
    frames into libLLVM: its leaves are many, each sampled a few times)."""
    from collections import Counter
    from giant import build_llvmcall
    exe = build_llvmcall(str(programs_dir))
    if exe is None:
        pytest.skip("no libLLVM-14 with its headers")
    proc = subprocess.Popen([exe], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        extra = ("--sample-rate", "499")
        kernel, err = profile_pid(proc.pid, "kernel", tmp_path, duration="4s", extra=extra)
        user, _ = profile_pid(proc.pid, "user", tmp_path, duration="4s", extra=extra)
    finally:
        proc.kill()
        proc.wait()

    def cut(counter, depth=4):
        out = Counter()
        for chain, n in counter.items():
            at = chain.index("main") if "main" in chain else len(chain)
            out[chain[:at + 1 + depth]] += n
        return out

    for c in (kernel, user):
        total = sum(c.values())
        through = sum(n for chain, n in c.items() if chain[:1] == ("_start",) and "main" in chain
                      and any(f.startswith("LLVM") for f in chain))
        assert through >= 0.9 * total, c.most_common(3)
    agree(cut(kernel), cut(user), 0.9)
    walked, complete, truncated, stopped, fell_back = walked_in_kernel(err)
    assert walked >= 0.5 * (walked + fell_back), err
    assert complete >= 0.95 * walked, err


def _to_eval(counter):
    from collections import Counter
    out = Counter()
    for chain, n in counter.items():
        cut = max((i for i, f in enumerate(chain) if f == "_PyEval_EvalFrameDefault"), default=len(chain) - 1)
        out[chain[:cut + 1]] += n
    return out


@root
def test_refused_table_falls_back_to_the_user_space_walker(unwind_bin, tmp_path):
    """Tables that do not fit are refused: the processes' stacks fall back
    to the user-space walker and still come out whole."""
    from conftest import agent_env
    proc = subprocess.Popen([unwind_bin, "chain", "60"], stdout=subprocess.PIPE, text=True)
    out = tmp_path / "refused.pb.gz"
    code = ("import sys; import perfagent.stackprog.kunwind as K; K.MAX_ROWS = 2; "
            "from perfagent.cli import main; sys.exit(main(sys.argv[1:]))")
    try:
        assert proc.stdout.readline().startswith("ready")
        r = subprocess.run([sys.executable, "-c", code, "--profile", "--pid", str(proc.pid), "--duration", "2s",
                            "--unwind", "dwarf", "--unwind-in", "kernel", "--profile-output", str(out)],
                           cwd=str(tmp_path), env=agent_env(), stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert r.returncode == 0, r.stderr
    assert re.search(r"\d+ refused \(.*(libc\.so\.6|unwind): .*rows", r.stderr), r.stderr
    walked, *_rest, fell_back = walked_in_kernel(r.stderr)
    assert fell_back >= 0.9 * (walked + fell_back), r.stderr
    got = chains(out)
    whole = sum(n for c, n in got.items() if c[-6:] == ("main", "a", "b", "c", "d", "leaf"))
    assert whole >= 0.95 * sum(got.values()), got.most_common(3)


def test_partial_tables_leave_undecoded_code_to_user_space():
    """A table built from the FDEs decoded so far: they are rows, what lies
    around them falls back (the user-space walker decodes it, the next
    rebuild has it)."""
    a = row()
    b = row(cfa=(CFA_REG_OFFSET, 6, 16, 0), rbp=(RULE_OFFSET, -16, 0))
    t = K.compile_spans([(0x2000, 0x2010, b), (0x1000, 0x1004, a), (0x1004, 0x1010, a)])
    got = [(r.pc, r.cfa_kind) for r in t.rows]
    assert got == [(0, K.UW_CFA_FALLBACK), (0x1000, K.UW_CFA_RSP), (0x1010, K.UW_CFA_FALLBACK),
                   (0x2000, K.UW_CFA_RBP), (0x2010, K.UW_CFA_FALLBACK)]
    assert t.base == 0 and t.lookup(0x2008).rbp_kind == K.UW_RBP_OFFSET
    assert K.compile_spans([]).rows == [K.CompactRow(0, *K.FALLBACK_ROW)]
    with pytest.raises(K.TableRefused):
        K.compile_spans([(1 << 32, (1 << 32) + 4, a)])


# -- the merge of kernel-placed Python links -------------------------------------------

def test_merge_by_index_matches_merge_by_link():
    """A Python stack whose links the kernel replaced by native frame
    indexes is placed as the user-space walker places it by stack pointer;
    a stack mixing both (a walk left to user space part way) too, and a
    link the kernel left below every frame goes to the root end."""
    from perfagent.python.merge import place_runs, split_runs
    from perfagent.stackprog.layout import PYFRAME_LINK, PYFRAME_LINK_INDEX
    ips = (0x100, 0x200, 0x300, 0x400, 0x500)
    sps = (0x1000, 0x1040, 0x1080, 0x10c0, 0x1100)
    a, b, c = (0xa, 0, 11), (0xb, 0, 21), (0xc, 0, 31)

    def link(addr):
        return (addr, 0, PYFRAME_LINK)

    def index(i):
        return (i, 0, PYFRAME_LINK | PYFRAME_LINK_INDEX)

    never = lambda pc: False   # noqa: E731
    by_link = place_runs(ips, split_runs([a, link(0x1048), b, link(0x10c8), c]), never, sps)
    assert [i for i, _ in by_link] == [1, 3, 5]
    by_index = place_runs(ips, split_runs([a, index(1), b, index(3), c]), never)
    assert by_index == by_link
    mixed = place_runs(ips, split_runs([a, index(1), b, link(0x10c8), c]), never, sps)
    assert mixed == by_link
    below = place_runs(ips, split_runs([a, link(0x800), b, index(3), c]), never)
    assert [i for i, _ in below] == [5, 5, 5]


SELF_LINE = re.compile(r"; (\d+) of the agent itself \(not walked\)")


@root
@pytest.mark.parametrize("where", ["kernel", "user"])
def test_the_agent_does_not_walk_itself(unwind_bin, tmp_path, where):
    """Under -a the agent samples itself too: those samples keep their
    kernel stack and the sampled pc only (walking them would cost the agent
    more than they tell, and its next samples would see that cost again);
    every other process is walked as usual (a busy FP-less chain of the
    test's own, so the check does not depend on what else the machine runs)."""
    from conftest import agent_env, user_stacks
    from perfagent.pprof.decode import read_profile
    out = tmp_path / "all.pb.gz"
    busy = subprocess.Popen([unwind_bin, "chain", "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().startswith("ready")
        agent = subprocess.Popen([sys.executable, "-m", "perfagent", "--profile", "-a", "--unwind", "dwarf",
                                  "--unwind-in", where, "--sample-rate", "999", "--duration", "2s",
                                  "--profile-output", str(out)], cwd=str(tmp_path), env=agent_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = agent.communicate(timeout=120)
    finally:
        busy.kill()
        busy.wait()
    assert agent.returncode == 0, err
    own, chain = [], []
    # User frames by the Locations' mappings: a sample taken at syscall
    # entry has a kernel part that does not start at entry_SYSCALL.
    for names, labels, values in user_stacks(read_profile(str(out))):
        if labels.get("pid") == agent.pid:
            own.append((names, values[0]))
        elif labels.get("pid") == busy.pid:
            chain.append((names, values[0]))
    # Its own CPU in 2 s at 999 Hz: start-up and drains, 19-1000 samples
    # seen (fewer as its start-up got cheaper).
    assert sum(n for _, n in own) >= 5, err
    assert all(len(names) <= 1 for names, _ in own), [c for c, _ in own if len(c) > 1][:3]
    # The busy chain is walked to main (most of its ~1000 samples).
    walked = sum(n for names, n in chain if "main" in names)
    assert walked >= 0.9 * sum(n for _, n in chain) and walked >= 500, chain[:3]
    if where == "kernel":
        m = SELF_LINE.search(err)
        assert m and int(m.group(1)) >= sum(n for _, n in own) * 0.9, err


class _RecordingTables:
    """The loader's view of the shared tables: which processes it asked to
    load (the policy under test; the tables themselves are tested above)."""

    def __init__(self):
        self.asked = []
        self.done = set()

    def ready(self, state, pid):
        return False

    def changed(self, state):
        return []

    def loaded_pids(self):
        return sorted(self.done)

    def refresh(self, state, pids, deadline):
        self.asked.append(list(pids))
        self.done.update(pids)

    def loaded(self, pid):
        return pid in self.done


def test_a_busy_process_is_loaded_at_once_a_quiet_young_one_waits():
    """A process that fell back LOAD_HOT_FALLBACKS times is loaded at the
    next cycle whatever its age (it is busy: every stack of it walked in user
    space costs the agent); one that fell back a few times waits until it is
    LOAD_MIN_AGE old; one sampled less than LOAD_AFTER_FALLBACKS times never
    gets tables."""
    import time
    from perfagent.sources import TableLoader
    from perfagent.unwind.kernel import LOAD_AFTER_FALLBACKS, LOAD_HOT_FALLBACKS, LOAD_MIN_AGE
    tables = _RecordingTables()
    loader = TableLoader(tables, state=None)
    now = time.monotonic()
    busy, quiet, rare = 101, 102, 103
    for _ in range(LOAD_HOT_FALLBACKS):
        loader.fell_back(busy, now)
    for _ in range(LOAD_AFTER_FALLBACKS):
        loader.fell_back(quiet, now)
    for _ in range(LOAD_AFTER_FALLBACKS - 1):
        loader.fell_back(rare, now - 10)
    assert loader.loading()
    loader.load()
    assert tables.asked[0] == [busy], tables.asked
    assert loader.waiting == {quiet: LOAD_AFTER_FALLBACKS, rare: LOAD_AFTER_FALLBACKS - 1}
    loader.since[quiet] -= LOAD_MIN_AGE + 0.1   # now old enough
    loader.load()
    assert quiet in tables.asked[-1] and rare not in tables.done, tables.asked
    assert loader.waiting == {rare: LOAD_AFTER_FALLBACKS - 1}
