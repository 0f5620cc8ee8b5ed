"""Tiny random T5, ResNet and ViT models saved as HF folders (with a tokenizer or image processor) and converted.

Like `tiny_models`, weights are scaled up and every norm gets noise (BatchNorm statistics included), so a broken
transform or a wrong fold changes outputs instead of hiding in noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tiny_models import VOCAB, tiny_tokenizer
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

T5_VARIANTS = ("t5-relu-tied", "t5-gated-untied")
VISION_VARIANTS = ("resnet-bottleneck", "resnet-basic", "vit")
IMAGE_SIZE = {"resnet-bottleneck": 64, "resnet-basic": 48, "vit": 32}
NUM_LABELS = 10


def tiny_t5_config(variant: str) -> T5Config:
    common = dict(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        initializer_factor=1.5,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    if variant == "t5-relu-tied":  # original T5: ReLU, tied head with d_model**-0.5 output scaling
        return T5Config(feed_forward_proj="relu", **common)
    if variant == "t5-gated-untied":  # T5 v1.1 / Flan: gated GELU, separate lm_head, no output scaling
        return T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common)
    raise ValueError(f"unknown tiny T5 variant {variant!r}")


def t5_small_config(**overrides) -> T5Config:
    """The real T5-small shape (6 + 6 layers, 8 heads of 64, d_ff 2048, vocabulary 32128), for random weights."""
    shape = dict(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_heads=8,
        feed_forward_proj="relu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5Config(**{**shape, **overrides})


def tiny_vision_config(variant: str):
    labels = {"num_labels": NUM_LABELS}
    if variant == "resnet-bottleneck":
        return ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], layer_type="bottleneck", **labels)
    if variant == "resnet-basic":
        return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="basic", **labels)
    if variant == "vit":
        return ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            initializer_range=0.1,
            **labels,
        )
    raise ValueError(f"unknown tiny vision variant {variant!r}")


def _noisy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.float().eval()


@torch.no_grad()
def spread_classifier(model: torch.nn.Module, size: int, seed: int) -> None:
    """Random classifiers see features dominated by one shared direction, so one label wins for every image.

    Center the classifier on the features of a calibration batch and scale it so labels depend on the image."""
    head = model.classifier[1] if isinstance(model.classifier, torch.nn.Sequential) else model.classifier
    seen = []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(pixel_values=torch.randn(64, 3, size, size, generator=torch.Generator().manual_seed(seed + 2)))
    handle.remove()
    features = seen[0]
    spread = (features - features.mean(0)) @ head.weight.T
    head.weight.mul_(3.0 / spread.std().clamp_min(1e-6))
    head.bias.copy_(-features.mean(0) @ head.weight.T)


def tiny_family_model(variant: str, seed: int = 0) -> torch.nn.Module:
    """A random float32 model of a tiny T5 or vision `variant`, in eval mode, norms and statistics perturbed."""
    torch.manual_seed(seed)
    if variant in T5_VARIANTS:
        return _noisy(T5ForConditionalGeneration(tiny_t5_config(variant)), seed)
    config = tiny_vision_config(variant)
    klass = ResNetForImageClassification if config.model_type == "resnet" else ViTForImageClassification
    model = _noisy(klass(config), seed)
    spread_classifier(model, IMAGE_SIZE[variant], seed)
    return model


def assert_same_top1(got: torch.Tensor, expected: torch.Tensor, undecided_allowed: int = 1) -> None:
    """Secure and plaintext top-1 labels are equal for every image whose decision is outside the fixed-point error.

    Secure logits differ from plaintext by about 1e-4 relative (16-bit weights, f = 16). An image whose two best
    plaintext logits are closer than twice the largest difference seen is a tie at that precision; at most
    `undecided_allowed` such images are tolerated (and any undecided image must still rank the secure winner
    among the plaintext top two).
    """
    error = (got - expected).abs().max()
    top2 = expected.topk(2, dim=-1)
    decided = (top2.values[:, 0] - top2.values[:, 1]) > 2 * error
    assert int((~decided).sum()) <= undecided_allowed, f"{int((~decided).sum())} images tie within {error:.3g}"
    assert torch.equal(got.argmax(-1)[decided], expected.argmax(-1)[decided])
    winners = got.argmax(-1)[~decided].unsqueeze(-1)
    assert (winners == top2.indices[~decided]).any(-1).all()


def tiny_image_processor(variant: str) -> ViTImageProcessor:
    size = IMAGE_SIZE[variant]
    return ViTImageProcessor(size={"height": size, "width": size})


def convert_tiny_family(variant: str, root: Path, seed: int = 0):
    """Saves and converts a tiny model; returns `(original_model, ee_folder, key_path)`."""
    from hss_ee_hf import convert

    src, out, key = root / f"{variant}-src", root / f"{variant}-ee", root / f"{variant}.hss-ee-key"
    model = tiny_family_model(variant, seed)
    model.save_pretrained(src)
    if variant in T5_VARIANTS:
        tiny_tokenizer().save_pretrained(src)
    else:
        tiny_image_processor(variant).save_pretrained(src)
    convert(src, out, key)
    return model, out, key


@contextmanager
def connected(client_class, folder: Path, key: Path, transport: str) -> Iterator:
    """A client model of `client_class` on two share servers: `"in-process"` engines or real `"grpc"` servers."""
    from hss_ee_hf.server.engine import StageEngine
    from hss_ee_hf.server.grpc_server import start_server
    from hss_ee_hf.transport.inprocess import InProcessTransport

    servers = []
    if transport == "in-process":
        model = client_class.from_pretrained(folder, key=key, transport=InProcessTransport(StageEngine(folder)))
    else:
        servers = [start_server(StageEngine(folder), "127.0.0.1", 0) for _ in range(2)]
        endpoints = tuple(f"127.0.0.1:{port}" for _, port in servers)
        model = client_class.from_pretrained(folder, key=key, endpoints=endpoints, timeout=30.0)
    try:
        yield model
    finally:
        model.close()
        for server, _ in servers:
            server.stop(grace=None)
