"""Private T5 `generate()` equals plaintext `generate()`, over both tiny T5 variants and both transports.

The converter writes the EE checkpoint (and verifies it), two share servers serve it (in-process engines, or real
gRPC servers on loopback), and [`HSSEEForConditionalGeneration`] generates: greedy tokens must equal the original
model's for a left-padded batch, round trips must follow the stage layout (the encoder and the cross-attention keys
and values once per prompt, the rest once per step), and the text2text pipeline must return what transformers 4's
`text2text-generation` pipeline returned for the plaintext model (removed in transformers 5; its contract is
`tokenizer.decode(generate(...), skip_special_tokens=True)` under `generated_text`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_families import T5_VARIANTS, connected, convert_tiny_family
from tiny_models import tiny_tokenizer
from transformers import T5ForConditionalGeneration, pipeline

from hss_ee_hf import HSSEEForCausalLM, HSSEEForConditionalGeneration, HSSEEText2TextGenerationPipeline
from hss_ee_hf.artifacts.layouts import stage_layout
from hss_ee_hf.errors import CheckpointError
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.transport.inprocess import InProcessTransport

NEW_TOKENS = 16
PROMPTS = ["w5 w6 w7 w8 w9 w10 w11 w12 w13", "w20 w21 w22"]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@dataclass
class Case:
    variant: str
    transport: str
    plain: T5ForConditionalGeneration
    model: HSSEEForConditionalGeneration
    folder: Path
    key: Path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny-t5")
    return {variant: convert_tiny_family(variant, root) for variant in T5_VARIANTS}


@pytest.fixture(
    scope="module",
    params=[(v, t) for v in T5_VARIANTS for t in ("in-process", "grpc")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def case(request: pytest.FixtureRequest, converted: dict) -> Iterator[Case]:
    variant, kind = request.param
    plain, folder, key = converted[variant]
    with connected(HSSEEForConditionalGeneration, folder, key, kind) as model:
        yield Case(variant, kind, plain, model, folder, key)


def _batch():
    return tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)


def test_client_is_the_hf_class(case: Case) -> None:
    assert isinstance(case.model, T5ForConditionalGeneration)
    assert isinstance(case.model, HSSEEForConditionalGeneration)


@torch.no_grad()
def test_greedy_generation_matches_plaintext(case: Case) -> None:
    inputs = _batch()
    expected = case.plain.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = case.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert expected.shape[1] > 4, "the tiny model stopped at once; the comparison would be weak"
    assert torch.equal(got, expected)


@torch.no_grad()
def test_logits_match_plaintext(case: Case) -> None:
    inputs = _batch()
    decoder_input_ids = torch.tensor([[0, 7, 9, 11], [0, 4, 4, 30]])
    expected = case.plain(**inputs, decoder_input_ids=decoder_input_ids).logits
    got = case.model(**inputs, decoder_input_ids=decoder_input_ids).logits
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < 1e-2, f"relative logit error {rel:.3g}"  # 16-bit weights, f=16 activations


@torch.no_grad()
def test_round_trips_follow_the_stage_layout(case: Case) -> None:
    """Encoder stages and cross-attention keys/values once per prompt; every decoder stage once per step."""
    inputs = _batch()
    stats = case.model.hss_ee_stats
    stats.reset()
    out = case.model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
    )
    steps = out.shape[1] - 1  # the decoder start token is not generated
    assert steps == NEW_TOKENS
    for stage in stage_layout(case.model.config):
        once = stage.name.startswith("encoder.") or stage.name.endswith(".cross_kv")
        assert stats.per_stage.get(stage.name) == (1 if once else steps), stage.name
    layers = case.model.config.num_decoder_layers
    assert stats.round_trips == 4 * case.model.config.num_layers + layers + steps * (6 * layers + 1)


def test_pipeline_returns_what_text2text_generation_returned(case: Case) -> None:
    if case.transport != "in-process":
        pytest.skip("the pipeline is transport-agnostic; one transport is enough")
    tok = tiny_tokenizer()
    t2t = pipeline(
        "hss-ee-text2text-generation",
        model=str(case.folder),
        key=case.key,
        transport=InProcessTransport(StageEngine(case.folder)),
    )
    assert isinstance(t2t, HSSEEText2TextGenerationPipeline)
    with t2t:
        single = t2t(PROMPTS[0], max_new_tokens=NEW_TOKENS)
        several = t2t(PROMPTS, max_new_tokens=NEW_TOKENS)
        ids = t2t(PROMPTS[1], max_new_tokens=NEW_TOKENS, return_tensors=True)
    expected = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = case.plain.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=NEW_TOKENS)
        expected.append((out[0], tok.decode(out[0], skip_special_tokens=True)))
    assert single == [{"generated_text": expected[0][1]}]
    assert several == [{"generated_text": text} for _, text in expected]
    assert torch.equal(ids[0]["generated_token_ids"], expected[1][0])
    assert expected[0][1], "empty text: the comparison would be weak"


def test_a_causal_client_refuses_a_t5_checkpoint(converted: dict) -> None:
    _, folder, key = converted[T5_VARIANTS[0]]
    with pytest.raises(CheckpointError, match="HSSEEForCausalLM loads causal-LM checkpoints"):
        HSSEEForCausalLM.from_pretrained(folder, key=key, transport=InProcessTransport(StageEngine(folder)))
