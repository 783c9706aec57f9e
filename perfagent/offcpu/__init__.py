"""Stack profiles aggregated in the kernel by BPF programs.

* ``collector.OffCpuCollector``: where threads block and for how long
  (a sched_switch program); yields ``OffCpuStack``.
* ``inkernel.InKernelSampler``: on-CPU cpu-clock samples counted per stack
  in a BPF map instead of written to perf ring buffers (frame-pointer user
  stacks only); yields ``OnCpuStack``.

Both key their counts by (tgid, tid, user stack id, kernel stack id) and
return instruction pointers leaf first; symbolization is the caller's.
"""

from perfagent.offcpu.collector import OffCpuCollector, OffCpuStack, strip_tracing_frames  # noqa: F401
from perfagent.offcpu.inkernel import InKernelSampler, OnCpuStack  # noqa: F401
