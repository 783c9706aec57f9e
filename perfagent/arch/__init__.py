"""Architecture facts, one module per architecture.

Everything that differs between x86-64 and aarch64 (system call numbers,
perf register layouts, DWARF register numbers) lives in these modules and
nowhere else, so adding an architecture means adding one file here.
"""

from __future__ import annotations

import os
from types import ModuleType

from perfagent.errors import PerfAgentError

_MACHINE_MODULES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
}


def current(machine: str = "") -> ModuleType:
    """The arch module for this machine (or ``machine`` when given)."""
    # os.uname() is what platform.machine() reads, without importing
    # platform (a few ms of every start-up).
    machine = machine or os.uname().machine
    name = _MACHINE_MODULES.get(machine.lower())
    if name is None:
        raise PerfAgentError(
            "unsupported architecture %r: perfagent supports x86_64 and aarch64"
            % machine
        )
    if name == "x86_64":
        from perfagent.arch import x86_64 as mod
    else:
        from perfagent.arch import aarch64 as mod
    return mod
