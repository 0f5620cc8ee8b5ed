"""Fetching EE checkpoints: a client downloads only its files, a server only the weights.

Both honour `revision`, `cache_dir`, `token` and offline mode (`HF_HUB_OFFLINE=1` or
`local_files_only=True`) the way transformers does, through `huggingface_hub.snapshot_download`.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from .checkpoint import CLIENT_SHARD, INDEX_FILE, SCALES_FILE
from .errors import CheckpointError

CLIENT_PATTERNS = [
    "config.json",
    "generation_config.json",
    INDEX_FILE,
    CLIENT_SHARD,
    SCALES_FILE,
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template*",
]
SERVER_PATTERNS = ["config.json", INDEX_FILE, "model-server-*.safetensors", "model.safetensors"]


def _resolve(name_or_path, patterns, revision, cache_dir, token, local_files_only) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"{name_or_path} is not a checkpoint folder")
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    try:
        folder = snapshot_download(
            str(name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=bool(offline),
            allow_patterns=patterns,
        )
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"{name_or_path} is not in the local Hub cache and offline mode is on; run once online or pass a folder"
        ) from err
    except (HfHubHTTPError, ValueError, OSError) as err:
        raise CheckpointError(f"could not fetch {name_or_path} from the Hub: {err}") from err
    return Path(folder)


def resolve_client_files(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local folder with the client's files of an EE checkpoint (downloading only those when needed)."""
    return _resolve(name_or_path, CLIENT_PATTERNS, revision, cache_dir, token, local_files_only)


def resolve_server_files(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local folder with the server's files of an EE checkpoint (config and stage weights)."""
    return _resolve(name_or_path, SERVER_PATTERNS, revision, cache_dir, token, local_files_only)
