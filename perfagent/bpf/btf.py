"""Reading BTF, the kernel's own type information (/sys/kernel/btf/vmlinux).

What the profiler needs from it: a struct member's byte offset and size on
*this* kernel (task_struct.pid, and task_struct.__state, which was .state
before 5.14), resolved through typedefs and qualifiers, and the BTF id of
the ``btf_trace_<tracepoint>`` typedef a tp_btf program attaches to.

The format (Documentation/bpf/btf.rst, include/uapi/linux/btf.h) is a
header, a type section of variable-length records numbered from 1 in order,
and a string section.  The records have no index, so one pass over the type
section (~150k types, ~3 MB on a distribution kernel) is unavoidable; it
only records where each type starts and its name_off.  Names are looked up
by searching the string section for the name (fast, done in C by
bytes.find) and those string offsets among the types' name_offs (bytes.find
again).  Everything else is decoded on demand.

The blob is read defensively although it normally comes from the kernel: a
type id past the last type, a string offset past the string section, a
record running past its section, and chains or cycles of references
(typedef/const/volatile chains, arrays of arrays, anonymous members that
contain themselves) all end in a :class:`BPFError` after a bounded amount
of work: chains are followed at most :data:`MAX_CHAIN` steps, and a member
search visits each struct at most once.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import sys
from array import array
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from perfagent.records import NamedTuple
from perfagent.bpf.syscall import BPFError
from perfagent.elf.elffile import string_offsets

VMLINUX_PATH = "/sys/kernel/btf/vmlinux"

BTF_MAGIC = 0xEB9F

# struct btf_header {
#     __u16 magic;
#     __u8  version;
#     __u8  flags;
#     __u32 hdr_len;
#     /* All offsets are in bytes relative to the end of this header */
#     __u32 type_off;
#     __u32 type_len;
#     __u32 str_off;
#     __u32 str_len;
# };
BTF_HEADER = struct.Struct("<HBBIIIII")

# struct btf_type {
#     __u32 name_off;
#     __u32 info;     /* vlen: bits 0-15, kind: bits 24-28, kind_flag: bit 31 */
#     union { __u32 size; __u32 type; };
# };
BTF_TYPE = struct.Struct("<III")

# Kinds (BTF_KIND_*)
BTF_KIND_UNKN = 0
BTF_KIND_INT = 1
BTF_KIND_PTR = 2
BTF_KIND_ARRAY = 3
BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_ENUM = 6
BTF_KIND_FWD = 7
BTF_KIND_TYPEDEF = 8
BTF_KIND_VOLATILE = 9
BTF_KIND_CONST = 10
BTF_KIND_RESTRICT = 11
BTF_KIND_FUNC = 12
BTF_KIND_FUNC_PROTO = 13
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
BTF_KIND_FLOAT = 16
BTF_KIND_DECL_TAG = 17
BTF_KIND_TYPE_TAG = 18
BTF_KIND_ENUM64 = 19

KIND_NAMES = {
    BTF_KIND_UNKN: "UNKN", BTF_KIND_INT: "INT", BTF_KIND_PTR: "PTR",
    BTF_KIND_ARRAY: "ARRAY", BTF_KIND_STRUCT: "STRUCT", BTF_KIND_UNION: "UNION",
    BTF_KIND_ENUM: "ENUM", BTF_KIND_FWD: "FWD", BTF_KIND_TYPEDEF: "TYPEDEF",
    BTF_KIND_VOLATILE: "VOLATILE", BTF_KIND_CONST: "CONST",
    BTF_KIND_RESTRICT: "RESTRICT", BTF_KIND_FUNC: "FUNC",
    BTF_KIND_FUNC_PROTO: "FUNC_PROTO", BTF_KIND_VAR: "VAR",
    BTF_KIND_DATASEC: "DATASEC", BTF_KIND_FLOAT: "FLOAT",
    BTF_KIND_DECL_TAG: "DECL_TAG", BTF_KIND_TYPE_TAG: "TYPE_TAG",
    BTF_KIND_ENUM64: "ENUM64",
}

# u32 words that follow struct btf_type, as (fixed, per vlen item):
#   INT       __u32 encoding/offset/bits
#   ARRAY     struct btf_array { __u32 type; __u32 index_type; __u32 nelems; }
#   STRUCT/UNION  vlen x struct btf_member { __u32 name_off; __u32 type; __u32 offset; }
#   ENUM      vlen x struct btf_enum { __u32 name_off; __s32 val; }
#   FUNC_PROTO vlen x struct btf_param { __u32 name_off; __u32 type; }
#   VAR       struct btf_var { __u32 linkage; }
#   DATASEC   vlen x struct btf_var_secinfo { __u32 type; __u32 offset; __u32 size; }
#   DECL_TAG  struct btf_decl_tag { __s32 component_idx; }
#   ENUM64    vlen x struct btf_enum64 { __u32 name_off; __u32 val_lo32; __u32 val_hi32; }
_EXTRA_WORDS: Dict[int, Tuple[int, int]] = {
    BTF_KIND_INT: (1, 0),
    BTF_KIND_ARRAY: (3, 0),
    BTF_KIND_STRUCT: (0, 3),
    BTF_KIND_UNION: (0, 3),
    BTF_KIND_ENUM: (0, 2),
    BTF_KIND_FUNC_PROTO: (0, 2),
    BTF_KIND_VAR: (1, 0),
    BTF_KIND_DATASEC: (0, 3),
    BTF_KIND_DECL_TAG: (1, 0),
    BTF_KIND_ENUM64: (0, 3),
}

_NATIVE_U32 = struct.Struct("=I")  # a word of the type section as the array holds it

# Kinds that only qualify or rename another type.
_TRANSPARENT = (BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST,
                BTF_KIND_RESTRICT, BTF_KIND_TYPE_TAG)

POINTER_SIZE = 8 if sys.maxsize > 2 ** 32 else 4

#: Longest chain of references followed (typedefs and qualifiers, nested
#: arrays, anonymous members); the kernel's own limit (MAX_RESOLVE_DEPTH) is 32.
MAX_CHAIN = 64


class BTFType(NamedTuple):
    id: int
    kind: int
    name: str
    kind_flag: bool
    vlen: int
    size_or_type: int  # byte size for INT/STRUCT/UNION/ENUM/..., referenced id otherwise


class Member(NamedTuple):
    """A struct/union member.  ``bit_offset`` is from the start of the outermost
    struct asked about (anonymous members are flattened into it)."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 when not a bitfield

    @property
    def offset(self) -> int:
        """Byte offset (of the containing storage unit's byte, for bitfields)."""
        return self.bit_offset // 8

    @property
    def is_bitfield(self) -> bool:
        return self.bitfield_size != 0


