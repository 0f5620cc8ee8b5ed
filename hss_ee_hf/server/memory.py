"""Giving memory back to the OS after a burst of large requests, and not before.

A long prompt makes every stage of a request allocate `rows x width` int64 buffers (request bytes, the product,
the reply), and an image classifier's convolutions allocate tens of megabytes each (feature maps, patches, digit
planes, products). glibc serves them from per-thread malloc arenas and keeps the freed pages: after one
8,295-token prompt a SmolLM2 server stayed about 435 MB above its steady state for good. Giving each buffer back as
soon as it is freed costs the next request a page fault per 4 KiB it touches: on a 2-core Zen 3 machine, ResNet-50
with both parties in the client's process took 390,000 minor faults and 2.4-2.7 s per image that way (every block
of 1 MiB or more was mapped afresh), against 74,000 and 1.7 s when blocks of up to 32 MiB are reused.

So the allocator keeps freed memory while requests come ([`keep_freed_memory`]: blocks up to 32 MiB come from the
arenas), and [`release_after_large_request`] returns what they hold with `malloc_trim(0)` once
[`TRIM_IDLE_SECONDS`] have passed without another large request (one of at least [`TRIM_ROWS`] rows of input or
output). The decode path (one row per call) never pays for a trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

logger = logging.getLogger(__name__)

# Requests this large allocate megabytes per stage; smaller ones reuse what the allocator already holds.
TRIM_ROWS = 256
# The quiet time after the last large request before freed memory goes back to the OS (gRPC frees a reply's
# buffers only after the handler returned; they are free by then).
TRIM_IDLE_SECONDS = 0.5
_lock = threading.Lock()
_trim = None
_loaded = False
_pending: threading.Timer | None = None
_last_large = 0.0  # time.monotonic() of the last large request


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


# glibc's mallopt parameter; a fixed threshold also stops glibc moving it after each large free
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest


def keep_freed_memory() -> bool:
    """Makes glibc serve blocks of up to 32 MiB from its arenas, where a freed one waits for the next request,
    instead of mapping each one afresh (and faulting in its pages) and unmapping it when freed.

    What the arenas hold goes back in [`release_after_large_request`], once large requests stop; glibc still trims
    an arena's top on its own (its default trim threshold is unchanged). Returns `True` when glibc accepted it.
    """
    if _malloc_trim() is None:
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
    """Returns freed memory to the OS once [`TRIM_IDLE_SECONDS`] pass without another call of this function.

    One daemon timer at most is pending; a call while it waits moves the trim later, so a prompt's or an image's
    requests reuse each other's freed memory and the trim runs once, after the last of them.
    """
    global _last_large
    with _lock:
        _last_large = time.monotonic()
        if _pending is None or not _pending.is_alive():
            _trim_after(TRIM_IDLE_SECONDS)


def _trim_after(seconds: float) -> None:
    """Starts the one pending timer (the caller holds `_lock`)."""
    global _pending
    _pending = threading.Timer(seconds, _trim_when_idle)
    _pending.daemon = True
    _pending.start()


def _trim_when_idle() -> None:
    global _pending
    with _lock:
        wait = _last_large + TRIM_IDLE_SECONDS - time.monotonic()
        if wait > 0:  # a large request came meanwhile: wait for the quiet time after it
            _trim_after(wait)
            return
        _pending = None
    release_freed_memory()
