"""``perf-agent dump``: every thread's stack of a running process, now.

* :mod:`.collect` -- what is read, in which order, and what is stopped (see there);
* :mod:`.native` -- the copied stacks unwound with the DWARF walker and named;
* :mod:`.merge` -- Python frames put where the interpreter runs them;
* :mod:`.model` -- the result and its JSON schema;
* :mod:`.command` -- the command line and the text view.

The thread stop itself is :mod:`perfagent.ptrace.snapshot`.
"""
