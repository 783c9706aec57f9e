"""``perf-agent report``: read a pprof profile and show it.

Views (top table, call tree, folded stacks, SVG flame graph) all work on
one ``StackSet`` built by ``stacks.load_stacks``, filtered, then (unless
``--native``) cut to the Python-first view by ``stacks.python_first``, so
every view agrees on what a frame and a sample value are.
"""
