"""Additive secret sharing over Z_2^64 (DESIGN.md §2, §4).

`x = x_A + x_B mod 2^64` with `x_A` uniform from a ChaCha20 keystream under a fresh 32-byte seed,
so each share alone is a uniformly random ring element independent of `x`. Because `x_A` is a
function of its seed, party A can be sent the 32-byte seed instead of the share itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .csprng import ChaChaStream, new_seed


@dataclass(frozen=True)
class Shares:
    """The two additive shares of one tensor.

    Attributes:
        seed (`bytes`): the secret seed that expands to `a` (send it only to party A).
        a (`torch.Tensor`): party A's share, `expand_share(seed, shape)`.
        b (`torch.Tensor`): party B's share, `x - a mod 2^64`.
    """

    seed: bytes
    a: torch.Tensor
    b: torch.Tensor

    def __repr__(self) -> str:  # never print a seed or a share
        return f"Shares(shape={tuple(self.a.shape)})"


def expand_share(seed: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Expands a 32-byte seed into a uniform `int64` share of the given shape."""
    return ChaChaStream(seed).int64(tuple(shape))


def share(x: torch.Tensor) -> Shares:
    """Splits an `int64` ring tensor into two uniformly random additive shares.

    Args:
        x (`torch.Tensor`): ring elements (`int64`).

    Returns:
        [`Shares`] with `a + b == x` (mod 2^64).
    """
    return share_with(x, *mask_for(tuple(x.shape)))


def mask_for(shape: tuple[int, ...]) -> tuple[bytes, torch.Tensor]:
    """A fresh seed and party A's share it expands to, drawn before the value to share exists.

    Party A's share never depends on the data, so it (and party A's product with it) can be prepared ahead of time;
    [`share_with`] completes the pair once the value is known.
    """
    seed = new_seed()
    return seed, expand_share(seed, shape)


def share_with(x: torch.Tensor, seed: bytes, a: torch.Tensor) -> Shares:
    """Shares `x` under a mask from [`mask_for`] (used exactly once): `b = x - a mod 2^64`."""
    if x.dtype != torch.int64:
        raise TypeError(f"only int64 ring tensors can be shared, got {x.dtype}")
    if x.shape != a.shape:
        raise ValueError(f"mask shape {tuple(a.shape)} does not match the value's {tuple(x.shape)}")
    if not (x.is_cpu and a.is_cpu):
        return Shares(seed=seed, a=a, b=x.cpu() - a.cpu())
    # the same wrapping subtraction as torch's, without its dispatch (a decode step shares 121 times a token)
    b = np.empty(tuple(x.shape), dtype=np.int64)
    np.subtract(x.numpy(), a.numpy(), out=b)
    return Shares(seed=seed, a=a, b=torch.from_numpy(b))


def reconstruct(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Adds two shares back together (mod 2^64)."""
    if a.shape != b.shape:
        raise ValueError(f"shares have different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return a + b
