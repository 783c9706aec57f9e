"""BTF parsing: a hand-built blob covering every record layout, then the
running kernel's /sys/kernel/btf/vmlinux (offsets, tp_btf ids, speed)."""

from __future__ import annotations

import errno
import os
import struct
from typing import List

import pytest

from perfagent.bpf import btf as B
from perfagent.bpf.btf import BTF, BTFType, Member
from perfagent.bpf.syscall import BPFError


class Builder:
    """Writes BTF the way include/uapi/linux/btf.h lays it out."""

    def __init__(self) -> None:
        self.strs = bytearray(b"\0")
        self.types: List[bytes] = []

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strs)
        self.strs += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, vlen: int, size_or_type: int, extra: bytes = b"",
            kind_flag: bool = False) -> int:
        info = (int(kind_flag) << 31) | (kind << 24) | vlen
        self.types.append(B.BTF_TYPE.pack(self.s(name), info, size_or_type) + extra)
        return len(self.types)

    def blob(self) -> bytes:
        t = b"".join(self.types)
        hdr = B.BTF_HEADER.pack(B.BTF_MAGIC, 1, 0, B.BTF_HEADER.size, 0, len(t), len(t),
                                len(self.strs))
        return hdr + t + bytes(self.strs)


def words(*w: int) -> bytes:
    return struct.pack("<%dI" % len(w), *[x & 0xFFFFFFFF for x in w])


def synthetic() -> bytes:
    b = Builder()
    K = B
    u32 = b.add(K.BTF_KIND_INT, "unsigned int", 0, 4, words(32))                # 1
    i32 = b.add(K.BTF_KIND_INT, "int", 0, 4, words((1 << 24) | 32))             # 2 (signed)
    td = b.add(K.BTF_KIND_TYPEDEF, "u32", 0, u32)                                # 3
    cst = b.add(K.BTF_KIND_CONST, "", 0, td)                                     # 4
    # struct inner { unsigned int a; unsigned int flags:3; unsigned int more:5; }  kind_flag=1
    inner = b.add(K.BTF_KIND_STRUCT, "inner", 3, 8, b"".join([
        words(b.s("a"), u32, 0),
        words(b.s("flags"), u32, (3 << 24) | 32),
        words(b.s("more"), u32, (5 << 24) | 35),
    ]), kind_flag=True)                                                          # 5
    # struct outer { const u32 x; union { struct outer *p; unsigned long w; }; struct inner in; }
    outer = b.add(K.BTF_KIND_STRUCT, "outer", 3, 24, b"".join([
        words(b.s("x"), cst, 0),
        words(0, 7, 64),
        words(b.s("in"), inner, 128),
    ]))                                                                          # 6
    b.add(K.BTF_KIND_UNION, "", 2, 8, words(b.s("p"), 9, 0) + words(b.s("w"), 8, 0))  # 7
    ulong = b.add(K.BTF_KIND_INT, "unsigned long", 0, 8, words(64))             # 8
    b.add(K.BTF_KIND_PTR, "", 0, outer)                                          # 9
    arr = b.add(K.BTF_KIND_ARRAY, "", 0, 0, words(u32, u32, 4))                  # 10
    b.add(K.BTF_KIND_TYPEDEF, "arr_t", 0, arr)                                   # 11
    b.add(K.BTF_KIND_ENUM, "color", 2, 4, words(b.s("RED"), 0) + words(b.s("BLUE"), 5))  # 12
    proto = b.add(K.BTF_KIND_FUNC_PROTO, "", 2, i32,
                  words(b.s("self"), 9) + words(b.s("n"), ulong))               # 13
    func = b.add(K.BTF_KIND_FUNC, "do_it", 0, proto)                             # 14
    b.add(K.BTF_KIND_FWD, "outer", 0, 0)                                         # 15
    b.add(K.BTF_KIND_ENUM64, "big", 1, 8, words(b.s("HUGE"), 1, 2))              # 16
    b.add(K.BTF_KIND_DECL_TAG, "tag1", 0, func, words(-1))                       # 17
    var = b.add(K.BTF_KIND_VAR, "gv", 0, u32, words(1))                          # 18
    b.add(K.BTF_KIND_DATASEC, ".data", 1, 4, words(var, 0, 4))                   # 19
    # An old-style bitfield (kind_flag 0): the INT itself is 4 bits wide at bit 2.
    nib = b.add(K.BTF_KIND_INT, "nibble_t", 0, 1, words((2 << 16) | 4))         # 20
    b.add(K.BTF_KIND_STRUCT, "old", 1, 4, words(b.s("n"), nib, 8))               # 21
    b.add(K.BTF_KIND_PTR, "", 0, proto)                                          # 22
    b.add(K.BTF_KIND_TYPEDEF, "btf_trace_demo", 0, 22)                           # 23
    b.add(K.BTF_KIND_FLOAT, "double", 0, 8)                                      # 24
    return b.blob()


