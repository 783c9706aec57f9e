"""Kernel symbols from /proc/kallsyms, for kernel frames of a sample.

Line format read (one symbol per line; module symbols carry the module name
in brackets after a tab)::

    ffffffff81379cc0 T __x64_sys_getpid
    ffffffff8220bb08 T _etext
    ffffffffc0a01000 t ext4_fill_super\t[ext4]

Fields: address (hex, no 0x), type letter as nm(1) prints it, name, and for
module symbols ``[module]``.  Only code matters for symbolizing sampled
instruction pointers, so only the text types are kept: ``t``/``T`` (local /
global text) and ``w``/``W`` (weak).

A symbol covers the addresses up to the next symbol's start.  Two cases would
stretch a symbol over memory that is not its code, and are cut short:

* section end markers (``_etext``, ``_einittext``, ``__*_text_end``) are not
  functions; the address range after them resolves to None;
* the last symbol of the core kernel or of a module is followed by unrelated
  memory (another module, or nothing), so it is capped at
  ``MAX_TAIL_SYMBOL_SIZE`` bytes.

When kernel.kptr_restrict hides addresses from us every address reads 0; then
``available`` is False and ``reason`` says why, for the caller to print once.

A line whose address is not plain hex of at most 16 digits (a sign, ``0x``,
``_`` or non-ASCII digits, which ``int()`` would take) or whose type is not
one letter is malformed: skipped and counted in ``skipped``.
"""

from __future__ import annotations

import bisect
import operator
import re
from typing import Dict, List, Optional, Tuple, Union

KALLSYMS_PATH = "/proc/kallsyms"

#: nm(1) type letters of code symbols: local/global text, weak symbols.
TEXT_TYPES = frozenset("tTwW")

#: Hex digits of an address (a u64).
MAX_ADDRESS_DIGITS = 16
_HEX_CHARS = frozenset("0123456789abcdefABCDEF")

#: Names that mark the end of a text section rather than start a function.
END_MARKERS = frozenset(("_etext", "_einittext"))
END_MARKER_PREFIX = "__"
END_MARKER_SUFFIX = "_text_end"

#: Largest size assumed for the last function before a module boundary (where
#: the "next symbol" belongs to other code).  The largest x86-64 kernel
#: functions are around 20 KiB, so 64 KiB leaves headroom without claiming
#: whole neighbouring modules.
MAX_TAIL_SYMBOL_SIZE = 0x10000

#: Sort rank of a real symbol and of an end marker at the same address.
_REAL_RANK = 0
_MARKER_RANK = 1

REASON_HIDDEN = ("kernel addresses are hidden by kernel.kptr_restrict; kernel frames stay "
                 "as addresses (run as root or set kernel.kptr_restrict=0)")
REASON_EMPTY = "no kernel text symbols in %s; kernel frames stay as addresses"
REASON_UNREADABLE = "cannot read %s (%s); kernel frames stay as addresses"

# One parsed symbol: (address, rank, name or None for an end marker, module).
_Symbol = Tuple[int, int, Optional[str], Optional[str]]
_SORT_KEY = operator.itemgetter(0, 1)  # (address, rank), in C


def _is_end_marker(name: str) -> bool:
    return name in END_MARKERS or (
        name.startswith(END_MARKER_PREFIX) and name.endswith(END_MARKER_SUFFIX))


