"""EE transforms and linear stages of T5 (DESIGN.md §5, `hss_ee_hf/ee_t5.py`).

Over tiny random T5s (original-style ReLU with a tied head, v1.1-style gated-GELU with its own head):

    logits_EE(pi[ids], decoder_input_ids=pi[dec])[..., pi] == logits_original(ids, dec)   (relative error <= 1e-4)

greedy `generate()` on the EE model, mapped back through pi^-1, equals the original's, and the stage layout covers
every linear of the model exactly once, in forward order.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_families import t5_small_config
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from hss_ee_hf.artifacts.layouts import stage_layout, t5_stage_layout
from hss_ee_hf.ee.t5 import T5Spec
from hss_ee_hf.ring.csprng import ChaChaStream

pytestmark = pytest.mark.usefixtures("torch_single_thread")

VOCAB = 128
TOKEN_IDS = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
# float32 models, float64 transforms: the EE model differs from the original only by float32 rounding.
LOGITS_RTOL = 1e-4
NEW_TOKENS = 16
# T5 initialises q with std factor * (d_model * d_kv)**-0.5 and scales every other weight with the same factor. A
# factor above HF's 1 makes attention far from uniform (a wrong q/k transform then moves the logits); much above 1.5
# the tiny models get so ill-conditioned that T5LayerNorm's float32 variance (computed in float32 whatever the
# weights' dtype) alone moves the logits by more than LOGITS_RTOL.
INIT_FACTOR = 1.5

_TINY = dict(
    vocab_size=VOCAB,
    d_model=64,
    num_heads=4,
    d_ff=96,
    num_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    initializer_factor=INIT_FACTOR,
    **TOKEN_IDS,
)

CONFIGS = {
    # original T5: ReLU MLP, head tied to `shared`, decoder output scaled by d_model**-0.5
    "t5-relu-tied": lambda: T5Config(d_kv=16, feed_forward_proj="relu", **_TINY),
    # v1.1 / Flan-T5: gated GELU, separate lm_head, no output scaling; inner_dim 4 * 24 != d_model; 3 encoder and 2
    # decoder layers (more decoder than encoder layers breaks generate() in transformers 5.24: its cache is sized by
    # num_layers)
    "t5-gated-untied": lambda: T5Config(
        d_kv=24,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        num_decoder_layers=2,
        **{**_TINY, "num_layers": 3},
    ),
}


def _seed(tag: str) -> bytes:
    """A fixed ChaCha20 seed per test case, so a failure reproduces."""
    return hashlib.sha256(tag.encode()).digest()


def _build(config: T5Config, tag: str, untie_head: bool) -> T5ForConditionalGeneration:
    torch.manual_seed(int.from_bytes(_seed(tag)[:4], "little"))  # the tiny model's weights only
    model = T5ForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        if untie_head:
            # transformers 5 ties lm_head to `shared` whatever the config says; a v1.1 checkpoint has its own head
            model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight))
        for name, p in model.named_parameters():
            if p.dim() == 1:  # non-trivial norms, so folding them is really tested
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("relative_attention_bias.weight"):  # a position bias that matters per head
                p.add_(torch.randn_like(p))
    return model


def _source_names(model: T5ForConditionalGeneration) -> set[str]:
    """The names a saved checkpoint of `model` stores: a tied checkpoint has no `lm_head.weight`."""
    names = set(model.state_dict())
    if model.lm_head.weight is model.shared.weight:
        names.discard("lm_head.weight")
    return names


def _convert(config, model, rng: ChaChaStream, spec_class: type[T5Spec] = T5Spec):
    """The converter's two passes, in memory: read the folded vectors, then transform tensor by tensor."""
    spec = spec_class(config, rng)
    spec.source_names = _source_names(model)
    sd = model.state_dict()  # lists the tied tables under every name (shared, encoder/decoder.embed_tokens)
    small = {n: t for n, t in sd.items() if spec.needs_first_pass(n)}
    assert small, "the first pass must collect the norm weights"
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        if name in spec.source_names:
            out.update(spec.transform(name, tensor, small))
    ee_model = T5ForConditionalGeneration(spec.ee_config(copy.deepcopy(config))).to(torch.float32).eval()
    ee_model.load_state_dict({n: t.to(torch.float32) for n, t in out.items()}, strict=True)
    return spec, out, ee_model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request):
    name = request.param
    config = CONFIGS[name]()
    model = _build(config, name, untie_head=name.endswith("-untied"))
    spec, out, ee_model = _convert(config, model, ChaChaStream(_seed("ee:" + name)))
    return name, config, model, spec, out, ee_model


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).abs().max().item() / expected.abs().max().item()


