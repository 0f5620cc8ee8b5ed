"""The real T5-small, ResNet-50 and ViT-B/16 shapes with random weights: convert, serve, compare with plaintext.

Slow: each converts a full-size random model (the converter verifies equivariance on it), then runs it through two
in-process share servers. T5-small: 16 greedy tokens equal plaintext `generate()`. ResNet-50 and ViT-B/16: logits
within 1e-2 relative of plaintext and the same top-1 label on 32 images (64x64 for ResNet, which is fully
convolutional; ViT at its native 224x224 on fewer images would take minutes on a 2-core runner, so it uses 8).
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import assert_same_top1, spread_classifier, t5_small_config
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from hss_ee_hf import HSSEEForConditionalGeneration, HSSEEForImageClassification, convert
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.transport.inprocess import InProcessTransport

pytestmark = pytest.mark.slow


def _convert(model: torch.nn.Module, tmp_path) -> tuple:
    src, out, key = tmp_path / "src", tmp_path / "ee", tmp_path / "model.hss-ee-key"
    model.save_pretrained(src)
    result = convert(src, out, key)
    assert result.max_rel_logit_diff is not None and result.max_rel_logit_diff <= 1e-4
    return out, key


@torch.no_grad()
def test_t5_small_shape_generates_like_plaintext(tmp_path) -> None:
    torch.manual_seed(0)
    config = t5_small_config()
    plain = T5ForConditionalGeneration(config).eval()
    folder, key = _convert(plain, tmp_path)
    ids = torch.randint(2, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    expected = plain.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with HSSEEForConditionalGeneration.from_pretrained(
        folder, key=key, transport=InProcessTransport(StageEngine(folder))
    ) as model:
        got = model.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert expected.shape[1] == 17
    assert torch.equal(got, expected)


def _classifier_case(model: torch.nn.Module, size: int, images: int, tmp_path) -> None:
    model = model.eval()
    spread_classifier(model, size, seed=0)
    folder, key = _convert(model, tmp_path)
    pixels = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        with HSSEEForImageClassification.from_pretrained(
            folder, key=key, transport=InProcessTransport(StageEngine(folder))
        ) as client:
            got = client(pixel_values=pixels).logits
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-2, f"relative logit error {rel:.3g}"
    assert_same_top1(got, expected)
    assert expected.argmax(-1).unique().numel() > 1


def test_resnet50_shape_classifies_like_plaintext(tmp_path) -> None:
    torch.manual_seed(0)
    _classifier_case(ResNetForImageClassification(ResNetConfig(num_labels=1000)), 64, 32, tmp_path)


def test_vit_base_shape_classifies_like_plaintext(tmp_path) -> None:
    torch.manual_seed(0)
    _classifier_case(ViTForImageClassification(ViTConfig(num_labels=1000)), 224, 8, tmp_path)
