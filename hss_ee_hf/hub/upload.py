"""`hss-ee push`: upload an EE checkpoint folder to the Hub with a model card, never the secret key.

The client model holds no weights, so pushing works on the checkpoint folder that `hss-ee convert` wrote.
[`plan_push`] decides everything before any network call: it refuses a folder holding anything that looks like
a key (by name or by content) or anything that is not part of an EE checkpoint, checks the checkpoint is complete,
renders `README.md` from `model_cards/ee_model_card.md`, and lists the exact files. [`push_to_hub`] then creates
the repo and uploads exactly that list in one commit through `HfApi`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from ..artifacts.checkpoint import INDEX_FILE, HSSEECheckpointInfo
from ..artifacts.key import KEY_KIND
from ..errors import CheckpointError, HubUploadError, PushRefusedError
from .download import CHAT_TEMPLATE_PATTERN, TOKENIZER_FILES, is_offline
from .model_card import LIBRARY_NAME, README, library_version, render_card

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class PushPlan:
    """Exactly what [`push_to_hub`] uploads.

    Args:
        folder (`Path`): the EE checkpoint folder.
        repo_id (`str`): the target repo.
        files (`dict[str, Path]`): path in the repo -> local file, for every checkpoint file but `README.md`.
        model_card (`str`): the rendered `README.md`.
        fingerprint (`str`): the checkpoint's fingerprint.
        format_version (`int`): the checkpoint's EE format version.
        replaced_readme (`bool`): the folder held a `README.md`, which the rendered card replaces in the upload.
    """

    folder: Path
    repo_id: str
    files: dict[str, Path]
    model_card: str
    fingerprint: str
    format_version: int
    replaced_readme: bool = field(default=False, repr=False)

    @property
    def paths_in_repo(self) -> list[str]:
        """Every path the commit adds, sorted (`README.md` included)."""
        return sorted([*self.files, README])

    def operations(self) -> list[CommitOperationAdd]:
        """The commit operations: one `CommitOperationAdd` per file (the card from memory)."""
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in self.files.items()]
        ops.append(CommitOperationAdd(path_in_repo=README, path_or_fileobj=self.model_card.encode("utf-8")))
        return sorted(ops, key=lambda op: op.path_in_repo)


def _safetensors_header(path: Path) -> dict | None:
    """The JSON header of a safetensors file, or `None` when `path` is not one (reads only the header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            length = int.from_bytes(head, "little")
            if length < 2 or length > min(os.fstat(f.fileno()).st_size - 8, _MAX_HEADER_BYTES):
                return None
            raw = f.read(length)
    except OSError as err:
        raise PushRefusedError(f"cannot read {path} to check it is not a key: {err.strerror}") from err
    if not raw.lstrip().startswith(b"{"):
        return None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def _key_reason(path: Path, rel: str) -> str | None:
    """Why `path` looks like an EE key, or `None`."""
    name = rel.lower()
    if name.endswith(f".{KEY_KIND}"):
        return f"named like a key file (*.{KEY_KIND})"
    if "key" in name:
        return "its name contains 'key'"
    header = _safetensors_header(path)
    if header is None:
        return None
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and meta.get("kind") == KEY_KIND:
        return f"it is an hss-ee key (safetensors with kind={KEY_KIND} metadata)"
    if "vocab_perm" in header:
        return "it holds a `vocab_perm` tensor, like an hss-ee key"
    return None


def _walk(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Regular files under `folder` (relative POSIX path -> path) and entries that are neither files nor folders."""
    files: dict[str, Path] = {}
    odd: list[str] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        root_path = Path(root)
        for d in dirs:
            if (root_path / d).is_symlink():
                odd.append((root_path / d).relative_to(folder).as_posix() + "/")
        for name in names:
            path = root_path / name
            rel = path.relative_to(folder).as_posix()
            if path.is_file():  # follows symlinks to files (a Hub snapshot is made of them)
                files[rel] = path
            else:
                odd.append(rel)
    return files, odd


def _refusal(folder: Path, found: dict[str, str], what: str, advice: str) -> PushRefusedError:
    lines = "\n".join(f"  - {rel}: {why}" for rel, why in sorted(found.items()))
    return PushRefusedError(f"refusing to push {folder}: it contains {what}:\n{lines}\n{advice} Nothing was uploaded.")


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if not index.is_file():
        raise CheckpointError(f"{folder} has no {INDEX_FILE}: it is not a complete EE checkpoint; convert it again")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has a malformed weight_map; convert the model again")
    return weight_map


def checkpoint_files(folder: str | os.PathLike) -> tuple[dict[str, Path], HSSEECheckpointInfo, dict[str, str]]:
    """The files of an EE checkpoint folder that may be published, after checking the folder is safe to push.

    Allowed are `config.json`, `generation_config.json`, the index, the shards it names, the scales file, the
    tokenizer files and `README.md`; nothing else.

    Args:
        folder (`str` or `os.PathLike`): the EE checkpoint folder.

    Returns:
        `(files, info, weight_map)`: path in the repo -> local file (without `README.md`), the `hss_ee` block and
        the index's weight map.

    Raises:
        `PushRefusedError`: the folder holds a key, something that looks like one, or a file that is not part of an
            EE checkpoint.
        `CheckpointError`: the folder is not an EE checkpoint, or it is incomplete.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass the EE checkpoint folder written by `hss-ee convert`")
    found, odd = _walk(folder)
    keys = {rel: why for rel, path in found.items() if (why := _key_reason(path, rel)) is not None}
    if keys:
        raise _refusal(
            folder,
            keys,
            "what looks like a secret EE key",
            "The key must never be uploaded: move it out of the checkpoint folder (e.g. beside it) and push again.",
        )
    info = HSSEECheckpointInfo.from_folder(folder)
    weight_map = _weight_map(folder)
    shards = set(weight_map.values()) | {info.client_shard}
    allowed = {"config.json", "generation_config.json", INDEX_FILE, info.scales_file, README, *TOKENIZER_FILES}
    allowed |= shards

    def is_allowed(rel: str) -> bool:
        return rel in allowed or (rel.count("/") == 1 and fnmatch.fnmatchcase(rel, CHAT_TEMPLATE_PATTERN))

    unknown = {rel: "not part of an EE checkpoint" for rel in found if not is_allowed(rel)}
    unknown.update(dict.fromkeys(odd, "not a regular file"))
    if unknown:
        raise _refusal(
            folder,
            unknown,
            "files that are not part of an EE checkpoint",
            "Only the config, generation config, index, shards, scales file, tokenizer files and README.md are "
            "published: move anything else out of the folder and push again.",
        )
    required = {"config.json", INDEX_FILE, info.scales_file, *shards}
    missing = sorted(rel for rel in required if rel not in found)
    if missing:
        raise CheckpointError(f"{folder} is incomplete: {', '.join(missing)} missing; convert the model again")
    scales_meta = (_safetensors_header(found[info.scales_file]) or {}).get("__metadata__") or {}
    if scales_meta.get("fingerprint") != info.fingerprint:
        raise CheckpointError(
            f"{info.scales_file} in {folder} belongs to another checkpoint than config.json; convert the model again"
        )
    files = {rel: found[rel] for rel in sorted(found) if rel != README}
    return files, info, weight_map


def _plan(folder, repo_id, base_model, license, revision, template) -> PushPlan:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushRefusedError(f"{repo_id!r} is not a valid Hub repo id (`org/name` or `name`): {err}") from err
    files, info, weight_map = checkpoint_files(folder)
    folder = Path(folder).expanduser().resolve()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = render_card(folder, repo_id, config, info, weight_map, files, base_model, license, revision, template)
    return PushPlan(
        folder=folder,
        repo_id=repo_id,
        files=files,
        model_card=text,
        fingerprint=info.fingerprint,
        format_version=info.format_version,
        replaced_readme=(folder / README).exists(),
    )


def plan_push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    license: str | None = None,
    revision: str | None = None,
    template: str | os.PathLike | None = None,
) -> PushPlan:
    """Checks an EE checkpoint folder and returns exactly what [`push_to_hub`] would upload; no network call.

    Args:
        folder (`str` or `os.PathLike`): the EE checkpoint folder written by `hss-ee convert`.
        repo_id (`str`): the target repo.
        base_model, license, revision, template: as in [`render_model_card`].

    Returns:
        [`PushPlan`].

    Raises:
        `PushRefusedError`: the folder holds a key, something that looks like one, or a non-checkpoint file.
        `CheckpointError`: the folder is not a complete EE checkpoint.
    """
    return _plan(folder, repo_id, base_model, license, revision, template)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    template: str | os.PathLike | None = None,
    api: HfApi | None = None,
):
    """Uploads an EE checkpoint folder to the Hub with a rendered model card, in one commit.

    Everything is checked before any network call (see [`plan_push`]): a folder holding the secret key, anything
    that looks like a key, or a file that is not part of an EE checkpoint is refused. The repo is created if
    needed (`exist_ok=True`), the branch `revision` too, and exactly the planned files are committed. A
    `README.md` already in the folder is replaced by the rendered card.

    Args:
        folder (`str` or `os.PathLike`): the EE checkpoint folder written by `hss-ee convert`.
        repo_id (`str`): the target repo, e.g. `"me/smollm2-ee"`.
        private (`bool`, *optional*, defaults to `False`): create the repo private (otherwise it is public, unless
            the organisation's default is private). Has no effect on an existing repo.
        revision (`str`, *optional*): the branch to push to (created from `main` if missing).
        token (`str` or `bool`, *optional*): a Hub token with write access (defaults to `HF_TOKEN` or the stored
            login). It is never logged.
        commit_message (`str`, *optional*): defaults to `"Upload EE checkpoint <fingerprint prefix>"`.
        base_model (`str`, *optional*): Hub id of the original model for the card (defaults to the `hss_ee`
            block's `base_model`).
        license (`str`, *optional*): license for the card (defaults to the block's, else the base model's).
        template (`str` or `os.PathLike`, *optional*): a model card template instead of the bundled one.
        api (`HfApi`, *optional*): the client to use (e.g. one with another endpoint, or a test double).

    Returns:
        What `HfApi.create_commit` returns (a `CommitInfo` with `commit_url`).

    Raises:
        `PushRefusedError`: refused before anything was uploaded.
        `CheckpointError`: the folder is not a complete EE checkpoint.
        `HubUploadError`: the Hub could not be reached or refused the upload.

    Example:

    ```python
    >>> from hss_ee_hf import push_to_hub
    >>> push_to_hub("smollm2-ee", "me/smollm2-ee", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    ```
    """
    plan = plan_push(folder, repo_id, base_model=base_model, license=license, revision=revision, template=template)
    if plan.replaced_readme:
        logger.warning("README.md in %s is replaced by the rendered model card in the upload", plan.folder)
    if api is None:
        if is_offline():
            raise HubUploadError("offline mode is on (HF_HUB_OFFLINE=1): unset it to push. Nothing was uploaded")
        api = HfApi()
    operations = plan.operations()
    message = commit_message or f"Upload EE checkpoint {plan.fingerprint[:12]}"
    description = (
        f"EE checkpoint, fingerprint {plan.fingerprint}, format version {plan.format_version}, uploaded with "
        f"{LIBRARY_NAME} {library_version()}. The secret key is not part of it."
    )
    logger.info("pushing %d files to %s: %s", len(operations), repo_id, ", ".join(plan.paths_in_repo))
    try:
        url = api.create_repo(repo_id, private=True if private else None, token=token, exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        return api.create_commit(
            repo_id,
            operations,
            commit_message=message,
            commit_description=description,
            token=token,
            revision=revision,
        )
    except (OSError, OfflineModeIsEnabled) as err:  # HfHubHTTPError is an OSError
        raise HubUploadError(
            f"pushing to {repo_id} failed: {err}. Check the repo id, that your token has write access "
            "(`hf auth login` or HF_TOKEN), and the network; no commit was made"
        ) from err
