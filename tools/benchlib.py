"""What the benchmark scripts share (they run as ``python3 tools/bench_*.py``,
so this directory is on sys.path)."""

from __future__ import annotations

import resource


def children_cpu() -> float:
    """CPU seconds (user + sys) of every child waited for so far: the profiler
    runs measured as subprocesses."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
