"""The linear stages a share server computes, per architecture family (DESIGN.md §3).

A stage is one round trip: the client sends shares of one input and both servers return shares of
`x @ W.T` for a weight made of one or more checkpoint tensors concatenated along the output
dimension (q, k and v together; gate and up together). Each part names the HF module it replaces on
the client, so the client keeps HF's own attention, cache and generation code and only the weight
products leave the machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UnsupportedArchitectureError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
GPT2_FAMILY = ("gpt2",)
T5_FAMILY = ("t5",)
VISION_FAMILY = ("resnet", "vit")


@dataclass(frozen=True)
class StagePart:
    """One checkpoint tensor inside a stage.

    Attributes:
        module (`str`): dotted path of the HF module this part replaces (e.g. `model.layers.0.self_attn.q_proj`).
        kind (`str`): how the tensor is stored and what the client swaps in: `"linear"` (`nn.Linear`, `(out, in)`),
            `"conv1d"` (GPT-2's `Conv1D`, stored `(in, out)`) or `"conv2d"` (`nn.Conv2d`, `(out, in, kh, kw)`; the
            server reads it as `(out, in * kh * kw)` and the client sends im2col patches in the same order).
        permuted_output (`bool`): the output is in the secret permuted order (lm_head, a classifier) and the
            client puts it back with the key's `pi`.
    """

    module: str
    kind: str = "linear"
    permuted_output: bool = False

    @property
    def weight(self) -> str:
        return self.module + ".weight"

    @property
    def bias(self) -> str:
        return self.module + ".bias"


@dataclass(frozen=True)
class Stage:
    """A linear stage: a name servers and clients agree on and its parts, in output order."""

    name: str
    parts: tuple[StagePart, ...]


def stage_layout(config) -> list[Stage]:
    """All stages of a model, in the order a forward pass visits them.

    Args:
        config (`PretrainedConfig`): the EE checkpoint's config (`model_type` picks the family).

    Raises:
        `UnsupportedArchitectureError`: the family has no stage layout.
    """
    if config.model_type in LLAMA_FAMILY:
        n = config.num_hidden_layers
        stages = []
        for i in range(n):
            p = f"model.layers.{i}."
            stages += [
                Stage(f"layers.{i}.qkv", tuple(StagePart(p + f"self_attn.{x}_proj") for x in "qkv")),
                Stage(f"layers.{i}.o", (StagePart(p + "self_attn.o_proj"),)),
                Stage(f"layers.{i}.up", (StagePart(p + "mlp.gate_proj"), StagePart(p + "mlp.up_proj"))),
                Stage(f"layers.{i}.down", (StagePart(p + "mlp.down_proj"),)),
            ]
        return stages + [Stage("lm_head", (StagePart("lm_head", permuted_output=True),))]
    if config.model_type in GPT2_FAMILY:
        n = config.num_hidden_layers
        stages = []
        for i in range(n):
            p = f"transformer.h.{i}."
            stages += [
                Stage(f"layers.{i}.qkv", (StagePart(p + "attn.c_attn", kind="conv1d"),)),
                Stage(f"layers.{i}.o", (StagePart(p + "attn.c_proj", kind="conv1d"),)),
                Stage(f"layers.{i}.up", (StagePart(p + "mlp.c_fc", kind="conv1d"),)),
                Stage(f"layers.{i}.down", (StagePart(p + "mlp.c_proj", kind="conv1d"),)),
            ]
        return stages + [Stage("lm_head", (StagePart("lm_head", permuted_output=True),))]
    if config.model_type in T5_FAMILY:
        from .ee_t5 import t5_stage_layout

        return t5_stage_layout(config)
    if config.model_type in VISION_FAMILY:
        from .ee_vision import vision_stage_layout

        return vision_stage_layout(config)
    supported = LLAMA_FAMILY + GPT2_FAMILY + T5_FAMILY + VISION_FAMILY
    raise UnsupportedArchitectureError(
        f"no stage layout for model_type {config.model_type!r}; supported: {', '.join(supported)}"
    )


def stage_matrix(part: StagePart, tensor: torch.Tensor) -> torch.Tensor:
    """A part's checkpoint tensor as the `(out, in)` matrix the server multiplies by."""
    if part.kind == "conv1d":
        return tensor.T
    if part.kind == "conv2d":
        return tensor.reshape(tensor.shape[0], -1)
    return tensor


def server_tensor_names(config) -> set[str]:
    """Checkpoint tensors that live on the servers (every stage weight)."""
    return {part.weight for stage in stage_layout(config) for part in stage.parts}
