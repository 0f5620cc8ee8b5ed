"""`hss-ee convert`: stream a checkpoint through the EE transforms, verify, then move it into place.

The conversion writes into a temporary folder beside the output, verifies on random token ids that
the EE model is equivariant to the original (`logits_EE(pi(ids))[..., pi] == logits(ids)`), and only
then writes the key (mode 0600, never inside the output) and renames the folder into place. A
failure at any point leaves no half-written checkpoint and no key.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hss_ee_hf.artifacts.checkpoint import (
    CLIENT_SHARD,
    CONFIG_KEY,
    INDEX_FILE,
    HSSEECheckpointInfo,
    combine_digests,
    short,
    tensor_digest,
)
from hss_ee_hf.artifacts.integrity import DIGESTS_KEY
from hss_ee_hf.artifacts.key import EEKey
from hss_ee_hf.artifacts.layouts import server_tensor_names
from hss_ee_hf.artifacts.weights import iter_stage_weights
from hss_ee_hf.ee.families import spec_class_for
from hss_ee_hf.hub.model_card import render_model_card
from hss_ee_hf.ring.csprng import ChaChaStream
from hss_ee_hf.ring.fixed_point import RingConfig

from .paths import check_output_paths, check_writable
from .source import ModelSource, open_source
from .verify import verify_equivariance

logger = logging.getLogger(__name__)
DEFAULT_SHARD_BYTES = 256 * 1024**2


@dataclass
class ConversionResult:
    """What a conversion produced.

    Attributes:
        output (`Path`): the EE checkpoint folder.
        key_path (`Path`): the secret key file.
        fingerprint (`str`): fingerprint of the EE weights.
        max_abs_logit_diff (`float` or `None`): largest |logit difference| seen by verification.
        max_rel_logit_diff (`float` or `None`): the same relative to the largest |logit|.
        seconds (`float`): wall time.
    """

    output: Path
    key_path: Path
    fingerprint: str
    max_abs_logit_diff: float | None
    max_rel_logit_diff: float | None
    seconds: float


class _ShardWriter:
    """Writes tensors into size-bounded safetensors shards and keeps the index and digests."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.weight_map: dict[str, str] = {}
        self.digests: dict[str, bytes] = {}
        self._buffer: dict[str, torch.Tensor] = {}
        self._size = 0
        self._count = 0

    def add(self, name: str, tensor: torch.Tensor, client: bool = False, client_buffer: dict | None = None) -> None:
        if tensor.is_floating_point():  # integer buffers (BatchNorm's num_batches_tracked) keep their dtype
            tensor = tensor.to(torch.float32)
        tensor = tensor.contiguous()
        self.digests[name] = tensor_digest(name, tensor)
        if client:
            client_buffer[name] = tensor
            self.weight_map[name] = CLIENT_SHARD
            return
        self._buffer[name] = tensor
        self._size += tensor.numel() * tensor.element_size()
        if self._size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        self._count += 1
        file = f"model-server-{self._count:05d}.safetensors"
        save_file(self._buffer, str(self.folder / file), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self._buffer, file))
        self._buffer, self._size = {}, 0


