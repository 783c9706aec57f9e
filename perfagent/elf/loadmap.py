"""File offset <-> link-time virtual address translation through PT_LOAD.

Why offsets and not mapping start addresses
-------------------------------------------
A sampled runtime address ``addr`` lies in some mapping ``[start, end)`` of
``/proc/PID/maps`` whose file offset is ``pgoff``.  The byte it points at is
at file offset ``addr - start + pgoff``, whatever the binary's layout, and the
PT_LOAD segment covering that offset says which link-time address (the
``p_vaddr`` space that ``st_value`` uses) it has::

    vaddr = offset - p_offset + p_vaddr

This one rule is correct for non-PIE executables (bias 0), PIE executables
and shared objects (any bias), and ``-z separate-code`` layouts where the code
segment is neither the first mapping nor at file offset 0.  Deriving a bias
from ``start`` and the *first* segment instead breaks on the latter.

Translate the sampled address's offset, not the mapping's ``pgoff``: a
page-aligned ``pgoff`` may fall in the page shared by two segments.
"""

import mmap
from typing import Iterable, List, Optional, Tuple

from .constants import PT_LOAD

# The loader maps each PT_LOAD from its page-rounded-down file offset, so the
# bytes just before p_offset are mapped at the same displacement.
_PAGE_MASK = ~(mmap.PAGESIZE - 1)

#: PT_LOAD segments kept.  Binaries have 2-5; lookups scan them once per
#: sampled frame, so a hostile file with a million must not make every
#: frame of its process cost a million compares (its other segments'
#: addresses simply do not translate).
MAX_LOAD_SEGMENTS = 64


class LoadMap:
    """The PT_LOAD segments of one file, reduced to what translation needs.

    Kept separate from :class:`ELFFile` so a symbolizer can drop the file (and
    its mmap) after parsing and still translate addresses.
    """

    __slots__ = ("_loads",)

    def __init__(self, segments: Iterable) -> None:
        # (p_offset, p_offset + p_filesz, p_vaddr) per file-backed PT_LOAD;
        # plain tuples, scanned in order: binaries have 2-5 of them.
        loads: List[Tuple[int, int, int]] = []
        for seg in segments:
            if seg.p_type == PT_LOAD and seg.p_filesz > 0:
                loads.append((seg.p_offset, seg.p_offset + seg.p_filesz, seg.p_vaddr))
                if len(loads) == MAX_LOAD_SEGMENTS:
                    break
        self._loads = tuple(loads)

    def __bool__(self) -> bool:
        return bool(self._loads)

    def __repr__(self) -> str:
        parts = ", ".join(
            "off %#x-%#x -> %#x" % (lo, hi, vaddr) for lo, hi, vaddr in self._loads
        )
        return "LoadMap(%s)" % parts

    def offset_to_vaddr(self, file_offset: int) -> Optional[int]:
        """The p_vaddr-space address of ``file_offset``, or None if unmapped.

        An offset inside a segment's file bytes wins; failing that, the
        page-aligned lead-in the loader maps before ``p_offset`` is accepted.
        """
        for lo, hi, vaddr in self._loads:
            if lo <= file_offset < hi:
                return file_offset - lo + vaddr
        for lo, hi, vaddr in self._loads:
            if (lo & _PAGE_MASK) <= file_offset < hi:
                return file_offset - lo + vaddr
        return None

    def vaddr_to_offset(self, vaddr: int) -> Optional[int]:
        """The file offset holding link-time address ``vaddr``, or None.

        Addresses in a segment's zero-filled tail (p_memsz beyond p_filesz,
        i.e. .bss) have no file offset.
        """
        for lo, hi, seg_vaddr in self._loads:
            if seg_vaddr <= vaddr < seg_vaddr + (hi - lo):
                return vaddr - seg_vaddr + lo
        return None
