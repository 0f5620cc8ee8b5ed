"""Stage calls on long-lived gRPC streams (`hss_ee_hf.transport.streams`): same answers, same errors, clean fallbacks.

Deadlines, restarts and injected faults on streams are covered by `test_faults.py` (streams are the default);
tokens by `test_tls.py`. This file checks what only streams have: reuse, a refused request ending only its own
stream, the server's stream slots (refusal, fallback to unary, release on close) and servers without streams.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from hss_ee_hf.errors import TransportError
from hss_ee_hf.ring.sharing import share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server
from hss_ee_hf.server.servicer import SERVICE_NAME, ShareServicer, _lenient_parser
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.grpc_client import GrpcTransport
from hss_ee_hf.transport.protos import hss_ee_pb2

STAGE = "layers.0.qkv"


@pytest.fixture(scope="module")
def engine(tiny_ee_checkpoint: Path) -> StageEngine:
    return StageEngine(tiny_ee_checkpoint)


def _servers(engine: StageEngine, max_workers: int = 8) -> list[tuple[grpc.Server, int]]:
    return [start_server(engine, "127.0.0.1", 0, max_workers=max_workers) for _ in range(2)]


@pytest.fixture
def endpoints(engine: StageEngine) -> Iterator[tuple[str, str]]:
    started = _servers(engine)
    yield tuple(f"127.0.0.1:{port}" for _, port in started)
    for server, _ in started:
        server.stop(grace=None)


def _run(transport: GrpcTransport, engine: StageEngine, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage through `transport`; returns the reconstructed output and the plaintext input."""
    in_features, out_features = engine.describe()[STAGE]
    x = torch.arange(rows * in_features, dtype=torch.int64).view(rows, in_features) * (k + 1) - 7
    y_a, y_b = transport.run_stage(engine.fingerprint, STAGE, share(x), out_features)
    return y_a + y_b, x


def _reference(engine: StageEngine, x: torch.Tensor) -> torch.Tensor:
    """`x @ W_int.T` from the in-process engine given all of `x` (its kernels are proved exact in test_ring)."""
    out_features = engine.describe()[STAGE][1]
    out = engine.compute(engine.fingerprint, STAGE, x.shape[0], share=x.numpy().tobytes())
    return torch.frombuffer(bytearray(out), dtype=torch.int64).view(x.shape[0], out_features)


def test_streamed_calls_equal_unary_calls_and_reuse_one_stream(engine, endpoints):
    streamed = GrpcTransport(endpoints)
    unary = GrpcTransport(endpoints, config=HSSEEClientConfig(stream=False))
    try:
        for rows in (1, 3, 1, 17):
            y_stream, x = _run(streamed, engine, rows, rows)
            y_unary, _ = _run(unary, engine, rows, rows)
            assert torch.equal(y_stream, y_unary)
            assert torch.equal(y_stream, _reference(engine, x))
        assert streamed.streamed == 8 and unary.streamed == 0  # both parties, four calls
        assert [len(pool._idle) for pool in streamed._streams] == [1, 1]  # one stream per server, reused
    finally:
        streamed.close()
        unary.close()


def test_a_refused_request_ends_only_its_stream(engine, endpoints):
    with GrpcTransport(endpoints) as transport:
        _run(transport, engine, 1, 0)
        x = share(torch.zeros(1, engine.describe()[STAGE][0], dtype=torch.int64))
        with pytest.raises(TransportError, match="FAILED_PRECONDITION.*does not match"):
            transport.run_stage("cd" * 32, STAGE, x, engine.describe()[STAGE][1])
        with pytest.raises(TransportError, match="INVALID_ARGUMENT.*unknown stage"):
            transport.run_stage(engine.fingerprint, "layers.99.qkv", x, 8)
        y, x_plain = _run(transport, engine, 2, 5)  # the next call opens a fresh stream and is exact
        assert torch.equal(y, _reference(engine, x_plain))
        assert transport.streamed >= 4


def test_sessions_beyond_the_stream_slots_fall_back_to_unary(engine):
    started = _servers(engine, max_workers=4)  # 4 workers: 2 stream slots, 2 kept for unary calls
    endpoints = tuple(f"127.0.0.1:{port}" for _, port in started)
    sessions = [GrpcTransport(endpoints) for _ in range(3)]
    try:
        for i, transport in enumerate(sessions):  # each keeps its stream open in its pool afterwards
            y, x = _run(transport, engine, 1, i)
            assert torch.equal(y, _reference(engine, x))
        assert [t.streamed for t in sessions] == [2, 2, 0]
        assert sessions[2]._unary_until[0] > time.monotonic()  # refused, and not asked again at once
        with ThreadPoolExecutor(3) as pool:  # all three keep working side by side
            results = list(pool.map(lambda t: _run(t, engine, 2, 9), sessions))
        assert all(torch.equal(y, _reference(engine, x)) for y, x in results)
        sessions[0].close()
        deadline = time.monotonic() + 5.0
        servicer_free = False
        while time.monotonic() < deadline and not servicer_free:  # the server sees the stream end
            time.sleep(0.05)
            fresh = GrpcTransport(endpoints)
            _run(fresh, engine, 1, 1)
            servicer_free = fresh.streamed == 2
            fresh.close()
        assert servicer_free, "closing a transport did not free its stream slots on the servers"
    finally:
        for transport in sessions[1:]:
            transport.close()
        for server, _ in started:
            server.stop(grace=None)


def test_servers_without_streams_are_reached_with_unary_calls(engine):
    """A server of an earlier version has no `StageStream`: the client notices once and goes unary."""
    servicer = ShareServicer(engine)
    old = grpc.server(ThreadPoolExecutor(4))
    old.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE_NAME,
                {
                    "Stage": grpc.unary_unary_rpc_method_handler(
                        servicer.Stage,
                        request_deserializer=_lenient_parser(hss_ee_pb2.StageRequest),
                        response_serializer=hss_ee_pb2.StageReply.SerializeToString,
                    )
                },
            ),
        )
    )
    port = old.add_insecure_port("127.0.0.1:0")
    old.start()
    (current, current_port) = start_server(engine, "127.0.0.1", 0)
    try:
        with GrpcTransport((f"127.0.0.1:{port}", f"127.0.0.1:{current_port}")) as transport:
            for rows in (1, 2):
                y, x = _run(transport, engine, rows, rows)
                assert torch.equal(y, _reference(engine, x))
            assert transport._unary_until[0] == float("inf") and transport._unary_until[1] == 0.0
            assert transport.streamed == 2  # party B only
    finally:
        old.stop(None)
        current.stop(None)


def test_a_stream_left_from_before_a_restart_is_replaced_at_once(engine):
    servers = _servers(engine)
    ports = [port for _, port in servers]
    endpoints = tuple(f"127.0.0.1:{port}" for port in ports)
    config = HSSEEClientConfig(initial_backoff=2.0, max_backoff=2.0)  # a backoff would show in the time
    try:
        with GrpcTransport(endpoints, config=config) as transport:
            _run(transport, engine, 1, 0)  # both pools now hold an open stream
            servers[1][0].stop(None).wait()
            servers[1] = start_server(engine, "127.0.0.1", ports[1])
            start = time.monotonic()
            y, x = _run(transport, engine, 1, 3)
            elapsed = time.monotonic() - start
            assert torch.equal(y, _reference(engine, x))
            assert transport.retried == 0 and elapsed < 1.5, (transport.retried, elapsed)
    finally:
        for server, _ in servers:
            server.stop(None)