def test_synthetic_all_kinds():
    t = BTF(synthetic(), "synthetic")
    assert len(t) == 25
    assert t.type(5) == BTFType(5, B.BTF_KIND_STRUCT, "inner", True, 3, 8)
    assert t.type(0).name == "void"
    assert t.find("outer") == 6                      # the STRUCT before the FWD
    assert t.find_all("outer") == [6, 15]
    assert t.find("outer", B.BTF_KIND_FWD) == 15
    assert t.find("color", B.BTF_KIND_ENUM) == 12
    assert t.find("do_it", B.BTF_KIND_FUNC) == 14
    assert t.find_all("nosuch") == []
    with pytest.raises(BPFError, match="no struct named 'nosuch'"):
        t.find("nosuch", B.BTF_KIND_STRUCT)
    # typedef/const resolution and sizes
    assert t.resolve(4) == 1
    assert t.size_of(4) == 4
    assert t.size_of(11) == 16                      # unsigned int[4] through a typedef
    assert t.size_of(9) == 8
    assert t.size_of(16) == 8
    # members: plain, through anonymous unions, nested paths, bitfields
    assert t.member("outer", "x") == Member("x", 4, 0, 0)
    assert t.member("outer", "w").offset == 8       # inside the anonymous union
    assert t.member("outer", "p").offset == 8
    m = t.member("outer", "in.flags")
    assert (m.bit_offset, m.bitfield_size, m.is_bitfield) == (128 + 32, 3, True)
    assert t.member("outer", "in.more").bit_offset == 128 + 35
    assert t.member("outer", "in.a").offset == 16
    assert t.member_size(t.member("outer", "in")) == 8
    old = t.member("old", "n")
    assert (old.bit_offset, old.bitfield_size) == (8 + 2, 4)
    with pytest.raises(BPFError, match="has no member 'y'"):
        t.member("outer", "y")
    assert t.member_any("outer", "nope", "x").name == "x"
    with pytest.raises(BPFError, match="none of the members"):
        t.member_any("outer", "nope", "neither")
    # function prototypes, as for a tp_btf typedef
    assert [p.name for p in t.params(14)] == ["self", "n"]
    assert t.raw_tp_btf_id("demo") == 23
    assert [p.type_id for p in t.raw_tp_args("demo")] == [8]  # leading arg dropped


def test_synthetic_blob_accepted_by_kernel():
    """The kernel's own BTF validator agrees the hand-built blob is well formed,
    so the parser was tested against real layouts, not our misreading."""
    from perfagent.bpf import syscall as sc
    try:
        fd = sc.btf_load(synthetic())
    except BPFError as exc:
        if exc.errno in (errno.EPERM, errno.ENOSYS):
            pytest.skip(str(exc))
        raise
    os.close(fd)


def test_malformed_blobs():
    good = synthetic()
    with pytest.raises(BPFError, match="bad BTF magic"):
        BTF(b"\xeb\x9f" + good[2:])  # big-endian magic
    with pytest.raises(BPFError, match="too short"):
        BTF(b"\x9f\xeb")
    with pytest.raises(BPFError, match="past the end"):
        BTF(good[:-10])
    # Cut the type section inside a record: header claims fewer type bytes.
    hdr = list(B.BTF_HEADER.unpack_from(good))
    hdr[5] -= 4  # type_len
    with pytest.raises(BPFError, match="inside a type record"):
        BTF(B.BTF_HEADER.pack(*hdr) + good[B.BTF_HEADER.size:])


def test_missing_btf_is_one_clear_line(tmp_path):
    with pytest.raises(BPFError) as ei:
        BTF.load_vmlinux(str(tmp_path / "vmlinux"))
    msg = str(ei.value)
    assert "has no BTF" in msg and "CONFIG_DEBUG_INFO_BTF" in msg and "\n" not in msg
    assert ei.value.errno == errno.ENOENT


needs_vmlinux = pytest.mark.skipif(not os.path.exists(B.VMLINUX_PATH),
                                   reason="kernel without BTF")


@needs_vmlinux
def test_vmlinux_parse_and_index():
    # (Its speed is a benchmark figure, not an assertion: tools/bench_capture.py.)
    t = BTF.load_vmlinux()
    assert t.find("task_struct", B.BTF_KIND_STRUCT)   # gathers the name offsets
    assert len(t) > 10000


