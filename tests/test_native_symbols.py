"""Native symbolization: runtime addresses of live processes, nm, debug files, cache."""

from __future__ import annotations

import bisect
import os
import random
import shutil
import subprocess
import zlib
from typing import Dict, List, Set, Tuple

import pytest

from perfagent.elf import ELFFile
from perfagent.symbolize.native import BinaryCache, BinaryInfo, SymbolTable

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("nm") is None,
                                reason="needs gcc and binutils")

PROGRAM = r"""
#include <stdio.h>
#include <unistd.h>
extern int libfn(int);
extern void *lib_inner_address(void);
__attribute__((noinline)) int f(int x) { return x * 7 + 1; }
int main(int argc, char **argv) {
    /* Not &libfn: a non-PIE executable's canonical address for it is a PLT slot. */
    printf("%p %p\n", (void *)&f, lib_inner_address());
    fflush(stdout);
    pause();
    return f(argc) + libfn(argc);
}
"""

LIBRARY = r"""
__attribute__((noinline)) static int lib_inner(int x) { return x * 5 + 2; }
int libfn(int x) { return lib_inner(x) + 1; }
void *lib_inner_address(void) { return (void *)&lib_inner; }
"""

LAYOUTS = {
    "pie": ["-pie", "-fpie"],
    "nopie": ["-no-pie", "-fno-pie"],
    "separate-code": ["-pie", "-fpie", "-Wl,-z,separate-code"],
    "nopie-separate-code": ["-no-pie", "-fno-pie", "-Wl,-z,separate-code"],
    "noseparate-code": ["-pie", "-fpie", "-Wl,-z,noseparate-code"],
}

# Hand-written assembly exercising the table's rules: a function with a
# nested function and a stray label inside, a zero-size function, three
# aliases of different binding at one address, and a bare assembly label.
ASM_RULES = r"""
    .text
    .globl outer
    .type outer,@function
outer:
    .skip 0x10
    .globl inner
    .type inner,@function
inner:
    .skip 0x10
    .size inner, 0x10
    .skip 0x10
label_in_outer:
    .skip 0x10
    .size outer, 0x40
    .globl zero
    .type zero,@function
zero:
    .skip 0x20
    .weak weak_alias
    .type weak_alias,@function
    .type local_alias,@function
    .globl after
    .type after,@function
weak_alias:
local_alias:
after:
    .skip 0x10
    .size after, 0x10
    .size weak_alias, 0x10
    .size local_alias, 0x10
    .skip 0x10
asm_label:
    .skip 0x10
"""


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("native"))


def gcc(*args: str) -> None:
    subprocess.run(["gcc", *args], check=True)


@pytest.fixture(scope="module")
def library(build_dir) -> str:
    src = os.path.join(build_dir, "lib.c")
    with open(src, "w") as f:
        f.write(LIBRARY)
    out = os.path.join(build_dir, "libfoo.so")
    gcc("-O1", "-shared", "-fpic", "-Wl,-soname,libfoo.so", "-o", out, src)
    return out


def build_program(build_dir: str, library: str, layout: str) -> str:
    out = os.path.join(build_dir, "prog-" + layout)
    if not os.path.exists(out):
        src = os.path.join(build_dir, "prog.c")
        with open(src, "w") as f:
            f.write(PROGRAM)
        gcc("-O1", *LAYOUTS[layout], "-o", out, src, "-L" + build_dir, "-lfoo",
            "-Wl,-rpath," + build_dir)
    return out


def read_maps(pid: int) -> List[Tuple[int, int, int, int, int, str]]:
    """(start, end, pgoff, st_dev, st_ino, path) per file-backed mapping."""
    rows = []
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            rows.append((start, end, int(fields[2], 16), os.makedev(major, minor),
                         int(fields[4]), fields[5].strip()))
    return rows


def file_offset_of(maps, addr: int) -> Tuple[int, int, int, str]:
    for start, end, pgoff, dev, ino, path in maps:
        if start <= addr < end:
            return addr - start + pgoff, dev, ino, path
    raise AssertionError("address %#x is in no file mapping" % addr)


