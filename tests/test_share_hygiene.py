"""What each share server receives is uniformly random, independent of the input, and never repeats; nothing
secret reaches a log or an error message (DESIGN.md §2, §4).

The payloads are recorded on the servers' side of a real gRPC connection while the client's `StageClient`
sends fixed inputs (all zeros, all ones, a real activation). Uniformity and independence are chi-square tests;
p-values come from a small implementation of the regularized incomplete gamma function (scipy may be absent).
A statistical test of an honest generator still fails with probability 0.001, so a failing test draws fresh
data once and must pass on it: an honest generator then fails one in a million runs, a biased one every run.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hss_ee_hf.artifacts.key import EEKey
from hss_ee_hf.client.stage_client import StageClient
from hss_ee_hf.errors import HSSEEError
from hss_ee_hf.ring.sharing import expand_share, share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server
from hss_ee_hf.server.security import HSSEEServerSecurity
from hss_ee_hf.transport.config import HSSEEClientConfig
from hss_ee_hf.transport.grpc_client import GrpcTransport
from hss_ee_hf.transport.socket_client import DataPlaneTransport

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import convert_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FINGERPRINT = "ab" * 32
STAGE = "layers.0.qkv"
HIDDEN, OUT = 32, 64
ROWS = 8
CALLS = 160  # 160 calls x 8 rows x 32 words: ~20 samples per (byte position, value) cell
ALPHA = 0.001
TOKEN = "hygiene-token-7f3a9c"


# --- chi-square p-values without scipy -------------------------------------------------------------------------


def _upper_gamma_regularized(a: float, x: float) -> float:
    """Q(a, x) = Γ(a, x) / Γ(a): a series below a + 1, a continued fraction above (Numerical Recipes)."""
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square with `dof` degrees of freedom."""
    return _upper_gamma_regularized(dof / 2, stat / 2)


def uniformity_p(table: np.ndarray) -> float:
    """Goodness of fit of observed counts to the uniform distribution over their cells."""
    observed = table.ravel().astype(np.float64)
    expected = observed.sum() / observed.size
    return chi2_sf(float(((observed - expected) ** 2 / expected).sum()), observed.size - 1)


def homogeneity_p(a: np.ndarray, b: np.ndarray) -> float:
    """Whether two tables of counts come from the same distribution (2 x K contingency test)."""
    rows = np.stack([a.ravel(), b.ravel()]).astype(np.float64)
    expected = rows.sum(axis=1, keepdims=True) * rows.sum(axis=0, keepdims=True) / rows.sum()
    return chi2_sf(float(((rows - expected) ** 2 / expected).sum()), rows.shape[1] - 1)


def byte_table(payloads: list[bytes], word_bytes: int = 8) -> np.ndarray:
    """Counts of (byte position within a word, byte value): an 8 x 256 table for int64 payloads."""
    data = np.frombuffer(b"".join(payloads), dtype=np.uint8).reshape(-1, word_bytes)
    table = np.zeros((word_bytes, 256), dtype=np.int64)
    for position in range(word_bytes):
        table[position] = np.bincount(data[:, position], minlength=256)
    return table


def passes_twice(p_value: Callable[[], float]) -> bool:
    """True if a fresh draw passes at `ALPHA`, drawing once more when the first fails (see module docstring)."""
    return p_value() > ALPHA or p_value() > ALPHA


def test_the_p_values_are_right():
    # Table values: chi-square(1) at 3.841 has p = 0.05, chi-square(255) at 293.248 and 310.457 have p = 0.05 and
    # 0.01; chi-square(2) is exp(-x/2).
    assert abs(chi2_sf(3.841459, 1) - 0.05) < 1e-5
    assert abs(chi2_sf(293.2478, 255) - 0.05) < 1e-4
    assert abs(chi2_sf(310.4573, 255) - 0.01) < 1e-4
    assert abs(chi2_sf(7.0, 2) - math.exp(-3.5)) < 1e-12
    assert abs(chi2_sf(2047.0, 2047) - 0.5) < 0.01  # the median is close to the mean for many dof


# --- what the servers receive ----------------------------------------------------------------------------------


class _RecordingEngine:
    """Wraps a `StageEngine` and keeps a copy of every payload (seed or share) it is sent."""

    def __init__(self, engine: StageEngine):
        self.engine, self.received = engine, []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def compute(self, fingerprint, stage, rows, share=None, seed=None, version=None, geometry=None) -> bytes:
        self.received.append(bytes(seed if seed is not None else share))
        return self.engine.compute(
            fingerprint, stage, rows, share=share, seed=seed, version=version, geometry=geometry
        )