@needs_vmlinux
def test_vmlinux_task_struct():
    t = B.vmlinux()
    tid = t.find("task_struct", B.BTF_KIND_STRUCT)
    size = t.type(tid).size_or_type
    pid = t.member("task_struct", "pid")
    tgid = t.member("task_struct", "tgid")
    state = t.member_any("task_struct", "__state", "state")
    for m in (pid, tgid, state):
        assert not m.is_bitfield and 0 < m.offset < size
    assert t.member_size(pid) == t.member_size(tgid) == 4   # pid_t
    assert t.type(t.resolve(pid.type_id)).name == "int"     # pid_t -> __kernel_pid_t -> int
    assert tgid.offset == pid.offset + 4                    # declared next to each other
    assert t.member_size(state) in (4, 8)                   # unsigned int __state / long state


@needs_vmlinux
def test_vmlinux_sched_switch_target():
    t = B.vmlinux()
    tid = t.raw_tp_btf_id("sched_switch")
    assert t.type(tid).kind == B.BTF_KIND_TYPEDEF
    args = t.raw_tp_args("sched_switch")
    i = t.raw_tp_arg_index("sched_switch", "prev")
    assert args[i + 1].name == "next"
    ptr = t.type(t.resolve(args[i].type_id))
    assert ptr.kind == B.BTF_KIND_PTR
    assert t.type(t.resolve(ptr.size_or_type)).name == "task_struct"
    with pytest.raises(BPFError):
        t.raw_tp_btf_id("no_such_tracepoint_xyz")


# -- hostile blobs (issue 11): bounded work, BPFError only ------------------------

def test_type_ids_out_of_range():
    b = Builder()
    b.add(B.BTF_KIND_TYPEDEF, "dangling", 0, 999)                                # 1
    b.add(B.BTF_KIND_STRUCT, "s", 1, 4, words(b.s("m"), 999, 0))                 # 2
    b.add(B.BTF_KIND_ARRAY, "", 0, 0, words(999, 999, 4))                        # 3
    b.add(B.BTF_KIND_FUNC_PROTO, "", 1, 999, words(b.s("p"), 999))               # 4
    t = BTF(b.blob())
    for call in (lambda: t.resolve(1), lambda: t.size_of(1), lambda: t.members("s"),
                 lambda: t.member("s", "x"), lambda: t.size_of(3), lambda: t.type(5),
                 lambda: t.type(-1)):
        with pytest.raises(BPFError, match="no BTF type id"):
            call()
    assert [p.type_id for p in t.params(4)] == [999]  # ids are only checked when followed


def test_reference_cycles_end_in_eloop():
    b = Builder()
    b.add(B.BTF_KIND_TYPEDEF, "a", 0, 2)                                         # 1
    b.add(B.BTF_KIND_CONST, "", 0, 3)                                            # 2
    b.add(B.BTF_KIND_VOLATILE, "", 0, 1)                                         # 3 -> 1
    b.add(B.BTF_KIND_ARRAY, "", 0, 0, words(4, 4, 2))                            # 4: array of itself
    b.add(B.BTF_KIND_PTR, "", 0, 5)                                              # 5: pointer to itself
    b.add(B.BTF_KIND_FUNC, "f", 0, 6)                                            # 6: function of itself
    t = BTF(b.blob())
    for tid in (1, 2, 3):
        with pytest.raises(BPFError) as info:
            t.size_of(tid)
        assert info.value.errno == errno.ELOOP
    with pytest.raises(BPFError) as info:
        t.size_of(4)  # was a RecursionError
    assert info.value.errno == errno.ELOOP
    assert t.size_of(5) == B.POINTER_SIZE
    with pytest.raises(BPFError, match="not a function"):
        t.params(6)


def test_anonymous_members_that_contain_themselves():
    b = Builder()
    # struct s { union { struct s; int x; }; }: a cycle through anonymous members.
    b.add(B.BTF_KIND_STRUCT, "s", 1, 4, words(0, 2, 0))                         # 1
    b.add(B.BTF_KIND_UNION, "", 2, 4, words(0, 1, 0) + words(b.s("x"), 3, 0))   # 2
    b.add(B.BTF_KIND_INT, "int", 0, 4, words(32))                                # 3
    t = BTF(b.blob())
    assert t.member("s", "x").offset == 0
    with pytest.raises(BPFError, match="has no member 'y'") as info:
        t.member("s", "y")  # was a RecursionError
    assert info.value.errno == errno.ENOENT


def test_member_search_visits_each_struct_once():
    """Each level embeds the next twice, anonymously: a naive search for a
    missing member walks 2^40 paths; each struct is searched once."""
    levels = 40
    b = Builder()
    for i in range(levels):
        nxt = i + 2 if i + 1 < levels else levels + 1
        b.add(B.BTF_KIND_STRUCT, "l%d" % i, 2, 8, words(0, nxt, 0) + words(0, nxt, 32))
    b.add(B.BTF_KIND_INT, "int", 0, 4, words(32))                                # levels + 1

    class Counting(BTF):
        calls = 0

        def members(self, type_id):
            Counting.calls += 1
            return super().members(type_id)

    t = Counting(b.blob())
    with pytest.raises(BPFError, match="has no member 'nope'"):
        t.member("l0", "nope")
    assert Counting.calls == levels


