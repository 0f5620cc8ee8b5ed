"""The share server: a [`StageEngine`] behind gRPC and its binary data plane (DESIGN.md §7, §8).

One process is one party (A or B). It serves the `ShareServer` service of [`hss_ee_hf.server.servicer`]
(`Stage`, `StageStream`, `Describe`), exposes the standard gRPC health service, and keeps no state
between requests. This module binds it to a port with message limits sized to the largest stage,
TLS, mutual TLS and bearer tokens from an [`HSSEEServerSecurity`], and a graceful shutdown on
SIGINT/SIGTERM. Next to it, on a second port that `Describe` advertises, the data plane
([`hss_ee_hf.server.socket_server`]) answers the same stage calls as binary frames with the same security.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..artifacts.checkpoint import short
from ..errors import HSSEEError
from ..transport.base import PROTOCOL_VERSION
from ..transport.service_config import server_keepalive_options
from .engine import StageEngine
from .handle import ShareServerHandle
from .options import DEFAULT_MAX_ROWS
from .security import HSSEEServerSecurity
from .servicer import SERVICE_NAME, ShareServicer, share_server_handler  # noqa: F401 - SERVICE_NAME is re-exported
from .socket_server import DataPlaneServer

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50051
DEFAULT_MAX_WORKERS = 32
DEFAULT_GRACE_SECONDS = 5.0
# gRPC and protobuf cannot carry a message of 2 GiB or more.
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
# Room for the non-payload fields of a message (fingerprint, stage name, rows, tags and lengths).
MESSAGE_HEADROOM_BYTES = 1 << 16


class ShareServerError(HSSEEError, RuntimeError):
    """The share server cannot start: its port cannot be bound or its stages do not fit in a gRPC message."""


def message_limit(engine: StageEngine) -> int:
    """The gRPC send/receive limit a server for `engine` needs: its largest payload plus framing headroom.

    Raises:
        `ShareServerError`: the largest payload does not fit in one gRPC message.
    """
    needed = engine.max_message_bytes + MESSAGE_HEADROOM_BYTES
    if needed > GRPC_MAX_MESSAGE_BYTES:
        raise ShareServerError(
            f"with max_rows={engine.max_rows} the largest stage payload is {engine.max_message_bytes} bytes, more "
            f"than one gRPC message can carry (2 GiB); use at most {fitting_max_rows(engine)} rows (`--max-rows`)"
        )
    return needed


def fitting_max_rows(engine: StageEngine) -> int:
    """The largest `max_rows` whose widest stage payload still fits in one gRPC message."""
    per_row = engine.max_message_bytes // engine.max_rows
    return max(1, (GRPC_MAX_MESSAGE_BYTES - MESSAGE_HEADROOM_BYTES) // per_row)


def fit_max_rows(engine: StageEngine) -> None:
    """Lowers `engine.max_rows` when its widest stage (often `lm_head`) would not fit in one gRPC message."""
    if engine.max_message_bytes + MESSAGE_HEADROOM_BYTES > GRPC_MAX_MESSAGE_BYTES:
        engine.max_rows = fitting_max_rows(engine)
        if engine.batcher is not None:
            engine.batcher.max_rows = engine.max_rows
        logger.info("max_rows lowered to %d so the widest stage fits in one gRPC message", engine.max_rows)


def _address(host: str, port: int) -> str:
    """`host:port`, with IPv6 literals bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _start(
    engine: StageEngine,
    host: str,
    port: int,
    max_workers: int,
    security: HSSEEServerSecurity | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    operator: str = "",
    data_port: int | None = 0,
) -> tuple[ShareServerHandle, int, health.HealthServicer]:
    limit = message_limit(engine)
    # Read the PEM files before binding, so a bad path fails without a half-started server.
    credentials = security.server_credentials() if security is not None else None
    data_plane = None
    if data_port is not None:
        try:
            # a data-plane connection is a thread blocked in recv, cheaper than a gRPC worker: twice as many
            data_plane = DataPlaneServer(engine, host, data_port, security, max_connections=2 * max_workers)
        except OSError as err:
            raise ShareServerError(
                f"cannot listen for the data plane on {_address(host, data_port)}: {err.strerror or err}; choose "
                "another port (`--data-port`, 0 picks a free one) or turn it off (`--no-data-plane`)"
            ) from err
    try:
        server, bound, health_servicer = _start_grpc(
            engine, host, port, max_workers, limit, credentials, security, interceptors, data_plane, operator
        )
    except BaseException:
        if data_plane is not None:
            data_plane.stop(0)
        raise
    if data_plane is not None:
        data_plane.start()
    return ShareServerHandle(server, data_plane), bound, health_servicer


