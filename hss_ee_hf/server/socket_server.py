"""The share server's data plane: stage calls as binary frames on a TCP (or TLS) socket next to gRPC (DESIGN.md §8).

Python gRPC costs a few hundred microseconds per stage call on loopback; a decode step of SmolLM2 makes 121 of
them. [`DataPlaneServer`] answers the same stage calls as length-prefixed frames ([`hss_ee_hf.transport.frames`])
on a second port that the gRPC `Describe` reply advertises. Each connection has one thread that reads a frame, calls
[`StageEngine.compute`] (the very validation and product the gRPC service runs) and writes the reply: no thread
hand-off, no protobuf, and the request is read in place from a buffer the connection reuses.

It keeps the gRPC service's promises: the same TLS, mutual TLS and bearer tokens ([`HSSEEServerSecurity`]; the
token is checked once per connection, in constant time, as gRPC checks it once per stream), the same validation
and typed status for a refused request (the connection stays open), a bound on every length before anything is
read, a handshake deadline, at most `max_connections` connections (a client beyond them is told so and uses
gRPC), and a graceful stop. Payloads are never logged or echoed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
import traceback

from ..errors import StageRequestError
from ..ring.native import limit_threads
from ..transport.colocation import follow_hint
from ..transport.frames import (
    HEADER,
    HEADER_BYTES,
    HELLO,
    HELLO_OK,
    INPUT_MAP_SEED,
    INPUT_MAP_SHARE,
    INPUT_SEED,
    INPUT_SHARE,
    MAX_HELLO_BYTES,
    MAX_STAGE_NAME_BYTES,
    REPLY,
    SLOTS_FULL_DETAILS,
    STAGE,
    FrameError,
    FrameReader,
    error_frame,
    padded,
    parse_hello,
)
from ..transport.geometry import GEOMETRY_BYTES, ConvGeometry
from .engine import StageEngine
from .security import HSSEEServerSecurity

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 64
# A connection must finish its TLS handshake and HELLO within this many seconds; afterwards it may idle.
HANDSHAKE_TIMEOUT = 10.0
# Refusals (slots full) are answered by at most this many threads at once; further connections are just closed.
_MAX_REFUSING = 4
_MAX_DETAILS_CHARS = 1024
_INTERNAL_DETAILS = "internal server error; the request was not computed. The server log names the cause"


class DataPlaneServer:
    """Serves stage calls of one [`StageEngine`] as frames on a TCP port, TLS when `security` says so.

    Args:
        engine (`StageEngine`): the loaded EE checkpoint (the same object the gRPC service computes with).
        host (`str`, *optional*, defaults to `"127.0.0.1"`): interface to listen on.
        port (`int`, *optional*, defaults to 0): TCP port; 0 picks a free one (read `port` after).
        security (`HSSEEServerSecurity`, *optional*): TLS / mutual TLS / bearer tokens, as for gRPC.
        max_connections (`int`, *optional*, defaults to 64): open connections served at once (each holds a thread;
            a client session holds one per calling thread).

    Raises:
        `OSError`: the port cannot be bound.
        `SecurityConfigError`: a certificate, key or token file cannot be read.

    Example:

    ```python
    >>> plane = DataPlaneServer(engine, "0.0.0.0", 50052, security=security).start()
    >>> plane.port
    50052
    >>> plane.stop(grace=5.0).wait()
    ```
    """

    def __init__(
        self,
        engine: StageEngine,
        host: str = "127.0.0.1",
        port: int = 0,
        security: HSSEEServerSecurity | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ):
        self.engine = engine
        self.security = security if security is not None else HSSEEServerSecurity()
        self._ssl = self.security.ssl_context()
        self.max_connections = max_connections
        # Every length is bounded before it is read: the widest legitimate request plus its header.
        self.max_body = padded(MAX_STAGE_NAME_BYTES) + engine.max_message_bytes
        self._names = {name.encode("utf-8"): name for name in engine.describe()}
        bare = host.strip("[]")
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        self._listener = socket.create_server((bare, port), family=family, backlog=128)
        self.host, self.port = host, self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._refusing = 0
        self._closing = False
        self._accepting: threading.Thread | None = None
        self.refused = 0  # connections refused for lack of a slot (tests read it)

    def __repr__(self) -> str:
        return f"DataPlaneServer({self.host}:{self.port}, tls={self._ssl is not None})"

    def start(self) -> DataPlaneServer:
        """Starts accepting connections in a background thread; returns `self`."""
        self._accepting = threading.Thread(target=self._accept_loop, name="hss-ee-data-accept", daemon=True)
        self._accepting.start()
        return self

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stops accepting, serves the open connections for up to `grace` seconds, then closes every connection.

        Returns:
            `threading.Event`: set once every connection is closed.
        """
        done = threading.Event()
        with self._lock:
            self._closing = True
            connections = dict(self._connections)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._listener.close()
        deadline = time.monotonic() + (grace or 0.0)

        def finish() -> None:
            # Open connections keep being served until the grace period ends, as gRPC keeps serving open streams:
            # a generation in flight finishes its steps instead of failing on its next stage call. Then reads are
            # shut (a busy connection ends after sending its reply) and whatever is left is closed.
            for thread in connections.values():
                thread.join(max(0.0, deadline - time.monotonic()))
            for sock in connections:
                _shutdown_read(sock)
            for sock, thread in connections.items():
                thread.join(1.0)
                if thread.is_alive():
                    _close(sock)
            for thread in connections.values():
                thread.join()
            done.set()

        threading.Thread(target=finish, name="hss-ee-data-stop", daemon=True).start()
        return done

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._closing:
                    return
                logger.warning("data plane: accept failed; retrying", exc_info=True)
                threading.Event().wait(0.05)  # e.g. out of file descriptors: do not spin
                continue
            with self._lock:
                if self._closing:
                    _close(sock)
                    return
                full = len(self._connections) >= self.max_connections
                if full and self._refusing >= _MAX_REFUSING:
                    _close(sock)
                    continue
                thread = threading.Thread(target=self._connection, args=(sock, full), name="hss-ee-data", daemon=True)
                if full:
                    self._refusing += 1
                    self.refused += 1
                else:
                    self._connections[sock] = thread
            thread.start()

    def _connection(self, sock: socket.socket, refuse: bool) -> None:
        """One connection: handshake and HELLO under a deadline, then stage calls until the client leaves."""
        raw = sock
        try:
            # a client on this machine shares its cores: one kernel thread per product, none left waiting for a core
            local = _loopback_peer(sock)
            limit_threads(1 if local else None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_side=True)
                if not refuse:
                    with self._lock:  # track the TLS socket: replies must never bypass TLS
                        thread = self._connections.pop(raw, None)
                        if thread is not None:
                            self._connections[sock] = thread
            reader = FrameReader(sock)
            fingerprint, version, hint = self._hello(sock, reader, refuse)
            if hint[0] and local:  # a client on this machine says where this thread should run
                follow_hint(*hint)
            sock.sendall(HEADER.pack(0, HELLO_OK, 0, version, 0, self.engine.max_rows))
            sock.settimeout(None)  # an authenticated connection may idle between calls, like an open stream
            self._serve(sock, reader, fingerprint, version)
        except FrameError as err:
            logger.info("data plane: refused a connection (%s): %s", err.code, str(err)[:_MAX_DETAILS_CHARS])
            _send_quietly(sock, error_frame(0, err.code, str(err)[:_MAX_DETAILS_CHARS]))
        except (OSError, ssl.SSLError) as err:  # the client left, timed out, or failed the TLS handshake
            logger.debug("data plane: connection ended: %s", type(err).__name__)
        except Exception as err:  # a bug must end this connection, never the server
            logger.error("data plane: connection failed with %s at %s", type(err).__name__, _where(err))
        finally:
            with self._lock:  # forget the socket before closing it: nobody may find a closed socket in the table
                if refuse:
                    self._refusing -= 1
                else:
                    self._connections.pop(sock, None)
                    self._connections.pop(raw, None)
            _close(sock)

    def _hello(self, sock: socket.socket, reader: FrameReader, refuse: bool) -> tuple[str, int, tuple[int, int]]:
        """Reads and checks the HELLO; returns the connection's `(fingerprint, protocol version, placement hint)`.

        The caller answers `HELLO_OK` (after placing its thread as the hint says).

        Raises:
            `FrameError`: not a HELLO, a wrong token, or no slot free (the caller answers and closes).
        """
        length, kind, mode, version, _, core = HEADER.unpack(reader.read(HEADER_BYTES))
        if kind != HELLO or length > MAX_HELLO_BYTES:
            raise FrameError("the first frame is not an hss-ee data-plane HELLO", fatal=True)
        token, fingerprint = parse_hello(reader.read(length))
        if refuse:
            raise FrameError(
                f"{SLOTS_FULL_DETAILS}: all {self.max_connections} are open; the client falls back to gRPC",
                code="RESOURCE_EXHAUSTED",
                fatal=True,
            )
        if not self.security.accepts(token):
            raise FrameError(
                "missing or wrong bearer token (sent in the data-plane HELLO)", code="UNAUTHENTICATED", fatal=True
            )
        try:
            fingerprint_text = fingerprint.decode("ascii")
        except UnicodeDecodeError:
            raise FrameError("the HELLO's fingerprint is not ASCII", fatal=True) from None
        return fingerprint_text, version, (mode, core)

    def _serve(self, sock: socket.socket, reader: FrameReader, fingerprint: str, version: int) -> None:
        """The hot loop: read a frame, compute, reply. A refused request gets an ERROR and the loop goes on."""
        compute, names, max_body = self.engine.compute, self._names, self.max_body
        send = _sender(sock)
        while True:
            length, kind, flag, name_len, request_id, rows = HEADER.unpack(reader.read(HEADER_BYTES))
            if length > max_body:
                # never read (or allocate) what no legitimate request needs; the stream cannot be resynchronised
                send(error_frame(request_id, "RESOURCE_EXHAUSTED", f"a {length}-byte frame exceeds this server's "
                                 f"limit of {max_body} bytes; send fewer rows per request"))  # fmt: skip
                return
            body = reader.read(length)
            try:
                if kind != STAGE:
                    raise FrameError(f"expected a STAGE frame, got kind {kind}")
                offset = padded(name_len)
                if name_len > MAX_STAGE_NAME_BYTES or offset > length:
                    raise FrameError(f"a stage name of {name_len} bytes does not fit the frame")
                raw_name = bytes(body[:name_len])
                stage = names.get(raw_name)
                if stage is None:
                    stage = raw_name.decode("utf-8", errors="replace")  # the engine refuses it with its message
                payload = body[offset:]
                geometry = None
                if flag in (INPUT_MAP_SHARE, INPUT_MAP_SEED):  # a feature map: its geometry comes first
                    try:
                        geometry = ConvGeometry.unpack(payload[:GEOMETRY_BYTES])
                    except ValueError as err:
                        raise FrameError(str(err)) from None
                    payload, flag = payload[GEOMETRY_BYTES:], flag - INPUT_MAP_SHARE
                if flag == INPUT_SHARE:
                    out = compute(fingerprint, stage, rows, share=payload, version=version, geometry=geometry)
                elif flag == INPUT_SEED:
                    out = compute(fingerprint, stage, rows, seed=bytes(payload), version=version, geometry=geometry)
                else:
                    raise FrameError(f"unknown input kind {flag} (0: share, 1: seed, 2: feature map, 3: its seed)")
            except (StageRequestError, FrameError) as err:
                code = getattr(err, "code", "INVALID_ARGUMENT")
                details = str(err)[:_MAX_DETAILS_CHARS]
                logger.info("data plane: refused a stage request (%s): %s", code, details)
                send(error_frame(request_id, code, details))
                continue
            except Exception as err:  # any failure must become a status, never a dropped connection
                logger.error("data plane: stage request failed with %s at %s", type(err).__name__, _where(err))
                send(error_frame(request_id, "INTERNAL", _INTERNAL_DETAILS))
                continue
            send(HEADER.pack(len(out), REPLY, 0, 0, request_id, rows), out)