def test_string_offsets_past_the_string_section():
    b = Builder()
    b.add(B.BTF_KIND_INT, "int", 0, 4, words(32))                                # 1
    b.add(B.BTF_KIND_STRUCT, "s", 1, 4, words(10 ** 6, 1, 0), kind_flag=True)    # 2
    blob = bytearray(b.blob())
    struct.pack_into("<I", blob, B.BTF_HEADER.size, 5000)  # type 1's name_off
    t = BTF(bytes(blob))
    with pytest.raises(BPFError, match="string offset 5000 past the string section"):
        t.type(1)
    with pytest.raises(BPFError, match="string offset 1000000 past"):
        t.members(2)
    assert t.find_all("int") == []  # the name is gone, not an error


def test_malformed_headers_and_sections():
    b = Builder()
    b.add(B.BTF_KIND_INT, "int", 0, 4, words(32))
    good = b.blob()
    hdr = list(B.BTF_HEADER.unpack_from(good))

    def patched(**fields):
        names = ["magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len"]
        h = hdr[:]
        for k, v in fields.items():
            h[names.index(k)] = v
        return B.BTF_HEADER.pack(*h) + good[B.BTF_HEADER.size:]

    with pytest.raises(BPFError, match="bad BTF header length 0"):
        BTF(patched(hdr_len=0))
    with pytest.raises(BPFError, match="bad BTF header length"):
        BTF(patched(hdr_len=1 << 31))
    with pytest.raises(BPFError, match="ends inside a type record"):
        BTF(patched(type_len=8))  # was an IndexError: the btf_type itself is cut
    with pytest.raises(BPFError, match="start and end with NUL"):
        BTF(patched(str_len=hdr[7] - 1))  # "int" loses its NUL
    with pytest.raises(BPFError, match="start and end with NUL"):
        BTF(patched(str_len=0))
    # A vlen of 0xffff with no members after it.
    blob = bytearray(good)
    struct.pack_into("<I", blob, B.BTF_HEADER.size + 4, (B.BTF_KIND_STRUCT << 24) | 0xFFFF)
    with pytest.raises(BPFError, match="ends inside a type record"):
        BTF(bytes(blob))


def test_vmlinux_find_all_matches_every_type_by_name():
    """find_all searches the types' name offsets in C: it must return what a
    walk over every type's name returns, for structs, their FWD twins,
    typedefs, functions and names other strings end with."""
    try:
        btf = BTF.load_vmlinux()
    except BPFError as exc:
        pytest.skip(str(exc))
    names = ("task_struct", "pt_regs", "int", "thread_struct", "mm_struct", "sk_buff", "u64",
             "__schedule", "file", "list_head")
    by_name = {n: [] for n in names}
    for tid in range(1, len(btf)):
        name = btf.type(tid).name
        if name in by_name:
            by_name[name].append(tid)
    for name in names:
        assert btf.find_all(name) == by_name[name], name
        for kind in {btf.type(t).kind for t in by_name[name]}:
            assert btf.find_all(name, kind) == [t for t in by_name[name] if btf.type(t).kind == kind]
    assert btf.find_all("no_such_type_anywhere_xyz") == []


def test_vmlinux_mapped_in_place_answers_as_read_whole():
    """load_vmlinux maps the kernel's BTF where the kernel allows it (6.16+)
    and reads it otherwise: either way every type, member and name lookup
    equals a BTF parsed whole from the file's bytes."""
    import mmap
    try:
        mapped = BTF.load_vmlinux()
    except BPFError as exc:
        pytest.skip(str(exc))
    with open(B.VMLINUX_PATH, "rb") as f:
        whole = BTF(f.read(), "read")
    print("in place" if isinstance(mapped._w, memoryview) else "read: this kernel does not map it")
    for struct_name, member in (("task_struct", "thread.fsbase"), ("bpf_perf_event_data", "sample_period"),
                                ("task_struct", "real_parent"), ("pt_regs", "sp")):
        assert mapped.member(struct_name, member) == whole.member(struct_name, member)
    assert len(mapped) == len(whole)
    for tid in range(1, len(whole), 997):
        assert mapped.type(tid) == whole.type(tid)
    assert mapped.find_all("task_struct") == whole.find_all("task_struct")
    assert isinstance(mapped._w, memoryview) == _kernel_maps_btf(mmap)


def _kernel_maps_btf(mmap) -> bool:
    with open(B.VMLINUX_PATH, "rb") as f:
        try:
            mmap.mmap(f.fileno(), os.fstat(f.fileno()).st_size, mmap.MAP_PRIVATE, mmap.PROT_READ).close()
            return True
        except OSError:
            return False
