"""Faults between the client and its share servers: restarts, outages, deadlines, flaky replies (DESIGN.md §7).

Stage calls are stateless and idempotent, so the client retries a server that answers `UNAVAILABLE`. A
generation that loses a server for a moment must finish with exactly the tokens of an undisturbed run; a
server that stays down, or does not answer in time, must be named in the error.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import torch

from hss_ee_hf.client.modeling import HSSEEForCausalLM
from hss_ee_hf.errors import StageRequestError, TransportError
from hss_ee_hf.ring.sharing import share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.grpc_client import GrpcTransport
from hss_ee_hf.transport.inprocess import InProcessTransport

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import VOCAB, convert_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = [1, 5, 9, 17, 33, 40]
NEW_TOKENS = 8
# Enough retry time (about 3 s in all) to ride out a restart of a few hundred milliseconds.
RESTART_CONFIG = HSSEEClientConfig(timeout=10.0, retries=6, initial_backoff=0.05, max_backoff=1.0)
FLAKY_RATE = 0.05
FLAKY_GENERATIONS = 1000


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, StageEngine]:
    _, folder, key = convert_tiny("llama", tmp_path_factory.mktemp("faults-llama"))
    return folder, key, StageEngine(folder)


def _generate(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def _model(tiny_llama, transport):
    folder, key, _ = tiny_llama
    return HSSEEForCausalLM.from_pretrained(folder, key=key, transport=transport)


@pytest.fixture(scope="module")
def reference(tiny_llama) -> list[int]:
    """The tokens of an undisturbed in-process run."""
    return _generate(_model(tiny_llama, InProcessTransport(tiny_llama[2])), PROMPT)


class _Servers:
    """Two share servers on loopback that a test can kill and restart on the same ports."""

    def __init__(self, engines: tuple, interceptors: tuple = ()):
        self.engines = engines
        self.interceptors = interceptors
        started = [start_server(e, "127.0.0.1", 0, max_workers=4, interceptors=interceptors) for e in engines]
        self.servers = [server for server, _ in started]
        self.ports = [port for _, port in started]
        self.restarted = threading.Event()

    @property
    def endpoints(self) -> tuple[str, str]:
        return tuple(f"127.0.0.1:{port}" for port in self.ports)

    def kill(self, party: int) -> None:
        self.servers[party].stop(0).wait()

    def restart(self, party: int) -> None:
        self.servers[party], _ = start_server(
            self.engines[party], "127.0.0.1", self.ports[party], max_workers=4, interceptors=self.interceptors
        )
        self.restarted.set()

    def kill_then_restart_later(self, party: int, delay: float) -> None:
        self.kill(party)
        threading.Timer(delay, self.restart, args=(party,)).start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop(None)


class _KillingTransport(GrpcTransport):
    """Kills server B just before the `kill_at`-th call that reaches it (a stage sent to both servers, or to B alone
    when party A's product was prepared ahead of time); it comes back `down_for` seconds later."""

    def __init__(self, servers: _Servers, kill_at: int, down_for: float):
        super().__init__(servers.endpoints, config=RESTART_CONFIG)
        self.servers, self.kill_at, self.down_for, self.calls = servers, kill_at, down_for, 0

    def _count(self) -> None:
        self.calls += 1
        if self.calls == self.kill_at:
            self.servers.kill_then_restart_later(1, self.down_for)

    def run_stage(self, fingerprint, stage, shares, out_features):
        self._count()
        return super().run_stage(fingerprint, stage, shares, out_features)

    def run_party(self, party, fingerprint, stage, shares, out_features):
        if party == 1:
            self._count()
        return super().run_party(party, fingerprint, stage, shares, out_features)


def test_server_killed_between_calls_and_restarted_mid_generation(tiny_llama, reference: list[int]):
    servers = _Servers((tiny_llama[2], tiny_llama[2]))
    try:
        transport = _KillingTransport(servers, kill_at=30, down_for=0.3)
        with _model(tiny_llama, transport) as model:
            tokens = _generate(model, PROMPT)
        # The retries may be gRPC's own (service_config.py) rather than the transport's: `retried` can stay 0.
        assert servers.restarted.is_set()
        assert tokens == reference
    finally:
        servers.stop()


class _KillInFlightEngine:
    """Wraps a `StageEngine`; during its `kill_at`-th call it kills its own server, so that call is in flight."""

    def __init__(self, engine: StageEngine, kill_at: int):
        self.engine, self.kill_at, self.calls = engine, kill_at, 0
        self.servers: _Servers | None = None

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def compute(self, *args, **kwargs) -> bytes:
        self.calls += 1
        if self.calls == self.kill_at:
            threading.Thread(target=self.servers.kill_then_restart_later, args=(1, 0.3)).start()
            time.sleep(0.2)  # still computing when the server goes down: the client sees UNAVAILABLE
        return self.engine.compute(*args, **kwargs)


def test_server_killed_during_a_call_and_restarted_mid_generation(tiny_llama, reference: list[int]):
    killer = _KillInFlightEngine(tiny_llama[2], kill_at=25)
    servers = _Servers((tiny_llama[2], killer))
    killer.servers = servers
    try:
        transport = GrpcTransport(servers.endpoints, config=RESTART_CONFIG)
        with _model(tiny_llama, transport) as model:
            tokens = _generate(model, PROMPT)
        # The retries may be gRPC's own (service_config.py) rather than the transport's: `retried` can stay 0.
        assert servers.restarted.is_set()
        assert tokens == reference
    finally:
        servers.stop()


def test_a_server_that_stays_down_is_named(tiny_llama):
    servers = _Servers((tiny_llama[2], tiny_llama[2]))
    try:
        # restart_window=0: exactly `retries` retries (the default also waits out a restart within the deadline)
        config = HSSEEClientConfig(timeout=5.0, retries=3, initial_backoff=0.05, restart_window=0.0)
        with GrpcTransport(servers.endpoints, config=config) as transport:
            x = share(torch.zeros((1, 64), dtype=torch.int64))
            transport.run_stage(tiny_llama[2].fingerprint, "layers.0.qkv", x, out_features=128)
            servers.kill(1)
            start = time.monotonic()
            with pytest.raises(TransportError) as info:
                transport.run_stage(tiny_llama[2].fingerprint, "layers.0.qkv", x, out_features=128)
            elapsed = time.monotonic() - start
    finally:
        servers.stop()
    assert info.value.endpoint == servers.endpoints[1]
    assert "UNAVAILABLE (after 4 attempts)" in str(info.value) and "hss-ee serve" in str(info.value)
    assert elapsed < 3.0  # 0.05 + 0.1 + 0.2 s of backoff (+-20 %), not the 5 s deadline


class _SlowEngine:
    def __init__(self, engine: StageEngine, delay: float):
        self.engine, self.delay = engine, delay

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def compute(self, *args, **kwargs) -> bytes:
        time.sleep(self.delay)
        return self.engine.compute(*args, **kwargs)


def test_every_call_has_a_deadline(tiny_llama):
    servers = _Servers((tiny_llama[2], _SlowEngine(tiny_llama[2], delay=1.5)))
    try:
        with GrpcTransport(servers.endpoints, config=HSSEEClientConfig(timeout=0.3, retries=3)) as transport:
            x = share(torch.zeros((1, 64), dtype=torch.int64))
            start = time.monotonic()
            with pytest.raises(TransportError) as info:
                transport.run_stage(tiny_llama[2].fingerprint, "layers.0.qkv", x, out_features=128)
            elapsed = time.monotonic() - start
    finally:
        servers.stop()
    assert info.value.endpoint == servers.endpoints[1] and "DEADLINE_EXCEEDED" in str(info.value)
    assert elapsed < 1.2  # a deadline is not retried: the server may still be working on the call


class _Flaky:
    """Decides, for a random `rate` of stage calls, to answer `UNAVAILABLE` before computing."""

    def __init__(self, rate: float, seed: int):
        self.rate, self.rng, self.lock = rate, random.Random(seed), threading.Lock()
        self.calls = self.injected = 0

    def fail(self) -> bool:
        with self.lock:
            self.calls += 1
            fail = self.rng.random() < self.rate
            self.injected += fail
        return fail


class _FlakyInterceptor(grpc.ServerInterceptor):
    """Unary calls: refuses the chosen `Stage` calls before they reach the servicer."""

    def __init__(self, flaky: _Flaky):
        self.flaky = flaky
        self.handler = grpc.unary_unary_rpc_method_handler(
            lambda request, context: context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault")
        )

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.endswith("/Stage") and self.flaky.fail():
            return self.handler
        return continuation(handler_call_details)


class _FlakyEngine:
    """Streamed calls: refuses the chosen requests inside an open stream, which ends it with `UNAVAILABLE`."""

    def __init__(self, engine: StageEngine, flaky: _Flaky):
        self._engine, self.flaky = engine, flaky

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def compute(self, *args, **kwargs) -> bytes:
        if self.flaky.fail():
            raise StageRequestError("injected fault", code="UNAVAILABLE")
        return self._engine.compute(*args, **kwargs)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_five_percent_unavailable_replies(tiny_llama, stream: bool):
    """Many short generations against servers that drop 5 % of stage calls: all complete, none is wrong."""
    rng = random.Random(5)
    prompts = [[1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 6))] for _ in range(40)]
    with _model(tiny_llama, InProcessTransport(tiny_llama[2])) as model:
        expected = {tuple(p): _generate(model, p, new_tokens=2) for p in prompts}

    flaky = _Flaky(FLAKY_RATE, seed=5)
    if stream:
        engine = _FlakyEngine(tiny_llama[2], flaky)
        servers = _Servers((engine, engine))
    else:
        servers = _Servers((tiny_llama[2], tiny_llama[2]), interceptors=(_FlakyInterceptor(flaky),))
    outcomes: Counter[str] = Counter()
    config = HSSEEClientConfig(timeout=5.0, retries=4, initial_backoff=0.001, max_backoff=0.01, stream=stream)
    try:
        transport = GrpcTransport(servers.endpoints, config=config)
        with _model(tiny_llama, transport) as model:
            for i in range(FLAKY_GENERATIONS):
                prompt = prompts[i % len(prompts)]
                try:
                    tokens = _generate(model, prompt, new_tokens=2)
                except TransportError:
                    outcomes["failed"] += 1
                    continue
                outcomes["completed" if tokens == expected[tuple(prompt)] else "wrong"] += 1
    finally:
        servers.stop()
    print(
        f"\nflaky servers: {flaky.calls} stage calls, {flaky.injected} UNAVAILABLE injected "
        f"({flaky.injected / flaky.calls:.1%}), {transport.retried} retries; generations {dict(outcomes)}"
    )
    assert 0.03 < flaky.injected / flaky.calls < 0.07
    assert (transport.streamed > 0) == stream  # the faults hit the kind of call under test
    assert outcomes["wrong"] == 0
    assert outcomes["completed"] >= 0.999 * FLAKY_GENERATIONS
