"""The secret EE key: the vocabulary permutation and the fingerprint of its checkpoint (DESIGN.md §6).

The key is the only secret the client needs at run time. It is stored as safetensors (the
permutation) with JSON metadata, written atomically with mode 0600, never inside a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import KeyFileError, KeyMismatchError
from .checkpoint import FORMAT_VERSION, short

KEY_KIND = "hss-ee-key"
logger = logging.getLogger(__name__)


def warn_if_exposed(path: Path) -> bool:
    """Warns (and returns `True`) when other users may read the key file: with it they can undo the EE layer.

    The client still loads it: refusing would break shared read-only setups, and the warning says what to do.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "the EE key file %s is readable by other users (mode %03o); whoever reads it can undo the vocabulary "
            "permutation. Restrict it with `chmod 600 %s`",
            path,
            stat.S_IMODE(mode),
            path,
        )
        return True
    return False


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (8-byte little-endian header length, then JSON)."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return meta


@dataclass(frozen=True)
class EEKey:
    """A secret EE key.

    Args:
        vocab_perm (`torch.Tensor`): `pi`, an `int64` permutation: original token `t` is EE token `pi[t]`.
        fingerprint (`str`): fingerprint of the EE checkpoint this key belongs to.
        format_version (`int`, *optional*): the EE format version.

    Example:

    ```python
    >>> key = EEKey.load("smollm2.hss-ee-key")
    >>> key.check(checkpoint_fingerprint)  # raises KeyMismatchError on another checkpoint's key
    ```
    """

    vocab_perm: torch.Tensor
    fingerprint: str
    format_version: int = FORMAT_VERSION

    def __repr__(self) -> str:  # never print the permutation
        return f"EEKey(vocab={self.vocab_perm.numel()}, fingerprint={short(self.fingerprint)})"

    @property
    def inverse_perm(self) -> torch.Tensor:
        """`pi^-1`: EE token `e` is original token `inverse_perm[e]`."""
        inv = torch.empty_like(self.vocab_perm)
        inv[self.vocab_perm] = torch.arange(self.vocab_perm.numel())
        return inv

    def check(self, fingerprint: str) -> None:
        """Raises `KeyMismatchError` unless this key belongs to the checkpoint with `fingerprint`."""
        if fingerprint != self.fingerprint:
            raise KeyMismatchError(
                f"key fingerprint {short(self.fingerprint)} does not match checkpoint {short(fingerprint)}; "
                "pass the key written when this checkpoint was converted, or convert the model again"
            )

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Writes the key atomically with mode 0600.

        Args:
            path (`str` or `os.PathLike`): destination file.
            overwrite (`bool`, *optional*, defaults to `False`): replace an existing file.

        Raises:
            `KeyFileError`: the file exists and `overwrite` is false, or it cannot be written.
        """
        path = Path(path).expanduser().resolve()
        if path.exists() and not overwrite:
            raise KeyFileError(f"key file {path} already exists; pass overwrite=True (--force) to replace it")
        tmp = self.write_temp(path)
        try:
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise KeyFileError(f"could not write key file {path}: {err.strerror}") from err
        return path

    def write_temp(self, path: str | os.PathLike) -> Path:
        """Writes the key (mode 0600) to a temporary file beside `path`; `os.replace` it into place to commit.

        Lets a caller make the key appear only once everything it belongs with is in place.
        """
        path = Path(path).expanduser().resolve()
        meta = {"kind": KEY_KIND, "fingerprint": self.fingerprint, "format_version": str(self.format_version)}
        data = st_save({"vocab_perm": self.vocab_perm.to(torch.int64).contiguous()}, metadata=meta)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hss-ee-key-")  # mkstemp creates it 0600
        except OSError as err:
            raise KeyFileError(f"could not write key file {path}: {err.strerror}") from err
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
        except OSError as err:
            Path(tmp).unlink(missing_ok=True)
            raise KeyFileError(f"could not write key file {path}: {err.strerror}") from err
        return Path(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EEKey:
        """Reads a key file written by [`EEKey.save`].

        Raises:
            `KeyFileError`: missing, unreadable or not an hss-ee key.
        """
        path = Path(path).expanduser()
        warn_if_exposed(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise KeyFileError(f"key file {path} does not exist; pass the key written by `hss-ee convert`") from err
        except OSError as err:
            raise KeyFileError(f"cannot read key file {path}: {err.strerror}") from err
        try:
            tensors = st_load(data)
            meta = _metadata(data)
            version = int(meta.get("format_version", "0"))
        except (SafetensorError, ValueError, KeyError, TypeError) as err:
            raise KeyFileError(f"{path} is not an hss-ee key file (malformed safetensors or metadata)") from err
        perm = tensors.get("vocab_perm")
        if meta.get("kind") != KEY_KIND or perm is None or "fingerprint" not in meta:
            raise KeyFileError(f"{path} is not an hss-ee key file")
        if (
            perm.dtype != torch.int64
            or perm.dim() != 1
            or not torch.equal(torch.sort(perm).values, torch.arange(perm.numel()))
        ):
            raise KeyFileError(f"{path} is corrupted: its vocabulary permutation is not an int64 permutation")
        return cls(vocab_perm=perm, fingerprint=meta["fingerprint"], format_version=version)

    @classmethod
    def resolve(cls, key: EEKey | str | os.PathLike) -> EEKey:
        """Accepts a loaded key or a path to one."""
        return key if isinstance(key, EEKey) else cls.load(key)
