"""The binary data plane: exactness, fallback to gRPC, tokens, TLS, deadlines and faults (DESIGN.md §7, §8).

Servers are in-process `start_server` pairs (gRPC plus the data plane on a free port); clients are
`DataPlaneTransport`s, what `from_pretrained(endpoints=...)` builds by default. Every result is compared with the
in-process transport, the plaintext model or the engine's own product; every failure must name the server.
"""

from __future__ import annotations

import random
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hss_ee_hf.cli.demo import free_port
from hss_ee_hf.client.modeling import HSSEEForCausalLM
from hss_ee_hf.errors import StageRequestError, TransportError
from hss_ee_hf.ring.sharing import share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import serve, start_server
from hss_ee_hf.server.security import HSSEEServerSecurity
from hss_ee_hf.transport.base import PROTOCOL_VERSION
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.frames import (
    ERROR,
    HEADER,
    HEADER_BYTES,
    HELLO_OK,
    REPLY,
    SLOTS_FULL_DETAILS,
    FrameReader,
    hello_frame,
    stage_header,
    status_name,
)
from hss_ee_hf.transport.grpc_client import GrpcTransport
from hss_ee_hf.transport.inprocess import InProcessTransport
from hss_ee_hf.transport.socket_client import DataPlaneTransport

sys.path.insert(0, str(Path(__file__).parent))
from test_tls import Pki, _ca, _leaf, _write_cert, _write_key  # noqa: E402
from tiny_models import VOCAB, convert_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = [1, 5, 9, 17, 33, 40]
NEW_TOKENS = 8
FAST = dict(timeout=5.0, retries=1, initial_backoff=0.01)
# Enough retry time (about 3 s in all) to ride out a restart of a few hundred milliseconds.
RESTART_CONFIG = HSSEEClientConfig(timeout=10.0, retries=6, initial_backoff=0.05, max_backoff=1.0)
TOKEN = "data-plane-token-42"
STAGE = "layers.0.qkv"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """`(plaintext model, EE folder, key, engine)` of a tiny Llama."""
    plain, folder, key = convert_tiny("llama", tmp_path_factory.mktemp("dataplane-llama"))
    return plain, folder, key, StageEngine(folder, max_rows=64)


@pytest.fixture(scope="module")
def servers(tiny) -> Iterator[list]:
    started = [start_server(tiny[3], "127.0.0.1", 0, max_workers=4) for _ in range(2)]
    yield started
    for server, _ in started:
        server.stop(None)


def _endpoints(started) -> tuple[str, str]:
    return tuple(f"127.0.0.1:{port}" for _, port in started)


