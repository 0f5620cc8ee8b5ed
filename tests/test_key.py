"""The secret EE key file: atomic 0600 writes, round trips, and typed errors (DESIGN.md §6)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from hss_ee_hf.artifacts.checkpoint import FORMAT_VERSION, short
from hss_ee_hf.artifacts.key import KEY_KIND, EEKey
from hss_ee_hf.errors import KeyFileError, KeyMismatchError
from hss_ee_hf.ring.csprng import ChaChaStream

FINGERPRINT = "ab12" * 16
OTHER_FINGERPRINT = "cd34" * 16
VOCAB = 1000


@pytest.fixture
def key() -> EEKey:
    return EEKey(vocab_perm=ChaChaStream(b"\x05" * 32).permutation(VOCAB), fingerprint=FINGERPRINT)


def _meta(**overrides) -> dict[str, str]:
    return {"kind": KEY_KIND, "fingerprint": FINGERPRINT, "format_version": str(FORMAT_VERSION), **overrides}


def test_save_is_private_and_round_trips(tmp_path, key):
    path = key.save(tmp_path / "sub" / "model.hss-ee-key")
    assert path.is_file()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # atomic write: nothing but the key is left in the directory
    assert [p.name for p in path.parent.iterdir()] == ["model.hss-ee-key"]
    loaded = EEKey.load(path)
    assert loaded.vocab_perm.dtype == torch.int64
    assert torch.equal(loaded.vocab_perm, key.vocab_perm)
    assert loaded.fingerprint == FINGERPRINT
    assert loaded.format_version == FORMAT_VERSION
    assert EEKey.resolve(str(path)).fingerprint == FINGERPRINT
    assert EEKey.resolve(loaded) is loaded


def test_save_refuses_overwrite(tmp_path, key):
    path = key.save(tmp_path / "k.key")
    other = EEKey(vocab_perm=torch.arange(VOCAB).flip(0), fingerprint=OTHER_FINGERPRINT)
    with pytest.raises(KeyFileError, match="already exists"):
        other.save(path)
    assert EEKey.load(path).fingerprint == FINGERPRINT  # untouched
    other.save(path, overwrite=True)
    reloaded = EEKey.load(path)
    assert reloaded.fingerprint == OTHER_FINGERPRINT
    assert torch.equal(reloaded.vocab_perm, other.vocab_perm)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_check_mismatch_names_both_fingerprints(key):
    key.check(FINGERPRINT)  # the matching checkpoint passes
    with pytest.raises(KeyMismatchError) as info:
        key.check(OTHER_FINGERPRINT)
    message = str(info.value)
    assert short(FINGERPRINT) in message and short(OTHER_FINGERPRINT) in message
    assert FINGERPRINT[:12] in message and OTHER_FINGERPRINT[:12] in message


def test_inverse_perm(key):
    inv = key.inverse_perm
    assert torch.equal(inv[key.vocab_perm], torch.arange(VOCAB))
    assert torch.equal(key.vocab_perm[inv], torch.arange(VOCAB))


def test_repr_hides_permutation(key):
    text = repr(key)
    assert text == f"EEKey(vocab={VOCAB}, fingerprint={short(FINGERPRINT)})"
    values = key.vocab_perm.tolist()
    assert ", ".join(map(str, values[:3])) not in text
    assert "tensor" not in text


def test_load_missing_file(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        EEKey.load(tmp_path / "nope.key")


def test_load_directory(tmp_path):
    with pytest.raises(KeyFileError):
        EEKey.load(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello", b"this is certainly not a safetensors file\n", bytes(range(256)), (2**62).to_bytes(8, "little")],
    ids=["empty", "short", "text", "binary", "huge-header"],
)
def test_load_non_safetensors(tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match="not an hss-ee key"):
        EEKey.load(path)


@pytest.mark.parametrize(
    "tensors, metadata",
    [
        ({"weight": torch.zeros(3)}, None),  # an ordinary safetensors file
        ({"vocab_perm": torch.arange(5)}, None),  # right tensor, no metadata
        ({"vocab_perm": torch.arange(5)}, {"kind": "something-else", "fingerprint": FINGERPRINT}),
        ({"vocab_perm": torch.arange(5)}, {"kind": KEY_KIND}),  # no fingerprint
        ({"other": torch.arange(5)}, {"kind": KEY_KIND, "fingerprint": FINGERPRINT}),  # no permutation
    ],
    ids=["plain", "no-metadata", "wrong-kind", "no-fingerprint", "no-perm"],
)
def test_load_safetensors_that_is_not_a_key(tmp_path, tensors, metadata):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(KeyFileError, match="not an hss-ee key"):
        EEKey.load(path)


@pytest.mark.parametrize(
    "perm",
    [torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3]), torch.arange(4).reshape(2, 2)],
    ids=["dup", "range", "2d"],
)
def test_load_corrupted_permutation(tmp_path, perm):
    path = tmp_path / "k.key"
    save_file({"vocab_perm": perm}, str(path), metadata=_meta())
    with pytest.raises(KeyFileError, match="not an int64 permutation"):
        EEKey.load(path)


def test_load_refuses_non_integer_permutation(tmp_path):
    path = tmp_path / "k.key"
    save_file({"vocab_perm": torch.tensor([2.0, 0.0, 1.0])}, str(path), metadata=_meta())
    with pytest.raises(KeyFileError):
        EEKey.load(path)


def test_load_malformed_format_version(tmp_path):
    path = tmp_path / "k.key"
    save_file({"vocab_perm": torch.arange(3)}, str(path), metadata=_meta(format_version="one"))
    with pytest.raises(KeyFileError):
        EEKey.load(path)
