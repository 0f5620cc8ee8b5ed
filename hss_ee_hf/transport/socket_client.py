"""The client's data plane: stage calls as binary frames, one socket per server and calling thread (DESIGN.md §8).

[`DataPlaneTransport`] wraps a [`GrpcTransport`], which stays the control plane: `Describe` (which tells each
server's data-plane port), fingerprint checks, and every call a server's data plane cannot take. Stage calls go
as frames ([`hss_ee_hf.transport.frames`]) on a plain blocking socket, TLS when the config says so, with the same
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
import threading
import time

import torch

from ..errors import TransportError
from ..ring.sharing import Shares
from . import colocation
from .base import FeatureMapsUnavailable, PendingShare, Transport
from .config import _is_loopback
from .frames import (
    padded_name,
)
from .geometry import ConvGeometry
from .grpc_client import GrpcTransport
from .grpc_errors import ADVICE, unavailable_advice
from .socket_connection import _Broken, _Connection, _host_of, _PendingFrame, _Refused, _Unreachable

logger = logging.getLogger(__name__)


class DataPlaneTransport(Transport):
    """Stage calls as binary frames on the servers' data planes; gRPC for everything else.

    Args:
        control (`GrpcTransport`): the gRPC transport to the same two servers (its config, deadline and retries
            apply to the data plane too). Closed with this transport.

    Example:

    ```python
    >>> from hss_ee_hf.transport.grpc_client import GrpcTransport
    >>> from hss_ee_hf.transport.socket_client import DataPlaneTransport
    >>> transport = DataPlaneTransport(GrpcTransport(("10.0.0.1:50051", "10.0.0.2:50051"), config=config))
    >>> transport.check_fingerprint(fingerprint)  # also learns each server's data port
    >>> y_a, y_b = transport.run_stage(fingerprint, "layers.0.qkv", shares, out_features=576)
    ```
    """

    pipelined = True
    feature_maps = True

    def __init__(self, control: GrpcTransport):
        self.control = control
        self.endpoints = control.endpoints
        self.config = control.config
        self.timeout = control.timeout
        self.ssl_context = self.config.ssl_context()
        self.data_plane_calls = 0  # stage calls answered on the data plane (tests and benchmarks read it)
        self._retried = 0
        # The data plane serves single-address parties only: a pool of replicas keeps gRPC streams, whose channel
        # balances and retries across the replicas (and checks each one's identity and fingerprint at connect).
        self._hosts = tuple(
            None if control.pools.is_pool(party) else _host_of(e) for party, e in enumerate(self.endpoints)
        )
        self._ports: list[int | None] = [None, None]  # None: not known yet; 0: the server has no data plane
        self._down_until = [0.0, 0.0]
        self._warned: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: set[_Connection] = set()  # every open connection, for close()
        self._stage_names: dict[str, tuple[bytes, int]] = {}  # stage -> (padded UTF-8 name, its length)
        self._closed = False
        # Client and servers on one machine: each calling thread gets a home core that party B's connection thread
        # shares and party A's avoids (`colocation.py`); the thread runs there inside `pinned()`.
        self.colocated = (
            self.config.colocate
            and all(host is not None and _is_loopback(e) for host, e in zip(self._hosts, self.endpoints, strict=True))
            and colocation.supported()
        )

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

    def send_party(
        self,
        party: int,
        fingerprint: str,
        stage: str,
        shares: Shares,
        out_features: int,
        geometry: ConvGeometry | None = None,
    ) -> PendingShare:
        """Sends one server its part of a stage now; `result()` of the handle reads the reply.

        Party 0 (A) is sent `shares.seed`, party 1 (B) `shares.b`. When the server's data plane cannot take it,
        the handle makes the call over gRPC inside `result()`. With `geometry` the shares are `(images, C * H * W)`
        feature maps that the server unfolds; gRPC cannot carry those, so then an unreachable data plane raises
        [`FeatureMapsUnavailable`] (the client unfolds and asks again).
        """
        args = (party, fingerprint, stage, shares, out_features, geometry)
        try:
            conn = self._connection(party, fingerprint)
        except _Unreachable as err:
            self._fall_back(party, err)
            if geometry is not None:
                raise FeatureMapsUnavailable(f"{self.endpoints[party]}: {err}") from None
            return PendingShare(self.control.run_party, *args[:5])
        try:
            with conn.lock:
                request_id = self._send(conn, party, stage, shares, out_features, geometry)
        except Exception as err:
            return PendingShare(self._recover, conn, err, *args)
        return _PendingFrame(self, conn, request_id, args)

    def run_party(self, party: int, fingerprint: str, stage: str, shares: Shares, out_features: int) -> torch.Tensor:
        """Runs one stage on one server; see [`Transport.run_party`]."""
        return self.send_party(party, fingerprint, stage, shares, out_features).result()

    def run_stage(
        self,
        fingerprint: str,
        stage: str,
        shares: Shares,
        out_features: int,
        geometry: ConvGeometry | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sends to both servers, then reads both replies; see [`Transport.run_stage`] (and [`send_party`] for
        `geometry`).

        Raises:
            `TransportError`: naming the server that failed (party A first when both have).
            `FeatureMapsUnavailable`: `geometry` was given and a server's data plane cannot be reached.
        """
        first = self.send_party(0, fingerprint, stage, shares, out_features, geometry)
        try:
            pending = [first, self.send_party(1, fingerprint, stage, shares, out_features, geometry)]
        except BaseException:
            first.cancel()
            raise
        try:
            y_a = pending[0].result()
        except BaseException:
            pending[1].cancel()
            raise
        return y_a, pending[1].result()

    def _send(
        self, conn: _Connection, party: int, stage: str, shares: Shares, out_features: int, geometry=None
    ) -> int:
        name = self._stage_names.get(stage)
        if name is None:
            name = self._stage_names[stage] = (padded_name(stage), len(stage.encode("utf-8")))
        rows = shares.a.shape[0]
        packed, result_rows = (b"", None) if geometry is None else (geometry.pack(), rows * geometry.patches)
        seed, share = (shares.seed, None) if party == 0 else (None, shares.b.contiguous())
        return conn.send(name, rows, seed, share, out_features, self.timeout, packed, result_rows)

    def _call(
        self,
        party: int,
        fingerprint: str,
        stage: str,
        shares: Shares,
        out_features: int,
        geometry: ConvGeometry | None = None,
        attempt: int = 0,
    ) -> torch.Tensor:
        """One call with the gRPC path's retry rules (see the module docstring); `attempt` retries were made."""
        endpoint = self.endpoints[party]
        fresh = False
        while True:
            try:
                conn = self._connection(party, fingerprint)
            except _Unreachable as err:
                self._fall_back(party, err)
                if geometry is not None:
                    raise FeatureMapsUnavailable(f"{endpoint}: {err}") from None
                return self.control.run_party(party, fingerprint, stage, shares, out_features)
            deadline = time.monotonic() + self.timeout
            try:
                with conn.lock:
                    request_id = self._send(conn, party, stage, shares, out_features, geometry)
                    y = conn.receive(request_id, deadline)
                self.data_plane_calls += 1
                return y
            except TimeoutError as err:
                self._discard(conn)
                late = f"DEADLINE_EXCEEDED: no reply within {self.timeout:g} s"
                raise TransportError(endpoint, f"{late}; {ADVICE['DEADLINE_EXCEEDED']}") from err
            except _Refused as err:
                if err.code != "UNAVAILABLE":
                    raise TransportError(endpoint, f"{err}; {ADVICE.get(err.code, 'check the server log')}") from None
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
                    endpoint, f"UNAVAILABLE{tried}: {failure}; {unavailable_advice(endpoint, self.config, '')}"
                ) from failure
            delay = self.control._backoff(attempt)
            attempt += 1
            self._retried += 1
            logger.debug("data plane %s: %s, retry %d/%d in %.3f s", endpoint, failure, attempt, self.config.retries,
                         delay)  # fmt: skip
            time.sleep(delay)

    def _recover(
        self,
        conn: _Connection,
        err: Exception,
        party: int,
        fingerprint: str,
        stage: str,
        shares,
        out_features: int,
        geometry: ConvGeometry | None = None,
    ) -> torch.Tensor:
        """A pipelined request failed: report a deadline or a refusal, otherwise make the call again."""
        endpoint = self.endpoints[party]
        if isinstance(err, TimeoutError):
            self._discard(conn)
            late = f"DEADLINE_EXCEEDED: no reply within {self.timeout:g} s"
            raise TransportError(endpoint, f"{late}; {ADVICE['DEADLINE_EXCEEDED']}") from err
        if isinstance(err, _Refused):
            if err.code != "UNAVAILABLE":
                raise TransportError(endpoint, f"{err}; {ADVICE.get(err.code, 'check the server log')}") from None
            if self.config.retries == 0:
                advice = unavailable_advice(endpoint, self.config, "")
                raise TransportError(endpoint, f"UNAVAILABLE: {err.details}; {advice}") from None
            self._retried += 1
            time.sleep(self.control._backoff(0))
            return self._call(party, fingerprint, stage, shares, out_features, geometry, attempt=1)
        if not isinstance(err, (OSError, _Broken)):
            raise err
        self._discard(conn)  # the next attempt opens a fresh connection at once
        return self._call(party, fingerprint, stage, shares, out_features, geometry)

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
        hint = (colocation.APART if party == 0 else colocation.TOGETHER, self._home()) if self.colocated else (0, 0)
        conn = _Connection(self.endpoints[party], self._hosts[party], port, self, fingerprint, hint)
        conns[party, fingerprint] = conn
        with self._lock:
            for old in [c for c in self._connections if not c.owner.is_alive()]:  # left by finished threads
                old.close()
                self._connections.discard(old)
            self._connections.add(conn)
        return conn

    def _home(self) -> int:
        """The calling thread's home core (chosen once per thread)."""
        home = self._local.__dict__.get("home")
        if home is None:
            home = self._local.home = colocation.home_cpu()
        return home

    def pinned(self):
        """Runs the block on the calling thread's home core when client and servers share this machine."""
        return colocation.pinned(self._home() if self.colocated else None)

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
