"""CPython support: find 3.12+ interpreters and switch their perf trampoline.

* :func:`detect.detect` -- is PID a CPython we can inject, and where are
  the functions to call;
* :func:`inject.activate` / :func:`inject.deactivate` -- run
  ``sys.activate_stack_trampoline('perf')`` / ``sys.deactivate_stack_trampoline()``
  in the target through ptrace (a :class:`inject.Session` keeps the
  injection stub of one process between the two).

``inject``'s names are imported on first use (PEP 562): the in-kernel
walk imports this package for its layouts and readers, and would otherwise
compile the whole ptrace injection path (a sixth of the agent's source) on
every run that never injects.  ``detect`` stays eager: its function must
shadow the submodule of the same name, as it always did.
"""

import importlib

from .detect import InjectionSkip, PythonTarget, detect

_LAZY = {
    "InjectionError": "inject", "Session": "inject", "activate": "inject", "deactivate": "inject",
    "open_session": "inject",
}

__all__ = ["InjectionError", "InjectionSkip", "PythonTarget", "Session", "activate", "deactivate", "detect",
           "open_session"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    value = getattr(importlib.import_module("." + module, __name__), name)
    globals()[name] = value
    return value
