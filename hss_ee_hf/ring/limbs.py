"""Exact products in Z_2^64 through float64 GEMMs on limbs (DESIGN.md §4).

A 64-bit ring element splits into unsigned limbs of `bits` bits, least significant first. A product of limbs summed
over an inner dimension stays an integer below 2^53 when the bounds below hold, so float64 GEMMs (any order, any
BLAS) compute it exactly; the limbs are then recombined with wrapping `int64` shifts, where bits shifted past 2^64
vanish as reduction mod 2^64 requires. Two users:

* the servers' float64 kernel ([`hss_ee_hf.ring.matmul.RingWeight`] on CUDA or without a C compiler): three 22-bit
  limbs of the share times the 16-bit weight held once as float64 (`2^22 · 2^15 · in < 2^53` for in < 2^16);
* the client's Freivalds verifier ([`hss_ee_hf.client.verifier`]): four 16-bit limbs on both sides
  (`2^16 · 2^16 · k < 2^53` for k < 2^21).

Tests prove every function here equal to the pure int64 / Python-integer references.
"""

from __future__ import annotations

import sys

import torch

WORD_BITS = 64
# The verifier's limbs: four 16-bit words of an int64.
LIMB16_BITS = 16
N_LIMBS16 = WORD_BITS // LIMB16_BITS
MAX_EXACT_INNER16 = 1 << 21  # 2^16 * 2^16 * k < 2^53


def to_limbs(x: torch.Tensor, bits: int) -> torch.Tensor:
    """`(...)` int64 ring elements -> `(n_limbs, ...)` float64 unsigned `bits`-bit limbs, least significant first.

    Args:
        x (`torch.Tensor`): int64 ring elements.
        bits (`int`): limb width; `ceil(64 / bits)` limbs cover the word (bits at 2^64 and above vanish anyway).
    """
    if bits == LIMB16_BITS and sys.byteorder == "little":  # the four uint16 words of an int64, read in place
        return x.contiguous().view(torch.uint16).view(*x.shape, N_LIMBS16).movedim(-1, 0).to(torch.float64)
    mask = (1 << bits) - 1
    return torch.stack([(x >> (bits * k)) & mask for k in range(-(-WORD_BITS // bits))]).to(torch.float64)


def recombine(partial: torch.Tensor, bits: int) -> torch.Tensor:
    """`(n_limbs, ...)` exact integer partial sums (any dtype) of limb `k` -> `sum_k partial_k << bits·k mod 2^64`."""
    parts = partial.to(torch.int64)
    out = parts[0].clone()
    for k in range(1, parts.shape[0]):
        out += parts[k] << (bits * k)  # wraps mod 2^64, as the ring requires
    return out


def ring_matmul_nt(a_limbs: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact `a · bᵀ mod 2^64` for `a` given as 16-bit limbs `(4, m, k)` and `b` an `(n, k)` int64 tensor.

    Args:
        a_limbs (`torch.Tensor`): `to_limbs(a, 16)` of an `(m, k)` int64 tensor (precomputed once).
        b (`torch.Tensor`): `(n, k)` int64.

    Returns:
        `(m, n)` int64, the ring product.
    """
    n_limbs, m, k = a_limbs.shape
    if k >= MAX_EXACT_INNER16:
        raise ValueError(f"inner dimension {k} exceeds the exactness bound {MAX_EXACT_INNER16}")
    b_limbs = to_limbs(b, LIMB16_BITS)  # (4, n, k)
    n = b.shape[0]
    # One GEMM for all limb pairs: (4m, k) @ (k, 4n); every entry < 2^16 * 2^16 * k < 2^53 is exact.
    grid = (a_limbs.reshape(n_limbs * m, k) @ b_limbs.reshape(n_limbs * n, k).T).to(torch.int64)
    grid = grid.view(n_limbs, m, n_limbs, n)
    out = torch.zeros((m, n), dtype=torch.int64)
    for i in range(n_limbs):
        for j in range(n_limbs - i):  # pairs with i + j >= 4 carry a factor 2^64: zero in the ring
            out += grid[i, :, j, :] << (LIMB16_BITS * (i + j))  # wraps mod 2^64
    return out


def binary_matmul_nt(r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact `r · yᵀ mod 2^64` for `r` a `(t, out)` 0/1 float64 matrix and `y` an `(n, out)` int64 tensor."""
    y_limbs = to_limbs(y, LIMB16_BITS)  # (4, n, out)
    n = y.shape[0]
    partial = (r @ y_limbs.reshape(N_LIMBS16 * n, -1).T).view(-1, N_LIMBS16, n)  # (t, 4, n), each < out * 2^16
    return recombine(partial.permute(1, 0, 2), LIMB16_BITS)
