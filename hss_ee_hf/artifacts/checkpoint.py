"""The EE checkpoint's `hss_ee` config block, its file layout and its fingerprint (DESIGN.md §6).

An EE checkpoint is an ordinary HF checkpoint of the original architecture. What makes it one of
ours is the `hss_ee` block in `config.json`; the client-side tensors (embeddings, norm weights,
biases) live in a shard of their own so a client can fetch only that shard, and the public weight
scales of every stage sit in a small file beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import torch

from ..errors import CheckpointError
from ..ring.fixed_point import RingConfig

FORMAT_VERSION = 1
CLIENT_SHARD = "model-client.safetensors"
SCALES_FILE = "hss_ee_scales.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_KEY = "hss_ee"


@dataclass
class HSSEECheckpointInfo:
    """The `hss_ee` block of an EE checkpoint's `config.json`.

    Args:
        fingerprint (`str`): SHA-256 (hex) over the EE tensors' names, dtypes, shapes and bytes.
        ring (`RingConfig`): ring parameters the servers quantise with.
        format_version (`int`): version of this layout; readers refuse versions they do not know.
        client_shard (`str`): file holding the client-side tensors.
        scales_file (`str`): file holding the public per-stage weight scales.
        base_model (`str`, *optional*): Hub id of the original model (for model cards).
        license (`str`, *optional*): license of the original model (for model cards).
    """

    fingerprint: str
    ring: RingConfig = field(default_factory=RingConfig)
    format_version: int = FORMAT_VERSION
    client_shard: str = CLIENT_SHARD
    scales_file: str = SCALES_FILE
    base_model: str | None = None
    license: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ring"] = self.ring.to_dict()
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "config") -> HSSEECheckpointInfo:
        if not isinstance(d, dict):
            raise CheckpointError(
                f"{source} has no `{CONFIG_KEY}` block: it is not an EE checkpoint. Convert the model first "
                "with `hss-ee convert SRC OUT --key KEYFILE`"
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has EE format version {version!r}; this hss-ee-hf reads version {FORMAT_VERSION}. "
                "Upgrade hss-ee-hf or convert the model again"
            )
        try:
            return cls(
                fingerprint=str(d["fingerprint"]),
                ring=RingConfig(**d.get("ring", {})),
                format_version=version,
                client_shard=str(d.get("client_shard", CLIENT_SHARD)),
                scales_file=str(d.get("scales_file", SCALES_FILE)),
                base_model=d.get("base_model"),
                license=d.get("license"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source} has a malformed `{CONFIG_KEY}` block: {err}") from err

    @classmethod
    def from_config(cls, config) -> HSSEECheckpointInfo:
        """Reads the block from a loaded `PretrainedConfig`."""
        return cls.from_dict(getattr(config, CONFIG_KEY, None), source=f"config of {config.model_type!r} model")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> HSSEECheckpointInfo:
        path = os.path.join(folder, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError as err:
            raise CheckpointError(f"{path} does not exist: {folder} is not a checkpoint folder") from err
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(config.get(CONFIG_KEY), source=path)


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """SHA-256 of one tensor's name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    h.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def combine_digests(digests: dict[str, bytes]) -> str:
    """Order-independent fingerprint from per-tensor digests (hex, 64 characters)."""
    h = hashlib.sha256(b"hss-ee-fingerprint-v1")
    for name in sorted(digests):
        h.update(digests[name])
    return h.hexdigest()


def short(fingerprint: str) -> str:
    """The first 12 hex digits, for messages."""
    return fingerprint[:12] + "…"
