"""The client's data plane: stage calls as binary frames, one socket per server and calling thread (DESIGN.md §8).

[`DataPlaneTransport`] wraps a [`GrpcTransport`], which stays the control plane: `Describe` (which tells each
server's data-plane port), fingerprint checks, and every call a server's data plane cannot take. Stage calls go
as frames ([`hss_ee_hf.frames`]) on a plain blocking socket, TLS when the config says so, with the same
certificates and bearer token as gRPC. A call is one `send` of a buffer the connection keeps and one or two
`recv_into`, the reply landing straight in the output tensor: no thread, no protobuf, no queue.

Because a request is only a write, the transport is `pipelined`: `send_party` returns at once and the reply
waits on the wire until `result()` reads it. The client uses that to ask party A for its next products without a
background thread (DESIGN.md §4, offline/online split), and `run_stage` sends to both servers before reading
either reply.

The gRPC path's promises hold here too:

* every call has a deadline (socket timeouts), reported as `DEADLINE_EXCEEDED` and never retried;
* a refused request gets the server's status and message in a [`TransportError`] that names the server, with the
  same advice as gRPC; `UNAVAILABLE` is retried with the config's backoff;
* a connection that breaks (a server restart) is replaced at once; a server whose data port cannot be reached (or
  that has no connection slot free, or advertises none) gets its calls over gRPC, which retries with backoff and
  names the server when it stays down; the data port is asked for again a second later;
* TLS verification, mutual TLS and the token are enforced by the server exactly as on gRPC; a TLS or token
  failure on the data plane is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import torch

from .engine import PROTOCOL_VERSION
from .errors import TransportError
from .frames import (
    ERROR,
    HEADER,
    HEADER_BYTES,
    HELLO_OK,
    MAX_ERROR_MESSAGE_BYTES,
    REPLY,
    SLOTS_FULL_DETAILS,
    FrameReader,
    hello_frame,
    padded_name,
    stage_header,
    status_name,
)
from .grpc_transport import _ADVICE, GrpcTransport, _unavailable_advice
from .sharing import Shares
from .transport import PendingShare, Transport

logger = logging.getLogger(__name__)

# After a server's data port could not be reached, its calls go over gRPC this long before the port is asked again.
DATA_PLANE_RETRY_SECONDS = 1.0
# After a server had no data-plane connection slot free.
SLOTS_RETRY_SECONDS = 10.0
# A reply already on the wire is still read after its deadline passed, within this grace.
_LATE_READ_SECONDS = 0.001


class _Unreachable(Exception):
    """The data plane cannot carry this server's calls now; they go over gRPC."""

    def __init__(self, message: str, hold: float = DATA_PLANE_RETRY_SECONDS):
        self.hold = hold
        super().__init__(message)


class _Broken(Exception):
    """An open connection failed mid-call (the server went away, or sent what no request asked for)."""


class _Refused(Exception):
    """The server answered a request with an ERROR frame."""

    def __init__(self, code: str, details: str):
        self.code, self.details = code, details
        super().__init__(f"{code}: {details}")


