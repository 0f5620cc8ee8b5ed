"""Placing a share server's stage weights on devices: whole stages, in layer order, by cumulative bytes.

Weights larger than one GPU (DESIGN.md §9): `hss-ee serve --device cuda` fills the first GPU with stages in the
checkpoint's order until the next stage would not fit, then the next GPU, and so on; each stage's product runs where
its weight lives (the share moves there, the output share comes back to the host). Stages are never split, so a
stage is one product on one device, and a decode step walks the GPUs in order, as pipeline placement does.

The plan is made from the checkpoint's shapes before a single weight is read, so a model that cannot fit is refused
at once with what it needs and what there is, instead of failing with an out-of-memory error halfway through loading.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts.weights import iter_stage_shapes, iter_stage_weights
from ..errors import DevicePlacementError
from ..ring.fixed_point import RingConfig
from ..ring.matmul import RingWeight, held_bytes
from ..ring.native import kernel_choice

logger = logging.getLogger(__name__)
# Kept free on every GPU for what a product allocates besides its weight: the share's limbs and the int32 partial
# sums (bounded by `hss_ee_hf.ring.int8._CHUNK_BYTES`), CUDA's context and cuBLAS workspaces.
DEFAULT_HEADROOM_BYTES = 2 << 30


@dataclass(frozen=True)
class StagePlacement:
    """Where each stage's weight lives.

    Attributes:
        devices (`dict[str, str]`): stage name -> device (`"cpu"`, `"cuda:0"`, ...), in stage order.
        stage_bytes (`dict[str, int]`): stage name -> bytes its weight holds.
    """

    devices: dict[str, str]
    stage_bytes: dict[str, int]

    def summary(self) -> list[dict]:
        """Per device, in order: `{"device", "stages", "first", "last", "bytes"}`: the per-stage split, for reports."""
        out: list[dict] = []
        for stage, device in self.devices.items():
            if not out or out[-1]["device"] != device:
                out.append({"device": device, "stages": 0, "first": stage, "last": stage, "bytes": 0})
            out[-1]["stages"] += 1
            out[-1]["last"] = stage
            out[-1]["bytes"] += self.stage_bytes[stage]
        return out


def plan_placement(stage_bytes: Sequence[tuple[str, int]], capacities: Sequence[tuple[str, int]]) -> StagePlacement:
    """Assigns whole stages, in order, to devices in order: each device takes stages until the next would not fit.

    Args:
        stage_bytes (`Sequence[tuple[str, int]]`): `(stage name, bytes held)` in the checkpoint's stage order.
        capacities (`Sequence[tuple[str, int]]`): `(device, usable bytes)` in the order to fill them.

    Returns:
        [`StagePlacement`].

    Raises:
        `DevicePlacementError`: a stage fits on no remaining device (the message gives the total needed and the
            total usable, and what to do).

    Example:

    ```python
    >>> plan_placement([("a", 6), ("b", 6), ("c", 3)], [("cuda:0", 10), ("cuda:1", 10)]).devices
    {'a': 'cuda:0', 'b': 'cuda:1', 'c': 'cuda:1'}
    ```
    """
    if not capacities:
        raise DevicePlacementError("no device to place stages on; pass --device cpu or make a GPU visible")
    devices: dict[str, str] = {}
    index, used = 0, 0
    for stage, size in stage_bytes:
        while index < len(capacities) and used + size > capacities[index][1]:
            index, used = index + 1, 0
        if index == len(capacities):
            total = sum(size for _, size in stage_bytes)
            usable = sum(cap for _, cap in capacities)
            names = ", ".join(f"{dev} {cap / 2**30:.1f} GiB" for dev, cap in capacities)
            raise DevicePlacementError(
                f"the model's stage weights need {total / 2**30:.2f} GiB but the devices offer {usable / 2**30:.2f} "
                f"GiB usable ({names}; stage {stage!r} of {size / 2**30:.2f} GiB fits on none left); add GPUs, "
                "free GPU memory, use the 2-byte int8 kernel (--kernel int8), or serve with --device cpu"
            )
        devices[stage] = capacities[index][0]
        used += size
    return StagePlacement(devices, dict(stage_bytes))


def device_capacities(device: str, headroom_bytes: int = DEFAULT_HEADROOM_BYTES) -> list[tuple[str, int]]:
    """Usable bytes per GPU: `"cuda"` means every visible GPU, `"cuda:N"` that one; free memory less a headroom.

    Raises:
        `DevicePlacementError`: CUDA is not available, or `device` names no visible GPU.
    """
    if not torch.cuda.is_available():
        raise DevicePlacementError(f"--device {device} asks for CUDA, which this torch build or machine lacks")
    count = torch.cuda.device_count()
    parsed = torch.device(device)
    indices = range(count) if parsed.index is None else [parsed.index]
    if parsed.index is not None and parsed.index >= count:
        raise DevicePlacementError(f"--device {device}: only {count} GPU(s) are visible (cuda:0 .. cuda:{count - 1})")
    return [(f"cuda:{i}", max(torch.cuda.mem_get_info(i)[0] - headroom_bytes, 0)) for i in indices]


def _gpu_kernel(kernel: str | None) -> str:
    """The kernel [`RingWeight`] holds a CUDA weight for: int8 unless float64 is asked for (native is CPU-only)."""
    choice = kernel_choice(kernel)
    return "float64" if choice in ("float64", "native") else "int8"


def load_stage_weights(
    folder: str | os.PathLike,
    config,
    ring: RingConfig,
    device: torch.device,
    kernel: str | None = None,
    progress: bool = False,
    capacities: Sequence[tuple[str, int]] | None = None,
) -> tuple[dict[str, RingWeight], StagePlacement]:
    """Loads every stage weight of an EE checkpoint onto `device`, spread over GPUs when `device` is CUDA.

    Args:
        folder (`str` or `os.PathLike`): the EE checkpoint folder.
        config (`PretrainedConfig`): its config.
        ring (`RingConfig`): quantisation parameters.
        device (`torch.device`): `cpu`, `cuda` (every visible GPU) or `cuda:N`.
        kernel (`str`, *optional*): the ring kernel (see [`RingWeight`]).
        progress (`bool`, *optional*): show a progress bar.
        capacities (`Sequence[tuple[str, int]]`, *optional*): usable bytes per device instead of the GPUs' free
            memory (tests; a deliberate cap).

    Returns:
        `(weights, placement)`: stage name -> [`RingWeight`], and the [`StagePlacement`].

    Raises:
        `DevicePlacementError`: the weights do not fit (raised before any weight is read).
    """
    folder = Path(folder)
    if device.type == "cpu" and capacities is None:
        placement = None
    else:
        held_kernel = _gpu_kernel(kernel) if device.type == "cuda" else kernel_choice(kernel)
        sizes = [
            (stage.name, held_bytes(out_f, in_f, held_kernel, device))
            for stage, (out_f, in_f) in iter_stage_shapes(folder, config)
        ]
        placement = plan_placement(sizes, capacities if capacities is not None else device_capacities(str(device)))
    weights: dict[str, RingWeight] = {}
    for stage, w_int, _ in iter_stage_weights(folder, config, ring, progress=progress):
        target = placement.devices[stage.name] if placement is not None else device
        weights[stage.name] = RingWeight(w_int, device=target, kernel=kernel)
    if placement is None:
        placement = StagePlacement({n: str(device) for n in weights}, {n: w.nbytes for n, w in weights.items()})
    for part in placement.summary():
        logger.info("%s holds %d stages (%s .. %s), %.2f GiB", *part.values())
    return weights, placement