def _make_public(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only files; a checkpoint is public, so use the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def _write_ee_tensors(source: ModelSource, spec, ee_config, tmp: Path, shard_bytes: int) -> str:
    """Streams every tensor through the spec; returns the fingerprint."""
    spec.source_names = {n for group in source.shards() for n in group}
    first_pass = [n for group in source.shards() for n in group if spec.needs_first_pass(n)]
    small = dict(source.iter_tensors(first_pass))
    server = server_tensor_names(ee_config)
    writer = _ShardWriter(tmp, shard_bytes)
    client: dict[str, torch.Tensor] = {}
    total = sum(len(g) for g in source.shards())
    with tqdm(total=total, desc="EE-transforming tensors", unit="tensor") as bar:
        for group in source.shards():
            for name, tensor in source.iter_tensors(group):
                bar.update(1)
                for out_name, out_tensor in spec.transform(name, tensor, small).items():
                    writer.add(out_name, out_tensor, client=out_name not in server, client_buffer=client)
    writer.flush()
    save_file(client, str(tmp / CLIENT_SHARD), metadata={"format": "pt"})
    total_size = sum(os.path.getsize(tmp / f) for f in set(writer.weight_map.values()))
    # Every tensor's digest, so a server holding only its own shards can recompute the fingerprint at load and
    # name the shard that was changed (hss_ee_hf.artifacts.integrity).
    digests = {name: digest.hex() for name, digest in sorted(writer.digests.items())}
    metadata = {"total_size": total_size, DIGESTS_KEY: digests}
    index = {"metadata": metadata, "weight_map": dict(sorted(writer.weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return combine_digests(writer.digests)


def _write_scales(tmp: Path, ee_config, info: HSSEECheckpointInfo) -> None:
    """The public per-stage weight scales, derived from what was written (the servers derive the same)."""
    scales = {stage.name: scale.contiguous() for stage, _, scale in iter_stage_weights(tmp, ee_config, info.ring)}
    save_file(scales, str(tmp / info.scales_file), metadata={"format": "pt", "fingerprint": info.fingerprint})


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    key: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    force: bool = False,
    verify: bool = True,
    ring: RingConfig | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    tolerance: float = 1e-3,
    base_model: str | None = None,
    license: str | None = None,
) -> ConversionResult:
    """Converts a model into an EE checkpoint and writes its secret key.

    Args:
        src (`str` or `os.PathLike`): local HF folder, `.gguf` file, or Hub id already in the local cache.
        out (`str` or `os.PathLike`): output folder for the EE checkpoint (public).
        key (`str` or `os.PathLike`): path of the secret key file (written 0600, outside `out`).
        gguf_file (`str`, *optional*): GGUF file name inside the folder `src`.
        revision (`str`, *optional*): Hub revision when `src` is a Hub id.
        cache_dir (`str`, *optional*): Hub cache folder.
        force (`bool`, *optional*, defaults to `False`): overwrite an existing output folder and key.
        verify (`bool`, *optional*, defaults to `True`): check equivariance before writing (skip only when
            the original does not fit in memory twice).
        ring (`RingConfig`, *optional*): ring parameters recorded in the checkpoint.
        shard_bytes (`int`, *optional*): maximum size of a server shard.
        tolerance (`float`, *optional*, defaults to 1e-3): largest relative logit error verification accepts. A
            broken recipe gives errors of order 1; float32 rounding over SmolLM2's 30 layers with a random rotation
            reached 2.2e-4 for some keys, which the former 1e-4 refused.
        base_model (`str`, *optional*): Hub id of the original, recorded for model cards (defaults to `src`
            when it is a Hub id).
        license (`str`, *optional*): the original's license, recorded for model cards (defaults to the
            `license` in the source folder's `README.md` metadata, if any).

    Returns:
        [`ConversionResult`].

    Raises:
        `ConversionError`: bad paths, refused overwrite, or failed verification.
        `UnsupportedArchitectureError`: the architecture has no EE recipe.

    Example:

    ```python
    >>> from hss_ee_hf import convert
    >>> result = convert("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-ee", key="smollm2.hss-ee-key")
    >>> result.fingerprint[:12]
    ```
    """
    start = time.perf_counter()
    out_path = Path(out).expanduser().resolve()
    key_path = Path(key).expanduser().resolve()
    check_output_paths(out_path, key_path, src, force)
    check_writable(out_path.parent)
    check_writable(key_path.parent)
    ring = ring or RingConfig()
    source = open_source(src, gguf_file=gguf_file, revision=revision, cache_dir=cache_dir)
    spec = spec_class_for(source.config)(source.config, ChaChaStream())
    ee_config = spec.ee_config(copy.deepcopy(source.config))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    key_tmp: Path | None = None
    backup: Path | None = None
    moved = False
    try:
        fingerprint = _write_ee_tensors(source, spec, ee_config, tmp, shard_bytes)
        info = HSSEECheckpointInfo(
            fingerprint=fingerprint,
            ring=ring,
            base_model=base_model or source.base_model,
            license=license or source.license(),
        )
        setattr(ee_config, CONFIG_KEY, info.to_dict())
        ee_config.architectures = [spec.architecture_for(source.config)]
        ee_config.save_pretrained(tmp)
        gen = source.generation_config()
        if gen is not None:
            gen.save_pretrained(tmp)
        source.save_tokenizer(tmp)
        _write_scales(tmp, ee_config, info)
        card = render_model_card(tmp, out_path.name, base_model=info.base_model, license=info.license)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        diffs = (None, None)
        if verify:
            diffs = verify_equivariance(source, tmp, spec, tolerance)
        ee_key = EEKey(vocab_perm=spec.vocab_perm.clone(), fingerprint=fingerprint)
        key_tmp = ee_key.write_temp(key_path)
        _make_public(tmp)
        if out_path.exists():  # keep the old checkpoint until the new one and its key are both in place
            backup = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.old-", dir=out_path.parent))
            os.replace(out_path, backup / "checkpoint")
        os.replace(tmp, out_path)
        moved = True
        os.replace(key_tmp, key_path)
        key_tmp = None
    except BaseException:
        if key_tmp is not None:
            key_tmp.unlink(missing_ok=True)
        if moved:
            shutil.rmtree(out_path, ignore_errors=True)
        if backup is not None and (backup / "checkpoint").exists():
            os.replace(backup / "checkpoint", out_path)
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    seconds = time.perf_counter() - start
    logger.info("wrote EE checkpoint %s (fingerprint %s) in %.1fs", out_path, short(fingerprint), seconds)
    return ConversionResult(out_path, key_path, fingerprint, diffs[0], diffs[1], seconds)
