"""Kernel symbols named by the kernel itself: ``bpf_snprintf("%pS")``.

Why not /proc/kallsyms: a profile names a few dozen to a few thousand
kernel addresses, and the file lists every kernel symbol (about 200,000
lines here): the kernel spends ~0.05 CPU s formatting it and the agent as
much again reading it, a quarter of a short capture's whole cost.  The
kernel's own ``%pS`` (lib/vsprintf.c, symbol_string → sprint_symbol) looks
one address up in its compressed symbol table by binary search and prints
``name+0xoffset/0xsize [module]``: the same names /proc/kallsyms gives,
the symbol size the kernel knows (no guessing where the last function of a
module ends), modules and BPF programs included, at microseconds per
address.

How: a raw tracepoint program that is never attached.  BPF_PROG_TEST_RUN
runs it with up to twelve u64 "tracepoint arguments" (MAX_BPF_FUNC_ARGS),
our addresses; it calls ``bpf_snprintf(out, OUT_SIZE, "%pS\\n" x 12, args,
96)`` into an array map's value, which we read back.  bpf_snprintf takes
``%pS`` (kernel/bpf/helpers.c bpf_bprintf_prepare: kernel pointers are
printed, not dereferenced by the program) since Linux 5.13; raw tracepoint
test runs exist since 5.10.  The format must be a constant string: it lives
in a map created BPF_F_RDONLY_PROG and frozen.

When any of that is missing (an older kernel, no CAP_BPF/CAP_PERFMON) the
caller falls back to reading /proc/kallsyms (perfagent.symbolize.kallsyms).

Output of ``%pS`` for one address:

    __x64_sys_getpid+0x4/0x10
    ext4_fill_super+0x12/0x2000 [ext4]
    bpf_prog_6deef7357e7b4530_sd_fw_egress+0x1c/0x60
    0xffffffffc0a01000            (no symbol covers the address)
"""

from __future__ import annotations

import re
import struct
from typing import Dict, Iterable, List, Optional, Tuple

from perfagent.errors import PerfAgentError

#: Addresses named per program run: raw tracepoint programs read at most
#: MAX_BPF_FUNC_ARGS (12) u64 arguments, and the test run takes that many.
BATCH = 12
ARGS = struct.Struct("<%dQ" % BATCH)

#: One ``%pS`` per argument, newline-separated (a symbol name holds none).
FORMAT = b"%pS\n" * BATCH + b"\0"

#: Room for the printed names of one batch.  KSYM_NAME_LEN is 512 (Linux
#: 6.1+; 128 before), plus "+0x…/0x… [module]": twelve of the longest fit
#: in 8 KiB; a batch that does not fit is named again one address per run.
OUT_SIZE = 8192

# The map value the program writes: struct { s32 ret; u32 pad; char out[OUT_SIZE]; }
# (ret: bpf_snprintf's return, the bytes it needed including the NUL, or
# a negative errno).
_RET = struct.Struct("<i4x")
_VALUE_SIZE = _RET.size + OUT_SIZE

# name+0xoff/0xsize, then " [module]" when the symbol is in a module.
_SYMBOL = re.compile(r"^(?P<name>\S+)\+0x(?P<off>[0-9a-f]+)/0x(?P<size>[0-9a-f]+)(?: \[(?P<module>[^\]]+)\])?$")

_Named = Optional[Tuple[str, Optional[str]]]


class KernelNamerUnavailable(PerfAgentError):
    """The running kernel (or our privileges) cannot name addresses this way."""


def _program(fmt_map, out_map):
    """The namer: copy the twelve arguments to the stack, print them."""
    from perfagent.bpf.asm import DW, FP, R0, R1, R2, R3, R4, R5, R6, R7, W, Program
    p = Program("pa_ksym_name")
    p.mov(R6, R1)
    args = -ARGS.size                      # fp-96 .. fp-8: the addresses
    for i in range(BATCH):
        p.ldx(DW, R0, R6, 8 * i)
        p.stx(DW, FP, R0, args + 8 * i)
    key = args - 8
    p.st(W, FP, key, 0)
    p.ld_map_fd(R1, out_map)
    p.mov(R2, FP)
    p.add(R2, key)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "out")
    p.mov(R7, R0)
    p.ld_map_fd(R1, fmt_map)
    p.mov(R2, FP)
    p.add(R2, key)
    p.call("map_lookup_elem")
    p.jeq(R0, 0, "out")
    p.mov(R3, R0)                          # the format, a constant string
    p.mov(R1, R7)
    p.add(R1, _RET.size)
    p.mov(R2, OUT_SIZE)
    p.mov(R4, FP)
    p.add(R4, args)
    p.mov(R5, ARGS.size)
    p.call("snprintf")
    p.stx(W, R7, R0, 0)
    p.label("out")
    p.mov(R0, 0)
    p.exit()
    return p


def parse_symbol(text: str) -> _Named:
    """(name, module or None) from one ``%pS`` line; None when no symbol
    covers the address (the kernel printed the bare address)."""
    m = _SYMBOL.match(text)
    if m is None or int(m.group("off"), 16) >= max(int(m.group("size"), 16), 1):
        return None
    return m.group("name"), m.group("module")


class KernelNamer:
    """Names kernel addresses through the kernel; the KernelSymbols
    interface (``lookup``, ``lookup_full``, ``available``, ``reason``) the
    symbolizer and the off-CPU collector use, plus ``prefetch`` to name many
    addresses twelve per system call.  Every answer is cached."""

    available = True
    reason = ""

    def __init__(self) -> None:
        from perfagent.bpf import syscall as sc
        from perfagent.bpf.maps import ArrayMap, Map
        from perfagent.bpf.syscall import BPFError
        try:
            self._fmt = Map(sc.BPF_MAP_TYPE_ARRAY, 4, len(FORMAT), 1, sc.BPF_F_RDONLY_PROG, "pa_ksym_fmt")
            self._fmt.update(b"\0\0\0\0", FORMAT)
            sc.map_freeze(self._fmt.fd)
            self._out = ArrayMap(_VALUE_SIZE, 1, "pa_ksym_out")
            self._prog = _program(self._fmt, self._out).load(sc.BPF_PROG_TYPE_RAW_TRACEPOINT)
            self._run = sc.prog_test_run
            self._named: Dict[int, _Named] = {}
            self.lookups = 0                  # program runs (diagnostics, tests)
            self._check()
        except (BPFError, OSError) as exc:
            self.close()
            raise KernelNamerUnavailable("kernel symbols through bpf_snprintf: %s" % exc) from None

    def _check(self) -> None:
        """One run with a known answer: this kernel's %pS names what
        /proc/kallsyms would (refuses kernels that print something else)."""
        from perfagent.bpf.syscall import BPFError
        ret, text = self._print([0])
        if ret <= 0 or not text.startswith("0x"):
            raise BPFError("unexpected %%pS output %r" % text[:40])

    def close(self) -> None:
        for name in ("_prog", "_out", "_fmt"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()

    def _print(self, addrs: List[int]) -> Tuple[int, str]:
        padded = list(addrs) + [0] * (BATCH - len(addrs))
        self._run(self._prog.fd, ARGS.pack(*padded))
        self.lookups += 1
        value = self._out.lookup(b"\0\0\0\0") or b""
        (ret,) = _RET.unpack_from(value)
        out = value[_RET.size:]
        end = out.find(b"\0")
        return ret, out[:end if end >= 0 else len(out)].decode("utf-8", "replace")

    def _name_batch(self, addrs: List[int]) -> None:
        ret, text = self._print(addrs)
        lines = text.split("\n")
        if ret > OUT_SIZE and len(addrs) > 1:
            # Did not fit (names near KSYM_NAME_LEN): one address per run.
            for a in addrs:
                self._name_batch([a])
            return
        for i, a in enumerate(addrs):
            self._named[a] = parse_symbol(lines[i]) if i < len(lines) and ret > 0 else None

    def prefetch(self, addrs: Iterable[int]) -> None:
        """Name every address not named yet, twelve per program run."""
        todo = sorted({a for a in addrs if a not in self._named})
        for i in range(0, len(todo), BATCH):
            self._name_batch(todo[i:i + BATCH])

    def lookup_full(self, addr: int) -> _Named:
        """(name, module or None) for a kernel address, None outside every symbol."""
        try:
            return self._named[addr]
        except KeyError:
            self._name_batch([addr])
            return self._named[addr]

    def lookup(self, addr: int) -> Optional[str]:
        found = self.lookup_full(addr)
        return found[0] if found is not None else None

    def lookup_module(self, addr: int) -> Optional[str]:
        found = self.lookup_full(addr)
        return found[1] if found is not None else None

    def __len__(self) -> int:
        return len(self._named)
