"""Content-addressed stack stores: the kernel side's maps and user space's cache.

A stack store is a BPF hash map from a 64-bit hash of a stack's words to the
stack itself (``struct stack`` or ``struct pystack``, see :mod:`.layout`).
The program computes the hash (FNV-1a over the 64-bit words, see
:func:`fnv1a_words`, which user space uses to check what it reads) and
inserts with BPF_NOEXIST; count keys and off-CPU records carry the hash.
Hash 0 means "no stack".

User space drains a store every cycle with lookup-and-delete: the entries
go into :class:`StoreCache` and leave the kernel map, which so holds at
most one cycle's distinct stacks.  A stack seen again is simply inserted
again.  Since keys come from contents, a deleted key can never come back
naming another stack (a 64-bit collision aside: about n^2 / 2^65 for n
distinct stacks, 3e-8 for a million).
"""

from __future__ import annotations

import struct
from typing import Dict, Optional, Set, Tuple

from perfagent.bpf.maps import HashMap
from perfagent.stackprog.layout import (
    PERF_MAX_STACK_DEPTH, PY_MAX_FRAMES, PYFRAME, PYSTACK_HDR, PYSTACK_SIZE, STACK_IPS_OFF, STACK_SIZE,
)

FNV_OFFSET_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1

HASH_KEY = struct.Struct("<Q")

#: Distinct stacks one drain cycle may bring (per store); beyond, inserts
#: fail and the counts that need them are counted as lost stacks.
DEFAULT_STORE_ENTRIES = 16384


def fnv1a_words(words) -> int:
    """The programs' hash of a sequence of u64 words (0 stays "no stack")."""
    h = FNV_OFFSET_BASIS
    n = 0
    for w in words:
        h = ((h ^ w) * FNV_PRIME) & MASK64
        n += 1
    return h if n else 0


PyFrame = Tuple[int, int, int]   # (code or link address, instr, flags)


class StoreCache:
    """What user space has drained from the stores: hash -> stack.

    ``native(h)`` gives a tuple of instruction pointers (leaf first) and
    ``python(h)`` a (frames, flags) pair, frames as (code, instr, flags)
    leaf first (perfagent.stackprog.layout: struct pyframe); a hash that was never seen (its insert failed: the
    store was full) gives None and is counted in ``lost``.

    Two generations, so a long run holds only what the next collection
    can ask for (:meth:`rotate`), not every stack it ever drained.
    """

    def __init__(self) -> None:
        self._native: Dict[int, Tuple[int, ...]] = {}
        self._python: Dict[int, Tuple[Tuple[PyFrame, ...], int]] = {}
        self._old_native: Dict[int, Tuple[int, ...]] = {}
        self._old_python: Dict[int, Tuple[Tuple[PyFrame, ...], int]] = {}
        self.lost = 0

    # Hot path: a collection drains the stacks stored since the previous
    # one -- mostly the same stacks again.  The key is a hash of the
    # contents, so a stack drained before is taken as decoded then (from
    # this generation or the last), and only new ones are unpacked.

    def add_native(self, raw_key: bytes, raw_value: bytes) -> None:
        h = HASH_KEY.unpack(raw_key)[0]
        known = self._old_native.get(h)
        if known is None:
            n = min(_U32.unpack_from(raw_value, 0)[0], PERF_MAX_STACK_DEPTH)
            known = _ips(n).unpack_from(raw_value, STACK_IPS_OFF)
        self._native[h] = known

    def add_python(self, raw_key: bytes, raw_value: bytes) -> None:
        h = HASH_KEY.unpack(raw_key)[0]
        known = self._old_python.get(h)
        self._python[h] = known if known is not None else decode_pystack(raw_value)

    def native(self, h: int) -> Optional[Tuple[int, ...]]:
        if h == 0:
            return ()
        ips = self._native.get(h)
        if ips is None:
            ips = self._old_native.get(h)
            if ips is None:
                self.lost += 1
        return ips

    def python(self, h: int) -> Optional[Tuple[Tuple[PyFrame, ...], int]]:
        if h == 0:
            return (), 0
        got = self._python.get(h)
        if got is None:
            got = self._old_python.get(h)
            if got is None:
                self.lost += 1
        return got

    def rotate(self) -> None:
        """A collection read every count (and then drained the stores):
        what was drained before the previous collection is dropped.

        Only for sources whose counts are the only holders of hashes (the
        on-CPU count map): a count read at collection N was last
        incremented after collection N-1 read it, and the program stores a
        stack before it counts it -- so its stack was either still in the
        kernel store when N-1 drained it (the generation kept) or inserted
        again since (drained by N).  Stores drained at N-2 or before can
        no longer be asked for.  (Off-CPU intervals that stay open across
        collections hold hashes longer: see :meth:`rotate_pinned`.)
        """
        self._old_native, self._native = self._native, {}
        self._old_python, self._python = self._python, {}

    def rotate_pinned(self, native: Set[int], python: Set[int]) -> None:
        """:meth:`rotate` for a source whose open records hold hashes across
        collections (the off-CPU blocked map): the older generation keeps
        what was drained since the last rotation and, from before, only the
        hashes in ``native`` and ``python`` -- those of the intervals still
        open, read by this collection.  A hash an interval holds was stored
        before the interval was recorded, so an interval opened after the
        open ones were listed has its stacks in this collection's drain."""
        old_n, old_p = self._old_native, self._old_python
        kept_n = {h: old_n[h] for h in native if h in old_n and h not in self._native}
        kept_p = {h: old_p[h] for h in python if h in old_p and h not in self._python}
        self._native.update(kept_n)
        self._python.update(kept_p)
        self.rotate()

    def __len__(self) -> int:
        return len(self._native) + len(self._python) + len(self._old_native) + len(self._old_python)


_U32 = struct.Struct("<I")
_IPS: Dict[int, struct.Struct] = {}


def _ips(n: int) -> struct.Struct:
    """The format of a stack's first ``n`` instruction pointers."""
    fmt = _IPS.get(n)
    if fmt is None:
        fmt = _IPS[n] = struct.Struct("<%dQ" % n)
    return fmt


def decode_pystack(raw: bytes, offset: int = 0) -> Tuple[Tuple[PyFrame, ...], int]:
    """(frames leaf first, flags) of a ``struct pystack`` at ``offset``."""
    n, flags = PYSTACK_HDR.unpack_from(raw, offset)
    n = min(n, PY_MAX_FRAMES)
    base = offset + PYSTACK_HDR.size
    return tuple(PYFRAME.unpack_from(raw, base + i * PYFRAME.size) for i in range(n)), flags


def native_store(entries: int = DEFAULT_STORE_ENTRIES, name: str = "stacks") -> HashMap:
    return HashMap(HASH_KEY.size, STACK_SIZE, entries, name=name)


def python_store(entries: int = DEFAULT_STORE_ENTRIES, name: str = "pystacks") -> HashMap:
    return HashMap(HASH_KEY.size, PYSTACK_SIZE, entries, name=name)


def drain_into(cache: StoreCache, native: Optional[HashMap], python: Optional[HashMap]) -> None:
    """Move every stored stack into ``cache`` (and out of the kernel maps)."""
    if native is not None and not native.closed:
        for k, v in native.drain():
            cache.add_native(k, v)
    if python is not None and not python.closed:
        for k, v in python.drain():
            cache.add_python(k, v)
