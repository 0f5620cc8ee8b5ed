"""Fetching EE checkpoints from the Hub: a client downloads only its files, a server only the weights.

An EE checkpoint (DESIGN.md §6) splits into what the client needs (config, generation config, the client
shard, the public scales, the tokenizer) and what a share server needs (config, index, server shards).
[`resolve_client_files`] and [`resolve_server_files`] download exactly one side through
`huggingface_hub.snapshot_download` with `allow_patterns`, so a client never fetches the transformer weights
and a server never fetches the embedding table or the tokenizer.

Both honour `revision`, `cache_dir`, `token` and offline mode (`HF_HUB_OFFLINE=1` or `local_files_only=True`)
the way transformers does. A local folder is returned as is.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import REGEX_COMMIT_HASH

from ..artifacts.checkpoint import CLIENT_SHARD, INDEX_FILE, SCALES_FILE, HSSEECheckpointInfo
from ..errors import CheckpointError

logger = logging.getLogger(__name__)

SINGLE_WEIGHTS_FILE = "model.safetensors"
CHAT_TEMPLATE_PATTERN = "additional_chat_templates/*.jinja"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "spiece.model",
    "preprocessor_config.json",
    "processor_config.json",
)
"""Tokenizer and image-processor files a converter may write; the client runs them, the servers never need them."""

CLIENT_PATTERNS = [
    "config.json",
    "generation_config.json",
    CLIENT_SHARD,
    SCALES_FILE,
    *TOKENIZER_FILES,
    CHAT_TEMPLATE_PATTERN,
]
"""What a client downloads: no index and no server shard (the client reads neither)."""

SERVER_PATTERNS = ["config.json", INDEX_FILE]
"""What a share server downloads first; then exactly the shards the index names (never the client shard)."""


def is_offline(local_files_only: bool | None = None) -> bool:
    """Whether Hub look-ups are disabled, as transformers decides it.

    Args:
        local_files_only (`bool`, *optional*): an explicit request for offline resolution.

    Returns:
        `True` when `local_files_only` is set, when `huggingface_hub` is in offline mode (`HF_HUB_OFFLINE` or
        `TRANSFORMERS_OFFLINE` at import time), or when `HF_HUB_OFFLINE` is set in the environment now.
    """
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(local_files_only) or constants.is_offline_mode() or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def _plain_names(names: set[str], source: str) -> set[str]:
    """File names a checkpoint's metadata points to, refused unless they are plain names in the folder."""
    for name in names:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise CheckpointError(f"{source} names the file {name!r}, which is not a plain file name; is it tampered?")
    return names


def _client_required(folder: Path) -> set[str]:
    info = HSSEECheckpointInfo.from_folder(folder)
    return _plain_names({info.client_shard, info.scales_file}, str(folder / "config.json"))


def _server_required(folder: Path) -> set[str]:
    info = HSSEECheckpointInfo.from_folder(folder)
    index = folder / INDEX_FILE
    if not index.exists():
        return {SINGLE_WEIGHTS_FILE}  # a single-file checkpoint (no index) holds everything in one file
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = set(weight_map.values()) - {info.client_shard}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
    return _plain_names(files, str(index))


def _download(repo_id: str, patterns: list[str], revision, cache_dir, token, offline: bool) -> Path:
    """`snapshot_download` with typed errors that say what to do."""
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=offline,
            allow_patterns=patterns,
        )
    except IncompleteSnapshotError as err:
        raise CheckpointError(
            f"the cached snapshot of {repo_id} (revision {revision or 'main'}) lacks some of the files needed "
            f"({err}); run once with network access (unset HF_HUB_OFFLINE) to complete it"
        ) from err
    except LocalEntryNotFoundError as err:
        if offline:
            raise CheckpointError(
                f"{repo_id} (revision {revision or 'main'}) is not in the local Hub cache and offline mode is on "
                "(HF_HUB_OFFLINE=1 or local_files_only=True); run once online, pass cache_dir=, or pass a folder"
            ) from err
        raise CheckpointError(
            f"could not reach the Hub for {repo_id} and it is not in the local cache: {err}. Check the network"
        ) from err
    except RevisionNotFoundError as err:
        raise CheckpointError(
            f"revision {revision!r} does not exist in {repo_id}; pass an existing branch, tag or commit"
        ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(
            f"{repo_id} was not found on the Hub, or it is private or gated: check the repo id, and pass token= "
            "(or run `hf auth login`) when it is private"
        ) from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"could not fetch {repo_id} from the Hub: {err}") from err
    except ValueError as err:  # HFValidationError: not a valid repo id
        raise CheckpointError(
            f"{repo_id!r} is neither a local folder nor a valid Hub repo id (`org/name`): {err}"
        ) from err
    except OSError as err:
        raise CheckpointError(f"could not fetch {repo_id} from the Hub: {err}") from err
    return Path(folder)


