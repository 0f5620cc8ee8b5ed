"""Equivariance of the EE transforms for every supported architecture (DESIGN.md §5).

One test body runs over tiny random models of each family:

    logits_EE(pi[ids])[..., pi] == logits_original(ids)      (relative error <= 1e-4)

and greedy `generate()` on the EE model, mapped back through pi^-1, equals the original's.
"""

from __future__ import annotations

import copy
import hashlib
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from hss_ee_hf.ee.families import SUPPORTED_ARCHITECTURES, spec_class_for
from hss_ee_hf.ee.transforms import orthogonal_fixing_ones, rope_commuting_rotation
from hss_ee_hf.errors import UnsupportedArchitectureError
from hss_ee_hf.ring.csprng import ChaChaStream

VOCAB = 160
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# float32 models, float64 transforms: the EE model differs from the original only by float32 rounding.
LOGITS_RTOL = 1e-4
NEW_TOKENS = 12
# Larger than HF's 0.02 so attention is far from uniform: a wrong q/k/v transform then moves the logits.
INIT_STD = 0.15

_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    initializer_range=INIT_STD,
    **TOKEN_IDS,
)

CONFIGS = {
    "llama-gqa-tied": lambda: LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **_LLAMA_LIKE),
    "mistral-mqa": lambda: MistralConfig(num_key_value_heads=1, tie_word_embeddings=False, **_LLAMA_LIKE),
    "qwen2-bias-tied": lambda: Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **_LLAMA_LIKE),
    "gpt2-mha": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=INIT_STD, **TOKEN_IDS
    ),
}


def _seed(tag: str) -> bytes:
    """A fixed ChaCha20 seed per test case, so a failure reproduces."""
    return hashlib.sha256(tag.encode()).digest()


def _build(name: str):
    config = CONFIGS[name]()
    torch.manual_seed(int.from_bytes(_seed(name)[:4], "little"))  # the tiny model's weights only
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # non-trivial norms and biases, so folding them is really tested
                p.add_(0.3 * torch.randn_like(p))
    return config, model


def _convert(config, model, rng: ChaChaStream):
    """The converter's two passes, in memory: read the folded vectors, then transform tensor by tensor."""
    spec = spec_class_for(config)(config, rng)
    sd = model.state_dict()
    small = {n: t for n, t in sd.items() if spec.needs_first_pass(n)}
    assert small, "the first pass must collect the norm weights"
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the embedding emits the untied head
        out.update(spec.transform(name, tensor, small))
    ee_model = AutoModelForCausalLM.from_config(spec.ee_config(copy.deepcopy(config))).to(torch.float32).eval()
    ee_model.load_state_dict({n: t.to(torch.float32) for n, t in out.items()}, strict=True)
    return spec, out, ee_model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request):
    config, model = _build(request.param)
    spec, out, ee_model = _convert(config, model, ChaChaStream(_seed("ee:" + request.param)))
    return request.param, config, model, spec, out, ee_model


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).abs().max().item() / expected.abs().max().item()


def test_logits_are_equivariant(converted):
    name, config, model, spec, _, ee_model = converted
    pi = spec.vocab_perm
    assert torch.equal(torch.sort(pi).values, torch.arange(config.vocab_size))
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=gen)
    with torch.no_grad():
        ref = model(ids).logits
        ee = ee_model(pi[ids]).logits
    assert ref.abs().max().item() > 1e-3, "degenerate model: logits are all ~0"
    assert _relative_error(ee[..., pi], ref) <= LOGITS_RTOL
    # control: without un-permuting, the logits do not match (the vocabulary really is permuted)
    assert _relative_error(ee, ref) > 0.1


