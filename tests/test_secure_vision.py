"""Private image classification equals plaintext, over the tiny ResNet and ViT variants and both transports.

The converter writes the EE checkpoint (BatchNorm folded, channels permuted and scaled, labels permuted) and
verifies it; two share servers serve it; [`HSSEEForImageClassification`] classifies 32 random images: logits within
1e-2 relative of the original model's and the same top-1 label for every image. The pipeline must return exactly
what transformers' own `image-classification` pipeline returns for the plaintext model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_families import (
    IMAGE_SIZE,
    VISION_VARIANTS,
    assert_same_top1,
    connected,
    convert_tiny_family,
    tiny_image_processor,
)
from transformers import pipeline
from transformers.modeling_outputs import ImageClassifierOutput, ImageClassifierOutputWithNoAttention

from hss_ee_hf import HSSEEForImageClassification, HSSEEImageClassificationPipeline
from hss_ee_hf.artifacts.layouts import stage_layout
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.transport.inprocess import InProcessTransport

IMAGES = 32
LOGITS_RTOL = 1e-2

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@dataclass
class Case:
    variant: str
    transport: str
    plain: torch.nn.Module
    model: HSSEEForImageClassification
    folder: Path
    key: Path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny-vision")
    return {variant: convert_tiny_family(variant, root) for variant in VISION_VARIANTS}


@pytest.fixture(
    scope="module",
    params=[(v, t) for v in VISION_VARIANTS for t in ("in-process", "grpc")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def case(request: pytest.FixtureRequest, converted: dict) -> Iterator[Case]:
    variant, kind = request.param
    plain, folder, key = converted[variant]
    with connected(HSSEEForImageClassification, folder, key, kind) as model:
        yield Case(variant, kind, plain, model, folder, key)


def _pixels(variant: str, count: int = IMAGES) -> torch.Tensor:
    size = IMAGE_SIZE[variant]
    gen = torch.Generator().manual_seed(11)  # test images, not masks
    return torch.randn(count, 3, size, size, generator=gen)


def _images(variant: str, count: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(5)  # test images, not masks
    size = IMAGE_SIZE[variant]
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def test_client_is_the_hf_class(case: Case) -> None:
    assert isinstance(case.model, type(case.plain))
    assert isinstance(case.model, HSSEEForImageClassification)


@torch.no_grad()
def test_logits_and_top1_match_plaintext(case: Case) -> None:
    pixels = _pixels(case.variant)
    expected = case.plain(pixel_values=pixels)
    got = case.model(pixel_values=pixels)
    assert isinstance(got, (ImageClassifierOutput, ImageClassifierOutputWithNoAttention))
    assert type(got) is type(expected)
    rel = ((got.logits - expected.logits).abs().max() / expected.logits.abs().max()).item()
    assert rel <= LOGITS_RTOL, f"relative logit error {rel:.3g}"
    assert_same_top1(got.logits, expected.logits)
    assert expected.logits.argmax(-1).unique().numel() > 1, "one class wins everywhere; top-1 would test little"


@torch.no_grad()
def test_one_round_trip_per_stage(case: Case) -> None:
    stats = case.model.hss_ee_stats
    stats.reset()
    case.model(pixel_values=_pixels(case.variant, 2))
    assert stats.per_stage == {stage.name: 1 for stage in stage_layout(case.model.config)}


def test_pipeline_returns_what_image_classification_returns(case: Case) -> None:
    if case.transport != "in-process":
        pytest.skip("the pipeline is transport-agnostic; one transport is enough")
    images = _images(case.variant)
    plain = pipeline("image-classification", model=case.plain, image_processor=tiny_image_processor(case.variant))
    private = pipeline(
        "hss-ee-image-classification",
        model=str(case.folder),
        key=case.key,
        transport=InProcessTransport(StageEngine(case.folder)),
    )
    assert isinstance(private, HSSEEImageClassificationPipeline)
    with private:
        for top_k in (1, 3):
            got = private(images, top_k=top_k)
            expected = plain(images, top_k=top_k)
            assert [[r["label"] for r in rows] for rows in got] == [[r["label"] for r in rows] for rows in expected]
            for rows_got, rows_expected in zip(got, expected, strict=True):
                for a, b in zip(rows_got, rows_expected, strict=True):
                    assert a["score"] == pytest.approx(b["score"], abs=2e-3)