def _generate(model, prompt: list[int] = PROMPT, new_tokens: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def reference(tiny) -> list[int]:
    """The tokens of an undisturbed in-process run."""
    _, folder, key, engine = tiny
    return _generate(HSSEEForCausalLM.from_pretrained(folder, key=key, transport=InProcessTransport(engine)))


def _product(engine: StageEngine, x: torch.Tensor, stage: str = STAGE) -> torch.Tensor:
    out = engine.compute(engine.fingerprint, stage, x.shape[0], share=x.numpy().tobytes())
    return torch.frombuffer(bytearray(out), dtype=torch.int64).view(x.shape[0], -1)


def _ring(rows: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (rows, width), dtype=torch.int64, generator=generator)


# --- exactness ------------------------------------------------------------------------------------------------


def test_generation_on_the_data_plane_matches_plaintext_and_in_process(tiny, servers, reference):
    plain, folder, key, _ = tiny
    with HSSEEForCausalLM.from_pretrained(folder, key=key, endpoints=_endpoints(servers)) as model:
        transport = model.hss_ee_client.transport
        assert isinstance(transport, DataPlaneTransport)
        tokens = _generate(model)
        stats = model.hss_ee_stats
        assert transport.data_plane_calls > 0 and transport.streamed == 0  # no stage call went over gRPC
        assert stats.precomputed > 0  # party A's products came pipelined on the wire
    assert tokens == reference
    assert tokens == _generate(plain.float().eval())


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_stage_products_are_exact(tiny, servers, rows: int):
    engine = tiny[3]
    x = _ring(rows, 64, seed=rows)
    shares = share(x)
    with DataPlaneTransport(GrpcTransport(_endpoints(servers), config=HSSEEClientConfig(**FAST))) as transport:
        transport.check_fingerprint(engine.fingerprint)
        y_a, y_b = transport.run_stage(engine.fingerprint, STAGE, shares, out_features=128)
        assert transport.data_plane_calls == 2
    assert torch.equal(y_a, _product(engine, shares.a)) and torch.equal(y_b, _product(engine, shares.b))
    assert torch.equal(y_a + y_b, _product(engine, x))


def test_pipelined_replies_can_be_collected_in_any_order(tiny, servers):
    engine = tiny[3]
    inputs = [share(_ring(1 + i % 3, 64, seed=100 + i)) for i in range(6)]
    with DataPlaneTransport(GrpcTransport(_endpoints(servers), config=HSSEEClientConfig(**FAST))) as transport:
        pending = [transport.send_party(i % 2, engine.fingerprint, STAGE, s, 128) for i, s in enumerate(inputs)]
        pending[2].cancel()  # abandoned: its reply is read and dropped, the others still arrive
        for i in (5, 0, 3, 1, 4):
            expected = _product(engine, inputs[i].a if i % 2 == 0 else inputs[i].b)
            assert torch.equal(pending[i].result(), expected)
        # the connection is still in step: one more call on it
        y = transport.run_party(1, engine.fingerprint, STAGE, inputs[0], 128)
        assert torch.equal(y, _product(engine, inputs[0].b))


def test_each_calling_thread_gets_its_own_connection(tiny, servers):
    engine = tiny[3]
    results: dict[int, bool] = {}
    # every thread stays alive until all have connected: a finished thread's connections are closed by the next one
    all_connected = threading.Barrier(3)
    with DataPlaneTransport(GrpcTransport(_endpoints(servers), config=HSSEEClientConfig(**FAST))) as transport:

        def work(i: int) -> None:
            ok = True
            for j in range(20):
                shares = share(_ring(2, 64, seed=1000 * i + j))
                y_a, y_b = transport.run_stage(engine.fingerprint, STAGE, shares, out_features=128)
                ok &= torch.equal(y_a + y_b, _product(engine, shares.a + shares.b))
            results[i] = ok
            all_connected.wait(timeout=30)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(transport._connections) == 6  # three threads x two servers
    assert results == {0: True, 1: True, 2: True}


# --- refusals, fallback, the switch ------------------------------------------------------------------------------


def test_refused_requests_name_the_server_and_keep_the_connection(tiny, servers):
    engine = tiny[3]
    endpoints = _endpoints(servers)
    shares = share(_ring(1, 64, seed=7))
    with DataPlaneTransport(GrpcTransport(endpoints, config=HSSEEClientConfig(**FAST))) as transport:
        cases = [
            ("cd" * 32, STAGE, shares, "FAILED_PRECONDITION", "does not match the served checkpoint"),
            (engine.fingerprint, "layers.9.qkv", shares, "INVALID_ARGUMENT", "unknown stage"),
            (engine.fingerprint, STAGE, share(_ring(65, 64, seed=8)), "RESOURCE_EXHAUSTED", "send fewer rows"),
        ]
        for fingerprint, stage, x, code, words in cases:
            with pytest.raises(TransportError) as info:
                transport.run_party(1, fingerprint, stage, x, 128)
            assert info.value.endpoint == endpoints[1]
            assert code in str(info.value) and words in str(info.value)
        opened = len(transport._connections)
        y = transport.run_party(1, engine.fingerprint, STAGE, shares, 128)
        assert torch.equal(y, _product(engine, shares.b))
        assert len(transport._connections) == opened  # the refusals did not cost the connection
        assert transport.retried == 0  # a refusal is an answer, never retried


def test_describe_advertises_the_data_port(tiny, servers):
    with GrpcTransport(_endpoints(servers)) as transport:
        infos = transport.describe()
    assert [info["data_port"] for info in infos] == [server.data_port for server, _ in servers]
    assert all(info["data_port"] > 0 for info in infos)


def test_servers_without_a_data_plane_get_grpc_streams(tiny, servers):
    engine = tiny[3]
    old, port = start_server(engine, "127.0.0.1", 0, max_workers=4, data_port=None)
    try:
        endpoints = (_endpoints(servers)[0], f"127.0.0.1:{port}")  # A has a data plane, B has none
        shares = share(_ring(2, 64, seed=11))
        with DataPlaneTransport(GrpcTransport(endpoints, config=HSSEEClientConfig(**FAST))) as transport:
            infos = transport.check_fingerprint(engine.fingerprint)
            assert infos[1]["data_port"] == 0
            for _ in range(3):
                y_a, y_b = transport.run_stage(engine.fingerprint, STAGE, shares, out_features=128)
                assert torch.equal(y_a + y_b, _product(engine, shares.a + shares.b))
            assert transport.data_plane_calls == 3 and transport.streamed == 3
    finally:
        old.stop(None)


def test_the_config_switch_keeps_stage_calls_on_grpc(tiny, servers, reference):
    _, folder, key, _ = tiny
    config = HSSEEClientConfig(data_plane=False)
    with HSSEEForCausalLM.from_pretrained(folder, key=key, endpoints=_endpoints(servers), client_config=config) as m:
        assert type(m.hss_ee_client.transport) is GrpcTransport
        assert _generate(m) == reference


def test_serve_puts_the_data_plane_next_to_the_grpc_port(tiny_ee_checkpoint: Path):
    import os
    import signal

    port = free_port()
    while True:  # hss-ee serve's default data port is PORT + 1: find a pair that is free
        try:
            socket.create_server(("127.0.0.1", port + 1)).close()
            break
        except OSError:
            port = free_port()
    seen = {}

    def on_ready(bound: int) -> None:
        # party B is never asked: one server cannot be both parties (the client refuses a shared address)
        with GrpcTransport(
            (f"127.0.0.1:{bound}", f"127.0.0.1:{free_port()}"), config=HSSEEClientConfig(**FAST)
        ) as transport:
            seen["data_port"] = transport.describe_party(0)["data_port"]
        os.kill(os.getpid(), signal.SIGTERM)

    serve(tiny_ee_checkpoint, port=port, progress=False, grace=1.0, ready_callback=on_ready)
    assert seen["data_port"] == port + 1


# --- raw frames: the server's checks ------------------------------------------------------------------------------


def _raw(port: int, token: str = "", fingerprint: str = "ab" * 32, context: ssl.SSLContext | None = None):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    sock.sendall(hello_frame(PROTOCOL_VERSION, token.encode(), fingerprint.encode()))
    return sock, FrameReader(sock)


def _answer(reader: FrameReader) -> tuple[int, str, int, bytes]:
    """`(kind, status name, request id, body)` of the next frame."""
    length, kind, flag, _, request_id, _ = HEADER.unpack(reader.read(HEADER_BYTES))
    return kind, status_name(flag) if kind == ERROR else "", request_id, bytes(reader.read(length))


def _stage_frame(request_id: int, stage: str, x: torch.Tensor) -> bytes:
    buf = bytearray(HEADER_BYTES + 64 + x.numel() * 8)
    offset = stage_header(buf, request_id, stage.encode(), x.shape[0], False, x.numel() * 8)
    buf[offset : offset + x.numel() * 8] = x.numpy().tobytes()
    return bytes(buf[: offset + x.numel() * 8])


def _closed(sock: socket.socket, reader: FrameReader) -> bool:
    try:
        reader.read(1)
    except (ConnectionError, ssl.SSLError, OSError):
        return True
    return False


def test_bearer_token_is_checked_in_the_hello(tiny):
    engine = tiny[3]
    server, port = start_server(engine, "127.0.0.1", 0, max_workers=2, security=HSSEEServerSecurity(tokens=[TOKEN]))
    # party B: another server (the client refuses one server as both parties)
    twin, twin_port = start_server(engine, "127.0.0.1", 0, max_workers=2, security=HSSEEServerSecurity(tokens=[TOKEN]))
    try:
        for token in ("", "wrong-" + TOKEN, TOKEN[:-1]):
            sock, reader = _raw(server.data_port, token=token, fingerprint=engine.fingerprint)
            kind, code, _, body = _answer(reader)
            assert (kind, code) == (ERROR, "UNAUTHENTICATED") and b"bearer token" in body
            assert TOKEN.encode() not in body
            assert _closed(sock, reader)
            sock.close()
        sock, reader = _raw(server.data_port, token=TOKEN, fingerprint=engine.fingerprint)
        assert _answer(reader)[0] == HELLO_OK
        x = _ring(2, 64, seed=3)
        sock.sendall(_stage_frame(7, STAGE, x))
        kind, _, request_id, body = _answer(reader)
        assert (kind, request_id) == (REPLY, 7) and body == _product(engine, x).numpy().tobytes()
        sock.close()
        config = HSSEEClientConfig(token=TOKEN, **FAST)
        endpoints = (f"127.0.0.1:{port}", f"127.0.0.1:{twin_port}")
        with DataPlaneTransport(GrpcTransport(endpoints, config=config)) as transport:
            y_a, y_b = transport.run_stage(engine.fingerprint, STAGE, share(x), out_features=128)
            assert transport.data_plane_calls == 2 and torch.equal(y_a + y_b, _product(engine, x))
    finally:
        server.stop(None)
        twin.stop(None)


def test_a_stage_frame_before_the_hello_is_refused(tiny, servers):
    sock = socket.create_connection(("127.0.0.1", servers[0][0].data_port), timeout=5.0)
    sock.sendall(_stage_frame(1, STAGE, _ring(1, 64, seed=1)))
    reader = FrameReader(sock)
    kind, code, _, body = _answer(reader)
    assert (kind, code) == (ERROR, "INVALID_ARGUMENT") and b"HELLO" in body
    assert _closed(sock, reader)
    sock.close()


def test_connections_beyond_the_slots_are_told_so_and_the_client_uses_grpc(tiny):
    engine = tiny[3]
    server, port = start_server(engine, "127.0.0.1", 0, max_workers=1)  # 2 data-plane connections
    twin, twin_port = start_server(engine, "127.0.0.1", 0, max_workers=4)  # party B (one server is not both)
    endpoints = (f"127.0.0.1:{port}", f"127.0.0.1:{twin_port}")
    shares = share(_ring(1, 64, seed=5))
    held = []
    try:
        first = DataPlaneTransport(GrpcTransport(endpoints, config=HSSEEClientConfig(**FAST)))
        first.run_stage(engine.fingerprint, STAGE, shares, 128)  # takes one slot of party A's server
        held.append(_raw(server.data_port, fingerprint=engine.fingerprint))  # and this one the other
        assert _answer(held[0][1])[0] == HELLO_OK
        sock, reader = _raw(server.data_port, fingerprint=engine.fingerprint)
        kind, code, _, body = _answer(reader)
        assert (kind, code) == (ERROR, "RESOURCE_EXHAUSTED") and SLOTS_FULL_DETAILS.encode() in body
        sock.close()
        with DataPlaneTransport(GrpcTransport(endpoints, config=HSSEEClientConfig(**FAST))) as second:
            y_a, y_b = second.run_stage(engine.fingerprint, STAGE, shares, 128)
            # party A over gRPC (unary: one worker has no stream to spare), party B on its data plane
            assert second.data_plane_calls == 1
            assert torch.equal(y_a + y_b, _product(engine, shares.a + shares.b))
        first.close()
    finally:
        for sock, _ in held:
            sock.close()
        server.stop(None)
        twin.stop(None)


# --- TLS and mutual TLS -------------------------------------------------------------------------------------------


def make_pki(d: Path) -> Pki:
    """A test CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and one from another CA."""
    ca, ca_key = _ca("hss-ee data-plane test CA")
    server, server_key = _leaf("share-server", ca, ca_key, server=True)
    client, client_key = _leaf("client", ca, ca_key, server=False)
    rogue_ca, rogue_ca_key = _ca("rogue CA")
    rogue, rogue_key = _leaf("rogue-client", rogue_ca, rogue_ca_key, server=False)
    return Pki(
        ca=_write_cert(ca, d / "ca.pem"),
        server_cert=_write_cert(server, d / "server.pem"),
        server_key=_write_key(server_key, d / "server.key"),
        client_cert=_write_cert(client, d / "client.pem"),
        client_key=_write_key(client_key, d / "client.key"),
        rogue_cert=_write_cert(rogue, d / "rogue.pem"),
        rogue_key=_write_key(rogue_key, d / "rogue.key"),
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("dataplane-pki"))


@pytest.fixture(scope="module")
def tls_server(tiny, certs: Pki) -> Iterator[tuple[tuple[str, str], int]]:
    """Two TLS servers (no client certificates) that require the bearer token: `(endpoints, A's data port)`."""
    security = HSSEEServerSecurity(tls_cert=certs.server_cert, tls_key=certs.server_key, tokens=[TOKEN])
    yield from _two_servers(tiny[3], security)


@pytest.fixture(scope="module")
def mtls_server(tiny, certs: Pki) -> Iterator[tuple[tuple[str, str], int]]:
    security = HSSEEServerSecurity(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca)
    yield from _two_servers(tiny[3], security)


def _two_servers(engine: StageEngine, security: HSSEEServerSecurity) -> Iterator[tuple[tuple[str, str], int]]:
    """`((endpoint A, endpoint B), party A's data port)` of two servers (the client refuses one as both parties)."""
    started = [start_server(engine, "127.0.0.1", 0, max_workers=2, security=security) for _ in range(2)]
    yield _endpoints(started), started[0][0].data_port
    for server, _ in started:
        server.stop(None)


def _tls_call(endpoints: tuple[str, str], config: HSSEEClientConfig, engine: StageEngine) -> DataPlaneTransport:
    x = _ring(3, 64, seed=21)
    with DataPlaneTransport(GrpcTransport(endpoints, config=config)) as transport:
        y_a, y_b = transport.run_stage(engine.fingerprint, STAGE, share(x), out_features=128)
    assert torch.equal(y_a + y_b, _product(engine, x))
    return transport


def test_tls_data_plane_is_exact(tiny, tls_server, certs: Pki):
    transport = _tls_call(tls_server[0], HSSEEClientConfig(tls_ca_cert=certs.ca, token=TOKEN, **FAST), tiny[3])
    assert transport.data_plane_calls == 2


def test_tls_data_plane_refuses_plaintext_and_unknown_cas(tiny, tls_server, certs: Pki):
    _, data_port = tls_server
    sock, reader = _raw(data_port, token=TOKEN, fingerprint=tiny[3].fingerprint)  # plaintext HELLO
    with pytest.raises((ConnectionError, OSError)):
        kind = _answer(reader)[0]
        assert kind != HELLO_OK
        raise ConnectionError("answered, but not with HELLO_OK")
    sock.close()
    rogue = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    rogue.load_verify_locations(cafile=str(certs.rogue_cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        _raw(data_port, token=TOKEN, context=rogue)


def test_mutual_tls_data_plane(tiny, mtls_server, certs: Pki):
    endpoints, data_port = mtls_server
    config = HSSEEClientConfig(
        tls_ca_cert=certs.ca, tls_client_cert=certs.client_cert, tls_client_key=certs.client_key
    )
    assert _tls_call(endpoints, config, tiny[3]).data_plane_calls == 2
    for cert, key in ((None, None), (certs.rogue_cert, certs.rogue_key)):  # no client certificate, another CA's
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(certs.ca))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            sock, reader = _raw(data_port, fingerprint=tiny[3].fingerprint, context=context)
            try:
                assert _answer(reader)[0] != HELLO_OK
                raise ConnectionError("answered, but not with HELLO_OK")
            finally:
                sock.close()


# --- deadlines and faults -----------------------------------------------------------------------------------------


class _Servers:
    """Two share servers on loopback that a test can kill and restart on the same gRPC ports."""

    def __init__(self, engines: tuple):
        self.engines = engines
        started = [start_server(e, "127.0.0.1", 0, max_workers=4) for e in engines]
        self.servers = [server for server, _ in started]
        self.ports = [port for _, port in started]
        self.restarted = threading.Event()

    @property
    def endpoints(self) -> tuple[str, str]:
        return tuple(f"127.0.0.1:{port}" for port in self.ports)

    def kill(self, party: int) -> None:
        self.servers[party].stop(0).wait()

    def restart(self, party: int) -> None:
        self.servers[party], _ = start_server(self.engines[party], "127.0.0.1", self.ports[party], max_workers=4)
        self.restarted.set()

    def kill_then_restart_later(self, party: int, delay: float) -> None:
        self.kill(party)
        threading.Timer(delay, self.restart, args=(party,)).start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop(None)


class _SlowEngine:
    def __init__(self, engine: StageEngine, delay: float):
        self.engine, self.delay = engine, delay

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def compute(self, *args, **kwargs) -> bytes:
        time.sleep(self.delay)
        return self.engine.compute(*args, **kwargs)


def test_every_call_has_a_deadline(tiny):
    servers = _Servers((tiny[3], _SlowEngine(tiny[3], delay=1.5)))
    try:
        config = HSSEEClientConfig(timeout=0.3, retries=3)
        with DataPlaneTransport(GrpcTransport(servers.endpoints, config=config)) as transport:
            transport.check_fingerprint(tiny[3].fingerprint)
            start = time.monotonic()
            with pytest.raises(TransportError) as info:
                transport.run_stage(tiny[3].fingerprint, STAGE, share(_ring(1, 64, seed=1)), out_features=128)
            elapsed = time.monotonic() - start
            assert transport.data_plane_calls == 1  # party A answered on the data plane, B was late
    finally:
        servers.stop()
    assert info.value.endpoint == servers.endpoints[1] and "DEADLINE_EXCEEDED" in str(info.value)
    assert elapsed < 1.2  # a deadline is not retried: the server may still be working on the call


class _Counting(DataPlaneTransport):
    """Calls `hook(n)` before the n-th call that reaches server B (alone, or with A)."""

    def __init__(self, servers: _Servers, hook):
        super().__init__(GrpcTransport(servers.endpoints, config=RESTART_CONFIG))
        self.hook, self.calls = hook, 0

    def send_party(self, party, fingerprint, stage, shares, out_features, geometry=None):
        if party == 1:
            self.calls += 1
            self.hook(self.calls)
        return super().send_party(party, fingerprint, stage, shares, out_features, geometry)


def test_server_killed_between_calls_and_restarted_mid_generation(tiny, reference):
    _, folder, key, engine = tiny
    servers = _Servers((engine, engine))
    try:
        transport = _Counting(servers, lambda n: n == 30 and servers.kill_then_restart_later(1, 0.3))
        with HSSEEForCausalLM.from_pretrained(folder, key=key, transport=transport) as model:
            tokens = _generate(model)
            before = transport.data_plane_calls
            time.sleep(1.1)  # past the client's hold-off: it asks the restarted server for its new data port
            assert _generate(model) == reference
            assert transport.data_plane_calls > before  # back on the data plane after the restart
        assert servers.restarted.is_set() and transport.retried > 0
        assert tokens == reference
    finally:
        servers.stop()


class _KillInFlightEngine:
    """Wraps a `StageEngine`; during its `kill_at`-th call it kills its own server, so that call is in flight."""

    def __init__(self, engine: StageEngine, kill_at: int):
        self.engine, self.kill_at, self.calls, self.servers = engine, kill_at, 0, None

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def compute(self, *args, **kwargs) -> bytes:
        self.calls += 1
        if self.calls == self.kill_at:
            threading.Thread(target=self.servers.kill_then_restart_later, args=(1, 0.3)).start()
            time.sleep(0.2)
        return self.engine.compute(*args, **kwargs)


def test_server_killed_during_a_call_and_restarted_mid_generation(tiny, reference):
    _, folder, key, engine = tiny
    dying = _KillInFlightEngine(engine, kill_at=25)
    servers = _Servers((engine, dying))
    dying.servers = servers
    try:
        transport = DataPlaneTransport(GrpcTransport(servers.endpoints, config=RESTART_CONFIG))
        with HSSEEForCausalLM.from_pretrained(folder, key=key, transport=transport) as model:
            tokens = _generate(model)
        assert servers.restarted.is_set()
        assert tokens == reference
    finally:
        servers.stop()


def test_a_server_that_stays_down_is_named(tiny):
    servers = _Servers((tiny[3], tiny[3]))
    try:
        # no restart window: a server that stays down is named after the retries alone
        config = HSSEEClientConfig(timeout=5.0, retries=3, initial_backoff=0.05, max_backoff=0.2, restart_window=0.0)
        with DataPlaneTransport(GrpcTransport(servers.endpoints, config=config)) as transport:
            transport.check_fingerprint(tiny[3].fingerprint)
            transport.run_stage(tiny[3].fingerprint, STAGE, share(_ring(1, 64, seed=1)), out_features=128)
            servers.kill(1)
            start = time.monotonic()
            with pytest.raises(TransportError) as info:
                transport.run_stage(tiny[3].fingerprint, STAGE, share(_ring(1, 64, seed=2)), out_features=128)
            elapsed = time.monotonic() - start
    finally:
        servers.stop()
    assert info.value.endpoint == servers.endpoints[1]
    assert "UNAVAILABLE (after 4 attempts)" in str(info.value) and "hss-ee serve" in str(info.value)
    assert elapsed < 3.0


class _FlakyEngine:
    """Refuses a random `rate` of stage calls with `UNAVAILABLE` before computing (an ERROR frame, here)."""

    def __init__(self, engine: StageEngine, rate: float, seed: int):
        self._engine, self.rate, self.rng, self.lock = engine, rate, random.Random(seed), threading.Lock()
        self.calls = self.injected = 0

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def compute(self, *args, **kwargs) -> bytes:
        with self.lock:
            self.calls += 1
            fail = self.rng.random() < self.rate
            self.injected += fail
        if fail:
            raise StageRequestError("injected fault", code="UNAVAILABLE")
        return self._engine.compute(*args, **kwargs)


def test_five_percent_unavailable_replies(tiny):
    _, folder, key, engine = tiny
    rng = random.Random(5)
    prompts = [[1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 6))] for _ in range(20)]
    with HSSEEForCausalLM.from_pretrained(folder, key=key, transport=InProcessTransport(engine)) as model:
        expected = {tuple(p): _generate(model, p, new_tokens=2) for p in prompts}
    flaky = _FlakyEngine(engine, 0.05, seed=5)
    servers = _Servers((flaky, flaky))
    config = HSSEEClientConfig(timeout=5.0, retries=4, initial_backoff=0.001, max_backoff=0.01)
    wrong = failed = 0
    generations = 300
    try:
        transport = DataPlaneTransport(GrpcTransport(servers.endpoints, config=config))
        with HSSEEForCausalLM.from_pretrained(folder, key=key, transport=transport) as model:
            for i in range(generations):
                prompt = prompts[i % len(prompts)]
                try:
                    wrong += _generate(model, prompt, new_tokens=2) != expected[tuple(prompt)]
                except TransportError:
                    failed += 1
    finally:
        servers.stop()
    print(f"\n{flaky.calls} calls, {flaky.injected} UNAVAILABLE injected, {transport.retried} retries")
    assert 0.03 < flaky.injected / flaky.calls < 0.07
    # every refusal is retried, except on party A's prepared chunks still uncollected when the model closed
    assert transport.data_plane_calls > 0.8 * flaky.calls and transport.retried > 0.9 * flaky.injected
    assert wrong == 0 and failed == 0


