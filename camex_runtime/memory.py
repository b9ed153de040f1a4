"""Giving freed memory back to the operating system.

glibc's malloc keeps freed blocks inside its heap for reuse; after a burst of large, short-lived
allocations (restacking expert weights at load, a batch of long classifications) the process
keeps that memory resident although nothing uses it. `release_freed_memory` asks glibc to
return every free page (malloc_trim(0) also releases holes in the middle of the heap); on a
C library without it, it does nothing. Knows nothing about models.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Return free heap pages to the OS; True when the C library could be asked."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
