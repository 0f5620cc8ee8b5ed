"""Party A's products prepared ahead of time (offline/online split in `StageClient`) are exact and safe.

Party A's share depends only on a fresh seed, so the client asks A for `x_A @ W.T` before `x` exists and, when the
stage is called with that shape, waits for party B alone. Outputs must be bit-for-bit those of the ordinary path,
every seed must be used once, and any transport or server problem must fall back to asking both servers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hss_ee_hf.client.stage_client import PRECOMPUTE_MAX_ROWS, StageClient
from hss_ee_hf.errors import TransportError
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.transport.inprocess import InProcessTransport

STAGE = "layers.0.qkv"

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class _Recording(InProcessTransport):
    """Records which seeds party A was sent, and how many calls went to both servers or to B alone."""

    def __init__(self, engine: StageEngine):
        super().__init__(engine)
        self.seeds: list[bytes] = []
        self.both = self.b_alone = 0

    def run_party(self, party, fingerprint, stage, shares, out_features):
        if party == 0:
            self.seeds.append(shares.seed)
        else:
            self.b_alone += 1
        return super().run_party(party, fingerprint, stage, shares, out_features)

    def run_stage(self, fingerprint, stage, shares, out_features):
        self.seeds.append(shares.seed)
        self.both += 1
        return super().run_stage(fingerprint, stage, shares, out_features)


class _NoPartyCalls(InProcessTransport):
    def run_party(self, *args, **kwargs):
        raise NotImplementedError("this transport cannot call one server alone")


class _PartyADown(InProcessTransport):
    def run_party(self, party, *args, **kwargs):
        if party == 0:
            raise TransportError(self.endpoints[0], "UNAVAILABLE: connection refused")
        return super().run_party(party, *args, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_ee_checkpoint: Path) -> StageEngine:
    return StageEngine(tiny_ee_checkpoint)


def _client(engine: StageEngine, transport, precompute: bool = True) -> StageClient:
    weight = engine.weights[STAGE]
    scales = {STAGE: torch.linspace(1e-3, 2e-3, weight.out_features)}
    return StageClient(transport, engine.info, scales, {STAGE: weight.in_features}, precompute=precompute)


def _inputs(engine: StageEngine, rows: int, calls: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(rows)
    return [torch.randn(rows, engine.weights[STAGE].in_features, generator=gen) for _ in range(calls)]


@pytest.mark.parametrize("rows", [1, 3, PRECOMPUTE_MAX_ROWS])
def test_prepared_products_give_the_ordinary_outputs_bit_for_bit(engine: StageEngine, rows: int) -> None:
    transport = _Recording(engine)
    online, prepared = _client(engine, InProcessTransport(engine), precompute=False), _client(engine, transport)
    for x in _inputs(engine, rows, 6):
        assert torch.equal(prepared.run(STAGE, x), online.run(STAGE, x))
    assert prepared.stats.precomputed == transport.b_alone == 5 and transport.both == 1
    assert prepared.stats.round_trips == 6
    prepared.wait_prepared()
    assert len(transport.seeds) == len(set(transport.seeds)) == 7  # one seed per call, plus the next one ready
    prepared.close()


def test_prompt_sized_calls_are_not_prepared(engine: StageEngine) -> None:
    transport = _Recording(engine)
    client = _client(engine, transport)
    for x in _inputs(engine, PRECOMPUTE_MAX_ROWS + 1, 3):
        client.run(STAGE, x)
    assert client.stats.precomputed == 0 and transport.both == 3 and len(transport.seeds) == 3
    client.close()


def test_a_transport_without_party_calls_asks_both_servers(engine: StageEngine) -> None:
    client, online = _client(engine, _NoPartyCalls(engine)), _client(engine, InProcessTransport(engine), False)
    for x in _inputs(engine, 1, 4):
        assert torch.equal(client.run(STAGE, x), online.run(STAGE, x))
    assert client.stats.precomputed == 0


def test_a_failed_background_call_falls_back_to_both_servers(engine: StageEngine) -> None:
    client, online = _client(engine, _PartyADown(engine)), _client(engine, InProcessTransport(engine), False)
    for x in _inputs(engine, 2, 4):
        assert torch.equal(client.run(STAGE, x), online.run(STAGE, x))
    assert client.stats.precomputed == 0 and client.stats.round_trips == 4
    client.close()


def test_closed_client_prepares_nothing_more(engine: StageEngine) -> None:
    transport = _Recording(engine)
    client = _client(engine, transport)
    client.close()
    for x in _inputs(engine, 1, 3):
        client.run(STAGE, x)
    assert client.stats.precomputed == 0 and transport.both == 3 and len(transport.seeds) == 3
