"""The DWARF unwinder on real processes built without frame pointers.

The same targets under --unwind fp show what the kernel's frame-pointer walk
loses; under dwarf and auto the full chain must be there.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess

import pytest

from conftest import NOFP, PROGRAMS, contains_chain, run_agent, user_stacks
from perfagent.pprof.decode import read_profile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests need root")

def profile(argv, unwind, tmp_path, duration="2s"):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        out = tmp_path / ("%s.pb.gz" % unwind)
        r = run_agent(["--profile", "--pid", str(proc.pid), "--duration", duration, "--unwind", unwind,
                       "--profile-output", str(out)], cwd=str(tmp_path))
    finally:
        proc.kill()
        proc.wait()
    assert r.returncode == 0, r.stderr
    return user_stacks(read_profile(str(out))), r.stderr


def share(stacks, predicate) -> float:
    total = sum(v[0] for _, _, v in stacks)
    assert total >= 50, total
    return sum(v[0] for names, _, v in stacks if predicate(names)) / total


CHAIN = ["__libc_start_main", "__libc_start_call_main", "main", "a", "b", "c", "d", "leaf"]


@pytest.mark.parametrize("unwind", ["dwarf", "auto"])
def test_chain_through_alloca_and_plt(unwind_bin, tmp_path, unwind):
    stacks, err = profile([unwind_bin, "chain", "8"], unwind, tmp_path)
    assert share(stacks, lambda n: contains_chain(n, CHAIN) and n[-1] == "leaf") >= 0.95
    m = re.search(r"unwound (\d+) user stacks: (\d+) complete", err)
    assert m and int(m.group(2)) >= 0.95 * int(m.group(1)), err


@pytest.mark.parametrize("unwind", ["dwarf", "auto"])
def test_qsort_comparator_called_back_from_libc(unwind_bin, tmp_path, unwind):
    stacks, _ = profile([unwind_bin, "qsort", "8"], unwind, tmp_path)

    def ok(names):
        u = names
        return (contains_chain(u, ["__libc_start_call_main", "main", "a"]) and u[-2:] == ["compare", "leaf"]
                and any(f.startswith("qsort") for f in u))
    assert share(stacks, ok) >= 0.95


def test_fp_truncates_the_same_target(unwind_bin, tmp_path):
    stacks, _ = profile([unwind_bin, "chain", "8"], "fp", tmp_path)
    assert share(stacks, lambda n: contains_chain(n, CHAIN)) < 0.5


PY_LOOP = "def f(n):\n    return sum(i * i for i in range(n))\nwhile True:\n    f(10000)\n"


def test_cpython_without_frame_pointers_unwinds_to_main(tmp_path):
    python = "/usr/bin/python3.11"
    if not os.path.exists(python):
        pytest.skip("no /usr/bin/python3.11")
    proc_argv = [python, "-c", "print('ready', flush=True)\n" + PY_LOOP]
    stacks, err = profile(proc_argv, "dwarf", tmp_path)
    assert share(stacks, lambda n: "Py_RunMain" in n or "__libc_start_main" in n) >= 0.90, err
    fp_stacks, _ = profile(proc_argv, "fp", tmp_path)
    assert share(fp_stacks, lambda n: "Py_RunMain" in n) < 0.5


def test_stack_size_validation(tmp_path):
    for value, msg in (("12", "multiple of 8"), ("65536", "at most|between"), ("0", "between"), ("x", "not an integer")):
        r = run_agent(["--profile", "-a", "--stack-size", value], cwd=str(tmp_path), timeout=30)
        assert r.returncode == 2 and "--stack-size" in r.stderr and re.search(msg, r.stderr), r.stderr


def test_debug_frame_from_separate_debug_file(unwind_bin, programs_dir, tmp_path):
    """No .eh_frame for the program's own code: its CFI lives only in a debuglink'd debug file."""
    d = tmp_path / "dbg"
    d.mkdir()
    exe = str(d / "unwind")
    subprocess.run(["gcc", *NOFP, "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-o", exe,
                    os.path.join(PROGRAMS, "unwind.c"), "-L", programs_dir, "-lunwhop",
                    "-Wl,-rpath," + programs_dir], check=True)
    subprocess.run(["objcopy", "--only-keep-debug", exe, exe + ".debug"], check=True)
    subprocess.run(["strip", "-s", exe], check=True)
    subprocess.run(["objcopy", "--add-gnu-debuglink=" + exe + ".debug", exe], check=True, cwd=str(d))
    sections = subprocess.run(["readelf", "-SW", exe], stdout=subprocess.PIPE, text=True).stdout
    assert ".debug_frame" not in sections and ".symtab" not in sections
    stacks, err = profile([exe, "chain", "8"], "dwarf", tmp_path)
    assert share(stacks, lambda n: contains_chain(n, CHAIN)) >= 0.95, err


def test_overflowing_debug_frame_fde_costs_only_itself(unwind_bin, programs_dir, tmp_path):
    """Issue 11: a .debug_frame FDE whose start plus range passes 2**64, in a
    binary the target maps, made the first lookup raise OverflowError and
    the capture exit 1 without a profile.  Now it costs that FDE's range:
    the capture succeeds and the chain (other FDEs) unwinds as before."""
    from perfagent.dwarf import CallFrameInfo
    from perfagent.elf import ELFFile
    exe = str(tmp_path / "unwind")
    subprocess.run(["gcc", *NOFP, "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-o", exe,
                    os.path.join(PROGRAMS, "unwind.c"), "-L", programs_dir, "-lunwhop",
                    "-Wl,-rpath," + programs_dir], check=True)
    with ELFFile.from_path(exe) as elf:
        sec = elf.section(".debug_frame")
        compare = [s.st_value for s in elf.iter_symbols(".symtab") if s.name == "compare"][0]
        cfi = CallFrameInfo(bytes(elf.section_data(sec)), 0, False)
        fde = [f for f in cfi.iter_fdes() if f.initial_location == compare][0]
        field = sec.sh_offset + fde.offset + 4 + 4  # after the length and the CIE pointer
    with open(exe, "r+b") as f:  # compare() (unused in "chain" mode) now claims [2**64 - 4 KiB, +8 KiB)
        f.seek(field)
        f.write(struct.pack("<QQ", 2 ** 64 - 0x1000, 0x2000))
    frames = subprocess.run(["readelf", "--debug-dump=frames", exe], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True).stdout
    assert "pc=fffffffffffff000..0000000000001000" in frames
    for unwind in ("dwarf", "auto"):
        stacks, err = profile([exe, "chain", "3"], unwind, tmp_path)
        assert share(stacks, lambda n: contains_chain(n, CHAIN)) >= 0.95, err


SIGNAL_CHAIN = ["__libc_start_call_main", "main", "outer_a", "outer_b", "interrupted", "__restore_rt", "on_alarm"]
HANDLER_CHAIN = ["on_alarm", "handler_a", "handler_b", "handler_spin"]


def through_signal_frame(user) -> bool:
    """Root-first user frames: ... main > outer_a > outer_b > interrupted >
    __restore_rt > on_alarm, then a prefix of the handler's own chain."""
    if "on_alarm" not in user:
        return False
    handler = user[user.index("on_alarm"):]
    return contains_chain(user, SIGNAL_CHAIN) and handler == HANDLER_CHAIN[:len(handler)]


@pytest.mark.parametrize("unwind", ["dwarf", "auto"])
def test_unwind_through_a_signal_handler(programs_dir, tmp_path, unwind):
    """The handler's samples continue through glibc's __restore_rt (a CFA
    expression and expression rules over the ucontext) into the interrupted
    function, at its exact pc, and on to main."""
    exe = os.path.join(programs_dir, "sigframe")
    if not os.path.exists(exe):
        subprocess.run(["gcc", *NOFP, "-o", exe, os.path.join(PROGRAMS, "sigframe.c")], check=True)
    out = tmp_path / "sig.pb.gz"
    r = run_agent(["--profile", "--unwind", unwind, "--sample-rate", "299", "--profile-output", str(out),
                   "--", exe], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    stacks = user_stacks(read_profile(str(out)))
    in_handler = [(names, values[0]) for names, _, values in stacks if "on_alarm" in names]
    total = sum(n for _, n in in_handler)
    assert total >= 100, (total, r.stderr)
    through = sum(n for user, n in in_handler if through_signal_frame(user))
    assert through >= 0.95 * total, (through, total, [u for u, _ in in_handler if not through_signal_frame(u)][:5])