class KernelSymbols:
    """Kernel text symbols as parallel sorted arrays for per-frame lookups.

    ``lookup`` returns the bare function name and ``lookup_module`` the module
    it belongs to (None for the core kernel), so the caller can keep the
    module as the pprof mapping rather than baking it into the name.
    ``lookup_full`` returns both with one search.
    """

    __slots__ = ("available", "reason", "skipped", "_starts", "_names", "_modules")

    def __init__(self) -> None:
        self.available = False
        #: Why symbols are unavailable ("" when available).
        self.reason = ""
        #: Lines that did not parse.
        self.skipped = 0
        # Parallel arrays: _starts sorted; a None name is a hole (after an
        # end marker or a capped tail) that resolves to None.
        self._starts: List[int] = []
        self._names: List[Optional[str]] = []
        self._modules: List[Optional[str]] = []

    @classmethod
    def load(cls, path: str = KALLSYMS_PATH) -> "Union[KernelSymbols, KallsymsIndex]":
        """Read ``path`` in one go and index its text symbols.

        A file the kernel wrote (every line canonical, see KallsymsIndex)
        gets the lazy index, which names only the addresses asked for; any
        other text gets this full parse, which skips and counts what it
        cannot read.  Both answer every lookup alike (tests compare them).

        Never raises for an unreadable file: the capture goes on with kernel
        frames as addresses and ``reason`` explains.
        """
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            syms = cls()
            syms.reason = REASON_UNREADABLE % (path, e.strerror or e)
            return syms
        index = KallsymsIndex.build(data, path)
        if index is not None:
            return index
        return cls.parse(data.decode("latin-1"), path)

    @classmethod
    def parse(cls, text: str, path: str = KALLSYMS_PATH) -> "KernelSymbols":
        """Index kallsyms ``text`` (``path`` only names it in ``reason``)."""
        syms = cls()
        symbols, any_nonzero, syms.skipped = _parse_text(text)
        if not symbols:
            syms.reason = REASON_EMPTY % path
            return syms
        if not any_nonzero:
            # kptr_restrict prints every address as 0 to readers it distrusts.
            syms.reason = REASON_HIDDEN
            return syms
        syms._build(symbols)
        syms.available = True
        return syms

    def _build(self, symbols: List[_Symbol]) -> None:
        """Sort, keep one name per address, add holes at boundaries.

        Of several aliases at one address the first listed wins: the kernel
        lists its preferred alias first and resolves addresses to it (%pS,
        /proc/PID/stack), so our frames read the same as the kernel's own.
        An end marker sharing an address with a function loses to it.
        """
        # Stable, and already sorted in the common case (sort() is then O(n)).
        symbols.sort(key=_SORT_KEY)
        starts, names, modules = self._starts, self._names, self._modules
        prev_addr = -1
        prev_module: object = ()  # equal to no module
        for addr, _rank_key, name, module in symbols:
            if addr == prev_addr:
                continue  # the preferred alias at this address came first
            # Only a module change can cap the previous symbol (see
            # _close_previous): test it here rather than call per symbol.
            if starts and module != prev_module:
                _close_previous(starts, names, modules, addr, module)
            starts.append(addr)
            names.append(name)
            modules.append(module)
            prev_addr = addr
            prev_module = module
        _close_previous(starts, names, modules, None, None)

    def __len__(self) -> int:
        return sum(1 for n in self._names if n is not None)

    def _index(self, addr: int) -> int:
        return bisect.bisect_right(self._starts, addr) - 1

    def lookup(self, addr: int) -> Optional[str]:
        """The function containing ``addr``, or None (per-frame hot path)."""
        i = bisect.bisect_right(self._starts, addr) - 1
        return self._names[i] if i >= 0 else None

    def lookup_module(self, addr: int) -> Optional[str]:
        """The module of the function containing ``addr``; None for the core
        kernel and for addresses no symbol covers."""
        i = self._index(addr)
        if i < 0 or self._names[i] is None:
            return None
        return self._modules[i]

    def lookup_full(self, addr: int) -> Optional[Tuple[str, Optional[str]]]:
        """(name, module or None) for ``addr``, or None; one search."""
        i = self._index(addr)
        if i < 0:
            return None
        name = self._names[i]
        return None if name is None else (name, self._modules[i])

    def address_of(self, name: str) -> Optional[int]:
        """Start address of the first symbol called ``name`` (a slow scan,
        for diagnostics and tests, not for the sample path)."""
        try:
            return self._starts[self._names.index(name)]
        except ValueError:
            return None


def _close_previous(starts: List[int], names: List[Optional[str]],
                    modules: List[Optional[str]], next_addr: Optional[int],
                    next_module: Optional[str]) -> None:
    """Cap the last symbol before a module boundary (or the very last one)
    with a hole, so it does not swallow the gap up to unrelated code."""
    if names[-1] is None:
        return
    boundary = next_addr is None or next_module != modules[-1]
    tail_end = starts[-1] + MAX_TAIL_SYMBOL_SIZE
    if boundary and (next_addr is None or next_addr > tail_end):
        starts.append(tail_end)
        names.append(None)
        modules.append(None)


