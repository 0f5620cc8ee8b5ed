"""Checks of a share server's options and files before anything is loaded, each failing with a typed error.

`hss-ee serve` validates its flags with argparse; these checks make the same promises to callers of
[`StageEngine`] and `serve()` from Python, and turn a bad `config.json` or device into a message that names it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoConfig

from ..errors import CheckpointError, InvalidConfigError

DEFAULT_MAX_ROWS = 8192


def check_engine_options(max_rows: object, batch_window_ms: object) -> None:
    """Refuses a non-positive `max_rows` and a negative or non-finite `batch_window_ms`.

    Raises:
        `InvalidConfigError`: naming the option (and its flag), the value and the allowed range.
    """
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise InvalidConfigError(
            f"max_rows (`--max-rows`) must be a positive integer, got {max_rows!r}; omit it for the default "
            f"({DEFAULT_MAX_ROWS}, lowered to fit the widest stage)"
        )
    if not isinstance(batch_window_ms, (int, float)) or not math.isfinite(batch_window_ms) or batch_window_ms < 0:
        raise InvalidConfigError(
            f"batch_window_ms (`--batch-window-ms`) must be a finite number >= 0, got {batch_window_ms!r}; "
            "0 turns batching off"
        )


def resolve_device(device: str) -> torch.device:
    """`"auto"` -> CUDA when present else CPU; refuses a CUDA device this machine does not have.

    Raises:
        `InvalidConfigError`: an unknown device string, or `cuda`/`cuda:N` without that GPU.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidConfigError(
            f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto ({err})"
        ) from err
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidConfigError(
                f"--device {device} asks for a GPU but torch sees none (torch {torch.__version__}, CUDA "
                f"{torch.version.cuda or 'not built in'}); use --device cpu, or auto to pick a GPU when there is one"
            )
        if resolved.index is not None and resolved.index >= count:
            raise InvalidConfigError(
                f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}; pick one of them"
            )
    elif resolved.type != "cpu":
        raise InvalidConfigError(f"--device {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    return resolved


def load_server_config(folder: Path):
    """Loads `config.json` of an EE checkpoint, naming the file when it is missing or not valid JSON.

    Raises:
        `CheckpointError`: the file is missing, unreadable, not JSON, or not a config transformers knows.
    """
    path = Path(folder) / "config.json"
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return AutoConfig.from_pretrained(folder)
    except FileNotFoundError as err:
        raise CheckpointError(
            f"{path} does not exist; pass the EE checkpoint folder written by `hss-ee convert`"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); restore it from the EE checkpoint") from err
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{path} cannot be loaded by transformers ({err}); restore it from the EE checkpoint"
        ) from err