def test_greedy_generation_is_equivariant(converted):
    _, config, model, spec, _, ee_model = converted
    pi = spec.vocab_perm
    inv = torch.empty_like(pi)
    inv[pi] = torch.arange(pi.numel())
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, config.vocab_size, (1, 6), generator=gen)
    eos, pad = TOKEN_IDS["eos_token_id"], TOKEN_IDS["pad_token_id"]
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, eos_token_id=eos, pad_token_id=pad, **kwargs)
        # the client speaks the EE vocabulary: its prompt, eos and pad ids all go through pi
        ee = ee_model.generate(pi[ids], eos_token_id=int(pi[eos]), pad_token_id=int(pi[pad]), **kwargs)
    assert ee.shape == ref.shape
    assert ref.shape[1] > ids.shape[1]
    assert torch.equal(inv[ee], ref), (inv[ee].tolist(), ref.tolist())


def test_every_matrix_was_transformed(converted):
    _, config, model, _, out, ee_model = converted
    sd = model.state_dict()
    assert set(out) == set(ee_model.state_dict())
    matrices = [n for n, t in out.items() if t.dim() >= 2]
    assert any("embed" in n or "wte" in n for n in matrices) and "lm_head.weight" in matrices
    for n in matrices:
        original = sd[n].to(torch.float64)
        ee = out[n].to(torch.float64)
        assert ee.shape == original.shape, n
        assert not torch.equal(ee, original), f"{n} was not transformed"
        # not merely perturbed: the secret transforms change it at the scale of the weight itself
        assert (ee - original).abs().max().item() > 0.1 * original.abs().max().item(), n
    # norm weights were folded away: they are exactly one in the EE checkpoint
    norms = [n for n in out if out[n].dim() == 1 and ("norm" in n or ".ln_" in n) and n.endswith(".weight")]
    assert norms and all(torch.all(out[n] == 1) for n in norms)


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as info:
        spec_class_for(BertConfig())
    message = str(info.value)
    assert "bert" in message.lower()
    assert set(SUPPORTED_ARCHITECTURES) >= {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "GPT2LMHeadModel",
    }
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in message


@pytest.mark.parametrize("n", [2, 3, 64, 65])
def test_orthogonal_fixing_ones(n):
    q = orthogonal_fixing_ones(ChaChaStream(_seed(f"ones:{n}")), n)
    ones = torch.ones(n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    assert (q @ ones - ones).abs().max().item() < 1e-12
    assert (ones @ q - ones).abs().max().item() < 1e-12
    assert (q.T @ q - eye).abs().max().item() < 1e-12
    if n > 2:
        assert (q - eye).abs().max().item() > 0.05  # a real rotation, not the identity
    # hence it commutes with LayerNorm's mean subtraction: center(x Q) == center(x) Q
    x = ChaChaStream(_seed("x")).normal((5, n))
    center = lambda t: t - t.mean(dim=-1, keepdim=True)  # noqa: E731
    assert (center(x @ q) - center(x) @ q).abs().max().item() < 1e-12


def _rope(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """HF rotate-half RoPE: pair (i, i + d/2) rotated by theta_i."""
    cos = torch.cat([torch.cos(theta), torch.cos(theta)])
    sin = torch.cat([torch.sin(theta), torch.sin(theta)])
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("head_dim", [2, 16, 64])
def test_rope_commuting_rotation(head_dim):
    rng = ChaChaStream(_seed(f"rope:{head_dim}"))
    r = rope_commuting_rotation(rng, head_dim)
    eye = torch.eye(head_dim, dtype=torch.float64)
    assert (r.T @ r - eye).abs().max().item() < 1e-12
    x = rng.normal((8, head_dim))
    for _ in range(5):
        theta = 2 * math.pi * rng.uniform((head_dim // 2,)) * 50.0  # positions well beyond one turn
        assert (_rope(x @ r, theta) - _rope(x, theta) @ r).abs().max().item() < 1e-10
    # control: a generic rotation does not commute with RoPE, so the check above can fail
    if head_dim > 2:
        g = rng.orthogonal(head_dim)
        theta = 2 * math.pi * rng.uniform((head_dim // 2,))
        assert (_rope(x @ g, theta) - _rope(x, theta) @ g).abs().max().item() > 1e-3
