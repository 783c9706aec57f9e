"""One BPF stack-capture program generator for every source of stacks.

The on-CPU sampler (a BPF_PROG_TYPE_PERF_EVENT program on the cpu-clock
events) and the off-CPU collector (a tp_btf program on sched_switch) capture
the same things at their instant: the thread's kernel stack, its user
stack -- as the kernel's frame-pointer walk, or as registers plus a copy of
the stack bytes for a DWARF unwind in user space -- and, for a CPython
thread, its Python stack read from the interpreter's own memory.  This
package writes that capture once (:mod:`.capture`) and the two programs
around it (:mod:`.program`), so a change to what a stack is reaches both.

What a program does with a capture is one of two things:

* **aggregate** -- each part is stored in a content-addressed *stack store*
  (:mod:`.store`: a hash map keyed by a 64-bit hash of the part's words,
  inserted with BPF_NOEXIST) and a count map adds up samples (or blocked
  time) per (tgid, tid, kernel hash, user hash, Python hash).  User space
  drains both maps every cycle and *deletes what it read*: an entry is
  re-inserted the next time its stack is seen, and a count whose stack was
  drained earlier resolves from user space's cache.  Since a key is derived
  from content and not from a bucket, deleting cannot make an old key name a
  different stack, so the kernel maps stay as small as one cycle's distinct
  stacks on a run of any length.  (The kernel's BPF_MAP_TYPE_STACK_TRACE
  cannot do this: its ids are bucket indexes, reused after deletion.)
* **kunwind** -- the user stack is walked in the kernel with the binaries'
  CFI (:mod:`.kunwind`) and the result aggregated as above; a walk the
  kernel leaves to user space is sent as a record (below).
* **record** -- the whole capture goes to a BPF ring buffer as one record
  (:mod:`.layout`): with a stack copy, the user stack travels with the
  sample's registers, kernel stack and Python frames in the same record:
  nothing is paired by time.
"""
