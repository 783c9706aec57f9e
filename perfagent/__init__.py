"""perfagent: a zero-dependency Linux profiler that writes pprof.

Standard library and ctypes only; runs on CPython 3.8+.
"""

__version__ = "0.1.0"
