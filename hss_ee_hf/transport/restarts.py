"""Riding out a share server's restart: how long an unavailable server is waited for, and reconnecting at once.

A server restarted for an upgrade or a crash is back within seconds, and stage calls are stateless and idempotent,
so the client waits for it instead of failing every generation in flight. Two things make that work:

* the retry window: an `UNAVAILABLE` call is retried at least `retries` times and, beyond that, for as long as
  `HSSEEClientConfig.restart_window` (bounded by the call's deadline) has not run out;
* reconnecting at once: between retries the client waits for the channel to become `READY` rather than sleeping
  the whole backoff, and the channel's own reconnect backoff is capped at [`MAX_RECONNECT_BACKOFF_MS`], so a server
  that is back is used within about a second instead of after gRPC's default backoff of up to two minutes.
"""

from __future__ import annotations

import threading
import time

import grpc

# gRPC backs off reconnecting up to 120 s by default; a restarted server must not wait behind that.
MAX_RECONNECT_BACKOFF_MS = 1000
_MIN_PAUSE = 0.05


def reconnect_options(initial_ms: int) -> list[tuple[str, int]]:
    """Channel options that retry a lost connection every `initial_ms`, growing to at most one second."""
    initial_ms = min(initial_ms, MAX_RECONNECT_BACKOFF_MS)
    return [
        ("grpc.initial_reconnect_backoff_ms", initial_ms),
        ("grpc.min_reconnect_backoff_ms", initial_ms),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def may_retry(attempt: int, started: float, retries: int, window: float, timeout: float) -> bool:
    """Whether an `UNAVAILABLE` call may be tried again.

    Args:
        attempt (`int`): retries made so far.
        started (`float`): `time.monotonic()` of the first attempt.
        retries (`int`): the guaranteed number of retries (`0` turns retrying off altogether).
        window (`float`): seconds a restarting server is waited for.
        timeout (`float`): the call's deadline, which also bounds the window.
    """
    if retries <= 0:
        return False
    return attempt < retries or time.monotonic() - started < min(window, timeout)


def wait_for_server(channel: grpc.Channel, delay: float, abandon: threading.Event) -> bool:
    """Waits up to `delay` seconds for `channel` to (re)connect, returning as soon as it is `READY`.

    Returns:
        `bool`: `True` when the caller should give up (`abandon` was set: the other party failed for good).
    """
    # A short pause first: a server shutting down keeps its connection READY while it refuses calls, and retrying
    # that at once would spin.
    if abandon.wait(min(delay, _MIN_PAUSE)):
        return True
    ready = grpc.channel_ready_future(channel)
    try:
        ready.result(timeout=max(0.0, delay - _MIN_PAUSE))
    except grpc.FutureTimeoutError:
        pass
    finally:
        ready.cancel()
    return abandon.is_set()
