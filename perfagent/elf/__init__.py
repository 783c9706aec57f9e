"""Read-only ELF parsing for symbolization: headers, symbols, notes, load map.

The public surface is :class:`ELFFile` and the record types it returns; the
constants live in :mod:`perfagent.elf.constants`.
"""

from .elffile import ELFFile, ELFHeader, Note, Section, Segment, Symbol
from .loadmap import LoadMap

__all__ = ["ELFFile", "ELFHeader", "LoadMap", "Note", "Section", "Segment", "Symbol"]
