"""Long-lived `StageStream` calls: a bidirectional gRPC stream per server, reused for every stage call.

A unary call sets up a new HTTP/2 stream and hands the request to a fresh server thread every time; on an
open stream a stage call is one message each way. On loopback, one row of a SmolLM2 layer stage took 0.73-0.88 ms
instead of 0.94-1.19 ms per call and a third less server CPU (`bench/roundtrip.py`).

Replies on a stream come back in request order, so a stream carries one call at a time: [`StreamPool`] lends
a stream to one caller, opens another when two callers overlap (the client's background party-A worker and
its main thread), and drops a stream whose call failed, so the next call opens a fresh one. A stream has no
per-message deadline in gRPC, so a [`Watchdog`] thread cancels a call whose reply is late, and the caller
reports `DEADLINE_EXCEEDED` exactly as a unary call would. The servers stay stateless: a stream is only a
cheaper way to send the same independent requests.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc

_END = object()
# A server with every stream slot taken refuses a new stream with RESOURCE_EXHAUSTED and these words; the client
# then uses unary calls, which the server keeps threads for.
STREAM_LIMIT_DETAILS = "no stage stream slot free"


class Watchdog:
    """Cancels stream calls whose reply is late. One thread per transport, asleep while nothing is in flight."""

    def __init__(self):
        self._cond = threading.Condition()
        self._pending: dict[int, tuple[float, StageStream]] = {}
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, stream: StageStream, timeout: float) -> int:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hss-ee-stream-deadlines", daemon=True)
                self._thread.start()
            self._next_id += 1
            was_idle = not self._pending
            self._pending[self._next_id] = (time.monotonic() + timeout, stream)
            if was_idle:  # a later deadline than one already pending needs no wake-up
                self._cond.notify()
            return self._next_id

    def disarm(self, ticket: int) -> None:
        with self._cond:
            self._pending.pop(ticket, None)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._pending:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                late = [ticket for ticket, (deadline, _) in self._pending.items() if deadline <= now]
                for ticket in late:
                    self._pending.pop(ticket)[1].expire()
                if not late:
                    self._cond.wait(min(deadline for deadline, _ in self._pending.values()) - now)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


class StageStream:
    """One open `StageStream` call to one server. Not thread-safe: [`StreamPool`] lends it to one caller.

    Args:
        method (`grpc.StreamStreamMultiCallable`): the stub's `StageStream`.
        metadata (`tuple`): call metadata (the bearer token), sent once when the stream opens.
    """

    def __init__(self, method: grpc.StreamStreamMultiCallable, metadata):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies = method(iter(self._requests.get, _END), metadata=metadata)
        self.expired = False

    def exchange(self, request, timeout: float, watchdog: Watchdog):
        """Sends one request and returns its reply.

        Raises:
            `grpc.RpcError`: the stream failed (the server refused the request, went away, or the reply was later
                than `timeout` seconds, in which case `self.expired` is set).
        """
        self._requests.put(request)
        ticket = watchdog.arm(self, timeout)
        try:
            return next(self._replies)
        finally:
            watchdog.disarm(ticket)

    def expire(self) -> None:
        self.expired = True
        self._replies.cancel()

    def close(self) -> None:
        self._requests.put(_END)
        self._replies.cancel()


class StreamPool:
    """Open streams to one server, each lent to one caller at a time.

    Args:
        method (`grpc.StreamStreamMultiCallable`): the stub's `StageStream`.
        metadata (`tuple`): call metadata for new streams.
        watchdog (`Watchdog`): enforces per-call deadlines.
    """

    def __init__(self, method: grpc.StreamStreamMultiCallable, metadata, watchdog: Watchdog):
        self._method, self._metadata, self._watchdog = method, metadata, watchdog
        self._idle: list[StageStream] = []
        self._lock = threading.Lock()
        self._closed = False

    def call(self, request, timeout: float):
        """One stage call on a pooled stream (a new one when all are lent out). A failed stream is dropped.

        Raises:
            `grpc.RpcError`: as [`StageStream.exchange`]; `err.expired` tells a missed deadline from a refusal.
        """
        with self._lock:
            stream = self._idle.pop() if self._idle else None
        reused = stream is not None
        if stream is None:
            stream = StageStream(self._method, self._metadata)
        try:
            reply = stream.exchange(request, timeout, self._watchdog)
        except grpc.RpcError as err:
            stream.close()
            if reused and not stream.expired and err.code() == grpc.StatusCode.UNAVAILABLE:
                # a stream opened before the server restarted: try a fresh one at once, not after a backoff
                return self.call(request, timeout)
            err.expired = stream.expired
            raise
        except StopIteration:  # the server ended the stream without a status: treat it as gone
            stream.close()
            raise _StreamEnded() from None
        with self._lock:
            if self._closed:
                stream.close()
            else:
                self._idle.append(stream)
        return reply

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for stream in idle:
            stream.close()


class _StreamEnded(grpc.RpcError):
    """The server closed a stream without answering; retried like `UNAVAILABLE`."""

    expired = False

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the server closed the stage stream without a reply"
