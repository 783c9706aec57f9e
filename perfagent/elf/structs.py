"""Precompiled ``struct.Struct`` layouts of the ELF structures.

Every structure exists in four flavours (ELFCLASS32/64 x LSB/MSB).  They are
compiled once at import; :func:`layouts_for` hands the reader the set that
matches a file's ``e_ident`` so the parse code never builds a format string.

The 32-bit and 64-bit program header and symbol entries order their fields
differently (the 64-bit ones group the 4-byte fields for alignment), so each
flavour also records where in the unpacked tuple each spec field lands.
"""

import struct
from typing import Dict, Tuple

from .constants import ELFCLASS32, ELFCLASS64

# typedef struct {
#     unsigned char e_ident[EI_NIDENT];
#     Elf64_Half    e_type;       Elf64_Half    e_machine;
#     Elf64_Word    e_version;    Elf64_Addr    e_entry;
#     Elf64_Off     e_phoff;      Elf64_Off     e_shoff;
#     Elf64_Word    e_flags;      Elf64_Half    e_ehsize;
#     Elf64_Half    e_phentsize;  Elf64_Half    e_phnum;
#     Elf64_Half    e_shentsize;  Elf64_Half    e_shnum;
#     Elf64_Half    e_shstrndx;
# } Elf64_Ehdr;                                             (64 bytes)
# Elf32_Ehdr is the same with 4-byte Elf32_Addr/Elf32_Off.   (52 bytes)
_EHDR64 = "16sHHIQQQIHHHHHH"
_EHDR32 = "16sHHIIIIIHHHHHH"

# typedef struct {
#     Elf64_Word  p_type;    Elf64_Word  p_flags;
#     Elf64_Off   p_offset;  Elf64_Addr  p_vaddr;   Elf64_Addr  p_paddr;
#     Elf64_Xword p_filesz;  Elf64_Xword p_memsz;   Elf64_Xword p_align;
# } Elf64_Phdr;                                             (56 bytes)
_PHDR64 = "IIQQQQQQ"
# typedef struct {
#     Elf32_Word p_type;   Elf32_Off  p_offset;  Elf32_Addr p_vaddr;
#     Elf32_Addr p_paddr;  Elf32_Word p_filesz;  Elf32_Word p_memsz;
#     Elf32_Word p_flags;  Elf32_Word p_align;
# } Elf32_Phdr;                                             (32 bytes)
_PHDR32 = "IIIIIIII"

# typedef struct {
#     Elf64_Word  sh_name;   Elf64_Word  sh_type;   Elf64_Xword sh_flags;
#     Elf64_Addr  sh_addr;   Elf64_Off   sh_offset; Elf64_Xword sh_size;
#     Elf64_Word  sh_link;   Elf64_Word  sh_info;
#     Elf64_Xword sh_addralign;  Elf64_Xword sh_entsize;
# } Elf64_Shdr;                                             (64 bytes)
_SHDR64 = "IIQQQQIIQQ"
# Elf32_Shdr: the same ten fields, all 4 bytes wide.        (40 bytes)
_SHDR32 = "IIIIIIIIII"

# typedef struct {
#     Elf64_Word    st_name;   unsigned char st_info;  unsigned char st_other;
#     Elf64_Section st_shndx;  Elf64_Addr    st_value; Elf64_Xword   st_size;
# } Elf64_Sym;                                              (24 bytes)
_SYM64 = "IBBHQQ"
# typedef struct {
#     Elf32_Word    st_name;   Elf32_Addr    st_value; Elf32_Word    st_size;
#     unsigned char st_info;   unsigned char st_other; Elf32_Section st_shndx;
# } Elf32_Sym;                                              (16 bytes)
_SYM32 = "IIIBBH"

# typedef struct {
#     Elf64_Word n_namesz;  Elf64_Word n_descsz;  Elf64_Word n_type;
# } Elf64_Nhdr;   (Elf32_Nhdr is identical: 12 bytes in both classes)
_NHDR = "III"

# typedef struct {
#     Elf64_Sxword d_tag;
#     union { Elf64_Xword d_val; Elf64_Addr d_ptr; } d_un;
# } Elf64_Dyn;                                              (16 bytes)
_DYN64 = "qQ"
# Elf32_Dyn: Elf32_Sword d_tag; Elf32_Word d_val.            (8 bytes)
_DYN32 = "iI"

# typedef struct {
#     Elf64_Word ch_type;  Elf64_Word ch_reserved;
#     Elf64_Xword ch_size; Elf64_Xword ch_addralign;
# } Elf64_Chdr;                                             (24 bytes)
_CHDR64 = "IIQQ"
# typedef struct {
#     Elf32_Word ch_type;  Elf32_Word ch_size;  Elf32_Word ch_addralign;
# } Elf32_Chdr;                                             (12 bytes)
_CHDR32 = "III"

# Index of each Elf_Phdr spec field in the unpacked tuple, in the order
# (p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align).
_PHDR64_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)
_PHDR32_ORDER = (0, 6, 1, 2, 3, 4, 5, 7)

# Index of each Elf_Sym spec field in the unpacked tuple, in the order
# (st_name, st_info, st_other, st_shndx, st_value, st_size).
_SYM64_ORDER = (0, 1, 2, 3, 4, 5)
_SYM32_ORDER = (0, 3, 4, 5, 1, 2)
# Byte offset of st_info in an Elf64_Sym / Elf32_Sym (see above).
_SYM64_INFO_OFF = 4
_SYM32_INFO_OFF = 12


class ElfLayouts:
    """The compiled structures for one (class, byte order) combination."""

    __slots__ = (
        "elfclass", "little_endian", "Ehdr", "Phdr", "Shdr", "Sym", "Nhdr",
        "Dyn", "Chdr", "Word", "phdr_order", "sym_order", "sym_info_off",
    )

    def __init__(self, elfclass: int, little_endian: bool) -> None:
        is64 = elfclass == ELFCLASS64
        order = "<" if little_endian else ">"
        self.elfclass = elfclass
        self.little_endian = little_endian
        self.Ehdr = struct.Struct(order + (_EHDR64 if is64 else _EHDR32))
        self.Phdr = struct.Struct(order + (_PHDR64 if is64 else _PHDR32))
        self.Shdr = struct.Struct(order + (_SHDR64 if is64 else _SHDR32))
        self.Sym = struct.Struct(order + (_SYM64 if is64 else _SYM32))
        self.sym_info_off = _SYM64_INFO_OFF if is64 else _SYM32_INFO_OFF
        self.Nhdr = struct.Struct(order + _NHDR)
        self.Dyn = struct.Struct(order + (_DYN64 if is64 else _DYN32))
        self.Chdr = struct.Struct(order + (_CHDR64 if is64 else _CHDR32))
        # The CRC32 word that ends a .gnu_debuglink section.
        self.Word = struct.Struct(order + "I")
        self.phdr_order = _PHDR64_ORDER if is64 else _PHDR32_ORDER
        self.sym_order = _SYM64_ORDER if is64 else _SYM32_ORDER


_LAYOUTS: Dict[Tuple[int, bool], ElfLayouts] = {
    (cls, little): ElfLayouts(cls, little)
    for cls in (ELFCLASS32, ELFCLASS64)
    for little in (True, False)
}


def layouts_for(elfclass: int, little_endian: bool) -> ElfLayouts:
    """The layouts for a validated EI_CLASS / EI_DATA pair."""
    return _LAYOUTS[(elfclass, little_endian)]
