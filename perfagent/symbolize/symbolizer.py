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
from perfagent.symbolize.kallsyms import KernelSymbols
from perfagent.symbolize.native import BinaryCache, BinaryInfo, SymbolTable
from perfagent.symbolize.perfmap import PerfMap
from perfagent.symbolize.procmaps import read_maps


def proc_path(pid: int, path: str) -> str:
    """``path`` as the process ``pid`` sees it (its root may be a container's)."""
    return "/proc/%d/root%s" % (pid, path)


class Symbolizer:
    """Resolves addresses to function names; never raises for bad inputs."""

    def __init__(self, binaries: Optional[BinaryCache] = None, kallsyms_path: str = "/proc/kallsyms",
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
    def kernel(self) -> KernelSymbols:
        if self._kernel is None:
            self._kernel = KernelSymbols.load(self._kallsyms_path)  # never raises
            if not self._kernel.available and self._kernel.reason:
                self.warnings.append(self._kernel.reason)
        return self._kernel

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
    def binary(self, path: str, dev_inode: Tuple[int, int], pid: int, start: int, end: int) -> BinaryInfo:
        """The parsed binary behind a mapping, found through the best path we have.

        Tried in order: the path itself when it is the same file (device and
        inode match); the file as the process sees it (/proc/PID/root, for
        containers); the mapping's own fd (/proc/PID/map_files, which also
        works for deleted files) while the process lives.
        """
        open_path = None
        if pid > 0:
            for candidate in (proc_path(pid, path), "/proc/%d/map_files/%x-%x" % (pid, start, end)):
                if _same_inode(candidate, dev_inode[1]):
                    open_path = candidate
                    break
        if open_path is None and not _same_inode(path, dev_inode[1]):
            open_path = path
        return self.binaries.load(path, open_path=open_path)

    # -- JIT -----------------------------------------------------------------
    def perf_map(self, pid: int, uid: int) -> PerfMap:
        pm = self._perf_maps.get(pid)
        if pm is None:
            path = os.path.join(self._perf_map_dir, "perf-%d.map" % pid)
            root_path = proc_path(pid, path)
            if os.path.exists(root_path) and not _same_file(root_path, path):
                path = root_path  # the target's /tmp is not ours (another mount namespace)
            pm = self._perf_maps[pid] = PerfMap(path, uid)  # reads the file once
        return pm

    def perf_maps(self):
        """(pid, PerfMap) of every perf map opened so far."""
        return list(self._perf_maps.items())

    def jit_name(self, pid: int, uid: int, addr: int) -> Optional[str]:
        return self.perf_map(pid, uid).lookup(addr)

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


def _same_inode(path: str, inode: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return inode == 0 or st.st_ino == inode


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _load_own_vdso() -> Optional[Tuple[int, SymbolTable, ELFFile]]:
    """The agent's own [vdso] image, read from its memory."""
    try:
        for entry in read_maps("self"):
            if entry.path == "[vdso]":
                with open("/proc/self/mem", "rb") as mem:
                    mem.seek(entry.start)
                    data = mem.read(entry.end - entry.start)
                elf = ELFFile.from_bytes(data)
                return entry.start, SymbolTable([elf]), elf
    except (OSError, ValueError, ELFError):
        return None
    return None
