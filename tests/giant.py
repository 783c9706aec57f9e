"""The libLLVM-linked test program (tests and tools/bench_giant.py share it)."""

from __future__ import annotations

import os
import subprocess
from typing import Optional

LLVM_CONFIG = "/usr/lib/llvm-14/bin/llvm-config"
LLVM_INCLUDE = "/usr/lib/llvm-14/include"
LLVM_LIB = "/usr/lib/llvm-14/lib"
LIBLLVM = "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs", "llvmcall.c")


def have_libllvm() -> bool:
    return os.path.exists(LIBLLVM) and os.path.isdir(os.path.join(LLVM_INCLUDE, "llvm-c"))


def build_llvmcall(out_dir: str) -> Optional[str]:
    """Compile llvmcall.c (no frame pointers) against libLLVM-14; None without it."""
    if not have_libllvm():
        return None
    out = os.path.join(out_dir, "llvmcall")
    subprocess.run(["gcc", "-O2", "-g", "-fomit-frame-pointer", "-I" + LLVM_INCLUDE, "-o", out, SOURCE,
                    "-L" + LLVM_LIB, "-lLLVM-14", "-Wl,-rpath," + LLVM_LIB], check=True)
    return out
