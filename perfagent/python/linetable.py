"""CPython line tables: bytecode offset -> source line, for every format since 3.8.

A code object maps its bytecode to source lines with a compact table whose
format changed twice.  These functions decode all three, whatever version
the agent itself runs on, from the raw bytes read out of the target; each
returns what the interpreter's own ``PyCode_Addr2Line(co, addrq)`` would:

* 3.8, 3.9 -- ``co_lnotab`` (Objects/lnotab_notes.txt): byte pairs
  (address increment, signed line increment); the line of ``addrq`` is
  co_firstlineno plus the line increments of every pair whose accumulated
  address is <= addrq.
* 3.10 -- ``co_linetable`` (PEP 626, Objects/lnotab_notes.txt of 3.10):
  byte pairs (unsigned address delta, signed line delta) each describing
  the range [end, end + delta); a line delta of -128 means "no line" for
  that range, and the running line is not changed by it.
* 3.11+ -- the location table (Objects/locations.md): entries of one head
  byte ``1 cccc lll`` (code c, length l+1 code units) and code-specific
  bytes; codes 0-9 "short form" (same line, 1 column byte), 10-12 "one
  line" (line delta c-10, 2 column bytes), 13 "no column info" (signed
  varint line delta), 14 "long form" (signed varint line delta, then three
  varints: end line delta, column+1, end column+1), 15 "no location".
  Varints are 6 bits per byte, bit 6 (0x40) set on every byte but the
  last, least significant chunk first; a signed varint is its unsigned
  value v read as ``-(v >> 1)`` if v is odd else ``v >> 1``.

``addrq`` is a byte offset into the code's bytecode (``co_code``, or the
adaptive copy ``co_code_adaptive`` from 3.11; its instructions are 2-byte
code units).  A negative addrq (a frame that has not started, 3.10 f_lasti
-1, 3.11+ prev_instr one before the first unit) gives co_firstlineno, as in
CPython.  ``None`` means "no line" (or an offset past the table).

The tables come from another process's memory: malformed bytes end the
decode with None, never an exception, and each decode is bounded by the
table's length (the caller bounds that).
"""

from __future__ import annotations

from typing import Optional

from perfagent.python.layout import LINETABLE_310, LNOTAB, LOCATIONS

# Objects/locations.md: _PyCodeLocationInfoKind
PY_CODE_LOCATION_INFO_SHORT0 = 0
PY_CODE_LOCATION_INFO_ONE_LINE0 = 10
PY_CODE_LOCATION_INFO_ONE_LINE1 = 11
PY_CODE_LOCATION_INFO_ONE_LINE2 = 12
PY_CODE_LOCATION_INFO_NO_COLUMNS = 13
PY_CODE_LOCATION_INFO_LONG = 14
PY_CODE_LOCATION_INFO_NONE = 15

#: Bytes that follow the head byte, per code (besides varints).
_FIXED_TAIL = {PY_CODE_LOCATION_INFO_ONE_LINE0: 2, PY_CODE_LOCATION_INFO_ONE_LINE1: 2,
               PY_CODE_LOCATION_INFO_ONE_LINE2: 2}

#: 3.10: a line delta of -128 marks a range without a line number.
NO_LINE_DELTA_310 = -128

#: Size of a code unit (_Py_CODEUNIT) in bytes.
CODE_UNIT = 2


def lnotab_line(table: bytes, firstlineno: int, addrq: int) -> int:
    """3.8/3.9: PyCode_Addr2Line over co_lnotab."""
    line = firstlineno
    if addrq < 0:
        return line
    addr = 0
    end = len(table) - 1
    i = 0
    while i < end:
        addr += table[i]
        if addr > addrq:
            break
        delta = table[i + 1]
        line += delta - 256 if delta >= 128 else delta
        i += 2
    return line


def linetable310_line(table: bytes, firstlineno: int, addrq: int) -> Optional[int]:
    """3.10: the PEP 626 address range containing addrq."""
    if addrq < 0:
        return firstlineno
    line = firstlineno
    end = 0
    stop = len(table) - 1
    i = 0
    while i < stop:
        start = end
        end = start + table[i]
        delta = table[i + 1]
        delta = delta - 256 if delta >= 128 else delta
        i += 2
        if delta == NO_LINE_DELTA_310:
            if start <= addrq < end:
                return None
            continue
        line += delta
        if start <= addrq < end:
            return line
    return None


def _varint(table: bytes, i: int):
    """(value, next index) of the unsigned varint at i; (None, i) when cut short."""
    n = len(table)
    if i >= n:
        return None, i
    b = table[i]
    i += 1
    value = b & 63
    shift = 6
    while b & 64:
        if i >= n or shift > 60:
            return None, i
        b = table[i]
        i += 1
        value |= (b & 63) << shift
        shift += 6
    return value, i


def locations_line(table: bytes, firstlineno: int, addrq: int) -> Optional[int]:
    """3.11+: the location-table entry containing code unit addrq // 2."""
    if addrq < 0:
        return firstlineno
    target = addrq // CODE_UNIT
    line = firstlineno
    addr = 0
    n = len(table)
    i = 0
    while i < n:
        head = table[i]
        if not head & 0x80:
            return None  # not an entry's first byte: malformed
        i += 1
        code = (head >> 3) & 15
        length = (head & 7) + 1
        no_line = False
        if code == PY_CODE_LOCATION_INFO_NONE:
            no_line = True
        elif code == PY_CODE_LOCATION_INFO_LONG or code == PY_CODE_LOCATION_INFO_NO_COLUMNS:
            value, i = _varint(table, i)
            if value is None:
                return None
            line += -(value >> 1) if value & 1 else value >> 1
            if code == PY_CODE_LOCATION_INFO_LONG:
                for _ in range(3):  # end line delta, column + 1, end column + 1
                    value, i = _varint(table, i)
                    if value is None:
                        return None
        elif code >= PY_CODE_LOCATION_INFO_ONE_LINE0:
            line += code - PY_CODE_LOCATION_INFO_ONE_LINE0
            i += _FIXED_TAIL[code]
        else:
            i += 1  # short form: one column byte, same line
        if addr <= target < addr + length:
            return None if no_line else line
        addr += length
    return None


_DECODERS = {LNOTAB: lnotab_line, LINETABLE_310: linetable310_line, LOCATIONS: locations_line}


def line_for(fmt: int, table: bytes, firstlineno: int, addrq: int) -> Optional[int]:
    """The source line of byte offset ``addrq`` for a table of format ``fmt`` (layout constants)."""
    return _DECODERS[fmt](table, firstlineno, addrq)