def _inverse(pi: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(pi)
    inv[pi] = torch.arange(pi.numel())
    return inv


def _check_equivariant(spec, model, ee_model, inputs) -> float:
    with torch.no_grad():
        ref = model(**inputs).logits
        ee = ee_model(**spec.ee_inputs(inputs)).logits
    assert ref.abs().max().item() > 1e-3, "degenerate model: logits are all ~0"
    # control: without un-permuting, the logits do not match (the vocabulary really is permuted)
    assert _relative_error(ee, ref) > 0.1
    return _relative_error(ee[..., spec.vocab_perm], ref)


def _seeded_inputs(config, seed: int, batch: int = 2, enc_len: int = 13, dec_len: int = 9):
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, config.vocab_size, (batch, enc_len), generator=gen),
        "decoder_input_ids": torch.randint(0, config.vocab_size, (batch, dec_len), generator=gen),
    }


def test_model_shapes(converted):
    """The tiny configs are what their names say (a guard against transformers changing its T5 defaults)."""
    name, config, model, _, _, ee_model = converted
    assert config.is_gated_act == ("gated" in name)
    assert config.scale_decoder_outputs == name.endswith("-tied")
    assert (model.lm_head.weight is model.shared.weight) == name.endswith("-tied")
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert ee_model.lm_head.weight is not ee_model.shared.weight
    assert ee_model.config.scale_decoder_outputs == config.scale_decoder_outputs
    # attention is far from uniform, so a wrong q/k transform moves the logits
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # sdpa returns no attention probabilities
    with torch.no_grad():
        probs = eager(**_seeded_inputs(config, 3), output_attentions=True).encoder_attentions[-1]
    assert probs.max(dim=-1).values.mean().item() > 0.5  # uniform would be 1 / 13


def test_logits_are_equivariant(converted):
    _, config, model, spec, _, ee_model = converted
    pi = spec.vocab_perm
    assert torch.equal(torch.sort(pi).values, torch.arange(config.vocab_size))
    inputs = _seeded_inputs(config, 7)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, -4:] = 0  # padding in the encoder input: masks are not permuted
    assert _check_equivariant(spec, model, ee_model, inputs) <= LOGITS_RTOL


def test_verification_inputs_are_equivariant(converted):
    _, config, model, spec, _, ee_model = converted
    inputs = spec.verification_inputs(batch=2, length=16)
    assert set(inputs) == {"input_ids", "decoder_input_ids"}
    for t in inputs.values():
        assert t.shape == (2, 16) and t.dtype == torch.int64
        assert 0 <= t.min().item() and t.max().item() < config.vocab_size
    assert torch.all(inputs["decoder_input_ids"][:, 0] == config.decoder_start_token_id)
    ee = spec.ee_inputs(inputs)
    for n in inputs:
        assert torch.equal(ee[n], spec.vocab_perm[inputs[n]])
    err = _check_equivariant(spec, model, ee_model, inputs)
    assert err <= LOGITS_RTOL, inputs  # the inputs are random per run: show them on failure