def _host_of(endpoint: str) -> str | None:
    """The host part of a `host:port` endpoint (IPv6 literals unbracketed), `None` for other gRPC targets."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in host:
        return None
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class _Connection:
    """One data-plane connection to one server for one fingerprint; normally used by one thread.

    A lock guards it anyway: a reply asked for on one thread may be collected on another.
    """

    def __init__(self, endpoint: str, host: str, port: int, transport: DataPlaneTransport, fingerprint: str):
        self.endpoint, self.closed = endpoint, False
        self.owner = threading.current_thread()
        self.lock = threading.Lock()
        self.next_id = 1
        self.waiting: dict[int, tuple[int, int]] = {}  # request id -> (rows, out_features)
        self.dropped: dict[int, tuple[int, int]] = {}  # abandoned requests whose reply is read and discarded
        self.arrived: dict[int, torch.Tensor | _Refused] = {}
        self.out = bytearray(1 << 16)
        self.out_view = memoryview(self.out)
        config, timeout = transport.config, transport.timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as err:
            raise _Unreachable(f"cannot connect to its data plane at port {port} ({_reason(err)})") from err
        self.sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transport.ssl_context is not None:
                self.sock = sock = transport.ssl_context.wrap_socket(
                    sock, server_hostname=config.tls_server_name or host
                )
            sock.sendall(hello_frame(PROTOCOL_VERSION, config.token_bytes(), fingerprint.encode("ascii")))
            self.reader = FrameReader(sock)
            length, kind, flag, _, _, _ = HEADER.unpack(self.reader.read(HEADER_BYTES))
            if kind == ERROR and length <= MAX_ERROR_MESSAGE_BYTES:
                refused = _Refused(status_name(flag), bytes(self.reader.read(length)).decode("utf-8", "replace"))
                if refused.code == "RESOURCE_EXHAUSTED" and SLOTS_FULL_DETAILS in refused.details:
                    raise _Unreachable(refused.details, hold=SLOTS_RETRY_SECONDS)
                raise TransportError(endpoint, f"{refused}; {_ADVICE.get(refused.code, 'check the server log')}")
            if kind != HELLO_OK or length != 0:
                raise _Unreachable(f"port {port} does not answer as an hss-ee data plane")
        except ssl.SSLError as err:
            self.close()
            raise TransportError(
                endpoint, f"UNAVAILABLE: data-plane TLS failed ({err}); {_tls_advice(endpoint, config, err)}"
            ) from err
        except TimeoutError as err:
            self.close()
            raise _Unreachable(f"its data plane at port {port} did not answer the handshake in time") from err
        except OSError as err:  # reset or closed during the handshake
            self.close()
            if transport.ssl_context is not None:
                failed = f"UNAVAILABLE: data-plane TLS failed ({_reason(err)})"
                raise TransportError(endpoint, f"{failed}; {_tls_advice(endpoint, config, err)}") from err
            raise _Unreachable(f"its data plane at port {port} closed the connection ({_reason(err)})") from err
        except BaseException:
            self.close()
            raise

    def send(self, stage: tuple[bytes, int], rows: int, seed: bytes | None, share, out: int, timeout: float) -> int:
        """Writes one STAGE frame; returns its request id. The caller holds `self.lock`.

        `stage` is `(padded name, name length)`; party B's `share` is a contiguous int64 tensor.
        """
        request_id = self.next_id
        self.next_id = request_id + 1 if request_id < 0xFFFFFFFF else 1
        payload = seed if seed is not None else memoryview(share.numpy()).cast("B")
        need = HEADER_BYTES + len(stage[0]) + len(payload)
        if len(self.out) < need:
            self.out = bytearray(max(need, 2 * len(self.out)))
            self.out_view = memoryview(self.out)
        offset = stage_header(self.out, request_id, stage[0], rows, seed is not None, len(payload), stage[1])
        self.out_view[offset:need] = payload
        self.sock.settimeout(timeout)
        self.sock.sendall(self.out_view[:need])
        self.waiting[request_id] = (rows, out)
        return request_id

    def receive(self, request_id: int, deadline: float) -> torch.Tensor:
        """Reads frames until the reply to `request_id` is in; returns it. The caller holds `self.lock`.

        Raises:
            `_Refused`: the server refused the request.
            `_Broken`: the connection failed or the server broke the format.
            `TimeoutError`: the deadline passed.
        """
        while True:
            got = self.arrived.pop(request_id, None)
            if got is not None:
                if isinstance(got, _Refused):
                    raise got
                return got
            self.sock.settimeout(max(deadline - time.monotonic(), _LATE_READ_SECONDS))
            self._read_frame()

    def _read_frame(self) -> None:
        length, kind, flag, _, request_id, rows = HEADER.unpack(self.reader.read(HEADER_BYTES))
        shape = self.waiting.pop(request_id, None)
        keep = shape is not None
        if not keep:
            shape = self.dropped.pop(request_id, None)
            if shape is None:
                raise _Broken(f"a reply to request {request_id}, which was never sent")
        if kind == REPLY:
            if rows != shape[0] or length != shape[0] * shape[1] * 8:
                raise _Broken(f"a reply of {length} bytes for {rows} rows, expected {shape[0] * shape[1] * 8}")
            y = torch.empty(shape, dtype=torch.int64)
            self.reader.read_into(memoryview(y.numpy()).cast("B"))
            if keep:
                self.arrived[request_id] = y
        elif kind == ERROR and length <= MAX_ERROR_MESSAGE_BYTES:
            refused = _Refused(status_name(flag), bytes(self.reader.read(length)).decode("utf-8", "replace"))
            if keep:
                self.arrived[request_id] = refused
        else:
            raise _Broken(f"a frame of kind {kind} and {length} bytes where a reply was due")

    def drop(self, request_id: int) -> None:
        """Forgets a request: its reply, when it comes, is read and discarded."""
        with self.lock:
            self.arrived.pop(request_id, None)
            shape = self.waiting.pop(request_id, None)
            if shape is not None:
                self.dropped[request_id] = shape

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


class _PendingFrame(PendingShare):
    """A request on the wire; `result()` reads its reply (retrying the call if the connection broke meanwhile)."""

    __slots__ = ("_transport", "_conn", "_request_id", "_deadline", "_call_args")

    def __init__(self, transport, conn, request_id, deadline, call_args):
        self._transport, self._conn, self._request_id = transport, conn, request_id
        self._deadline, self._call_args = deadline, call_args

    def result(self) -> torch.Tensor:
        conn = self._conn
        try:
            with conn.lock:
                y = conn.receive(self._request_id, self._deadline)
            self._transport.data_plane_calls += 1
            return y
        except Exception as err:
            return self._transport._recover(conn, err, *self._call_args)

    def cancel(self) -> None:
        self._conn.drop(self._request_id)


class DataPlaneTransport(Transport):
    """Stage calls as binary frames on the servers' data planes; gRPC for everything else.

    Args:
        control (`GrpcTransport`): the gRPC transport to the same two servers (its config, deadline and retries
            apply to the data plane too). Closed with this transport.

    Example:

    ```python
    >>> from hss_ee_hf.grpc_transport import GrpcTransport
    >>> from hss_ee_hf.socket_client import DataPlaneTransport
    >>> transport = DataPlaneTransport(GrpcTransport(("10.0.0.1:50051", "10.0.0.2:50051"), config=config))
    >>> transport.check_fingerprint(fingerprint)  # also learns each server's data port
    >>> y_a, y_b = transport.run_stage(fingerprint, "layers.0.qkv", shares, out_features=576)
    ```
    """

    pipelined = True

    def __init__(self, control: GrpcTransport):
        self.control = control
        self.endpoints = control.endpoints
        self.config = control.config
        self.timeout = control.timeout
        self.ssl_context = self.config.ssl_context()
        self.data_plane_calls = 0  # stage calls answered on the data plane (tests and benchmarks read it)
        self._retried = 0
        self._hosts = tuple(_host_of(e) for e in self.endpoints)
        self._ports: list[int | None] = [None, None]  # None: not known yet; 0: the server has no data plane
        self._down_until = [0.0, 0.0]
        self._warned: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: set[_Connection] = set()  # every open connection, for close()
        self._stage_names: dict[str, tuple[bytes, int]] = {}  # stage -> (padded UTF-8 name, its length)
        self._closed = False

    def __repr__(self) -> str:
        return f"DataPlaneTransport(endpoints={self.endpoints}, config={self.config!r})"

    @property
    def retried(self) -> int:
        """Retry attempts made so far, on either plane."""
        return self._retried + self.control.retried

    @property
    def streamed(self) -> int:
        """Stage calls that fell back to gRPC and were answered on a stream."""
        return self.control.streamed

    def describe(self) -> tuple[dict, dict]:
        """As [`GrpcTransport.describe`]; also learns each server's data port."""
        infos = self.control.describe()
        self._learn(infos)
        return infos

    def check_fingerprint(self, fingerprint: str) -> tuple[dict, dict]:
        """As [`GrpcTransport.check_fingerprint`]; also learns each server's data port."""
        infos = self.control.check_fingerprint(fingerprint)
        self._learn(infos)
        return infos

    def _learn(self, infos) -> None:
        with self._lock:
            for party, info in enumerate(infos):
                self._ports[party] = info.get("data_port", 0) if self._hosts[party] else 0

    # --- stage calls -----------------------------------------------------------------------------------------

    def send_party(self, party: int, fingerprint: str, stage: str, shares: Shares, out_features: int) -> PendingShare:
        """Sends one server its part of a stage now; `result()` of the handle reads the reply.

        Party 0 (A) is sent `shares.seed`, party 1 (B) `shares.b`. When the server's data plane cannot take it,
        the handle makes the call over gRPC inside `result()`.
        """
        args = (party, fingerprint, stage, shares, out_features)
        try:
            conn = self._connection(party, fingerprint)
        except _Unreachable as err:
            self._fall_back(party, err)
            return PendingShare(self.control.run_party, *args)
        deadline = time.monotonic() + self.timeout
        try:
            with conn.lock:
                request_id = self._send(conn, party, stage, shares, out_features)
        except Exception as err:
            return PendingShare(self._recover, conn, err, *args)
        return _PendingFrame(self, conn, request_id, deadline, args)

    def run_party(self, party: int, fingerprint: str, stage: str, shares: Shares, out_features: int) -> torch.Tensor:
        """Runs one stage on one server; see [`Transport.run_party`]."""
        return self.send_party(party, fingerprint, stage, shares, out_features).result()

    def run_stage(
        self, fingerprint: str, stage: str, shares: Shares, out_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sends to both servers, then reads both replies; see [`Transport.run_stage`].

        Raises:
            `TransportError`: naming the server that failed (party A first when both have).
        """
        pending = [self.send_party(party, fingerprint, stage, shares, out_features) for party in (0, 1)]
        try:
            y_a = pending[0].result()
        except BaseException:
            pending[1].cancel()
            raise
        return y_a, pending[1].result()

    def _send(self, conn: _Connection, party: int, stage: str, shares: Shares, out_features: int) -> int:
        name = self._stage_names.get(stage)
        if name is None:
            name = self._stage_names[stage] = (padded_name(stage), len(stage.encode("utf-8")))
        rows = shares.a.shape[0]
        if party == 0:
            return conn.send(name, rows, shares.seed, None, out_features, self.timeout)
        return conn.send(name, rows, None, shares.b.contiguous(), out_features, self.timeout)

    def _call(
        self, party: int, fingerprint: str, stage: str, shares: Shares, out_features: int, attempt: int = 0
    ) -> torch.Tensor:
        """One call with the gRPC path's retry rules (see the module docstring); `attempt` retries were made."""
        endpoint = self.endpoints[party]
        fresh = False
        while True:
            try:
                conn = self._connection(party, fingerprint)
            except _Unreachable as err:
                self._fall_back(party, err)
                return self.control.run_party(party, fingerprint, stage, shares, out_features)
            deadline = time.monotonic() + self.timeout
            try:
                with conn.lock:
                    request_id = self._send(conn, party, stage, shares, out_features)
                    y = conn.receive(request_id, deadline)
                self.data_plane_calls += 1
                return y
            except TimeoutError as err:
                self._discard(conn)
                late = f"DEADLINE_EXCEEDED: no reply within {self.timeout:g} s"
                raise TransportError(endpoint, f"{late}; {_ADVICE['DEADLINE_EXCEEDED']}") from err
            except _Refused as err:
                if err.code != "UNAVAILABLE":
                    raise TransportError(endpoint, f"{err}; {_ADVICE.get(err.code, 'check the server log')}") from None
                failure: Exception = err
            except (OSError, _Broken) as err:
                self._discard(conn)
                if not fresh:  # a connection opened before the server restarted: a fresh one, at once
                    fresh = True
                    continue
                failure = err
            if attempt >= self.config.retries:
                tried = f" (after {attempt + 1} attempts)" if attempt else ""
                raise TransportError(
                    endpoint, f"UNAVAILABLE{tried}: {failure}; {_unavailable_advice(endpoint, self.config, '')}"
                ) from failure
            delay = self.control._backoff(attempt)
            attempt += 1
            self._retried += 1
            logger.debug("data plane %s: %s, retry %d/%d in %.3f s", endpoint, failure, attempt, self.config.retries,
                         delay)  # fmt: skip
            time.sleep(delay)

    def _recover(
        self, conn: _Connection, err: Exception, party: int, fingerprint: str, stage: str, shares, out_features: int
    ) -> torch.Tensor:
        """A pipelined request failed: report a deadline or a refusal, otherwise make the call again."""
        endpoint = self.endpoints[party]
        if isinstance(err, TimeoutError):
            self._discard(conn)
            late = f"DEADLINE_EXCEEDED: no reply within {self.timeout:g} s"
            raise TransportError(endpoint, f"{late}; {_ADVICE['DEADLINE_EXCEEDED']}") from err
        if isinstance(err, _Refused):
            if err.code != "UNAVAILABLE":
                raise TransportError(endpoint, f"{err}; {_ADVICE.get(err.code, 'check the server log')}") from None
            if self.config.retries == 0:
                advice = _unavailable_advice(endpoint, self.config, "")
                raise TransportError(endpoint, f"UNAVAILABLE: {err.details}; {advice}") from None
            self._retried += 1
            time.sleep(self.control._backoff(0))
            return self._call(party, fingerprint, stage, shares, out_features, attempt=1)
        if not isinstance(err, (OSError, _Broken)):
            raise err
        self._discard(conn)  # the next attempt opens a fresh connection at once
        return self._call(party, fingerprint, stage, shares, out_features)

    # --- connections ------------------------------------------------------------------------------------------

    def _connection(self, party: int, fingerprint: str) -> _Connection:
        """This thread's open connection to `party`'s data plane, opened when needed.

        Raises:
            `_Unreachable`: the server has no data plane, or it cannot be reached now.
            `TransportError`: the data plane refused this client (TLS or token).
        """
        conns = self._local.__dict__.get("conns")
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get((party, fingerprint))
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise TransportError(" and ".join(self.endpoints), "this transport is closed; create a new one")
        if time.monotonic() < self._down_until[party]:
            raise _Unreachable("its data plane was unreachable a moment ago")
        port = self._port(party)
        if not port:
            raise _Unreachable("it advertises no data plane", hold=float("inf"))
        conn = _Connection(self.endpoints[party], self._hosts[party], port, self, fingerprint)
        conns[party, fingerprint] = conn
        with self._lock:
            for old in [c for c in self._connections if not c.owner.is_alive()]:  # left by finished threads
                old.close()
                self._connections.discard(old)
            self._connections.add(conn)
        return conn

    def _port(self, party: int) -> int:
        port = self._ports[party]
        if port is None:  # not asked yet, or asked again after the data plane went away (a restart may move it)
            if not self._hosts[party] or not self.config.data_plane:
                port = 0
            else:
                try:
                    port = self.control.describe_party(party).get("data_port", 0)
                except TransportError as err:
                    raise _Unreachable(f"Describe failed ({err})") from err
            self._ports[party] = port
        return port

    def _fall_back(self, party: int, err: _Unreachable) -> None:
        """Sends `party`'s calls over gRPC for a while (for good when it has no data plane)."""
        with self._lock:
            self._down_until[party] = time.monotonic() + err.hold
            if err.hold != float("inf"):
                self._ports[party] = None  # ask Describe again before the next try
            key = (party, str(err))
            first = key not in self._warned and "a moment ago" not in str(err)
            self._warned.add(key)
        if first and err.hold == float("inf"):
            logger.info("%s: %s; its stage calls go over gRPC", self.endpoints[party], err)
        elif first:
            logger.warning(
                "%s: %s; its stage calls go over gRPC (slower) until it answers. If this lasts, open the data port in "
                "the firewall, or set HSSEEClientConfig(data_plane=False)",
                self.endpoints[party],
                err,
            )

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        with self._lock:
            self._connections.discard(conn)
        conns = self._local.__dict__.get("conns", {})
        for key, value in list(conns.items()):
            if value is conn:
                del conns[key]

    def close(self) -> None:
        """Closes every data-plane connection and the gRPC transport."""
        self._closed = True
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            conn.close()
        self.control.close()


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or type(err).__name__


def _tls_advice(endpoint: str, config, err: BaseException) -> str:
    text = str(err)
    if "CERTIFICATE_REQUIRED" in text.upper().replace(" ", "_") or isinstance(err, ConnectionResetError):
        return (
            f"{endpoint} requires a client certificate (mutual TLS) signed by the CA it trusts; pass `--tls-cert` "
            "and `--tls-key` (`HSSEEClientConfig(tls_client_cert=..., tls_client_key=...)`)"
        )
    return _unavailable_advice(endpoint, config, text)
