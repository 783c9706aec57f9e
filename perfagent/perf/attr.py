"""struct perf_event_attr and the constants that fill it.

The layout follows include/uapi/linux/perf_event.h.  We pack the structure
up to PERF_ATTR_SIZE_VER5 (112 bytes) and set ``size`` explicitly: the kernel
accepts any known size at least as large as VER0 and zero-fills what we do
not pass, so one layout works from Linux 4.1 to today.
"""

from __future__ import annotations

import struct
from typing import Dict

# enum perf_type_id
PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2

# enum perf_sw_ids
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_COUNT_SW_TASK_CLOCK = 1
PERF_COUNT_SW_DUMMY = 9

# enum perf_event_sample_format
PERF_SAMPLE_IP = 1 << 0
PERF_SAMPLE_TID = 1 << 1
PERF_SAMPLE_TIME = 1 << 2
PERF_SAMPLE_ADDR = 1 << 3
PERF_SAMPLE_READ = 1 << 4
PERF_SAMPLE_CALLCHAIN = 1 << 5
PERF_SAMPLE_ID = 1 << 6
PERF_SAMPLE_CPU = 1 << 7
PERF_SAMPLE_PERIOD = 1 << 8
PERF_SAMPLE_STREAM_ID = 1 << 9
PERF_SAMPLE_RAW = 1 << 10
PERF_SAMPLE_BRANCH_STACK = 1 << 11
PERF_SAMPLE_REGS_USER = 1 << 12
PERF_SAMPLE_STACK_USER = 1 << 13
PERF_SAMPLE_WEIGHT = 1 << 14
PERF_SAMPLE_DATA_SRC = 1 << 15
PERF_SAMPLE_IDENTIFIER = 1 << 16

# The single-bit fields of perf_event_attr's flags word, in declaration order.
ATTR_FLAG_BITS: Dict[str, int] = {
    name: bit
    for bit, name in enumerate(
        (
            "disabled", "inherit", "pinned", "exclusive", "exclude_user",
            "exclude_kernel", "exclude_hv", "exclude_idle", "mmap", "comm",
            "freq", "inherit_stat", "enable_on_exec", "task", "watermark",
            "precise_ip", "precise_ip_hi", "mmap_data", "sample_id_all",
            "exclude_host", "exclude_guest", "exclude_callchain_kernel",
            "exclude_callchain_user", "mmap2", "comm_exec", "use_clockid",
            "context_switch", "write_backward", "namespaces", "ksymbol",
            "bpf_event", "aux_output", "cgroup", "text_poke", "build_id",
            "inherit_thread", "remove_on_exec", "sigtrap",
        )
    )
}

PERF_ATTR_SIZE_VER0 = 64
PERF_ATTR_SIZE_VER5 = 112

# struct perf_event_attr {                         offset
#     __u32 type;                                   0
#     __u32 size;                                   4
#     __u64 config;                                 8
#     union { __u64 sample_period, sample_freq; };  16
#     __u64 sample_type;                            24
#     __u64 read_format;                            32
#     __u64 disabled:1, inherit:1, ... (flags);     40
#     union { __u32 wakeup_events, wakeup_watermark; };  48
#     __u32 bp_type;                                52
#     union { __u64 bp_addr, kprobe_func, uprobe_path, config1; };  56
#     union { __u64 bp_len, kprobe_addr, probe_offset, config2; };  64
#     __u64 branch_sample_type;                     72
#     __u64 sample_regs_user;                       80
#     __u32 sample_stack_user;                      88
#     __s32 clockid;                                92
#     __u64 sample_regs_intr;                       96
#     __u32 aux_watermark;                          104
#     __u16 sample_max_stack;                       108
#     __u16 __reserved_2;                           110
# };                                                112 = PERF_ATTR_SIZE_VER5
PERF_EVENT_ATTR = struct.Struct("<IIQQQQQIIQQQQIiQIHH")
assert PERF_EVENT_ATTR.size == PERF_ATTR_SIZE_VER5


def attr_flags(**flags: bool) -> int:
    """The flags word from named bits: ``attr_flags(disabled=True, freq=True)``."""
    word = 0
    for name, on in flags.items():
        if on:
            word |= 1 << ATTR_FLAG_BITS[name]
    return word


def pack_attr(
    type: int,
    config: int,
    sample_period_or_freq: int,
    sample_type: int,
    flags: int,
    wakeup_events_or_watermark: int = 0,
    read_format: int = 0,
    sample_regs_user: int = 0,
    sample_stack_user: int = 0,
    clockid: int = 0,
    sample_max_stack: int = 0,
) -> bytes:
    """A perf_event_attr as bytes, ``size`` set to what we pack."""
    return PERF_EVENT_ATTR.pack(
        type, PERF_ATTR_SIZE_VER5, config, sample_period_or_freq, sample_type,
        read_format, flags, wakeup_events_or_watermark, 0, 0, 0, 0,
        sample_regs_user, sample_stack_user, clockid, 0, 0, sample_max_stack, 0,
    )