def _start_grpc(
    engine: StageEngine,
    host: str,
    port: int,
    max_workers: int,
    limit: int,
    credentials: grpc.ServerCredentials | None,
    security: HSSEEServerSecurity | None,
    interceptors: Sequence[grpc.ServerInterceptor],
    data_plane: DataPlaneServer | None,
    operator: str = "",
) -> tuple[grpc.Server, int, health.HealthServicer]:
    chain = list(security.interceptors() if security is not None else []) + list(interceptors)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hss-ee-serve"),
        interceptors=chain or None,
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # Without this a second server could bind the same port and silently take half the requests.
            ("grpc.so_reuseport", 0),
            *server_keepalive_options(),  # answers the clients' keepalive pings; finds clients gone silently
        ],
    )
    # A quarter of the workers (at least two) always stay free for unary calls and health checks.
    servicer = ShareServicer(
        engine,
        max_streams=max(0, max_workers - max(2, max_workers // 4)),
        operator=operator,
        data_port=data_plane.port if data_plane is not None else 0,
    )
    server.add_generic_rpc_handlers((share_server_handler(servicer),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = _address(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as err:  # grpcio raises RuntimeError when it cannot bind
        raise ShareServerError(
            f"cannot listen on {address}: {err}; choose another port (`--port`) or stop the process using it"
        ) from err
    if bound == 0:  # older grpcio reports a failed bind as port 0
        raise ShareServerError(
            f"cannot listen on {address}; choose another port (`--port`) or stop the process using it"
        )
    server.start()
    if security is not None and security.requires_token and not security.uses_tls and not _loopback_host(host):
        logger.warning(
            "this server requires a bearer token but listens without TLS on %s: the token and the shares cross the "
            "network in plaintext. Add `--tls-cert` and `--tls-key`",
            address,
        )
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def _loopback_host(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1", "[::1]")


def start_server(
    engine: StageEngine,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_workers: int = DEFAULT_MAX_WORKERS,
    security: HSSEEServerSecurity | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    data_port: int | None = 0,
) -> tuple[ShareServerHandle, int]:
    """Starts a share server for `engine` (gRPC and its data plane) in background threads and returns at once.

    The engine's `max_rows` must let its widest stage fit in one gRPC message (`fit_max_rows` lowers it).

    The gRPC message limits are raised to fit the engine's largest stage payload (plus framing), and the
    standard health service (`grpc.health.v1.Health`) reports `SERVING` for `""` and `hss_ee.v1.ShareServer`.

    Args:
        engine (`StageEngine`): the loaded EE checkpoint.
        host (`str`, *optional*, defaults to `"127.0.0.1"`): interface to listen on (`"0.0.0.0"` for all).
        port (`int`, *optional*, defaults to 50051): TCP port; `0` picks a free one.
        max_workers (`int`, *optional*, defaults to 32): threads answering requests concurrently. An open stage
            stream holds one for its lifetime (a client session holds one or two per server); a quarter of them,
            at least two, are kept for unary calls. The data plane serves twice as many connections (one per client
            session and calling thread); clients beyond them use gRPC.
        security (`HSSEEServerSecurity`, *optional*): TLS / mutual TLS / bearer tokens; plaintext without.
        interceptors (`Sequence[grpc.ServerInterceptor]`, *optional*): extra interceptors (metrics, tests),
            run after the token check (gRPC only).
        data_port (`int`, *optional*, defaults to 0): TCP port of the data plane (binary frames for stage calls, same
            security; advertised in `Describe`), 0 for a free one, `None` for no data plane.

    Returns:
        `(server, port)`: the running [`ShareServerHandle`] (stop it with `server.stop(grace)`; `server.data_port`
        is the data plane's port) and the gRPC port it bound.

    Raises:
        `ShareServerError`: the port cannot be bound, or the largest payload does not fit in a gRPC message.
        `SecurityConfigError`: a certificate, key or token file is missing or unreadable.

    Example:

    ```python
    >>> server, port = start_server(StageEngine("smollm2-ee", max_rows=4096), port=0)
    >>> transport = GrpcTransport((f"127.0.0.1:{port}", "10.0.0.2:50051"))
    >>> server.stop(grace=1.0).wait()
    ```
    """
    server, bound, _ = _start(engine, host, port, max_workers, security, interceptors, data_port=data_port)
    return server, bound


def serve(
    checkpoint: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    device: str = "cpu",
    max_rows: int | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    ready_callback: Callable[[int], None] | None = None,
    grace: float = DEFAULT_GRACE_SECONDS,
    progress: bool = True,
    security: HSSEEServerSecurity | None = None,
    batch_window_ms: float = 0.0,
    kernel: str | None = None,
    schedules: tuple[int, ...] = (4,),
    operator: str = "",
    trust_checkpoint: bool = False,
    data_port: int | None = None,
    data_plane: bool = True,
) -> None:
    """Loads an EE checkpoint and serves it until SIGINT or SIGTERM (what `hss-ee serve` runs).

    On a signal the health service turns `NOT_SERVING`, new requests are refused, and requests in flight get
    `grace` seconds to finish before the process returns.

    Args:
        checkpoint (`str` or `os.PathLike`): a local EE checkpoint folder.
        host (`str`, *optional*, defaults to `"127.0.0.1"`): interface to listen on (`"0.0.0.0"` for all).
        port (`int`, *optional*, defaults to 50051): TCP port; `0` picks a free one (see `ready_callback`).
        device (`str`, *optional*, defaults to `"cpu"`): where the stage weights live (`"cuda"`, `"auto"`, ...).
        max_rows (`int`, *optional*): the most rows one request may carry. By default 8192, lowered when the
            widest stage (often `lm_head`) would not fit in one gRPC message; clients read it with `Describe`.
        max_workers (`int`, *optional*, defaults to 32): threads answering requests concurrently. An open stage
            stream holds one for its lifetime (a client session holds one or two per server); a quarter of them,
            at least two, are kept for unary calls. The data plane serves twice as many connections (one per client
            session and calling thread); clients beyond them use gRPC.
        ready_callback (`Callable[[int], None]`, *optional*): called with the bound port once the server accepts
            requests.
        grace (`float`, *optional*, defaults to 5.0): seconds requests in flight get to finish on shutdown.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar while loading the weights.
        security (`HSSEEServerSecurity`, *optional*): TLS / mutual TLS / bearer tokens
            (`security.server_security_from_args` builds it from `--tls-cert`, `--tls-key`, `--tls-client-ca`,
            `--token-file`).
        batch_window_ms (`float`, *optional*, defaults to 0): batch concurrent sessions' requests for the same
            stage that arrive within this many milliseconds into one product (0 turns batching off).
        kernel (`str`, *optional*): CPU ring kernel, `"auto"`, `"native"` or `"float64"` (see [`StageEngine`]).
        schedules (`tuple[int, ...]`, *optional*, defaults to `(4,)`): stages per decoder layer offered; `(4, 2)`
            also builds the fused stages of the two-stage schedule at load time (see [`StageEngine`]).
        operator (`str`, *optional*): who runs this server, reported by `Describe` so a client can refuse two
            parties of one operator.
        trust_checkpoint (`bool`, *optional*, defaults to `False`): skip recomputing the weights' fingerprint
            and checking the shards against the config at load (see [`StageEngine`]).
        data_port (`int`, *optional*): TCP port of the data plane, on the same host; defaults to `port + 1` (a free
            one when `port` is 0). Clients learn it from `Describe`, so a firewall must let both ports through.
        data_plane (`bool`, *optional*, defaults to `True`): serve stage calls as binary frames on `data_port` too
            (clients then skip gRPC for them); `False` leaves gRPC alone.

    Raises:
        `ShareServerError`: the port cannot be bound, or `max_rows` rows of the widest stage do not fit in a
            gRPC message.
        `SecurityConfigError`: a certificate, key or token file is missing or unreadable.

    Example:

    ```python
    >>> from hss_ee_hf.server import serve
    >>> serve("smollm2-ee", host="0.0.0.0", port=50051)  # blocks until Ctrl-C
    ```
    """
    engine = StageEngine(
        checkpoint,
        device=device,
        max_rows=DEFAULT_MAX_ROWS if max_rows is None else max_rows,
        progress=progress,
        batch_window_ms=batch_window_ms,
        kernel=kernel,
        schedules=schedules,
        trust_checkpoint=trust_checkpoint,
    )
    if max_rows is None:
        fit_max_rows(engine)
    default_port = data_port is None
    if default_port:
        data_port = port + 1 if port and port < 65535 else 0
    try:
        server, bound, health_servicer = _start(
            engine, host, port, max_workers, security, operator=operator, data_port=data_port if data_plane else None
        )
    except ShareServerError as err:
        if not (default_port and data_plane and data_port and "data plane" in str(err)):
            raise
        # PORT+1 is taken (another server's port, often): any free port does, since clients learn it from Describe.
        logger.warning("%s; the data plane listens on a free port instead (see Describe, or pass --data-port)", err)
        server, bound, health_servicer = _start(
            engine, host, port, max_workers, security, operator=operator, data_port=0
        )

    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def _on_signal(signum: int, frame: Any) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    else:
        logger.warning("serve() runs outside the main thread: it cannot catch signals and serves until killed")
    try:
        logger.info(
            "serving checkpoint %s (%d stages, at most %d rows per request, protocol %d) on %s (%s), data plane %s",
            short(engine.fingerprint),
            len(engine.describe()),
            engine.max_rows,
            PROTOCOL_VERSION,
            _address(host, bound),
            security if security is not None else "plaintext, no token",
            f"on port {server.data_port}" if server.data_port else "off",
        )
        if ready_callback is not None:
            ready_callback(bound)
        stop.wait()
    finally:
        health_servicer.enter_graceful_shutdown()
        server.stop(grace).wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logger.info("share server on %s stopped", _address(host, bound))
