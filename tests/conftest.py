"""Shared fixtures: tiny EE-like checkpoints built without the converter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_FINGERPRINT = "ab" * 32


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """Runs a module's tests with one intra-op thread, restoring the setting afterwards.

    The tiny matrices of these tests gain nothing from threads, and on a busy 2-core runner OpenMP's
    spinning workers make each small product up to a hundred times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ee_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama saved as safetensors with an `hss_ee` block, so servers can load it.

    The weights are not EE-transformed (the servers cannot tell), which keeps this fixture independent of
    the converter.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("tiny-ee-llama")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    config_path = folder / "config.json"
    config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    config_dict["hss_ee"] = {
        "fingerprint": TINY_FINGERPRINT,
        "format_version": 1,
        "ring": {"frac_bits": 16, "weight_bits": 16},
    }
    config_path.write_text(json.dumps(config_dict, indent=2), encoding="utf-8")
    return folder
