"""The BPF layer: bpf(2) commands, maps, programs, an assembler and BTF.

Layers, lowest first (like python-ptrace):

* ``syscall``: union bpf_attr packed per command and bpf(2) called through
  ctypes; failures become ``BPFError`` (one line; ``.errno``).
* ``maps`` and ``prog``: objects owning fds (context managers, closed on
  garbage collection too): ``HashMap``, ``PerCPUHashMap``, ``ArrayMap``,
  ``StackTraceMap``, ``RingBuf``; ``Prog`` (verifier log captured on
  rejection as ``VerifierError``), ``Link``, ``PerfEvent``.
* ``asm``: ``Program``, a builder that reads like the algorithm.
* ``btf``: the kernel's type information, for struct offsets and tp_btf
  attach ids.
"""

from perfagent.bpf.syscall import BPFError, VerifierError  # noqa: F401