def st_value_of(path: str, name: str) -> int:
    with ELFFile.from_path(path) as elf:
        for table in (".symtab", ".dynsym"):
            for sym in elf.iter_symbols(table):
                if sym.name == name and sym.st_shndx:
                    return sym.st_value
    raise AssertionError("%s not in %s" % (name, path))


# ------------------------------------------------- live process addresses

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_runtime_address_maps_back_to_symbol(build_dir, library, layout):
    prog = build_program(build_dir, library, layout)
    proc = subprocess.Popen([prog], stdout=subprocess.PIPE, universal_newlines=True)
    try:
        f_addr, lib_addr = (int(x, 16) for x in proc.stdout.readline().split())
        maps = read_maps(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    cache = BinaryCache(debug_dirs=[])
    for addr, binary, name in ((f_addr, prog, "f"), (lib_addr, library, "lib_inner")):
        offset, dev, ino, mapped_path = file_offset_of(maps, addr)
        assert os.path.samefile(mapped_path, binary)
        info = cache.load(mapped_path, st_dev=dev, st_ino=ino)
        assert info.error is None, info.error
        assert info.offset_to_vaddr(offset) == st_value_of(binary, name)
        assert info.symbolize_offset(offset) == name
        assert info.symbols.lookup(info.offset_to_vaddr(offset)) == name


# ---------------------------------------------------------- against nm

def nm_functions(path: str, dynamic: bool) -> List[Tuple[int, int, str]]:
    """(value, size, name) of every defined FUNC / IFUNC symbol nm reports."""
    args = ["nm", "--format=sysv", "-S", "--defined-only"] + (["-D"] if dynamic else []) + [path]
    out = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         universal_newlines=True).stdout
    rows = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) < 7 or not fields[1]:
            continue
        if fields[3] not in ("FUNC", "<OS specific>: 10"):  # 10 is STT_GNU_IFUNC
            continue
        rows.append((int(fields[1], 16), int(fields[4], 16) if fields[4] else 0,
                     fields[0].split("@")[0]))
    return rows


def check_against_nm(table: SymbolTable, functions: List[Tuple[int, int, str]]) -> int:
    """Every function's first and last byte resolve to it, an alias, or a nested function.

    For an address, the acceptable names are those at the highest start
    among the functions containing it (the innermost one) — aliases there
    included, since one alias names them all.
    """
    by_start: Dict[int, Set[str]] = {}
    ranges = []
    for value, size, name in functions:
        by_start.setdefault(value, set()).add(name)
        ranges.append((value, value + max(size, 1)))
    ranges.sort()
    starts = [r[0] for r in ranges]

    def acceptable(addr: int) -> Set[str]:
        i = bisect.bisect_right(starts, addr)
        best = None
        for start, end in ranges[max(0, i - 64):i]:
            if start <= addr < end and (best is None or start > best):
                best = start
        return by_start.get(best, set())

    checked = 0
    for value, size, name in functions:
        for addr in {value, value + max(size, 1) - 1}:
            ok = acceptable(addr)
            got = table.lookup(addr)
            assert got in ok, "%#x (%s+%d): got %r, want one of %s" % (
                addr, name, addr - value, got, sorted(ok)[:5])
            checked += 1
    return checked


def test_compiled_binaries_against_nm(build_dir, library):
    for layout in sorted(LAYOUTS):
        prog = build_program(build_dir, library, layout)
        with ELFFile.from_path(prog) as elf:
            table = SymbolTable([elf])
        assert check_against_nm(table, nm_functions(prog, False)) > 10
    with ELFFile.from_path(library) as elf:
        assert check_against_nm(SymbolTable([elf]), nm_functions(library, False)) > 3


SYSTEM_LIBRARIES = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
                    "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", "/usr/bin/python3.11",
                    "/usr/bin/ls"]