@pytest.mark.parametrize("penalty", [None, 2.0], ids=["plain", "repetition-penalty"])
def test_greedy_generation_is_equivariant(converted, penalty):
    """Greedy decoding, 16 new tokens, mapped back through pi^-1.

    A random tiny T5 with a tied head tends to repeat the token it was fed (its logits are close to `E h`); a
    repetition penalty (a processor on token identities, so it commutes with pi) makes the sequences diverse.
    """
    _, config, model, spec, _, ee_model = converted
    pi = spec.vocab_perm
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(2, config.vocab_size, (2, 7), generator=gen)
    eos, pad, start = TOKEN_IDS["eos_token_id"], TOKEN_IDS["pad_token_id"], TOKEN_IDS["decoder_start_token_id"]
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    if penalty is not None:
        kwargs["repetition_penalty"] = penalty
    with torch.no_grad():
        ref = model.generate(ids, eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=start, **kwargs)
        # the client speaks the EE vocabulary: prompt, eos, pad and the decoder's start token all go through pi
        ee = ee_model.generate(
            pi[ids],
            eos_token_id=int(pi[eos]),
            pad_token_id=int(pi[pad]),
            decoder_start_token_id=int(pi[start]),
            **kwargs,
        )
    assert ref.shape == (2, 1 + NEW_TOKENS)
    assert ee.shape == ref.shape
    if penalty is not None:
        assert all(len(set(row[1:].tolist())) >= NEW_TOKENS // 2 for row in ref), ref.tolist()
    assert torch.equal(_inverse(pi)[ee], ref), (_inverse(pi)[ee].tolist(), ref.tolist())


def test_every_matrix_was_transformed(converted):
    name, config, model, spec, out, ee_model = converted
    sd = model.state_dict()
    assert set(out) == set(ee_model.state_dict()) == set(sd)
    for n in [n for n, t in out.items() if t.dim() >= 2 and "relative_attention_bias" not in n]:
        original, ee = sd[n].to(torch.float64), out[n].to(torch.float64)
        assert ee.shape == original.shape, n
        # not merely perturbed: the secret transforms change it at the scale of the weight itself
        assert (ee - original).abs().max().item() > 0.1 * original.abs().max().item(), n
    # the head was built from `shared` for a tied source, from `lm_head.weight` for an untied one
    gamma = sd["decoder.final_layer_norm.weight"].to(torch.float64)
    head_source = sd["lm_head.weight"].to(torch.float64)
    expected = torch.empty_like(head_source)
    expected[spec.vocab_perm] = (head_source * gamma) @ spec.rotation
    assert (out["lm_head.weight"].to(torch.float64) - expected).abs().max().item() < 1e-5
    # all three embedding tables are the same EE table
    for table in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        assert torch.equal(out[table], out["shared.weight"]), table
    # relative bias: the columns (heads) of each stack's table are permuted with that stack's head permutation
    for stack in ("encoder", "decoder"):
        key = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert torch.equal(out[key].to(torch.float32), sd[key][:, spec.stack_head_perm(stack)]), key
    # norm weights were folded away: they are exactly one in the EE checkpoint
    norms = [n for n in out if n.endswith("layer_norm.weight")]
    assert len(norms) == 2 + 2 * config.num_layers + 3 * config.num_decoder_layers
    assert all(torch.all(out[n] == 1) for n in norms)


def test_server_tensors_differ_from_original(converted):
    _, config, model, _, out, _ = converted
    sd = model.state_dict()
    parts = [part for stage in t5_stage_layout(config) for part in stage.parts]
    assert parts
    for part in parts:
        original, ee = sd[part.weight].to(torch.float64), out[part.weight].to(torch.float64)
        assert not torch.equal(ee, original), part.weight
        assert (ee - original).abs().max().item() > 0.1 * original.abs().max().item(), part.weight


def test_stage_layout_covers_every_linear_in_forward_order(converted):
    _, config, model, _, _, _ = converted
    stages = t5_stage_layout(config)
    assert stage_layout(config) == stages  # the registry dispatches model_type "t5" here
    modules = dict(model.named_modules())
    linears = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    named = [part.module for stage in stages for part in stage.parts]
    assert len(named) == len(set(named)), "a module is named twice"
    assert set(named) == linears
    assert len({stage.name for stage in stages}) == len(stages)
    layers = 4 * config.num_layers + 7 * config.num_decoder_layers
    assert len(stages) == layers + 1
    for stage in stages:
        assert all(part.kind == "linear" for part in stage.parts)
        assert all(part.permuted_output == (stage.name == "lm_head") for part in stage.parts)
        assert len({modules[part.module].in_features for part in stage.parts}) == 1, stage.name
    gated = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)
    up = next(stage for stage in stages if stage.name == "decoder.0.up")
    assert tuple(part.module.rsplit(".", 1)[1] for part in up.parts) == gated
    # forward order: the first call of every linear during one forward pass follows the layout
    calls: list[str] = []
    hooks = [
        modules[n].register_forward_hook(lambda _m, _i, _o, n=n: calls.append(n) if n not in calls else None)
        for n in linears
    ]
    try:
        with torch.no_grad():
            model(**_seeded_inputs(config, 5))
    finally:
        for h in hooks:
            h.remove()
    assert calls == named


