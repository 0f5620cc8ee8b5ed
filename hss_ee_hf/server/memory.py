"""Giving memory back to the OS after a large request.

A long prompt makes every stage of a request allocate `rows x width` int64 buffers (request bytes, the product,
the reply) in the gRPC worker threads. glibc serves them from per-thread malloc arenas and keeps the freed pages:
after one 8,295-token prompt a SmolLM2 server stayed about 435 MB above its steady state for good. `malloc_trim(0)`
returns the free pages of every arena to the OS; it is called only after requests of at least [`TRIM_ROWS`] rows,
so the decode path (one row per call) never pays for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

logger = logging.getLogger(__name__)

# Requests this large allocate megabytes per stage; smaller ones reuse what the allocator already holds.
TRIM_ROWS = 256
# gRPC frees a reply's buffers only after the handler returned; a second trim shortly after catches those.
TRIM_DELAY_SECONDS = 0.5
_lock = threading.Lock()
_trim = None
_loaded = False
_pending: threading.Timer | None = None


def _malloc_trim():
    """glibc's `malloc_trim`, or `None` on other C libraries (musl, macOS), where there is nothing to do."""
    global _trim, _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _trim = libc.malloc_trim
                _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                logger.debug("malloc_trim is not available; freed memory stays with the allocator")
    return _trim


# glibc's mallopt parameter; a fixed threshold also stops glibc raising it after each large free.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def use_mmap_for_large_buffers() -> bool:
    """Makes glibc serve allocations of 1 MiB and more with `mmap`, so freeing one returns it to the OS at once.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which large
    request buffers come from the arenas and stay there. Returns `True` when glibc accepted the setting.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD_BYTES)))


def release_freed_memory() -> bool:
    """Returns the allocator's free pages to the OS; `True` when glibc's `malloc_trim` ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def release_after_large_request() -> None:
    """Trims now and once more [`TRIM_DELAY_SECONDS`] later (one pending trim at most, on a daemon timer)."""
    global _pending
    release_freed_memory()
    with _lock:
        if _pending is not None and _pending.is_alive():
            return
        _pending = threading.Timer(TRIM_DELAY_SECONDS, release_freed_memory)
        _pending.daemon = True
        _pending.start()
