"""Tiny random models of every supported architecture, saved as HF folders and converted.

Shared by the converter, generation, pipeline and Hub tests. Weights use a larger
`initializer_range` than HF's default so attention is far from uniform and logits have clear
winners: a broken transform then changes tokens instead of hiding in noise. Norm weights and biases
get noise so folding them is exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 96
INIT_STD = 0.15
ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(arch: str):
    """A tiny config of `arch` (one of `ARCHITECTURES`)."""
    common = dict(vocab_size=VOCAB, initializer_range=INIT_STD, **_IDS)
    if arch == "llama":  # GQA, tied embeddings
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            **common,
        )
    if arch == "mistral":  # a single KV head, untied
        return MistralConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            **common,
        )
    if arch == "qwen2":  # q/k/v biases, tied
        return Qwen2Config(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            **common,
        )
    if arch == "gpt2":  # MHA, LayerNorm, learned positions
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def tiny_model(arch: str, seed: int = 0):
    """A random float32 model of `arch` in eval mode, with noisy norm weights and biases."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.generation_config.pad_token_id = _IDS["pad_token_id"]
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `VOCAB` ids (`<pad>`=0, `<s>`=1, `</s>`=2) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}w4 {% endif %}"
    )
    return tok


def save_tiny(arch: str, folder: Path, seed: int = 0):
    """Saves a tiny model of `arch` with its tokenizer as an HF folder; returns the model."""
    model = tiny_model(arch, seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def convert_tiny(arch: str, root: Path, seed: int = 0):
    """Saves and converts a tiny model; returns `(original_model, ee_folder, key_path)`."""
    from hss_ee_hf import convert

    src, out, key = root / f"{arch}-src", root / f"{arch}-ee", root / f"{arch}.hss-ee-key"
    model = save_tiny(arch, src, seed)
    convert(src, out, key)
    return model, out, key


def clear_prompts(model, count: int, seed: int, new_tokens: int, min_margin: float = 1e-2) -> list[list[int]]:
    """`count` random prompts of 2 to 9 tokens whose greedy continuation by `model` has no near-tie.

    A near-tie (two top logits within fixed-point noise) may flip under the ring encoding even on one thread; a test
    of concurrency or of faults that compares with plaintext skips such prompts, as they test the encoding instead.
    """
    import random

    rng = random.Random(seed)
    prompts: list[list[int]] = []
    while len(prompts) < count:
        prompt = [1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 9))]
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        margins = [float(top[0, 0] - top[0, 1]) for top in (logits.topk(2).values for logits in out.logits)]
        if min(margins) > min_margin:
            prompts.append(prompt)
    return prompts
