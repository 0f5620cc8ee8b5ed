"""One data-plane connection of the client, its pending replies and the errors that move a call to gRPC.

[`DataPlaneTransport`] ([`hss_ee_hf.transport.socket_client`]) keeps one [`_Connection`] per server, fingerprint
and calling thread; this module holds what one connection does: the HELLO (version, token, fingerprint, TLS), the
request frames, reading replies into their tensors, and telling a refusal from a broken connection.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import torch

from ..errors import TransportError
from .base import PROTOCOL_VERSION, PendingShare, Transport
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
    stage_header,
    status_name,
)
from .grpc_errors import ADVICE, unavailable_advice

logger = logging.getLogger(__name__)

# After a server's data port could not be reached, its calls go over gRPC this long before the port is asked again.
DATA_PLANE_RETRY_SECONDS = 1.0
# After a server had no data-plane connection slot free.
SLOTS_RETRY_SECONDS = 10.0


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

    def __init__(
        self, endpoint: str, host: str, port: int, transport: Transport, fingerprint: str, hint: tuple[int, int]
    ):
        self.endpoint, self.closed = endpoint, False
        self.owner = threading.current_thread()
        self.lock = threading.Lock()
        self.next_id = 1
        self.waiting: dict[int, tuple[int, int, int]] = {}  # request id -> (rows sent, reply rows, out_features)
        self.dropped: dict[int, tuple[int, int, int]] = {}  # abandoned requests whose reply is read and discarded
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
            sock.sendall(hello_frame(PROTOCOL_VERSION, config.token_bytes(), fingerprint.encode("ascii"), hint))
            self.reader = FrameReader(sock)
            length, kind, flag, _, _, _ = HEADER.unpack(self.reader.read(HEADER_BYTES))
            if kind == ERROR and length <= MAX_ERROR_MESSAGE_BYTES:
                refused = _Refused(status_name(flag), bytes(self.reader.read(length)).decode("utf-8", "replace"))
                if refused.code == "RESOURCE_EXHAUSTED" and SLOTS_FULL_DETAILS in refused.details:
                    raise _Unreachable(refused.details, hold=SLOTS_RETRY_SECONDS)
                raise TransportError(endpoint, f"{refused}; {ADVICE.get(refused.code, 'check the server log')}")
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

    def send(
        self,
        stage: tuple[bytes, int],
        rows: int,
        seed: bytes | None,
        share,
        out: int,
        timeout: float,
        geometry: bytes = b"",
        result_rows: int | None = None,
    ) -> int:
        """Writes one STAGE frame; returns its request id. The caller holds `self.lock`.

        `stage` is `(padded name, name length)`; party B's `share` is a contiguous int64 tensor; `geometry` is a
        packed [`ConvGeometry`] when the share is `rows` images' feature maps, whose reply has `result_rows` rows.
        """
        request_id = self.next_id
        self.next_id = request_id + 1 if request_id < 0xFFFFFFFF else 1
        payload = seed if seed is not None else memoryview(share.numpy()).cast("B")
        need = HEADER_BYTES + len(stage[0]) + len(geometry) + len(payload)
        if len(self.out) < need:
            self.out = bytearray(max(need, 2 * len(self.out)))
            self.out_view = memoryview(self.out)
        body = len(geometry) + len(payload)
        offset = stage_header(self.out, request_id, stage[0], rows, seed is not None, body, stage[1], bool(geometry))
        if geometry:
            self.out_view[offset : offset + len(geometry)] = geometry
            offset += len(geometry)
        self.out_view[offset:need] = payload
        self.sock.settimeout(timeout)
        self.sock.sendall(self.out_view[:need])
        self.waiting[request_id] = (rows, result_rows or rows, out)
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
            self.sock.settimeout(max(deadline - time.monotonic(), 1e-6))
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
            header_rows, result_rows, out = shape
            if rows != header_rows or length != result_rows * out * 8:
                raise _Broken(f"a reply of {length} bytes for {rows} rows, expected {result_rows * out * 8}")
            y = torch.empty((result_rows, out), dtype=torch.int64)
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
    """A request on the wire; `result()` reads its reply (retrying the call if the connection broke meanwhile).

    The deadline runs from `result()`: a prepared request may be collected long after it was sent, its reply
    waiting in the socket since; what must not exceed the timeout is the wait for it.
    """

    __slots__ = ("_transport", "_conn", "_request_id", "_call_args")

    def __init__(self, transport, conn, request_id, call_args):
        self._transport, self._conn, self._request_id, self._call_args = transport, conn, request_id, call_args

    def result(self) -> torch.Tensor:
        conn = self._conn
        try:
            with conn.lock:
                y = conn.receive(self._request_id, time.monotonic() + self._transport.timeout)
            self._transport.data_plane_calls += 1
            return y
        except Exception as err:
            return self._transport._recover(conn, err, *self._call_args)

    def cancel(self) -> None:
        self._conn.drop(self._request_id)


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or type(err).__name__


def _tls_advice(endpoint: str, config, err: BaseException) -> str:
    text = str(err)
    if "CERTIFICATE_REQUIRED" in text.upper().replace(" ", "_") or isinstance(err, ConnectionResetError):
        return (
            f"{endpoint} requires a client certificate (mutual TLS) signed by the CA it trusts; pass `--tls-cert` "
            "and `--tls-key` (`HSSEEClientConfig(tls_client_cert=..., tls_client_key=...)`)"
        )
    return unavailable_advice(endpoint, config, text)
