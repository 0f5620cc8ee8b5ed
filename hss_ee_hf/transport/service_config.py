"""gRPC service config and channel options of the client's channels, and the server's keepalive settings.

gRPC does part of the transport's work itself once told to in a service config
(https://github.com/grpc/grpc/blob/master/doc/service_config.md):

* `round_robin` over the replicas of a party's pool, each watched through the standard health service
  (`healthCheckConfig`): a replica reporting `NOT_SERVING` (shutting down) or gone gets no new call;
* transparent retries of calls that never reached a server (`grpc.enable_retries`); gRPC keeps a request for
  that only while it fits in `grpc.per_rpc_retry_buffer_size`, so that buffer is raised to the channel's message
  limit. There is deliberately no `retryPolicy` for calls a server answered `UNAVAILABLE`: with one, such a call
  waited out its whole deadline in this grpcio (see [`service_config`]); the transport retries them itself;
* keepalive pings on both sides, so a replica whose host vanished without closing its connections (power loss,
  a cut cable) is noticed within seconds and its streams fail over instead of waiting for the deadline.

What gRPC does not provide stays in the transport: the pool of long-lived stage streams, their retries (a
stream is bound to one replica; a failed one is replaced by a new one that gRPC places on a live replica), and
the per-message deadline watchdog ([`hss_ee_hf.transport.streams`]).
"""

from __future__ import annotations

import json
from typing import Any

from .config import HSSEEClientConfig

SERVICE_NAME = "hss_ee.v1.ShareServer"
# Client pings an idle connection every 20 s and gives up on it 10 s after an unanswered ping.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
# The server accepts pings this often (a little under the client's interval) and pings idle clients itself.
SERVER_MIN_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_TIME_MS = 60_000


def service_config(config: HSSEEClientConfig, pool: bool = True) -> dict[str, Any]:
    """The service config of a channel to one party (one address or a pool of replicas).

    Args:
        config (`HSSEEClientConfig`): the client's settings (retries are the transport's own, see above).
        pool (`bool`, *optional*, defaults to `True`): the channel reaches a pool of replicas: `round_robin` over
            the healthy ones. A single address keeps gRPC's `pick_first`, which reconnects at once when a call
            needs it (round_robin reconnects on its own backoff schedule).

    Returns:
        `dict`: the service config; `json.dumps` it into the `grpc.service_config` channel option.
    """
    # No `retryPolicy`: with one, a unary Stage call the server refuses with UNAVAILABLE waited out its whole deadline
    # instead of being retried (grpcio 1.7x, measured: 5 s per refused call, against 49 ms per 2-token generation
    # with the transport's own retries). The transport retries unary calls and streams itself
    # (`GrpcTransport._call_party`, bounded by `retries` and the restart window).
    method: dict[str, Any] = {"name": [{"service": SERVICE_NAME, "method": m} for m in ("Stage", "Describe")]}
    if not pool:
        return {"methodConfig": [method]}
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        # "" is the server as a whole; `hss-ee serve` turns it NOT_SERVING when it starts to shut down.
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [method],
    }


def client_channel_options(
    config: HSSEEClientConfig, message_limit: int, target_name: str | None = None, pool: bool = True
) -> list[tuple[str, Any]]:
    """The options of a channel to one party: message limits, service config, retry buffer, keepalive, TLS name.

    Args:
        config (`HSSEEClientConfig`): retries, backoff and TLS settings.
        message_limit (`int`): send/receive limit in bytes; also the size of request kept for a retry.
        target_name (`str`, *optional*): the name the party's certificates must carry
            ([`hss_ee_hf.transport.pools.tls_target_name`]); the host of the target when omitted.
        pool (`bool`, *optional*, defaults to `True`): the channel reaches several replicas (see [`service_config`]).

    Returns:
        `list[tuple[str, Any]]`: options for `grpc.insecure_channel` / `grpc.secure_channel`.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", message_limit),
        ("grpc.max_receive_message_length", message_limit),
        ("grpc.service_config", json.dumps(service_config(config, pool))),
        ("grpc.enable_retries", 1),
        # Above the largest request, else gRPC commits a large call at once and never retries it.
        ("grpc.per_rpc_retry_buffer_size", message_limit),
        ("grpc.retry_buffer_size", message_limit),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if target_name and config.uses_tls:
        options.append(("grpc.ssl_target_name_override", target_name))
    return options


def server_keepalive_options() -> list[tuple[str, Any]]:
    """Server options that accept the clients' keepalive pings and ping idle clients (both sides, see above)."""
    return [
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]
