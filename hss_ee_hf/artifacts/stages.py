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

# The one table of supported families: family -> the `model_type`s it covers. The EE specs, the stage layouts and
# the CLI all read it, so a family is added in one place.
FAMILIES: dict[str, tuple[str, ...]] = {
    "llama": ("llama", "mistral", "qwen2"),
    "gpt2": ("gpt2",),
    "t5": ("t5",),
    "resnet": ("resnet",),
    "vit": ("vit",),
}
VISION_FAMILY = FAMILIES["resnet"] + FAMILIES["vit"]


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


def stage_matrix(part: StagePart, tensor: torch.Tensor) -> torch.Tensor:
    """A part's checkpoint tensor as the `(out, in)` matrix the server multiplies by."""
    if part.kind == "conv1d":
        return tensor.T
    if part.kind == "conv2d":
        return tensor.reshape(tensor.shape[0], -1)
    return tensor