@pytest.mark.parametrize("path", SYSTEM_LIBRARIES)
def test_system_libraries_against_nm(path):
    if not os.path.exists(path):
        pytest.skip(path + " not present")
    info = BinaryCache().load(path)  # uses /usr/lib/debug when installed
    assert info.error is None, info.error
    functions = nm_functions(path, True) + nm_functions(path, False)
    if info.debug_path:
        functions += nm_functions(info.debug_path, False)
    if not functions:
        pytest.skip("no function symbols in " + path)
    assert check_against_nm(info.symbols, functions) > 0


# --------------------------------------------------------- table rules

@pytest.fixture(scope="module")
def rules_library(build_dir) -> str:
    """ASM_RULES assembled into a shared object."""
    src = os.path.join(build_dir, "rules.s")
    with open(src, "w") as f:
        f.write(ASM_RULES)
    out = os.path.join(build_dir, "rules.so")
    gcc("-shared", "-nostdlib", "-Wl,--build-id", "-o", out, src)
    return out


def test_table_rules_on_hand_written_assembly(rules_library):
    with ELFFile.from_path(rules_library) as elf:
        table = SymbolTable([elf])
        text = elf.section(".text")
        outer = next(s.st_value for s in elf.iter_symbols(".symtab") if s.name == "outer")
    expect = {
        0x00: "outer", 0x0F: "outer", 0x10: "inner", 0x1F: "inner",
        0x20: "outer",              # resumes after the nested function
        0x30: "outer", 0x3F: "outer",  # the stray NOTYPE label does not split it
        0x40: "zero", 0x5F: "zero",  # zero-size: up to the next symbol
        0x60: "after", 0x6F: "after",  # global beats weak and local aliases
        0x70: None,                  # a gap after a sized function
        0x80: "asm_label", 0x8F: "asm_label",  # bare label: up to the section end
    }
    for delta, name in expect.items():
        assert table.lookup(outer + delta) == name, hex(delta)
    assert text.sh_addr + text.sh_size == outer + 0x90
    assert table.lookup(outer + 0x90) is None
    assert table.lookup(outer - 1) is None
    assert len(table) == 5  # outer, inner, zero, after (+2 aliases), asm_label
    assert table.starts == sorted(table.starts)


def test_partial_tables_name_their_addresses_as_the_whole_table(rules_library):
    """A table built for some addresses (SymbolTable's ``only``) names each
    of them exactly as the whole table does, on the rules' edge cases: a
    nested function and the outer one resuming, a stray label, a zero-size
    symbol up to the next, aliases, a gap, a bare label up to the section
    end; asked one address at a time and all together."""
    with ELFFile.from_path(rules_library) as elf:
        whole = SymbolTable([elf])
        outer = next(s.st_value for s in elf.iter_symbols(".symtab") if s.name == "outer")
        addrs = [outer + d for d in range(-2, 0x92)]
        for a in addrs:
            part = SymbolTable([elf], only=[a])
            assert part.partial and part.lookup(a) == whole.lookup(a), hex(a - outer)
        together = SymbolTable([elf], only=addrs[::3])
        assert all(together.lookup(a) == whole.lookup(a) for a in addrs[::3])


@pytest.mark.parametrize("path", SYSTEM_LIBRARIES[:4])
def test_partial_tables_agree_with_whole_ones_on_system_libraries(path):
    """Random addresses and function starts (and just past them) of real
    libraries, with their debug files where installed: a partial table
    names them all as the whole table does, and knows its marks."""
    if not os.path.exists(path):
        pytest.skip(path + " not present")
    cache = BinaryCache()
    with ELFFile.from_path(path) as elf:
        debug = cache.find_debug_file(elf, path, elf.build_id)
        try:
            sources = [debug[1], elf] if debug is not None else [elf]
            whole = SymbolTable(sources)
            if not len(whole):
                pytest.skip("no function symbols in " + path)
            rnd = random.Random(7)
            lo, hi = whole.starts[0], whole.ends[-1]
            for k in (1, 30, 1000):
                addrs = ([rnd.randrange(lo - 64, hi + 64) for _ in range(k)]
                         + [rnd.choice(whole.starts) + rnd.choice((0, 1, 5)) for _ in range(k)])
                part = SymbolTable(sources, only=addrs, marks=("_PyEval_EvalFrameDefault", "no_such_fn"))
                assert [part.lookup(a) for a in addrs] == [whole.lookup(a) for a in addrs]
                assert part.contains_name("_PyEval_EvalFrameDefault") == \
                    whole.contains_name("_PyEval_EvalFrameDefault")
                assert not part.contains_name("no_such_fn")
                with pytest.raises(ValueError):
                    part.contains_name("main")
        finally:
            if debug is not None:
                debug[1].close()


