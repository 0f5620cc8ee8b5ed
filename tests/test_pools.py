"""Replica pools per party (DESIGN.md §9): parsing, the shared-address refusal, round_robin with health checking,
the fingerprint of every replica, and a generation that loses one replica of each party midway."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hss_ee_hf.cli.main import build_parser
from hss_ee_hf.client.config import HSSEEConfig
from hss_ee_hf.client.modeling import HSSEEForCausalLM
from hss_ee_hf.errors import TransportError
from hss_ee_hf.ring.sharing import share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.servicer import ShareServicer, share_server_handler
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.grpc_client import GRPC_MAX_MESSAGE_BYTES, GrpcTransport
from hss_ee_hf.transport.pools import EndpointError, SharedAddressError, grpc_target, parse_endpoints
from hss_ee_hf.transport.service_config import client_channel_options, service_config

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import convert_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = [1, 5, 9, 17, 33, 40]
NEW_TOKENS = 8


# --- parsing -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoints, names",
    [
        (("a:1", "b:1"), ("a:1", "b:1")),
        ((("a1:1", "a2:1"), ("b1:1", "b2:1")), ("a1:1,a2:1", "b1:1,b2:1")),
        (["a1:1, a2:1", "b1:1,b2:1"], ("a1:1,a2:1", "b1:1,b2:1")),  # the CLI form
        (("[::1]:5", "dns:///b.example:1"), ("[::1]:5", "dns:///b.example:1")),
    ],
)
def test_endpoints_parse_into_two_pools(endpoints, names):
    assert parse_endpoints(endpoints).names == names


@pytest.mark.parametrize(
    "endpoints, shared",
    [
        (("10.0.0.1:1", "10.0.0.1:1"), "10.0.0.1:1"),
        ((("a1:1", "Shared.Example:7"), ("b1:1", "shared.example:7")), "Shared.Example:7"),
        (("a1:1,[::1]:9", "[0:0:0:0:0:0:0:1]:9"), "[::1]:9"),
    ],
)
def test_an_address_in_both_pools_is_refused_and_named(endpoints, shared):
    with pytest.raises(SharedAddressError, match="both party A and party B") as info:
        parse_endpoints(endpoints)
    assert info.value.address == shared and shared in str(info.value)


def test_a_name_that_resolves_to_the_other_partys_address_is_refused():
    pools = parse_endpoints((("127.0.0.1:5", "127.0.0.1:6"), ("127.0.0.1:7", "party-b.internal:5")))

    def resolve(host, port):
        return {"party-b.internal": ["127.0.0.1"]}[host]

    with pytest.raises(SharedAddressError, match="party-b.internal:5 .party B. resolves to 127.0.0.1:5") as info:
        grpc_target(pools, 1, resolve=resolve)
    assert info.value.address == "party-b.internal:5"
    assert grpc_target(pools, 0, resolve=lambda h, p: ["10.9.9.9"]) == "ipv4:127.0.0.1:5,127.0.0.1:6"


def test_the_transport_refuses_a_shared_address_before_any_request():
    # Nothing listens on these ports: the refusal comes from parsing, before a channel exists.
    start = time.monotonic()
    with pytest.raises(SharedAddressError, match="127.0.0.1:9"):
        GrpcTransport((("127.0.0.1:8", "127.0.0.1:9"), ("127.0.0.1:9",)))
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize(
    "endpoints, message",
    [
        (("a:1",), "name two parties"),
        (("a:1", ""), "party B: no address"),
        (("a:1,a:1", "b:1"), "a:1 is listed twice"),
        (("a", "b:1"), "'a' is not a 'host:port'"),
        (("a:1", "b:99999"), "'b:99999' is not"),
        (("a:1", "::1:5"), "IPv6 as"),
    ],
)
def test_malformed_endpoints_are_refused(endpoints, message):
    with pytest.raises(EndpointError, match=message):
        parse_endpoints(endpoints)


def test_client_config_and_cli_take_pools():
    config = HSSEEConfig(endpoints=[["a1:1", "a2:1"], "b1:1,b2:1"])
    assert json.loads(config.to_json_string())["endpoints"] == [["a1:1", "a2:1"], "b1:1,b2:1"]
    args = build_parser().parse_args(["generate", "m", "hi", "--key", "k", "--endpoints", "a1:1,a2:1", "b1:1,b2:1"])
    assert parse_endpoints(args.endpoints).addresses == (("a1:1", "a2:1"), ("b1:1", "b2:1"))


def test_service_config_retries_large_requests():
    config = HSSEEClientConfig(retries=9, initial_backoff=0.05)
    options = dict(client_channel_options(config, GRPC_MAX_MESSAGE_BYTES))
    assert options["grpc.per_rpc_retry_buffer_size"] == GRPC_MAX_MESSAGE_BYTES  # else a big prefill is never retried
    # No gRPC retry policy: with one, a call refused UNAVAILABLE waited out its deadline (the transport retries).
    assert "retryPolicy" not in json.loads(options["grpc.service_config"])["methodConfig"][0]
    assert service_config(HSSEEClientConfig(retries=0))["methodConfig"][0].get("retryPolicy") is None


# --- pools of live servers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    original, folder, key = convert_tiny("llama", tmp_path_factory.mktemp("pools-llama"))
    return original, folder, key, StageEngine(folder)


class _Replica:
    """One share server on loopback that counts its stage calls; a test can kill it or mark it unhealthy."""

    def __init__(self, engine, party: Counter | None = None):
        # `party` counts the stage calls of all replicas of one party; its "kill_at"-th kills the replica serving it.
        self.engine, self.calls, self.party = engine, 0, party if party is not None else Counter()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=6))
        self.server.add_generic_rpc_handlers((share_server_handler(ShareServicer(self, max_streams=4)),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.killed = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def compute(self, *args, **kwargs) -> bytes:
        self.calls += 1
        self.party["calls"] += 1
        if (
            self.party["calls"] == self.party["kill_at"]
        ):  # dies while this call is in flight: the client sees UNAVAILABLE
            threading.Thread(target=self.kill).start()
            time.sleep(0.2)
        return self.engine.compute(*args, **kwargs)

    def kill(self) -> None:
        self.killed.set()
        self.server.stop(0).wait()


def _generate(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_losing_one_replica_of_each_party_mid_generation_changes_no_token(tiny_llama, stream: bool):
    original, folder, key, engine = tiny_llama
    plaintext = _generate(original, PROMPT)
    parties = Counter(kill_at=12), Counter(kill_at=15)  # party A loses a replica, then party B
    replicas = [_Replica(engine, parties[i // 2]) for i in range(4)]
    endpoints = ((replicas[0].address, replicas[1].address), (replicas[2].address, replicas[3].address))
    config = HSSEEClientConfig(timeout=10.0, retries=4, initial_backoff=0.02, stream=stream)
    try:
        with HSSEEForCausalLM.from_pretrained(folder, key=key, endpoints=endpoints, client_config=config) as model:
            tokens = _generate(model, PROMPT)
            after = _generate(model, PROMPT)  # the pools now hold one replica each
    finally:
        for replica in replicas:
            replica.server.stop(None)
    assert sum(r.killed.is_set() for r in replicas[:2]) == 1 and sum(r.killed.is_set() for r in replicas[2:]) == 1
    if not stream:  # each unary call is placed by round_robin (a stream stays on the replica it opened on)
        assert all(r.calls > 0 for r in replicas), [r.calls for r in replicas]
    assert tokens == plaintext and after == plaintext


def test_an_unhealthy_replica_gets_no_calls(tiny_llama):
    engine = tiny_llama[3]
    replicas = [_Replica(engine) for _ in range(3)]
    replicas[1].health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # e.g. shutting down
    x = share(torch.zeros((1, 64), dtype=torch.int64))
    try:
        pools = ((replicas[0].address, replicas[1].address), (replicas[2].address,))
        # Unary calls: each is placed by round_robin (a stream stays on the replica it was opened on).
        with GrpcTransport(pools, config=HSSEEClientConfig(timeout=5.0, stream=False)) as transport:
            transport.check_fingerprint(engine.fingerprint)
            for _ in range(12):
                transport.run_stage(engine.fingerprint, "layers.0.qkv", x, out_features=128)
            replicas[1].health.set("", health_pb2.HealthCheckResponse.SERVING)
            deadline = time.monotonic() + 5.0
            while replicas[1].calls == 0 and time.monotonic() < deadline:
                transport.run_stage(engine.fingerprint, "layers.0.qkv", x, out_features=128)
    finally:
        for replica in replicas:
            replica.server.stop(None)
    assert replicas[0].calls >= 12 and replicas[1].calls > 0  # back in the rotation once it serves again


class _OtherCheckpoint:
    """An engine that claims another checkpoint."""

    def __init__(self, engine):
        self.engine, self.fingerprint = engine, "f" * 64

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def test_the_fingerprint_is_checked_on_every_replica(tiny_llama, caplog):
    engine = tiny_llama[3]
    replicas = [_Replica(engine), _Replica(engine), _Replica(_OtherCheckpoint(engine)), _Replica(engine)]
    try:
        good = GrpcTransport(((replicas[0].address, replicas[1].address), (replicas[3].address,)))
        with good:
            replicas[1].kill()  # a replica down at connect is skipped with a warning
            infos = good.check_fingerprint(engine.fingerprint)
        assert infos[0]["fingerprint"] == engine.fingerprint and replicas[1].address in caplog.text
        bad = GrpcTransport(((replicas[0].address,), (replicas[3].address, replicas[2].address)))
        with bad, pytest.raises(TransportError, match="serves checkpoint ffff") as info:
            bad.check_fingerprint(engine.fingerprint)
        assert info.value.endpoint == replicas[2].address  # the replica, not the pool
    finally:
        for replica in replicas:
            replica.server.stop(None)
    assert Counter(r.calls for r in replicas) == Counter({0: 4})  # no stage call reached any replica
