"""The BPF layer: bpf(2) commands, maps, programs, an assembler and BTF.

Layers, lowest first (like python-ptrace): ``syscall`` packs union bpf_attr
and calls bpf(2); ``maps`` and ``prog`` are objects owning fds (context
managers); ``asm`` writes programs; ``btf`` reads the kernel's type
information to find struct offsets and attach targets.
"""

from perfagent.bpf.syscall import BPFError, VerifierError  # noqa: F401
