"""The share server and the transports (DESIGN.md §7).

Exactness is checked against a pure int64 reference `x @ W_int.T` over both transports; the server's
validation against malformed requests over real gRPC on loopback (port 0).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors import safe_open

from hss_ee_hf.errors import StageRequestError, TransportError
from hss_ee_hf.ring.csprng import SEED_BYTES
from hss_ee_hf.ring.fixed_point import RingConfig, quantize_weight
from hss_ee_hf.ring.sharing import share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import SERVICE_NAME, ShareServerError, message_limit, serve, start_server
from hss_ee_hf.transport.base import PROTOCOL_VERSION, Transport
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.grpc_client import GrpcTransport
from hss_ee_hf.transport.inprocess import InProcessTransport
from hss_ee_hf.transport.protos import hss_ee_pb2, hss_ee_pb2_grpc

FINGERPRINT = "ab" * 32
MAX_ROWS = 8192
HIDDEN = 32
# Checkpoint tensors of a stage, in the order the stage concatenates them along the output dimension.
STAGE_TENSORS = {
    "layers.0.qkv": [f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"],
    "layers.1.up": ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"],
    "lm_head": ["lm_head.weight"],
}


@pytest.fixture(scope="module")
def engine(tiny_ee_checkpoint: Path) -> StageEngine:
    return StageEngine(tiny_ee_checkpoint, max_rows=MAX_ROWS)


@pytest.fixture(scope="module")
def endpoints(engine: StageEngine) -> Iterator[tuple[str, str]]:
    """Two servers (party A and party B) on free loopback ports."""
    started = [start_server(engine, "127.0.0.1", 0) for _ in range(2)]
    yield tuple(f"127.0.0.1:{port}" for _, port in started)
    for server, _ in started:
        server.stop(grace=None)


@pytest.fixture
def channel(endpoints: tuple[str, str]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(endpoints[0]) as ch:
        yield ch


@pytest.fixture(params=["in_process", "grpc"])
def transport(request: pytest.FixtureRequest, engine: StageEngine) -> Iterator[Transport]:
    if request.param == "in_process":
        t = InProcessTransport(engine)
    else:
        t = GrpcTransport(request.getfixturevalue("endpoints"), timeout=10.0)
    yield t
    t.close()


def reference_weight(checkpoint: Path, stage: str) -> torch.Tensor:
    """The stage's integer weight, quantised from the checkpoint's float tensors."""
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        parts = [f.get_tensor(name) for name in STAGE_TENSORS[stage]]
    w_int, _ = quantize_weight(torch.cat(parts, dim=0), RingConfig(frac_bits=16, weight_bits=16))
    return w_int


def random_ring(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Test inputs spanning the whole ring, so wrap-around is exercised (not masks: those come from sharing)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (rows, cols), dtype=torch.int64, generator=gen)


def stage_request(**overrides) -> hss_ee_pb2.StageRequest:
    """A valid 2-row seed request for `layers.0.qkv`, with fields replaced by `overrides`."""
    fields = {
        "version": PROTOCOL_VERSION,
        "fingerprint": FINGERPRINT,
        "stage": "layers.0.qkv",
        "rows": 2,
        "seed": bytes(range(SEED_BYTES)),
    }
    fields.update(overrides)
    return hss_ee_pb2.StageRequest(**{k: v for k, v in fields.items() if v is not None})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (stage, rows): 6000 rows of `layers.1.up` make a 4.6 MB reply, beyond gRPC's default 4 MiB limit.
@pytest.mark.parametrize("stage, rows", [("layers.0.qkv", 5), ("layers.1.up", 6000), ("lm_head", 1)])
def test_output_shares_reconstruct_the_exact_ring_product(
    transport: Transport, tiny_ee_checkpoint: Path, stage: str, rows: int
):
    w_int = reference_weight(tiny_ee_checkpoint, stage)
    x = random_ring(rows, HIDDEN, seed=rows)
    y_a, y_b = transport.run_stage(FINGERPRINT, stage, share(x), out_features=w_int.shape[0])
    assert y_a.dtype == y_b.dtype == torch.int64
    assert torch.equal(y_a + y_b, x @ w_int.T)


def test_refused_request_names_the_server(transport: Transport):
    shares = share(random_ring(2, HIDDEN, seed=1))
    with pytest.raises(TransportError) as info:
        transport.run_stage("cd" * 32, "layers.0.qkv", shares, out_features=64)
    assert info.value.endpoint in transport.endpoints
    assert "FAILED_PRECONDITION" in str(info.value)
    assert "does not match the served checkpoint" in str(info.value)


@pytest.mark.parametrize(
    "overrides, code",
    [
        ({"stage": "layers.9.qkv"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"stage": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"seed": None, "share": bytes(2 * HIDDEN * 8 - 8)}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"seed": None, "share": bytes(3 * HIDDEN * 8)}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"seed": bytes(SEED_BYTES - 1)}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"seed": None}, grpc.StatusCode.INVALID_ARGUMENT),  # neither a share nor a seed
        ({"fingerprint": "cd" * 32}, grpc.StatusCode.FAILED_PRECONDITION),
        ({"fingerprint": ""}, grpc.StatusCode.FAILED_PRECONDITION),
        ({"rows": 0}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"rows": -3}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"rows": MAX_ROWS + 1}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ({"rows": 2**62}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ({"version": PROTOCOL_VERSION + 1}, grpc.StatusCode.FAILED_PRECONDITION),
        ({"version": None}, grpc.StatusCode.FAILED_PRECONDITION),  # an old client that sends no version
    ],
)
def test_malformed_request_gets_its_status_and_the_server_keeps_serving(
    channel: grpc.Channel, overrides: dict, code: grpc.StatusCode
):
    stub = hss_ee_pb2_grpc.ShareServerStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Stage(stage_request(**overrides), timeout=5.0)
    assert info.value.code() == code
    assert info.value.details()  # a message that says what was wrong
    reply = stub.Stage(stage_request(), timeout=5.0)
    assert len(reply.share) == 2 * 64 * 8


def test_a_request_carries_at_most_one_of_share_and_seed(engine: StageEngine):
    # On the wire a oneof keeps the last member it reads, so a server never sees both...
    both = (
        stage_request(seed=None, share=bytes(2 * HIDDEN * 8)).SerializeToString() + stage_request().SerializeToString()
    )
    parsed = hss_ee_pb2.StageRequest.FromString(both)
    assert parsed.WhichOneof("input") == "seed" and parsed.share == b""
    # ...and the engine refuses a call that passes both anyway.
    with pytest.raises(StageRequestError) as info:
        engine.compute(FINGERPRINT, "layers.0.qkv", 2, share=bytes(2 * HIDDEN * 8), seed=bytes(SEED_BYTES))
    assert info.value.code == "INVALID_ARGUMENT"


class _FailingEngine:
    """Duck-typed engine whose compute fails with an error message holding (fake) request data."""

    fingerprint = FINGERPRINT
    max_rows = 4
    max_message_bytes = 4 * 64 * 8

    def describe(self) -> dict[str, tuple[int, int]]:
        return {"layers.0.qkv": (HIDDEN, 64)}

    def compute(self, *args, **kwargs) -> bytes:
        raise RuntimeError("SECRET-PAYLOAD-BYTES")


def test_unexpected_server_failure_is_internal_with_a_generic_message(caplog: pytest.LogCaptureFixture):
    server, port = start_server(_FailingEngine(), "127.0.0.1", 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as info:
                hss_ee_pb2_grpc.ShareServerStub(ch).Stage(stage_request(), timeout=5.0)
    finally:
        server.stop(grace=None)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "SECRET" not in info.value.details()
    assert "RuntimeError" in caplog.text and "SECRET" not in caplog.text


def test_reply_of_the_wrong_size_names_the_faulty_server(endpoints: tuple[str, str]):
    class ShortReply(_FailingEngine):
        def compute(self, *args, **kwargs) -> bytes:
            return bytes(8)

    server, port = start_server(ShortReply(), "127.0.0.1", 0)
    faulty = f"127.0.0.1:{port}"
    try:
        with GrpcTransport((endpoints[0], faulty), timeout=5.0) as transport, pytest.raises(TransportError) as info:
            transport.run_stage(FINGERPRINT, "layers.0.qkv", share(random_ring(1, HIDDEN, seed=3)), out_features=64)
    finally:
        server.stop(grace=None)
    assert info.value.endpoint == faulty and "faulty" in str(info.value)


def test_dead_endpoint_fails_fast_naming_it(endpoints: tuple[str, str]):
    dead = f"127.0.0.1:{free_port()}"
    with GrpcTransport((endpoints[0], dead), timeout=2.0) as transport:
        start = time.monotonic()
        with pytest.raises(TransportError) as info:
            transport.run_stage(FINGERPRINT, "layers.0.qkv", share(random_ring(1, HIDDEN, seed=2)), out_features=64)
        assert time.monotonic() - start < 5.0
    assert info.value.endpoint == dead
    assert "UNAVAILABLE" in str(info.value) and "hss-ee serve" in str(info.value)


def test_explicit_arguments_override_the_client_config(endpoints: tuple[str, str]):
    config = HSSEEClientConfig(timeout=30.0, max_message_bytes=1 << 20)
    with GrpcTransport(endpoints, timeout=2.5, config=config) as transport:
        assert transport.timeout == 2.5 and transport.config is config
    with GrpcTransport(endpoints, config=config) as transport:
        assert transport.timeout == 30.0


def test_a_closed_transport_says_so(endpoints: tuple[str, str]):
    transport = GrpcTransport(endpoints, timeout=5.0)
    transport.close()
    with pytest.raises(TransportError, match="this transport is closed"):
        transport.run_stage(FINGERPRINT, "layers.0.qkv", share(random_ring(1, HIDDEN, seed=4)), out_features=64)


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_health_check_reports_serving(channel: grpc.Channel, service: str):
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5.0)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_describe_lists_the_stages(endpoints: tuple[str, str], engine: StageEngine):
    with GrpcTransport(endpoints, timeout=5.0) as transport:
        infos = transport.describe()
        transport.check_fingerprint(FINGERPRINT)
        with pytest.raises(TransportError) as info:
            transport.check_fingerprint("cd" * 32)
    assert info.value.endpoint == endpoints[0] and "serves checkpoint abababababab" in str(info.value)
    for endpoint, described in zip(endpoints, infos, strict=True):
        assert described["endpoint"] == endpoint
        assert described["fingerprint"] == FINGERPRINT
        assert described["protocol_version"] == PROTOCOL_VERSION
        assert described["max_rows"] == MAX_ROWS
        assert described["stages"] == engine.describe()
        assert list(described["stages"])[:4] == ["layers.0.qkv", "layers.0.o", "layers.0.up", "layers.0.down"]
        assert described["stages"]["layers.0.up"] == (HIDDEN, 2 * 48)


def test_server_refuses_a_busy_port(engine: StageEngine, endpoints: tuple[str, str]):
    busy = int(endpoints[0].rsplit(":", 1)[1])
    with pytest.raises(ShareServerError, match="choose another port"):
        start_server(engine, "127.0.0.1", busy)


def test_server_refuses_stages_too_large_for_one_message():
    class Huge(_FailingEngine):
        max_rows = 1 << 20
        max_message_bytes = (1 << 20) * 4096 * 8

    with pytest.raises(ShareServerError, match="use at most 65533 rows"):
        message_limit(Huge())


def test_serve_stops_cleanly_on_sigterm(tiny_ee_checkpoint: Path):
    seen = {}

    def on_ready(port: int) -> None:
        # serve() runs in this (main) thread with its signal handlers installed; the server threads answer.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            seen["status"] = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5.0).status
        seen["port"] = port
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    serve(tiny_ee_checkpoint, port=0, progress=False, grace=1.0, ready_callback=on_ready)  # returns on SIGTERM
    assert seen["status"] == health_pb2.HealthCheckResponse.SERVING
    assert signal.getsignal(signal.SIGTERM) is before
    with grpc.insecure_channel(f"127.0.0.1:{seen['port']}") as ch, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
