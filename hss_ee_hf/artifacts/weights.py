"""Reading an EE checkpoint's stage weights: one stage in memory at a time, quantised for the ring.

The share server's engine, the client's Freivalds verifier and the converter's self-check all read the stage
weights through [`iter_stage_weights`], so they agree on part order and quantisation by construction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..ring.fixed_point import RingConfig, quantize_weight
from .checkpoint import INDEX_FILE
from .layouts import stage_layout
from .stages import Stage, stage_matrix


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index (or the single `model.safetensors`)."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{folder} has neither {INDEX_FILE} nor model.safetensors")
    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}


def iter_stage_weights(
    folder: str | os.PathLike, config, ring: RingConfig, progress: bool = False
) -> Iterator[tuple[Stage, torch.Tensor, torch.Tensor]]:
    """Yields `(stage, w_int, scale)` for every stage of an EE checkpoint, one stage in memory at a time.

    Args:
        folder (`str` or `os.PathLike`): the EE checkpoint folder.
        config (`PretrainedConfig`): its config.
        ring (`RingConfig`): quantisation parameters.
        progress (`bool`, *optional*): show a progress bar.
    """
    folder = Path(folder)
    files = weight_files(folder)
    layout = stage_layout(config)
    for stage in tqdm(layout, desc="Loading stage weights", disable=not progress, unit="stage"):
        parts = []
        for part in stage.parts:
            if part.weight not in files:
                raise CheckpointError(f"{folder} lacks tensor {part.weight} needed by stage {stage.name}")
            with safe_open(str(files[part.weight]), "pt") as f:
                t = f.get_tensor(part.weight)
            parts.append(stage_matrix(part, t))
        w_int, scale = quantize_weight(torch.cat(parts, dim=0), ring)
        yield stage, w_int, scale


def iter_stage_shapes(folder: str | os.PathLike, config) -> Iterator[tuple[Stage, tuple[int, int]]]:
    """Yields `(stage, (out_features, in_features))` for every stage, from the safetensors headers alone.

    A server uses it to place stages on devices before it reads a single weight.

    Args:
        folder (`str` or `os.PathLike`): the EE checkpoint folder.
        config (`PretrainedConfig`): its config.
    """
    folder = Path(folder)
    files = weight_files(folder)
    for stage in stage_layout(config):
        out_features, in_features = 0, 0
        for part in stage.parts:
            if part.weight not in files:
                raise CheckpointError(f"{folder} lacks tensor {part.weight} needed by stage {stage.name}")
            with safe_open(str(files[part.weight]), "pt") as f:
                shape = f.get_slice(part.weight).get_shape()
            rows, in_features = stage_matrix(part, torch.empty(shape, device="meta")).shape
            out_features += rows
        yield stage, (out_features, in_features)
