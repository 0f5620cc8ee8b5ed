"""Cryptographically secure randomness: a ChaCha20 keystream and what is derived from it.

Masks, EE transforms and Freivalds rows all come from here, never from `torch.rand*` or
numpy's default generator (DESIGN.md §4). A stream is keyed by a 32-byte seed; the same seed
expands to the same bytes on any machine, which is what lets a server expand its share from a
seed instead of receiving it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
_NONCE = b"\x00" * 16
# Plaintext of the keystream (ChaCha20 XORs it in): read, never written, by every mask up to 1 MiB.
_ZEROS = memoryview(bytes(1 << 20))


def new_seed() -> bytes:
    """Returns 32 fresh bytes from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


class ChaChaStream:
    """A deterministic ChaCha20 keystream keyed by a 32-byte seed.

    Args:
        seed (`bytes`, *optional*): 32 secret bytes. A fresh one from `os.urandom` when omitted.

    Example:

    ```python
    >>> from hss_ee_hf.ring.csprng import ChaChaStream
    >>> rng = ChaChaStream()
    >>> rng.int64((2, 3)).dtype
    torch.int64
    ```
    """

    def __init__(self, seed: bytes | None = None):
        seed = new_seed() if seed is None else seed
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
            raise ValueError(f"a ChaCha20 seed must be {SEED_BYTES} bytes")
        self._encryptor = Cipher(algorithms.ChaCha20(bytes(seed), _NONCE), mode=None).encryptor()

    def __repr__(self) -> str:  # never show the seed
        return "ChaChaStream(<secret>)"

    def bytes(self, n: int) -> bytes:
        """Returns the next `n` keystream bytes."""
        return self._encryptor.update(bytes(n))

    def int64(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform elements of Z_2^64 (as `torch.int64`) of the given shape."""
        n = math.prod(shape)
        if not n:
            return torch.empty(shape, dtype=torch.int64)
        buf = bytearray(8 * n)  # the keystream is written straight into the tensor's memory
        self._encryptor.update_into(_ZEROS[: 8 * n] if 8 * n <= len(_ZEROS) else bytes(8 * n), buf)
        return torch.frombuffer(buf, dtype=torch.int64).view(shape)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform float64 values in the open interval (0, 1), 53 random bits each."""
        n = math.prod(shape)
        words = np.frombuffer(self.bytes(8 * n), dtype=np.uint64) >> np.uint64(11)
        return torch.from_numpy((words.astype(np.float64) + 0.5) / float(1 << 53)).reshape(shape)

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal float64 values (Box-Muller over `uniform`)."""
        n = math.prod(shape)
        u1, u2 = self.uniform((n,)), self.uniform((n,))
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).reshape(shape)

    def permutation(self, n: int) -> torch.Tensor:
        """A uniformly random permutation of `range(n)` (Fisher-Yates with rejection sampling)."""
        perm = np.arange(n, dtype=np.int64)
        draws = np.frombuffer(self.bytes(8 * max(n, 1)), dtype=np.uint64)
        for i in range(n - 1, 0, -1):
            bound = i + 1
            limit = (1 << 64) - ((1 << 64) % bound)
            r = int(draws[i])
            while r >= limit:  # rejection keeps the choice exactly uniform
                r = int.from_bytes(self.bytes(8), "little")
            j = r % bound
            perm[i], perm[j] = perm[j], perm[i]
        return torch.from_numpy(perm)

    def orthogonal(self, n: int) -> torch.Tensor:
        """A Haar-random `n x n` orthogonal matrix in float64 (QR of a Gaussian, signs fixed)."""
        q, r = torch.linalg.qr(self.normal((n, n)))
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
