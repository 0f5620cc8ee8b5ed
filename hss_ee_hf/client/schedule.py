"""Choosing stages per decoder layer: 4 (ordinary stages) or 2 (fused stages, half the round trips).

One decode step costs `R·(RTT + c) + T_compute` (DESIGN.md §8). The two-stage schedule halves `R` and multiplies the
servers' work by ≈ 1.9×, so it wins whenever a round trip costs more than the extra multiply-adds: nearly always once
the servers are in another zone. `stages_per_layer="auto"` measures both terms at connect time and picks.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from ..artifacts.fused import SCHEDULES, stages_per_token, two_stage_layout
from ..artifacts.stages import FAMILIES
from ..errors import ScheduleUnavailableError, UnsupportedArchitectureError
from .fused_forward import patch_layers, register_fused_stages
from .stage_client import StageClient

logger = logging.getLogger(__name__)
PROBES = 3


def family_of(config) -> str | None:
    """The family name of a config's `model_type` (`"llama"`, `"gpt2"`, ...), or `None`."""
    return next((f for f, types in FAMILIES.items() if config.model_type in types), None)


def check_request(stages_per_layer) -> None:
    """Raises `ValueError` for anything but 4, 2 or `"auto"`."""
    if stages_per_layer != "auto" and stages_per_layer not in SCHEDULES:
        raise ValueError(f"stages_per_layer must be 4, 2 or 'auto', got {stages_per_layer!r}")


def offered(config, infos) -> tuple[int, ...]:
    """Schedules both servers offer for this model (4 always; 2 when both build fused stages for its family)."""
    try:
        two_stage_layout(config)
    except UnsupportedArchitectureError:
        return (4,)
    both = set.intersection(*(set(info.get("schedules", (4,))) for info in infos)) if infos else {4}
    return tuple(s for s in SCHEDULES if s in both or s == 4)


def _macs(config, stages: dict[str, tuple[int, int]], schedule: int) -> int:
    """Server multiply-adds of one decode row under a schedule, from the servers' stage widths."""
    n = config.num_hidden_layers
    if schedule == 4:
        names = [name for name in stages if name.startswith("layers.") or name == "lm_head"]
        names = [m for m in names if m.rsplit(".", 1)[-1] in ("qkv", "o", "up", "down") or m == "lm_head"]
    else:
        names = ["layers.0.qkv", f"layers.{n - 1}.down", "lm_head"] + [f.name for f in two_stage_layout(config)]
    return sum(stages[m][0] * stages[m][1] for m in names)


def _timed(client: StageClient, stage: str) -> float:
    x = torch.zeros(1, client.in_features[stage])
    start = time.perf_counter()
    client.run(stage, x)
    return time.perf_counter() - start


def choose_auto(client: StageClient, config, infos) -> tuple[int, dict[int, float]]:
    """Measures a round trip and the servers' speed, and predicts one decode step's time under each schedule.

    A one-row call of the narrowest stage (`layers.0.o`) is almost all round trip (`RTT + c`); a one-row call of the
    widest fused stage adds its multiply-adds, which gives the servers' time per multiply-add. Both are the median of
    a few calls.

    Args:
        client (`StageClient`): connected, with the fused stages installed.
        config (`PretrainedConfig`): the model's config.
        infos (`tuple[dict, dict]`): the servers' `describe()` answers.

    Returns:
        `(stages_per_layer, predicted seconds per token for each schedule)`.
    """
    stages = infos[0]["stages"]
    big = max((f.name for f in two_stage_layout(config)), key=lambda m: stages[m][0] * stages[m][1])
    small = "layers.0.o"
    t_small = statistics.median(_timed(client, small) for _ in range(PROBES))
    t_big = statistics.median(_timed(client, big) for _ in range(PROBES))
    extra = stages[big][0] * stages[big][1] - stages[small][0] * stages[small][1]
    per_mac = max(t_big - t_small, 0.0) / max(extra, 1)
    predicted = {
        s: stages_per_token(config, s) * t_small + _macs(config, stages, s) * per_mac for s in (4, 2)
    }  # t_small already holds one small stage's compute: a slight overestimate for both
    client.stats.reset()
    choice = min(predicted, key=predicted.get)
    logger.info(
        "stages_per_layer=auto: round trip %.2f ms, predicted %.1f ms/token with 4 stages, %.1f with 2: using %d",
        t_small * 1e3,
        predicted[4] * 1e3,
        predicted[2] * 1e3,
        choice,
    )
    return choice, predicted


def require(config, infos, stages_per_layer: int) -> None:
    """Raises `ScheduleUnavailableError` when `stages_per_layer` is not offered for this model by both servers."""
    available = offered(config, infos)
    if stages_per_layer not in available:
        raise ScheduleUnavailableError(
            f"stages_per_layer={stages_per_layer} is not available for this {config.model_type} model with these "
            f"servers (offered: {available}); start both servers with `hss-ee serve --schedules 4,2` (decoder LLMs "
            "of the Llama and GPT-2 families) or use stages_per_layer=4"
        )


def apply_schedule(model, requested, infos) -> int:
    """Sets up a connected client model for `stages_per_layer=requested` (4, 2 or `"auto"`).

    Args:
        model (`PreTrainedModel`): the client model after its remote layers were attached.
        requested (`int` or `str`): 4, 2 or `"auto"` (2 when the servers offer it and it is predicted faster).
        infos (`tuple[dict, dict]`): both servers' `describe()` answers.

    Returns:
        `int`: the schedule in use.

    Raises:
        `ScheduleUnavailableError`: 2 was asked for and a server (or the model's family) does not offer it.
    """
    check_request(requested)
    config, client = model.config, model.hss_ee_client
    if requested == 4 or (requested == "auto" and 2 not in offered(config, infos)):
        return 4
    require(config, infos, 2)
    register_fused_stages(client, config, infos)
    if requested == "auto" and choose_auto(client, config, infos)[0] == 4:
        return 4
    patch_layers(model, family_of(config), client)
    return 2
