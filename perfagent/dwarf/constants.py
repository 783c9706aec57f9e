"""DWARF call-frame constants, spelled as the DWARF 5 specification (7.23,
7.24, 7.7.1) and the LSB .eh_frame chapter spell them.

Only the names the CFI decoder needs are defined; the values are the ones in
the specification's tables, not derived, so a reader can check them line by
line against the spec.
"""

# --- DW_CFA_*: call frame instructions (DWARF 5 table 7.29) ------------------
# The three "primary" opcodes keep their operand in the low six bits.
DW_CFA_advance_loc = 0x40
DW_CFA_offset = 0x80
DW_CFA_restore = 0xC0
DW_CFA_PRIMARY_MASK = 0xC0
DW_CFA_OPERAND_MASK = 0x3F

DW_CFA_nop = 0x00
DW_CFA_set_loc = 0x01
DW_CFA_advance_loc1 = 0x02
DW_CFA_advance_loc2 = 0x03
DW_CFA_advance_loc4 = 0x04
DW_CFA_offset_extended = 0x05
DW_CFA_restore_extended = 0x06
DW_CFA_undefined = 0x07
DW_CFA_same_value = 0x08
DW_CFA_register = 0x09
DW_CFA_remember_state = 0x0A
DW_CFA_restore_state = 0x0B
DW_CFA_def_cfa = 0x0C
DW_CFA_def_cfa_register = 0x0D
DW_CFA_def_cfa_offset = 0x0E
DW_CFA_def_cfa_expression = 0x0F
DW_CFA_expression = 0x10
DW_CFA_offset_extended_sf = 0x11
DW_CFA_def_cfa_sf = 0x12
DW_CFA_def_cfa_offset_sf = 0x13
DW_CFA_val_offset = 0x14
DW_CFA_val_offset_sf = 0x15
DW_CFA_val_expression = 0x16
DW_CFA_lo_user = 0x1C
DW_CFA_MIPS_advance_loc8 = 0x1D
DW_CFA_GNU_window_save = 0x2D
DW_CFA_GNU_args_size = 0x2E
DW_CFA_GNU_negative_offset_extended = 0x2F
DW_CFA_hi_user = 0x3F

# --- DW_EH_PE_*: pointer encodings (LSB 10.5 "DWARF Exception Header Encoding")
# The low nibble is the value format, bits 4-6 the application (what the value
# is relative to), bit 7 says the result is the address of the real pointer.
DW_EH_PE_absptr = 0x00
DW_EH_PE_uleb128 = 0x01
DW_EH_PE_udata2 = 0x02
DW_EH_PE_udata4 = 0x03
DW_EH_PE_udata8 = 0x04
DW_EH_PE_signed = 0x08
DW_EH_PE_sleb128 = 0x09
DW_EH_PE_sdata2 = 0x0A
DW_EH_PE_sdata4 = 0x0B
DW_EH_PE_sdata8 = 0x0C
DW_EH_PE_FORMAT_MASK = 0x0F

DW_EH_PE_pcrel = 0x10
DW_EH_PE_textrel = 0x20
DW_EH_PE_datarel = 0x30
DW_EH_PE_funcrel = 0x40
DW_EH_PE_aligned = 0x50
DW_EH_PE_APPLICATION_MASK = 0x70

DW_EH_PE_indirect = 0x80
DW_EH_PE_omit = 0xFF

# --- DW_OP_* needed to recognise the x86-64 PLT CFA expression and the
# signal-trampoline expressions (DWARF 5 table 7.9) --------------------------
DW_OP_deref = 0x06
DW_OP_and = 0x1A
DW_OP_plus = 0x22
DW_OP_shl = 0x24
DW_OP_ge = 0x2A
DW_OP_lit0 = 0x30
DW_OP_lit31 = 0x4F
DW_OP_breg0 = 0x70
DW_OP_breg31 = 0x8F

# --- CIE identification ----------------------------------------------------
# .debug_frame marks a CIE with an all-ones id; .eh_frame with id 0 (and
# stores, in an FDE, the distance back to its CIE instead of an offset).
DW_CIE_ID_32 = 0xFFFFFFFF
DW_CIE_ID_64 = 0xFFFFFFFFFFFFFFFF
EH_CIE_ID = 0
# An initial length of 0xffffffff announces the 64-bit DWARF format.
DWARF64_ESCAPE = 0xFFFFFFFF
# 0xfffffff0-0xfffffffe are reserved initial lengths (DWARF 5 7.2.2).
DWARF_RESERVED_LENGTH_MIN = 0xFFFFFFF0

# .eh_frame_hdr version (LSB 10.6.2).
EH_FRAME_HDR_VERSION = 1
