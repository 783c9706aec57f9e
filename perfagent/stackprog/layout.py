"""The memory layouts the stack-capture programs and user space share.

One capture is built in this CPU's slot of a per-CPU scratch array (the BPF
stack has 512 bytes), laid out as ``struct capture``.  In record mode the
slot itself is sent to the ring buffer, up to the end of the stack bytes
copied; in aggregate mode its parts are the values of the stack stores.

    struct stack {                       // a kernel or frame-pointer user stack
        __u32 n;                 0       addresses in ips[]
        __u32 pad;               4
        __u64 ips[127];          8       leaf first (PERF_MAX_STACK_DEPTH)
    };                           1024

    struct pyframe {                     // one entry of a Python stack
        __u64 code;              0       PyCodeObject * (tag bits cleared); for a
                                         PYFRAME_LINK entry: the C-stack link address
        __u32 instr;             8       byte offset of the instruction (3.11+) / f_lasti
        __u32 flags;             12      PYFRAME_LINK, or the code's co_firstlineno
                                         (PYFRAME_LINENO_MASK) read at the same instant:
                                         user space, naming the code object later,
                                         knows when its address now holds another one
    };                           16

    struct pystack {
        __u32 n;                 0       entries in frames[], leaf first
        __u32 flags;             4       PYSTACK_* below
        struct pyframe frames[PY_MAX_FRAMES];
    };

    struct capture {
        struct header hdr;       0         (HEADER, below)
        struct stack kernel;     KERNEL_OFF
        struct pystack python;   PYTHON_OFF
        union {                  STACK_OFF
            __u8 stack[];                  user stack bytes from sp (record mode, with a copy)
            struct {
                struct stack user;         the user stack walked by frame pointers or in the kernel
                __u64 sps[127];  SPS_OFF   the in-kernel walk's frames' sps (stackprog.kunwind)
            };
        };
    };

A record sends the capture up to the end of the copied stack bytes; the
frame-pointer user stack shares their place because a capture has one or
the other (the off-CPU program falls back to it only once its record could
not be sent).  A PYFRAME_LINK entry sits rootward of the frames one C-level
call of the eval loop ran (3.11+), and holds the address by which that call
is found among the native frames (3.11: its _PyCFrame; 3.12+: its entry
frame), both locals of that _PyEval_EvalFrameDefault activation; once
the user stack is walked in the kernel, the index of the native frame
holding it (PYFRAME_LINK_INDEX).

    struct header {
        __u32 kind;              0       RECORD_* below
        __u32 tid;               4
        __u32 tgid;              8
        __u32 cpu;               12
        __u64 time;              16      bpf_ktime_get_ns(); off-CPU: the episode's start
        __u64 period;            24      on-CPU: the sample's period (ns); off-CPU: 0
        __u64 regs[8];           32      user registers, arch.UNWIND_PT_REGS order; 0 without
        __u32 stack_size;        96      bytes in stack[]
        __u32 flags;             100     CAPTURE_* below
        __u64 reserved;          104
    };                           112
"""

from __future__ import annotations

import struct

PERF_MAX_STACK_DEPTH = 127

STACK_N_OFF = 0
STACK_IPS_OFF = 8
STACK_SIZE = STACK_IPS_OFF + 8 * PERF_MAX_STACK_DEPTH   # 1024
STACK = struct.Struct("<II%dQ" % PERF_MAX_STACK_DEPTH)
assert STACK.size == STACK_SIZE

#: The Python walk's bound (frames and links): beyond it the stack is
#: truncated, and counted.
PY_MAX_FRAMES = 192
PYFRAME = struct.Struct("<QII")
PYFRAME_SIZE = PYFRAME.size   # 16
PYSTACK_HDR = struct.Struct("<II")
PYSTACK_SIZE = PYSTACK_HDR.size + PYFRAME_SIZE * PY_MAX_FRAMES

# pyframe.flags
PYFRAME_LINK = 1 << 31     # not a frame: ``code`` is the C-stack link of the eval call below
PYFRAME_LINENO_MASK = PYFRAME_LINK - 1
#: With PYFRAME_LINK: the in-kernel user walk (perfagent.stackprog.kunwind)
#: found the native frame whose stack bytes hold the link, and ``code`` is
#: that frame's index in the user stack (leaf 0), not the address: the
#: stored Python stack is the same wherever the thread's stack lies.
PYFRAME_LINK_INDEX = 1 << 30

# pystack.flags
PYSTACK_TRUNCATED = 1      # more than PY_MAX_FRAMES frames
PYSTACK_BAD_READ = 2       # a pointer could not be read: the stack ends early
PYSTACK_NO_THREAD = 4      # a CPython process, but this thread has no thread state (yet)

HEADER = struct.Struct("<IIIIQQ8QIIQ")
HEADER_SIZE = HEADER.size  # 112
H_KIND, H_TID, H_TGID, H_CPU, H_TIME, H_PERIOD, H_REGS = 0, 4, 8, 12, 16, 24, 32
H_STACK_SIZE, H_FLAGS, H_RESERVED = 96, 100, 104

# header.kind
RECORD_STACK = 1           # off-CPU: a thread switched out blocked (its stacks)
RECORD_END = 2             # off-CPU: that episode ended (struct episode_end, collector.py)
RECORD_SAMPLE = 3          # on-CPU: one sample
RECORD_WAKE = 4            # no payload: the count map wants a drain (accounting.emit_accumulate)

# header.flags
CAPTURE_USER = 1           # regs (and stack bytes) are valid: a user thread

KERNEL_OFF = HEADER_SIZE
PYTHON_OFF = KERNEL_OFF + STACK_SIZE
STACK_OFF = PYTHON_OFF + PYSTACK_SIZE
USER_OFF = STACK_OFF
# Frames start 8-byte aligned (the verifier and the loads want it).
assert STACK_OFF % 8 == 0 and PYTHON_OFF % 8 == 0


SPS_OFF = USER_OFF + STACK_SIZE
SPS_SIZE = 8 * PERF_MAX_STACK_DEPTH


def scratch_size(copy_bytes: int, pages: int) -> int:
    """Bytes of one CPU's scratch slot: a capture with room for ``pages``
    pages of stack copy (0 without a copy), or for a user stack and the
    sps of its walk in the kernel."""
    return STACK_OFF + max(pages * 4096 if copy_bytes else 0, STACK_SIZE + SPS_SIZE)