def _loopback_peer(sock: socket.socket) -> bool:
    try:
        address = ipaddress.ip_address(sock.getpeername()[0])
    except (OSError, ValueError):
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _sender(sock: socket.socket):
    """`send(header, payload=b"")`: one gather write on a plain socket; one TLS write (a copy) on TLS."""
    if isinstance(sock, ssl.SSLSocket):

        def send_tls(header: bytes, payload: bytes = b"") -> None:
            sock.sendall(header + payload if payload else header)

        return send_tls

    def send_plain(header: bytes, payload: bytes = b"") -> None:
        total = len(header) + len(payload)
        sent = sock.sendmsg((header, payload)) if payload else sock.send(header)
        if sent < total:  # a partial write of a large reply: the rest the simple way
            sock.sendall((header + payload)[sent:])

    return send_plain


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (OSError, ValueError):
        pass


def _shutdown_read(sock: socket.socket) -> None:
    # The base-class call on purpose: `SSLSocket.shutdown` drops its TLS state, and a reply sent after that would
    # leave the machine unencrypted.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RD)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _where(err: BaseException) -> str:
    """Where an exception was raised, without its message or source lines (they may hold request data)."""
    frames = reversed(traceback.extract_tb(err.__traceback__))
    return " <- ".join(f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in frames)