def test_empty_table():
    table = SymbolTable()
    assert len(table) == 0 and table.lookup(0x1234) is None


# ------------------------------------------------------ debug files

@pytest.fixture()
def stripped(tmp_path, library):
    """(stripped binary, its --only-keep-debug file, build id) in tmp_path/bin."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    src = tmp_path / "prog.c"
    src.write_text(PROGRAM)
    full = str(bindir / "prog.full")
    gcc("-O1", "-g", "-pie", "-fpie", "-Wl,--build-id=sha1", "-o", full, str(src),
        "-L" + os.path.dirname(library), "-lfoo")
    debug = str(tmp_path / "prog.debug")
    subprocess.run(["objcopy", "--only-keep-debug", full, debug], check=True)
    prog = str(bindir / "prog")
    subprocess.run(["strip", "--strip-all", "-o", prog, full], check=True)
    with ELFFile.from_path(prog) as elf:
        assert elf.section(".symtab") is None
        build_id = elf.build_id
    return prog, debug, build_id, st_value_of(full, "f")


def with_debuglink(prog: str, debug: str) -> None:
    """objcopy finds the debug file by the name it will be looked up under."""
    cwd = os.getcwd()
    os.chdir(os.path.dirname(debug))
    try:
        subprocess.run(["objcopy", "--add-gnu-debuglink=" + os.path.basename(debug), prog], check=True)
    finally:
        os.chdir(cwd)


def assert_symbolizes_f(info: BinaryInfo, prog: str, f_vaddr: int) -> None:
    with ELFFile.from_path(prog) as elf:
        offset = elf.vaddr_to_offset(f_vaddr)  # load bias from the stripped binary
    assert info.symbolize_offset(offset) == "f"
    assert info.symbolize_offset(offset + 3) == "f"


def test_stripped_binary_has_no_f_without_debug_file(stripped):
    prog, debug, build_id, f_vaddr = stripped
    info = BinaryCache(debug_dirs=[]).load(prog)
    assert info.debug_path is None
    with ELFFile.from_path(prog) as elf:
        assert info.symbolize_offset(elf.vaddr_to_offset(f_vaddr)) != "f"


def test_debug_file_by_build_id(stripped, tmp_path):
    prog, debug, build_id, f_vaddr = stripped
    target = tmp_path / "debug" / ".build-id" / build_id[:2] / (build_id[2:] + ".debug")
    target.parent.mkdir(parents=True)
    shutil.copy(debug, str(target))
    info = BinaryCache(debug_dirs=[str(tmp_path / "debug")]).load(prog)
    assert info.debug_path == str(target)
    assert_symbolizes_f(info, prog, f_vaddr)


def test_debug_file_with_wrong_build_id_is_ignored(stripped, tmp_path, library):
    prog, debug, build_id, f_vaddr = stripped
    target = tmp_path / "debug" / ".build-id" / build_id[:2] / (build_id[2:] + ".debug")
    target.parent.mkdir(parents=True)
    shutil.copy(library, str(target))
    info = BinaryCache(debug_dirs=[str(tmp_path / "debug")]).load(prog)
    assert info.debug_path is None


@pytest.mark.parametrize("where", ["beside", "dot-debug", "debug-dir"])
def test_debug_file_by_debuglink(stripped, tmp_path, where):
    prog, debug, build_id, f_vaddr = stripped
    with_debuglink(prog, debug)
    bindir = os.path.dirname(prog)
    debug_root = str(tmp_path / "debugroot")
    dest = {
        "beside": os.path.join(bindir, "prog.debug"),
        "dot-debug": os.path.join(bindir, ".debug", "prog.debug"),
        "debug-dir": os.path.join(debug_root, bindir.lstrip("/"), "prog.debug"),
    }[where]
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(debug, dest)
    info = BinaryCache(debug_dirs=[debug_root]).load(prog)
    assert info.debug_path == dest
    assert_symbolizes_f(info, prog, f_vaddr)


def test_debuglink_with_bad_crc_is_rejected(stripped):
    prog, debug, build_id, f_vaddr = stripped
    with_debuglink(prog, debug)
    dest = os.path.join(os.path.dirname(prog), "prog.debug")
    with open(debug, "rb") as src, open(dest, "wb") as out:
        data = bytearray(src.read())
        data[-1] ^= 0xFF  # same file, one bit of difference: the CRC must catch it
        out.write(data)
    with ELFFile.from_path(prog) as elf:
        assert elf.debuglink[1] != zlib.crc32(bytes(data))
    info = BinaryCache(debug_dirs=[]).load(prog)
    assert info.debug_path is None


# ------------------------------------------------------------- the cache

def test_cache_parses_each_file_once(tmp_path, library):
    cache = BinaryCache(debug_dirs=[])
    first = cache.load(library)
    assert cache.load(library) is first
    assert cache.parse_count == 1
    link = str(tmp_path / "hardlink.so")
    os.link(library, link)
    via_link = cache.load(link)
    assert cache.parse_count == 1
    assert via_link.path == link and via_link.symbols is first.symbols
    st = os.stat(library)
    assert cache.load("/reported/libfoo.so", st_dev=st.st_dev, st_ino=st.st_ino).symbols is first.symbols
    assert cache.parse_count == 1


def test_cache_shares_one_build_at_two_paths(tmp_path, library):
    cache = BinaryCache(debug_dirs=[])
    first = cache.load(library)
    copy = str(tmp_path / "copy.so")
    shutil.copy(library, copy)
    second = cache.load(copy)
    assert cache.parse_count == 1
    assert second.path == copy and second.symbols is first.symbols
    assert second.build_id == first.build_id


def test_open_path_keeps_the_reported_path(library):
    cache = BinaryCache(debug_dirs=[])
    info = cache.load("/usr/lib/libfoo-in-container.so", open_path=library)
    assert info.path == "/usr/lib/libfoo-in-container.so"
    assert info.error is None and info.soname == "libfoo.so" and len(info.symbols) > 0
    proc_path = "/proc/%d/root%s" % (os.getpid(), library)
    assert cache.load(library, open_path=proc_path).symbols is info.symbols


def test_unreadable_files_give_an_error_not_an_exception(tmp_path):
    cache = BinaryCache(debug_dirs=[])
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\n")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path in (str(text), str(empty), str(tmp_path), "/dev/null", str(tmp_path / "missing")):
        info = cache.load(path)
        assert isinstance(info, BinaryInfo) and info.error
        assert len(info.symbols) == 0 and info.symbolize_offset(0x1000) is None


def test_cache_load_never_raises_on_damaged_binaries(tmp_path, library):
    data = open(library, "rb").read()
    rng = random.Random(7)
    cache = BinaryCache(debug_dirs=[str(tmp_path)])
    for i in range(150):
        mutated = bytearray(data[:rng.randrange(len(data))] if i % 3 == 0 else data)
        for _ in range(rng.randrange(1, 8)):
            if mutated:
                mutated[rng.randrange(min(len(mutated), 4096))] = rng.randrange(256)
        path = str(tmp_path / ("bad%d.so" % i))
        with open(path, "wb") as f:
            f.write(mutated)
        info = cache.load(path)
        assert isinstance(info, BinaryInfo)
        info.symbolize_offset(0x1000)
