"""Publishing and fetching EE checkpoints (DESIGN.md §6) without a network.

Pushing is checked at the `HfApi` boundary with a test double: the exact files of the commit, the rendered model
card's metadata, and refusals (the key, a renamed key found by content, stray files) that leave the double
untouched. Fetching is checked against a Hub cache laid out by hand the way huggingface_hub lays it out (blobs,
snapshot symlinks, refs, tree listing) with offline mode on: a client snapshot without any server shard and a
server snapshot without the client shard each suffice for their side, and private generation from the repo id
gives the same tokens as from the local folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import save_file
from tiny_models import ARCHITECTURES, convert_tiny

from hss_ee_hf.artifacts.checkpoint import INDEX_FILE
from hss_ee_hf.cli.push import PushCommand
from hss_ee_hf.client import load_checks  # where the client opens its shards
from hss_ee_hf.client.modeling import HSSEEForCausalLM
from hss_ee_hf.errors import CheckpointError, HubUploadError, PushRefusedError
from hss_ee_hf.hub import download as hub
from hss_ee_hf.hub import upload as push
from hss_ee_hf.hub.download import CLIENT_PATTERNS, SERVER_PATTERNS, resolve_client_files, resolve_server_files
from hss_ee_hf.hub.upload import plan_push, push_to_hub
from hss_ee_hf.server.engine import StageEngine
from hss_ee_hf.transport.inprocess import InProcessTransport

REPO_ID = "org/tiny-ee"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_TESTtokenNeverLogged0123456789"
# What a tiny conversion writes; every tiny model fits in one server shard.
CLIENT_FILES = {
    "config.json",
    "generation_config.json",
    "model-client.safetensors",
    "hss_ee_scales.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}
SERVER_FILES = {"config.json", INDEX_FILE, "model-server-00001.safetensors"}
PUSHED_FILES = sorted(CLIENT_FILES | SERVER_FILES | {"README.md"})


# ----------------------------------------------------------------------------------------------- fixtures, doubles


@pytest.fixture(scope="module", params=ARCHITECTURES)
def converted(request, tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """`(original_model, ee_folder, key_path)` of a tiny model of each architecture (do not modify the folder)."""
    return convert_tiny(request.param, tmp_path_factory.mktemp(f"hub-{request.param}"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    return convert_tiny("llama", tmp_path_factory.mktemp("hub-llama"))


@pytest.fixture
def folder_copy(llama, tmp_path) -> Path:
    """A writable copy of the tiny Llama EE checkpoint (the key stays outside it)."""
    return Path(shutil.copytree(llama[1], tmp_path / "ee"))


class FakeHfApi:
    """Records the calls `push_to_hub` makes on `HfApi`; any other `HfApi` method fails the test."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.operations = []

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", dict(repo_id=repo_id, token=token, private=private, exist_ok=exist_ok)))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, *, branch, token=None, exist_ok=False, **kwargs):
        self.calls.append(("create_branch", dict(repo_id=repo_id, branch=branch, token=token, exist_ok=exist_ok)))

    def create_commit(self, repo_id, operations, *, commit_message, token=None, revision=None, **kwargs):
        self.operations = list(operations)
        self.calls.append(
            ("create_commit", dict(repo_id=repo_id, commit_message=commit_message, token=token, revision=revision))
        )
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}")

    def __getattr__(self, name):
        raise AssertionError(f"push_to_hub called HfApi.{name}, which the plan does not include")

    @property
    def uploaded(self) -> dict[str, bytes]:
        """Path in the repo -> the bytes the commit would upload."""
        out = {}
        for op in self.operations:
            src = op.path_or_fileobj
            out[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        return out


def materialize_repo(plan: push.PushPlan, dest: Path) -> Path:
    """The repo as the Hub would hold it after the planned commit."""
    dest.mkdir(parents=True)
    for rel, src in plan.files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    (dest / "README.md").write_text(plan.model_card, encoding="utf-8")
    return dest


def build_hub_cache(
    cache: Path, repo_id: str, repo: Path, *, present: Iterable[str] | None = None, ref: str = "main"
) -> Path:
    """Lays `repo` out in `cache` the way huggingface_hub does after a download of the files in `present`.

    `<cache>/models--org--name/blobs/<etag>` holds the content (sha256 for LFS files, the git blob sha1 otherwise),
    `snapshots/<commit>/<path>` are relative symlinks to the blobs, `refs/<ref>` holds the commit hash, and
    `trees/<commit>.json` the repo's full tree listing (which huggingface_hub uses offline to tell a complete
    snapshot from a partial one).
    """
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir()
    files = {p.relative_to(repo).as_posix(): p for p in sorted(repo.rglob("*")) if p.is_file()}
    present = set(files) if present is None else set(present)
    tree = {}
    for rel, path in files.items():
        data = path.read_bytes()
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = rel.endswith(".safetensors")
        etag = hashlib.sha256(data).hexdigest() if lfs else git_sha1
        tree[rel] = {"size": len(data), "blob_id": git_sha1}
        if lfs:
            tree[rel].update(lfs_sha256=etag, lfs_size=len(data))
        if rel in present:
            blob = storage / "blobs" / etag
            blob.write_bytes(data)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir()
    (storage / "refs" / ref).write_text(COMMIT)
    (storage / "trees").mkdir()
    (storage / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    return storage


@pytest.fixture
def offline(monkeypatch):
    """`HF_HUB_OFFLINE=1`, in the environment and in huggingface_hub's constants (read once at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _forbid_network(monkeypatch)


def _forbid_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was called in offline mode")

    for name in ("repo_info", "model_info", "list_repo_tree", "list_repo_files"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, no_network)


def _names(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _generate(model) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 17, 33, 60]])
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
        )


# ------------------------------------------------------------------------------------------------------ push plan


def test_push_uploads_exactly_the_checkpoint_files(converted, caplog):
    _, ee, key = converted
    api = FakeHfApi()
    with caplog.at_level(logging.DEBUG):
        result = push_to_hub(ee, REPO_ID, api=api, token=TOKEN, base_model="org/base-model", license="apache-2.0")

    assert [name for name, _ in api.calls] == ["create_repo", "create_commit"]
    create_repo, create_commit = (kwargs for _, kwargs in api.calls)
    assert create_repo == dict(repo_id=REPO_ID, token=TOKEN, private=None, exist_ok=True)
    assert create_commit["repo_id"] == REPO_ID and create_commit["revision"] is None
    assert create_commit["token"] == TOKEN
    assert result.commit_url.startswith(f"https://huggingface.co/{REPO_ID}/commit/")

    uploaded = api.uploaded
    assert sorted(uploaded) == PUSHED_FILES
    key_bytes = key.read_bytes()
    assert all(data != key_bytes for data in uploaded.values()), "the key's bytes are in the commit"
    for op in api.operations:  # every file comes from inside the checkpoint folder, unchanged
        if op.path_in_repo != "README.md":
            assert Path(op.path_or_fileobj).resolve() == (ee / op.path_in_repo).resolve()
    assert TOKEN not in caplog.text, "the token was logged"


def test_model_card_metadata_and_content(converted):
    _, ee, _ = converted
    api = FakeHfApi()
    push_to_hub(ee, REPO_ID, api=api, base_model="org/base-model", license="apache-2.0", revision="v1")
    text = api.uploaded["README.md"].decode("utf-8")
    card = ModelCard(text)
    config = json.loads((ee / "config.json").read_text())
    assert card.data.library_name == "hss-ee-hf"
    assert {"hss-ee", "private-inference", config["model_type"]} <= set(card.data.tags)
    assert card.data.base_model == "org/base-model"
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation"
    body = card.text
    assert config["hss_ee"]["fingerprint"] in body
    assert "EE format version | 1" in body
    assert f"hss-ee serve {REPO_ID}" in body and "--revision v1" in body
    assert "HSSEEForCausalLM.from_pretrained(" in body and f"hss-ee generate {REPO_ID}" in body
    assert "must not collude" in body and "obfuscation" in body and "org/base-model" in body
    assert "{{" not in text and "{%" not in text, "unrendered template syntax"


def test_card_reads_base_model_and_license_from_the_hss_ee_block(folder_copy):
    config_path = folder_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["hss_ee"].update(base_model="org/from-config", license="mit")
    config_path.write_text(json.dumps(config))
    card = ModelCard(plan_push(folder_copy, REPO_ID).model_card)
    assert (card.data.base_model, card.data.license) == ("org/from-config", "mit")
    override = ModelCard(plan_push(folder_copy, REPO_ID, base_model="org/arg", license="bsd").model_card)
    assert (override.data.base_model, override.data.license) == ("org/arg", "bsd")


def test_card_copies_the_license_of_a_cached_base_model(llama, tmp_path, monkeypatch):
    base = tmp_path / "base-repo"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\n---\n# base\n")
    build_hub_cache(tmp_path / "cache", "org/base-model", base)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    card = ModelCard(plan_push(llama[1], REPO_ID, base_model="org/base-model").model_card)
    assert (card.data.license, card.data.license_name) == ("other", "tiny-license")
    unknown = ModelCard(plan_push(llama[1], REPO_ID).model_card)
    assert unknown.data.base_model is None and unknown.data.license is None


def test_push_to_a_branch_creates_it_first(llama):
    api = FakeHfApi()
    push_to_hub(llama[1], REPO_ID, api=api, revision="dev", private=True, commit_message="first EE push")
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][1]["private"] is True
    assert api.calls[1][1] == dict(repo_id=REPO_ID, branch="dev", token=None, exist_ok=True)
    assert api.calls[2][1]["revision"] == "dev" and api.calls[2][1]["commit_message"] == "first EE push"


# ------------------------------------------------------------------------------------------------------ refusals


def _write_stripped_key(key: Path, dest: Path) -> None:
    """The key's permutation re-saved without its metadata."""
    from safetensors.torch import load_file

    save_file(load_file(str(key)), str(dest))


@pytest.mark.parametrize(
    "plant, culprit, reason",
    [
        (lambda key, ee: shutil.copy(key, ee / key.name), "llama.hss-ee-key", "named like a key file"),
        (lambda key, ee: shutil.copy(key, ee / "tokenizer.model"), "tokenizer.model", "kind=hss-ee-key"),
        (lambda key, ee: shutil.copy(key, ee / "model-client.safetensors"), "model-client.safetensors", "kind="),
        (lambda key, ee: _write_stripped_key(key, ee / "vocab.json"), "vocab.json", "`vocab_perm` tensor"),
        (
            lambda key, ee: (ee / "sub").mkdir() or shutil.copy(key, ee / "sub" / "weights.bin"),
            "sub/weights.bin",
            "kind=hss-ee-key",
        ),
        (lambda key, ee: (ee / "api_KEY.txt").write_text("harmless"), "api_KEY.txt", "name contains 'key'"),
    ],
    ids=["key-file", "renamed-allowed-name", "replaces-client-shard", "metadata-stripped", "nested", "key-name"],
)
def test_push_refuses_a_folder_holding_a_key(llama, folder_copy, plant, culprit, reason):
    plant(llama[2], folder_copy)
    api = FakeHfApi()
    with pytest.raises(PushRefusedError, match="looks like a secret EE key") as err:
        push_to_hub(folder_copy, REPO_ID, api=api, token=TOKEN)
    message = str(err.value)
    assert culprit in message and reason in message
    assert "Nothing was uploaded" in message and "move it out" in message
    assert TOKEN not in message
    assert api.calls == [], "the Hub was called although the push was refused"


@pytest.mark.parametrize("stray", ["notes.txt", ".DS_Store", "model-server-00002.safetensors", "extra/config.json"])
def test_push_refuses_files_that_are_not_part_of_a_checkpoint(folder_copy, stray):
    path = folder_copy / stray
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a key, not a checkpoint file")
    api = FakeHfApi()
    with pytest.raises(PushRefusedError, match="not part of an EE checkpoint") as err:
        push_to_hub(folder_copy, REPO_ID, api=api)
    assert stray in str(err.value) and "Nothing was uploaded" in str(err.value)
    assert api.calls == []


def test_push_refuses_an_incomplete_or_foreign_folder(llama, folder_copy):
    (folder_copy / "model-server-00001.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-server-00001.safetensors missing"):
        plan_push(folder_copy, REPO_ID)
    source_folder = llama[1].parent / "llama-src"  # the original model: no hss_ee block
    with pytest.raises(CheckpointError, match="not an EE checkpoint"):
        plan_push(source_folder, REPO_ID)
    with pytest.raises(PushRefusedError, match="not a valid Hub repo id"):
        plan_push(llama[1], "not/a/repo/id")


def test_push_replaces_a_stale_readme_with_the_rendered_card(folder_copy, caplog):
    (folder_copy / "README.md").write_text("# stale card\n")
    api = FakeHfApi()
    with caplog.at_level(logging.WARNING, logger="hss_ee_hf.hub.upload"):
        push_to_hub(folder_copy, REPO_ID, api=api)
    assert ModelCard(api.uploaded["README.md"].decode()).data.library_name == "hss-ee-hf"
    assert "replaced by the rendered model card" in caplog.text


def test_push_in_offline_mode_fails_before_creating_anything(llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(push, "HfApi", lambda: pytest.fail("HfApi created in offline mode"))
    with pytest.raises(HubUploadError, match="offline mode is on"):
        push_to_hub(llama[1], REPO_ID)


def test_push_command(llama, monkeypatch, capsys):
    api = FakeHfApi()
    monkeypatch.setattr(push, "HfApi", lambda: api)
    command = PushCommand()
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    flags = ["--private", "--revision", "dev", "--commit-message", "msg", "--base-model", "org/base-model"]
    assert command.run(parser.parse_args([str(llama[1]), REPO_ID, "--dry-run", *flags])) == 0
    assert api.calls == [] and "model-client.safetensors" in capsys.readouterr().out
    assert command.run(parser.parse_args([str(llama[1]), REPO_ID, "--token", TOKEN, *flags])) == 0
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][1]["private"] is True and api.calls[2][1]["token"] == TOKEN
    assert sorted(api.uploaded) == PUSHED_FILES
    assert ModelCard(api.uploaded["README.md"].decode()).data.base_model == "org/base-model"
    assert TOKEN not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- downloads


def test_patterns_split_the_checkpoint(converted):
    """The client's patterns select exactly its files; the server's first pass exactly config and index."""
    repo_files = [*_names(converted[1]), "README.md", ".gitattributes"]
    assert set(filter_repo_objects(repo_files, allow_patterns=CLIENT_PATTERNS)) == CLIENT_FILES
    assert set(filter_repo_objects(repo_files, allow_patterns=SERVER_PATTERNS)) == {"config.json", INDEX_FILE}


@pytest.mark.parametrize("layout", ["split", "shared"])
def test_offline_hub_cache_serves_each_side_its_files(converted, tmp_path, offline, monkeypatch, layout):
    """From a Hub cache, offline: the client generates the same tokens as from the local folder, never
    touching a server shard; the server loads from a snapshot holding only its files."""
    _, ee, key = converted
    repo = materialize_repo(plan_push(ee, REPO_ID), tmp_path / "repo")
    if layout == "split":  # what a client machine and a server machine each hold after their own downloads
        client_cache, server_cache = tmp_path / "client-cache", tmp_path / "server-cache"
        build_hub_cache(client_cache, REPO_ID, repo, present=CLIENT_FILES)
        build_hub_cache(server_cache, REPO_ID, repo, present=SERVER_FILES)
    else:  # one machine holding the whole repo
        client_cache = server_cache = tmp_path / "cache"
        build_hub_cache(client_cache, REPO_ID, repo)

    client_folder = resolve_client_files(REPO_ID, cache_dir=client_cache)
    server_folder = resolve_server_files(REPO_ID, cache_dir=server_cache)
    assert client_folder.name == server_folder.name == COMMIT
    if layout == "split":
        assert _names(client_folder) == CLIENT_FILES
        assert _names(server_folder) == SERVER_FILES

    opened: list[str] = []
    real_safe_open = load_checks.safe_open

    def recording_safe_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(load_checks, "safe_open", recording_safe_open)
    with HSSEEForCausalLM.from_pretrained(
        REPO_ID, key=key, transport=InProcessTransport(StageEngine(server_folder)), cache_dir=client_cache
    ) as from_hub:
        hub_tokens = _generate(from_hub)
    assert opened and set(opened) <= CLIENT_FILES, f"the client opened {opened}"
    with HSSEEForCausalLM.from_pretrained(ee, key=key, transport=InProcessTransport(StageEngine(ee))) as local:
        local_tokens = _generate(local)
    assert torch.equal(hub_tokens, local_tokens)


@pytest.mark.parametrize("tree_listing", [True, False], ids=["with-tree-listing", "without-tree-listing"])
def test_offline_client_snapshot_missing_its_shard_fails_clearly(llama, tmp_path, offline, tree_listing):
    repo = materialize_repo(plan_push(llama[1], REPO_ID), tmp_path / "repo")
    storage = build_hub_cache(tmp_path / "cache", REPO_ID, repo, present=CLIENT_FILES - {"model-client.safetensors"})
    if not tree_listing:
        shutil.rmtree(storage / "trees")
    with pytest.raises(CheckpointError, match="run once") as err:
        resolve_client_files(REPO_ID, cache_dir=tmp_path / "cache")
    assert REPO_ID in str(err.value)


def test_offline_uncached_repo_fails_clearly(tmp_path, offline):
    with pytest.raises(CheckpointError, match="not in the local Hub cache and offline mode is on"):
        resolve_client_files(REPO_ID, cache_dir=tmp_path / "empty-cache")
    with pytest.raises(CheckpointError, match="not in the local Hub cache and offline mode is on"):
        resolve_server_files(REPO_ID, cache_dir=tmp_path / "empty-cache")


def test_offline_revision_and_environment_only(llama, tmp_path, monkeypatch):
    """`revision` picks the ref; `HF_HUB_OFFLINE=1` set after import (constants unpatched) still keeps it local."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    _forbid_network(monkeypatch)
    repo = materialize_repo(plan_push(llama[1], REPO_ID), tmp_path / "repo")
    build_hub_cache(tmp_path / "cache", REPO_ID, repo, ref="v1")
    assert resolve_client_files(REPO_ID, revision="v1", cache_dir=tmp_path / "cache").name == COMMIT
    assert resolve_server_files(REPO_ID, revision=COMMIT, cache_dir=tmp_path / "cache").name == COMMIT
    with pytest.raises(CheckpointError, match="revision main"):
        resolve_client_files(REPO_ID, cache_dir=tmp_path / "cache")


def test_online_downloads_pass_revision_cache_dir_and_token(llama, tmp_path, monkeypatch):
    """With the network on, each side asks `snapshot_download` for exactly its files, with the caller's options."""
    repo = materialize_repo(plan_push(llama[1], REPO_ID), tmp_path / "repo")
    calls: list[dict] = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(dict(repo_id=repo_id, **kwargs))
        snapshot = tmp_path / "downloads" / kwargs["cache_dir"].name / COMMIT
        for rel in filter_repo_objects(_names(repo), allow_patterns=kwargs["allow_patterns"]):
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, snapshot / rel)
        return str(snapshot)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    options = dict(revision="v2", token=TOKEN)

    server_folder = resolve_server_files(REPO_ID, cache_dir=tmp_path / "server", **options)
    assert _names(server_folder) == SERVER_FILES
    assert calls == [
        dict(
            repo_id=REPO_ID,
            cache_dir=tmp_path / "server",
            local_files_only=False,
            allow_patterns=SERVER_PATTERNS,
            **options,
        ),
        dict(
            repo_id=REPO_ID,
            cache_dir=tmp_path / "server",
            local_files_only=False,
            allow_patterns=["model-server-00001.safetensors"],
            revision=COMMIT,  # the second pass reads the commit the first one resolved
            token=TOKEN,
        ),
    ]

    calls.clear()
    with HSSEEForCausalLM.from_pretrained(
        REPO_ID,
        key=llama[2],
        transport=InProcessTransport(StageEngine(server_folder)),
        cache_dir=tmp_path / "client",
        **options,
    ) as model:
        assert _generate(model).shape[1] > 6
    assert calls == [
        dict(
            repo_id=REPO_ID,
            cache_dir=tmp_path / "client",
            local_files_only=False,
            allow_patterns=CLIENT_PATTERNS,
            **options,
        )
    ]
    assert _names(tmp_path / "downloads" / "client" / COMMIT) == CLIENT_FILES

    calls.clear()
    resolve_client_files(REPO_ID, cache_dir=tmp_path / "client", local_files_only=True)
    assert calls[0]["local_files_only"] is True