def test_stop_lets_a_call_in_flight_finish(tiny):
    engine = tiny[3]
    servers = _Servers((engine, _SlowEngine(engine, delay=0.5)))
    shares = share(_ring(1, 64, seed=9))
    got = {}
    try:
        with DataPlaneTransport(GrpcTransport(servers.endpoints, config=HSSEEClientConfig(timeout=5.0))) as transport:
            transport.check_fingerprint(engine.fingerprint)
            caller = threading.Thread(
                target=lambda: got.update(y=transport.run_party(1, engine.fingerprint, STAGE, shares, 128))
            )
            caller.start()
            time.sleep(0.2)  # the call is being computed
            servers.servers[1].stop(2.0).wait()
            caller.join()
    finally:
        servers.stop()
    assert torch.equal(got["y"], _product(engine, shares.b))
    assert transport.data_plane_calls == 1  # answered on the data plane before it closed


# --- the client's lean codec --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_features", [64, 576, 1536])
def test_stage_codec_is_encode_and_decode_output_bit_for_bit(dtype: torch.dtype, in_features: int):
    from hss_ee_hf.errors import RingOverflowError
    from hss_ee_hf.ring.fixed_point import RingConfig, StageCodec, decode_output, encode

    config = RingConfig()
    gen = torch.Generator().manual_seed(in_features)
    scale = torch.rand(96, dtype=torch.float64, generator=gen) / 1000
    codec = StageCodec(config, in_features, scale)
    limit = config.activation_limit(in_features)
    x = torch.randn(5, in_features, generator=gen, dtype=torch.float64) * 30
    x[0, :8] = torch.tensor([0.5, -0.5, 1.5, -2.5, 3.5, -0.0, 0.0, 7.5]) / 2**16  # ties round half to even
    x = x.to(dtype)
    below = torch.nextafter(torch.tensor(limit, dtype=dtype), torch.tensor(0.0, dtype=dtype))  # in x's precision
    x[1, :2] = torch.stack([below, -below])
    assert torch.equal(codec.encode(x), encode(x, config, in_features))
    for bad in (limit, -limit, float("nan"), float("inf")):
        y = x.clone()
        y[2, 3] = bad
        with pytest.raises(RingOverflowError, match="fixed-point range"):
            codec.encode(y)
    out_limit = config.output_limit(in_features)
    y_int = torch.randint(-out_limit, out_limit + 1, (4, 96), generator=gen, dtype=torch.int64)
    y_int[0, :2] = torch.tensor([out_limit, -out_limit])
    a = torch.randint(-(2**63), 2**63 - 1, (4, 96), generator=gen, dtype=torch.int64)
    expected = decode_output(y_int, scale, in_features, config).to(dtype)
    assert torch.equal(codec.decode(a, y_int - a, dtype), expected)
    for bad in (out_limit + 1, -out_limit - 1, -(2**63)):
        y = y_int.clone()
        y[1, 1] = bad
        with pytest.raises(RingOverflowError):
            codec.decode(a, y - a, dtype)