def _parse_text(text: str) -> Tuple[List[_Symbol], bool, int]:
    """Return (text symbols, whether any address was non-zero, skipped lines).

    Plain ``split`` per line and a set test on the type letter: a regex per
    line would dominate the load time of ~100k+ lines.
    """
    symbols: List[_Symbol] = []
    module_names: Dict[str, str] = {}  # share one string per module
    any_nonzero = False
    skipped = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            if line.strip():
                skipped += 1
            continue
        sym_type = fields[1]
        if sym_type not in TEXT_TYPES:
            continue
        addr_s = fields[0]
        if not 0 < len(addr_s) <= MAX_ADDRESS_DIGITS or not _HEX_CHARS.issuperset(addr_s):
            skipped += 1
            continue
        addr = int(addr_s, 16)
        if addr:
            any_nonzero = True
        name = fields[2]
        module = None
        if len(fields) > 3:
            module = fields[3].strip("[]")
            module = module_names.setdefault(module, module)
        if _is_end_marker(name):
            symbols.append((addr, _MARKER_RANK, None, module))
        else:
            symbols.append((addr, _REAL_RANK, name, module))
    return symbols, any_nonzero, skipped


# -- the lazy index ---------------------------------------------------------------

#: One line exactly as the kernel prints it on a 64-bit machine (s_show() in
#: kernel/kallsyms.c: "%px %c %s\t[%s]"): 16 lower-case hex digits, one type
#: letter, a name of printable ASCII, and an optional tab-bracketed module
#: (printable, no brackets).
_CANONICAL_LINE = re.compile(
    rb"^[0-9a-f]{16} [A-Za-z] [!-~]+(?:\t\[[!-Z\\^-~]+\])?$", re.M)
_ZERO_ADDRESS = b"0" * MAX_ADDRESS_DIGITS
_ADDRESS = operator.itemgetter(slice(0, MAX_ADDRESS_DIGITS))  # a line's sort key
_TYPE_AT = MAX_ADDRESS_DIGITS + 1  # "<address> <type> <name>"
_NAME_AT = MAX_ADDRESS_DIGITS + 3
_TEXT_TYPE_BYTES = frozenset(ord(t) for t in TEXT_TYPES)
_AFTER_ANY_LINE = b"\xff"  # address + this sorts after every line at that address


