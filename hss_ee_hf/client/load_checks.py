"""Typed errors for what a client can find wrong in its copy of an EE checkpoint.

A damaged or edited client folder (a truncated or missing client shard, a `config.json` that is not JSON or whose
`hidden_size` / `vocab_size` was changed) would otherwise surface as a raw `SafetensorError`, `OSError` or
`RuntimeError` from safetensors, transformers or torch that does not name the file. These helpers name it and say
what to do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from ..errors import CheckpointError

_AGAIN = "download or copy the EE checkpoint again"


def load_client_config(folder: str | os.PathLike, **kwargs):
    """`AutoConfig.from_pretrained(folder, return_unused_kwargs=True)`, naming `config.json` when it is missing or
    invalid.

    Returns:
        `(config, unused)`: the config and the keywords that are no field of it.

    Raises:
        `CheckpointError`: the file is missing, not JSON, or not a config transformers can load.
    """
    path = Path(folder) / "config.json"
    try:
        return AutoConfig.from_pretrained(folder, return_unused_kwargs=True, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} cannot be loaded ({err}); restore it, or {_AGAIN}") from err


@contextlib.contextmanager
def open_shard(path: Path) -> Iterator:
    """`safe_open(path)`, naming the file when it is missing, truncated or not safetensors.

    Raises:
        `CheckpointError`: the file cannot be opened or a tensor in it cannot be read.
    """
    try:
        handle = safe_open(str(path), "pt")
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing; {_AGAIN}") from err
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}): it is truncated or damaged; {_AGAIN}") from err
    try:
        with handle as f:
            yield f
    except SafetensorError as err:
        raise CheckpointError(f"{path} cannot be read ({err}): it is truncated or damaged; {_AGAIN}") from err


def check_vocab(config, embedding: torch.Tensor, key_size: int, folder: str | os.PathLike) -> None:
    """Checks `config.vocab_size` against the client shard's embedding and the key's permutation.

    Raises:
        `CheckpointError`: the three disagree (e.g. `vocab_size` edited in `config.json`).
    """
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and not vocab == embedding.shape[0] == key_size:
        raise CheckpointError(
            f"{Path(folder) / 'config.json'} says vocab_size={vocab}, but the client shard's embedding has "
            f"{embedding.shape[0]} rows and the key permutes {key_size} tokens; restore the config.json written by "
            f"`hss-ee convert`, or {_AGAIN}"
        )


def load_client_state(model: torch.nn.Module, client: dict[str, torch.Tensor], folder: str | os.PathLike):
    """`model.load_state_dict(client, strict=False, assign=True)`, with a shape mismatch named as a config edit.

    Raises:
        `CheckpointError`: a tensor's shape differs from what `config.json` implies (e.g. `hidden_size` edited).
    """
    try:
        return model.load_state_dict(client, strict=False, assign=True)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:300])
        raise CheckpointError(
            f"the client shard does not fit {Path(folder) / 'config.json'} ({first}); the config was edited after "
            f"conversion (hidden_size, layer or head counts). Restore it, or {_AGAIN}"
        ) from err