# --- party A's products prepared in chunks ------------------------------------------------------------------------


class _Recording:
    """Keeps `(rows, seed or share bytes)` of every request an engine computes."""

    def __init__(self, engine: StageEngine):
        self.engine, self.received = engine, []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def compute(self, fingerprint, stage, rows, share=None, seed=None, version=PROTOCOL_VERSION, geometry=None):
        self.received.append((rows, bytes(seed if seed is not None else share)))
        return self.engine.compute(
            fingerprint, stage, rows, share=share, seed=seed, version=version, geometry=geometry
        )


def test_party_a_chunks_grow_and_every_mask_row_is_used_once(tiny):
    from hss_ee_hf.client.stage_client import StageClient
    from hss_ee_hf.ring.fixed_point import RingConfig, StageCodec
    from hss_ee_hf.ring.sharing import expand_share

    engine = tiny[3]
    recorders = (_Recording(engine), _Recording(engine))
    servers = [start_server(r, "127.0.0.1", 0, max_workers=2) for r in recorders]
    scale = torch.rand(128, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) / 100
    xs = [torch.randn(1, 64, generator=torch.Generator().manual_seed(i)) for i in range(40)]
    try:
        transport = DataPlaneTransport(GrpcTransport(_endpoints(servers), config=HSSEEClientConfig(**FAST)))
        client = StageClient(transport, engine.info, {STAGE: scale}, {STAGE: 64}, max_rows=64)
        reference = StageClient(InProcessTransport(engine), engine.info, {STAGE: scale}, {STAGE: 64}, precompute=False)
        for x in xs:
            assert torch.equal(client.run(STAGE, x), reference.run(STAGE, x))  # exact, bit for bit
        client.close()
        transport.close()
    finally:
        for server, _ in servers:
            server.stop(None)
    seeds, shares = recorders[0].received, recorders[1].received
    assert [rows for rows, _ in seeds][:7] == [1, 1, 2, 4, 8, 16, 16]  # the first call went to both servers
    assert client.stats.precomputed == len(xs) - 1
    # party B's share of call i is x_i - (the next unused mask row), in order: no row is ever used twice
    masks = torch.cat([expand_share(seed, (rows, 64)) for rows, seed in seeds[1:]])
    codec = StageCodec(RingConfig(), 64, scale)
    for i, (x, (_, b)) in enumerate(zip(xs[1:], shares[1:], strict=True)):
        b = torch.frombuffer(bytearray(b), dtype=torch.int64).view(1, 64)
        assert torch.equal(b, codec.encode(x) - masks[i : i + 1])


def test_prepared_products_outlive_the_deadline_between_calls(tiny, servers):
    """A chunk asked for long before it is needed is read normally: the deadline bounds the wait, not the age."""
    from hss_ee_hf.client.stage_client import StageClient

    engine = tiny[3]
    scale = torch.ones(128, dtype=torch.float64) / 1000
    config = HSSEEClientConfig(timeout=0.3, retries=1)
    transport = DataPlaneTransport(GrpcTransport(_endpoints(servers), config=config))
    client = StageClient(transport, engine.info, {STAGE: scale}, {STAGE: 64}, max_rows=64)
    reference = StageClient(InProcessTransport(engine), engine.info, {STAGE: scale}, {STAGE: 64}, precompute=False)
    try:
        for i in range(12):
            x = torch.randn(1, 64, generator=torch.Generator().manual_seed(i))
            assert torch.equal(client.run(STAGE, x), reference.run(STAGE, x))
            if i in (4, 8):
                time.sleep(0.5)  # longer than the deadline, with prepared chunks on the wire
        assert client.stats.precomputed == 11
    finally:
        client.close()
        transport.close()
