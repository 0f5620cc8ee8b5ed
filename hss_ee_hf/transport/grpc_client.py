"""The network transport: two `hss-ee serve` processes reached over gRPC (DESIGN.md §7).

[`GrpcTransport`] keeps one channel per server and sends each stage to both at once: party A gets the
32-byte seed of its share, party B its share bytes. Stage calls travel on long-lived bidirectional streams
([`hss_ee_hf.transport.streams`]) and fall back to unary calls for a server that has no streams to spare or
predates them. Every call has a deadline; a server that answers
`UNAVAILABLE` (restarting, briefly unreachable) is retried with exponential backoff, which is safe because
stage calls are stateless and idempotent. TLS, mutual TLS and bearer tokens come from an
[`HSSEEClientConfig`]. Every gRPC failure that remains becomes a [`TransportError`] that names the server
and says what to do.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import grpc
import torch

from ..artifacts.checkpoint import short
from ..errors import TransportError
from ..ring.sharing import Shares
from .base import PROTOCOL_VERSION, Transport, bytes_to_share
from .config import DEFAULT_TIMEOUT, HSSEEClientConfig  # noqa: F401 - DEFAULT_TIMEOUT is re-exported
from .endpoints import check_distinct_addresses, check_distinct_parties
from .grpc_errors import ADVICE, error_code, rpc_error
from .pools import grpc_target, parse_endpoints, tls_target_name
from .protos import hss_ee_pb2, hss_ee_pb2_grpc
from .replicas import describe_dict, describe_replicas
from .restarts import may_retry, reconnect_options, wait_for_server
from .service_config import client_channel_options
from .streams import STREAM_LIMIT_DETAILS, StreamPool, Watchdog

logger = logging.getLogger(__name__)

# The largest message gRPC can carry; servers enforce their own, tighter limit.
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
# Only a server that did not take the call is retried; every other status is an answer.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
# gRPC's own reconnect backoff starts at 1 s; a retry sooner than that would fail at once on a channel that
# is still waiting to reconnect, so the channel's schedule follows the retry schedule (never below this).
_MIN_RECONNECT_BACKOFF_MS = 20
# After a server refused a new stream for lack of threads, its stage calls go unary for this long.
_STREAM_RETRY_SECONDS = 10.0


def _stage_request(party: int, fingerprint: str, stage: str, shares: Shares) -> hss_ee_pb2.StageRequest:
    """What one party is sent for a stage: party A (0) the 32-byte seed of its share, party B (1) its share."""
    payload = {"seed": shares.seed} if party == 0 else {"share": shares.b.numpy().tobytes()}
    return hss_ee_pb2.StageRequest(
        version=PROTOCOL_VERSION, fingerprint=fingerprint, stage=stage, rows=shares.a.shape[0], **payload
    )


class GrpcTransport(Transport):
    """Runs stages on two share servers over gRPC, both calls in flight at once.

    Args:
        endpoints (`Sequence`): party A and party B, each a `host:port`, or a pool of replicas of the same
            checkpoint (`"a1:port,a2:port"` or `("a1:port", "a2:port")`) over which calls are spread
            (`round_robin`, healthy replicas only). An address in both pools is refused (`SharedAddressError`).
        timeout (`float`, *optional*): seconds one call (one attempt) may take before it fails with
            `DEADLINE_EXCEEDED`. Defaults to `config.timeout` (60.0).
        max_message_bytes (`int`, *optional*): send/receive limit of the channels. Defaults to
            `config.max_message_bytes`, else the largest message gRPC can carry (2 GiB - 1); each server
            enforces its own limit.
        config (`HSSEEClientConfig`, *optional*): TLS, mutual TLS, bearer token, deadline and retries.
            Plaintext, no token, 4 retries from 0.1 s when omitted. `timeout` and `max_message_bytes`, when
            given, override the config's.

    Example:

    ```python
    >>> from hss_ee_hf.transport.grpc_client import GrpcTransport
    >>> from hss_ee_hf import HSSEEClientConfig
    >>> config = HSSEEClientConfig(tls_ca_cert="ca.pem", token_file="token.txt")
    >>> with GrpcTransport(("10.0.0.1:50051", "10.0.0.2:50051"), config=config) as transport:
    ...     transport.check_fingerprint(fingerprint)
    ...     y_a, y_b = transport.run_stage(fingerprint, "layers.0.qkv", shares, out_features=576)
    ```
    """

    def __init__(
        self,
        endpoints: tuple[str, str],
        timeout: float | None = None,
        max_message_bytes: int | None = None,
        config: HSSEEClientConfig | None = None,
    ):
        pools = parse_endpoints(endpoints)  # refuses an address in both pools before any request
        config = config if config is not None else HSSEEClientConfig()
        timeout = config.timeout if timeout is None else timeout
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        if max_message_bytes is None:
            max_message_bytes = config.max_message_bytes
        limit = GRPC_MAX_MESSAGE_BYTES if max_message_bytes is None else max_message_bytes
        if not 0 < limit <= GRPC_MAX_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must be in (0, {GRPC_MAX_MESSAGE_BYTES}], got {limit}")
        self.pools = pools
        self.endpoints = pools.names  # party A's and party B's addresses, comma-separated for a pool
        self.timeout = timeout
        self.config = config
        self.retried = 0  # retry attempts made so far by this transport (gRPC's own unary retries not counted)
        self.streamed = 0  # stage calls answered on a stream (the rest were unary)
        config.check_endpoints([a for pool in pools.addresses for a in pool])
        self._credentials = credentials = config.channel_credentials()
        initial_ms = max(_MIN_RECONNECT_BACKOFF_MS, int(config.initial_backoff * 1000))
        reconnect = reconnect_options(initial_ms)
        name = [tls_target_name(pools, party, config.tls_server_name) if config.uses_tls else None for party in (0, 1)]
        self._options = tuple(
            client_channel_options(config, limit, name[party], pools.is_pool(party)) + reconnect for party in (0, 1)
        )
        secure = (lambda t, options: grpc.secure_channel(t, credentials, options=options)) if credentials else None
        self._channels = tuple(
            (secure or grpc.insecure_channel)(grpc_target(pools, party), options=self._options[party])
            for party in (0, 1)
        )
        self._stubs = tuple(hss_ee_pb2_grpc.ShareServerStub(channel) for channel in self._channels)
        self._metadata = config.call_metadata()
        self._watchdog = Watchdog()
        self._streams = tuple(StreamPool(stub.StageStream, self._metadata, self._watchdog) for stub in self._stubs)
        # Per party: monotonic time before which stage calls are unary (inf: the server has no streams).
        self._unary_until = [0.0 if config.stream else float("inf")] * 2
        self._lock = threading.Lock()
        # Two calls per stage; spare workers for a call left running after the other party failed.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hss-ee-grpc")

    def __repr__(self) -> str:
        return f"GrpcTransport(endpoints={self.endpoints}, config={self.config!r})"

    def _backoff(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (0-based): exponential, capped, with +-20 % jitter."""
        c = self.config
        base = min(c.max_backoff, c.initial_backoff * c.backoff_multiplier**attempt)
        # The library takes no randomness outside the OS CSPRNG, even for jitter (see csprng.py).
        return base * (0.8 + 0.4 * int.from_bytes(os.urandom(2), "little") / 0xFFFF)

    def _call_party(self, party: int, method: str, request, abandon: threading.Event):
        """One party's call, retried with backoff while the server answers `UNAVAILABLE`.

        Stage calls go on a pooled stream unless this server cannot take one; other methods are unary. Blocking
        calls on a pool thread: unlike `future()`, they start no gRPC polling thread per call.
        """
        endpoint = self.endpoints[party]
        attempt, started = 0, time.monotonic()
        earlier: list[str] = []  # the details of failed attempts, for the advice of the final error
        while True:
            streamed = method == "Stage" and time.monotonic() >= self._unary_until[party]
            try:
                if streamed:
                    reply = self._streams[party].call(request, self.timeout)
                    with self._lock:
                        self.streamed += 1
                    return reply
                return getattr(self._stubs[party], method)(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                code = error_code(err)
                if streamed and getattr(err, "expired", False):
                    late = f"DEADLINE_EXCEEDED: no reply within {self.timeout:g} s"
                    raise TransportError(endpoint, f"{late}; {ADVICE['DEADLINE_EXCEEDED']}") from err
                if streamed and self._stream_refused(party, code, err):
                    continue  # the same call, unary, at once: nothing was computed
                # Unary calls and streams alike are retried here (gRPC's retry policy is off, see service_config.py),
                # at least `retries` times and for as long as a restarting server may take, within the deadline.
                c = self.config
                if (
                    code in RETRYABLE_CODES
                    and not abandon.is_set()
                    and may_retry(attempt, started, c.retries, c.restart_window, self.timeout)
                ):
                    delay = self._backoff(attempt)
                    attempt += 1
                    if len(earlier) < 3:  # the first few say why; later ones often only "failed to connect"
                        earlier.append(err.details() if callable(getattr(err, "details", None)) else "")
                    with self._lock:
                        self.retried += 1
                    logger.debug(
                        "%s on %s: %s, retry %d/%d in %.3f s",
                        method,
                        endpoint,
                        code.name,
                        attempt,
                        self.config.retries,
                        delay,
                    )
                    # Back as soon as the server is: the wait ends when the channel reconnects.
                    if wait_for_server(self._channels[party], delay, abandon):  # the other party failed for good
                        raise rpc_error(endpoint, err, self.config, attempt, " ".join(earlier)) from err
                    continue
                raise rpc_error(endpoint, err, self.config, attempt + 1, " ".join(earlier)) from err

    def _stream_refused(self, party: int, code: grpc.StatusCode | None, err: grpc.RpcError) -> bool:
        """Whether a stream failed only because the server cannot open one; if so, go unary for a while."""
        if code == grpc.StatusCode.UNIMPLEMENTED:  # a server from before streams
            self._unary_until[party] = float("inf")
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and STREAM_LIMIT_DETAILS in (err.details() or ""):
            self._unary_until[party] = time.monotonic() + _STREAM_RETRY_SECONDS
        else:
            return False
        logger.info("%s cannot open a stage stream (%s); using unary calls", self.endpoints[party], code.name)
        return True

    def _call_both(self, method: str, requests: Sequence) -> list:
        """Sends one request per party at once and waits for both (each retried while `UNAVAILABLE`).

        Raises:
            `TransportError`: as soon as one party fails for good (party A first when both have), naming it.
        """
        abandon = threading.Event()
        try:  # the other parties go to the pool; the last one runs in this thread (one thread hop fewer)
            futures = [
                self._pool.submit(self._call_party, party, method, request, abandon)
                for party, request in enumerate(requests[:-1])
            ]
        except RuntimeError as err:  # the pool refuses work once close() has run
            raise TransportError(
                " and ".join(self.endpoints), "this transport is closed; create a new GrpcTransport"
            ) from err
        try:
            last = self._call_party(len(requests) - 1, method, requests[-1], abandon)
        except TransportError:
            abandon.set()
            for future in futures:  # party A first when both have failed
                if future.done() and future.exception() is not None:
                    raise future.exception() from None
            raise
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done() and future.exception() is not None:
                abandon.set()
                raise future.exception()
        return [future.result() for future in futures] + [last]

    def run_stage(
        self, fingerprint: str, stage: str, shares: Shares, out_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs one stage on both servers; see [`Transport.run_stage`].

        Raises:
            `TransportError`: naming the server that failed (after the configured retries of an unavailable
                one) or answered with a reply of the wrong size.
        """
        rows = shares.b.shape[0]
        replies = self._call_both("Stage", [_stage_request(party, fingerprint, stage, shares) for party in (0, 1)])
        y_a, y_b = (
            bytes_to_share(reply.share, rows, out_features, endpoint)
            for reply, endpoint in zip(replies, self.endpoints, strict=True)
        )
        return y_a, y_b

    def run_party(self, party: int, fingerprint: str, stage: str, shares: Shares, out_features: int) -> torch.Tensor:
        """Runs one stage on one server (retried while it is unavailable); see [`Transport.run_party`]."""
        request = _stage_request(party, fingerprint, stage, shares)
        reply = self._call_party(party, "Stage", request, threading.Event())
        return bytes_to_share(reply.share, request.rows, out_features, self.endpoints[party])

    def describe(self) -> tuple[dict, dict]:
        """Asks both servers what they serve.

        Returns:
            One dict per server, in endpoint order, with keys `endpoint`, `fingerprint`, `protocol_version`,
            `max_rows`, `instance_id`, `operator`, `stages` (stage name -> `(in_features, out_features)`, in
            forward-pass order), `schedules` (stages per decoder layer offered), `scales` (stage -> float64 output
            scales, for the stages the server built itself) and `data_port` (the server's data-plane port, 0 when
            it has none).

        Raises:
            `TransportError`: naming the server that could not be asked.
        """
        replies = self._call_both("Describe", (hss_ee_pb2.DescribeRequest(), hss_ee_pb2.DescribeRequest()))
        return tuple(describe_dict(reply, endpoint) for reply, endpoint in zip(replies, self.endpoints, strict=True))

    def describe_party(self, party: int) -> dict:
        """Asks one server what it serves, once (no retries): its entry of [`describe`].

        Raises:
            `TransportError`: naming the server, when it did not answer.
        """
        endpoint = self.endpoints[party]
        try:
            reply = self._stubs[party].Describe(
                hss_ee_pb2.DescribeRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise rpc_error(endpoint, err, self.config) from err
        return describe_dict(reply, endpoint)

    def check_fingerprint(self, fingerprint: str) -> tuple[dict, dict]:
        """Checks that both servers serve the checkpoint `fingerprint` with this client's protocol version.

        Args:
            fingerprint (`str`): the EE checkpoint's fingerprint (`HSSEECheckpointInfo.fingerprint`).

        Returns:
            `tuple[dict, dict]`: the servers' `describe()` answers, so a caller needs no second round trip.

        Raises:
            `TransportError`: naming the first server that is unreachable, serves another checkpoint, or speaks
                another protocol version. Every replica of a pool is asked on its own (one that is down is skipped
                with a warning; see [`hss_ee_hf.transport.replicas`]).
            `PartyOverlapError`: both endpoints are one server (same address after resolution, or one instance).
        """
        # Refused before any share is sent: one process holding both shares reconstructs the user's data.
        check_distinct_addresses(self.pools.addresses)
        infos = self.describe()
        check_distinct_parties(infos)
        replicas = [
            {"endpoint": address, "fingerprint": reply.fingerprint, "protocol_version": reply.protocol_version}
            for party in (0, 1)
            if self.pools.is_pool(party)
            for address, reply in describe_replicas(
                self.pools, party, self._credentials, self._options[party], self._metadata, self.timeout
            )
        ]
        # A pool's own answer came from one replica; its replicas were each asked above and are named one by one.
        singles = [info for party, info in enumerate(infos) if not self.pools.is_pool(party)]
        for info in (*singles, *replicas):
            if info["fingerprint"] != fingerprint:
                raise TransportError(
                    info["endpoint"],
                    f"serves checkpoint {short(info['fingerprint'])} but the client expects {short(fingerprint)}; "
                    "start both servers with the EE checkpoint the client loads",
                )
            if info["protocol_version"] != PROTOCOL_VERSION:
                raise TransportError(
                    info["endpoint"],
                    f"speaks protocol version {info['protocol_version']}, this client {PROTOCOL_VERSION}; "
                    "run the same hss-ee-hf version on client and servers",
                )
        return infos

    def close(self) -> None:
        """Closes both channels (calls in flight are cancelled) and the worker threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for pool in self._streams:
            pool.close()
        self._watchdog.close()
        for channel in self._channels:
            channel.close()
