"""Load-time checks that the weights on disk are the weights the checkpoint's fingerprint names.

A share server announces the fingerprint from `config.json`, and clients trust it. A shard edited after conversion
(a layer's weights scaled, a file truncated or replaced) or a `config.json` whose layer count was changed would
otherwise be served under the original fingerprint and produce wrong text. [`verify_checkpoint`] recomputes the
fingerprint from the tensors themselves, streaming one tensor at a time, and checks that the stage layout the
config implies uses exactly the server tensors the index lists.

The converter records every tensor's digest in the index (`metadata.hss_ee_tensor_digests`). With them, a server
that holds only its own shards (a Hub download never fetches the client shard) still recomputes the whole
fingerprint and names the shard and tensor that differ. Checkpoints converted before the digests were recorded are
checked as a whole when the client shard is present.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .checkpoint import INDEX_FILE, HSSEECheckpointInfo, combine_digests, short, tensor_digest
from .layouts import server_tensor_names

logger = logging.getLogger(__name__)

DIGESTS_KEY = "hss_ee_tensor_digests"
_SKIP = "start the server with `--trust-checkpoint` only if you changed the checkpoint on purpose"


def _index(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """`(weight_map, recorded digests)` of the index; a single `model.safetensors` maps every tensor to itself."""
    index = folder / INDEX_FILE
    if not index.exists():
        single = folder / "model.safetensors"
        return {name: single.name for name in _keys(single)}, {}
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = dict(data["weight_map"])
        digests = dict((data.get("metadata") or {}).get(DIGESTS_KEY) or {})
        for value in digests.values():
            bytes.fromhex(value)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{index} is not a valid safetensors index ({err}); copy the checkpoint again") from err
    return weight_map, digests


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), "pt") as f:
            return list(f.keys())
    except FileNotFoundError as err:
        raise CheckpointError(f"the shard {file} is missing; copy the whole EE checkpoint folder again") from err
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"the shard {file} cannot be read ({err}); it is truncated or not a safetensors file. Copy the EE "
            "checkpoint again"
        ) from err


def file_digests(file: Path, names: list[str] | None = None) -> dict[str, bytes]:
    """Digests of the tensors in one safetensors file (all, or `names`), one tensor in memory at a time.

    Raises:
        `CheckpointError`: naming the file when it is missing, truncated or lacks a tensor.
    """
    out: dict[str, bytes] = {}
    try:
        with safe_open(str(file), "pt") as f:
            present = set(f.keys())
            for name in names if names is not None else sorted(present):
                if name not in present:
                    raise CheckpointError(f"the shard {file} lacks tensor {name} that the index places there")
                out[name] = tensor_digest(name, f.get_tensor(name))
    except FileNotFoundError as err:
        raise CheckpointError(f"the shard {file} is missing; copy the whole EE checkpoint folder again") from err
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"the shard {file} cannot be read ({err}); it is truncated or not a safetensors file. Copy the EE "
            "checkpoint again"
        ) from err
    return out


def check_stage_layout(folder: Path, config, weight_map: dict[str, str], client_shard: str) -> None:
    """Checks the server tensors the index lists are exactly those the config's stage layout uses.

    Raises:
        `CheckpointError`: e.g. `num_hidden_layers` lowered in `config.json` (layers left unused) or raised (tensors
            missing), naming the tensors and the config.
    """
    listed = {name for name, file in weight_map.items() if file != client_shard}
    needed = server_tensor_names(config)
    unused, missing = sorted(listed - needed), sorted(needed - listed)
    if not (folder / INDEX_FILE).exists():
        unused = []  # one model.safetensors holds the client tensors too: only missing ones can be told apart
    if unused or missing:
        what = f"leaves {unused[:3]} unused" if unused else f"needs {missing[:3]}, which the index lacks"
        raise CheckpointError(
            f"{folder / 'config.json'} does not match the checkpoint's weights: its stage layout "
            f"({getattr(config, 'num_hidden_layers', '?')} layers) {what}. Restore the config.json written by "
            f"`hss-ee convert`, or {_SKIP}"
        )


def verify_checkpoint(
    folder: str | Path, config, info: HSSEECheckpointInfo, progress: Callable[[str], None] | None = None
) -> bool:
    """Recomputes an EE checkpoint's fingerprint from its weights and checks its stage layout against its config.

    Args:
        folder (`str` or `Path`): the EE checkpoint folder (a server's copy may lack the client shard).
        config (`PretrainedConfig`): its loaded config.
        info (`HSSEECheckpointInfo`): its `hss_ee` block (the fingerprint to match).
        progress (`Callable[[str], None]`, *optional*): called with each shard's name as it is hashed.

    Returns:
        `bool`: `True` when the fingerprint was recomputed, `False` when it could not be (an old checkpoint without
        recorded digests and without its client shard); the layout is checked either way.

    Raises:
        `CheckpointError`: a shard is missing, truncated or edited (named), or the config does not match the weights.
    """
    folder = Path(folder)
    weight_map, recorded = _index(folder)
    check_stage_layout(folder, config, weight_map, info.client_shard)
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    if not recorded and not (folder / info.client_shard).exists():
        logger.warning(
            "%s records no tensor digests and lacks its client shard: its fingerprint cannot be recomputed here. "
            "Convert it again with this hss-ee-hf to have the weights checked at load",
            folder,
        )
        return False
    digests: dict[str, bytes] = {}
    for file in sorted(by_file):
        if recorded and file == info.client_shard:
            continue  # the server never needs the client shard: its digests are in the index
        if progress is not None:
            progress(file)
        computed = file_digests(folder / file, sorted(by_file[file]))
        for name, digest in computed.items():
            if recorded and recorded.get(name) != digest.hex():
                raise CheckpointError(
                    f"the shard {folder / file} was changed after conversion: tensor {name} does not match the "
                    f"digest recorded in {INDEX_FILE}. Copy the EE checkpoint again, or {_SKIP}"
                )
        digests.update(computed)
    if recorded:
        digests.update({n: bytes.fromhex(d) for n, d in recorded.items() if weight_map.get(n) == info.client_shard})
    fingerprint = combine_digests(digests)
    if fingerprint != info.fingerprint:
        raise CheckpointError(
            f"the weights in {folder} have fingerprint {short(fingerprint)}, but its config.json says "
            f"{short(info.fingerprint)}: a shard or the index was changed after conversion. Copy the EE checkpoint "
            f"again, or {_SKIP}"
        )
    return True