class Param(NamedTuple):
    name: str
    type_id: int


class BTF:
    """A parsed BTF blob; ids and names as the kernel numbers them."""

    def __init__(self, data: bytes, source: str = "BTF", lazy: bool = False) -> None:
        """``lazy``: scan the type records only as far as the ids and names
        asked for (vmlinux: the handful of structs a capture needs sit in
        the first ~15k of ~130k types; the whole scan was 40 ms of start-up).
        Otherwise the whole section is scanned and checked here."""
        self.source = source
        if len(data) < BTF_HEADER.size:
            raise BPFError("%s: too short for a BTF header" % source, errno.EINVAL)
        magic, version, flags, hdr_len, type_off, type_len, str_off, str_len = \
            BTF_HEADER.unpack_from(data)
        if magic != BTF_MAGIC:
            raise BPFError("%s: bad BTF magic 0x%04x (big-endian or not BTF)" % (source, magic),
                           errno.EINVAL)
        self.version = version
        self.flags = flags
        if not BTF_HEADER.size <= hdr_len <= len(data):
            raise BPFError("%s: bad BTF header length %d" % (source, hdr_len), errno.EINVAL)
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(data) or s0 + str_len > len(data) or type_len % 4:
            raise BPFError("%s: BTF sections run past the end of the data" % source, errno.EINVAL)
        strs = bytes(data[s0:s0 + str_len])
        # As the kernel checks (btf_parse_str_sec): offset 0 is "", and the
        # last string is terminated, so every offset inside has an end.
        if not strs or strs[0] != 0 or strs[-1] != 0:
            raise BPFError("%s: BTF string section must start and end with NUL" % source,
                           errno.EINVAL)
        if isinstance(data, mmap.mmap) and sys.byteorder == "little":
            # The kernel's own pages, read in place (see load_vmlinux).
            words: Union[array, memoryview] = memoryview(data)[t0:t0 + type_len].cast("I")
        else:
            words = array("I")
            words.frombytes(data[t0:t0 + type_len])
            if sys.byteorder != "little":
                words.byteswap()
        self._w = words
        self._strs = strs
        # _offsets: word offset of every type scanned so far (index = id);
        # _names: their name_offs as one byte string (for _ids_named).
        self._offsets = array("I", [0])
        self._names = bytes(4)  # id 0 is void, no record
        self._pos = 0           # word offset of the first record not scanned yet
        if lazy:
            self._data, self._t0 = data, t0
        else:
            self._scan_to(len(words))
        self._found: Dict[object, object] = {}  # find_all's answers by name, first's by (name, kind)
        self._members: Dict[int, List[Member]] = {}  # members()' answers by struct id

    def _scan_to(self, word: int) -> None:
        """Scan records until the one holding word ``word`` of the type
        section (or the end) is scanned."""
        if self._pos > word or self._pos >= len(self._w):
            return
        offsets, names, self._pos = self._scan(self._w, self._pos, word, self.source)
        self._offsets.extend(offsets)
        self._names += names

    def _scan_all(self) -> None:
        self._scan_to(len(self._w))

    @staticmethod
    def _scan(w: array, pos: int, word: int, source: str = "BTF") -> Tuple[array, bytes, int]:
        """From the record at word ``pos`` until the record holding word
        ``word`` is scanned: the word offset of each record (in id order),
        the bytes of each one's name_off (for _ids_named), and where the
        next record starts.

        ~130k iterations for all of vmlinux: the loop body has no bounds
        check; a last record cut inside its btf_type fails the final index
        instead.  The name_off is gathered here, where the record is at
        hand, rather than in a second pass over the offsets.
        """
        offsets = array("I")
        names = array("I")
        append, append_name = offsets.append, names.append
        # By kind (5 bits): (3 + fixed extra words, extra words per vlen item).
        sizes = [(3 + _EXTRA_WORDS.get(k, (0, 0))[0], _EXTRA_WORDS.get(k, (0, 0))[1]) for k in range(32)]
        end = len(w)
        stop = min(word + 1, end)
        try:
            while pos < stop:
                append(pos)
                append_name(w[pos])
                info = w[pos + 1]
                fixed, per_item = sizes[(info >> 24) & 0x1F]
                pos += fixed + per_item * (info & 0xFFFF)
        except IndexError:
            pos = -1
        if pos < 0 or pos > end or (stop == end and pos != end):
            raise BPFError("%s: BTF type section ends inside a type record" % source, errno.EINVAL)
        return offsets, names.tobytes(), pos

    @classmethod
    def load_vmlinux(cls, path: str = VMLINUX_PATH) -> "BTF":
        """The running kernel's BTF; a BPFError naming the cause if there is none.

        Mapped where the kernel allows it (private and read-only, Linux
        6.16+): the type records are then read in place, and only the pages
        of the types asked for are touched, instead of reading all ~5 MB
        (5 ms of start-up); else read."""
        try:
            with open(path, "rb") as f:
                try:
                    size = os.fstat(f.fileno()).st_size
                    return cls(mmap.mmap(f.fileno(), size, mmap.MAP_PRIVATE, mmap.PROT_READ), path, lazy=True)
                except (OSError, ValueError):
                    pass
                data = f.read()
        except FileNotFoundError:
            raise BPFError("this kernel has no BTF (%s is missing): it needs "
                           "CONFIG_DEBUG_INFO_BTF=y (Linux 5.4+)" % path, errno.ENOENT) from None
        except PermissionError:
            raise BPFError("cannot read %s: permission denied" % path, errno.EACCES) from None
        return cls(data, path, lazy=True)

    # -- raw access -----------------------------------------------------------

    def __len__(self) -> int:
        """Number of type ids, counting void (id 0)."""
        self._scan_all()
        return len(self._offsets)

    def string(self, off: int) -> str:
        if off >= len(self._strs):
            raise BPFError("%s: string offset %d past the string section (%d bytes)"
                           % (self.source, off, len(self._strs)), errno.EINVAL)
        end = self._strs.find(b"\0", off)  # found: the section ends with NUL
        return self._strs[off:end].decode("utf-8", "replace")

    def type(self, type_id: int) -> BTFType:
        if type_id == 0:
            return BTFType(0, BTF_KIND_UNKN, "void", False, 0, 0)
        if type_id >= len(self._offsets):
            self._scan_until_id(type_id)
        if not 0 < type_id < len(self._offsets):
            raise BPFError("%s: no BTF type id %d" % (self.source, type_id), errno.ENOENT)
        p = self._offsets[type_id]
        w = self._w
        name_off, info, st = w[p], w[p + 1], w[p + 2]
        return BTFType(type_id, (info >> 24) & 0x1F, self.string(name_off) if name_off else "",
                       bool(info >> 31), info & 0xFFFF, st)

    def _scan_until_id(self, type_id: int) -> None:
        """Scan until type ``type_id`` is known (or the section ends)."""
        while len(self._offsets) <= type_id and self._pos < len(self._w):
            # At least 3 words per record: this many more words hold at most
            # the missing records.
            self._scan_to(self._pos + 3 * (type_id + 1 - len(self._offsets)) - 1)

    def _extra(self, type_id: int, i: int) -> int:
        """The i-th u32 word after type ``type_id``'s btf_type."""
        if type_id >= len(self._offsets):
            self._scan_until_id(type_id)
        return self._w[self._offsets[type_id] + 3 + i]

    # -- names ------------------------------------------------------------------

    def _ids_named(self, name_off: int, first: int = 1) -> List[int]:
        """The scanned type ids from ``first`` on whose name is the string at
        ``name_off``.

        Why not a dict of every type's name: building it walked all the
        vmlinux types (~130k) in Python for the few names a run asks about.
        Each scanned type's name_off is in one byte string and the word is
        searched in it; a hit's position is the type id."""
        raw = self._names
        needle = _NATIVE_U32.pack(name_off)
        ids: List[int] = []
        pos = raw.find(needle, 4 * first)
        while pos >= 0:
            if not pos & 3:
                ids.append(pos >> 2)
            pos = raw.find(needle, pos + 1)
        return ids

    def _kind_of(self, type_id: int) -> int:
        return (self._w[self._offsets[type_id] + 1] >> 24) & 0x1F

    def find_all(self, name: str, kind: Optional[int] = None) -> List[int]:
        """Every type id called ``name`` (of ``kind`` if given), lowest first
        (the whole type section is scanned: find() is what a lazy BTF
        wants).

        Each name's ids are kept: a search reads the whole string section."""
        ids = self._found.get(name)
        if ids is None:
            self._scan_all()
            ids = []
            for off in string_offsets(self._strs, name):
                ids.extend(self._ids_named(off))
            self._found[name] = ids
        if kind is not None:
            return sorted(t for t in ids if self._kind_of(t) == kind)
        return sorted(ids)

    # Words scanned per step of a lazy find (~2,000 records).
    FIND_STEP_WORDS = 1 << 13

    def first(self, name: str, kind: Optional[int] = None) -> Optional[int]:
        """The lowest type id called ``name`` (of ``kind``), or None.

        A lazy BTF is scanned only until it turns up: the types a capture
        asks for are among the first ~15k of vmlinux's ~130k."""
        key = (name, kind)
        if key in self._found:
            return self._found[key]
        offs = string_offsets(self._strs, name)
        start = 1
        found = None
        while offs:
            hits = sorted(t for off in offs for t in self._ids_named(off, start)
                          if kind is None or self._kind_of(t) == kind)
            if hits:
                found = hits[0]
                break
            if self._pos >= len(self._w):
                break
            start = len(self._offsets)
            self._scan_to(self._pos + self.FIND_STEP_WORDS)
        self._found[key] = found
        return found

    def find(self, name: str, kind: Optional[int] = None) -> int:
        """The id of the type ``name`` (of ``kind``); BPFError if there is none.

        A struct may also exist as a FWD declaration; asking for the kind
        avoids picking that.
        """
        found = self.first(name, kind)
        if found is None:
            raise BPFError("%s has no %s named %r" % (
                self.source, KIND_NAMES.get(kind, "type").lower() if kind is not None else "type",
                name), errno.ENOENT)
        return found

    # -- type structure ---------------------------------------------------------

    def resolve(self, type_id: int) -> int:
        """Follow typedefs and const/volatile/restrict/type tags to the real type."""
        for _ in range(MAX_CHAIN):
            t = self.type(type_id)
            if t.kind not in _TRANSPARENT:
                return type_id
            type_id = t.size_or_type
        raise BPFError("%s: typedef loop at id %d" % (self.source, type_id), errno.ELOOP)

    def size_of(self, type_id: int) -> int:
        """sizeof() the type, in bytes."""
        count = 1  # elements of the arrays walked through so far
        for _ in range(MAX_CHAIN):
            tid = self.resolve(type_id)
            t = self.type(tid)
            if t.kind in (BTF_KIND_INT, BTF_KIND_STRUCT, BTF_KIND_UNION, BTF_KIND_ENUM,
                          BTF_KIND_ENUM64, BTF_KIND_FLOAT, BTF_KIND_DATASEC):
                return count * t.size_or_type
            if t.kind == BTF_KIND_PTR:
                return count * POINTER_SIZE
            if t.kind != BTF_KIND_ARRAY:
                raise BPFError("%s: type %d (%s %r) has no size" % (
                    self.source, tid, KIND_NAMES.get(t.kind, t.kind), t.name), errno.EINVAL)
            count *= self._extra(tid, 2)  # struct btf_array: type, index_type, nelems
            type_id = self._extra(tid, 0)
        raise BPFError("%s: arrays nested deeper than %d at id %d" % (self.source, MAX_CHAIN, type_id),
                       errno.ELOOP)

    def int_encoding(self, type_id: int) -> Tuple[int, int, int]:
        """(encoding, bit offset, bits) of a BTF_KIND_INT."""
        v = self._extra(type_id, 0)
        return (v >> 24) & 0x0F, (v >> 16) & 0xFF, v & 0xFF

    def members(self, type_id: Union[str, int]) -> List[Member]:
        """The direct members of a struct or union (a name or an id; typedefs resolved)."""
        tid = self.resolve(self._struct_id(type_id))
        # Decoded once per struct: a start-up asks task_struct (~250
        # members, each resolved for old-style bitfields) for a dozen.
        known = self._members.get(tid)
        if known is not None:
            return list(known)
        t = self.type(tid)
        if t.kind not in (BTF_KIND_STRUCT, BTF_KIND_UNION):
            raise BPFError("%s: type %d (%r) is a %s, not a struct or union" % (
                self.source, tid, t.name, KIND_NAMES.get(t.kind, t.kind)), errno.EINVAL)
        out = []
        for i in range(t.vlen):
            name_off, mtype, moff = (self._extra(tid, 3 * i + j) for j in range(3))
            if t.kind_flag:
                bit_off, bits = moff & 0xFFFFFF, moff >> 24
            else:
                bit_off, bits = moff, 0
                # Old-style bitfields: an INT narrower than its storage.
                r = self.resolve(mtype)
                rt = self.type(r)
                if rt.kind == BTF_KIND_INT:
                    _enc, ioff, nbits = self.int_encoding(r)
                    if nbits != rt.size_or_type * 8 or ioff:
                        bit_off, bits = bit_off + ioff, nbits
            out.append(Member(self.string(name_off) if name_off else "", mtype, bit_off, bits))
        self._members[tid] = out
        return list(out)

    def _find_member(self, type_id: int, name: str, base: int,
                     searched: Optional[set] = None, depth: int = 0) -> Optional[Member]:
        """``name`` among the members of ``type_id``, anonymous ones flattened.

        ``searched`` holds the structs already searched for ``name`` in this
        lookup: whether a struct has the member does not depend on where it
        is embedded, so each is searched once (no cycles, no exponential
        walks through structs embedded many times), and nesting is bounded.
        """
        if searched is None:
            searched = {self.resolve(type_id)}
        if depth >= MAX_CHAIN:
            raise BPFError("%s: anonymous members nested deeper than %d" % (self.source, MAX_CHAIN),
                           errno.ELOOP)
        for m in self.members(type_id):
            if m.name == name:
                return m._replace(bit_offset=base + m.bit_offset)
            if not m.name:  # anonymous struct/union: its members are ours
                inner = self.resolve(m.type_id)
                if inner in searched:
                    continue
                if self.type(inner).kind in (BTF_KIND_STRUCT, BTF_KIND_UNION):
                    searched.add(inner)
                    found = self._find_member(inner, name, base + m.bit_offset, searched, depth + 1)
                    if found is not None:
                        return found
        return None

    def member(self, struct: Union[str, int], path: str) -> Member:
        """The member at ``path`` ("pid", "se.sum_exec_runtime") of a struct.

        ``struct`` is a name (looked up as a STRUCT, then a UNION) or an id.
        The offset is from the start of ``struct``; BPFError if absent.
        """
        tid = self._struct_id(struct)
        base = 0
        found: Optional[Member] = None
        for part in path.split("."):
            if found is not None:
                tid = found.type_id
                base = found.bit_offset
            found = self._find_member(tid, part, base)
            if found is None:
                raise BPFError("%s: %s has no member %r" % (
                    self.source, self.type(self.resolve(tid)).name or "type %d" % tid, part),
                    errno.ENOENT)
        assert found is not None
        return found

    def member_any(self, struct: Union[str, int], *paths: str) -> Member:
        """The first of ``paths`` that exists (e.g. "__state", "state")."""
        for p in paths:
            try:
                return self.member(struct, p)
            except BPFError:
                continue
        raise BPFError("%s: %r has none of the members %s" % (
            self.source, struct, ", ".join(paths)), errno.ENOENT)

    def member_size(self, m: Member) -> int:
        """Bytes of a member's type (its storage unit for a bitfield)."""
        return self.size_of(m.type_id)

    def _struct_id(self, struct: Union[str, int]) -> int:
        if isinstance(struct, int):
            return struct
        found = self.first(struct, BTF_KIND_STRUCT)
        if found is None:
            found = self.first(struct, BTF_KIND_UNION)
        if found is None:
            raise BPFError("%s has no struct or union named %r" % (self.source, struct),
                           errno.ENOENT)
        return found

    def params(self, type_id: int) -> List[Param]:
        """Parameters of a FUNC_PROTO, reached through FUNC, pointers and typedefs."""
        tid = type_id
        for _ in range(16):
            tid = self.resolve(tid)
            t = self.type(tid)
            if t.kind == BTF_KIND_FUNC_PROTO:
                return [Param(self.string(self._extra(tid, 2 * i)),
                              self._extra(tid, 2 * i + 1)) for i in range(t.vlen)]
            if t.kind in (BTF_KIND_PTR, BTF_KIND_FUNC):
                tid = t.size_or_type
                continue
            break
        raise BPFError("%s: type %d is not a function" % (self.source, type_id), errno.EINVAL)

    # -- tracing ----------------------------------------------------------------

    def raw_tp_btf_id(self, tracepoint: str) -> int:
        """The attach_btf_id for a tp_btf program on ``tracepoint`` ("sched_switch"):
        the id of the kernel's ``btf_trace_<tracepoint>`` typedef."""
        return self.find("btf_trace_" + tracepoint, BTF_KIND_TYPEDEF)

    def raw_tp_args(self, tracepoint: str) -> List[Param]:
        """The tracepoint's arguments as a tp_btf / raw_tp program sees them:
        ctx[i] (u64) is the i-th; the leading ``void *__data`` is not passed
        to programs and is dropped here.

        pahole leaves the typedef's parameters unnamed, so the names come from
        the kernel function ``__bpf_trace_<tracepoint>``, which has the same
        prototype with names, when it is in BTF.
        """
        args = self.params(self.raw_tp_btf_id(tracepoint))[1:]
        func = self.first("__bpf_trace_" + tracepoint, BTF_KIND_FUNC)
        if func is not None:
            named = self.params(func)[1:]
            if len(named) == len(args):
                args = [a._replace(name=n.name) for a, n in zip(args, named)]
        return args

    def raw_tp_arg_index(self, tracepoint: str, arg: str) -> int:
        for i, p in enumerate(self.raw_tp_args(tracepoint)):
            if p.name == arg:
                return i
        raise BPFError("%s: tracepoint %s has no argument %r" % (self.source, tracepoint, arg),
                       errno.ENOENT)


_vmlinux: Optional[BTF] = None


def vmlinux() -> BTF:
    """The running kernel's BTF, parsed once per process."""
    global _vmlinux
    if _vmlinux is None:
        _vmlinux = BTF.load_vmlinux()
    return _vmlinux


def kernel_has_btf(path: str = VMLINUX_PATH) -> bool:
    return os.path.exists(path)
