"""Cheating-server detection with the Freivalds check (DESIGN.md §2).

Every tampered output share (one flipped bit in any position of any word, any nonzero additive error, a
replayed or random reply) must be caught and the server named; honest shares must never raise an alarm.
The exact ring products of the check are proved against Python integers.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from hss_ee_hf.client.verifier import CheatingServerError, FreivaldsVerifier, VerifyingTransport
from hss_ee_hf.errors import StageError, TransportError
from hss_ee_hf.ring.csprng import ChaChaStream
from hss_ee_hf.ring.limbs import LIMB16_BITS, binary_matmul_nt, ring_matmul_nt, to_limbs
from hss_ee_hf.ring.sharing import Shares, share
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server
from hss_ee_hf.transport.grpc_client import GrpcTransport
from hss_ee_hf.transport.inprocess import InProcessTransport

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import convert_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FINGERPRINT = "ab" * 32
ENDPOINTS = ("server-A:1", "server-B:2")
N_STAGES = 1000  # honest stage calls, and tampered stage calls
MOD = 1 << 64


def _signed(v: int) -> int:
    v %= MOD
    return v - MOD if v >= 1 << 63 else v


def _ring(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Test data over the whole ring, extremes included (not masks: those come from sharing)."""
    x = torch.randint(-(2**63), 2**63 - 1, (rows, cols), dtype=torch.int64, generator=gen)
    x.view(-1)[: min(3, x.numel())] = torch.tensor([-(2**63), 2**63 - 1, -1])[: min(3, x.numel())]
    return x


@pytest.fixture(scope="module")
def engine(tiny_ee_checkpoint: Path) -> StageEngine:
    return StageEngine(tiny_ee_checkpoint)


@pytest.fixture(scope="module")
def verifier(tiny_ee_checkpoint: Path) -> FreivaldsVerifier:
    return FreivaldsVerifier.from_checkpoint(tiny_ee_checkpoint)


def _honest(engine: StageEngine, stage: str, shares: Shares) -> tuple[torch.Tensor, torch.Tensor]:
    """Both parties' output shares, computed as the servers do (A from its seed, B from its share)."""
    rows, out_f = shares.b.shape[0], engine.describe()[stage][1]
    raw_a = engine.compute(FINGERPRINT, stage, rows, seed=shares.seed)
    raw_b = engine.compute(FINGERPRINT, stage, rows, share=shares.b.numpy().tobytes())
    return tuple(torch.frombuffer(bytearray(r), dtype=torch.int64).view(rows, out_f) for r in (raw_a, raw_b))


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (5, 3, 7), (40, 2, 96), (3, 4, 700)])
def test_ring_products_are_exact(m: int, n: int, k: int):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    a, b = _ring(m, k, gen), _ring(n, k, gen)
    got = ring_matmul_nt(to_limbs(a, LIMB16_BITS), b)
    rows_a, rows_b = a.tolist(), b.tolist()
    expected = [[_signed(sum(p * q for p, q in zip(ra, rb, strict=True))) for rb in rows_b] for ra in rows_a]
    assert got.tolist() == expected
    bits = torch.randint(0, 2, (m, k), generator=gen).to(torch.float64)
    expected_bits = [[_signed(sum(int(p) * q for p, q in zip(ra, rb, strict=True))) for rb in rows_b] for ra in bits]
    assert binary_matmul_nt(bits, b).tolist() == expected_bits


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9])  # the int64 path (few rows) and the limb path (many)
def test_both_sides_of_the_check_are_exact(rows: int):
    gen = torch.Generator().manual_seed(rows)
    w_int = torch.randint(-(2**15) + 1, 2**15, (24, 40), dtype=torch.int64, generator=gen)
    verifier = FreivaldsVerifier([("s", w_int)], rows=8, rng=ChaChaStream(bytes(32)))
    x, y = _ring(rows, 40, gen), _ring(rows, 24, gen)
    lhs, rhs = verifier._sides("s", x, y)
    r, u = verifier._r["s"].tolist(), verifier._u["s"].tolist()
    assert u == (verifier._r["s"].to(torch.int64) @ w_int).tolist()  # U = R · W_int exactly (no wrap: < 2^47)
    assert lhs.tolist() == [
        [_signed(sum(p * q for p, q in zip(rk, yi, strict=True))) for yi in y.tolist()] for rk in r
    ]
    assert rhs.tolist() == [
        [_signed(sum(p * q for p, q in zip(uk, xi, strict=True))) for xi in x.tolist()] for uk in u
    ]


def test_honest_stages_never_raise_an_alarm(engine: StageEngine, verifier: FreivaldsVerifier):
    gen = torch.Generator().manual_seed(1)
    stages = list(engine.describe())
    alarms = 0
    for i in range(N_STAGES):
        stage = stages[i % len(stages)]
        in_f = engine.describe()[stage][0]
        shares = share(_ring(1 + i % 4, in_f, gen))
        y_a, y_b = _honest(engine, stage, shares)
        try:
            verifier.check_stage(stage, shares, y_a, y_b, ENDPOINTS)
        except CheatingServerError:
            alarms += 1
    print(f"\nhonest stages: {N_STAGES}, false alarms: {alarms}")
    assert alarms == 0


