"""Which cores the client and the two servers use when all three share one machine (the demo, a laptop).

A decode step alternates strictly between the client and party B: the client encodes and sends, B computes while
the client waits, the client decodes and does its own work while B waits. Party A's products are prepared ahead of
time (DESIGN.md §4) and can run whenever a core is free. Left to the scheduler, the client and B keep landing on
different cores, so every one of a token's 2·121 hand-offs wakes a thread on another core (an inter-processor
interrupt, costly in a virtual machine) and A's preparation competes with whichever of them is running. Measured
on the 2-core machine (SmolLM2, 32 tokens, ms/token, two runs): scheduler's choice 95.6 / 81.3, client and B on
one core with A on the other 69.4 / 70.3; pinning only the servers, or only the client, gains nothing.

So when both servers are on loopback, the client tells each data-plane connection where its server's thread should
run, in the HELLO's otherwise unused fields: party B's thread runs **together** with the calling thread on its
home core, party A's **apart** from it (every other core the server may use). The client pins its calling thread to
that core while it generates (and restores its cores after). A server follows a hint only from a loopback peer, and
only for that connection's thread; a hint naming a core the server may not use is ignored. Nothing about the data
is in it. A thread started from inside `generate()` (say, by a streamer's callback) inherits the one core. Turn it
off with `HSSEEClientConfig(colocate=False)` or `HSS_EE_COLOCATE=0`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

NO_HINT, TOGETHER, APART = 0, 1, 2
"""Placement hints a HELLO carries (its flag byte; its last word names the core)."""

_sched_getcpu = None


def enabled() -> bool:
    """Whether placement is allowed here: Linux, and `HSS_EE_COLOCATE` is not `0` (read on both sides)."""
    return hasattr(os, "sched_setaffinity") and os.environ.get("HSS_EE_COLOCATE", "1") != "0"


def supported() -> bool:
    """Whether threads can be pinned here and there are at least two cores to place them on."""
    if not enabled():
        return False
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except OSError:
        return False


def current_cpu() -> int | None:
    """The core the calling thread runs on now (`sched_getcpu`), or `None` where that cannot be asked."""
    global _sched_getcpu
    if _sched_getcpu is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _sched_getcpu = libc.sched_getcpu
            _sched_getcpu.restype = ctypes.c_int
            _sched_getcpu.argtypes = []
        except (OSError, AttributeError):
            _sched_getcpu = False
    if not _sched_getcpu:
        return None
    cpu = _sched_getcpu()
    return cpu if cpu >= 0 else None


def home_cpu() -> int:
    """A core for the calling thread: the one it runs on now (so sessions spread as the scheduler spread them)."""
    allowed = os.sched_getaffinity(0)
    cpu = current_cpu()
    return cpu if cpu in allowed else min(allowed)


@contextlib.contextmanager
def pinned(cpu: int | None):
    """Runs the block with the calling thread on core `cpu` alone (restored after); `None` changes nothing."""
    if cpu is None:
        yield
        return
    try:
        before = os.sched_getaffinity(0)
        if cpu not in before:
            yield
            return
        os.sched_setaffinity(0, {cpu})
    except OSError as err:  # a cpuset changed under us: run unpinned
        logger.debug("could not pin the calling thread to core %d: %s", cpu, err)
        yield
        return
    try:
        yield
    finally:
        try:
            os.sched_setaffinity(0, before)
        except OSError:
            pass


def follow_hint(mode: int, cpu: int) -> set[int] | None:
    """Places the calling (connection) thread as a loopback client's HELLO asked; returns its cores, or `None`.

    `TOGETHER` runs it on `cpu` alone, `APART` on every allowed core but `cpu`. Unknown modes, cores this process
    may not use, and an `APART` that would leave no core are ignored.
    """
    if mode not in (TOGETHER, APART) or not enabled():
        return None
    try:
        allowed = os.sched_getaffinity(0)
        if cpu not in allowed:
            return None
        cores = {cpu} if mode == TOGETHER else allowed - {cpu}
        if not cores:
            return None
        os.sched_setaffinity(0, cores)
        return cores
    except OSError:
        return None
