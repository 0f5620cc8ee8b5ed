"""The stage layout of every supported family: which checkpoint tensors each round trip multiplies by.

One function per family, plus [`stage_layout`], the dispatch on `config.model_type` through
[`hss_ee_hf.artifacts.stages.FAMILIES`]. The client, the servers, the converter and the verifier all read the layout
from here, so they agree on stage names and part order by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UnsupportedArchitectureError
from .stages import FAMILIES, Stage, StagePart


def llama_stage_layout(config) -> list[Stage]:
    """Llama, Mistral, Qwen2: `qkv`, `o`, `up` (gate and up), `down` per layer, then `lm_head`."""
    stages = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        stages += [
            Stage(f"layers.{i}.qkv", tuple(StagePart(p + f"self_attn.{x}_proj") for x in "qkv")),
            Stage(f"layers.{i}.o", (StagePart(p + "self_attn.o_proj"),)),
            Stage(f"layers.{i}.up", (StagePart(p + "mlp.gate_proj"), StagePart(p + "mlp.up_proj"))),
            Stage(f"layers.{i}.down", (StagePart(p + "mlp.down_proj"),)),
        ]
    return stages + [Stage("lm_head", (StagePart("lm_head", permuted_output=True),))]


def gpt2_stage_layout(config) -> list[Stage]:
    """GPT-2 (`Conv1D` weights stored `(in, out)`): the same four stages per layer, then `lm_head`."""
    stages = []
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        stages += [
            Stage(f"layers.{i}.qkv", (StagePart(p + "attn.c_attn", kind="conv1d"),)),
            Stage(f"layers.{i}.o", (StagePart(p + "attn.c_proj", kind="conv1d"),)),
            Stage(f"layers.{i}.up", (StagePart(p + "mlp.c_fc", kind="conv1d"),)),
            Stage(f"layers.{i}.down", (StagePart(p + "mlp.c_proj", kind="conv1d"),)),
        ]
    return stages + [Stage("lm_head", (StagePart("lm_head", permuted_output=True),))]


def t5_stage_layout(config) -> list[Stage]:
    """All linear stages of a `T5ForConditionalGeneration`, in the order a forward pass visits them.

    The encoder runs once per input; during generation the decoder's `cross_kv` stages run only at the first step
    (HF caches the cross-attention keys and values), the other decoder stages and `lm_head` at every step.

    Args:
        config (`T5Config`): the EE checkpoint's config.
    """
    ff = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)
    n_decoder = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
    stages = []
    for i in range(config.num_layers):
        attn, mlp = f"encoder.block.{i}.layer.0.SelfAttention.", f"encoder.block.{i}.layer.1.DenseReluDense."
        stages += [
            Stage(f"encoder.{i}.qkv", tuple(StagePart(attn + x) for x in "qkv")),
            Stage(f"encoder.{i}.o", (StagePart(attn + "o"),)),
            Stage(f"encoder.{i}.up", tuple(StagePart(mlp + x) for x in ff)),
            Stage(f"encoder.{i}.down", (StagePart(mlp + "wo"),)),
        ]
    for i in range(n_decoder):
        p = f"decoder.block.{i}.layer."
        attn, cross, mlp = p + "0.SelfAttention.", p + "1.EncDecAttention.", p + "2.DenseReluDense."
        stages += [
            Stage(f"decoder.{i}.qkv", tuple(StagePart(attn + x) for x in "qkv")),
            Stage(f"decoder.{i}.o", (StagePart(attn + "o"),)),
            Stage(f"decoder.{i}.cross_q", (StagePart(cross + "q"),)),
            Stage(f"decoder.{i}.cross_kv", (StagePart(cross + "k"), StagePart(cross + "v"))),
            Stage(f"decoder.{i}.cross_o", (StagePart(cross + "o"),)),
            Stage(f"decoder.{i}.up", tuple(StagePart(mlp + x) for x in ff)),
            Stage(f"decoder.{i}.down", (StagePart(mlp + "wo"),)),
        ]
    return stages + [Stage("lm_head", (StagePart("lm_head", permuted_output=True),))]


@dataclass(frozen=True)
class ResNetLayer:
    """One `ResNetBasicLayer`/`ResNetBottleNeckLayer` as its config builds it.

    Attributes:
        prefix (`str`): module path with a trailing dot, e.g. `resnet.encoder.stages.0.layers.0.`.
        out_channels (`int`): channels of the residual stream it writes.
        shortcut (`bool`): whether it has a projection shortcut (`ResNetShortCut`) instead of the identity.
        widths (`tuple[int, ...]`): output channels of its main-branch convolutions `layer.0`, `layer.1`, ...
    """

    prefix: str
    out_channels: int
    shortcut: bool
    widths: tuple[int, ...]


def resnet_layers(config) -> list[ResNetLayer]:
    """The residual layers of a ResNet config, deciding shortcuts exactly as transformers' ResNet modules do.

    `ResNetEncoder` builds stage 0 with stride 2 only if `downsample_in_first_stage`, later stages with stride 2;
    only a stage's first layer strides and changes channels; a layer gets a projection shortcut when its input and
    output channels differ or its stride is not 1. Bottleneck layers reduce to `out_channels // 4` inside.
    """
    layers = []
    in_channels = config.embedding_size
    for s, (out_channels, depth) in enumerate(zip(config.hidden_sizes, config.depths, strict=True)):
        stage_stride = 2 if s > 0 or config.downsample_in_first_stage else 1
        for i in range(depth):
            layer_in, stride = (in_channels, stage_stride) if i == 0 else (out_channels, 1)
            if config.layer_type == "bottleneck":
                widths = (out_channels // 4, out_channels // 4, out_channels)
            else:
                widths = (out_channels, out_channels)
            shortcut = layer_in != out_channels or stride != 1
            layers.append(ResNetLayer(f"resnet.encoder.stages.{s}.layers.{i}.", out_channels, shortcut, widths))
        in_channels = out_channels
    return layers


def resnet_stage_layout(config) -> list[Stage]:
    """Every `Conv2d` and `Linear` of `ResNetForImageClassification`, in forward order.

    Per layer the main branch comes first (stages `...conv0`, `...conv1`[, `...conv2`] for HF's `layer.{k}`), then
    the projection shortcut if the layer has one: `ResNet*Layer.forward` runs `self.layer` before `self.shortcut`.
    """
    stages = [Stage("embedder", (StagePart("resnet.embedder.embedder.convolution", kind="conv2d"),))]
    for layer in resnet_layers(config):
        name = layer.prefix[len("resnet.encoder.") : -1]
        for k in range(len(layer.widths)):
            stages.append(
                Stage(f"{name}.conv{k}", (StagePart(f"{layer.prefix}layer.{k}.convolution", kind="conv2d"),))
            )
        if layer.shortcut:
            stages.append(
                Stage(f"{name}.shortcut", (StagePart(layer.prefix + "shortcut.convolution", kind="conv2d"),))
            )
    return stages + [Stage("classifier", (StagePart("classifier.1", permuted_output=True),))]


def vit_stage_layout(config) -> list[Stage]:
    """Every `Conv2d` and `Linear` of `ViTForImageClassification` (transformers 5 names), in forward order."""
    stages = [Stage("patch_embed", (StagePart("vit.embeddings.patch_embeddings.projection", kind="conv2d"),))]
    for i in range(config.num_hidden_layers):
        p = f"vit.layers.{i}."
        stages += [
            Stage(f"layers.{i}.qkv", tuple(StagePart(p + f"attention.{x}_proj") for x in "qkv")),
            Stage(f"layers.{i}.o", (StagePart(p + "attention.o_proj"),)),
            Stage(f"layers.{i}.up", (StagePart(p + "mlp.fc1"),)),
            Stage(f"layers.{i}.down", (StagePart(p + "mlp.fc2"),)),
        ]
    return stages + [Stage("classifier", (StagePart("classifier", permuted_output=True),))]


_LAYOUTS: dict[str, Callable] = {
    "llama": llama_stage_layout,
    "gpt2": gpt2_stage_layout,
    "t5": t5_stage_layout,
    "resnet": resnet_stage_layout,
    "vit": vit_stage_layout,
}


def stage_layout(config) -> list[Stage]:
    """All stages of a model, in the order a forward pass visits them.

    Args:
        config (`PretrainedConfig`): the EE checkpoint's config (`model_type` picks the family).

    Raises:
        `UnsupportedArchitectureError`: the family has no stage layout.
    """
    for family, model_types in FAMILIES.items():
        if config.model_type in model_types:
            return _LAYOUTS[family](config)
    supported = [t for types in FAMILIES.values() for t in types]
    raise UnsupportedArchitectureError(
        f"no stage layout for model_type {config.model_type!r}; supported: {', '.join(supported)}"
    )


def server_tensor_names(config) -> set[str]:
    """Checkpoint tensors that live on the servers (every stage weight)."""
    return {part.weight for stage in stage_layout(config) for part in stage.parts}