def _tamper(y: torch.Tensor, i: int, rng: random.Random, honest_other: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A wrong copy of `y`; the kinds cycle so every bit position and error shape is covered."""
    bad = y.clone()
    flat = bad.view(-1)
    word = rng.randrange(flat.numel())
    kind = ("bit", "add", "add_top", "replay", "random", "many")[i % 6]
    if kind == "bit":  # every one of the 64 bit positions, the sign bit included
        bit = (i // 6) % 64
        flat[word] ^= torch.tensor(_signed(1 << bit), dtype=torch.int64)
    elif kind == "add":  # any nonzero additive error, small or large
        delta = rng.choice([1, -1, 2, 1 << 32, (1 << 62) + 1, rng.randrange(1, MOD)])
        flat[word] = torch.tensor(_signed(int(flat[word]) + delta), dtype=torch.int64)
    elif kind == "add_top":  # errors that are multiples of 2^63, 2^62, ...: top bits only
        flat[word] = torch.tensor(_signed(int(flat[word]) + (1 << rng.randrange(56, 64))), dtype=torch.int64)
    elif kind == "replay":  # an honest answer to another input of the same shape
        bad = honest_other.clone()
    elif kind == "random":
        bad = torch.randint(-(2**63), 2**63 - 1, y.shape, dtype=torch.int64)
    else:  # several words off by errors that cancel in the plain sum of the row
        j = (word + 1) % flat.numel()
        delta = rng.randrange(1, MOD)
        flat[word] = torch.tensor(_signed(int(flat[word]) + delta), dtype=torch.int64)
        flat[j] = torch.tensor(_signed(int(flat[j]) - delta), dtype=torch.int64) if j != word else flat[j]
    if torch.equal(bad, y):  # a replay that happens to match; never in practice
        flat = bad.view(-1)
        flat[0] ^= 1
    return bad, kind


def test_every_tampered_stage_is_detected_and_named(engine: StageEngine, verifier: FreivaldsVerifier):
    gen = torch.Generator().manual_seed(2)
    rng = random.Random(2)
    stages = list(engine.describe())
    detected: Counter[str] = Counter()
    tried: Counter[str] = Counter()
    for i in range(N_STAGES + 200):
        stage = stages[i % len(stages)]
        in_f = engine.describe()[stage][0]
        rows = 1 + i % 3
        shares = share(_ring(rows, in_f, gen))
        y_a, y_b = _honest(engine, stage, shares)
        other_a, other_b = _honest(engine, stage, share(_ring(rows, in_f, gen)))
        party = i % 2
        if party == 0:
            y_a, kind = _tamper(y_a, i, rng, other_a)
        else:
            y_b, kind = _tamper(y_b, i, rng, other_b)
        tried[kind] += 1
        with pytest.raises(CheatingServerError) as info:
            verifier.check_stage(stage, shares, y_a, y_b, ENDPOINTS)
        assert info.value.endpoint == ENDPOINTS[party]
        assert isinstance(info.value, TransportError) and "Freivalds" in str(info.value)
        detected[kind] += 1
    print(f"\ntampered stages: {sum(tried.values())} {dict(tried)}, detected: {sum(detected.values())}")
    assert detected == tried and sum(detected.values()) >= N_STAGES


def test_a_single_check_row_misses_about_half(engine: StageEngine):
    """With t = 1 a single-word error passes about half the time: the bound 2^-t is real, not vacuous."""
    stage = "layers.0.o"
    w_int = _stage_weight(engine, stage)
    gen = torch.Generator().manual_seed(3)
    in_f = engine.describe()[stage][0]
    caught = 0
    trials = 200
    for trial in range(trials):
        weak = FreivaldsVerifier([(stage, w_int)], rows=1, rng=ChaChaStream(trial.to_bytes(32, "little")))
        shares = share(_ring(1, in_f, gen))
        y_a, _ = _honest(engine, stage, shares)
        y_a = y_a.clone()
        y_a[0, 0] += 1
        try:
            weak.check(stage, shares.a, y_a, ENDPOINTS[0])
        except CheatingServerError:
            caught += 1
    assert 0.3 * trials < caught < 0.7 * trials


def _stage_weight(engine: StageEngine, stage: str) -> torch.Tensor:
    """`W_int` recovered from the engine by multiplying unit vectors (exact: no wrap-around for small inputs)."""
    in_f, out_f = engine.describe()[stage]
    eye = torch.eye(in_f, dtype=torch.int64)
    raw = engine.compute(FINGERPRINT, stage, in_f, share=eye.numpy().tobytes())
    return torch.frombuffer(bytearray(raw), dtype=torch.int64).view(in_f, out_f).T.contiguous()


def test_misuse_is_reported_as_a_client_error(verifier: FreivaldsVerifier, engine: StageEngine):
    in_f, out_f = engine.describe()["layers.0.qkv"]
    x = torch.zeros((2, in_f), dtype=torch.int64)
    with pytest.raises(StageError, match="no check rows for stage"):
        verifier.check("layers.99.qkv", x, torch.zeros((2, out_f), dtype=torch.int64), "A")
    with pytest.raises(StageError, match="takes"):
        verifier.check("layers.0.qkv", x[:, 1:], torch.zeros((2, out_f), dtype=torch.int64), "A")
    with pytest.raises(CheatingServerError, match="shape"):
        verifier.check("layers.0.qkv", x, torch.zeros((2, out_f + 1), dtype=torch.int64), "A")
    assert "rows=40" in repr(verifier) and "tensor" not in repr(verifier)


class _CheatingEngine:
    """Wraps a `StageEngine`; after `after` honest calls adds `delta` to one word of every reply."""

    def __init__(self, engine: StageEngine, after: int = 0, delta: int = 1):
        self.engine, self.after, self.delta, self.calls = engine, after, delta, 0

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def compute(self, *args, **kwargs) -> bytes:
        out = bytearray(self.engine.compute(*args, **kwargs))
        self.calls += 1
        if self.calls > self.after:
            word = torch.frombuffer(out, dtype=torch.int64)
            word[len(word) // 2] += self.delta
        return bytes(out)


@pytest.fixture
def grpc_pair(engine: StageEngine) -> Iterator[Callable[[object], tuple[str, str]]]:
    servers = []

    def start(engine_b: object) -> tuple[str, str]:
        pair = [start_server(e, "127.0.0.1", 0, max_workers=2) for e in (engine, engine_b)]
        servers.extend(server for server, _ in pair)
        return tuple(f"127.0.0.1:{port}" for _, port in pair)

    yield start
    for server in servers:
        server.stop(grace=None)


def test_a_cheating_grpc_server_is_named(engine: StageEngine, verifier: FreivaldsVerifier, grpc_pair):
    endpoints = grpc_pair(_CheatingEngine(engine, delta=1))
    x = torch.arange(2 * 32, dtype=torch.int64).view(2, 32)
    with GrpcTransport(endpoints, timeout=5.0) as plain:
        y_a, y_b = plain.run_stage(FINGERPRINT, "layers.0.qkv", share(x), out_features=64)
        honest = _stage_weight(engine, "layers.0.qkv")
        assert (y_a + y_b - x @ honest.T).abs().sum().item() == 1  # silently wrong without the check
        with pytest.raises(CheatingServerError) as info:
            VerifyingTransport(plain, verifier).run_stage(FINGERPRINT, "layers.0.qkv", share(x), out_features=64)
    assert info.value.endpoint == endpoints[1]
    assert endpoints[1] in str(info.value) and "Stop using this server" in str(info.value)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    _, folder, key = convert_tiny("llama", tmp_path_factory.mktemp("integrity-llama"))
    return folder, key


def _generate(folder: Path, key: Path, transport, new_tokens: int = 6) -> torch.Tensor:
    from hss_ee_hf.client.modeling import HSSEEForCausalLM

    model = HSSEEForCausalLM.from_pretrained(folder, key=key, transport=transport)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)


def test_verified_generation_matches_and_a_cheater_is_stopped(tiny_llama):
    folder, key = tiny_llama
    stage_engine = StageEngine(folder)
    verifier = FreivaldsVerifier.from_checkpoint(folder)
    reference = _generate(folder, key, InProcessTransport(stage_engine))
    verified = _generate(folder, key, VerifyingTransport(InProcessTransport(stage_engine), verifier))
    assert torch.equal(verified, reference) and verifier.checks > 0
    per_stage_ms = 1e3 * verifier.seconds / verifier.checks * 2  # two checks per stage call
    print(f"\nverify overhead (tiny llama): {per_stage_ms:.3f} ms per stage call ({verifier.checks} checks)")
    cheater = _CheatingEngine(stage_engine, after=20, delta=-(2**40))
    transport = VerifyingTransport(InProcessTransport(stage_engine, cheater), verifier)
    with pytest.raises(CheatingServerError) as info:
        _generate(folder, key, transport)
    assert info.value.endpoint == "in-process:B"


def test_verify_overhead_per_stage_is_small(engine: StageEngine, verifier: FreivaldsVerifier):
    """Client time of the check per stage call (both shares), for one decode row; generous bound on 2 cores."""
    gen = torch.Generator().manual_seed(4)
    timings = {}
    for stage, (in_f, _) in list(engine.describe().items())[:5]:
        shares = share(_ring(1, in_f, gen))
        y_a, y_b = _honest(engine, stage, shares)
        verifier.check_stage(stage, shares, y_a, y_b, ENDPOINTS)
        start = time.perf_counter()
        for _ in range(50):
            verifier.check_stage(stage, shares, y_a, y_b, ENDPOINTS)
        timings[stage] = (time.perf_counter() - start) / 50
    print("\nverify time per stage call (ms): " + ", ".join(f"{s} {1e3 * t:.3f}" for s, t in timings.items()))
    assert max(timings.values()) < 0.05