class KallsymsIndex:
    """/proc/kallsyms kept as the kernel wrote it, its lines sorted by
    address, named only for the addresses a profile asks about.

    Why: a profile has a few dozen distinct kernel frames, the file has
    120k+ symbols, and turning every line into Python ints, strings and
    tuples cost more CPU than the rest of a short capture's start-up (and
    left the garbage collector 120k objects to scan).  Here one regex checks
    and splits the lines and one sort orders them by their fixed-width hex
    address (bytes order as the numbers do), both in C, into bytes objects
    the collector does not track.  A lookup bisects that and applies
    KernelSymbols' rules (first alias listed, end markers, tail caps) to the
    lines at the two addresses around the one asked.  Same interface and
    answers as KernelSymbols; ``__len__`` and ``address_of`` (diagnostics)
    parse the lines in full once.
    """

    __slots__ = ("available", "reason", "skipped", "_path", "_lines", "_cache", "_full")

    def __init__(self, lines: List[bytes], path: str) -> None:
        self.available = True
        self.reason = ""
        self.skipped = 0  # every line is canonical
        self._path = path
        # Stable: the lines at one address stay in file order (first alias).
        self._lines = sorted(lines, key=_ADDRESS)
        self._cache: Dict[int, Optional[Tuple[str, Optional[str]]]] = {}
        self._full: Optional[KernelSymbols] = None

    @classmethod
    def build(cls, data: bytes, path: str = KALLSYMS_PATH) -> "Optional[Union[KallsymsIndex, KernelSymbols]]":
        """The index of ``data``; a KernelSymbols carrying the reason when it
        has no usable symbols; None when a line is not canonical (the caller
        then parses it in full)."""
        lines = _CANONICAL_LINE.findall(data)
        count = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        if len(lines) != count:
            return None
        index = cls(lines, path)
        last = index._text_line(len(index._lines) - 1, -1)
        if last < 0:
            empty = KernelSymbols()
            empty.reason = REASON_EMPTY % path
            return empty
        if index._lines[last][:MAX_ADDRESS_DIGITS] == _ZERO_ADDRESS:
            hidden = KernelSymbols()
            hidden.reason = REASON_HIDDEN
            return hidden
        return index

    def _text_line(self, i: int, step: int) -> int:
        """The first position from ``i`` on (walking by ``step``) holding a
        text symbol; -1 or len(lines) when there is none."""
        lines = self._lines
        while 0 <= i < len(lines) and lines[i][_TYPE_AT] not in _TEXT_TYPE_BYTES:
            i += step
        return i

    def _kept(self, i: int, step: int) -> Tuple[int, Optional[str], Optional[str]]:
        """(address, name or None for an end marker, module) of the symbol
        kept at the address of text line ``i``: the first listed real symbol
        there, else an end marker.  ``step`` -1: ``i`` is the last line of
        its address, 1: the first."""
        lines = self._lines
        address = lines[i][:MAX_ADDRESS_DIGITS]
        run = []
        while 0 <= i < len(lines) and lines[i][:MAX_ADDRESS_DIGITS] == address:
            if lines[i][_TYPE_AT] in _TEXT_TYPE_BYTES:
                run.append(i)
            i += step
        run.sort()  # file order
        chosen = None
        for k in run:
            name, module = _name_and_module(lines[k])
            if not _is_end_marker(name):
                chosen = (name, module)
                break
        if chosen is None:
            chosen = (None, _name_and_module(lines[run[0]])[1])
        return int(address, 16), chosen[0], chosen[1]

    def _resolve(self, addr: int) -> Optional[Tuple[str, Optional[str]]]:
        if not 0 <= addr < 1 << 64:
            return None
        after = bisect.bisect_right(self._lines, b"%016x" % addr + _AFTER_ANY_LINE)
        i = self._text_line(after - 1, -1)
        if i < 0:
            return None  # below every text symbol
        start, name, module = self._kept(i, -1)
        if name is None:
            return None  # after an end marker
        nxt = self._text_line(after, 1)
        if nxt < len(self._lines):
            next_start, _next_name, next_module = self._kept(nxt, 1)
            capped = next_module != module and next_start > start + MAX_TAIL_SYMBOL_SIZE
        else:
            capped = True
        if capped and addr >= start + MAX_TAIL_SYMBOL_SIZE:
            return None  # past the last function before unrelated memory
        return name, module

    def lookup_full(self, addr: int) -> Optional[Tuple[str, Optional[str]]]:
        """(name, module or None) for ``addr``, or None; answers cached."""
        try:
            return self._cache[addr]
        except KeyError:
            found = self._cache[addr] = self._resolve(addr)
            return found

    def lookup(self, addr: int) -> Optional[str]:
        found = self.lookup_full(addr)
        return None if found is None else found[0]

    def lookup_module(self, addr: int) -> Optional[str]:
        found = self.lookup_full(addr)
        return None if found is None else found[1]

    def _parsed(self) -> KernelSymbols:
        if self._full is None:
            # The sort kept each address's lines in file order: the same
            # choices as parsing the file itself.
            self._full = KernelSymbols.parse(b"\n".join(self._lines).decode("latin-1"), self._path)
        return self._full

    def __len__(self) -> int:
        return len(self._parsed())

    def address_of(self, name: str) -> Optional[int]:
        return self._parsed().address_of(name)


def _name_and_module(line: bytes) -> Tuple[str, Optional[str]]:
    """The name and module (None for the core kernel) of a canonical line."""
    name, _, module = line[_NAME_AT:].partition(b"\t")
    return name.decode("latin-1"), (module[1:-1].decode("latin-1") if module else None)