@pytest.fixture(scope="module", params=["grpc", "dataplane"])
def recorded(
    tiny_ee_checkpoint: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[_RecordingEngine, _RecordingEngine, StageClient]]:
    """Recording servers reached over gRPC, or over their data planes (where party A's requests are pipelined)."""
    engine = StageEngine(tiny_ee_checkpoint)
    recorders = (_RecordingEngine(engine), _RecordingEngine(engine))
    servers = [start_server(r, "127.0.0.1", 0, max_workers=2) for r in recorders]
    transport = GrpcTransport(tuple(f"127.0.0.1:{port}" for _, port in servers), timeout=10.0)
    if request.param == "dataplane":
        transport = DataPlaneTransport(transport)
    client = StageClient(
        transport, engine.info, scales={STAGE: torch.ones(OUT)}, in_features={STAGE: HIDDEN}, max_rows=ROWS
    )
    yield recorders[0], recorders[1], client
    transport.close()
    for server, _ in servers:
        server.stop(None)


def _inputs(checkpoint: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
    return {
        "zeros": torch.zeros((ROWS, HIDDEN)),
        "ones": torch.ones((ROWS, HIDDEN)),
        "activation": embedding[:ROWS].float(),  # a real input of layers.0.qkv: token embeddings
    }


def _draw(recorded, x: torch.Tensor) -> tuple[list[bytes], list[bytes]]:
    """Runs `CALLS` stage calls on the fixed input `x`; returns what party A and party B were sent."""
    rec_a, rec_b, client = recorded
    rec_a.received.clear()
    rec_b.received.clear()
    for _ in range(CALLS):
        client.run(STAGE, x)
    return list(rec_a.received), list(rec_b.received)


_UNIFORMITY = {
    "party B's share": lambda seeds, shares: uniformity_p(byte_table(shares)),
    "party A's seed": lambda seeds, shares: uniformity_p(byte_table(seeds, word_bytes=1)),
    "the share party A's seed expands to": lambda seeds, shares: uniformity_p(
        byte_table([expand_share(s, (ROWS, HIDDEN)).numpy().tobytes() for s in seeds])
    ),
}


@pytest.mark.parametrize("kind", ["zeros", "ones", "activation"])
def test_each_server_receives_uniform_bytes(recorded, tiny_ee_checkpoint: Path, kind: str):
    x = _inputs(tiny_ee_checkpoint)[kind]
    seeds, shares = _draw(recorded, x)
    assert {len(s) for s in seeds} == {32} and {len(s) for s in shares} == {ROWS * HIDDEN * 8}
    for what, p_value in _UNIFORMITY.items():
        p = p_value(seeds, shares)
        print(f"\n{kind}: uniformity of {what}: p = {p:.3f}")
        if p <= ALPHA:  # one fresh draw (see the module docstring)
            assert p_value(*_draw(recorded, x)) > ALPHA, f"{what} is not uniform for {kind} inputs"


def test_the_test_catches_a_biased_payload(tiny_ee_checkpoint: Path):
    """Negative control: the plain encoded input, or a mask with only 32 random bits, fails at once."""
    x = _inputs(tiny_ee_checkpoint)["activation"]
    plain = [torch.round(x * 2**16).to(torch.int64).numpy().tobytes() for _ in range(CALLS)]
    assert uniformity_p(byte_table(plain)) < 1e-12
    weak = [(share(torch.zeros((ROWS, HIDDEN), dtype=torch.int64)).b & 0xFFFFFFFF).numpy().tobytes()]
    assert uniformity_p(byte_table(weak * CALLS)) < 1e-12


@pytest.mark.parametrize("pair", [("zeros", "ones"), ("zeros", "activation"), ("ones", "activation")])
def test_payloads_do_not_depend_on_the_input(recorded, tiny_ee_checkpoint: Path, pair: tuple[str, str]):
    inputs = _inputs(tiny_ee_checkpoint)

    def p_value() -> float:
        a, b = (byte_table(_draw(recorded, inputs[kind])[1]) for kind in pair)
        p = homogeneity_p(a, b)
        print(f"\n{pair[0]} vs {pair[1]}: homogeneity of party B's bytes: p = {p:.3f}")
        return p

    assert passes_twice(p_value), f"party B's payloads tell {pair[0]} from {pair[1]} inputs"


def test_masks_never_repeat(recorded, tiny_ee_checkpoint: Path):
    seeds, shares = [], []
    for x in _inputs(tiny_ee_checkpoint).values():
        a, b = _draw(recorded, x)
        seeds += a
        shares += b
    assert len(set(seeds)) == len(seeds)  # no seed is ever sent twice
    assert len(set(shares)) == len(shares)
    # With zeros the share is -mask: one repeated 64-bit word would mean a repeated mask (p ~ 1e-10 by chance).
    words = np.frombuffer(b"".join(shares), dtype=np.uint64)
    assert len(np.unique(words)) == len(words)


# --- nothing secret in logs or messages ------------------------------------------------------------------------


def _secret_fragments(payloads: list[bytes], key: EEKey, extra: list[str]) -> list[str]:
    """Strings that would betray a payload, seed, key or token if found in a log or message."""
    fragments = list(extra)
    for payload in payloads:
        fragments.append(payload[:8].hex())
        fragments.append(repr(payload[:6])[2:-1])
        word = int(np.frombuffer(payload[:8], dtype=np.int64)[0])
        if abs(word) > 10**6:
            fragments.append(str(word))
    perm = key.vocab_perm.tolist()
    fragments.append(", ".join(str(v) for v in perm[:6]))
    fragments.append(key.vocab_perm.numpy().tobytes()[:8].hex())
    return fragments


class _FailingEngine:
    """Its compute fails with a message that holds the payload, as a careless library might."""

    def __init__(self, engine: StageEngine):
        self.engine = engine

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def compute(self, fingerprint, stage, rows, share=None, seed=None, version=None, geometry=None) -> bytes:
        raise RuntimeError(f"bad payload {(share or seed)!r} {(share or seed or b'').hex()}")


@pytest.mark.parametrize("plane", ["grpc", "dataplane"])
def test_no_payload_seed_key_or_token_in_logs_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture, plane: str):
    from hss_ee_hf.client.modeling import HSSEEForCausalLM
    from hss_ee_hf.client.verifier import CheatingServerError, FreivaldsVerifier, VerifyingTransport

    def connect(endpoints, config):
        transport = GrpcTransport(endpoints, config=config)
        return transport if plane == "grpc" else DataPlaneTransport(transport)

    caplog.set_level(logging.DEBUG)
    _, folder, key_path = convert_tiny("llama", tmp_path)
    key = EEKey.load(key_path)
    engine = StageEngine(folder)
    recorders = [_RecordingEngine(engine), _RecordingEngine(_FailingEngine(engine))]
    security = HSSEEServerSecurity(tokens=[TOKEN])
    # the good pair is two servers of one recorder: the client refuses one server as both parties
    servers = [start_server(r, "127.0.0.1", 0, max_workers=2, security=security) for r in (*recorders, recorders[0])]
    endpoints = tuple(f"127.0.0.1:{port}" for _, port in servers[:2])
    twin = f"127.0.0.1:{servers[2][1]}"
    messages: list[str] = []
    try:
        good = (endpoints[0], twin)
        config = HSSEEClientConfig(token=TOKEN, timeout=5.0, retries=1, initial_backoff=0.01)
        model = HSSEEForCausalLM.from_pretrained(folder, key=key_path, transport=connect(good, config))
        ids = torch.tensor([[1, 5, 9, 17]])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        messages.append(repr(model.hss_ee_key) + repr(config))
        shares = share(torch.arange(64, dtype=torch.int64).view(1, 64))
        attempts = [
            (good, config, FINGERPRINT, "layers.0.qkv"),  # wrong fingerprint
            (good, config, engine.fingerprint, "layers.9.qkv"),  # unknown stage
            (endpoints, config, engine.fingerprint, "layers.0.qkv"),  # internal failure on server B
            (good, HSSEEClientConfig(token="wrong-" + TOKEN, timeout=5.0), engine.fingerprint, "layers.0.qkv"),
        ]
        for pair, cfg, fingerprint, stage in attempts:
            with connect(pair, cfg) as transport, pytest.raises(HSSEEError) as info:
                transport.run_stage(fingerprint, stage, shares, out_features=128)
            messages.append(str(info.value))
        cheater = VerifyingTransport(connect(good, config), FreivaldsVerifier.from_checkpoint(folder))
        y_a, y_b = cheater.inner.run_stage(engine.fingerprint, "layers.0.qkv", shares, out_features=128)
        with pytest.raises(CheatingServerError) as info:
            cheater.verifier.check_stage("layers.0.qkv", shares, y_a + 1, y_b, good)
        messages.append(str(info.value))
        cheater.close()
        model.close()
    finally:
        for server, _ in servers:
            server.stop(None)

    payloads = recorders[0].received + recorders[1].received + [shares.seed, shares.b.numpy().tobytes()]
    assert len(payloads) > 40
    text = caplog.text + "\n".join(messages)
    assert "RuntimeError" in caplog.text  # the internal failure was logged, by type only
    leaked = [f for f in _secret_fragments(payloads, key, [TOKEN]) if f and f in text]
    assert not leaked, f"secret material in logs or messages: {leaked[:3]}"
