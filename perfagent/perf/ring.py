"""The perf ring buffer: one mmap'ed metadata page plus 2^n data pages.

The kernel writes records at ``data_head`` and never past our ``data_tail``;
we read [tail, head), copy it out (handling the wrap at the end of the data
area, which may split a record in two), and then publish the new tail.
Ordering: head must be read before the data (x86-64 keeps loads in order,
see perfagent.arch), and the tail written only after the copy is complete
(a store is not reordered before earlier loads on either architecture we
support, and the copy finishes inside mmap's slice operation).
"""

from __future__ import annotations

import mmap
import struct

PAGE_SIZE = mmap.PAGESIZE

# struct perf_event_mmap_page (first page of the mapping), the fields we use:
#     __u64 data_head;    /* offset 1024: head in the data section */
#     __u64 data_tail;    /* offset 1032: user-space written tail */
#     __u64 data_offset;  /* offset 1040: where the buffer starts */
#     __u64 data_size;    /* offset 1048: data buffer size */
_U64 = struct.Struct("<Q")
DATA_HEAD_OFFSET = 1024
DATA_TAIL_OFFSET = 1032
DATA_OFFSET_OFFSET = 1040
DATA_SIZE_OFFSET = 1048


class RingBuffer:
    """Reader of one event's ring buffer (``data_pages`` must be a power of two)."""

    __slots__ = ("fd", "_mm", "_data_offset", "_data_size", "_tail", "bytes_read")

    def __init__(self, fd: int, data_pages: int) -> None:
        if data_pages <= 0 or data_pages & (data_pages - 1):
            raise ValueError("data_pages must be a power of two, got %d" % data_pages)
        self.fd = fd
        self._mm = mmap.mmap(fd, (1 + data_pages) * PAGE_SIZE, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        # Kernels before 4.1 leave data_offset/data_size zero: the data area
        # then starts at the second page and spans the rest of the mapping.
        self._data_offset = _U64.unpack_from(self._mm, DATA_OFFSET_OFFSET)[0] or PAGE_SIZE
        self._data_size = _U64.unpack_from(self._mm, DATA_SIZE_OFFSET)[0] or data_pages * PAGE_SIZE
        self._tail = _U64.unpack_from(self._mm, DATA_TAIL_OFFSET)[0]
        self.bytes_read = 0

    @property
    def data_size(self) -> int:
        return self._data_size

    def pending(self) -> int:
        """Bytes written by the kernel and not yet read."""
        return _U64.unpack_from(self._mm, DATA_HEAD_OFFSET)[0] - self._tail

    def read(self) -> bytes:
        """Copy out every complete record the kernel has published, and release them
        (bytes, or a bytearray when the range wrapped: one copy either way)."""
        head = _U64.unpack_from(self._mm, DATA_HEAD_OFFSET)[0]
        tail = self._tail
        if head == tail:
            return b""
        size = self._data_size
        n = head - tail
        if n > size:  # cannot happen unless the buffer was overwritten; keep the newest
            tail = head - size
            n = size
        start = tail & (size - 1)
        base = self._data_offset
        if start + n <= size:
            data = self._mm[base + start: base + start + n]
        else:  # the range wraps: the second part is at the beginning of the data area
            first = size - start
            # One copy straight into the result (slicing both parts and
            # concatenating them copied every byte twice).
            out = bytearray(n)
            with memoryview(self._mm) as mm:
                out[:first] = mm[base + start: base + size]
                out[first:] = mm[base: base + n - first]
            data = out
        _U64.pack_into(self._mm, DATA_TAIL_OFFSET, head)
        self._tail = head
        self.bytes_read += n
        return data

    def close(self) -> None:
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass
