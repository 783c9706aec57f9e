"""``perf-agent top``: a live view of the functions using the CPU.

* ``window``  -- a running capture's stacks, named once, summed over a
  sliding window of per-interval increments, reduced to per-function
  self and total time with the report's Python-first view;
* ``screen``  -- the terminal: an interactive full-screen view (cbreak
  keys, ANSI redraws) or plain periodic tables on a pipe;
* ``command`` -- flags, the capture (perfagent.session.Capture, as the
  capture command drives it) and the refresh loop.
"""