def test_head_permutation_must_be_shared_by_a_stack(converted):
    """Control: with a head permutation per self-attention layer the position bias lands on the wrong heads."""

    class PerLayerHeads(T5Spec):
        def t5_attention(self, stack, layer, cross):
            return super().t5_attention(stack + ("-cross" if cross else "-self"), layer, cross=True)

    name, config, model, _, _, _ = converted
    spec, _, ee_model = _convert(config, model, ChaChaStream(_seed("ee:" + name)), PerLayerHeads)
    assert _check_equivariant(spec, model, ee_model, _seeded_inputs(config, 7)) > 1e-2


def test_saved_checkpoint_reloads_with_separate_head(converted, tmp_path):
    """The real files: a saved original converts by its stored names and the EE folder reloads untied."""
    name, config, model, _, _, _ = converted
    src, dst = tmp_path / "src", tmp_path / "ee"
    model.save_pretrained(src)
    with safe_open(src / "model.safetensors", "pt") as f:
        sd = {n: f.get_tensor(n) for n in f.keys()}
    assert "shared.weight" in sd and ("lm_head.weight" in sd) == name.endswith("-untied")
    spec = T5Spec(config, ChaChaStream(_seed("ee:" + name)))
    spec.source_names = set(sd)
    small = {n: t for n, t in sd.items() if spec.needs_first_pass(n)}
    out: dict[str, torch.Tensor] = {}
    for n, t in sd.items():
        out.update(spec.transform(n, t, small))
    assert "lm_head.weight" in out
    dst.mkdir()
    save_file({n: t.to(torch.float32).contiguous() for n, t in out.items()}, dst / "model.safetensors")
    spec.ee_config(copy.deepcopy(config)).save_pretrained(dst)
    saved = json.loads((dst / "config.json").read_text())
    assert saved["scale_decoder_outputs"] == config.scale_decoder_outputs

    auto = getattr(transformers, spec.auto_class)
    ee_model, info = auto.from_pretrained(dst, output_loading_info=True)
    ee_model = ee_model.to(torch.float32).eval()
    assert isinstance(ee_model, T5ForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert ee_model.config.scale_decoder_outputs == config.scale_decoder_outputs
    # T5Config forces tie_word_embeddings=True on load; from_pretrained unties the head because it differs
    assert ee_model.lm_head.weight is not ee_model.shared.weight
    assert torch.equal(ee_model.lm_head.weight, out["lm_head.weight"].to(torch.float32))
    assert torch.equal(ee_model.shared.weight, out["shared.weight"].to(torch.float32))
    assert ee_model.encoder.embed_tokens.weight is ee_model.shared.weight
    assert _check_equivariant(spec, model, ee_model, _seeded_inputs(config, 9)) <= LOGITS_RTOL


@pytest.mark.slow
def test_t5_small_shape_logits_are_equivariant():
    """The real T5-small shape (random weights): 6 + 6 layers, 8 heads of 64, d_ff 2048, vocabulary 32128."""
    config = t5_small_config(dropout_rate=0.0, initializer_factor=1.0)
    model = _build(config, "t5-small", untie_head=False)
    spec, _, ee_model = _convert(config, model, ChaChaStream(_seed("ee:t5-small")))
    inputs = _seeded_inputs(config, 13, enc_len=24, dec_len=12)
    assert _check_equivariant(spec, model, ee_model, inputs) <= LOGITS_RTOL
