"""Named ELF constants, spelled as the System V gABI and <elf.h> spell them.

Only the values the reader and the symbolizer act on are here; anything else
is passed through as a plain int so that an unknown type never makes a
binary unreadable.
"""

# --- e_ident ----------------------------------------------------------------
EI_NIDENT = 16
EI_MAG0 = 0
EI_CLASS = 4
EI_DATA = 5
EI_VERSION = 6
EI_OSABI = 7
EI_ABIVERSION = 8

ELFMAG = b"\x7fELF"

ELFCLASSNONE = 0
ELFCLASS32 = 1
ELFCLASS64 = 2

ELFDATANONE = 0
ELFDATA2LSB = 1
ELFDATA2MSB = 2

EV_CURRENT = 1

# --- e_type -----------------------------------------------------------------
ET_NONE = 0
ET_REL = 1
ET_EXEC = 2
ET_DYN = 3
ET_CORE = 4

# --- e_machine (those whose symbols need special treatment) ------------------
EM_386 = 3
EM_ARM = 40
EM_X86_64 = 62
EM_AARCH64 = 183

# --- special section indexes -------------------------------------------------
SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
SHN_ABS = 0xFFF1
SHN_COMMON = 0xFFF2
SHN_XINDEX = 0xFFFF

# e_phnum value meaning "the real count is in section header 0's sh_info".
PN_XNUM = 0xFFFF

# --- p_type -----------------------------------------------------------------
PT_NULL = 0
PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
PT_NOTE = 4
PT_SHLIB = 5
PT_PHDR = 6
PT_TLS = 7
PT_GNU_EH_FRAME = 0x6474E550
PT_GNU_STACK = 0x6474E551
PT_GNU_RELRO = 0x6474E552
PT_GNU_PROPERTY = 0x6474E553

# --- p_flags ----------------------------------------------------------------
PF_X = 0x1
PF_W = 0x2
PF_R = 0x4

# --- sh_type ----------------------------------------------------------------
SHT_NULL = 0
SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_RELA = 4
SHT_HASH = 5
SHT_DYNAMIC = 6
SHT_NOTE = 7
SHT_NOBITS = 8
SHT_REL = 9
SHT_SHLIB = 10
SHT_DYNSYM = 11
SHT_INIT_ARRAY = 14
SHT_FINI_ARRAY = 15
SHT_PREINIT_ARRAY = 16
SHT_GROUP = 17
SHT_SYMTAB_SHNDX = 18

# --- sh_flags ---------------------------------------------------------------
SHF_WRITE = 0x1
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
SHF_COMPRESSED = 0x800

# --- Elf_Chdr.ch_type -------------------------------------------------------
ELFCOMPRESS_ZLIB = 1
ELFCOMPRESS_ZSTD = 2

# --- symbol binding (ELF_ST_BIND) -------------------------------------------
STB_LOCAL = 0
STB_GLOBAL = 1
STB_WEAK = 2
STB_GNU_UNIQUE = 10

# --- symbol type (ELF_ST_TYPE) ----------------------------------------------
STT_NOTYPE = 0
STT_OBJECT = 1
STT_FUNC = 2
STT_SECTION = 3
STT_FILE = 4
STT_COMMON = 5
STT_TLS = 6
STT_GNU_IFUNC = 10

# --- symbol visibility (ELF_ST_VISIBILITY) ----------------------------------
STV_DEFAULT = 0
STV_INTERNAL = 1
STV_HIDDEN = 2
STV_PROTECTED = 3

# --- d_tag ------------------------------------------------------------------
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_SYMTAB = 6
DT_STRSZ = 10
DT_SONAME = 14

# --- notes ------------------------------------------------------------------
NT_GNU_BUILD_ID = 3
ELF_NOTE_GNU = b"GNU"
