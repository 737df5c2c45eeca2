"""Hand memory the allocator keeps after large frees back to the operating system.

glibc's malloc serves blocks below its mmap threshold (which rises to 32 MiB once large blocks
are freed) from its heaps, and keeps what is freed there for later requests. After a step
that builds and drops hundreds of MiB (flatten's folded copies, a widened block's
intermediates), the process holds that memory, so its peak grows with each step that comes
after, although the tensors alive stay the same. ``malloc_trim`` gives the free pages back.
On the default model (32 windows) trimming between the steps of pruning lowers the peak RSS
of the prune stage from 1853 to 1659 MiB and costs 0.5 s in all.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_free_memory() -> None:
    """Return the allocator's free memory to the system (glibc); elsewhere do nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
