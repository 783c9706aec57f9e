"""Names for the frames of a capture: native (ELF), kernel, JIT and vDSO.

Called once per distinct location at the end of a capture.  Each source is
loaded lazily and cached: a binary's symbol table once per file (BinaryCache,
keyed by device+inode and build id), /proc/kallsyms once, each process's perf
map once (refreshed when it grew), the vDSO image once (it is the same in
every process of this kernel, so the agent reads its own).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from perfagent.elf import ELFFile
from perfagent.errors import ELFError
from perfagent.budget import BudgetExceeded
from perfagent.symbolize.kallsyms import KALLSYMS_PATH, KernelSymbols
from perfagent.symbolize.kernelnames import KernelNamer, KernelNamerUnavailable
from perfagent.symbolize.native import BinaryCache, BinaryInfo, SymbolTable
from perfagent.symbolize.perfmap import PerfMap
from perfagent.symbolize.procmaps import read_maps
from perfagent.target import memory
from perfagent.target.files import same_mount_namespace


def proc_path(pid: int, path: str) -> str:
    """``path`` as the process ``pid`` sees it (its root may be a container's)."""
    return "/proc/%d/root%s" % (pid, path)


class Symbolizer:
    """Resolves addresses to function names; never raises for bad inputs."""

    def __init__(self, binaries: Optional[BinaryCache] = None, kallsyms_path: str = KALLSYMS_PATH,
                 perf_map_dir: str = "/tmp") -> None:
        self.binaries = binaries or BinaryCache()
        self._kallsyms_path = kallsyms_path
        self._kernel: Optional[KernelSymbols] = None
        self._perf_map_dir = perf_map_dir
        self._perf_maps: Dict[int, PerfMap] = {}
        self._vdso: Optional[Tuple[int, SymbolTable, ELFFile]] = None
        self._vdso_loaded = False
        self.warnings: list = []

    # -- kernel --------------------------------------------------------------
    @property
    def kernel(self):
        """Kernel symbols: named by the kernel itself (bpf_snprintf's %pS,
        perfagent.symbolize.kernelnames: microseconds per address, nothing
        read up front), else /proc/kallsyms read once (no BPF, an older
        kernel, or another kallsyms file given)."""
        if self._kernel is None:
            if self._kallsyms_path == KALLSYMS_PATH:
                try:
                    self._kernel = KernelNamer()
                except KernelNamerUnavailable:
                    pass
            if self._kernel is None:
                self._kernel = KernelSymbols.load(self._kallsyms_path)  # never raises
                if not self._kernel.available and self._kernel.reason:
                    self.warnings.append(self._kernel.reason)
        return self._kernel

    def prefetch_kernel(self, addrs) -> None:
        """Name many kernel addresses at once where that is cheaper
        (twelve per system call through the kernel namer)."""
        prefetch = getattr(self.kernel, "prefetch", None)
        if prefetch is not None:
            prefetch(addrs)

    def kernel_name(self, addr: int) -> Tuple[Optional[str], str]:
        """(symbol, module or "[kernel.kallsyms]") for a kernel address."""
        k = self.kernel
        if not k.available:
            return None, "[kernel.kallsyms]"
        found = k.lookup_full(addr)
        if found is None:
            return None, "[kernel.kallsyms]"
        name, module = found
        return name, ("[%s]" % module if module else "[kernel.kallsyms]")

    # -- native ------------------------------------------------------------
    def binary(self, mapping, offsets=None, marks=()) -> BinaryInfo:
        """The parsed binary behind a mapping (anything with pid, path,
        dev_major, dev_minor, inode, start, end, deleted): exactly the file
        the process maps, or no names (see BinaryCache.load_mapped; with
        ``offsets``, names for those file offsets only)."""
        return self.binaries.load_mapped(mapping, offsets, marks)

    # -- JIT -----------------------------------------------------------------
    def perf_map(self, proc) -> PerfMap:
        """The perf map of process ``proc`` (a capture ProcessInfo).

        A runtime writes ``/tmp/perf-<pid>.map`` with the pid *it* sees: in
        its own pid namespace that is ``proc.ns_pid``, and the file is in its
        own /tmp, reached through its root.  Keyed by (pid, start time), and
        trusted only when owned by that process's uid or root.
        """
        key = (proc.pid, proc.start)
        pm = self._perf_maps.get(key)
        if pm is None:
            name = "perf-%d.map" % proc.ns_pid
            path = os.path.join(self._perf_map_dir, name)
            if not same_mount_namespace(proc.pid) and proc.pid > 0:
                path = proc_path(proc.pid, path)  # the target's /tmp is not ours
            pm = self._perf_maps[key] = PerfMap(path, proc.uid)  # reads the file once
        return pm

    def perf_maps(self):
        """((pid, start), PerfMap) of every perf map opened so far."""
        return list(self._perf_maps.items())

    def forget_perf_map(self, pid: int, start: int) -> None:
        """Drop the perf map of a process that exited (its samples named);
        building the profile reads it again if a frame still needs it."""
        self._perf_maps.pop((pid, start), None)

    def perf_maps_held(self) -> int:
        return len(self._perf_maps)

    def jit_name(self, proc, addr: int) -> Optional[str]:
        return self.perf_map(proc).lookup(addr)

    # -- vDSO ----------------------------------------------------------------
    def vdso_name(self, offset: int) -> Optional[str]:
        """Name of the vDSO function at ``offset`` from the start of [vdso]."""
        if not self._vdso_loaded:
            self._vdso_loaded = True
            self._vdso = _load_own_vdso()
        if self._vdso is None:
            return None
        _base, table, elf = self._vdso
        vaddr = elf.offset_to_vaddr(offset)
        return table.lookup(vaddr) if vaddr is not None else None


def _load_own_vdso() -> Optional[Tuple[int, SymbolTable, ELFFile]]:
    """The agent's own [vdso] image, read from its memory."""
    try:
        for entry in read_maps("self"):
            if entry.path == "[vdso]":
                data = memory.read_exact(os.getpid(), entry.start, entry.end - entry.start)
                elf = ELFFile.from_bytes(data)
                return entry.start, SymbolTable([elf]), elf
    except (OSError, ValueError, ELFError, BudgetExceeded):  # (Cancelled: stopping; no names then)
        return None
    return None
