"""``perf-agent report``: read a pprof profile and show it.

Views (top table, call tree, folded stacks, SVG flame graph) all work on
one ``StackSet`` built by ``stacks.load_stacks`` after the filters ran, so
every view agrees on what a frame and a sample value are.
"""
