"""perfagent: a zero-dependency Linux profiler that writes pprof.

Standard library and ctypes only; runs on CPython 3.8+.
"""

__version__ = "0.1.0"

#: The library API (perfagent.api): ``Capture``, ``Profile``, ``profile``.
__all__ = ["Capture", "Profile", "profile", "__version__"]


def __getattr__(name):
    # Lazy: `import perfagent` (and the command line's --help) stays cheap.
    if name in ("Capture", "Profile", "profile"):
        from perfagent import api
        return getattr(api, name)
    raise AttributeError("module 'perfagent' has no attribute %r" % name)
