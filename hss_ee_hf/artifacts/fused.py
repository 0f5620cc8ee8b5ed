"""The two-stages-per-layer schedule: fused stages built from the ordinary stage weights (DESIGN.md §8, lever 2).

A decoder layer normally costs four round trips (`qkv`, `o`, `up`, `down`). A norm after its folded gain is a
per-row scalar of a fixed linear map of the residual: `norm(r) = C·r / σ(r)` with `C = I` for RMSNorm and the mean
subtraction `C = I − 11ᵀ/d` for LayerNorm. So for the next stage's weight `W`, `W·norm(r) = (W·C)·r / σ(r)`, and the
client can divide after reconstructing. With `r' = r + W_o·a + b_o`, one round trip carrying `[a, r + b_o]` returns

```
[ W_o·a ,  (W_gu·C·W_o)·a + (W_gu·C)·(r + b_o) ]   =   [ o − b_o ,  σ(r')·(gate/up input) ]
```

and likewise `[h, r' + b_down]` returns `down(h) − b_down` and `σ(r'')` times the next layer's `qkv` input. A fused
stage is therefore two *blocks*: the first product (`o` or `down`) on the first input columns, and the fused product
on all columns. Each block is quantised on its own (per output row), so the fused stage's scales are the two blocks'
scales concatenated.

Fixed-point headroom: the residual `r` is much larger than `norm(r)` (up to |r| ≈ 4.1e3 on SmolLM2-135M, against
`norm(r)` of order 1), and a fused stage is wider (`in = in1 + d`), so its activation limit is lower
(`RingConfig.headroom_bits`: 2^20 for `o_up`, 2^19 for `down_qkv` at SmolLM2's widths with f = 16). That leaves a
margin of more than 2^7; the client's encoder raises `RingOverflowError` rather than wrap if a model ever exceeds it.

The fused weights are functions of the public EE weights only, so the share servers build them when they load a
checkpoint (`hss-ee serve --schedules 4,2`) rather than the converter writing them: checkpoints keep their format
(existing ones gain the schedule when their servers restart, Hub downloads do not grow by ≈ 1.9× for users who never
ask for it), and only operators who opt in pay the memory. Building them takes seconds (float64 products of a few
small matrices per layer). The client reads the fused stages' scales from both servers' `Describe` and uses them only
if the two agree. Per layer (Llama shapes) the server multiplies ≈ 1.9× as much and holds ≈ 1.9× the
weights; the client needs half the round trips (`2·layers + 2` per token instead of `4·layers + 1`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UnsupportedArchitectureError
from ..ring.fixed_point import RingConfig, quantize_weight
from .layouts import stage_layout
from .stages import FAMILIES, Stage, stage_matrix
from .weights import weight_files

SCHEDULES = (4, 2)
"""Stages per decoder layer a client may ask for: 4 (the ordinary layout) or 2 (fused stages)."""
FUSED_FAMILIES = ("llama", "gpt2")
"""Families whose decoder layers have a fused (two-stage) form; T5 (cross-attention) and vision models do not."""


@dataclass(frozen=True)
class FusedStage:
    """One round trip of the two-stage schedule.

    Attributes:
        name (`str`): stage name, e.g. `layers.3.o_up` or `layers.3.down_qkv`.
        first (`str`): the ordinary stage computed on the first input block (`layers.3.o`, `layers.3.down`).
        second (`str`): the ordinary stage fused through the norm (`layers.3.up`, `layers.4.qkv`).
        centered (`bool`): the norm between them is a LayerNorm (its mean subtraction folds into the weights).
    """

    name: str
    first: str
    second: str
    centered: bool


def two_stage_layout(config) -> list[FusedStage]:
    """The fused stages of a decoder LLM, in forward order (the first `qkv`, the last `down` and `lm_head` stay).

    Args:
        config (`PretrainedConfig`): the EE checkpoint's config.

    Raises:
        `UnsupportedArchitectureError`: the family has no two-stage schedule.
    """
    family = next((f for f, types in FAMILIES.items() if config.model_type in types), None)
    if family not in FUSED_FAMILIES:
        raise UnsupportedArchitectureError(
            f"model_type {config.model_type!r} has no two-stages-per-layer schedule (supported: "
            f"{', '.join(t for f in FUSED_FAMILIES for t in FAMILIES[f])}); use stages_per_layer=4"
        )
    centered = family == "gpt2"
    n = config.num_hidden_layers
    stages = []
    for i in range(n):
        stages.append(FusedStage(f"layers.{i}.o_up", f"layers.{i}.o", f"layers.{i}.up", centered))
        if i + 1 < n:
            stages.append(FusedStage(f"layers.{i}.down_qkv", f"layers.{i}.down", f"layers.{i + 1}.qkv", centered))
    return stages


def stages_per_token(config, stages_per_layer: int) -> int:
    """Round trips of one decode step under a schedule: `4·layers + 1` or `2·layers + 2`."""
    n = config.num_hidden_layers
    return 4 * n + 1 if stages_per_layer == 4 else 2 * n + 2


def fused_matrix(first: torch.Tensor, second: torch.Tensor, centered: bool) -> torch.Tensor:
    """The fused block `[W2·C·W1 | W2·C]` (float64) of a fused stage, for inputs `[x, r + b1]`.

    Args:
        first (`torch.Tensor`): `W1`, `(d, in1)`: the product whose output joins the residual.
        second (`torch.Tensor`): `W2`, `(out2, d)`: the product fed by the norm of the updated residual.
        centered (`bool`): `C` is LayerNorm's mean subtraction (else the identity).
    """
    w2 = second.to(torch.float64)
    if centered:  # W2·(I − 11ᵀ/d) = W2 − (W2·1)·1ᵀ/d
        w2 = w2 - w2.mean(dim=1, keepdim=True)
    return torch.cat([w2 @ first.to(torch.float64), w2], dim=1)


def _float_stage(files: dict[str, Path], stage: Stage) -> torch.Tensor:
    parts = []
    for part in stage.parts:
        with safe_open(str(files[part.weight]), "pt") as f:
            parts.append(stage_matrix(part, f.get_tensor(part.weight)).to(torch.float64))
    return torch.cat(parts, dim=0)


def iter_fused_stage_weights(
    folder: str | os.PathLike, config, ring: RingConfig
) -> Iterator[tuple[FusedStage, list[tuple[int, torch.Tensor]], torch.Tensor]]:
    """Yields `(stage, blocks, scale)` for every fused stage of an EE checkpoint.

    `blocks` is `[(in1, w1_int), (in1 + d, w2_int)]`: each block multiplies the first `cols` input columns; the stage
    output is the two block outputs concatenated, decoded with `scale` (the two blocks' scales concatenated).

    Args:
        folder (`str` or `os.PathLike`): the EE checkpoint folder.
        config (`PretrainedConfig`): its config.
        ring (`RingConfig`): quantisation parameters.
    """
    files = weight_files(Path(folder))
    ordinary = {stage.name: stage for stage in stage_layout(config)}
    for fused in two_stage_layout(config):
        w1 = _float_stage(files, ordinary[fused.first])
        w2 = _float_stage(files, ordinary[fused.second])
        w1_int, s1 = quantize_weight(w1, ring)
        w2_int, s2 = quantize_weight(fused_matrix(w1, w2, fused.centered), ring)
        yield fused, [(w1.shape[1], w1_int), (w1.shape[1] + w1.shape[0], w2_int)], torch.cat([s1, s2])
