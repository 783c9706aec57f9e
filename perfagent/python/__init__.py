"""CPython support: find 3.12+ interpreters and switch their perf trampoline.

* :func:`detect.detect` -- is PID a CPython we can inject, and where are
  the functions to call;
* :func:`inject.activate` / :func:`inject.deactivate` -- run
  ``sys.activate_stack_trampoline('perf')`` / ``sys.deactivate_stack_trampoline()``
  in the target through ptrace (a :class:`inject.Session` keeps the
  injection stub of one process between the two).
"""

from .detect import InjectionSkip, PythonTarget, detect
from .inject import InjectionError, Session, activate, deactivate, open_session

__all__ = ["InjectionError", "InjectionSkip", "PythonTarget", "Session", "activate", "deactivate", "detect",
           "open_session"]