def _resolve(
    name_or_path: str | os.PathLike,
    patterns: list[str],
    required: Callable[[Path], set[str]],
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool | None,
) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"{name_or_path} is not a checkpoint folder (and not a Hub repo id)")
    repo_id, offline = str(name_or_path), is_offline(local_files_only)
    folder = _download(repo_id, patterns, revision, cache_dir, token, offline)
    missing = sorted(name for name in required(folder) if not (folder / name).is_file())
    if missing:
        # Files the checkpoint's own metadata names (the server shards, or a renamed client shard): fetch exactly
        # those, from the commit just resolved. With a commit hash, snapshot_download reuses the cached tree listing
        # and makes no further API call.
        commit = folder.name if REGEX_COMMIT_HASH.fullmatch(folder.name) else revision
        logger.info("fetching %d file(s) named by the checkpoint from %s", len(missing), repo_id)
        folder = _download(repo_id, [glob.escape(m) for m in missing], commit, cache_dir, token, offline)
        missing = sorted(name for name in required(folder) if not (folder / name).is_file())
    if missing:
        where = "in the local Hub cache (offline mode is on)" if offline else "in the repository"
        raise CheckpointError(
            f"{repo_id} lacks {', '.join(missing)} {where}; "
            + ("run once online to fetch them" if offline else "push the complete EE checkpoint again")
        )
    return folder


def resolve_client_files(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local folder with the client's files of an EE checkpoint, downloading only those when needed.

    The client's files are `config.json`, `generation_config.json`, the client shard, the public scales file
    and the tokenizer files ([`CLIENT_PATTERNS`]); the server shards are never downloaded.

    Args:
        name_or_path (`str` or `os.PathLike`): a local EE checkpoint folder (returned as is) or a Hub repo id.
        revision (`str`, *optional*): branch, tag or commit of the repo (defaults to `main`).
        cache_dir (`str` or `os.PathLike`, *optional*): the Hub cache folder (defaults to `HF_HUB_CACHE`).
        token (`str` or `bool`, *optional*): Hub token for a private repo (defaults to the stored login).
        local_files_only (`bool`, *optional*): use only the local cache; also on when `HF_HUB_OFFLINE=1`.

    Returns:
        `Path`: the folder (a snapshot folder of the Hub cache for a repo id).

    Raises:
        `CheckpointError`: not an EE checkpoint, not found, not cached while offline, or incomplete.

    Example:

    ```python
    >>> folder = resolve_client_files("org/smollm2-ee", revision="main")
    >>> sorted(p.name for p in folder.iterdir())  # no model-server-*.safetensors
    ```
    """
    return _resolve(name_or_path, CLIENT_PATTERNS, _client_required, revision, cache_dir, token, local_files_only)


def resolve_server_files(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local folder with a share server's files of an EE checkpoint: `config.json`, the index, the server shards.

    `config.json` and the index come first ([`SERVER_PATTERNS`]); then exactly the shards the index names, less
    the client shard. The client shard (embedding table), the scales file and the tokenizer are never downloaded,
    and neither is any stray shard the index does not name.

    Args:
        name_or_path (`str` or `os.PathLike`): a local EE checkpoint folder (returned as is) or a Hub repo id.
        revision (`str`, *optional*): branch, tag or commit of the repo (defaults to `main`).
        cache_dir (`str` or `os.PathLike`, *optional*): the Hub cache folder (defaults to `HF_HUB_CACHE`).
        token (`str` or `bool`, *optional*): Hub token for a private repo (defaults to the stored login).
        local_files_only (`bool`, *optional*): use only the local cache; also on when `HF_HUB_OFFLINE=1`.

    Returns:
        `Path`: the folder (a snapshot folder of the Hub cache for a repo id).

    Raises:
        `CheckpointError`: not an EE checkpoint, not found, not cached while offline, or incomplete.

    Example:

    ```python
    >>> from hss_ee_hf.server import StageEngine
    >>> engine = StageEngine(resolve_server_files("org/smollm2-ee"))
    ```
    """
    return _resolve(name_or_path, SERVER_PATTERNS, _server_required, revision, cache_dir, token, local_files_only)
