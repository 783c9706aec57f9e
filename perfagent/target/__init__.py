"""Everything the agent learns about a target process, in one place.

This package is the only code that reads ``/proc/PID/*``, reads a target's
memory, or opens the files a target maps:

* :mod:`.procfs` -- bounded readers and tolerant parsers of /proc files;
* :mod:`.process` -- identity (pid + start time), comm, uid, namespaces,
  cgroup and container labels;
* :mod:`.files` -- ``open_as_seen`` (the exact file a mapping maps) and
  defensive opening of files other users control;
* :mod:`.memory` -- reading target memory with process_vm_readv;
* :mod:`.container` -- container and pod ids from cgroup paths.
"""
